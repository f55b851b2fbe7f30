"""What runs inside a cluster's worker process for one pool task (layer L9, remote side).

Imported by name in Ray and Dask workers, so it imports nothing heavy at top level (no ray, no
dask): :func:`run_ray` and :func:`run_dask` are the remote functions, and both call
:func:`execute`, which does what ``gilfree._workers._serve`` does for one task in a local worker.

Per worker *process* it keeps (module globals, shared by the threads of a Dask worker):

* the unpickled functions, keyed by ``(engine key, function id)``: each function arrives as pickled
  bytes through the object store and is unpickled once per process, not once per task;
* the set of engines whose initializer already ran here: ``initializer(*initargs)`` runs once per
  process and engine, before the first task of that engine;
* a task counter (Dask has no per-process task quota: see ``backends/dask.py``).

A task's arguments arrive as bytes pickled by ``gilfree.reduction`` in the caller and are unpickled
here, so numpy arrays are private, writable copies (Ray would hand out read-only views of its
object store).  The outcome goes back as bytes too: ``(status, value, seconds, pid)`` pickled here,
with an exception as ``_RemoteException`` (it unpickles in the caller to the exception with the
remote traceback chained as ``__cause__``) and results the caller receives as writable arrays.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import time

from .. import reduction
from .._errors import MaybeEncodingError
from .._workers import CALL, EACH, STARMAP, _RemoteException, _run_items

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

__all__ = ["OK", "FAILED", "INIT_FAILED", "execute", "run_ray", "run_dask"]

#: Outcome statuses.
OK, FAILED, INIT_FAILED = 0, 1, 2
#: Unpickled functions a worker process keeps; the least recently used goes beyond this.
FUNCTION_CACHE = 64

_lock = threading.Lock()
_functions: collections.OrderedDict[tuple[str, int], Any] = collections.OrderedDict()
_initialized: dict[str, BaseException | None] = {}  # engine key -> None, or what the initializer raised


def _function(key: str, fid: int, load: Callable[[], bytes]) -> Any:
    name = (key, fid)
    with _lock:
        func = _functions.get(name)
        if func is not None:
            _functions.move_to_end(name)
            return func
    func = reduction.loads(load())
    with _lock:
        _functions[name] = func
        while len(_functions) > FUNCTION_CACHE:
            _functions.popitem(last=False)
    return func


def _initialize(key: str, load: Callable[[], bytes] | None) -> BaseException | None:
    """Run the engine's initializer once in this process; what it raised, if anything."""
    if load is None:
        return None
    with _lock:  # a Dask worker with several threads: one of them runs it, the others wait
        if key not in _initialized:
            try:
                initializer, initargs = reduction.loads(load())
                initializer(*initargs)
                _initialized[key] = None
            except BaseException as exc:
                _initialized[key] = exc
        return _initialized[key]


def execute(key: str, fid: int, load_function: Callable[[], bytes], load_init: Callable[[], bytes] | None,
            kind: int, payload: bytes) -> bytes:
    """Run one task here (in a cluster worker); return its pickled outcome.

    ``payload`` is ``reduction.dumps((args, kwargs))``.  Blocks for as long as the task runs.
    """
    start = time.perf_counter()
    error = _initialize(key, load_init)
    if error is not None:
        return reduction.dumps((INIT_FAILED, _RemoteException(error), 0.0, os.getpid()))
    try:
        func = _function(key, fid, load_function)
        args, kwargs = reduction.loads(payload)
        del payload
        if kind == CALL:
            value = func(*args, **(kwargs or {}))
        elif kind < EACH:
            value = list(itertools.starmap(func, args) if kind == STARMAP else map(func, args))
        else:
            value = _run_items(func, args, kind, None, False, True)
        status = OK
    except BaseException as exc:  # a BaseException fails the task, not the worker
        value, status = _RemoteException(exc), FAILED
        del exc
    elapsed = time.perf_counter() - start
    try:
        return reduction.dumps((status, value, elapsed, os.getpid()))
    except Exception as exc:  # the result cannot be pickled: say so instead
        error = MaybeEncodingError(exc, value.exc if isinstance(value, _RemoteException) else value)
        return reduction.dumps((FAILED, _RemoteException(error), elapsed, os.getpid()))


def run_ray(key: str, fid: int, function_box: list[Any], init_box: list[Any] | None, kind: int,
            payload: bytes) -> bytes:
    """The Ray remote function.  ``function_box`` holds the ObjectRef of the pickled function inside
    a list, so Ray does not fetch it for every task: it is fetched (``ray.get``) only by a process
    that has not unpickled it yet."""
    import ray

    load_init = None if init_box is None else (lambda: ray.get(init_box[0]))
    return execute(key, fid, lambda: ray.get(function_box[0]), load_init, kind, payload)


def run_dask(key: str, fid: int, function: bytes, init: bytes | None, kind: int, payload: bytes) -> bytes:
    """The Dask task.  ``function`` and ``init`` were scattered once per call and arrive resolved
    (a worker fetches each once and keeps it while the pool holds its future)."""
    return execute(key, fid, lambda: function, None if init is None else (lambda: init), kind, payload)
