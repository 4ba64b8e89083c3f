"""`kdcache upgrade`: a format-2 store (topk_ids stored as they are, no vocab_order) becomes a format-3 store whose
every array reads the same, whose ids go through kdcache.vocab_rank, whose teacher digests match what precompute
would now write, and which `kdcache verify` passes; an interrupted upgrade finishes on a rerun."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import kdcache.cache.upgrade
import test_inspect
from kdcache.cache import FORMAT_VERSION, UPGRADABLE_VERSION
from kdcache.cli import main
from kdcache.cache.codecs import VOCAB_RANK, VocabRankCodec
from kdcache.cache.schema import (
    TEACHERS, TOKENS, StoreError, mark_shard_complete, open_store, settings_digest, teacher_array_specs, vocab_order,
)
from kdcache.cache.upgrade import PENDING, REPLACED, upgrade_store
from kdcache.cache.verify import verify_store

SPLITS = tuple(test_inspect.SPLIT_SIZES)
TEACHER_GROUPS = ("alpha", "beta", "ensemble")


def format2_specs(*args, **kwargs):
    """The arrays as format 2 laid them out: topk_ids without a transform."""
    specs = teacher_array_specs(*args, **kwargs)
    specs["topk_ids"] = dataclasses.replace(specs["topk_ids"], transform=None)
    return specs


@pytest.fixture(scope="module")
def format2_store(tmp_path_factory) -> Path:
    """test_inspect's store as format 2 wrote it (one teacher shard left incomplete)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(test_inspect, "teacher_array_specs", format2_specs)
        built = test_inspect.build_store(tmp_path_factory.mktemp("v2"))
    root = zarr.open_group(str(built.store), mode="r+")
    for split in SPLITS:
        del root[f"{TOKENS}/{split}"].attrs["vocab_order"]
    for teacher in TEACHER_GROUPS:
        attrs = root[f"{TEACHERS}/{teacher}"].attrs
        attrs["format_version"] = UPGRADABLE_VERSION
        attrs["settings_digest"] = settings_digest(attrs.asdict())
    root.attrs["format_version"] = UPGRADABLE_VERSION
    return built.store


def every_array(store: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(store), mode="r")
    return {f"{TEACHERS}/{t}/{s}/{a}": root[f"{TEACHERS}/{t}/{s}/{a}"][...]
            for t in TEACHER_GROUPS for s in SPLITS for a in root[f"{TEACHERS}/{t}/{s}"].array_keys()}


@pytest.fixture
def complete_copy(format2_store, tmp_path) -> Path:
    """A copy of the format-2 store with every shard complete."""
    store = tmp_path / "cache.zarr"
    shutil.copytree(format2_store, store)
    mark_shard_complete(zarr.open_group(str(store), mode="r+")["teachers/beta/train"], 2)
    return store


def test_a_format2_store_is_refused_with_the_way_out(format2_store):
    with pytest.raises(StoreError, match=f"version {UPGRADABLE_VERSION}.*`kdcache upgrade` converts it in place"):
        open_store(str(format2_store))


def test_upgrade_keeps_every_value_and_ranks_the_ids(complete_copy):
    before = every_array(complete_copy)
    result = CliRunner().invoke(main, ["upgrade", str(complete_copy)])
    assert result.exit_code == 0, result.output
    assert f"format {UPGRADABLE_VERSION} -> {FORMAT_VERSION}; 6 topk_ids arrays re-encoded" in result.output
    root = open_store(str(complete_copy))  # now accepted
    after = every_array(complete_copy)
    assert before.keys() == after.keys()
    for key, values in before.items():
        assert after[key].dtype == values.dtype and np.array_equal(after[key], values), key
    for split in SPLITS:
        tokens = root[f"{TOKENS}/{split}"]
        order = vocab_order(tokens[...], root.attrs["vocab_size"])
        assert tokens.attrs["vocab_order"] == VocabRankCodec.from_order(order).order_base64
        for teacher in TEACHER_GROUPS:
            meta = json.loads((complete_copy / TEACHERS / teacher / split / "topk_ids" / "zarr.json").read_text())
            assert meta["codecs"][0]["configuration"]["codecs"][0] == {
                "name": VOCAB_RANK, "configuration": {"order": tokens.attrs["vocab_order"]}}
    for teacher in TEACHER_GROUPS:
        attrs = root[f"{TEACHERS}/{teacher}"].attrs.asdict()
        assert attrs["format_version"] == FORMAT_VERSION and attrs["settings_digest"] == settings_digest(attrs)
    assert verify_store(complete_copy) == []
    assert not [p for p in complete_copy.rglob("*") if p.name.endswith((PENDING, REPLACED))]
    again = CliRunner().invoke(main, ["upgrade", str(complete_copy)])
    assert again.exit_code == 0 and f"already format {FORMAT_VERSION}" in again.output


def test_incomplete_shards_are_left_to_precompute(format2_store, tmp_path):
    store = tmp_path / "cache.zarr"
    shutil.copytree(format2_store, store)
    report = upgrade_store(store)
    assert report.from_version == UPGRADABLE_VERSION and report.arrays == 6
    shards = store / "teachers/beta/train/topk_ids/c"
    assert sorted(p.name for p in shards.iterdir()) == ["0", "1"]  # shard 2 was never marked complete
    assert (store / "teachers/beta/train/topk_logits/c/2").is_dir()  # the other arrays keep what they had


def test_an_interrupted_upgrade_finishes_on_a_rerun(complete_copy, monkeypatch):
    before = every_array(complete_copy)
    calls = {"n": 0}
    real_rename = Path.rename

    def rename_then_fail(self: Path, target):  # the third array's swap stops between its two renames
        calls["n"] += self.name.endswith(PENDING)
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename_then_fail)
    with pytest.raises(KeyboardInterrupt):
        upgrade_store(complete_copy)
    monkeypatch.undo()
    assert zarr.open_group(str(complete_copy), mode="r").attrs["format_version"] == UPGRADABLE_VERSION
    assert any(p.name.endswith(REPLACED) for p in complete_copy.rglob("*"))
    report = upgrade_store(complete_copy)
    assert report.arrays == 4  # two were done before the interruption
    after = every_array(complete_copy)
    assert all(np.array_equal(after[key], values) for key, values in before.items())
    assert verify_store(complete_copy) == []
    assert not [p for p in complete_copy.rglob("*") if p.name.endswith((PENDING, REPLACED))]


@pytest.mark.parametrize("version", [1, 99])
def test_other_versions_are_not_upgraded(complete_copy, version):
    zarr.open_group(str(complete_copy), mode="r+").attrs["format_version"] = version
    with pytest.raises(StoreError, match=f"format version {version} cannot be upgraded"):
        upgrade_store(complete_copy)


def test_only_local_stores_are_upgraded():
    with pytest.raises(StoreError, match="needs a local store"):
        kdcache.cache.upgrade.upgrade_store("memory://somewhere")


def test_upgrade_waits_for_no_other_writer(complete_copy):
    from kdcache.cache.lock import lock_store

    with lock_store(complete_copy, "kdcache precompute"):
        with pytest.raises(StoreError, match=r"being written by kdcache precompute \(pid \d+"):
            upgrade_store(complete_copy)
    assert upgrade_store(complete_copy).from_version == 2  # once free, it runs
