"""gilfree: process-based parallelism, a drop-in ``multiprocessing`` that does not hang.

``import gilfree as multiprocessing`` and a program written for the stdlib runs unchanged; lambdas,
closures and functions of ``__main__`` can be sent to children under every start method.

The public API is written out here (not generated at import time), so every name is a real,
typed object: ``gilfree.Process`` is a class you can subclass.  Top-level functions act on the
default context (see :mod:`gilfree.context`).
"""

from __future__ import annotations

import sys as _sys

from . import connection as connection
from . import context as context
from . import process as process
from . import reduction as reduction
from . import util as util
from ._errors import AuthenticationError as AuthenticationError
from ._errors import BrokenPoolError as BrokenPoolError
from ._errors import BufferTooShort as BufferTooShort
from ._errors import MainModuleNotGuardedError as MainModuleNotGuardedError
from ._errors import OwnerDiedError as OwnerDiedError
from ._errors import OwnerDiedWarning as OwnerDiedWarning
from ._errors import PicklingError as PicklingError
from ._errors import ProcessError as ProcessError
from ._errors import TaskTimeoutError as TaskTimeoutError
from ._errors import TimeoutError as TimeoutError
from ._errors import WorkerLostError as WorkerLostError
from .connection import Connection as Connection
from .context import Process as Process
from .process import active_children as active_children
from .process import current_process as current_process
from .process import parent_process as parent_process

# As the stdlib does: in the parent, ``__mp_main__`` names the main module, so an object whose class
# a spawned or forkserver child defined in its copy of the main script (``__mp_main__.Point``, an
# exception class of the script) unpickles here.  In a spawned child, the child's own main module is
# installed under both names later (``_start._common._install_main``).
if "__main__" in _sys.modules:
    _sys.modules.setdefault("__mp_main__", _sys.modules["__main__"])
del _sys

# `typing` and the modules below cost a spawned child tens of milliseconds of start-up, and a child
# imports `gilfree` before anything else.  They are loaded on first access instead: the names are
# written out here (and imported normally for type checkers), and each resolves to the real object
# -- `gilfree.Lock` is the class itself.  See docs/design.md, "start-up imports".
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from . import arrays as arrays
    from . import dummy as dummy
    from . import executor as executor
    from . import forkserver as forkserver
    from . import heap as heap
    from . import managers as managers
    from . import pool as pool
    from . import queues as queues
    from . import resource_sharer as resource_sharer
    from . import resource_tracker as resource_tracker
    from . import shared_memory as shared_memory
    from . import sharedctypes as sharedctypes
    from . import spawn as spawn
    from . import synchronize as synchronize
    from .arrays import SharedArray as SharedArray
    from .arrays import as_shared as as_shared
    from .arrays import shared_array as shared_array
    from .executor import BrokenProcessPool as BrokenProcessPool
    from .executor import ProcessPoolExecutor as ProcessPoolExecutor
    from .queues import JoinableQueue as JoinableQueue
    from .queues import Queue as Queue
    from .queues import SimpleQueue as SimpleQueue
    from .synchronize import Barrier as Barrier
    from .synchronize import BoundedSemaphore as BoundedSemaphore
    from .synchronize import Condition as Condition
    from .synchronize import Event as Event
    from .synchronize import Lock as Lock
    from .synchronize import RLock as RLock
    from .synchronize import Semaphore as Semaphore

_LAZY: dict[str, tuple[str, str | None]] = {
    "arrays": ("arrays", None),
    "SharedArray": ("arrays", "SharedArray"),
    "as_shared": ("arrays", "as_shared"),
    "shared_array": ("arrays", "shared_array"),
    "managers": ("managers", None),
    "heap": ("heap", None),
    "forkserver": ("forkserver", None),
    "resource_tracker": ("resource_tracker", None),
    "resource_sharer": ("resource_sharer", None),
    "spawn": ("spawn", None),
    "pool": ("pool", None),
    "dummy": ("dummy", None),
    "executor": ("executor", None),
    "ProcessPoolExecutor": ("executor", "ProcessPoolExecutor"),
    "BrokenProcessPool": ("executor", "BrokenProcessPool"),
    "queues": ("queues", None),
    "Queue": ("queues", "Queue"),
    "JoinableQueue": ("queues", "JoinableQueue"),
    "SimpleQueue": ("queues", "SimpleQueue"),
    "shared_memory": ("shared_memory", None),
    "sharedctypes": ("sharedctypes", None),
    "synchronize": ("synchronize", None),
    "Barrier": ("synchronize", "Barrier"),
    "BoundedSemaphore": ("synchronize", "BoundedSemaphore"),
    "Condition": ("synchronize", "Condition"),
    "Event": ("synchronize", "Event"),
    "Lock": ("synchronize", "Lock"),
    "RLock": ("synchronize", "RLock"),
    "Semaphore": ("synchronize", "Semaphore"),
}


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'gilfree' has no attribute {name!r}") from None
    import importlib

    module = importlib.import_module(f"{__name__}.{module_name}")
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

SUBDEBUG = util.SUBDEBUG
SUBWARNING = util.SUBWARNING

_default = context._default_context


def Pipe(duplex: bool = True) -> tuple[Connection, Connection]:
    """Return two connected :class:`Connection` objects (one-way if ``duplex`` is False)."""
    return _default.Pipe(duplex)


def RawValue(typecode_or_type: Any, *args: Any) -> Any:
    """A ctypes object in shared memory, without a lock."""
    return _default.RawValue(typecode_or_type, *args)


def RawArray(typecode_or_type: Any, size_or_initializer: Any) -> Any:
    """A ctypes array in shared memory, without a lock."""
    return _default.RawArray(typecode_or_type, size_or_initializer)


def Value(typecode_or_type: Any, *args: Any, lock: Any = True) -> Any:
    """A ctypes object in shared memory guarded by a (robust) lock."""
    return _default.Value(typecode_or_type, *args, lock=lock)


def Array(typecode_or_type: Any, size_or_initializer: Any, *, lock: Any = True) -> Any:
    """A ctypes array in shared memory guarded by a (robust) lock."""
    return _default.Array(typecode_or_type, size_or_initializer, lock=lock)


def Manager() -> managers.SyncManager:
    """A started :class:`~gilfree.managers.SyncManager`: shared dicts, lists, queues... served by a new
    process (``multiprocessing.Manager``)."""
    return _default.Manager()


def Pool(processes: int | None = None, initializer: Any = None, initargs: Any = (),
         maxtasksperchild: int | None = None, **options: Any) -> pool.Pool:
    """A pool of worker processes (``multiprocessing.Pool``) that never hangs on a dead worker; see
    :class:`gilfree.pool.Pool` for the options beyond the stdlib's."""
    return _default.Pool(processes, initializer, initargs, maxtasksperchild, **options)


def cpu_count() -> int:
    """Number of CPUs in the system."""
    return _default.cpu_count()


def get_context(method: str | None = None) -> context.BaseContext:
    """The context for ``method`` ("fork", "spawn", "forkserver"), or the default context."""
    return _default.get_context(method)


def set_start_method(method: str | None, force: bool = False) -> None:
    """Choose the default start method, once (again only with ``force=True``)."""
    _default.set_start_method(method, force)


def get_start_method(allow_none: bool = False) -> str | None:
    """The default start method (fixing it now unless ``allow_none``)."""
    return _default.get_start_method(allow_none)


def get_all_start_methods() -> list[str]:
    """The start methods available on this platform, the default first."""
    return _default.get_all_start_methods()


def set_executable(executable: str) -> None:
    """The Python interpreter that spawned children run."""
    _default.set_executable(executable)


def set_forkserver_preload(module_names: list[str]) -> None:
    """Modules the fork server imports once, before forking children."""
    _default.set_forkserver_preload(module_names)


def freeze_support() -> None:
    """Kept for programs that call it; nothing to do on POSIX."""
    _default.freeze_support()


def get_logger() -> Any:
    """The package's logger (``multiprocessing.get_logger``)."""
    return util.get_logger()


def log_to_stderr(level: int | str | None = None) -> Any:
    """Log the package's records to stderr, in this process and children started later."""
    return util.log_to_stderr(level)


def allow_connection_pickling() -> None:
    """Kept for compatibility: connections can always be passed to children."""


__all__ = [
    "Array",
    "Barrier",
    "BoundedSemaphore",
    "Condition",
    "Event",
    "Lock",
    "Manager",
    "Pool",
    "pool",
    "dummy",
    "executor",
    "ProcessPoolExecutor",
    "BrokenProcessPool",
    "WorkerLostError",
    "TaskTimeoutError",
    "BrokenPoolError",
    "OwnerDiedError",
    "OwnerDiedWarning",
    "JoinableQueue",
    "Queue",
    "SimpleQueue",
    "queues",
    "heap",
    "resource_sharer",
    "resource_tracker",
    "spawn",
    "RLock",
    "RawArray",
    "RawValue",
    "Semaphore",
    "Value",
    "SharedArray",
    "arrays",
    "managers",
    "as_shared",
    "shared_array",
    "shared_memory",
    "sharedctypes",
    "synchronize",
    "AuthenticationError",
    "BufferTooShort",
    "Connection",
    "MainModuleNotGuardedError",
    "PicklingError",
    "Pipe",
    "Process",
    "ProcessError",
    "SUBDEBUG",
    "SUBWARNING",
    "TimeoutError",
    "active_children",
    "allow_connection_pickling",
    "connection",
    "context",
    "cpu_count",
    "current_process",
    "freeze_support",
    "get_all_start_methods",
    "get_context",
    "get_logger",
    "get_start_method",
    "log_to_stderr",
    "parent_process",
    "process",
    "reduction",
    "set_executable",
    "set_forkserver_preload",
    "set_start_method",
    "util",
]

del TYPE_CHECKING
