"""Consoles shared by the commands: tables keep their full width when output goes to a file or CI log."""

from __future__ import annotations

import io
import os
import re
import sys

from rich.console import Console


def _width(stream) -> int | None:
    # rich assumes 80 columns when not writing to a terminal; a CI log reads better unwrapped
    return None if stream.isatty() or "COLUMNS" in os.environ else 220


class StdoutError(Exception):
    """Standard output itself failed (a full disk, a closed pipe), as opposed to any other file.

    Not an OSError: click would catch a broken pipe itself and exit 1, CI's "regression".
    """

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or str(error))
        self.errno = error.errno


_TRAILING_SPACES = re.compile(r" +\n")


class _Stdout(io.TextIOBase):
    """Whatever ``sys.stdout`` is at each call (pytest's capture too), its failures raised as StdoutError.

    Off a terminal, lines lose their trailing spaces: rich pads table cells to the column's width,
    which in a 220-column log or pipe is a line of blanks after every short value.
    """

    def write(self, text: str) -> int:
        written = len(text)
        if not self.isatty():
            text = _TRAILING_SPACES.sub("\n", text)
        try:
            sys.stdout.write(text)
        except OSError as e:
            raise StdoutError(e) from e
        return written

    def flush(self) -> None:
        try:
            sys.stdout.flush()
        except OSError as e:
            raise StdoutError(e) from e

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
