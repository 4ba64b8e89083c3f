"""A store on S3 (a local moto server, no mocks of s3fs or zarr): the demo store copied there verifies, shows,
trains a student through `cache.store`; damage and a deleted manifest are caught there as on disk."""

from __future__ import annotations

import fsspec
import pytest
import yaml

from faultlib import Run, invoke
from test_corruption import no_traceback, refused

pytestmark = pytest.mark.slow


@pytest.fixture
def s3_store(cached_run: Run, s3: str, request) -> str:
    """A copy of the demo store on S3, at a URL of its own."""
    url = f"{s3}/{request.node.name}/cache.zarr"
    fsspec.filesystem("s3").put(str(cached_run.store), url.removeprefix("s3://"), recursive=True)
    return url


def ok(*args: str) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, no_traceback(result)
    return result.output


def test_the_demo_store_on_s3_verifies_shows_and_trains_a_student(fresh_run, s3_store, tmp_path):
    assert ok("verify", s3_store).strip() == f"{s3_store}: ok"
    tokenizer = fresh_run.runs / "tiny" / "tokenizer"
    local = ok("show", fresh_run.store, "--seq", 3, "--pos", 9, "-T", 2, "--tokenizer", tokenizer)
    assert ok("show", s3_store, "--seq", 3, "--pos", 9, "-T", 2, "--tokenizer", tokenizer) == local
    assert ok("stats", s3_store, "--json").replace(s3_store, "S") == \
        ok("stats", fresh_run.store, "--json").replace(str(fresh_run.store), "S")
    inspected = ok("inspect", s3_store, "--json")
    assert inspected.replace(s3_store, "S") == ok("inspect", fresh_run.store, "--json").replace(str(fresh_run.store), "S")
    ok("plot", s3_store, "--out", tmp_path / "stats.png")
    assert (tmp_path / "stats.png").stat().st_size > 0

    fresh_run.store.rename(fresh_run.store.with_name("elsewhere.zarr"))  # only S3 can serve this run now
    cfg = yaml.safe_load(fresh_run.config.read_text())
    cfg["cache"]["store"] = s3_store
    cfg["student_train"]["max_steps"] = 3
    fresh_run.config.write_text(yaml.safe_dump(cfg))
    ok("distill", *fresh_run.args())
    student = fresh_run.runs / "tiny" / "student" / "model"
    assert (student / "model.safetensors").is_file()
    ok("export", student, tmp_path / "exported")
    assert (tmp_path / "exported" / "config.json").is_file()


def test_damage_on_s3_is_named_by_url(cached_run, s3_store, tmp_path, monkeypatch):
    """verify reads the objects themselves; a reader fetching the shard refuses it (a copy already in the shard
    cache is the sealed content, and is what it would read: an empty cache here)."""
    monkeypatch.setenv("KDCACHE_SHARD_CACHE", str(tmp_path / "shards"))
    fs = fsspec.filesystem("s3")
    key = f"{s3_store}/teachers/tl/train/lse/c/3/0/0"
    fs.pipe_file(key.removeprefix("s3://"), fs.cat_file(key.replace("/tl/", "/tg/").removeprefix("s3://")))
    result = invoke("verify", s3_store)
    assert result.exit_code == 1 and f"{key}: differs from the store's manifest" in result.output, result.output
    tokenizer = cached_run.runs / "tiny" / "tokenizer"
    refused(invoke("show", s3_store, "--seq", 200, "--tokenizer", tokenizer), f"{key}: differs from the store's manifest")


def test_a_deleted_manifest_on_s3_is_unsealed_until_sealed_again(s3_store):
    fsspec.filesystem("s3").rm_file(f"{s3_store}/kdcache.manifest".removeprefix("s3://"))
    result = invoke("verify", s3_store)
    assert result.exit_code == 1 and result.output.startswith(f"{s3_store}/kdcache.manifest: missing: the store is "
                                                             "not sealed"), result.output
    assert ok("seal", s3_store).startswith(f"{s3_store}: sealed (")
    assert ok("verify", s3_store).strip() == f"{s3_store}: ok"
