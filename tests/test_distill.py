"""End to end on a tiny demo run: data -> teachers -> precompute -> distill with the teachers deleted -> eval,
plus every loss form against the same store, hidden projections, exact resume and 2 gloo ranks = 1 rank."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch.utils.data import DataLoader

import kdcache.student.distill as distill_module
from kdcache.cli import main
from kdcache.config import load_config, run_paths
from kdcache.cache.reader import StoreReader
from kdcache.cache.schema import open_store
from kdcache.cache.verify import verify_store

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "max_position": 32}
TRAIN = {"lr": 3.0e-3, "batch_size": 16, "max_steps": 12, "warmup_steps": 2, "checkpoint_every": 6, "log_every": 1}


def tiny_config(runs_root: Path, name: str = "tiny", **distill) -> dict:
    return {
        "name": name,
        "seed": 7,
        "corpus": {"kind": "demo", "demo_train_sentences": 3000, "demo_dev_sentences": 200,
                   "demo_pairs_per_phenomenon": 10},
        "tokenizer": {"vocab_size": 400, "min_frequency": 2},
        "data": {"seq_len": 32, "sequences_per_shard": 64},
        "teachers": [
            {"name": "tl", "model": {"arch": "llama", **TINY_MODEL}, "train": TRAIN},
            {"name": "tg", "model": {"arch": "gpt2", **TINY_MODEL, "tie_embeddings": True}, "train": TRAIN},
        ],
        "cache": {"k": 8, "temperatures": [1.0, 2.0], "hidden_layers": {"tl": [1, 2]}, "samples": 16,
                  "sample_temperature": 2.0, "ensemble": True, "batch_size": 32},
        "student": {"arch": "llama", **TINY_MODEL},
        "student_train": TRAIN,
        "distill": {"hard_weight": 0.5, "temperature": 2.0, "form": "tail",
                    "hidden": {"weight": 0.1, "kind": "mse"}, **distill},
        "eval": {"minimal_pair_dirs": [str(runs_root / "tiny" / "pairs")], "batch_size": 32},
    }


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def kdcache(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """A cached tiny run whose teacher directories are gone afterwards, as after a user's `make cache; rm -r`."""
    root = tmp_path_factory.mktemp("pipeline")
    runs = root / "runs"
    config = write_config(root / "tiny.yaml", tiny_config(runs))
    common = ("--config", str(config), "--runs-root", str(runs))
    kdcache("data", *common)
    kdcache("teachers", *common)
    kdcache("precompute", *common)
    # The online baseline is the only distill path that loads teachers: run it before they are removed.
    kdcache("distill", *common, "--online")
    shutil.rmtree(runs / "tiny" / "teachers")
    return config, runs


def test_distill_runs_with_the_teachers_deleted(run):
    config, runs = run
    out = kdcache("distill", "--config", str(config), "--runs-root", str(runs), "--baseline")
    paths = run_paths(load_config(config), runs)
    assert not (runs / "tiny" / "teachers").exists()
    assert "student: saved" in out and "baseline (no distillation): saved" in out
    kd, plain = metrics(paths.student), metrics(paths.baseline)
    assert len(kd) == len(plain) == TRAIN["max_steps"]
    assert {"hard_ce", "kl/tl", "kl/tg", "hidden"} <= set(kd[0])
    assert "kl/tl" not in plain[0]
    assert kd[-1]["kl/tl"] < kd[0]["kl/tl"] and kd[-1]["hidden"] < kd[0]["hidden"]
    # Same seed, same initial student: the first step's hard CE agrees with and without distillation.
    assert kd[0]["hard_ce"] == pytest.approx(plain[0]["loss"], rel=1e-5)

    table = kdcache("eval", "--config", str(config), "--runs-root", str(runs))
    for name in ("student", "baseline", "online"):
        assert name in table
        assert (paths.eval / f"{name}.json").is_file()


def test_hidden_projections_are_trained_and_checkpointed(run):
    config, runs = run
    paths = run_paths(load_config(config), runs)
    if not (paths.student / "checkpoints" / "latest.pt").exists():
        kdcache("distill", "--config", str(config), "--runs-root", str(runs))
    ckpt = torch.load(paths.student / "checkpoints" / "latest.pt", weights_only=False)
    extra = ckpt["extra"]
    assert sorted(extra) == ["proj.s1_tl_1.weight", "proj.s2_tl_2.weight"]
    fresh = torch.nn.Linear(32, 32, bias=False)
    assert all(w.abs().sum() > 0 and w.shape == fresh.weight.shape for w in extra.values())
    # The export is a plain HF model: no projection weights leak into it.
    from safetensors.torch import load_file
    exported = load_file(paths.student / "model" / "model.safetensors")
    assert exported and not any("_tl_" in key for key in exported)


def test_the_cached_store_verifies_and_inspects(run):
    config, runs = run
    store = run_paths(load_config(config), runs).store
    assert verify_store(store) == []
    summary = json.loads(kdcache("inspect", str(store), "--json"))
    assert set(summary["teachers"]) == {"tl", "tg", "ensemble"}
    assert summary["teachers"]["tl"]["k"] == 8
    shown = json.loads(kdcache("show", str(store), "--seq", "1", "--pos", "5", "-T", "2", "--json"))
    probs = shown["teachers"]["tl"]["probs"]
    assert 0 < sum(probs) + shown["teachers"]["tl"]["tail_mass"] <= 1.0 + 1e-3


def linked_run(run, name: str, **distill) -> tuple[Path, Path]:
    """Another run dir sharing the tiny run's store and tokenizer, with other distill settings."""
    config, runs = run
    base = run_paths(load_config(config), runs)
    other = runs / name
    other.mkdir(exist_ok=True)
    for part in ("cache.zarr", "tokenizer"):
        if not (other / part).exists():
            (other / part).symlink_to(base.root / part)
    cfg = tiny_config(runs, name, **distill)
    cfg["student_train"] = {**TRAIN, "max_steps": 4, "checkpoint_every": 2}
    return write_config(config.parent / f"{name}.yaml", cfg), runs


@pytest.mark.parametrize("form", ["renorm", "sampled", "seed_exact"])
def test_every_loss_form_trains_from_the_store(run, form):
    config, runs = linked_run(run, f"tiny-{form}", form=form, hidden={"weight": 0.0})
    kdcache("distill", "--config", str(config), "--runs-root", str(runs))
    steps = metrics(run_paths(load_config(config), runs).student)
    teacher_terms = {k for k in steps[0] if k.startswith("kl/")}
    assert teacher_terms == ({"kl/ensemble"} if form == "seed_exact" else {"kl/tl", "kl/tg"})
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in steps)


class Crash(Exception):
    pass


def test_distill_resumes_exactly_after_a_crash(run, monkeypatch):
    full_cfg, runs = linked_run(run, "tiny-full")
    crash_cfg, _ = linked_run(run, "tiny-crash")
    kdcache("distill", "--config", str(full_cfg), "--runs-root", str(runs))

    real = distill_module.make_kd_loss

    def crashing(*args, **kwargs):
        loss_fn, calls = real(*args, **kwargs), [0]

        def wrapped(model, batch):
            calls[0] += 1
            if calls[0] > 3:  # inside step 4; the checkpoint is at step 2
                raise Crash
            return loss_fn(model, batch)
        return wrapped

    monkeypatch.setattr(distill_module, "make_kd_loss", crashing)
    result = CliRunner().invoke(main, ["distill", "--config", str(crash_cfg), "--runs-root", str(runs)])
    assert isinstance(result.exception, Crash)
    monkeypatch.setattr(distill_module, "make_kd_loss", real)
    kdcache("distill", "--config", str(crash_cfg), "--runs-root", str(runs), "--resume")

    full = metrics(runs / "tiny-full" / "student")
    resumed = metrics(runs / "tiny-crash" / "student")
    for key in ("loss", "hidden", "kl/tl"):
        assert [m[key] for m in resumed] == pytest.approx([m[key] for m in full], abs=1e-5)


def test_two_gloo_ranks_match_one(run):
    config, runs = linked_run(run, "tiny-ddp")
    one_cfg, _ = linked_run(run, "tiny-one")
    kdcache("distill", "--config", str(one_cfg), "--runs-root", str(runs))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "kdcache.cli", "distill", "--config", str(config), "--runs-root", str(runs)],
                   cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=300)
    one, two = metrics(runs / "tiny-one" / "student"), metrics(runs / "tiny-ddp" / "student")
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in one], abs=1e-4)


def test_a_store_from_another_tokenizer_is_refused(run, tmp_path):
    config, runs = linked_run(run, "tiny-foreign")
    other = runs / "tiny-foreign"
    (other / "tokenizer").unlink()
    shutil.copytree(run_paths(load_config(run[0]), run[1]).tokenizer, other / "tokenizer")
    tok = other / "tokenizer" / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"<pad>"', '"<PAD>"', 1))
    result = CliRunner().invoke(main, ["distill", "--config", str(config), "--runs-root", str(runs)])
    assert result.exit_code == 2
    assert "tokenizer_sha256" in result.output and "cache.zarr" in result.output


def test_distill_dataset_batches_are_the_stores_arrays(run):
    """Through a DataLoader the batch is one tensor per stored array (ids widened, lse at the distill temperature)."""
    config, runs = run
    cfg = load_config(config)
    paths = run_paths(cfg, runs)
    plan = distill_module.plan_from_config(cfg, open_store(str(paths.store)), cfg.student.num_layers)
    dataset = distill_module.DistillDataset(paths.store, "train", plan, {})
    idx = [5, 0, 3]
    batch = next(iter(DataLoader(dataset, sampler=idx, batch_size=3, collate_fn=dataset.collate)))
    stored = StoreReader(paths.store, teachers=list(plan.arrays()), arrays=plan.arrays()).batch(idx)
    assert set(batch) == set(stored) and any(key.endswith("/hidden_2") for key in batch)
    for key, values in stored.items():
        if key.endswith("/lse"):
            values = values[..., plan.temperature_index[key.split("/")[0]]]
        assert batch[key].shape == values.shape and batch[key].dtype != torch.uint16, key
        assert torch.equal(batch[key], torch.from_numpy(values.astype(batch[key].numpy().dtype))), key
    assert all(torch.equal(dataset[3][key], batch[key][2]) for key in batch)
