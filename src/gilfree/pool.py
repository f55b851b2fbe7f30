"""``Pool`` and ``ThreadPool``: the stdlib API over gilfree's worker engine (layer L7).

::

    pool.map(f, items) ── chunks ──> Engine (gilfree._workers): supervisor thread + workers
          │                                   │ results, per chunk, on the supervisor thread
          └── MapResult.get() <── event ──────┘ (callbacks run there too)

    pool.imap(f, gen) ── the caller's thread pulls chunks from `gen` as it consumes results,
                         never more than a bounded number ahead (an endless generator works)

Everything the stdlib's ``multiprocessing.pool`` offers works the same; what differs is documented
in ``docs/design.md`` ("Pool") and on each method:

* a worker that dies mid-task fails that task with :class:`~gilfree.WorkerLostError` (or retries
  it, or breaks the pool: ``on_worker_death``), instead of hanging the pool forever;
* ``task_timeout`` kills and replaces a worker whose task runs too long;
* ``max_memory_per_child`` recycles a worker whose memory grew past a limit;
* an initializer that raises breaks the pool (every task fails with the error) instead of
  restarting workers forever;
* ``imap``/``imap_unordered`` choose their chunk size themselves (``chunksize=None``, the
  default) and an item that raises fails only itself, whatever the chunk size;
* ``progress=True`` shows a tqdm progress bar; functions may be lambdas or closures;
* ``terminate()`` fails the unfinished results (``get()`` raises) instead of leaving them waiting.

Where this runs: the methods run in the caller's thread and block only where the stdlib's do
(``apply``, ``map``, ``starmap``, ``get``, ``wait``, iterating ``imap``, ``join``).
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import warnings
import weakref

from . import _workers, process
from ._errors import (
    BrokenPoolError,
    MaybeEncodingError,
    TaskTimeoutError,
    TimeoutError,
    WorkerLostError,
)
from ._workers import CALL, EACH, MAP, STAREACH, STARMAP, Engine, Failure, Function, RemoteTraceback, Task
from .util import Finalize

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Iterable, Iterator

__all__ = [
    "Pool",
    "ThreadPool",
    "AsyncResult",
    "ApplyResult",
    "MapResult",
    "IMapIterator",
    "IMapUnorderedIterator",
    "MaybeEncodingError",
    "WorkerLostError",
    "TaskTimeoutError",
    "BrokenPoolError",
    "RemoteTraceback",
    "INIT",
    "RUN",
    "CLOSE",
    "TERMINATE",
]

#: ``Pool._state``, as in the stdlib: INIT until the workers are started, RUN, then CLOSE after
#: ``close()`` or TERMINATE after ``terminate()``.
INIT, RUN, CLOSE, TERMINATE = "INIT", "RUN", "CLOSE", "TERMINATE"

#: imap's automatic chunks aim at this many seconds of work each.
CHUNK_TARGET = 0.005
MAX_AUTO_CHUNK = 4096
#: imap stops reading its input ahead while this many bytes of results wait to be consumed ...
AHEAD_BYTES = 64 << 20
#: ... and its automatic chunks hold at most about this many bytes of results each.
CHUNK_BYTES = 4 << 20


def _job_counter() -> Iterator[int]:
    n = 0
    while True:
        yield n
        n += 1


_job_ids = _job_counter()


def _progress_bar(progress: Any, total: int | None, desc: str) -> Any:
    """A tqdm bar for ``progress`` (True, a dict of tqdm options, or a bar to update), or None."""
    if not progress:
        return None
    if hasattr(progress, "update") and hasattr(progress, "close"):
        return progress
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError(
            "progress=True needs tqdm, an optional dependency: pip install 'gilfree[tqdm]'"
        ) from None
    options = dict(progress) if isinstance(progress, dict) else {}
    options.setdefault("total", total)
    options.setdefault("desc", desc)
    return tqdm(**options)


def _stdlib_chunksize(n: int, workers: int) -> int:
    chunksize, extra = divmod(n, workers * 4)
    return chunksize + 1 if extra else chunksize


# --------------------------------------------------------------------------------------------------
# Results


def _not_on_the_supervisor(pool: Any) -> None:
    """Refuse to wait, on the pool's own supervisor thread (in a callback), for a result: only that
    thread can deliver it, so the wait would never end (and would stall every other result)."""
    engine = getattr(pool, "_engine", None)
    if engine is not None and threading.current_thread() is getattr(engine, "_thread", None):
        raise RuntimeError(
            "a pool callback waited for a result of its own pool (apply, map, get, or iterating imap): "
            "callbacks run on the thread that delivers results, so it would wait forever.  Use "
            "apply_async/map_async there, or hand the work to another thread."
        )


class ApplyResult:
    """The result of ``apply_async`` (``multiprocessing.pool.AsyncResult``)."""

    def __init__(self, pool: Any, callback: Callable[[Any], Any] | None, error_callback: Callable[[Any], Any] | None) -> None:
        self._pool = pool  # keeps the pool alive while results are outstanding, as in the stdlib
        self._event = threading.Event()
        self._job = next(_job_ids)
        self._callback = callback
        self._error_callback = error_callback
        self._success: bool | None = None
        self._value: Any = None

    def __repr__(self) -> str:
        state = "pending" if not self.ready() else ("ok" if self._success else "failed")
        return f"<{type(self).__name__} job={self._job} {state}>"

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return bool(self._success)

    def wait(self, timeout: float | None = None) -> None:
        if not self._event.is_set():
            _not_on_the_supervisor(self._pool)
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        """The result; re-raises the task's exception (with the worker's traceback as its cause)."""
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError
        if self._success:
            return self._value
        raise self._value

    # called by the engine, on the supervisor thread
    def _start(self, task: Task) -> bool:
        return True

    def _done(self, task: Task, ok: bool, value: Any) -> None:
        if self._event.is_set():
            return
        self._success, self._value = ok, value
        self._finished()

    def _finished(self) -> None:
        """Run the callback, then make the result ready, whatever the callback does (one that raises
        is reported by the engine, as the stdlib's result handler would print it)."""
        try:
            if self._success and self._callback is not None:
                self._callback(self._value)
            if not self._success and self._error_callback is not None:
                self._error_callback(self._value)
        finally:
            self._event.set()
            self._pool = None


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """The result of ``map_async``/``starmap_async``: the list of results, in input order."""

    def __init__(self, pool: Any, chunksize: int, length: int, callback: Any, error_callback: Any,
                 bar: Any = None) -> None:
        super().__init__(pool, callback, error_callback)
        self._lock = threading.Lock()
        self._chunksize = chunksize
        self._length = length
        self._bar = bar
        self._success = True
        self._value = [None] * length
        self._left = 0 if chunksize <= 0 else -(-length // chunksize)
        if self._left == 0:
            self._close_bar()
            self._event.set()
            self._pool = None

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _done(self, task: Task, ok: bool, value: Any) -> None:
        with self._lock:
            if ok and self._success:
                start = task.index * self._chunksize
                self._value[start : start + len(value)] = value
                self._left -= 1
                if self._bar is not None:
                    self._bar.update(len(value))
                finished = self._left == 0
            elif not ok and self._success:
                self._success = False
                self._value = value
                finished = True
            else:
                return
        if finished:
            self._close_bar()
            self._finished()


class IMapIterator:
    """The iterator ``imap`` returns: results in input order, computed a bounded distance ahead.

    The caller's thread pulls chunks from the input as it consumes results: never more than
    ``ahead`` chunks are submitted and not yet consumed, so an endless generator works in constant
    memory.  ``chunksize=None`` grows chunks from 1 until each holds about
    :data:`CHUNK_TARGET` seconds of work.  An item that raised raises when its turn comes; the
    iteration can go on after it.
    """

    _ordered = True

    def __init__(self, pool: Pool, function: Function, iterable: Iterable[Any], chunksize: int | None, star: bool,
                 options: dict[str, Any], bar: Any = None) -> None:
        self._pool = pool
        self._engine = pool._engine
        self._function = function
        self._source = iter(iterable)
        self._auto = chunksize is None
        self._size = 1 if chunksize is None else chunksize
        self._kind = STAREACH if star else EACH
        self._options = options
        self._bar = bar
        self._cond = threading.Condition(threading.Lock())
        self._results: dict[int, tuple[bool, Any, int]] = {}  # chunk index -> (ok, value, bytes) (ordered)
        self._arrived: collections.deque[tuple[bool, Any, int]] = collections.deque()  # (unordered)
        self._held_bytes = 0  # bytes of results arrived and not yet taken
        self._buffer: collections.deque[Any] = collections.deque()
        self._submitted = 0  # chunks
        self._consumed = 0  # chunks
        self._exhausted = False
        self._source_error: BaseException | None = None
        self._ahead = max(4, 2 * pool._processes * _workers.DEPTH_LONG)
        self._feeding = threading.Lock()
        self._feed()
        if not self._exhausted:
            pool._iterators.add(self)

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} submitted={self._submitted} consumed={self._consumed} "
                f"chunksize={self._size}{' (auto)' if self._auto else ''}>")

    def __iter__(self) -> IMapIterator:
        return self

    def _feed(self, everything: bool = False) -> None:
        """Submit chunks from the input until ``ahead`` chunks are outstanding (caller's thread), or
        all of it (``everything``: the pool is being closed, and work accepted before ``close()``
        must finish, as in the stdlib, whether or not the caller reads the results yet)."""
        if self._exhausted:
            return
        if not self._feeding.acquire(everything):
            return
        try:
            tasks: list[Task] = []
            while not self._exhausted and (everything or self._room()):
                chunk = []
                try:
                    for _ in range(self._size):
                        chunk.append(next(self._source))
                except StopIteration:
                    self._exhausted = True
                except BaseException as exc:  # the input itself raised: stop there, as the stdlib does
                    self._exhausted = True
                    self._source_error = exc
                if chunk and self._source_error is not None and not self._auto:
                    # the input raised inside a chunk of the caller's size: as in the stdlib, that chunk
                    # is not run and the error takes its place (after the chunks before it).  With
                    # automatic sizes every item read before the error runs, as with chunksize=1.
                    chunk = []
                if chunk:
                    tasks.append(Task(self, self._submitted, self._kind, self._function, chunk, None, len(chunk),
                                      **self._options))
                    self._submitted += 1
                if everything and len(tasks) >= 64:
                    self._submit(tasks)  # a long input: do not hold all of its tasks at once
                    tasks = []
                if self._auto and not everything and len(tasks) >= 2 and self._submitted > 2:
                    break  # let sizes adapt as results come
            self._submit(tasks)
        finally:
            self._feeding.release()

    def _room(self) -> bool:
        """Whether to read more input: few enough chunks outstanding, few enough bytes waiting."""
        outstanding = self._submitted - self._consumed
        return outstanding == 0 or (outstanding < self._ahead and self._held_bytes < AHEAD_BYTES)

    def _submit(self, tasks: list[Task]) -> None:
        if not tasks:
            return
        try:
            self._engine.submit(tasks)
        except ValueError:  # the pool was terminated: what was not submitted never runs
            if self._engine.state == "running":
                raise  # the engine refused the task itself
            self._submitted -= len(tasks)
            self._exhausted = True
            self._source_error = BrokenPoolError(
                "the pool was terminated before the rest of this imap's input was submitted")

    # the engine's side (supervisor thread)
    def _start(self, task: Task) -> bool:
        return True

    def _done(self, task: Task, ok: bool, value: Any) -> None:
        if ok and self._auto and task.size:
            per_item = task.elapsed / task.size
            wanted = int(CHUNK_TARGET / per_item) if per_item > 0 else MAX_AUTO_CHUNK
            if task.nbytes:  # large results: smaller chunks, so that read-ahead stays bounded in bytes
                wanted = min(wanted, int(CHUNK_BYTES * task.size / task.nbytes))
            self._size = max(1, min(wanted, 2 * self._size, MAX_AUTO_CHUNK))
        with self._cond:
            self._held_bytes += task.nbytes
            if self._ordered:
                self._results[task.index] = (ok, value, task.nbytes)
            else:
                self._arrived.append((ok, value, task.nbytes))
            self._cond.notify()

    # the caller's side
    def _take(self) -> tuple[bool, Any, int] | None:
        if self._ordered:
            outcome = self._results.pop(self._consumed, None)
        else:
            outcome = self._arrived.popleft() if self._arrived else None
        if outcome is not None:
            self._held_bytes -= outcome[2]
        return outcome

    def next(self, timeout: float | None = None) -> Any:
        while True:
            if self._buffer:
                item = self._buffer.popleft()
                if self._bar is not None:
                    self._bar.update(1)
                if type(item) is Failure:
                    raise item.exc
                return item
            self._feed()
            with self._cond:
                outcome = self._take()
                if outcome is None:
                    _not_on_the_supervisor(self._pool)
                while outcome is None:
                    if self._exhausted and self._consumed >= self._submitted:
                        self._finish()
                        if self._source_error is not None:
                            error, self._source_error = self._source_error, None
                            raise error
                        raise StopIteration
                    if not self._cond.wait(timeout):
                        raise TimeoutError
                    outcome = self._take()
                self._consumed += 1
            ok, value, _ = outcome
            if not ok:
                raise value
            self._buffer.extend(value)

    __next__ = next

    def _finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._pool = None  # type: ignore[assignment]


class IMapUnorderedIterator(IMapIterator):
    """The iterator ``imap_unordered`` returns: results as they complete."""

    _ordered = False


# --------------------------------------------------------------------------------------------------
# The pool


def _terminate_engine(engine: Engine) -> None:
    engine.terminate()
    if threading.current_thread() is not engine._thread:  # collected in one of its own callbacks: no wait
        engine.join(10)


def _drain_then_close(engine: Engine, iterators: list[IMapIterator]) -> None:
    """``Pool.close()`` with imaps still reading their input: submit the rest, then close."""
    try:
        for it in iterators:
            it._feed(everything=True)
    finally:
        engine.close()


class Pool:
    """A pool of worker processes (``multiprocessing.Pool``), which never hangs on a dead worker.

    ``processes`` defaults to the CPUs this process may use.  Beyond the stdlib's arguments:

    * ``on_worker_death``: ``"fail"`` (the default: the task fails with
      :class:`~gilfree.WorkerLostError`), ``"retry"`` (run it again, up to ``retries`` times, then
      fail), or ``"break"`` (fail every unfinished task with :class:`~gilfree.BrokenPoolError`);
    * ``task_timeout``: seconds a task (or each item of a chunk) may run before its worker is
      killed and the task fails with :class:`~gilfree.TaskTimeoutError`;
    * ``max_memory_per_child``: bytes of resident memory after which a worker is replaced, between
      tasks (nothing is lost or repeated);
    * ``backend``: ``"ray"`` or ``"dask"`` runs the tasks on that cluster instead of local processes
      (``address``: the cluster to join; None starts a local one for the pool), with the same API:
      see :mod:`gilfree.backends`.  ``processes`` then bounds the tasks in flight (None: the
      cluster's CPUs).

    Each of ``on_worker_death``, ``retries`` and ``task_timeout`` may also be given per call.
    """

    _thread_workers = False

    def __init__(self, processes: int | None = None, initializer: Callable[..., Any] | None = None,
                 initargs: Iterable[Any] = (), maxtasksperchild: int | None = None, context: Any = None, *,
                 on_worker_death: str = "fail", retries: int = 0, task_timeout: float | None = None,
                 max_memory_per_child: int | None = None, backend: str | None = None,
                 address: str | None = None) -> None:
        self._state = INIT  # RUN once the workers have started (an unstarted pool does not warn in __del__)
        if processes is None and backend is None:
            processes = _default_workers()
        if processes is not None and processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_memory_per_child is not None and max_memory_per_child <= 0:
            raise ValueError(f"max_memory_per_child={max_memory_per_child}: give a number of bytes > 0")
        _workers.check_policy(on_worker_death, retries)
        self._check_timeout(task_timeout)
        self._processes: int = processes or 0  # a cluster engine's is known once it has connected
        self._options: dict[str, Any] = {"policy": on_worker_death, "retries": retries, "timeout": task_timeout}
        if self._thread_workers:
            self._ctx = None
        else:
            self._ctx = as_context(context)
        if backend is None:
            if address is not None:
                raise ValueError(f"address={address!r} needs backend='ray' or backend='dask'")
            self._engine: Any = Engine(self._processes, self._ctx, initializer, initargs, maxtasksperchild,
                                       max_memory_per_child, name=type(self).__name__)
        else:  # a cluster engine: an optional dependency (ray, dask), imported only when asked for
            from .backends import open_engine

            self._engine = open_engine(backend, address, processes, initializer, initargs, maxtasksperchild,
                                       max_memory_per_child, name=type(self).__name__)
            self._processes = self._engine.processes
        self._terminate = Finalize(self, _terminate_engine, (self._engine,), exitpriority=15)
        self._iterators: weakref.WeakSet[IMapIterator] = weakref.WeakSet()  # imaps still reading their input
        self._closing = False
        self._drainer: threading.Thread | None = None
        self._state = RUN

    def _check_timeout(self, task_timeout: float | None) -> None:
        if task_timeout is not None:
            if task_timeout <= 0:
                raise ValueError(f"task_timeout={task_timeout}: give seconds > 0 or None")
            if self._thread_workers:
                raise ValueError("task_timeout needs worker processes: a ThreadPool cannot stop a running thread")

    def __repr__(self) -> str:
        return (f"<{type(self).__module__}.{type(self).__qualname__} state={self._state} "
                f"pool_size={self._processes}>")

    def _call_options(self, on_worker_death: str | None, retries: int | None,
                      task_timeout: float | None) -> dict[str, Any]:
        options = dict(self._options)
        if on_worker_death is not None:
            options["policy"] = on_worker_death
        if retries is not None:
            options["retries"] = retries
        if task_timeout is not None:
            self._check_timeout(task_timeout)
            options["timeout"] = task_timeout
        _workers.check_policy(options["policy"], options["retries"])
        return options

    def _function(self, func: Callable[..., Any]) -> Function:
        if not callable(func):
            raise TypeError(f"{func!r} is not callable")
        return Function(func, pickle_it=not self._thread_workers)

    def _check_running(self) -> None:
        if self._state != RUN or self._engine.state != "running":
            raise ValueError("Pool not running")

    # -- apply ---------------------------------------------------------------------------
    def apply(self, func: Callable[..., Any], args: Iterable[Any] = (), kwds: dict[str, Any] | None = None, *,
              on_worker_death: str | None = None, retries: int | None = None,
              task_timeout: float | None = None) -> Any:
        """Call ``func(*args, **kwds)`` in a worker and return its result (blocks)."""
        result = self.apply_async(func, args, kwds, on_worker_death=on_worker_death, retries=retries,
                                  task_timeout=task_timeout)
        return self._wait_for(result)

    def apply_async(self, func: Callable[..., Any], args: Iterable[Any] = (), kwds: dict[str, Any] | None = None,
                    callback: Callable[[Any], Any] | None = None,
                    error_callback: Callable[[BaseException], Any] | None = None, *,
                    on_worker_death: str | None = None, retries: int | None = None,
                    task_timeout: float | None = None) -> ApplyResult:
        """Start ``func(*args, **kwds)`` in a worker; return an :class:`AsyncResult` at once."""
        self._check_running()
        options = self._call_options(on_worker_death, retries, task_timeout)
        result = ApplyResult(self, callback, error_callback)
        task = Task(result, 0, CALL, self._function(func), tuple(args), dict(kwds) if kwds else None, 1, **options)
        self._engine.submit([task])
        return result

    # -- map ----------------------------------------------------------------------------
    def _map_async(self, func: Callable[..., Any], iterable: Iterable[Any], kind: int, chunksize: int | None,
                   callback: Any, error_callback: Any, progress: Any, options: dict[str, Any]) -> MapResult:
        self._check_running()
        function = self._function(func)
        # a list, tuple or range is sliced as it is (a range chunk travels as a range: a few bytes);
        # anything else is iterated, as the stdlib does (a dict maps over its keys, a deque works)
        items: Any = iterable if type(iterable) in (list, tuple, range) else list(iterable)
        n = len(items)
        if chunksize is None:
            chunksize = _stdlib_chunksize(n, self._processes)
        elif chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        if n == 0:
            chunksize = 0
        bar = _progress_bar(progress, n, getattr(func, "__name__", "map"))
        result = MapResult(self, chunksize, n, callback, error_callback, bar)
        if n:
            tasks = []
            for index, start in enumerate(range(0, n, chunksize)):
                chunk = items[start : start + chunksize]
                tasks.append(Task(result, index, kind, function, chunk, None, len(chunk), **options))
            self._engine.submit(tasks)
        return result

    def map(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int | None = None, *,
            progress: Any = False, on_worker_death: str | None = None, retries: int | None = None,
            task_timeout: float | None = None) -> list[Any]:
        """``[func(x) for x in iterable]``, computed in the workers, in order (blocks).

        ``progress=True`` shows a tqdm bar (or pass a dict of tqdm options, or a bar).
        """
        options = self._call_options(on_worker_death, retries, task_timeout)
        result = self._map_async(func, iterable, MAP, chunksize, None, None, progress, options)
        return self._wait_for(result)  # type: ignore[no-any-return]

    def map_async(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int | None = None,
                  callback: Callable[[Any], Any] | None = None,
                  error_callback: Callable[[BaseException], Any] | None = None, *, progress: Any = False,
                  on_worker_death: str | None = None, retries: int | None = None,
                  task_timeout: float | None = None) -> MapResult:
        options = self._call_options(on_worker_death, retries, task_timeout)
        return self._map_async(func, iterable, MAP, chunksize, callback, error_callback, progress, options)

    def starmap(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]], chunksize: int | None = None, *,
                progress: Any = False, on_worker_death: str | None = None, retries: int | None = None,
                task_timeout: float | None = None) -> list[Any]:
        """``[func(*args) for args in iterable]`` in the workers, in order (blocks)."""
        options = self._call_options(on_worker_death, retries, task_timeout)
        result = self._map_async(func, iterable, STARMAP, chunksize, None, None, progress, options)
        return self._wait_for(result)  # type: ignore[no-any-return]

    def starmap_async(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]], chunksize: int | None = None,
                      callback: Callable[[Any], Any] | None = None,
                      error_callback: Callable[[BaseException], Any] | None = None, *, progress: Any = False,
                      on_worker_death: str | None = None, retries: int | None = None,
                      task_timeout: float | None = None) -> MapResult:
        options = self._call_options(on_worker_death, retries, task_timeout)
        return self._map_async(func, iterable, STARMAP, chunksize, callback, error_callback, progress, options)

    # -- imap ---------------------------------------------------------------------------
    def _imap(self, cls: type[IMapIterator], func: Callable[..., Any], iterable: Iterable[Any],
              chunksize: int | None, star: bool, progress: Any, options: dict[str, Any]) -> IMapIterator:
        self._check_running()
        if chunksize is not None and chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        total = len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
        bar = _progress_bar(progress, total, getattr(func, "__name__", "imap"))
        return cls(self, self._function(func), iterable, chunksize, star, options, bar)

    def imap(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int | None = None, *,
             progress: Any = False, on_worker_death: str | None = None, retries: int | None = None,
             task_timeout: float | None = None) -> IMapIterator:
        """Like ``map``, lazily: an iterator over the results, in order.

        ``chunksize=None`` (the default; the stdlib's is 1) sizes chunks automatically; an item
        that raises raises in its turn, and the iteration can continue past it.
        """
        options = self._call_options(on_worker_death, retries, task_timeout)
        return self._imap(IMapIterator, func, iterable, chunksize, False, progress, options)

    def imap_unordered(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int | None = None, *,
                       progress: Any = False, on_worker_death: str | None = None, retries: int | None = None,
                       task_timeout: float | None = None) -> IMapIterator:
        """Like ``imap``, with results in the order they complete."""
        options = self._call_options(on_worker_death, retries, task_timeout)
        return self._imap(IMapUnorderedIterator, func, iterable, chunksize, False, progress, options)

    def istarmap(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]], chunksize: int | None = None, *,
                 progress: Any = False, on_worker_death: str | None = None, retries: int | None = None,
                 task_timeout: float | None = None) -> IMapIterator:
        """``imap`` for functions of several arguments (gilfree's; not in the stdlib)."""
        options = self._call_options(on_worker_death, retries, task_timeout)
        return self._imap(IMapIterator, func, iterable, chunksize, True, progress, options)

    # -- waiting, Ctrl-C ------------------------------------------------------------------
    def _wait_for(self, result: ApplyResult) -> Any:
        """``result.get()``, but Ctrl-C stops the pool's workers first (one KeyboardInterrupt)."""
        try:
            return result.get()
        except KeyboardInterrupt:
            self.terminate()
            raise

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Accept no more tasks; the workers exit when the submitted ones are done.

        Work accepted before ``close()`` finishes, as in the stdlib: the rest of the input of an
        ``imap`` still being read is submitted by a thread (``join()`` waits for it), so its results
        are all there to iterate, even after ``join()``.
        """
        if self._closing:
            return
        self._closing = True
        if self._state == RUN:
            self._state = CLOSE
        feeding = [it for it in list(self._iterators) if not it._exhausted]
        if not feeding:
            self._engine.close()
            return
        self._drainer = threading.Thread(target=_drain_then_close, args=(self._engine, feeding),
                                         name="gilfree-pool-close", daemon=True)
        self._drainer.start()

    def terminate(self) -> None:
        """Stop the workers now; unfinished results fail with :class:`~gilfree.BrokenPoolError`."""
        self._state = TERMINATE
        self._terminate()

    def join(self) -> None:
        """Wait for the workers to exit (after :meth:`close` or :meth:`terminate`)."""
        if self._engine.state == "running" and not self._closing:
            raise ValueError("Pool is still running")
        if self._drainer is not None:
            self._drainer.join()
        self._engine.join()

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    def __del__(self, _warn: Any = warnings.warn) -> None:
        # the stdlib's test and text: a pool collected while its state says RUN was never closed
        if getattr(self, "_state", None) == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)

    def __reduce__(self) -> Any:
        raise NotImplementedError(
            "pool objects cannot be passed between processes or pickled"
        )

    # -- introspection (gilfree's) ----------------------------------------------------------
    @property
    def pids(self) -> list[int]:
        """The pids of the current worker processes."""
        return self._engine.pids()

    # -- the stdlib pool's private names that code (and CPython's tests) use ---------------------
    @property
    def _pool(self) -> list[Any]:
        """The current workers' ``Process`` objects (threads for a ThreadPool; none with a cluster
        backend), as the stdlib keeps them: ``len(pool._pool)``, ``[p.pid for p in pool._pool]``,
        ``p.is_alive()``.  A new list each time: workers are replaced as they exit (the objects of
        workers that left stay usable).  Changing the list changes nothing."""
        return self._engine.worker_objects()  # type: ignore[no-any-return]

    def _repopulate_pool(self) -> None:
        """Start workers for those that have exited (the supervisor does it by itself as soon as it sees
        a worker exit; this asks for it now, as the stdlib's does)."""
        self._engine.repopulate()


class ThreadPool(Pool):
    """The same pool with threads for workers (``multiprocessing.pool.ThreadPool``).

    Nothing is pickled: arguments and results are passed as they are.  ``task_timeout`` and the
    death policies do not apply (a thread cannot be killed).
    """

    _thread_workers = True

    def __init__(self, processes: int | None = None, initializer: Callable[..., Any] | None = None,
                 initargs: Iterable[Any] = ()) -> None:
        super().__init__(processes, initializer, initargs)


def as_context(context: Any) -> Any:
    """A gilfree context for ``context``: None (the default), a start-method name, a gilfree context, or
    a stdlib context (replaced by gilfree's for the same start method: its processes could not carry
    gilfree's pipes and shared memory).  Any other object is used as it is, as the stdlib's Pool uses
    whatever it is given: its ``Process`` makes the workers."""
    default = process.default_context  # filled in by the context layer (L8)
    if context is None or isinstance(context, str):
        return default.get_context(context)
    if type(context).__module__.startswith("gilfree."):
        return context.get_context()
    stdlib = sys.modules.get("multiprocessing.context")  # a stdlib context exists only once it is imported
    if stdlib is not None and isinstance(context, stdlib.BaseContext):
        return default.get_context(context.get_start_method())
    return context


def _default_workers() -> int:
    counter = getattr(os, "process_cpu_count", None)
    if counter is not None:
        return counter() or 1
    return os.cpu_count() or 1
