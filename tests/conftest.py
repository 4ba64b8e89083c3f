"""Shared test settings: tiny models run faster single-threaded on a busy 2-core machine."""

import os
from pathlib import Path

import pytest
import torch

from shared_data import SHARED_DATA

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def shard_cache(tmp_path_factory) -> Path:
    """Remote stores' shards are cached under the session's temporary directory, not the user's home."""
    path = tmp_path_factory.mktemp("shard-cache")
    os.environ["KDCACHE_SHARD_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA}: the shared BabyLM/BLiMP data is missing (set KDCACHE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def s3() -> str:
    """A local S3 server (moto's server mode) on a free loopback port for the session: the bucket's URL. The
    endpoint and credentials reach s3fs through the standard environment, as a user's would."""
    from moto.server import ThreadedMotoServer

    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    settings = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    import fsspec

    fsspec.filesystem("s3").mkdir("kdcache-tests")
    try:
        yield "s3://kdcache-tests"
    finally:
        server.stop()
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
