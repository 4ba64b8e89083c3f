"""The `kdcache` command: one click group over the pipeline's and the store's commands.

Every command is a `KdcacheCommand` (kdcache/cli/command.py): a KdcacheError (bad config, store, corpus, run,
...) is printed as one line, `Error: <message>`, with no traceback, and exits 1.
"""

from __future__ import annotations

import click

from kdcache.cli import pipeline, store


@click.group()
@click.version_option(package_name="kdcache")
def main() -> None:
    """kdcache: cache teachers once into a sharded Zarr store, distil students against it."""


for command in pipeline.COMMANDS + store.COMMANDS:
    main.add_command(command)
