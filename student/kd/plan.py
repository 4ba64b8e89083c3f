"""The KD plan: what a distillation reads from a store (groups, arrays, lse columns) and how it weighs each term."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zarr

from kdcache.cache import schema
from kdcache.cache.schema import StoreError
from kdcache.cache.xtok import is_cross
from kdcache.student.kd.form import KDForm, kd_form, known_forms
from kdcache.student.kd.hidden import HiddenPair


@dataclass(frozen=True)
class KDPlan:
    """One distillation resolved against a store; the dataset reads what it names and the loss weighs by it.

    `temperature_index` is the one place that maps the temperature to each group's lse column: the dataset hands
    the loss that column only. The whole plan is part of a run's checkpoint fingerprint.
    """

    weights: dict[str, float]  # store group -> KL weight
    form: str  # a registered KD form (kd.form)
    hard_weight: float  # of the next-token cross-entropy
    temperature: float
    temperature_index: dict[str, int]  # store group -> column of its lse
    hidden: tuple[HiddenPair, ...] = ()
    hidden_weight: float = 0.0
    hidden_kind: str = "mse"

    @classmethod
    def from_store(cls, store: str | Path | zarr.Group, teachers: dict[str, float], *, form: str,
                   temperature: float, hard_weight: float) -> KDPlan:
        """The plan of `form` at `temperature` over the cached teachers {name: KL weight} (logit terms only)."""
        root = store if isinstance(store, zarr.Group) else schema.open_store(str(store))
        kind = kd_form(form)
        weights = kind.groups(teachers, hard_weight, root.attrs["seq_len"])
        columns = {name: lse_column(root, name, temperature) for name in weights}
        for name in weights:
            attrs = root[f"{schema.TEACHERS}/{name}"].attrs.asdict()
            if why := missing_arrays(kind, attrs) or kind.refuse(attrs, temperature):
                raise StoreError(f"{root.store}: teacher group {name!r} {why}")
        return cls(weights, form, hard_weight, temperature, columns)

    def arrays(self) -> dict[str, list[str]]:
        """Store group -> the arrays read of it: the form's for each weighted group, then each hidden pair's."""
        needed = kd_form(self.form).arrays
        arrays = {name: list(needed) for name in self.weights}
        for pair in self.hidden:
            arrays.setdefault(pair.teacher, []).extend(pair.arrays())
        return arrays


def missing_arrays(form: KDForm, group_attrs: dict) -> str | None:
    """Why a group lacks what `form` reads (its arrays, by the group's `dtypes`, and its constants), or None."""
    have = set(group_attrs.get("dtypes", {}))
    missing = _lacks(form, have, group_attrs)
    if not have or not missing:
        return None
    kind = "a cross-tokenizer group" if is_cross(group_attrs) else "a same-tokenizer group"
    usable = [name for name in known_forms() if not _lacks(kd_form(name), have, group_attrs)]
    return (f"lacks {', '.join(missing)}, which form {form.name!r} reads: it is {kind} holding {', '.join(sorted(have))}"
            f" (forms that read it: {', '.join(usable) or 'none'})")


def _lacks(form: KDForm, have: set[str], group_attrs: dict) -> list[str]:
    """The arrays and constants `form` reads that a group holding arrays `have` lacks."""
    return [name for name in form.arrays if name not in have] + [c for c in form.constants if c not in group_attrs]


def lse_column(root: zarr.Group, group: str, temperature: float) -> int:
    """Which column of a cached group's lse holds logsumexp(logits / temperature)."""
    path = f"{schema.TEACHERS}/{group}"
    if path not in root:
        raise StoreError(f"{root.store}: no cached teacher {group!r}; run `kdcache precompute` first")
    temps = root[path].attrs["temperatures"]
    if temperature not in temps:
        raise StoreError(f"{root.store}: teacher {group!r} has no log-sum-exp at T={temperature} (has {temps})")
    return temps.index(temperature)
