"""Writing files so that nobody ever sees half of one."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from rmt.errors import RMTError

PathLike = Union[str, os.PathLike]


def names_a_folder(path: PathLike) -> bool:
    """Whether ``path`` as given ends in a separator, ``.`` or ``..``: it can only mean a folder,
    although ``Path`` would read ``reports/`` and ``reports/.`` as a file named ``reports``."""
    text = os.fspath(path)
    separators = [sep for sep in (os.sep, os.altsep) if sep]
    for sep in separators[1:]:
        text = text.replace(sep, separators[0])
    return text.rsplit(separators[0], 1)[-1] in ("", ".", "..")


def check_paths_given(paths: dict[str, Optional[str]]) -> None:
    """Refuse an input path given as ``''``, by its option's name: ``Path('')`` is the current
    folder, so a command would otherwise go on to read ``.`` (pass the paths as typed, not as Paths)."""
    for option, value in paths.items():
        if value is not None and not value.strip():
            raise RMTError(f"{option} was given an empty path")


@contextmanager
def replacing(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path``, with the permissions it
    should have, when the block succeeds. On any failure the temporary file is removed and
    ``path`` is untouched; OSErrors propagate, for callers with their own message."""
    if names_a_folder(path):
        raise IsADirectoryError(errno.EISDIR, "it names a folder; give a file name", os.fspath(path))
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, replaced_file_mode(path))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_write(path: PathLike) -> Iterator[Path]:
    """:func:`replacing`, with an OSError turned into a one-line RMTError naming the file."""
    try:
        with replacing(path) as tmp:
            yield tmp
    except OSError as e:
        raise RMTError(f"cannot write {path}: {e.strerror or e}") from None


def replaced_file_mode(path: PathLike) -> int:
    """The permissions a file written over ``path`` should get: those of the file it replaces, or
    those any new file gets under the umask (a temporary file is private, 0600, whatever the umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux says it without changing it
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0)  # elsewhere reading it means setting it (for an instant): put it straight back
        os.umask(umask)
        return umask


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` through a temporary file and a rename: readers never see half a file."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def check_writable(path: PathLike) -> None:
    """Fail now, in one line, if ``path`` could not be written later (no folder, not writable, a
    folder, or a name that can only mean one (:func:`names_a_folder`): pass command-line paths as
    typed, since ``Path`` drops the trailing separator)."""
    text = os.fspath(path)
    if not text:
        raise RMTError("cannot write to an empty path: give a file name")
    if names_a_folder(text):
        raise RMTError(f"cannot write {text}: it names a folder; give a file name")
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise RMTError(f"cannot write {path}: it is a folder")
    if not parent.is_dir():
        raise RMTError(f"cannot write {path}: folder {parent} does not exist")
    try:  # what the atomic writers do there: a temporary file, renamed
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".check")
    except OSError as e:
        raise RMTError(f"cannot write {path}: folder {parent} is not writable ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name one file: through symbolic links, and hard links where both exist."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def check_not_an_input(output: PathLike, what: str, inputs: dict[str, Optional[PathLike]]) -> None:
    """Refuse an output path (``what``: how to name it) that names one of the input files
    (``inputs``: name -> path), before anything runs: the result would replace what it is
    computed from."""
    for name, path in inputs.items():
        if path is not None and same_file(output, path):
            raise RMTError(f"{what} {output} is the {name} file: write it elsewhere")
