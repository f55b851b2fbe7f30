"""``gilfree.dummy``: the same API with threads instead of processes (``multiprocessing.dummy``).

Useful where the work waits on I/O (threads suffice, nothing is pickled) and to switch a program
between threads and processes by changing one import.  ``Pool`` is :class:`gilfree.pool.ThreadPool`;
the synchronisation primitives are :mod:`threading`'s, the queues :mod:`queue`'s.
"""

from __future__ import annotations

import array
import queue
import threading
import weakref
from queue import Queue as Queue
from threading import Barrier as Barrier
from threading import BoundedSemaphore as BoundedSemaphore
from threading import Condition as Condition
from threading import Event as Event
from threading import Lock as Lock
from threading import RLock as RLock
from threading import Semaphore as Semaphore
from threading import current_thread as current_process

from ..pool import ThreadPool
from . import connection as connection
from .connection import Pipe as Pipe

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Iterable

__all__ = [
    "Process", "current_process", "active_children", "freeze_support", "Lock", "RLock", "Semaphore",
    "BoundedSemaphore", "Condition", "Event", "Barrier", "Queue", "Manager", "Pipe", "Pool", "JoinableQueue",
    "Value", "Array", "Namespace", "connection",
]

JoinableQueue = queue.Queue


class DummyProcess(threading.Thread):
    """A thread with the ``Process`` API (``start``, ``join``, ``is_alive``, ``exitcode``...)."""

    def __init__(self, group: Any = None, target: Callable[..., Any] | None = None, name: str | None = None,
                 args: Iterable[Any] = (), kwargs: dict[str, Any] | None = None, *, daemon: bool | None = None) -> None:
        threading.Thread.__init__(self, group, target, name, tuple(args), kwargs or {}, daemon=daemon)
        self._pid = None
        self._children: weakref.WeakKeyDictionary[DummyProcess, None] = weakref.WeakKeyDictionary()
        self._start_called = False
        self._parent = current_process()

    def start(self) -> None:
        if self._parent is not current_process():
            raise RuntimeError(f"Parent is {self._parent!r} but current_process is {current_process()!r}")
        self._start_called = True
        _children_of(self._parent)[self] = None
        threading.Thread.start(self)

    @property
    def exitcode(self) -> int | None:
        if self._start_called and not self.is_alive():
            return 0
        return None


Process = DummyProcess


def _children_of(thread: threading.Thread) -> Any:
    """The DummyProcesses ``thread`` started (a table made on first use, on any thread: the stdlib
    makes one only for the thread that imports the module)."""
    children = getattr(thread, "_children", None)
    if children is None:
        children = thread._children = weakref.WeakKeyDictionary()  # type: ignore[attr-defined]
    return children


def active_children() -> list[DummyProcess]:
    """The DummyProcesses the calling thread started that are still running."""
    children = _children_of(current_process())
    for p in list(children):
        if not p.is_alive():
            children.pop(p, None)
    return list(children)


def freeze_support() -> None:
    """Nothing to do."""


class Namespace:
    """An object whose attributes are given as keyword arguments."""

    def __init__(self, /, **kwds: Any) -> None:
        self.__dict__.update(kwds)

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items() if not k.startswith("_"))
        return f"{type(self).__name__}({items})"


class Value:
    """A value with a ``.value`` attribute (no lock: use ``Lock`` where threads share it)."""

    def __init__(self, typecode: Any, value: Any, lock: Any = True) -> None:
        self._typecode = typecode
        self._value = value

    @property
    def value(self) -> Any:
        return self._value

    @value.setter
    def value(self, value: Any) -> None:
        self._value = value

    def __repr__(self) -> str:
        return f"<{type(self).__name__}({self._typecode!r}, {self._value!r})>"


def Array(typecode: str, sequence: Any, lock: Any = True) -> array.array[Any]:
    """An :class:`array.array` (threads share it as it is)."""
    return array.array(typecode, sequence)


def Manager() -> Any:
    """This module, which offers what a manager would (``multiprocessing.dummy.Manager``)."""
    import sys

    return sys.modules[__name__]


def shutdown() -> None:
    pass


def Pool(processes: int | None = None, initializer: Callable[..., Any] | None = None,
         initargs: Iterable[Any] = ()) -> ThreadPool:
    """A pool of worker threads."""
    return ThreadPool(processes, initializer, initargs)
