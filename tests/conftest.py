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
def s3_server():
    """A local S3 server (moto's S3, tests/helpers_s3.py) on a free loopback port for the session. The endpoint
    and credentials reach s3fs through the standard environment, as a user's would."""
    import logging

    from helpers_s3 import S3Server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = S3Server()
    settings = {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="session")
def s3(s3_server) -> str:
    """The URL of a bucket on the session's S3 server."""
    import fsspec

    fsspec.filesystem("s3").mkdir("kdcache-tests")
    return "s3://kdcache-tests"
