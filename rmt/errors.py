"""Errors the library raises for bad input.

Every message is a single line that says what is wrong and, where it can, what to do.
The CLI prints ``str(error)`` and exits non-zero; Python callers can catch :class:`RMTError`.
"""

import sys


class RMTError(Exception):
    """Base class of every error caused by user input (not by a bug)."""


class ConfigError(RMTError, ValueError):
    """A model configuration that cannot describe an RMT network."""


class UnknownModelError(RMTError, KeyError):
    """A model name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(RMTError):
    """A checkpoint file that cannot be read or does not fit the model."""


class DatasetError(RMTError):
    """An evaluation data set that cannot be read: unknown layout, bad labels file, unreadable image."""


class EvalError(RMTError):
    """An evaluation that cannot run as asked (model output, memory, expected accuracy)."""


class ZooError(RMTError):
    """A model-zoo problem: a bad zoo.yaml, a cache that cannot be written, a cached file that changed."""


class DownloadError(ZooError):
    """A transfer that failed: an HTTP error, a dropped connection, an HTML page instead of the file.

    ``resumable`` is True when the bytes received so far were kept and running the same download
    again continues from them; ``unreachable`` when the host could not be reached at all (offline
    or no route), so the caller can say what to do instead.
    """

    def __init__(self, message: str, *, resumable: bool = False, unreachable: bool = False) -> None:
        super().__init__(message)
        self.resumable = resumable
        self.unreachable = unreachable


class WeightsNotCachedError(ZooError):
    """The weights of a zoo entry are not in the cache and cannot be fetched automatically.

    The message says how to get them; ``instructions`` holds the same facts for programs
    (``url``, ``code``, ``command`` where they apply).
    """

    def __init__(self, message: str, instructions: dict) -> None:
        super().__init__(message)
        self.instructions = instructions


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type), for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator failing."""
    # torch's own error only where torch was imported (importing it here could fail in turn)
    torch = sys.modules.get("torch")
    if isinstance(error, (getattr(torch, "OutOfMemoryError", MemoryError), MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
