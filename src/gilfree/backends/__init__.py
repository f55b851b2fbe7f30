"""Scale-out engines: the same ``Pool`` and ``ProcessPoolExecutor`` on a Ray or Dask cluster (layer L9).

::

    caller threads                 dispatcher thread (one per engine)            the cluster
    --------------                 ----------------------------------            -----------
    Pool.map / imap / apply_async
      └─ engine.submit(tasks) ─> pending ─┐
                        events.put(WAKE) ─┤ events.get()  (blocks: no timer)
                                          ├─ launch: up to `processes` tasks in flight ──> remote
                                          │    backend.launch(task, payload)                 worker:
                                          │    (function: in the object store once per call)  _task.execute
                                          │                                                   │
          cluster's callback thread: ─────┤ events.put((DONE, record, ok, outcome bytes)) <───┘
          future done -> fetch result     │
                                          ├─ unpickle (status, value, seconds, pid) ──> task.job._done(...)
                                          │    AsyncResult / imap iterator / Future, callbacks run here
                                          └─ terminate: cancel what runs (Ray: force=True kills the
                                               worker), fail the rest with BrokenPoolError

The actors:

* **Caller threads** build :class:`~gilfree._workers.Task` objects (the pool code is the local
  pool's, unchanged) and :meth:`ClusterEngine.submit` them: an append under a lock and a wake-up
  event.  They never talk to the cluster.
* **The dispatcher thread** owns every call to the cluster client after start-up.  It keeps at most
  ``processes`` tasks in flight, calls ``task.job._start`` just before launching one (a cancelled
  future is dropped), and hands each outcome to ``task.job._done`` exactly once, so callbacks run
  here, in completion order, as on the local pool's supervisor thread: they should return quickly.
  It blocks on its event queue only; nothing polls.
* **The cluster client's callback thread** (Ray's future callbacks, Dask's ``add_done_callback``
  thread) fetches a finished task's outcome bytes and posts them as an event.
* **Remote workers** run :func:`gilfree.backends._task.execute`: the initializer once per process,
  the function unpickled once per process, the arguments unpickled from gilfree's own pickle (so
  numpy arrays are writable), the outcome pickled back with the remote traceback.

What a backend provides (:class:`Backend`): ``connect`` (start a local cluster or join one),
``put_function`` (the pickled function into the object store, once per :class:`Function`),
``launch`` (one remote call, with a done callback), ``cancel`` and ``disconnect``.  Ray and Dask
live in :mod:`gilfree.backends.ray` and :mod:`gilfree.backends.dask`, imported only when asked for:
both are optional dependencies (``pip install 'gilfree[ray]'`` / ``'gilfree[dask]'``).
"""

from __future__ import annotations

import collections
import importlib
import queue
import sys
import threading
import traceback
import uuid

from .. import reduction, util
from .._errors import BrokenPoolError
from .._workers import EngineBase, Task
from . import _task

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Iterable

__all__ = ["BACKENDS", "ClusterEngine", "Backend", "open_engine", "require", "dumps"]

#: Backend names, and the extra that installs each.
BACKENDS = {"ray": "ray", "dask": "dask"}
#: Pickled functions an engine keeps in the cluster's object store; the least recently used goes.
FUNCTION_CACHE = 64

_WAKE, _DONE = 0, 1


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` for a cluster worker (caller's side).

    gilfree's pickler refers to functions and classes of an importable ``__main__`` by name, which a
    local worker can import again; a cluster worker runs another program (Ray's or Dask's worker), so
    a pickle that mentions ``__main__`` is made again by value (cloudpickle).  A false alarm (user
    bytes that contain the word) only costs the slower pickler.
    """
    data = reduction.dumps(obj)
    if b"__main__" in data:
        import cloudpickle

        data = cloudpickle.dumps(obj, protocol=5)
    return data


def require(module: str, backend: str) -> Any:
    """Import an optional dependency of a backend, or raise an ImportError that names the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"backend={backend!r} needs {module!r}, which is not installed ({exc}); "
            f"install it with: pip install 'gilfree[{BACKENDS[backend]}]'"
        ) from exc


def open_engine(backend: str, address: str | None, processes: int | None, initializer: Any = None,
                initargs: Iterable[Any] = (), maxtasksperchild: int | None = None,
                max_memory_per_child: int | None = None, name: str = "Pool") -> ClusterEngine:
    """The engine of ``Pool(backend=...)`` / ``ProcessPoolExecutor(backend=...)``.

    Runs in the caller's thread and blocks until the cluster is reachable (a local cluster is started
    when ``address`` is None).  Raises ValueError for an unknown backend or an option the backends do
    not support, ImportError (naming the extra to install) when the engine's library is missing.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {', '.join(map(repr, BACKENDS))}, or None "
                         f"for local worker processes")
    if max_memory_per_child is not None:
        raise ValueError(f"max_memory_per_child={max_memory_per_child} is not supported with backend="
                         f"{backend!r}: the cluster manages its workers' memory (Ray: its memory monitor; Dask: "
                         f"`dask worker --memory-limit`)")
    module = importlib.import_module(f"{__name__}.{backend}")
    return ClusterEngine(module.make_backend(address, maxtasksperchild), processes, initializer, initargs,
                         maxtasksperchild, name)


class Backend:
    """What a cluster engine needs from Ray or Dask (one instance per engine).

    Every method but :meth:`connect` runs on the engine's dispatcher thread.  ``launch`` must not
    block on the task: it returns a handle at once and arranges for ``done(handle, ok, data)`` to be
    called (from any thread) exactly once, with the outcome bytes (``ok``) or the exception the
    cluster raised for the task (a worker crash, a cancellation).
    """

    name = "?"
    #: True if connect() started a cluster that disconnect() stops.
    owns_cluster = False

    def connect(self, processes: int | None) -> int:
        """Start or join the cluster (caller's thread; blocks); return the number of tasks in flight."""
        raise NotImplementedError

    def put_function(self, pickled: bytes) -> Any:
        """Put a pickled function into the object store; the handle tasks refer to it by."""
        raise NotImplementedError

    def put_initializer(self, pickled: bytes) -> Any:
        return self.put_function(pickled)

    def launch(self, key: str, fid: int, function: Any, init: Any, kind: int, payload: bytes, retries: int,
               done: Callable[[Any, bool, Any], None]) -> Any:
        raise NotImplementedError

    def cancel(self, handles: list[Any]) -> None:
        """Stop these tasks, running ones included, as far as the engine can."""
        raise NotImplementedError

    def disconnect(self) -> None:
        """Leave the cluster (stop it if connect() started it).  Never raises."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class _Record:
    """A task in flight: the engine task and the backend's handle."""

    __slots__ = ("task", "handle")

    def __init__(self, task: Task) -> None:
        self.task = task
        self.handle: Any = None


class ClusterEngine(EngineBase):
    """The local engine's interface (``submit``, ``close``, ``terminate``, ``join``, ``state``,
    ``broken``, ``pids``) over a Ray or Dask cluster.  Thread-safe: :meth:`submit`, :meth:`close`
    and :meth:`terminate` may be called from any thread and never block on the cluster.
    """

    def __init__(self, backend: Backend, processes: int | None, initializer: Any = None,
                 initargs: Iterable[Any] = (), maxtasksperchild: int | None = None, name: str = "Pool") -> None:
        self._backend = backend
        self._name = name
        self._key = uuid.uuid4().hex  # names this engine's functions and initializer in remote workers
        self._maxtasks = maxtasksperchild
        self._lock = threading.Lock()
        self._state = "running"  # -> "closing" -> "closed", or "terminating" -> "closed"
        self._broken: BaseException | None = None
        self._pending: collections.deque[Task] = collections.deque()
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._inflight: dict[int, _Record] = {}
        self._functions: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._launched = 0
        self._finished = threading.Event()
        init_pickled = None
        if initializer is not None:
            init_pickled = dumps((initializer, tuple(initargs)))  # fails here, in the caller
        self.processes = backend.connect(processes)  # blocks: starts or joins the cluster
        try:
            self._init = None if init_pickled is None else backend.put_initializer(init_pickled)
        except BaseException:
            backend.disconnect()
            raise
        self._thread = threading.Thread(target=self._run, name=f"gilfree-{name}-{backend.name}-dispatcher",
                                        daemon=True)
        self._thread.start()

    # -- the local engine's API (caller threads): submit/close/terminate/join from EngineBase ------
    def _wake(self) -> None:
        self._events.put((_WAKE,))

    def _check_task(self, task: Task) -> None:
        if task.timeout is not None:
            raise ValueError(f"task_timeout={task.timeout} is not supported with backend="
                             f"{self._backend.name!r}; leave it None")

    @property
    def backend(self) -> Backend:
        return self._backend

    def pids(self) -> list[int]:
        """Always empty: the workers are the cluster's processes, possibly on other machines."""
        return []

    def __repr__(self) -> str:
        return (f"<ClusterEngine {self._name} on {self._backend.describe()} state={self._state} "
                f"processes={self.processes} inflight={len(self._inflight)} pending={len(self._pending)} "
                f"launched={self._launched}>")

    # -- the dispatcher thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # pragma: no cover - a bug here must not hang the callers
            util.sub_warning("cluster engine dispatcher failed: %r", exc)
            self._break(BrokenPoolError(f"the pool's dispatcher thread failed: {exc!r}"), cause=exc)
        finally:
            self._functions.clear()
            self._init = None
            self._backend.disconnect()
            with self._lock:
                self._state = "closed"
            self._finished.set()

    def _loop(self) -> None:
        events = self._events
        while True:
            batch = [events.get()]
            try:
                while True:
                    batch.append(events.get_nowait())
            except queue.Empty:
                pass
            for event in batch:
                if event[0] == _DONE:
                    self._outcome(*event[1:])
            if self._state == "terminating":
                self._break(BrokenPoolError("the pool was terminated before this task finished"))
                return
            self._launch_pending()
            if self._state == "closing" and not self._pending and not self._inflight:
                return

    def _launch_pending(self) -> None:
        while len(self._inflight) < self.processes:
            with self._lock:
                if not self._pending:
                    return
                task = self._pending.popleft()
            if not task.job._start(task):
                continue  # a cancelled future
            record = _Record(task)
            try:
                function = self._function_handle(task)
                payload = dumps((task.args, task.kwargs))
            except Exception as exc:  # an argument cannot be pickled: only this task fails
                self._finish(task, False, exc)
                continue
            retries = task.retries if task.policy == "retry" else 0
            self._inflight[task.tid] = record

            def done(handle: Any, ok: bool, data: Any, record: _Record = record) -> None:
                self._events.put((_DONE, record, ok, data))  # any thread: the cluster client's

            try:
                record.handle = self._backend.launch(self._key, task.function.fid, function, self._init,
                                                     task.kind, payload, retries, done)
            except Exception as exc:  # the cluster went away, or refused the task
                del self._inflight[task.tid]
                self._finish(task, False, exc)
                self._break(BrokenPoolError(f"{self._backend.describe()} refused a task: {exc!r}"), cause=exc)
                return
            self._launched += 1

    def _function_handle(self, task: Task) -> Any:
        function = task.function
        handle = self._functions.get(function.fid)
        if handle is None:
            pickled = function.pickled
            assert pickled is not None
            if b"__main__" in pickled:
                pickled = dumps(function.func)
            handle = self._functions[function.fid] = self._backend.put_function(pickled)
            while len(self._functions) > FUNCTION_CACHE:
                self._functions.popitem(last=False)  # tasks in flight keep their own reference
        else:
            self._functions.move_to_end(function.fid)
        return handle

    def _outcome(self, record: _Record, ok: bool, data: Any) -> None:
        task = record.task
        if self._inflight.pop(task.tid, None) is None:
            return  # already failed (terminate)
        if not ok:  # the cluster failed the task: a worker crash, a cancellation
            if task.policy == "break":
                self._finish(task, False, data)
                self._break(BrokenPoolError(f"a task failed in the cluster under on_worker_death='break': "
                                            f"{data!r}"), cause=data)
            else:
                self._finish(task, False, data)
            return
        try:
            status, value, elapsed, _pid = reduction.loads(data)
        except Exception as exc:  # a result that cannot be unpickled here
            self._finish(task, False, exc)
            return
        task.elapsed = elapsed
        if status == _task.INIT_FAILED:
            self._finish(task, False, value)
            self._break(BrokenPoolError(
                f"the pool's initializer raised {type(value).__name__}: {value}; no task can run"
            ), cause=value)
            return
        self._finish(task, status == _task.OK, value)

    def _finish(self, task: Task, ok: bool, value: Any) -> None:
        try:
            task.job._done(task, ok, value)
        except Exception as exc:  # a callback raised: report it, keep the pool alive
            util.sub_warning("pool: result callback raised %r", exc)
            sys.stderr.write(f"gilfree: a callback of {task.describe()} raised:\n")
            traceback.print_exception(type(exc), exc, exc.__traceback__)

    def _cancel(self, records: Iterable[_Record]) -> None:
        handles = [r.handle for r in records if r.handle is not None]
        if handles:
            try:
                self._backend.cancel(handles)
            except Exception as exc:  # the cluster is gone: nothing runs there any more
                util.sub_warning("pool: cancelling %d tasks failed: %r", len(handles), exc)

    def _break(self, error: BaseException, cause: BaseException | None = None) -> None:
        """Cancel what is in flight and fail every unfinished task with ``error``; from now on
        submitted tasks fail at once (dispatcher thread)."""
        if cause is not None and error.__cause__ is None:
            error.__cause__ = cause
        with self._lock:
            if self._broken is None:
                self._broken = error
            pending = list(self._pending)
            self._pending.clear()
        records = list(self._inflight.values())
        self._inflight.clear()
        self._cancel(records)
        for task in [r.task for r in records] + pending:
            self._finish(task, False, self._broken)
