"""Contexts: a start method and the objects that use it (layer L8).

``get_context("spawn")`` returns a context whose ``Process`` always spawns, whatever the default is;
``gilfree.Process`` and the other top-level names use the *default* context, whose start method is
fixed by the first ``set_start_method`` (or the first use).  As in the stdlib, the default is
``fork`` on Linux before Python 3.14 and ``forkserver`` from 3.14 on.

A spawned or forkserver child starts with its parent's start method as its default, so processes it
starts in turn are started the same way.
"""

from __future__ import annotations

import os
import sys

from . import connection, process, reduction, util
from ._errors import AuthenticationError, BufferTooShort, ProcessError, TimeoutError
from ._start import LAUNCHERS, forkserver, inherited_start_method
from ._start import set_executable as _set_executable

# `typing` costs a spawned child several ms to import; annotations are strings here anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from . import managers, pool, queues, synchronize

# The methods below import `synchronize`/`sharedctypes` when first called, not at the top: a spawned
# child imports this module to unpickle its Process object, and ctypes + the lock extension would
# cost it ~10 ms it rarely needs (docs/design.md, "start-up imports").

__all__ = [
    "BaseContext",
    "DefaultContext",
    "ForkContext",
    "SpawnContext",
    "ForkServerContext",
    "Process",
    "ForkProcess",
    "SpawnProcess",
    "ForkServerProcess",
]

_DEFAULT_METHOD = "forkserver" if sys.version_info >= (3, 14) else "fork"


class BaseContext:
    """The API of ``multiprocessing``, bound to one start method."""

    _name: str | None = None
    Process: type[process.BaseProcess]

    ProcessError = ProcessError
    BufferTooShort = BufferTooShort
    TimeoutError = TimeoutError
    AuthenticationError = AuthenticationError

    current_process = staticmethod(process.current_process)
    parent_process = staticmethod(process.parent_process)
    active_children = staticmethod(process.active_children)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} start_method={self.get_start_method(allow_none=True)!r}>"

    def cpu_count(self) -> int:
        """Number of CPUs in the system (not the ones this process may use; see os.sched_getaffinity)."""
        num = os.cpu_count()
        if num is None:
            raise NotImplementedError("cannot determine number of cpus")
        return num

    def Pipe(self, duplex: bool = True) -> tuple[connection.Connection, connection.Connection]:
        """Two connected :class:`~gilfree.connection.Connection` objects (see ``connection.Pipe``)."""
        return connection.Pipe(duplex)

    # -- synchronisation and shared state (gilfree.synchronize, gilfree.sharedctypes) --------------
    def Lock(self, *, on_owner_death: str = "raise") -> synchronize.Lock:
        """A non-recursive lock (robust: a dead holder is reported, not waited for)."""
        from . import synchronize

        return synchronize.Lock(ctx=self, on_owner_death=on_owner_death)

    def RLock(self, *, on_owner_death: str = "raise") -> synchronize.RLock:
        """A recursive lock."""
        from . import synchronize

        return synchronize.RLock(ctx=self, on_owner_death=on_owner_death)

    def Condition(self, lock: Any = None) -> synchronize.Condition:
        """A condition variable (with a new RLock unless ``lock`` is given)."""
        from . import synchronize

        return synchronize.Condition(lock, ctx=self)

    def Semaphore(self, value: int = 1, *, on_owner_death: str = "raise") -> synchronize.Semaphore:
        from . import synchronize

        return synchronize.Semaphore(value, ctx=self, on_owner_death=on_owner_death)

    def BoundedSemaphore(self, value: int = 1, *, on_owner_death: str = "raise") -> synchronize.BoundedSemaphore:
        from . import synchronize

        return synchronize.BoundedSemaphore(value, ctx=self, on_owner_death=on_owner_death)

    def Event(self) -> synchronize.Event:
        from . import synchronize

        return synchronize.Event(ctx=self)

    def Barrier(self, parties: int, action: Any = None, timeout: float | None = None) -> synchronize.Barrier:
        from . import synchronize

        return synchronize.Barrier(parties, action, timeout, ctx=self)

    # -- queues (gilfree.queues) -----------------------------------------------------------------
    def Queue(self, maxsize: int = 0, *, ring_size: int | None = None) -> queues.Queue:
        """A FIFO queue in shared memory (``multiprocessing.Queue``; see :mod:`gilfree.queues`)."""
        from . import queues

        return queues.Queue(maxsize, ctx=self, ring_size=ring_size or queues.RING_SIZE)

    def JoinableQueue(self, maxsize: int = 0, *, ring_size: int | None = None) -> queues.JoinableQueue:
        """A queue with ``task_done``/``join``."""
        from . import queues

        return queues.JoinableQueue(maxsize, ctx=self, ring_size=ring_size or queues.RING_SIZE)

    def SimpleQueue(self, *, ring_size: int | None = None) -> queues.SimpleQueue:
        """An unbounded queue with put, get, empty and close."""
        from . import queues

        return queues.SimpleQueue(ctx=self, ring_size=ring_size or queues.RING_SIZE)

    # -- managers (gilfree.managers) -------------------------------------------------------------
    def Manager(self) -> managers.SyncManager:
        """A started :class:`~gilfree.managers.SyncManager`: shared objects served by a new process."""
        from . import managers

        m = managers.SyncManager(ctx=self.get_context())
        m.start()
        return m

    # -- pools (gilfree.pool) ----------------------------------------------------------------------
    def Pool(self, processes: int | None = None, initializer: Any = None, initargs: Any = (),
             maxtasksperchild: int | None = None, **options: Any) -> pool.Pool:
        """A pool of worker processes started with this context (see :class:`gilfree.pool.Pool`)."""
        from . import pool

        return pool.Pool(processes, initializer, initargs, maxtasksperchild, context=self.get_context(), **options)

    def RawValue(self, typecode_or_type: Any, *args: Any) -> Any:
        """A shared ctypes object without a lock."""
        from . import sharedctypes

        return sharedctypes.RawValue(typecode_or_type, *args)

    def RawArray(self, typecode_or_type: Any, size_or_initializer: Any) -> Any:
        """A shared ctypes array without a lock."""
        from . import sharedctypes

        return sharedctypes.RawArray(typecode_or_type, size_or_initializer)

    def Value(self, typecode_or_type: Any, *args: Any, lock: Any = True) -> Any:
        """A shared ctypes object guarded by a lock."""
        from . import sharedctypes

        return sharedctypes.Value(typecode_or_type, *args, lock=lock, ctx=self)

    def Array(self, typecode_or_type: Any, size_or_initializer: Any, *, lock: Any = True) -> Any:
        """A shared ctypes array guarded by a lock."""
        from . import sharedctypes

        return sharedctypes.Array(typecode_or_type, size_or_initializer, lock=lock, ctx=self)

    def get_context(self, method: str | None = None) -> BaseContext:
        if method is None:
            return self
        try:
            return _concrete_contexts[method]
        except KeyError:
            raise ValueError(
                f"cannot find context for {method!r}: the start methods are {list(_concrete_contexts)}"
            ) from None

    def get_start_method(self, allow_none: bool = False) -> str | None:
        return self._name

    def set_start_method(self, method: str | None, force: bool = False) -> None:
        raise ValueError("cannot set start method of concrete context")

    def get_all_start_methods(self) -> list[str]:
        """The start methods available here, the default first."""
        methods = list(_concrete_contexts)
        methods.remove(_DEFAULT_METHOD)
        return [_DEFAULT_METHOD, *methods]

    def set_executable(self, executable: str) -> None:
        """The interpreter that spawned children (and the fork server) run."""
        _set_executable(executable)

    def set_forkserver_preload(self, module_names: list[str]) -> None:
        """Modules the fork server imports once, so forked children start with them loaded."""
        forkserver.set_preload(module_names)

    def freeze_support(self) -> None:
        """Nothing to do on POSIX (kept for programs that call it; see the stdlib)."""

    def get_logger(self) -> Any:
        return util.get_logger()

    def log_to_stderr(self, level: int | str | None = None) -> Any:
        return util.log_to_stderr(level)

    def allow_connection_pickling(self) -> None:
        """Connections can always be pickled into a child's arguments; kept for compatibility."""

    @property
    def reducer(self) -> Any:
        return reduction

    def _check_available(self) -> None:
        pass


class Process(process.BaseProcess):
    """A process started with the default context's start method (``multiprocessing.Process``)."""

    _start_method = None

    @staticmethod
    def _Popen(process_obj: process.BaseProcess) -> Any:
        return _default_context.get_context().Process._Popen(process_obj)


class ForkProcess(process.BaseProcess):
    """A process started with ``os.fork()``."""

    _start_method = "fork"

    @staticmethod
    def _Popen(process_obj: process.BaseProcess) -> Any:
        return LAUNCHERS["fork"](process_obj)


class SpawnProcess(process.BaseProcess):
    """A process that runs in a fresh interpreter."""

    _start_method = "spawn"

    @staticmethod
    def _Popen(process_obj: process.BaseProcess) -> Any:
        return LAUNCHERS["spawn"](process_obj)


class ForkServerProcess(process.BaseProcess):
    """A process forked from the fork server."""

    _start_method = "forkserver"

    @staticmethod
    def _Popen(process_obj: process.BaseProcess) -> Any:
        return LAUNCHERS["forkserver"](process_obj)


class ForkContext(BaseContext):
    _name = "fork"
    Process = ForkProcess


class SpawnContext(BaseContext):
    _name = "spawn"
    Process = SpawnProcess


class ForkServerContext(BaseContext):
    _name = "forkserver"
    Process = ForkServerProcess


_concrete_contexts: dict[str, BaseContext] = {
    "fork": ForkContext(),
    "spawn": SpawnContext(),
    "forkserver": ForkServerContext(),
}


class DefaultContext(BaseContext):
    """The context behind the top-level API; its start method is chosen once."""

    Process = Process

    def __init__(self, context: BaseContext) -> None:
        self._default_context = context
        self._actual_context: BaseContext | None = None

    def get_context(self, method: str | None = None) -> BaseContext:
        if method is None:
            if self._actual_context is None:
                inherited = inherited_start_method()
                self._actual_context = _concrete_contexts[inherited] if inherited else self._default_context
            return self._actual_context
        return super().get_context(method)

    def set_start_method(self, method: str | None, force: bool = False) -> None:
        if self._actual_context is not None and not force:
            raise RuntimeError(
                f"context has already been set (to {self._actual_context._name!r}); call "
                f"set_start_method once, before starting processes, or pass force=True"
            )
        if method is None and force:
            self._actual_context = None
            return
        self._actual_context = self.get_context(method)

    def get_start_method(self, allow_none: bool = False) -> str | None:
        if self._actual_context is None:
            if allow_none:
                return None
            self.get_context()
        assert self._actual_context is not None
        return self._actual_context._name


_default_context = DefaultContext(_concrete_contexts[_DEFAULT_METHOD])


def _adopt_start_method(process_obj: process.BaseProcess) -> None:
    """In a child: make the start method that started it this process's default."""
    method = process_obj._start_method or inherited_start_method()
    if method is not None:
        _default_context._actual_context = _concrete_contexts[method]


process._bootstrap_hooks.append(_adopt_start_method)
process.default_context = _default_context
