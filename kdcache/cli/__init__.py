"""The `kdcache` command: one click group over the pipeline's and the store's commands.

Every command is a `KdcacheCommand` (kdcache/cli/command.py): a KdcacheError (bad config, store, corpus, run,
...) or a file system refusal (read-only, permission, disk full) is printed as one line, `Error: <message>`, with no
traceback, and exits 2.
"""

from __future__ import annotations

import os
import sys

import click

from kdcache.cli import pipeline, store


@click.group()
@click.version_option(package_name="kdcache")
def main() -> None:
    """kdcache: cache teachers once into a sharded Zarr store, distil students against it."""
    if not sys.stderr.isatty():  # a log file or pipe: no carriage-return bars from Hugging Face's loading and saving
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


for command in pipeline.COMMANDS + store.COMMANDS:
    main.add_command(command)
