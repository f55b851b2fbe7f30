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
    "WorkerLostError",
    "TaskTimeoutError",
    "BrokenPoolError",
    "MaybeEncodingError",
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


_SIGNAL_CAUSES = {
    "SIGKILL": "something sent it SIGKILL: another process, a timeout, or the kernel's out-of-memory "
    "killer (see `dmesg`) when memory ran short",
    "SIGSEGV": "it crashed with a segmentation fault: a bug in a C extension, ctypes code or a corrupted "
    "object",
    "SIGBUS": "it crashed with a bus error: often a shared-memory file that was truncated or full",
    "SIGABRT": "it aborted: a failed assertion or an abort() in C code",
    "SIGFPE": "it crashed with a floating-point exception in C code",
    "SIGILL": "it crashed on an illegal instruction (a binary built for another CPU?)",
    "SIGTERM": "something sent it SIGTERM",
}


def describe_exit(exitcode: int | None) -> str:
    """``-9`` -> ``"was killed by SIGKILL"``; ``3`` -> ``"exited with code 3"``."""
    if exitcode is None:
        return "disappeared (exit status unknown)"
    if exitcode < 0:
        import signal  # only when explaining a death

        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def likely_cause(exitcode: int | None) -> str:
    """A sentence on what usually causes such an exit."""
    if exitcode is None:
        return "the process could not be waited for"
    if exitcode < 0:
        import signal

        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            return "an unusual signal ended it"
        return _SIGNAL_CAUSES.get(name, f"it received {name}")
    if exitcode == 0:
        return "the task (or a library it called) ended the process with os._exit(0) or sys.exit in C"
    return f"the task (or a library it called) ended the process with os._exit({exitcode}) or exit() in C"


class WorkerLostError(ProcessError):
    """A pool worker died while it was running a task; the task failed (or was retried).

    ``pid``, ``exitcode`` (negative: the signal), ``task`` (its number in the pool's submission
    order) and ``item`` (the position in its chunk, for map-like calls) say what happened; ``str()``
    adds the likely cause.  The pool replaced the worker and goes on.
    """

    def __init__(self, pid: int, exitcode: int | None, task: int | None = None, item: int | None = None,
                 what: str = "task", attempts: int = 1, sending: bool = False) -> None:
        super().__init__(pid, exitcode, task, item, what, attempts, sending)
        self.pid, self.exitcode, self.task, self.item, self.what, self.attempts = pid, exitcode, task, item, what, attempts
        #: it died after the task had returned, while pickling or sending its result
        self.sending = sending

    def __str__(self) -> str:
        running = f"while sending the result of {self.what}" if self.sending else f"while running {self.what}"
        if self.item is not None:
            running += f" (item {self.item} of its chunk)"
        tries = f" on each of {self.attempts} attempts" if self.attempts > 1 else ""
        cause = likely_cause(self.exitcode)
        if self.sending:
            cause = (f"pickling the result ended the process (a __reduce__ that exits or crashes, or memory "
                     f"ran out pickling a large result); otherwise {cause}")
        return (f"worker pid {self.pid} {describe_exit(self.exitcode)} {running}{tries}; likely cause: "
                f"{cause}.  The pool replaced the worker; pass on_worker_death='retry' "
                f"to run such a task again")


class TaskTimeoutError(TimeoutError):
    """A task ran longer than its ``task_timeout``; its worker was killed and replaced."""

    def __init__(self, timeout: float, pid: int, what: str = "task", item: int | None = None) -> None:
        super().__init__(timeout, pid, what, item)
        self.timeout, self.pid, self.what, self.item = timeout, pid, what, item

    def __str__(self) -> str:
        where = f" (item {self.item} of its chunk)" if self.item is not None else ""
        return (f"{self.what}{where} ran longer than task_timeout={self.timeout:g} s; its worker (pid "
                f"{self.pid}) was killed and replaced")


class BrokenPoolError(ProcessError, RuntimeError):
    """The pool cannot run tasks any more (a worker died under ``on_worker_death='break'``, the
    initializer failed, or workers die as they start); every unfinished task fails with this."""


class MaybeEncodingError(ProcessError):
    """A task's result (or exception) could not be pickled to send it back from the worker.

    ``value`` is its ``repr`` and ``exc`` the pickling error's text (as the stdlib's
    ``multiprocessing.pool.MaybeEncodingError``).
    """

    #: the pickling error itself, when it could travel (an executor raises it, as the stdlib's does)
    original: BaseException | None = None

    def __init__(self, exc: object, value: object) -> None:
        self.exc = _safe_repr(exc)
        self.value = _safe_repr(value)
        super().__init__(self.exc, self.value)

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return _rebuild_encoding_error, (self.exc, self.value, self.original)

    def __str__(self) -> str:
        return f"Error sending result: '{self.value}'. Reason: '{self.exc}'"

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self}>"


def _safe_repr(obj: object) -> str:
    """``repr(obj)``, or a stand-in when its ``__repr__`` raises (this runs where an error is being
    reported: it must not raise a second one)."""
    try:
        return repr(obj)
    except BaseException as exc:
        return f"<{type(obj).__name__} object (its repr raised {type(exc).__name__})>"


def _rebuild_encoding_error(exc: str, value: str, original: BaseException | None = None) -> MaybeEncodingError:
    error = MaybeEncodingError.__new__(MaybeEncodingError)
    error.exc, error.value, error.args = exc, value, (exc, value)
    error.original = original
    return error


# Shown as ``gilfree.X`` in tracebacks, where users look them up.
for _cls in (ProcessError, BufferTooShort, TimeoutError, AuthenticationError, PicklingError, MainModuleNotGuardedError,
             OwnerDiedError, OwnerDiedWarning, WorkerLostError, TaskTimeoutError, BrokenPoolError, MaybeEncodingError):
    _cls.__module__ = "gilfree"
del _cls
