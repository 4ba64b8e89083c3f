"""kdcache: offline knowledge distillation for small language models, with its version and public API.

Importing this package loads nothing heavy: every stage (`kdcache.cache`, `kdcache.precompute`,
`kdcache.student`) imports it first, and `kdcache inspect` must never pay for torch.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

try:
    __version__ = version("kdcache")  # one source: pyproject.toml
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"

# The stages live in top-level folders that the installed package maps to kdcache.cache, ... (pyproject.toml's
# package-dir). Run from a source checkout, this folder shadows the installed package: look beside it too.
if not (Path(__file__).parent / "cache").is_dir():
    __path__.append(str(Path(__file__).resolve().parent.parent))


def __getattr__(name: str) -> Any:
    """The public API, `kdcache.api.__all__` (open_store, KDPlan, DistillDataset, KDLoss), imported on first use."""
    import kdcache.api  # light: it imports each name's module only when asked

    if name in kdcache.api.__all__:
        return getattr(kdcache.api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
