"""The one base class of every error a user can cause: the CLI prints its message, never a traceback."""


class KdcacheError(ValueError):
    """A file, config, store or run that cannot be used; the message names it and says what is wrong.

    A ValueError, so that code catching ValueError (as it did before this base existed) still does.
    """
