"""``ProcessPoolExecutor``: the ``concurrent.futures`` API over gilfree's worker engine (layer L7).

::

    executor.submit(fn, *args) ──> Task ──> Engine (gilfree._workers) ──> a worker process
          Future <── set_result / set_exception (supervisor thread) <── result ──┘

The same engine as :class:`gilfree.Pool`.  As the stdlib's, under fork every worker starts with the
executor, under spawn and forkserver a worker starts when a task finds none idle.  A worker that dies
(SIGKILL, OOM, a crash; running a task or idle), or a result that cannot be unpickled here, breaks the
executor, as the stdlib's does: every unfinished future, the running one too, fails with
:class:`BrokenProcessPool` (a subclass of the stdlib's, so code written for the stdlib catches it),
and later submissions raise it.  ``on_worker_death="fail"`` fails only the future that was running
(with :class:`~gilfree.WorkerLostError`) and replaces the worker, ``"retry"`` runs it again
(``retries=N``): gilfree's policies, as on :class:`gilfree.Pool`, asked for by name.  A task that
overruns ``task_timeout`` fails alone whatever the policy.  Functions may be lambdas and closures;
``max_memory_per_child`` works as on the pool.

Where this runs: ``submit`` and ``map`` return at once; iterating ``map``'s results and
``shutdown(wait=True)`` block.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FuturesTimeoutError
from concurrent.futures.process import BrokenProcessPool as _StdBrokenProcessPool
from concurrent.futures.process import _RemoteTraceback as _StdRemoteTraceback

from . import _workers, util
from ._errors import BrokenPoolError, MaybeEncodingError
from ._workers import CALL, STARMAP, Engine, Function, RemoteTraceback, Task
from .pool import _default_workers, as_context

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Iterable, Iterator

__all__ = ["ProcessPoolExecutor", "BrokenProcessPool"]


class BrokenProcessPool(BrokenPoolError, _StdBrokenProcessPool):
    """The executor cannot run tasks any more.

    A subclass of the stdlib's ``concurrent.futures.process.BrokenProcessPool`` (so of
    ``BrokenExecutor``): code written for the stdlib's executor catches it unchanged.
    """


BrokenProcessPool.__module__ = "gilfree.executor"


#: Executors not shut down yet, and engines of executors collected without ``shutdown()``.  At
#: interpreter exit -- before non-daemonic threads are joined and before ``atexit`` handlers, as the
#: stdlib's executor does -- each one runs its pending futures to the end and its workers exit: "the
#: program will not exit until all pending futures are done".  Submitting after that raises.
_live: weakref.WeakSet[ProcessPoolExecutor] = weakref.WeakSet()
_abandoned: set[Any] = set()
_abandoned_lock = threading.Lock()
_interpreter_exiting = False


def _at_interpreter_exit() -> None:
    global _interpreter_exiting
    _interpreter_exiting = True
    for executor in list(_live):
        try:
            executor.shutdown(wait=True)
        except Exception as exc:  # one executor's failure must not leave the others' work unfinished
            util.info("ProcessPoolExecutor: shutdown at exit failed: %r", exc)
    with _abandoned_lock:
        engines = list(_abandoned)
        _abandoned.clear()
    for engine in engines:
        engine.join()


def _abandon(engine: Any) -> None:
    """The executor was collected without ``shutdown()``: its workers finish the futures already
    submitted (someone may hold them) and exit, as the stdlib's do."""
    engine.close()
    with _abandoned_lock:
        for done in [e for e in _abandoned if e.join(0)]:
            _abandoned.discard(done)
        if not engine.join(0):
            _abandoned.add(engine)


def _forget_the_parents() -> None:
    # a forked child holds copies of its parent's executors, whose supervisor threads did not come
    # along: they are the parent's to finish, never this child's to wait for at its exit
    global _abandoned_lock
    _live.clear()
    _abandoned.clear()
    _abandoned_lock = threading.Lock()


try:
    threading._register_atexit(_at_interpreter_exit)  # type: ignore[attr-defined]
except RuntimeError:  # imported while the interpreter is already shutting down
    _interpreter_exiting = True
os.register_at_fork(after_in_child=_forget_the_parents)


class _FutureJob:
    """Connects engine tasks to a Future (supervisor thread)."""

    __slots__ = ("future", "__weakref__")

    def __init__(self, future: Future[Any]) -> None:
        self.future = future

    def _start(self, task: Task) -> bool:
        """Mark the future RUNNING as its task is sent; False if it was cancelled.  Idempotent: a task
        sent again (requeued after its worker died before starting it, or retried) is already RUNNING,
        and a RUNNING future cannot be cancelled."""
        future = self.future
        if future.running():
            return True
        return future.set_running_or_notify_cancel()

    def _done(self, task: Task, ok: bool, value: Any) -> None:
        future = self.future
        if future.done():
            return
        if not future.running():  # failed before it was sent (pickling, a broken pool)
            if not future.set_running_or_notify_cancel():
                return
        if ok:
            future.set_result(value)
        else:
            if isinstance(value, MaybeEncodingError) and value.original is not None:
                value = value.original  # as the stdlib's executor: the result's own pickling error
            if isinstance(value, BrokenPoolError) and not isinstance(value, BrokenProcessPool):
                broken = BrokenProcessPool(str(value))
                broken.__cause__ = value.__cause__ or value
                value = broken
            cause = value.__cause__
            if type(cause) is RemoteTraceback:
                # the worker's traceback, as the stdlib's executor chains it (code checks the class)
                value.__cause__ = _StdRemoteTraceback(cause.tb)  # type: ignore[arg-type]  # typeshed: it takes the text
            future.set_exception(value)


class _LoggedInitializer:
    """The initializer, run in a worker: if it raises, the worker logs it on the ``concurrent.futures``
    logger (CRITICAL, with the traceback) before the executor breaks, as the stdlib's worker does."""

    __slots__ = ("func",)

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func

    def __call__(self, *args: Any) -> Any:
        try:
            return self.func(*args)
        except BaseException:
            logging.getLogger("concurrent.futures").critical("Exception in initializer:", exc_info=True)
            raise


class _CallQueue:
    """What ``executor._call_queue`` is to code written for the stdlib's executor: a view of the tasks
    not yet handed to a worker.  ``join_thread()`` waits for the thread that feeds the workers (the
    engine's supervisor) to end, which it does once the executor is shut down and its workers have
    exited; before ``shutdown()`` it raises, as the stdlib's queue does before ``close()``."""

    __slots__ = ("_engine",)

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def qsize(self) -> int:
        return len(self._engine._pending)

    def empty(self) -> bool:
        return not self._engine._pending

    def close(self) -> None:
        """Nothing to release here: the executor's ``shutdown()`` closes the channels to the workers."""

    def join_thread(self) -> None:
        if self._engine.state == "running":
            raise AssertionError("the executor is not shut down: its call queue's thread runs on")
        self._engine.join()


class ProcessPoolExecutor(Executor):
    """``concurrent.futures.ProcessPoolExecutor`` on gilfree's workers.

    ``max_workers`` defaults to the CPUs this process may use; ``mp_context`` is a gilfree (or
    stdlib-named) context or start-method name.  Beyond the stdlib's arguments: ``on_worker_death``
    (``"break"``, the stdlib's behaviour and the default here; ``"fail"``, ``"retry"``), ``retries``,
    ``task_timeout``, ``max_memory_per_child``, as on :class:`gilfree.Pool`; ``backend="ray"``/``"dask"`` and ``address`` run the futures on a
    cluster (see :mod:`gilfree.backends`).
    """

    def __init__(self, max_workers: int | None = None, mp_context: Any = None,
                 initializer: Callable[..., Any] | None = None, initargs: Iterable[Any] = (), *,
                 max_tasks_per_child: int | None = None, on_worker_death: str = "break", retries: int = 0,
                 task_timeout: float | None = None, max_memory_per_child: int | None = None,
                 backend: str | None = None, address: str | None = None) -> None:

        if max_workers is None and backend is None:
            max_workers = _default_workers()
        elif max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int) or max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
            if mp_context is None and backend is None:
                # as the stdlib (3.11+): a worker replaced while the executor's threads run is not forked
                mp_context = "spawn"
        if task_timeout is not None and task_timeout <= 0:
            raise ValueError(f"task_timeout={task_timeout}: give seconds > 0 or None")
        _workers.check_policy(on_worker_death, retries)
        ctx = as_context(mp_context)
        if max_tasks_per_child is not None and backend is None and ctx.get_start_method() == "fork":
            raise ValueError("max_tasks_per_child is incompatible with the 'fork' start method (a replacement "
                             "worker would be forked from a process running threads); give another mp_context")
        self._max_workers = max_workers
        self._options: dict[str, Any] = {"policy": on_worker_death, "retries": retries, "timeout": task_timeout}
        if backend is None:
            if address is not None:
                raise ValueError(f"address={address!r} needs backend='ray' or backend='dask'")
            if initializer is not None:
                initializer = _LoggedInitializer(initializer)
            # as the stdlib's: under fork every worker starts now (forking later, from a process running
            # threads, is unsafe); under spawn and forkserver a worker starts when a task finds none idle
            self._engine: Any = Engine(max_workers or 1, ctx, initializer, initargs, max_tasks_per_child,
                                       max_memory_per_child, name="ProcessPoolExecutor",
                                       on_demand=ctx.get_start_method() != "fork")
            # a worker that dies idle breaks the executor too, as the stdlib's does
            self._engine.break_on_idle_death = on_worker_death == "break"
        else:  # a cluster engine: an optional dependency (ray, dask), imported only when asked for
            from .backends import open_engine

            self._engine = open_engine(backend, address, max_workers, initializer, initargs, max_tasks_per_child,
                                       max_memory_per_child, name="ProcessPoolExecutor")
            self._max_workers = self._engine.processes
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._futures: weakref.WeakSet[Future[Any]] = weakref.WeakSet()
        _live.add(self)
        weakref.finalize(self, _abandon, self._engine)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} max_workers={self._max_workers} state={self._engine.state}>"

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Schedule ``fn(*args, **kwargs)``; return its Future."""
        with self._shutdown_lock:
            self._check_open()
            future: Future[Any] = Future()
            task = Task(_FutureJob(future), 0, CALL, Function(fn), args, kwargs or None, 1, **self._options)
            self._futures.add(future)
            self._engine.submit([task])
            return future

    # -- the stdlib executor's private attributes that code (and CPython's own tests) read ------------
    @property
    def _processes(self) -> dict[int, Any]:
        """pid -> the worker's process (``join``, ``terminate``, ``kill``, ``is_alive``, ``exitcode``), as
        the stdlib's executor keeps them; a snapshot (workers come and go), taken once the workers the
        tasks submitted so far need have started."""
        self._settle()
        workers = list(getattr(self._engine, "_workers", ()))
        # the engine never closes these objects: they stay usable after the worker left (the stdlib's do)
        return {w.pid: w.process for w in workers if w.process is not None and w.pid is not None}

    @property
    def _call_queue(self) -> _CallQueue:
        """The tasks not yet handed to a worker (see :class:`_CallQueue`)."""
        return _CallQueue(self._engine)

    @property
    def _broken(self) -> str | bool:
        """False, or why the executor broke (the stdlib keeps the reason there)."""
        broken = self._engine.broken
        return False if broken is None else str(broken)

    @property
    def _mp_context(self) -> Any:
        return getattr(self._engine, "_ctx", None)

    @property
    def _executor_manager_thread(self) -> threading.Thread | None:
        """The thread that sends tasks and collects results (the engine's supervisor)."""
        return getattr(self._engine, "_thread", None)

    def _check_open(self) -> None:
        """Raise what a submission now gets: the pool broke, the interpreter is exiting, or shutdown."""
        if self._engine.broken is not None:
            raise BrokenProcessPool(str(self._engine.broken))
        if _interpreter_exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """``map(fn, *iterables)`` in the workers; results in order, each within ``timeout`` of the call."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end = None if timeout is None else time.monotonic() + timeout
        function = Function(fn)
        futures: list[Future[Any]] = []
        tasks = []
        args = zip(*iterables)
        with self._shutdown_lock:
            self._check_open()
            for index in itertools.count():
                chunk = list(itertools.islice(args, chunksize))
                if not chunk:
                    break
                future: Future[Any] = Future()
                futures.append(future)
                tasks.append(Task(_FutureJob(future), index, STARMAP, function, chunk, None, len(chunk),
                                  **self._options))
            self._futures.update(futures)
            self._engine.submit(tasks)
        return self._results(futures, end)

    @staticmethod
    def _results(futures: list[Future[Any]], end: float | None) -> Iterator[Any]:
        try:
            futures.reverse()
            while futures:
                future = futures[-1]
                try:
                    chunk = future.result(None if end is None else max(0.0, end - time.monotonic()))
                except FuturesTimeoutError:
                    raise FuturesTimeoutError() from None
                futures.pop()
                del future
                # hand each result over and keep no reference to it (the future holds this same list):
                # a result the caller drops is freed at once, as with the stdlib
                chunk.reverse()
                while chunk:
                    yield chunk.pop()
        finally:
            for future in futures:
                future.cancel()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submissions; with ``cancel_futures``, pending futures are cancelled; with
        ``wait``, return once the workers have exited."""
        if cancel_futures:
            # what a free worker could take has been handed to it (RUNNING, it runs), as the stdlib's
            # call queue holds a few; the rest is cancelled
            self._settle()
        with self._shutdown_lock:
            self._shutdown = True
            if cancel_futures:
                for future in list(self._futures):
                    future.cancel()
        self._engine.close()
        _live.discard(self)
        if wait:
            self._engine.join()

    def _settle(self) -> None:
        settle = getattr(self._engine, "settle", None)
        if settle is not None and self._engine.state == "running":
            settle(5.0)

    @property
    def pids(self) -> list[int]:
        """The pids of the current worker processes (gilfree's), once the workers the tasks submitted
        so far need have started."""
        self._settle()
        return self._engine.pids()
