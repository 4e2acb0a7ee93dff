"""Consoles shared by the commands: tables keep their full width when output goes to a file or CI log."""

from __future__ import annotations

import os
import sys

from rich.console import Console


def _width(stream) -> int | None:
    # rich assumes 80 columns when not writing to a terminal; a CI log reads better unwrapped
    return None if stream.isatty() or "COLUMNS" in os.environ else 220


# no file= given: rich writes to whatever sys.stdout / sys.stderr is at the time (pytest's capture too)
out = Console(width=_width(sys.stdout))
err = Console(stderr=True, width=_width(sys.stderr))
