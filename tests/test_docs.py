"""The docs point at what exists: every test docs/reliability.md names as a fault's proof is in the suite."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_REF = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def test_every_test_the_reliability_doc_names_exists():
    refs = set(TEST_REF.findall((REPO / "docs" / "reliability.md").read_text()))
    assert len(refs) > 30, refs  # the doc's table, not an empty match
    missing = [f"{path}::{name}" for path, name in sorted(refs)
               if not (REPO / path).is_file() or f"def {name}(" not in (REPO / path).read_text()]
    assert not missing, missing
