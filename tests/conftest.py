"""Shared test settings: tiny models run faster single-threaded on a busy 2-core machine."""

from pathlib import Path

import pytest
import torch

from shared_data import SHARED_DATA

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA}: the shared BabyLM/BLiMP data is missing (set KDCACHE_SHARED_DATA)")
    return SHARED_DATA
