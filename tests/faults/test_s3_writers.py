"""Writers on S3 (the session's local moto server): `kdcache data` and `precompute` write a sealed store there, a
killed remote precompute resumes to identical objects, a second writer is refused by the lease, transient server
errors are retried."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import fsspec
import pytest
import yaml

from faultlib import Run, invoke
from helpers_s3 import fail_first_attempts
from kdcache.cache.lock import lock_store
from test_corruption import no_traceback, refused
from test_crash import tree

pytestmark = pytest.mark.slow
KILL_AT = "teachers/tg/train/sample_ids/c/3/0/0"  # tl's shard 3 complete, tg's top-k of shard 3 written


def on_s3(run: Run, url: str) -> Run:
    """The run with `cache.store: url`."""
    cfg = yaml.safe_load(run.config.read_text())
    cfg["cache"]["store"] = url
    run.config.write_text(yaml.safe_dump(cfg))
    return run


def ok(*args: str) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, no_traceback(result)
    return result.output


def remote_tree(run: Run, url: str) -> dict[str, bytes]:
    """`test_crash.tree` of a remote store: every object under its teachers/, the run's directory made neutral."""
    fs, root = fsspec.core.url_to_fs(f"{url}/teachers")
    fs.invalidate_cache()
    return {path[len(root) + 1:]: fs.cat_file(path).replace(str(run.runs).encode(), b"<runs>")
            for path in sorted(fs.find(root))}


def test_a_killed_remote_precompute_resumes_to_the_uninterrupted_objects(cached_run, fresh_run, s3, s3_server):
    url = f"{s3}/killed/cache.zarr"
    run = on_s3(fresh_run, url)
    ok("data", *run.args())
    assert ok("verify", url).strip() == f"{url}: ok"  # published object by object, sealed last
    writer = subprocess.Popen([sys.executable, "-m", "kdcache.cli", "precompute", *run.args()],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def kill_at_put(method: str, path: str) -> int | None:
        if method == "PUT" and path.endswith(KILL_AT):
            os.kill(writer.pid, signal.SIGKILL)  # before the object is stored: never visible
            return 503
        return None

    s3_server.hook = kill_at_put
    try:
        _, err = writer.communicate(timeout=300)
    finally:
        s3_server.hook = None
    assert writer.returncode == -signal.SIGKILL, err[-3000:]
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    assert fs.isfile(f"{url}.lock") and not fs.exists(f"{url}/kdcache.manifest") and not fs.exists(f"{url}/{KILL_AT}")
    assert invoke("verify", url).exit_code == 1

    result = invoke("precompute", *run.args())  # the dead writer's lease (this host, its pid gone) is taken over
    assert result.exit_code == 0, no_traceback(result)
    assert remote_tree(run, url) == tree(cached_run)
    fs.invalidate_cache()
    assert not fs.exists(f"{url}.lock")
    assert ok("verify", url).strip() == f"{url}: ok"


def test_a_second_writer_on_s3_is_refused_while_the_lease_is_held(fresh_run, s3):
    url = f"{s3}/two-writers/cache.zarr"
    run = on_s3(fresh_run, url)
    ok("data", *run.args())
    with lock_store(url, "a test"):
        assert fsspec.filesystem("s3").isfile(f"{url}.lock")
        refused(invoke("precompute", *run.args()), f"{url}: being written by a test (pid {os.getpid()} ",
                f"which holds the lease {url.removeprefix('s3://')}.lock")
        refused(invoke("data", *run.args(), "--overwrite"), "being written by a test")
    fsspec.filesystem("s3").invalidate_cache()
    assert not fsspec.filesystem("s3").exists(f"{url}.lock")
    assert ok("verify", url).strip() == f"{url}: ok"


def test_transient_server_errors_are_retried(fresh_run, s3, s3_server):
    """Every request's first attempt (each object written, read or listed) answered 503: retried, never seen."""
    url = f"{s3}/transient/cache.zarr"
    run = on_s3(fresh_run, url)
    s3_server.hook = hook = fail_first_attempts()
    try:
        ok("data", *run.args())
        assert ok("verify", url).strip() == f"{url}: ok"
    finally:
        s3_server.hook = None
    puts = {path for method, path in hook.failed if method == "PUT"}
    assert f"/{url.removeprefix('s3://')}/kdcache.manifest" in puts and len(puts) > 10, sorted(hook.failed)
