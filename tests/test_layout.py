"""The code's layout keeps its promises: one installed namespace, imports in one direction, small files."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The folder of each installed package (pyproject.toml's package-dir); sub-packages follow their parent.
STAGES = {"kdcache": "kdcache", "kdcache.cache": "cache", "kdcache.precompute": "precompute",
          "kdcache.student": "student"}
# What each layer may import: a module imports only from its own layer or lower ones.
LAYERS = [
    ("kdcache.cli", 5), ("kdcache.api", 5), ("kdcache.study", 5),
    ("kdcache.student", 4),
    ("kdcache.precompute", 3),
    ("kdcache.config", 2), ("kdcache.config_rules", 2), ("kdcache.runtime", 2),
    ("kdcache.cache", 1),
    ("kdcache.errors", 0), ("kdcache.files", 0), ("kdcache.progress", 0), ("kdcache.typed_yaml", 0), ("kdcache", 0),
]
# The named exceptions: teacher training is a recipe over the student's trainer; the root package exposes the
# public API lazily (inside its __getattr__, so `import kdcache` stays light).
ALLOWED_UPWARD = {("kdcache.precompute.teacher_training", "kdcache.student"), ("kdcache", "kdcache.api")}
MAX_LINES = 350
LONG_FILES = {"precompute/grammar.py"}  # the demo grammar: word lists and rules, one idea


def product_files() -> dict[str, Path]:
    """Every product module: dotted name -> file."""
    modules = {}
    for package, folder in STAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if package == "kdcache" and parts and parts[0] in {"cache", "precompute", "student"}:
                continue
            modules[".".join([package, *parts])] = path
    return modules


def layer(module: str) -> int:
    for prefix, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return rank
    raise AssertionError(f"{module}: not in any layer")


def kdcache_imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The kdcache modules `module` imports, anywhere in the file (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[: -node.level + (path.name == "__init__.py") or None] + [base])
            # `from kdcache.x import y` imports kdcache.x.y when y is a module
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {name for name in found if name == "kdcache" or name.startswith("kdcache.")}


def test_imports_go_one_way():
    modules = product_files()
    wrong = []
    for module, path in modules.items():
        for target in kdcache_imports(module, path, modules):
            upward = layer(target) > layer(module)
            if upward and not any(module == m and (target == t or target.startswith(t + ".")) for m, t in ALLOWED_UPWARD):
                wrong.append(f"{path.relative_to(REPO)} ({module}) imports {target}")
    assert not wrong, "imports against the direction base <- cache <- config/runtime <- precompute <- student <- cli, study:\n" \
                      + "\n".join(wrong)


def test_cache_knows_nothing_of_teachers_or_students():
    for module, path in product_files().items():
        if module.startswith("kdcache.cache"):
            text = path.read_text()
            assert "import torch" not in text and "import click" not in text, f"{path}: the store needs no torch or click"


def test_product_files_are_small_and_say_their_job():
    problems = []
    for path in product_files().values():
        rel = str(path.relative_to(REPO))
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text))
        if not doc or not doc.splitlines()[0].strip():
            problems.append(f"{rel}: no one-line docstring saying its job")
        if text.count("\n") > MAX_LINES and rel not in LONG_FILES:
            problems.append(f"{rel}: {text.count(chr(10))} lines (> {MAX_LINES})")
    assert not problems, "\n".join(problems)


def test_every_package_folder_is_listed_in_pyproject():
    """An editable install imports a package that `packages` forgets; the wheel silently leaves it out."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {name for name, path in product_files().items() if path.name == "__init__.py"}
    assert on_disk == listed


def test_the_installed_distribution_is_one_kdcache_package(tmp_path):
    dist = importlib.metadata.distribution("kdcache")
    assert dist.read_text("top_level.txt").split() == ["kdcache"]
    assert dist.version == __import__("kdcache").__version__
    code = ("import importlib.util as u, kdcache, kdcache.cache, kdcache.precompute, kdcache.student, kdcache.cli; "
            "assert [n for n in ('cache', 'precompute', 'student') if u.find_spec(n)] == []; print(kdcache.__version__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == dist.version


def test_a_stage_imported_by_its_bare_name_is_refused():
    """From the repository root `import cache` would load the folder a second time, apart from kdcache.cache."""
    out = subprocess.run([sys.executable, "-c", "import cache"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "import kdcache.cache, not cache" in out.stderr


@pytest.mark.slow
def test_the_wheel_installs_nothing_outside_kdcache(tmp_path):
    # built from a copy: setuptools leaves build/ and *.egg-info beside the sources it builds
    source = shutil.copytree(REPO, tmp_path / "src", ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache", "benchmarks", "docs", "tests"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    str(source)], check=True, capture_output=True, timeout=300)
    [wheel] = tmp_path.glob("kdcache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"kdcache", f"kdcache-{importlib.metadata.version('kdcache')}.dist-info"}
    expected = {f"{module.replace('.', '/')}{'/__init__' if path.name == '__init__.py' else ''}.py"
                for module, path in product_files().items()}
    assert expected <= set(names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "kdcache.vocab_rank = kdcache.cache.codecs:VocabRankCodec" in entry_points
    assert "kdcache = kdcache.cli:main" in entry_points
