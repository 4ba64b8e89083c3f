"""kdcache: offline knowledge distillation for small language models, with its version and public API.

Importing this package loads nothing heavy: every stage (`kdcache.cache`, `kdcache.precompute`,
`kdcache.student`) imports it first, and `kdcache inspect` must never pay for torch.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("kdcache")  # one source: pyproject.toml
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"

# The stages live in top-level folders that the installed package maps to kdcache.cache, ... (pyproject.toml's
# package-dir). Run from a source checkout, this folder shadows the installed package: look beside it too.
if not (Path(__file__).parent / "cache").is_dir():
    __path__.append(str(Path(__file__).resolve().parent.parent))
