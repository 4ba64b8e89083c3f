"""Concurrency: one writer per store at a time (cache.lock), and no reader on a store still being written.

The real case is two processes: a precompute paused between shards holds the store while a second precompute,
a `kdcache data --overwrite` and a distill try it, then it is SIGKILLed and the rerun takes its stale lock over.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import traceback
import uuid

from faultlib import invoke
from kdcache.cache.lock import lock_path, lock_store
from test_crash import debris, killer, tree, without_teachers


def refused(result, *needles: str) -> None:
    """The CLI stopped with a one-line error (exit non-zero, no traceback; the last line of its output, after
    any progress lines) containing every needle."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        "".join(traceback.format_exception(result.exception))
    assert "Traceback" not in result.output, result.output
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("Error: "), result.output
    for needle in needles:
        assert needle in error, result.output


def test_a_precompute_paused_between_shards_holds_the_store_until_killed(cached_run, fresh_run):
    run = without_teachers(fresh_run)
    ready = run.runs / "paused"
    writer = killer("replace", "teachers/ensemble/train/complete/c/5", f"pause:{ready}", "precompute", *run.args())
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert writer.poll() is None, writer.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the precompute never reached shard 5"
            time.sleep(0.1)
        holder = f"kdcache precompute (pid {writer.pid} on host {socket.gethostname()}"
        tokenizer = (run.runs / "tiny" / "tokenizer" / "tokenizer.json").read_bytes()

        # A second writer is refused, naming the holder and its lock file.
        refused(invoke("precompute", *run.args()), f"{run.store}: being written by {holder}", str(lock_path(run.store)))
        refused(invoke("data", *run.args(), "--overwrite"), f"being written by {holder}")
        assert (run.runs / "tiny" / "tokenizer" / "tokenizer.json").read_bytes() == tokenizer  # nothing retrained
        # A reader is refused, naming the store and the incomplete group (6 of 22 shards are done).
        refused(invoke("distill", *run.args()), f"{run.store}: not sealed yet: being written by {holder}")
    finally:
        writer.kill()
        writer.communicate(timeout=60)
    assert writer.returncode == -signal.SIGKILL

    result = invoke("precompute", *run.args())
    assert result.exit_code == 0, result.output
    assert f"taking over the lock of {holder}" in result.stderr
    assert "18 shards written, 6 already complete" in result.output  # train shards 6-21 and both dev shards
    assert not lock_path(run.store).exists() and not debris(run.store)
    assert tree(run) == tree(cached_run)


def test_a_second_writer_in_the_same_process_is_refused(fresh_run):
    with lock_store(fresh_run.store, "a test") as lock:
        refused(invoke("precompute", *fresh_run.args()), f"being written by a test (pid {os.getpid()} ",
                "wait for it to finish")
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not lock_path(fresh_run.store).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_its_debris_removed(fresh_run):
    before = tree(fresh_run)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = {"pid": dead.pid, "host": socket.gethostname(), "command": "kdcache precompute", "since": "earlier"}
    lock_path(fresh_run.store).write_text(json.dumps(stale))
    shard = fresh_run.store / "teachers" / "tl" / "train" / "lse" / "c" / "0" / "0" / "0"
    left = [shard.with_name(f"0.{uuid.uuid4().hex}.partial"),  # zarr's and kdcache's temporary files
            fresh_run.store.with_name(f"cache.zarr.{uuid.uuid4().hex}.partial")]
    for path in left:
        path.write_bytes(b"half a shard")

    result = invoke("precompute", *fresh_run.args())
    assert result.exit_code == 0, result.output
    assert f"taking over the lock of kdcache precompute (pid {dead.pid} on host" in result.stderr
    assert "0 shards written, 24 already complete" in result.output
    assert not any(path.exists() for path in left) and not lock_path(fresh_run.store).exists()
    assert tree(fresh_run) == before


def test_a_lock_held_on_another_host_is_not_taken_over(fresh_run):
    lock = lock_path(fresh_run.store)
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "command": "kdcache data", "since": "earlier"}))
    refused(invoke("precompute", *fresh_run.args()), "being written by kdcache data (pid 1 on host elsewhere.example",
            f"if that process is gone, delete {lock}")
    assert lock.exists()
