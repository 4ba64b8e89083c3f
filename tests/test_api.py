"""The public API (kdcache.open_store, KDPlan, DistillDataset, KDLoss): the README's own-loop example run as written
on a tiny cached store, plan resolution against that store, and `import kdcache` staying free of torch."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdcache
from kdcache.cache.schema import ENSEMBLE, StoreError
from kdcache.config import load_config, run_paths
from kdcache.student import kd
from test_distill import kdcache as run_cli
from test_distill import tiny_config, write_config

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Using the cache from your own training loop"


def readme_example() -> str:
    section = (REPO / "README.md").read_text().split(SECTION)[1].split("\n## ")[0]
    [code] = re.findall(r"```python\n(.*?)```", section, re.S)
    return code


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A tiny run's store with the teachers' targets cached (teachers "tl" and "tg", k=8, T in {1, 2})."""
    root = tmp_path_factory.mktemp("api")
    runs = root / "runs"
    config = write_config(root / "tiny.yaml", tiny_config(runs))
    for step in ("data", "teachers", "precompute"):
        run_cli(step, "--config", str(config), "--runs-root", str(runs))
    return run_paths(load_config(config), runs).store


@pytest.mark.slow
def test_the_readme_example_trains_a_model_on_the_cache(store, capsys):
    code = readme_example()
    demo = ('"runs/demo/cache.zarr"', '"llama-tiny"', '"gpt2-tiny"')
    assert all(literal in code for literal in demo)
    for literal, tiny in zip(demo, (repr(str(store)), '"tl"', '"tg"')):  # the tiny run's store and teachers
        code = code.replace(literal, tiny)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)

    losses = [float(line.split()[1]) for line in capsys.readouterr().out.splitlines()]
    assert len(losses) >= 4 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]
    model, kd_loss = namespace["model"], namespace["kd_loss"]
    batch = next(iter(namespace["loader"]))
    loss, terms = kd_loss(model(input_ids=batch["input_ids"]).logits, batch)
    loss.backward()
    assert set(terms) == {"hard_ce", "kl/tl", "kl/tg"} and torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.slow
def test_a_plan_resolves_groups_and_lse_columns_against_the_store(store):
    plan = kdcache.KDPlan.from_store(store, {"tl": 0.25, "tg": 0.0}, form="tail", temperature=2.0, hard_weight=0.5)
    assert plan.weights == {"tl": 0.25} and plan.temperature_index == {"tl": 1}
    batch = kdcache.DistillDataset(store, "train", plan).__getitems__([0, 1])
    assert set(batch) == {"input_ids", "tl/topk_logits", "tl/topk_ids", "tl/lse"}
    assert batch["tl/lse"].shape == batch["input_ids"].shape  # one column: logsumexp(logits / 2)

    seed = kdcache.KDPlan.from_store(store, {}, form="seed_exact", temperature=1.0, hard_weight=0.25)
    assert seed.weights == {ENSEMBLE: 0.75 * 32} and seed.temperature_index == {ENSEMBLE: 0}

    with pytest.raises(StoreError, match="no cached teacher 'nope'"):
        kdcache.KDPlan.from_store(store, {"nope": 1.0}, form="tail", temperature=2.0, hard_weight=0.5)
    with pytest.raises(StoreError, match="no log-sum-exp at T=3.0"):
        kdcache.KDPlan.from_store(store, {"tl": 1.0}, form="tail", temperature=3.0, hard_weight=0.5)
    # samples drawn at T=2 (cache.sample_temperature) estimate the teacher at T=2 only
    assert kdcache.KDPlan.from_store(store, {"tl": 1.0}, form="sampled", temperature=2.0, hard_weight=0.5)
    with pytest.raises(StoreError, match=r"'tl' holds samples drawn at T=2.0 .* but distill.temperature is 1.0"):
        kdcache.KDPlan.from_store(store, {"tl": 1.0}, form="sampled", temperature=1.0, hard_weight=0.5)


def test_the_public_names_are_the_kd_packages_and_load_lazily():
    assert kdcache.KDLoss is kd.KDLoss and kdcache.DistillDataset is kd.DistillDataset and kdcache.KDPlan is kd.KDPlan
    with pytest.raises(AttributeError, match="no attribute 'train'"):
        kdcache.train
    code = ("import sys, kdcache; from kdcache import config; kdcache.open_store; "
            "assert 'torch' not in sys.modules, 'torch loaded'; kdcache.KDLoss; assert 'torch' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
