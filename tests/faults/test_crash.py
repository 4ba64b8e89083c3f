"""Crash and resume: `kdcache precompute`, teacher training and distill killed with SIGKILL, then rerun.

Each kill is real: the command runs in a subprocess (KILLER) that SIGKILLs itself at a deterministic point, so
nothing in the process gets to clean up. The rerun must give what an uninterrupted run gives: the same store,
byte for byte (so array for array and attribute for attribute), or the same loss curve with no step repeated or
lost, resumed from the last complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from faultlib import Run, invoke
from kdcache.cache.lock import DEBRIS, lock_path
from kdcache.cache.manifest import MANIFEST, manifest_problems
from kdcache.cache.storage import StoreFiles
from kdcache.cache.schema import completed_shards, open_store
from kdcache.config import run_paths

REPO = Path(__file__).resolve().parents[2]

# python -c KILLER ACTION TARGET WHEN kdcache-args...: run a kdcache command that SIGKILLs itself
#   replace TARGET before|after|pause:FILE  when an atomic write renames a file onto a path ending in TARGET: before
#                                           the rename, after it, or (pause) touch FILE and wait there for a kill
#   save N -                                halfway through writing checkpoint number N (the bytes torch.save makes)
#   log STEP -                              halfway through writing metrics.jsonl's record of step STEP
KILLER = r"""
import io, json, os, signal, sys, time
from pathlib import Path
action, target, when, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if action == "replace":
    real_replace = os.replace
    def replace(src, dst, *a, **kw):
        hit = str(dst).endswith(target)
        if hit and when == "before":
            die()
        real_replace(src, dst, *a, **kw)
        if hit and when == "after":
            die()
        if hit and when.startswith("pause:"):
            Path(when[len("pause:"):]).touch()
            time.sleep(600)
    os.replace = replace
elif action == "save":
    import torch
    real_save, calls = torch.save, [0]
    def save(obj, f, *a, **kw):
        calls[0] += 1
        if calls[0] == int(target):
            buf = io.BytesIO()
            real_save(obj, buf, *a, **kw)
            Path(f).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
            die()
        return real_save(obj, f, *a, **kw)
    torch.save = save
elif action == "log":
    from kdcache.student import metrics
    real_write = metrics.MetricsLog.write
    def write(self, record):
        if record.get("step") == int(target) and "loss" in record:
            self.file.write(json.dumps(record)[:25])
            self.file.flush()
            die()
        real_write(self, record)
    metrics.MetricsLog.write = write
from kdcache.cli import main
main(args, prog_name="kdcache")
"""


def killer(action: str, target: str, when: str, *args: str) -> subprocess.Popen:
    """Start a kdcache command in a subprocess that SIGKILLs itself (or pauses) at the given point."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # one thread, like the test process
    return subprocess.Popen([sys.executable, "-c", KILLER, action, target, when, *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def killed(action: str, target: str, when: str, *args: str) -> int:
    """Run a kdcache command until it kills itself; returns its pid."""
    process = killer(action, target, when, *args)
    _, err = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL, f"not killed (exit {process.returncode}): {err[-3000:]}"
    return process.pid


def tree(run: Run, store: Path | None = None) -> dict[str, bytes]:
    """Every file precompute writes (the teacher groups of the run's store, or of `store`), the run's own
    directory (in the teachers' `source` attribute) made neutral."""
    root = (store or run.store) / "teachers"
    return {str(p.relative_to(root)): p.read_bytes().replace(str(run.runs).encode(), b"<runs>")
            for p in sorted(root.rglob("*")) if p.is_file()}


def debris(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if DEBRIS.search(p.name)]


def without_teachers(run: Run) -> Run:
    shutil.rmtree(run.store / "teachers")
    return run


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(records: list[dict]) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in records if "loss" in m]


def assert_resumed_exactly(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [step for step, _ in got] == [step for step, _ in want] == list(range(1, len(want) + 1))
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in want], abs=1e-5)


# Each point: the file whose atomic rename it dies at, before or after the rename, and the shards it leaves
# incomplete (teacher/split: completion flags). Per shard the writer writes tl's arrays and marks tl complete,
# then tg's, then the ensemble's.
KILL_POINTS = {
    # tl's shard 3 is complete, tg's top-k of shard 3 is written, its samples half-way (a temporary file)
    "mid-shard": ("teachers/tg/train/sample_ids/c/3/0/0", "before", "tg/train", [True] * 3 + [False] * 19),
    # the last write of the run: the store's manifest (every shard is complete; the old manifest was removed
    # before the first change, so the store reads as one being written, not as a damaged one)
    "final-manifest-write": ("cache.zarr/" + MANIFEST, "before", "ensemble/dev", [True, True]),
    # the teacher groups are being created: tg's dev arrays half there, no completion record yet
    "group-creation": ("teachers/tg/dev/lse/zarr.json", "before", "tg/dev", None),
}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_precompute_killed_then_rerun_gives_the_uninterrupted_store(cached_run, fresh_run, point):
    target, when, group, flags = KILL_POINTS[point]
    run = without_teachers(fresh_run)
    pid = killed("replace", target, when, "precompute", *run.args())
    assert debris(run.store), "the kill should have left a temporary file"
    assert json.loads(lock_path(run.store).read_text())["pid"] == pid
    root = open_store(str(run.store))
    if flags is None:
        assert "complete" not in root[f"teachers/{group}"]
    else:
        assert completed_shards(root[f"teachers/{group}"]).tolist() == flags

    assert not (run.store / MANIFEST).exists()

    result = invoke("precompute", *run.args())
    assert result.exit_code == 0, result.output
    assert f"taking over the lock of kdcache precompute (pid {pid} " in result.stderr
    assert not debris(run.store) and not lock_path(run.store).exists()
    assert tree(run) == tree(cached_run)
    assert manifest_problems(StoreFiles(run.store)) == []  # sealed again, listing every file and nothing else


def test_teacher_training_killed_while_saving_a_checkpoint_resumes_from_the_last_complete_one(cached_run,
                                                                                              fresh_run):
    """TRAIN checkpoints at steps 6 and 12: dying halfway through the second leaves the first, never the half."""
    teacher = run_paths(fresh_run.cfg, fresh_run.runs).teacher("tg")
    shutil.rmtree(teacher)
    killed("save", "2", "-", "teachers", *fresh_run.args(), "--teacher", "tg")
    checkpoints = teacher / "checkpoints"
    [half] = checkpoints.glob("latest.pt.*.partial")
    assert torch.load(checkpoints / "latest.pt", weights_only=True)["step"] == 6
    assert len(losses(metrics(teacher))) == 12  # every step was logged before the final checkpoint

    result = invoke("teachers", *fresh_run.args(), "--teacher", "tg", "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming at step 6" in result.output
    assert not half.exists() and not list(checkpoints.glob("*.partial"))
    reference = run_paths(cached_run.cfg, cached_run.runs).teacher("tg")
    assert_resumed_exactly(losses(metrics(teacher)), losses(metrics(reference)))
    got, want = load_file(teacher / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5)


def test_distill_killed_between_checkpoints_continues_the_loss_curve(fresh_run):
    """Killed while logging step 9 (checkpoint at 6): the cut line and steps 7-8 are dropped and redone once."""
    student = run_paths(fresh_run.cfg, fresh_run.runs).student
    assert invoke("distill", *fresh_run.args()).exit_code == 0
    reference = losses(metrics(student))
    shutil.rmtree(student)

    killed("log", "9", "-", "distill", *fresh_run.args())
    lines = (student / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines[:-1]] == list(range(1, 9))
    with pytest.raises(ValueError):
        json.loads(lines[-1])  # step 9's record, cut short
    assert torch.load(student / "checkpoints" / "latest.pt", weights_only=True)["step"] == 6

    result = invoke("distill", *fresh_run.args(), "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming at step 6" in result.output
    assert_resumed_exactly(losses(metrics(student)), reference)
    assert np.isfinite([loss for _, loss in reference]).all()
