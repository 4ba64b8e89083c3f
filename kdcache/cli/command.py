"""The class of every kdcache command: a user's error is printed as one line, `Error: ...`, no traceback, exit 2.

A user's error is a KdcacheError (bad config, store, corpus, run, ...), an OSError the file system raised on a
path the user gave (read-only, permission denied, disk full: its message names the path), or a click error about
the command line (an option out of range; click's usage errors already exit 2). An error a DataLoader worker
raised is printed as that worker raised it. Exit 1 stays what a command documents for itself (`kdcache verify`:
problems found).
"""

from __future__ import annotations

from typing import Any

import click

from kdcache.errors import KdcacheError

USER_ERROR = 2


class UserError(click.ClickException):
    """A KdcacheError as click prints it: on one line (a message quoting another library's may hold several)."""

    exit_code = USER_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(line.strip() for line in message.splitlines() if line.strip()))


def original_message(error: BaseException) -> str:
    """The message an error was raised with. A DataLoader worker's error is raised again in the main process as
    the same class, its message the worker's whole traceback ending `module.Class: message`: keep that message."""
    text = str(error)
    cls = type(error)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    if "\nOriginal Traceback (most recent call last):" in text and f"\n{name}: " in text:
        return text.rsplit(f"\n{name}: ", 1)[1]
    return text


class KdcacheCommand(click.Command):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KdcacheError as e:
            raise UserError(original_message(e)) from None
        except OSError as e:  # e.g. "[Errno 30] Read-only file system: 'runs/x/cache.zarr/zarr.json'"
            named = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else None
            raise UserError(named or original_message(e)) from None
        except click.ClickException as e:
            e.exit_code = USER_ERROR
            raise


def command(name: str | None = None, **kwargs: Any) -> Any:
    """click.command for kdcache: errors are printed as one line and exit 2."""
    return click.command(name, cls=KdcacheCommand, **kwargs)
