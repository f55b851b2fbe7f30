"""Exceptions (layer L0).

The stdlib names (``ProcessError``, ``BufferTooShort``, ``TimeoutError``, ``AuthenticationError``) keep the
stdlib's hierarchy so that ``except multiprocessing.X`` code works unchanged after
``import gilfree as multiprocessing``.  The others are gilfree's own and each subclasses the stdlib
exception that a caller of ``multiprocessing`` would have caught for the same failure.
"""

from __future__ import annotations

import pickle

__all__ = [
    "ProcessError",
    "BufferTooShort",
    "TimeoutError",
    "AuthenticationError",
    "PicklingError",
    "MainModuleNotGuardedError",
]


class ProcessError(Exception):
    """Base class of the errors this package raises (as in the stdlib)."""


class BufferTooShort(ProcessError):
    """``Connection.recv_bytes_into`` was given a buffer smaller than the message.

    ``args[0]`` holds the whole message as ``bytes``, so nothing is lost.
    """


class TimeoutError(ProcessError):  # noqa: A001 - the stdlib's name
    """An operation with a timeout did not finish in time."""


class AuthenticationError(ProcessError):
    """The peer of a connection did not prove that it knows the authkey."""


class PicklingError(pickle.PicklingError, TypeError):
    """An object could not be pickled, neither by reference nor by value.

    It subclasses both :class:`pickle.PicklingError` and :class:`TypeError`, the two exceptions the
    stdlib raises for this, so existing ``except`` clauses keep working.  ``path`` says where inside
    the sent value the culprit sits (``"obj['a'][1]"``) and ``culprit_type`` names its type.
    """

    def __init__(self, message: str, path: str = "obj", culprit_type: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.culprit_type = culprit_type


class MainModuleNotGuardedError(RuntimeError):
    """A process was started while the main module was being imported by a spawned child.

    Raised instead of the stdlib's "bootstrapping phase" ``RuntimeError``.
    """


# Shown as ``gilfree.X`` in tracebacks, where users look them up.
for _cls in (ProcessError, BufferTooShort, TimeoutError, AuthenticationError, PicklingError, MainModuleNotGuardedError):
    _cls.__module__ = "gilfree"
del _cls
