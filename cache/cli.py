"""The `kdcache` command: one click group whose subcommands live with the package that does the work.

Subcommands are imported on first use, so `kdcache inspect` never pays for importing torch.
"""

from __future__ import annotations

import importlib

import click

# name -> "module:click command object"
COMMANDS = {
    "data": "precompute.data:data",
    "teachers": "student.commands:teachers",
    "precompute": "precompute.targets:precompute",
    "distill": "student.commands:distill",
    "eval": "student.commands:evaluate",
    "export": "student.commands:export",
    "inspect": "cache.inspect:inspect",
    "show": "cache.inspect:show",
    "stats": "cache.inspect:stats",
    "verify": "cache.inspect:verify",
    "plot": "cache.inspect:plot",
    "upgrade": "cache.upgrade:upgrade",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup)
@click.version_option(package_name="kdcache")
def main() -> None:
    """kdcache: cache teachers once into a sharded Zarr store, distil students against it."""


if __name__ == "__main__":
    main()
