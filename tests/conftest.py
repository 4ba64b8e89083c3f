"""Shared test settings: tiny models run faster single-threaded on a busy 2-core machine."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

SHARED_DATA = Path(os.environ.get("KDCACHE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA}: the shared BabyLM/BLiMP data is missing (set KDCACHE_SHARED_DATA)")
    return SHARED_DATA
