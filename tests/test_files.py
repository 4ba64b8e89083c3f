"""Atomic writes are durable: data reaches the disk before the rename that makes it visible, the rename after."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kdcache import files


@pytest.fixture
def disk_log(monkeypatch) -> list[tuple[str, str]]:
    """Every fsync (the path its descriptor names) and rename, in order."""
    log: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd: int) -> None:
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def logged_replace(src, dst) -> None:
        log.append(("rename", str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    return log


def test_a_file_is_flushed_before_its_rename_and_the_rename_after(tmp_path, disk_log):
    target = tmp_path / "shard"
    files.atomic_write(target, b"data")
    assert target.read_bytes() == b"data"
    [(op1, staged), (op2, renamed), (op3, directory)] = disk_log
    assert (op1, op2, op3) == ("fsync", "rename", "fsync")
    assert staged.startswith(f"{target}.") and staged.endswith(".partial")
    assert renamed == str(target) and directory == str(tmp_path)


def test_a_staged_directory_is_flushed_entries_first(tmp_path, disk_log):
    final = tmp_path / "model"
    with files.staged(final) as tmp:
        (tmp / "sub").mkdir(parents=True)
        (tmp / "sub" / "weights").write_bytes(b"w")
        (tmp / "config.json").write_text("{}")
    flushed = [Path(p) for op, p in disk_log if op == "fsync"]
    renamed = [op for op, _ in disk_log].index("rename")
    names = [p.name for p in flushed]
    assert sorted(names[:renamed]) == sorted(["weights", "config.json", "sub", tmp.name])
    assert names.index("weights") < names.index("sub") and names[renamed - 1] == tmp.name  # the tree's root last
    assert disk_log[-1] == ("fsync", str(tmp_path)) and (final / "sub" / "weights").read_bytes() == b"w"
