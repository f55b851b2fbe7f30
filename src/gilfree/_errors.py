"""Exceptions (layer L0).

The stdlib names (``ProcessError``, ``BufferTooShort``, ``TimeoutError``, ``AuthenticationError``) keep the
stdlib's hierarchy so that ``except multiprocessing.X`` code works unchanged after
``import gilfree as multiprocessing``.  The others are gilfree's own and each subclasses the stdlib
exception that a caller of ``multiprocessing`` would have caught for the same failure.
"""

from __future__ import annotations

import _pickle as pickle  # the C pickler itself: `pickle.py` would also import `re` (start-up imports, design.md)

__all__ = [
    "ProcessError",
    "BufferTooShort",
    "TimeoutError",
    "AuthenticationError",
    "PicklingError",
    "MainModuleNotGuardedError",
    "OwnerDiedError",
    "OwnerDiedWarning",
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


class OwnerDiedError(ProcessError, RuntimeError):
    """A lock or semaphore cannot be acquired because the process holding it died.

    Raised to a waiter instead of letting it block forever (the stdlib's behaviour).  ``pid`` is
    the dead holder; ``lock`` the lock.  The lock stays held by the dead process: every later
    acquire that has to wait raises this too, because whatever the lock protected may be
    half-updated.  A lock created with ``on_owner_death="takeover"`` is taken over instead.
    """

    def __init__(self, pid: int, lock: object = None) -> None:
        super().__init__(pid, lock)
        self.pid = pid
        self.lock = lock
        if isinstance(lock, str):
            self.what = lock
        else:
            self.what = getattr(lock, "_purpose", None) or (type(lock).__name__ if lock is not None else "lock")

    def __reduce__(self) -> tuple[type, tuple[int, str]]:
        return type(self), (self.pid, self.what)  # the lock itself stays behind

    def __str__(self) -> str:
        return (
            f"the process that held this {self.what} (pid {self.pid}) died without releasing it, so it "
            f"will never be released; the data it protected may be half-updated.  Stop, or repair "
            f"that data and create the lock with on_owner_death='takeover' to continue."
        )


class OwnerDiedWarning(RuntimeWarning):
    """Issued when a lock created with ``on_owner_death="takeover"`` takes a dead holder's place."""


# Shown as ``gilfree.X`` in tracebacks, where users look them up.
for _cls in (ProcessError, BufferTooShort, TimeoutError, AuthenticationError, PicklingError, MainModuleNotGuardedError,
             OwnerDiedError, OwnerDiedWarning):
    _cls.__module__ = "gilfree"
del _cls
