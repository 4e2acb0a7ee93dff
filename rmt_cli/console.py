"""Consoles shared by the commands: tables keep their full width when output goes to a file or CI log."""

from __future__ import annotations

import sys

from rich.console import Console


def _console(stream) -> Console:
    # rich assumes 80 columns when not writing to a terminal; a CI log reads better unwrapped
    return Console(file=stream, width=None if stream.isatty() else 220)


out = _console(sys.stdout)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 220)
