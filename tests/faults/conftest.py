"""The fault-injection suite's shared run: one tiny cached pipeline, built once per session.

Tests that damage or extend a run copy it first (`fresh_run`), so every case starts from the same bytes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from faultlib import Run, build_run


@pytest.fixture(scope="session")
def cached_run(tmp_path_factory) -> Run:
    """Built once per session; never modify it in place (use fresh_run)."""
    return build_run(tmp_path_factory.mktemp("faults-run"))


@pytest.fixture
def fresh_run(cached_run: Run, tmp_path: Path) -> Run:
    """A private copy of the cached run (config, corpus, tokenizer, teachers, store) to damage or extend."""
    shutil.copytree(cached_run.runs, tmp_path / "runs")
    text = cached_run.config.read_text().replace(str(cached_run.runs), str(tmp_path / "runs"))
    (tmp_path / "tiny.yaml").write_text(text)
    return Run(tmp_path / "tiny.yaml", tmp_path / "runs")
