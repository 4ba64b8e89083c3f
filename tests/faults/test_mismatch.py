"""Mismatches: a config that no longer matches the store it distils from, an older store format, an eval or export
pointed at a missing run or model. Each is one clear line (exit 2) before the first training step."""

from __future__ import annotations

import json
import shutil
import traceback

import pytest
import yaml
import zarr

from faultlib import Run, invoke


def user_error(result, *needles: str) -> str:
    """The CLI's error contract: exit 2, the last line `Error: ...` holding every needle, no traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        "".join(traceback.format_exception(result.exception))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error: "), result.output
    for needle in needles:
        assert needle in line, line
    return line


def edit_config(run: Run, changes: dict[str, object]) -> Run:
    """The run's config with dotted keys set ("distill.temperature": 1.0), written back in place."""
    cfg = json.loads(json.dumps(yaml.safe_load(run.config.read_text())))  # YAML aliases become separate copies
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = cfg
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[key] = value
    run.config.write_text(yaml.safe_dump(cfg))
    return run


def untrained(run: Run) -> bool:
    """Nothing of a student was written: the refusal came before the first training step."""
    return not any((run.runs / "tiny" / kind).exists() for kind in ("student", "baseline", "online"))


@pytest.mark.parametrize("changes, needles", [
    ({"tokenizer.vocab_size": 420}, ["tokenizer.vocab_size is 420, the store's is 400"]),
    ({"data.seq_len": 16}, ["data.seq_len is 16, the store's is 32"]),
    ({"teachers.1.name": "tz"}, ["no cached teacher 'tz'", "run `kdcache precompute` first"]),
    ({"cache.temperatures": [1.0, 3.0], "distill.temperature": 3.0}, ["teacher 'tl' has no log-sum-exp at T=3.0",
                                                                      "(has [1.0, 2.0])"]),
    ({"cache.hidden_layers": {"tl": [1, 2], "tg": [2]}}, ["teacher 'tg' has no cached hidden layer 2"]),
    ({"distill.hidden.mapping": {"1": ["tg", 1]}}, ["teacher 'tg' has no cached hidden layer 1"]),
    # sampled targets drawn at another temperature: the config agrees with itself (T 1.0 both), the store drew at 2.0
    ({"distill.form": "sampled", "distill.temperature": 1.0, "cache.sample_temperature": 1.0},
     ["holds samples drawn at T=2.0", "distill.temperature is 1.0"]),
], ids=["vocab_size", "seq_len", "teacher", "temperature", "hidden_layer", "hidden_mapping", "sample_temperature"])
def test_a_config_that_does_not_match_the_store_is_refused_before_training(fresh_run, changes, needles):
    run = edit_config(fresh_run, changes)
    user_error(invoke("distill", *run.args()), *needles)
    assert untrained(run)


def test_another_tokenizer_is_refused_in_every_distill_mode(fresh_run):
    tokenizer = fresh_run.runs / "tiny" / "tokenizer" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"<pad>"', '"<PAD>"', 1))
    for mode in ((), ("--baseline",), ("--online",)):
        user_error(invoke("distill", *fresh_run.args(), *mode), "does not match the store", str(fresh_run.store),
                   f"{tokenizer.parent} is not the tokenizer the store's tokens were made with")
    assert untrained(fresh_run)


def test_a_kd_form_the_store_cannot_serve_is_refused(fresh_run):
    shutil.rmtree(fresh_run.store / "teachers" / "ensemble")
    run = edit_config(fresh_run, {"distill.form": "seed_exact"})
    user_error(invoke("distill", *run.args()), "no cached teacher 'ensemble'")
    run = edit_config(fresh_run, {"distill.form": "dense"})
    user_error(invoke("distill", *run.args()), "distill.form: 'dense' is not one of")
    assert untrained(run)


def test_a_store_of_an_older_format_is_refused_with_the_way_to_upgrade(fresh_run):
    zarr.open_group(str(fresh_run.store), mode="r+").attrs["format_version"] = 2
    for args in (("distill", *fresh_run.args()), ("inspect", fresh_run.store), ("show", fresh_run.store, "--seq", 0)):
        user_error(invoke(*args), "store format version 2", "`kdcache upgrade` converts it in place")
    assert untrained(fresh_run)


def test_a_missing_run_is_named(cached_run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    args = ("--config", cached_run.config, "--runs-root", elsewhere)
    user_error(invoke("distill", *args), str(elsewhere / "tiny" / "cache.zarr"), "not a kdcache store")
    user_error(invoke("eval", *args), "no trained models to evaluate yet under", str(elsewhere / "tiny"))
    assert not elsewhere.exists()


def test_eval_and_export_name_a_missing_model(cached_run, tmp_path):
    missing = tmp_path / "other" / "student" / "model"
    user_error(invoke("eval", missing), f"{missing}: model directory not found")
    user_error(invoke("eval", *cached_run.args(), missing), f"{missing}: model directory not found")
    user_error(invoke("export", missing, tmp_path / "out"), f"{missing}: not found (SOURCE is a model directory")
    user_error(invoke("export", tmp_path / "last.pt", tmp_path / "out"), f"{tmp_path / 'last.pt'}: checkpoint not found")
    # torch's own message for a file that is no checkpoint has many lines: the error stays one
    user_error(invoke("export", cached_run.config, tmp_path / "out"),
               f"{cached_run.config}: not a readable kdcache checkpoint")
    assert not (tmp_path / "out").exists() and not (cached_run.runs / "tiny" / "eval").exists()
