"""Resources: the disk fills up while `kdcache precompute` writes the store (a small tmpfs; we run as root).

Expected: one clear error naming the store and saying the disk is full (no traceback), nothing half-visible in
the store (no temporary file; every file there is whole and the same as in an uninterrupted run; verify finds
nothing wrong but the incomplete shards), and a rerun once space is freed completes it to the same bytes.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from faultlib import invoke
from kdcache.cache.manifest import unsealed
from test_concurrency import refused
from test_crash import debris, tree, without_teachers


def mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs: room for the store's tokens and about a quarter of the teachers' targets (16 MiB)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_stops_precompute_cleanly_and_a_rerun_with_space_completes_it(cached_run, fresh_run, small_disk):
    run = without_teachers(fresh_run)
    store = small_disk / "cache.zarr"
    shutil.copytree(run.store, store)
    args = (*run.args(), "--store", str(store))

    refused(invoke("precompute", *args), f"{store}: the disk is full", "rerun `kdcache precompute`")
    assert not debris(small_disk)
    written, reference = tree(run, store), tree(cached_run)
    assert any("/c/" in name for name in written)  # it failed part-way, not before the first shard
    assert {name: data for name, data in written.items() if reference.get(name) != data} == {}
    verified = invoke("verify", str(store))
    assert verified.exit_code == 1, verified.output
    problems = [line for line in verified.output.splitlines() if not line.startswith("note: ")]
    assert problems[0] == unsealed(str(store)), verified.output  # the writer stopped before sealing it
    assert problems[1:] and all(": incomplete: " in line for line in problems[1:]), verified.output

    assert mount("-o", "remount,size=64m", str(small_disk)).returncode == 0
    result = invoke("precompute", *args)
    assert result.exit_code == 0, result.output
    assert tree(run, store) == reference
    assert invoke("verify", str(store)).output.strip() == f"{store}: ok"


def test_a_full_disk_while_distilling_is_one_line_naming_the_file(fresh_run, monkeypatch):
    """Every other write (checkpoints, metrics, exports) is atomic; the CLI says which file met the full disk."""
    import errno

    import kdcache.student.checkpoint

    def full(state, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(kdcache.student.checkpoint.torch, "save", full)
    result = invoke("distill", *fresh_run.args())
    [error] = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert error.endswith(": No space left on device") and "/student/checkpoints/latest.pt" in error
    assert not list((fresh_run.runs / "tiny" / "student" / "checkpoints").glob("*"))  # no half file left
