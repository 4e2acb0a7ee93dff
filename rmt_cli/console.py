"""Consoles shared by the commands: tables keep their full width when output goes to a file or CI log."""

from __future__ import annotations

import io
import os
import sys

from rich.console import Console


def _width(stream) -> int | None:
    # rich assumes 80 columns when not writing to a terminal; a CI log reads better unwrapped
    return None if stream.isatty() or "COLUMNS" in os.environ else 220


class StdoutError(OSError):
    """Standard output itself failed (a full disk, a closed pipe), as opposed to any other OSError."""


class _Stdout(io.TextIOBase):
    """Whatever ``sys.stdout`` is at each call (pytest's capture too), its failures raised as StdoutError."""

    def write(self, text: str) -> int:
        try:
            return sys.stdout.write(text)
        except OSError as e:
            raise StdoutError(e.errno, e.strerror) from e

    def flush(self) -> None:
        try:
            sys.stdout.flush()
        except OSError as e:
            raise StdoutError(e.errno, e.strerror) from e

    def isatty(self) -> bool:
        return sys.stdout.isatty()

    def fileno(self) -> int:
        return sys.stdout.fileno()

    @property
    def encoding(self) -> str:
        return sys.stdout.encoding


stdout = _Stdout()
out = Console(file=stdout, width=_width(sys.stdout))
# no file= given: rich writes to whatever sys.stderr is at the time
err = Console(stderr=True, width=_width(sys.stderr))
