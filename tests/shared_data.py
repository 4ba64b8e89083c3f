"""Where the shared BabyLM and BLiMP files live (read-only, never copied): ../shared/data next to the repository,
or $KDCACHE_SHARED_DATA."""

import os
from pathlib import Path

SHARED_DATA = Path(os.environ.get("KDCACHE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
