"""Errors shared across layers (kept out of ``fedcmi.cli``, which also runs as ``__main__``)."""


class CommandError(RuntimeError):
    """An error a command reports in one line (the command-line extensions' errors derive from it)."""
