"""Locks, semaphores, conditions, events and barriers shared between processes (layer L5).

The stdlib's API and semantics (``multiprocessing.synchronize``), on a different base: each lock is
a block in an anonymous shared-memory arena (:mod:`gilfree._shm`) driven by the futex code of
:mod:`gilfree._csync`.  No named semaphore is created, so nothing can leak into ``/dev/shm``, and
``with lock:`` runs entirely in C (the class *is* the C type, subclassed).

Robust: a lock's word holds its owner (pid and thread), written by the same atomic step that takes
it, and a counting semaphore journals the one operation in flight, so a process killed at any
instruction leaves a state a waiter recognises (docs/design.md, "Lock protocols").  A waiter that
has slept for a slice (0.1 s) checks whether the holder has died.  If so it raises
:class:`~gilfree.OwnerDiedError` naming the pid instead of blocking forever -- or, for a lock created
with ``on_owner_death="takeover"``, it takes the dead holder's place and is told with an
:class:`~gilfree.OwnerDiedWarning`.  Holder records describe "who holds what" only while the acquirer
is also the releaser; the first release by a process that holds nothing (a semaphore used as a
signal, a lock handed from one process to another) switches the check off for that lock, so it
never reports a death that did not cost anything.  A ``Condition`` gives each sleeper its own slot,
so ``notify`` never waits for a sleeper and is never spent on a dead one.

Like the stdlib's, these objects reach another process only by inheritance: as ``Process``
arguments (or attributes of such arguments), never through a pipe or queue.

Where this runs: in any process; ``acquire`` and ``wait`` block up to their timeout (releasing the
GIL), and Ctrl-C interrupts them.
"""

from __future__ import annotations

import os
import threading

from . import _shm, process, reduction
from ._errors import OwnerDiedError, OwnerDiedWarning

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

try:
    from . import _csync
except ImportError:  # pragma: no cover - exercised only on machines without a C compiler
    _csync = None  # type: ignore[assignment]

__all__ = ["Lock", "RLock", "Semaphore", "BoundedSemaphore", "Condition", "Event", "Barrier", "SEM_VALUE_MAX"]

SEM_VALUE_MAX = 2**31 - 1
#: How many sleepers of one Condition have a slot (and so are found if they die while waiting).
SLEEPER_SLOTS = _csync.COND_SLOTS if _csync is not None else 128

# "repair" is "takeover" without the warning, for callers inside gilfree that repair what the lock
# protects themselves (queues); it is not part of the public API.
_MODES = {"raise": 0, "takeover": 1, "repair": 2}

if _csync is not None:
    _csync.set_classes(OwnerDiedError, OwnerDiedWarning)
    _Base: Any = _csync.SemBlock
    _CondBlock: Any = _csync.CondBlock
    _COND_SIZE: int = _csync.COND_SIZE
    _pid_alive: Callable[[int], bool] = _csync.pid_alive
else:  # pragma: no cover

    class _Base:  # type: ignore[no-redef]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError(
                "gilfree's lock extension (gilfree._csync) was not built: this install had no C "
                "compiler.  Install gcc and reinstall gilfree (pip install --force-reinstall gilfree)."
            )


class SemLock(_Base):  # type: ignore[misc, valid-type]
    """Common base: a lock block in shared memory.  ``kind``: 0 semaphore, 1 recursive lock."""

    _purpose: str | None = None

    def __init__(self, kind: int, value: int, maxvalue: int, *, ctx: Any = None, on_owner_death: str = "raise") -> None:
        if on_owner_death not in _MODES:
            raise ValueError(f"on_owner_death must be 'raise' or 'takeover', not {on_owner_death!r}")
        self._block = _shm.Block(_csync.BLOCK_SIZE if _csync is not None else 256)
        super().__init__(self._block.arena.buffer, self._block.offset, True, kind, value, maxvalue, _MODES[on_owner_death])

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        reduction.assert_spawning(self)
        return _rebuild, (type(self), self._block, self._mode, self.__dict__)

    def __getstate__(self) -> Any:
        reduction.assert_spawning(self)
        return self.__dict__

    @property
    def recovered_from(self) -> int | None:
        """The pid whose place the last ``acquire`` in this process took (takeover mode), or None."""
        return self._recovered_from or None


def _rebuild(cls: Any, block: _shm.Block, mode: int, state: dict[str, Any]) -> SemLock:
    obj = cls.__new__(cls)
    _Base.__init__(obj, block.arena.buffer, block.offset, False, 0, 0, 1, mode)
    obj.__dict__.update(state)
    obj._block = block
    return obj


def _thread_suffix() -> str:
    name = threading.current_thread().name
    return "" if name == "MainThread" else "|" + name


class Semaphore(SemLock):
    """A counter: ``acquire`` takes one (waiting while it is 0), ``release`` gives one back."""

    def __init__(self, value: int = 1, *, ctx: Any = None, on_owner_death: str = "raise") -> None:
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        super().__init__(0, value, SEM_VALUE_MAX, ctx=ctx, on_owner_death=on_owner_death)

    def get_value(self) -> int:
        return self._get_value()

    def _repr_value(self) -> str:
        try:
            return str(self._get_value())
        except Exception:
            return "unknown"

    def __repr__(self) -> str:
        return f"<{type(self).__name__}(value={self._repr_value()})>"


class BoundedSemaphore(Semaphore):
    """A semaphore that refuses to be released above its initial value."""

    def __init__(self, value: int = 1, *, ctx: Any = None, on_owner_death: str = "raise") -> None:
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        SemLock.__init__(self, 0, value, value, ctx=ctx, on_owner_death=on_owner_death)
        self._initial = value

    def __repr__(self) -> str:
        return f"<{type(self).__name__}(value={self._repr_value()}, maxvalue={self._maxvalue})>"


class Lock(SemLock):
    """A non-recursive lock; any process (or thread) may release it, as in the stdlib."""

    def __init__(self, *, ctx: Any = None, on_owner_death: str = "raise") -> None:
        super().__init__(0, 1, 1, ctx=ctx, on_owner_death=on_owner_death)

    def __repr__(self) -> str:
        try:
            if self._is_mine():
                name = process.current_process().name + _thread_suffix()
            elif not self._is_zero():
                name = "None"
            elif self._count() > 0:  # held by another thread of this process
                name = "SomeOtherThread"
            else:
                name = "SomeOtherProcess"
        except Exception:
            name = "unknown"
        return f"<{type(self).__name__}(owner={name})>"


class RLock(SemLock):
    """A recursive lock: the owning thread may acquire it again; only the owner may release it."""

    def __init__(self, *, ctx: Any = None, on_owner_death: str = "raise") -> None:
        super().__init__(1, 1, 1, ctx=ctx, on_owner_death=on_owner_death)

    def __repr__(self) -> str:
        try:
            if self._is_mine():
                name = process.current_process().name + _thread_suffix()
                count = self._count()
            elif self._get_value() == 1:
                name, count = "None", 0
            else:
                name = "SomeOtherProcess" if self._owner() != os.getpid() else "SomeOtherThread"
                count = "nonzero"
        except Exception:
            name, count = "unknown", "unknown"
        return f"<{type(self).__name__}({name}, {count})>"


class Condition:
    """A condition variable shared between processes (``threading.Condition``'s API).

    Each sleeper has a slot (its pid and state) in a block of shared memory, and ``wait`` is one C
    call (:class:`gilfree._csync.CondBlock`) that takes a slot, releases the lock, sleeps on its
    own slot and takes the lock back, so no signal handler runs between those steps.  ``notify(n)``
    marks the ``n`` oldest sleepers that are alive as notified and wakes each; it never waits for
    a sleeper (the stdlib's ``notify`` -- and so ``Event.set`` -- waits for each woken sleeper to
    report, forever if it was killed).  A sleeper found dead is counted as a wait that timed out.
    Sleepers beyond the table's :data:`SLEEPER_SLOTS` wait on a shared generation counter, and a
    ``notify`` that reaches them wakes them all (the one case of more than ``n`` woken).
    """

    def __init__(self, lock: Lock | RLock | None = None, *, ctx: Any = None) -> None:
        self._lock = lock if lock is not None else RLock()
        self._cv_block = _shm.Block(_COND_SIZE)
        self._cv = _CondBlock(self._cv_block.arena.buffer, self._cv_block.offset, True)
        self._bind()

    def _bind(self) -> None:
        self.acquire = self._lock.acquire
        self.release = self._lock.release

    def __getstate__(self) -> tuple[Any, ...]:
        reduction.assert_spawning(self)
        return (self._lock, self._cv_block)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self._lock, self._cv_block = state
        self._cv = _CondBlock(self._cv_block.arena.buffer, self._cv_block.offset, False)
        self._bind()

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # after a wait() whose lock could not be taken back (its holder died: OwnerDiedError), the
        # lock is not ours to release: let that error through instead of masking it
        if exc_type is not None and not self._lock._is_mine():
            return
        self._lock.__exit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        try:
            waiters = self._cv._waiting()
        except Exception:
            waiters = "unknown"
        return f"<{type(self).__name__}({self._lock}, {waiters})>"

    def wait(self, timeout: float | None = None) -> bool:
        """Release the lock, wait for a notify (or the timeout), re-acquire; True if notified."""
        if not self._lock._is_mine():
            raise AssertionError("must acquire() condition before using wait()")
        return self._cv.wait(self._lock, timeout)

    def notify(self, n: int = 1) -> None:
        """Wake up to ``n`` waiters (the lock must be held)."""
        if not self._lock._is_mine():
            raise AssertionError("lock is not owned")
        if n > 0:  # as threading's: any number (a float, a huge int) bounds how many are woken
            self._cv.notify(SEM_VALUE_MAX if n >= SEM_VALUE_MAX else -int(-n // 1))

    def notify_all(self) -> None:
        self.notify(SEM_VALUE_MAX)

    notifyAll = notify_all

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        """Wait until ``predicate()`` is true (or the timeout passes); return its last value."""
        import time

        result = predicate()
        if result:
            return result
        deadline = None if timeout is None else time.monotonic() + timeout
        while not result:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.wait(remaining)
            else:
                self.wait()
            result = predicate()
        return result


class Event:
    """A flag processes can set, clear and wait for (``threading.Event``'s API).

    The flag is a semaphore whose value is 0 or 1, changed only under the condition's lock and each
    time by one step (``release`` when it is 0, ``acquire`` when it is 1), so a process killed in
    ``set`` or ``clear`` leaves it either as it was or as asked.
    """

    def __init__(self, *, ctx: Any = None) -> None:
        self._cond = Condition(Lock())
        self._flag = Semaphore(0)

    def is_set(self) -> bool:
        return self._flag._get_value() > 0

    def set(self) -> None:
        with self._cond:
            # notify first: the sleepers cannot run before the lock is released, and by then the
            # flag is set -- unless a signal handler raised in between, and then they find it unset
            # and sleep on (set() did not happen), instead of sleeping on with the flag set
            self._cond.notify_all()
            if self._flag._get_value() == 0:
                self._flag.release()

    def clear(self) -> None:
        with self._cond:
            self._flag.acquire(False)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the flag is set (or the timeout passes); return the flag."""
        with self._cond:  # in a loop: a wake-up without the flag (see set) is not the end
            return bool(self._cond.wait_for(self._flag._get_value, timeout))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} at {id(self):#x} {'set' if self.is_set() else 'unset'}>"


class Barrier(threading.Barrier):
    """A barrier for ``parties`` processes (``threading.Barrier``'s API and algorithm).

    The algorithm is threading's; its two counters (state, waiting count) live in shared memory and
    its condition is a :class:`Condition`, as the stdlib does.
    """

    def __init__(self, parties: int, action: Callable[[], Any] | None = None, timeout: float | None = None,
                 *, ctx: Any = None) -> None:
        if parties < 1:
            raise ValueError("parties must be > 0")
        block = _shm.Block(8)
        self._setstate((parties, action, timeout, Condition(Lock()), block))
        self._state = 0
        self._count = 0

    def _setstate(self, state: tuple[Any, ...]) -> None:
        self._parties, self._action, self._timeout, self._cond, self._block = state
        self._array = self._block.memoryview().cast("i")

    def __getstate__(self) -> tuple[Any, ...]:
        reduction.assert_spawning(self)
        return (self._parties, self._action, self._timeout, self._cond, self._block)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self._setstate(state)

    @property  # type: ignore[override]
    def _state(self) -> int:
        return self._array[0]

    @_state.setter
    def _state(self, value: int) -> None:
        self._array[0] = value

    @property  # type: ignore[override]
    def _count(self) -> int:
        return self._array[1]

    @_count.setter
    def _count(self, value: int) -> None:
        self._array[1] = value

