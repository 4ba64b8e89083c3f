"""The public API for training with your own loop: open a store, read it as a dataset, compute the KD loss.

`import kdcache` stays free of torch: `kdcache.<name>` (the root package's `__getattr__`) and `kdcache.api.<name>`
import a name of `__all__` from its module on first use; `open_store` alone never loads torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["open_store", "KDPlan", "DistillDataset", "KDLoss"]


def __getattr__(name: str) -> Any:
    if name == "open_store":
        from kdcache.cache.schema import open_store

        return open_store
    if name in __all__:
        from kdcache.student import kd

        return getattr(kd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
