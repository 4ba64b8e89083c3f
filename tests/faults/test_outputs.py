"""Reports and outputs: nothing a command wrote earlier is replaced without a word; a read-only store can be
inspected, verified and distilled from (distill writes under the run directory only)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from faultlib import Run, invoke
from test_mismatch import edit_config, user_error


def test_a_model_outside_the_run_gets_its_own_report(fresh_run, tmp_path):
    """`eval --config C other/student/model` once wrote runs/<name>/eval/student.json over the run's own student's."""
    run_dir = fresh_run.runs / "tiny"
    shutil.copytree(run_dir / "teachers" / "tl" / "model", run_dir / "student" / "model")  # the run's "student"
    other = tmp_path / "other" / "student" / "model"
    shutil.copytree(run_dir / "teachers" / "tg" / "model", other)
    result = invoke("eval", *fresh_run.args(), run_dir / "student" / "model")
    assert result.exit_code == 0, result.output
    own = (run_dir / "eval" / "student.json").read_bytes()
    result = invoke("eval", *fresh_run.args(), other)
    assert result.exit_code == 0, result.output
    digest = hashlib.sha256(str(other.resolve()).encode()).hexdigest()[:8]
    assert f"evaluating student-{digest} ({other})" in result.output
    assert (run_dir / "eval" / "student.json").read_bytes() == own
    assert json.loads((run_dir / "eval" / f"student-{digest}.json").read_text())["source"] == str(other)
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == ["student-" + digest + ".json", "student.json"]


def test_export_refuses_to_replace_an_existing_directory_unless_asked(cached_run, tmp_path):
    model = cached_run.runs / "tiny" / "teachers" / "tl" / "model"
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    user_error(invoke("export", model, out), f"{out}: exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    result = invoke("export", model, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()


def tree_digest(root: Path) -> str:
    """Every file under `root`, path and bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def read_only_store(fresh_run: Run):
    """The run's store made read-only: a read-only bind mount as root (for whom permissions do not bind), else
    chmod -R a-w. Skipped where neither is possible."""
    store = str(fresh_run.store)
    if os.geteuid() != 0:
        subprocess.run(["chmod", "-R", "a-w", store], check=True)
        yield fresh_run
        subprocess.run(["chmod", "-R", "u+w", store], check=True)
        return
    mounted = subprocess.run(["mount", "--bind", store, store], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount the store read-only here: {mounted.stderr.strip()}")
    try:
        remounted = subprocess.run(["mount", "-o", "remount,bind,ro", store], capture_output=True, text=True)
        if remounted.returncode != 0:
            pytest.skip(f"cannot remount the store read-only here: {remounted.stderr.strip()}")
        yield fresh_run
    finally:
        subprocess.run(["umount", store], check=True)


def test_a_read_only_store_can_be_inspected_verified_and_distilled_from(read_only_store):
    run, store = read_only_store, read_only_store.store
    with pytest.raises(OSError):
        (store / "probe").write_text("")  # the store really is read-only
    before = tree_digest(store)
    for args in (["inspect", store], ["verify", store], ["show", store, "--seq", 3, "--pos", 4],
                 ["stats", store, "--sample", 4]):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    run = edit_config(run, {"student_train.max_steps": 2, "student_train.checkpoint_every": 2})
    result = invoke("distill", *run.args())
    assert result.exit_code == 0, result.output
    assert (run.runs / "tiny" / "student" / "model" / "model.safetensors").is_file()
    assert tree_digest(store) == before


def test_a_file_system_refusal_is_one_line_naming_the_path(fresh_run, monkeypatch):
    """An OSError from a path the user gave (here: a figure into a read-only place) is printed, not raised."""
    import kdcache.cache.stats

    def refuse(document, out):
        raise PermissionError(13, "Permission denied", str(out))

    monkeypatch.setattr(kdcache.cache.stats, "plot_stats", refuse)
    out = fresh_run.runs / "figure.png"
    result = invoke("plot", fresh_run.store, "--out", out)
    assert result.exit_code == 2 and result.output == f"Error: {out}: Permission denied\n"
    result = invoke("plot", fresh_run.store, "--out", fresh_run.runs / "figure.xyz")
    assert result.exit_code == 2 and "a figure is written as .png, .pdf, .svg" in result.output
