"""The trainer: data order, schedule, exact resume after a crash, 2 gloo ranks = 1 rank, refusal of foreign
checkpoints and mismatched tokens, and the `kdcache teachers` command. Tiny models on a tiny store."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import Subset
from transformers import AutoModelForCausalLM

from kdcache.config import TeacherConfig, run_paths
from kdcache.cache.schema import StoreError
from helpers_train import SPECIAL_IDS, TINY_GPT2, TINY_LLAMA, VOCAB, blimp_lines, make_run, make_store, make_tokenizer, tiny_train
from kdcache.cli.pipeline import teachers
from kdcache.student.model import build_model
from kdcache.runtime import Dist
from kdcache.student.checkpoint import TrainError
from kdcache.student.data import StepBatches, TokenDataset
from kdcache.student.evaluate import dev_loss
from kdcache.student.lm import lm_loss
from kdcache.student.loop import train
from kdcache.config import METRICS_FILE

REPO = Path(__file__).resolve().parents[1]
LINES = blimp_lines(paradigms=10, per_paradigm=40)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    tokenizer = make_tokenizer(root / "tokenizer", LINES)
    return make_store(root / "cache.zarr", tokenizer, LINES), tokenizer


def run(data, out: Path, shape=TINY_LLAMA, cfg=None, loss_fn=lm_loss, resume=False, sequences=40):
    store, tokenizer = data
    torch.manual_seed(0)
    model = build_model(shape, VOCAB, SPECIAL_IDS, attn_implementation="eager")
    dataset = Subset(TokenDataset(store, "train"), range(sequences))  # 5 steps per epoch at batch 8
    return train(model, dataset, cfg or tiny_train(max_steps=12), out, loss_fn, seed=5, resume=resume,
                 fingerprint={"model": dataclasses.asdict(shape)}, tokenizer_dir=tokenizer)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


def test_data_order_is_a_seeded_permutation_split_across_ranks_and_resumable():
    n, batch, accum, world, total = 21, 8, 2, 2, 5  # 2 steps per epoch; sequences 16..20 are never read in an epoch
    def steps(rank, start=0, seed=3):
        micro = list(StepBatches(n, batch, accum, Dist(rank, world, torch.device("cpu")), seed, start, total))
        return [micro[i : i + accum] for i in range(0, len(micro), accum)]
    ranks = [steps(r) for r in range(world)]
    batches = [sorted(i for r in range(world) for m in ranks[r][s] for i in m) for s in range(total)]
    for s in range(total):
        sizes = [len(m) for r in range(world) for m in ranks[r][s]]
        assert sizes == [batch // (world * accum)] * (world * accum)
        assert len(set(batches[s])) == batch  # ranks and micro-batches are disjoint
    for epoch in range(2):  # within an epoch no sequence repeats
        seen = batches[2 * epoch] + batches[2 * epoch + 1]
        assert len(set(seen)) == 2 * batch
    assert batches[0] + batches[1] != batches[2] + batches[3]  # each epoch its own order
    assert steps(1, start=3) == ranks[1][3:]  # a resumed run reads exactly the rest
    assert steps(0, seed=4) != ranks[0]


def test_warmup_then_cosine_schedule(data, tmp_path):
    out = tmp_path / "run"
    run(data, out, cfg=tiny_train(max_steps=10, warmup_steps=3, lr=1e-2))
    lrs = [m["lr"] for m in metrics(out)]
    assert lrs[:4] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2])
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] < 1e-3
    assert [m["step"] for m in metrics(out)] == list(range(1, 11))
    assert metrics(out)[-1]["epoch"] == 2.0


class Crash(Exception):
    pass


def crashing_after(calls: int):
    """lm_loss that dies on micro-step `calls` + 1: a crash in the middle of training."""
    count = 0
    def loss_fn(model, batch):
        nonlocal count
        count += 1
        if count > calls:
            raise Crash
        return lm_loss(model, batch)
    return loss_fn


@pytest.mark.parametrize("shape", [TINY_LLAMA, TINY_GPT2], ids=["llama", "gpt2-dropout"])
def test_resume_after_a_crash_continues_exactly(data, tmp_path, shape):
    cfg = tiny_train(max_steps=12, checkpoint_every=4, grad_accum=2)
    full = run(data, tmp_path / "full", shape, cfg)
    crashed = tmp_path / "crashed"
    with pytest.raises(Crash):
        run(data, crashed, shape, cfg, loss_fn=crashing_after(8 * 2 + 1))  # inside step 9; checkpoint at 8
    assert len(metrics(crashed)) == 8 and torch.load(crashed / "checkpoints/latest.pt")["step"] == 8
    resumed = run(data, crashed, shape, cfg, resume=True)  # crosses two epoch boundaries after resuming
    assert [m["step"] for m in metrics(crashed)] == list(range(1, 13))
    expected, got = [m["loss"] for m in metrics(tmp_path / "full")], [m["loss"] for m in metrics(crashed)]
    assert got == pytest.approx(expected, abs=1e-6)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not list((crashed / "checkpoints").glob("*.partial"))  # no half-written checkpoint left behind


def test_gradient_accumulation_equals_one_big_batch(data, tmp_path):
    one = run(data, tmp_path / "one", cfg=tiny_train(max_steps=4))
    four = run(data, tmp_path / "four", cfg=tiny_train(max_steps=4, grad_accum=4))
    assert [m["loss"] for m in metrics(tmp_path / "one")] == pytest.approx(
        [m["loss"] for m in metrics(tmp_path / "four")], abs=1e-5)
    for a, b in zip(one.parameters(), four.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_foreign_or_unrequested_checkpoints_are_refused(data, tmp_path):
    out = tmp_path / "run"
    run(data, out, cfg=tiny_train(max_steps=2))
    ckpt = out / "checkpoints" / "latest.pt"
    with pytest.raises(TrainError, match=f"{ckpt}: a checkpoint exists; pass --resume"):
        run(data, out, cfg=tiny_train(max_steps=2))
    with pytest.raises(TrainError, match=rf"{ckpt}: checkpoint is from another config \(train: .*'lr': 0.003.*'lr': 0.001"):
        run(data, out, cfg=tiny_train(max_steps=2, lr=1e-3), resume=True)
    with pytest.raises(TrainError, match=rf"{ckpt}: checkpoint is from another config \(model: "):
        run(data, out, shape=dataclasses.replace(TINY_LLAMA, num_layers=1), cfg=tiny_train(max_steps=2), resume=True)
    # settings that do not change the trajectory may change
    run(data, out, cfg=tiny_train(max_steps=2, grad_accum=2, log_every=5), resume=True)


def test_tokens_that_do_not_fit_the_model_are_refused(data):
    store, _ = data
    dataset = TokenDataset(store, "train")
    model = build_model(dataclasses.replace(TINY_LLAMA, max_position=8), VOCAB + 1, SPECIAL_IDS)
    with pytest.raises(StoreError, match=rf"{store}: tokens/train do not fit the model: the model's vocab_size is "
                                         rf"{VOCAB + 1}, the store's {VOCAB}; the model's max_position 8 < seq_len 16"):
        dataset.check_model(model.config)


def test_batch_that_does_not_split_over_ranks_is_refused(data, tmp_path):
    with pytest.raises(TrainError, match="batch_size 8 is not divisible by world_size 1 x grad_accum 3"):
        run(data, tmp_path / "run", cfg=tiny_train(grad_accum=3))


def torchrun_teachers(config: Path, runs_root: Path, nproc: int) -> str:
    launcher = runs_root.parent / "kdcache_main.py"
    launcher.write_text("from kdcache.cli import main\nmain()\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                    str(launcher), "teachers", "--config", str(config), "--runs-root", str(runs_root)],
                   cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=300).stdout


def test_teachers_command_two_gloo_ranks_match_one(tmp_path):
    teacher = TeacherConfig("llama", TINY_LLAMA, train=tiny_train(max_steps=6, grad_accum=2))
    pretrained = TeacherConfig("hub", pretrained="some/model")
    cfg = make_run(tmp_path, [teacher, pretrained], LINES)
    one, two = run_paths(cfg, tmp_path / "runs"), run_paths(cfg, tmp_path / "runs2")
    shutil.copytree(one.root, two.root)

    result = CliRunner().invoke(teachers, ["--config", cfg.source_path, "--runs-root", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "hub: pretrained (some/model), not trained" in result.output
    assert not two.teacher("hub").exists()
    stdout = torchrun_teachers(Path(cfg.source_path), tmp_path / "runs2", nproc=2)
    assert "batch 8 = 2 ranks x 2 accum x 2 sequences" in stdout and stdout.count("llama: saved") == 1

    losses = [[m["loss"] for m in metrics(p.teacher("llama"))] for p in (one, two)]
    assert len(losses[0]) == len(losses[1]) == 6  # rank 0 alone writes the metrics
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)
    assert losses[0][-1] < losses[0][0]
    a, b = (AutoModelForCausalLM.from_pretrained(p.teacher("llama") / "model") for p in (one, two))
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-4)


def test_teachers_command_errors_are_one_clear_line(tmp_path):
    cfg = make_run(tmp_path, [TeacherConfig("llama", TINY_LLAMA, train=tiny_train(max_steps=2))], LINES)
    result = CliRunner().invoke(teachers, ["--config", cfg.source_path, "--runs-root", str(tmp_path / "runs"),
                                           "--teacher", "nope"])
    assert result.exit_code == 2
    assert f"Error: {cfg.source_path}: no teacher named 'nope'" in result.output
    result = CliRunner().invoke(teachers, ["--config", cfg.source_path, "--runs-root", str(tmp_path / "elsewhere")])
    assert result.exit_code == 2 and "elsewhere" in result.output and "not a kdcache store" in result.output


def test_dev_cross_entropy_is_logged_every_eval_every_steps_without_changing_the_run(data, tmp_path):
    store, tokenizer = data
    plain, evaluated = tmp_path / "plain", tmp_path / "evaluated"
    run(data, plain, cfg=tiny_train(max_steps=7))
    torch.manual_seed(0)
    model = build_model(TINY_LLAMA, VOCAB, SPECIAL_IDS, attn_implementation="eager")
    trained = train(model, Subset(TokenDataset(store, "train"), range(40)), tiny_train(max_steps=7, eval_every=3),
                    evaluated, lm_loss, seed=5, resume=False, fingerprint={"model": dataclasses.asdict(TINY_LLAMA)},
                    tokenizer_dir=tokenizer, dev=TokenDataset(store, "dev"))
    records = metrics(evaluated)
    dev = [r for r in records if "dev_ce" in r]
    assert [r["step"] for r in dev] == [3, 6, 7]  # every 3 steps and after the last
    assert dev[-1]["dev_ce"] == pytest.approx(dev_loss(trained.eval(), TokenDataset(store, "dev"), 8)["ce"], abs=1e-6)
    def trajectory(records):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records if "dev_ce" not in r]
    assert trajectory(records) == trajectory(metrics(plain))  # measuring the dev loss changes nothing
