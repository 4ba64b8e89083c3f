"""The class of every kdcache command: a KdcacheError becomes click's one-line `Error: ...` (exit 1), no traceback."""

from __future__ import annotations

from typing import Any

import click

from kdcache.errors import KdcacheError


class KdcacheCommand(click.Command):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KdcacheError as e:
            raise click.ClickException(str(e)) from None


def command(name: str | None = None, **kwargs: Any) -> Any:
    """click.command for kdcache: errors are printed as one line."""
    return click.command(name, cls=KdcacheCommand, **kwargs)
