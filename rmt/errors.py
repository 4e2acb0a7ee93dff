"""Errors the library raises for bad input.

Every message is a single line that says what is wrong and, where it can, what to do.
The CLI prints ``str(error)`` and exits non-zero; Python callers can catch :class:`RMTError`.
"""


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
