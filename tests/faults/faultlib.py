"""What the fault-injection tests share: a tiny cached run (data -> teachers -> precompute) and a CLI invoker."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from click.testing import CliRunner

from kdcache.cli import main
from kdcache.config import Config, load_config, run_paths
from test_distill import tiny_config


@dataclass(frozen=True)
class Run:
    """A tiny cached run: its config file, the runs root and the loaded config."""

    config: Path
    runs: Path

    @property
    def cfg(self) -> Config:
        return load_config(self.config)

    @property
    def store(self) -> Path:
        return run_paths(self.cfg, self.runs).store

    def args(self) -> tuple[str, ...]:
        return ("--config", str(self.config), "--runs-root", str(self.runs))


def invoke(*args: str):
    """Run a kdcache command in-process; returns click's Result (exit code, output, exception)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def build_run(root: Path, **overrides) -> Run:
    runs = root / "runs"
    cfg = tiny_config(runs) | overrides
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = Run(config, runs)
    for step in ("data", "teachers", "precompute"):
        result = invoke(step, *run.args())
        assert result.exit_code == 0, result.output
    return run
