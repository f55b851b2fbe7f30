"""The one worker engine under ``Pool``, ``ThreadPool`` and ``ProcessPoolExecutor`` (layer L6).

::

    caller threads               supervisor thread (one per engine)              workers
    --------------               ----------------------------------              -------
    submit(tasks) ─> pending ─┐
                   wake pipe ─┤ poll(wake, conn 1..n, sentinel 1..n; next deadline)
                              ├─ dispatch ── conn_i.send((tid, fn?, kind, args)) ──> worker i: recv,
                              │    (up to `depth` tasks per worker, FIFO; on_demand   run, send result
                              │    engines -- the executor under spawn/forkserver --
                              │    first start a worker per task that finds none idle,
                              │    and give a busy worker nothing while they can grow)
                              ├─ results <── conn_i.recv() <── (tid, ok, value) ────┘
                              │    └─> task.job._done(task, ok, value): AsyncResult, callbacks
                              ├─ sentinel_i ready: worker i died.  Its running task fails with
                              │    WorkerLostError (or is retried, or breaks the pool); the tasks
                              │    queued behind it go back to the front of `pending`; a new
                              │    worker takes its place (on_demand: when a task needs one).
                              └─ deadlines: a task past its task_timeout: SIGKILL its worker,
                                   fail the task with TaskTimeoutError.

    progress slots (shared memory, 3 x int64 per worker): [task id, item, start ns], written by
    the worker as it starts each task and each item of a chunk; read by the supervisor to know
    exactly what a dead or overdue worker was running.

The actors:

* **Caller threads** (``Pool.map``, ``apply_async``, ``Executor.submit``...) build :class:`Task`
  objects and :meth:`Engine.submit` them: an append to a deque and one byte on the wake pipe.
  They never touch a worker.  The function is pickled once per call in the caller (so an error in
  pickling it surfaces in the result at once), and sent to each worker once, not with every task.
* **The supervisor thread** owns every worker and all engine state.  It blocks in ``poll`` on
  every worker's connection and process sentinel (a pidfd) plus the wake pipe: it never polls on
  a timer, except the deadline of the earliest ``task_timeout``.  Results are handed to the task's
  *job* (an ``AsyncResult``, an ``imap`` iterator, a ``Future``), whose callbacks run on this
  thread, as in the stdlib's result-handler thread: they should return quickly.
* **Workers** (processes, or threads for ``ThreadPool``) run :func:`_serve`: receive a task, run
  it, send back ``(task id, ok, value)``.  A result or exception that cannot be pickled comes back
  as :class:`MaybeEncodingError`; a ``BaseException`` fails the task and the worker goes on.
  Process workers ignore SIGINT, so Ctrl-C reaches only the caller (who then stops the pool).
  Large buffers (numpy arrays, bytes) in tasks and results travel as memfds (see
  ``Connection._shm_min``), not through the socket.

How it follows known designs.  The stdlib's ``multiprocessing.pool`` has three handler threads
and one shared task queue, so it cannot tell which task a dead worker held (it hangs); loky and
``concurrent.futures`` break the whole pool on a death.  Here each worker has its own duplex
connection and a FIFO of the tasks sent to it, so the supervisor knows what each holds, and a death
costs exactly one task.  ``depth`` tasks may be queued in a worker (prefetch) so tiny tasks never
leave it idle waiting for the supervisor; the slot says which of them was running.
"""

from __future__ import annotations

import collections
import itertools
import os
import select
import signal
import sys
import threading
import time
import traceback

from . import _crash, connection, reduction, util
from ._errors import BrokenPoolError, MaybeEncodingError, TaskTimeoutError, WorkerLostError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Iterable

__all__ = ["Engine", "EngineBase", "Task", "Function", "RemoteTraceback", "POLICIES"]

#: What happens to a task whose worker died: fail it, run it again (``retries`` times), or break the pool.
POLICIES = ("fail", "retry", "break")
#: Large buffers in tasks and results go through memfds from this size on.
SHM_MIN = 1 << 20
#: Tasks queued in one worker when tasks are long, and when they are short (under SHORT_TASK s).
DEPTH_LONG = 2
DEPTH_SHORT = 8
SHORT_TASK = 0.002
#: Functions a worker keeps unpickled; the oldest is dropped beyond this.
FUNCTION_CACHE = 64
#: Workers that die before finishing a task, one after another, before the pool is declared broken.
MAX_START_FAILURES = 3
#: Seconds a worker that hung up (closed its connection) without being told to stop has to end
#: before it is killed.
HANG_UP_GRACE = 1.0
#: how long a worker that is exiting (max tasks reached, or stopped) still counts toward the size of a
#: pool that starts workers on demand (the executor): its replacement waits for it to go, but not
#: forever (one kept alive by a non-daemonic thread)
EXIT_GRACE = 5.0

# kinds of task: a call; a chunk that fails at its first error (map); a chunk whose items fail
# one by one (imap: a failed item comes back as a Failure in the list, the others as values)
CALL, MAP, STARMAP, EACH, STAREACH = 0, 1, 2, 3, 4
_STAR = (STARMAP, STAREACH)
_SLOT_WORDS = 4  # [task id, item, start ns, phase]
_IDLE = -1
_RUNNING, _SENDING = 0, 1  # phase: running the task, or pickling and sending its result
_RECHECK = 20_000_000  # ns: how soon to look again at a timed task its worker has not started yet


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, chained as its ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _rebuild_remote(exc: BaseException, tb: str) -> BaseException:
    exc.__cause__ = RemoteTraceback(tb)
    return exc


class _RemoteException:
    """An exception pickled with its traceback's text; unpickles to the exception itself."""

    __slots__ = ("exc", "tb")

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.tb = '\n"""\n' + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) + '"""'

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _rebuild_remote, (self.exc, self.tb)


class Failure:
    """An item of an ``EACH`` chunk that raised: its exception (with the remote traceback)."""

    __slots__ = ("exc",)

    def __init__(self, exc: Any) -> None:
        self.exc = exc

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return Failure, (self.exc,)

    def __repr__(self) -> str:
        return f"<Failure {self.exc!r}>"


class Function:
    """A function submitted to the engine: pickled once, sent to each worker once."""

    __slots__ = ("fid", "func", "pickled", "error")
    _ids = itertools.count(1)

    def __init__(self, func: Callable[..., Any], pickle_it: bool = True) -> None:
        self.fid = next(self._ids)
        self.func = func
        self.pickled: bytes | None = None
        self.error: BaseException | None = None
        if pickle_it:
            try:
                self.pickled = reduction.dumps(func)
            except Exception as exc:  # reported through the tasks' results, as the stdlib does
                self.error = exc

    def __repr__(self) -> str:
        return f"<Function {self.fid} {getattr(self.func, '__qualname__', self.func)!r}>"


class Task:
    """One unit of work for one worker: a call, or a chunk of a map.

    ``job`` receives the outcome: ``job._done(task, ok, value)`` on the supervisor thread, where
    ``value`` is the result (CALL), the list of results (MAP, STARMAP) or the exception.
    ``job._start(task)`` is asked just before sending; ``False`` (a cancelled future) drops it.
    """

    __slots__ = ("tid", "job", "index", "kind", "function", "args", "kwargs", "size",
                 "policy", "retries", "timeout", "attempt", "worker", "elapsed", "nbytes")
    _ids = itertools.count()

    def __init__(self, job: Any, index: int, kind: int, function: Function, args: Any, kwargs: Any = None,
                 size: int = 1, policy: str = "fail", retries: int = 0, timeout: float | None = None) -> None:
        self.tid = next(self._ids)
        self.job = job
        self.index = index
        self.kind = kind
        self.function = function
        self.args = args
        self.kwargs = kwargs
        self.size = size
        self.policy = policy
        self.retries = retries
        self.timeout = timeout
        self.attempt = 1
        self.worker: _Worker | None = None
        self.elapsed = 0.0  # seconds the worker spent on it
        self.nbytes = 0  # bytes its result took on the way back (0: not known, or a thread pool)

    def describe(self) -> str:
        name = getattr(self.function.func, "__qualname__", None) or repr(self.function.func)
        if self.kind == CALL:
            return f"task {self.tid} ({name})"
        return f"task {self.tid} ({name} over a chunk of {self.size})"

    def __repr__(self) -> str:
        return f"<Task {self.tid} kind={self.kind} size={self.size} attempt={self.attempt}>"


def check_policy(policy: str, retries: int) -> None:
    if policy not in POLICIES:
        raise ValueError(f"on_worker_death={policy!r}: choose one of {', '.join(map(repr, POLICIES))}")
    if retries < 0:
        raise ValueError(f"retries={retries} is negative")


# --------------------------------------------------------------------------------------------------
# The worker side


def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _serve(recv: Callable[[], Any], send: Callable[[Any], None], slot: Any, initializer: Any, initargs: Any,
           max_memory: int | None, in_process: bool) -> None:
    """A worker's loop: run tasks until told to stop (``None``) or the supervisor goes away.

    Runs in a worker process (``in_process``) or a ThreadPool thread.  A message in is a list of
    tasks ``(tid, fid, function-or-pickle-or-None, drop, kind, args, kwargs, per_item)``, run in
    order; each result goes out as soon as it is ready: ``(tid, ok, value, over_memory, seconds)``.
    ``("init", exception)`` goes out once if the initializer raised.  ``per_item``: record the start
    of every item of a chunk in the slot (a task_timeout needs it; it costs ~0.1 us per item).
    """
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException as exc:
            send(("init", _RemoteException(exc) if in_process else exc))
            return
    functions: dict[int, Any] = {}
    monotonic_ns = time.monotonic_ns
    while True:
        try:
            batch = recv()
        except (EOFError, OSError):
            return  # the pool is gone
        if batch is None:
            return
        batch.reverse()
        while batch:
            if _crash.on:
                _crash.hit("pool.worker.received")  # tasks in hand, none started: they go elsewhere
            tid, fid, fdef, drop, kind, args, kwargs, per_item = batch.pop()
            for old in drop:
                functions.pop(old, None)
            start = slot[2] = monotonic_ns()
            slot[1] = 0
            slot[3] = _RUNNING
            slot[0] = tid
            if _crash.on:
                _crash.hit("pool.worker.started")  # the slot names the task: it fails (or runs again)
            try:
                if fdef is not None:
                    functions[fid] = _load_function(fdef) if in_process else fdef
                func = functions[fid]
                if kind == CALL:
                    value = func(*args, **(kwargs or {}))
                elif kind < EACH and not per_item:
                    value = list(itertools.starmap(func, args) if kind == STARMAP else map(func, args))
                else:
                    value = _run_items(func, args, kind, slot, per_item, in_process)
                ok = True
            except BaseException as exc:  # a BaseException fails the task, not the worker
                value = _RemoteException(exc) if in_process else exc
                ok = False
                del exc
            slot[3] = _SENDING  # a death from here on is one while sending the result: the task ran
            if _crash.on:
                _crash.hit("pool.worker.returned")  # it ran; its result is lost: it fails, once
            del args, kwargs, fdef  # let large arguments go before the result is sent
            over = max_memory is not None and _rss_bytes() > max_memory
            elapsed = (monotonic_ns() - start) / 1e9
            try:
                send((tid, ok, value, over, elapsed))
            except (EOFError, BrokenPipeError, ConnectionResetError):
                return  # the pool is gone
            except BaseException as exc:  # the result cannot be pickled (or its __reduce__ exits): say so
                if ok and kind >= EACH and type(value) is list:  # an imap chunk: only the bad items fail
                    send((tid, True, _encodable_items(value), over, elapsed))
                else:
                    error = MaybeEncodingError(exc, value.exc if isinstance(value, _RemoteException) else value)
                    error.original = _if_picklable(exc)
                    send((tid, False, _RemoteException(error), over, elapsed))
            if _crash.on:
                _crash.hit("pool.worker.sent")  # the result is out: it counts; only the worker is replaced
            slot[0] = _IDLE
            del value


def _if_picklable(exc: BaseException) -> BaseException | None:
    """``exc`` if it can travel back to the caller and be rebuilt there (its traceback stays here),
    else None."""
    try:
        reduction.loads(reduction.dumps(exc))
    except BaseException:
        return None
    return exc


def _encodable_items(values: list[Any]) -> list[Any]:
    """An imap chunk's results with each one that cannot be pickled replaced by its failure, so the
    others still arrive (the stdlib's imap fails only that item)."""
    out = []
    for value in values:
        try:
            reduction.dumps(value)
        except BaseException as exc:  # a __reduce__ that exits fails its item, as any other
            value = Failure(_RemoteException(MaybeEncodingError(exc, value)))
        out.append(value)
    return out


class _Unloadable:
    """Stands for a function the worker could not unpickle: every task with it fails the same way."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error


def _load_function(pickled: bytes) -> Any:
    try:
        return reduction.loads(pickled)
    except Exception as exc:
        error = RuntimeError(f"the worker (pid {os.getpid()}) could not unpickle the function: "
                             f"{type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return _Unloadable(error)


def _run_items(func: Callable[..., Any], items: list[Any], kind: int, slot: Any, per_item: bool,
               in_process: bool) -> list[Any]:
    """A chunk item by item: with each item's start in the slot, and (EACH kinds) per-item failures."""
    monotonic_ns = time.monotonic_ns
    star = kind in _STAR
    each = kind >= EACH
    value: list[Any] = []
    for i, item in enumerate(items):
        if i and per_item:
            slot[2] = monotonic_ns()
            slot[1] = i
        if _crash.on:
            _crash.hit("pool.worker.item")  # item i of a chunk: an imap chunk loses only this item
        if not each:
            value.append(func(*item) if star else func(item))
            continue
        try:
            value.append(func(*item) if star else func(item))
        except BaseException as exc:
            value.append(Failure(_RemoteException(exc) if in_process else exc))
            del exc
    return value


def _worker_main(conn: connection.Connection, slot_block: Any, index: int, initializer: Any, initargs: Any,
                 max_memory: int | None) -> None:
    """The target of a worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's: it stops the pool
    conn._shm_min = SHM_MIN
    view = slot_block.memoryview().cast("q")
    slot = view[index * _SLOT_WORDS : (index + 1) * _SLOT_WORDS]
    try:
        _serve(conn.recv, conn.send, slot, initializer, initargs, max_memory, True)
    finally:
        slot.release()
        view.release()
        conn.close()


# --------------------------------------------------------------------------------------------------
# The supervisor side


class _Parts:
    """The job of the pieces of an imap chunk that was cut up after a death (see ``Engine._cut``):
    collects their results and gives the chunk's job the whole list, as if the chunk had run."""

    __slots__ = ("task", "values", "left", "failed")

    def __init__(self, task: Task) -> None:
        self.task = task
        self.values: list[Any] = [None] * task.size
        self.left = 0
        self.failed = False

    def _start(self, piece: Task) -> bool:
        return not self.failed

    def _done(self, piece: Task, ok: bool, value: Any) -> None:
        if self.failed:
            return
        if not ok:  # not an item's failure (those come as Failure values): the pool broke
            self.failed = True
            self.task.job._done(self.task, False, value)
            return
        self.values[piece.index : piece.index + len(value)] = value
        self.task.elapsed += piece.elapsed
        self.task.nbytes += piece.nbytes
        self.left -= 1
        if self.left == 0:
            self.complete()

    def complete(self) -> None:
        task = self.task
        task.job._done(task, True, self.values)


class _Worker:
    """The supervisor's record of one worker (process or thread)."""

    __slots__ = ("number", "index", "process", "conn", "outbox", "reader", "polling", "sentinel", "inbox", "thread", "inflight",
                 "functions", "sent", "done", "retiring", "stopping", "killed_for", "ended", "short", "pid",
                 "hung_up")

    def __init__(self, number: int, index: int) -> None:
        self.number = number
        self.index = index  # its progress slot
        self.process: Any = None
        self.conn: connection.Connection | None = None
        self.outbox: connection.Outbox | None = None  # messages not yet written (never a blocking send)
        self.reader: connection.Inbox | None = None  # large messages, read as they arrive
        self.polling = 0  # the events its connection is polled for
        self.sentinel: int | None = None
        self.inbox: Any = None  # ThreadPool: the worker thread's queue
        self.thread: threading.Thread | None = None
        self.inflight: collections.deque[Task] = collections.deque()
        self.functions: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.sent = 0  # tasks sent (maxtasksperchild counts these)
        self.done = 0
        self.retiring = False  # sends no more tasks; stops when its queue is empty
        self.stopping = False  # was told to stop
        self.killed_for: TaskTimeoutError | None = None
        self.ended = False
        self.short = False  # its recent tasks were short: queue more of them
        self.pid: int | None = None
        self.hung_up: int | None = None  # when (ns) it closed its end of the connection

    def __repr__(self) -> str:
        state = "stopping" if self.stopping else ("retiring" if self.retiring else "running")
        return f"<worker {self.number} pid={self.pid} {state} inflight={len(self.inflight)} done={self.done}>"


class EngineBase:
    """What every engine shares with its callers: submit, close, terminate, join, state, broken.

    Subclasses set ``_lock``, ``_state``, ``_broken``, ``_pending``, ``_finished``, ``_name`` and
    ``_thread`` (the one thread that runs their loop) and define ``_wake()``; ``_check_task`` may refuse
    a task.  The local :class:`Engine` and the cluster engines of :mod:`gilfree.backends` are both this.
    """

    _lock: threading.Lock
    _state: str
    _broken: BaseException | None
    _pending: collections.deque[Task]
    _finished: threading.Event
    _name: str
    _thread: threading.Thread

    def _wake(self) -> None:
        raise NotImplementedError

    def _check_task(self, task: Task) -> None:
        """Raise ValueError for a task this engine cannot run (called under the lock)."""

    def submit(self, tasks: Iterable[Task]) -> None:
        """Queue tasks; returns at once.  A task whose function could not be pickled fails at once."""
        failed: list[tuple[Task, BaseException]] = []
        with self._lock:
            if self._state != "running":
                raise ValueError(f"{self._name} not running (it was closed or terminated)")
            broken = self._broken
            for task in tasks:
                self._check_task(task)
                error = broken or task.function.error
                if error is not None:
                    failed.append((task, error))
                else:
                    self._pending.append(task)
        for task, error in failed:
            task.job._done(task, False, error)
        if broken is None:
            self._wake()

    def close(self) -> None:
        """No more tasks; the workers stop once the queued ones are done."""
        with self._lock:
            if self._state == "running":
                self._state = "closing"
        self._wake()

    def terminate(self) -> None:
        """Stop now: stop the work in flight; unfinished tasks fail with BrokenPoolError."""
        with self._lock:
            if self._state in ("running", "closing"):
                self._state = "terminating"
        self._wake()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the engine's thread has stopped every worker; True if it has."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("cannot join the pool from one of its own callbacks")
        return self._finished.wait(timeout)

    def worker_objects(self) -> list[Any]:
        """The current workers' process (or thread) objects; none for an engine without local workers."""
        return []

    def repopulate(self) -> None:
        """Start workers for any that have exited and not been replaced yet (the engine does it by
        itself as soon as it sees one exit; this asks for it now)."""

    @property
    def state(self) -> str:
        return self._state

    @property
    def broken(self) -> BaseException | None:
        return self._broken


class Engine(EngineBase):
    """Workers, a supervisor thread, and the queue of tasks between them.

    ``ctx`` is a gilfree context (process workers) or ``None`` (thread workers).  Thread-safe:
    :meth:`submit`, :meth:`close`, :meth:`terminate` may be called from any thread.
    """

    #: A worker that dies with no task running breaks the engine (the executor's "break" policy, as
    #: the stdlib's executor does), instead of being replaced.
    break_on_idle_death = False

    def __init__(self, processes: int, ctx: Any = None, initializer: Any = None, initargs: Iterable[Any] = (),
                 maxtasksperchild: int | None = None, max_memory_per_child: int | None = None,
                 name: str = "Pool", on_demand: bool = False) -> None:
        # on_demand: no worker is started up front; one starts when a task finds no idle worker, up to
        # ``processes`` (the stdlib's executor under spawn and forkserver); else all start now
        self._on_demand = on_demand
        self._ctx = ctx
        self._threads = ctx is None
        self._size = processes
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._maxtasks = maxtasksperchild
        self._max_memory = max_memory_per_child
        self._name = name
        self._pending: collections.deque[Task] = collections.deque()
        self._thread_results: collections.deque[tuple[_Worker, Any]] = collections.deque()
        self._lock = threading.Lock()
        self._state = "running"  # -> "closing" -> "closed", or "terminating" -> "closed"
        self._broken: BaseException | None = None
        self._workers: list[_Worker] = []
        self._numbers = itertools.count(1)
        self._start_failures = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_lock = threading.Lock()
        self._finished = threading.Event()
        if self._threads:
            self._slots: Any = memoryview(bytearray(8 * _SLOT_WORDS * processes)).cast("q")
            self._slot_block = None
        else:
            from ._shm import Block  # L1

            self._slot_block = Block(8 * _SLOT_WORDS * processes)
            self._slots = self._slot_block.memoryview().cast("q")
        for i in range(processes * _SLOT_WORDS):
            self._slots[i] = _IDLE
        self._free_slots = list(range(processes))
        self._poller = select.poll()
        self._poller.register(self._wake_r, select.POLLIN)
        self._by_fd: dict[int, tuple[_Worker, str]] = {}
        self._exiting: list[_Worker] = []  # forgotten workers whose processes have not ended yet
        self._exiting_since: dict[_Worker, int] = {}  # monotonic_ns when each began to exit
        self._left: list[Any] = []  # processes of the workers that left after close()/terminate()
        self._settle_waiters: list[threading.Event] = []  # see settle()
        self._repopulate = False  # repopulate() asked the supervisor to start missing workers now
        try:
            for _ in range(0 if on_demand else processes):
                self._start_worker()
            self._thread = threading.Thread(target=self._run, name=f"gilfree-{name}-supervisor", daemon=True)
            # at interpreter finalization this raises RuntimeError ("can't create new thread")
            self._thread.start()
        except BaseException:  # a worker or the supervisor could not start: stop the workers, then raise
            self._abort_start()
            util.close_fds(self._wake_r, self._wake_w)
            self._wake_w = -1
            raise

    def pids(self) -> list[int]:
        return [w.pid for w in self._workers if w.pid is not None]

    def settle(self, timeout: float) -> None:
        """Wait (up to ``timeout`` s) until the supervisor has handed the pending tasks that workers
        have room for to them: what was submitted before this call and could start now has started."""
        if threading.current_thread() is self._thread:
            return
        event = threading.Event()
        with self._lock:
            if self._state == "closed":
                return
            self._settle_waiters.append(event)
        self._wake()
        event.wait(timeout)

    def _settled(self, count: int | None = None) -> None:
        """Release the first ``count`` settle() waiters (all of them if None)."""
        with self._lock:
            if count is None:
                waiters, self._settle_waiters = self._settle_waiters, []
            else:
                waiters, self._settle_waiters = self._settle_waiters[:count], self._settle_waiters[count:]
        for event in waiters:
            event.set()

    def worker_objects(self) -> list[Any]:
        """The current workers' ``Process`` objects (threads for thread workers): a snapshot, since the
        supervisor replaces workers as they exit.  The engine never closes these objects (their
        descriptors go with the last reference), so a caller holding one may still ask ``is_alive()``,
        ``exitcode`` or ``join()`` after the worker has left the pool."""
        current = [w.process if w.process is not None else w.thread for w in list(self._workers)]
        # once the pool is closed or terminated, the workers that left since stay listed (the stdlib's
        # pool keeps them in ``_pool``, with their exit codes, after ``join()``)
        return current if self._state == "running" else list(self._left) + current

    def repopulate(self) -> None:
        with self._lock:
            if self._state != "running":
                return
            self._repopulate = True
        self._wake()

    def worker_count(self) -> int:
        return len(self._workers)

    def _wake(self) -> None:
        with self._wake_lock:  # never write to the number of a pipe that _finish closed (and reused)
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"x")
            except (BlockingIOError, OSError):
                pass  # a full pipe wakes the supervisor anyway

    def __repr__(self) -> str:
        return (f"<Engine {self._name} state={self._state} workers={len(self._workers)} "
                f"pending={len(self._pending)}>")

    # -- workers ----------------------------------------------------------------------------
    def _start_worker(self) -> _Worker:
        index = self._free_slots.pop(0)
        worker = _Worker(next(self._numbers), index)
        base = index * _SLOT_WORDS
        self._slots[base] = _IDLE
        if self._threads:
            import queue

            worker.inbox = queue.SimpleQueue()
            results = self._thread_results
            wake = self._wake

            def send(msg: Any, worker: _Worker = worker) -> None:
                results.append((worker, msg))
                wake()

            worker.thread = threading.Thread(
                target=self._thread_worker, args=(worker, send), name=f"{self._name}Worker-{worker.number}", daemon=True
            )
            worker.thread.start()
        else:
            ours, theirs = connection.Pipe()
            ours._shm_min = SHM_MIN
            try:
                process = self._ctx.Process(
                    target=_worker_main,
                    args=(theirs, self._slot_block, index, self._initializer, self._initargs, self._max_memory),
                    daemon=True,
                )
                process.name = process.name.replace("Process", "PoolWorker")
                process.start()
            except BaseException:
                ours.close()
                theirs.close()
                self._free_slots.insert(0, index)
                raise
            theirs.close()
            worker.process = process
            # a context given by duck typing (as the stdlib's Pool accepts one) may make processes
            # without a pid or sentinel: such a worker is supervised through its connection only
            worker.pid = getattr(process, "pid", None)
            worker.sentinel = getattr(process, "sentinel", None)
            worker.conn = ours
            worker.outbox = connection.Outbox(ours)
            worker.reader = connection.Inbox(ours)
            worker.polling = select.POLLIN
            self._by_fd[ours.fileno()] = (worker, "conn")
            self._poller.register(ours.fileno(), select.POLLIN)
            if worker.sentinel is not None:
                self._by_fd[worker.sentinel] = (worker, "sentinel")
                self._poller.register(worker.sentinel, select.POLLIN)
        self._workers.append(worker)
        return worker

    def _thread_worker(self, worker: _Worker, send: Callable[[Any], None]) -> None:
        slot = self._slots[worker.index * _SLOT_WORDS : (worker.index + 1) * _SLOT_WORDS]
        try:
            _serve(worker.inbox.get, send, slot, self._initializer, self._initargs, None, False)
        finally:
            send(("exit", None))

    def _unpoll(self, fd: int | None) -> None:
        if fd is None:
            return
        self._by_fd.pop(fd, None)
        try:
            self._poller.unregister(fd)
        except KeyError:
            pass

    def _close_channel(self, worker: _Worker) -> None:
        """Stop reading and writing to the worker (it hung up, or is forgotten)."""
        conn = worker.conn
        if conn is not None and not conn.closed:
            self._unpoll(conn.fileno())
            if worker.outbox is not None:
                worker.outbox.clear()
            if worker.reader is not None:
                worker.reader.close()
            conn.close()

    def _forget_worker(self, worker: _Worker) -> None:
        """Drop the worker from the pool.  Its process has ended (its sentinel said so), or is told to
        end and is reaped when its sentinel says so (``_exiting``): the supervisor never waits for it."""
        if worker.ended:
            return
        worker.ended = True
        self._workers.remove(worker)
        if self._state != "running":
            self._left.append(worker.process if worker.process is not None else worker.thread)
        self._free_slots.append(worker.index)
        self._close_channel(worker)
        process = worker.process
        if process is None:
            return
        if process.exitcode is None and not self._reaped(worker):
            self._by_fd[worker.sentinel] = (worker, "exiting")  # type: ignore[index]
            self._exiting.append(worker)
            if self._on_demand:
                self._exiting_since[worker] = time.monotonic_ns()
            return
        self._unpoll(worker.sentinel)
        # not process.close(): the object may be in a caller's hands (``Pool._pool``, the executor's
        # ``_processes``), where the stdlib's stays usable; its descriptors go with its last reference

    def _reaped(self, worker: _Worker) -> bool:
        """Whether the worker's process has ended (and is reaped now), without waiting."""
        process = worker.process
        process.join(0)
        return process.exitcode is not None

    def _exited(self, worker: _Worker) -> None:
        """The sentinel of a forgotten worker: its process ended."""
        self._unpoll(worker.sentinel)
        if worker in self._exiting:
            self._exiting.remove(worker)
        self._exiting_since.pop(worker, None)
        worker.process.join(1)  # reaps it (not close(): see _forget_worker)

    def _send(self, worker: _Worker, msg: Any) -> None:
        """Queue a message for the worker and write what its socket takes now (never blocks).

        An object that cannot be pickled raises here, and nothing is queued."""
        outbox = worker.outbox
        if outbox is None:
            worker.inbox.put(msg)
            return
        if worker.conn is None or worker.conn.closed:
            raise BrokenPipeError(f"worker {worker.pid} hung up")
        outbox.put(msg)
        self._flush(worker)

    def _flush(self, worker: _Worker) -> None:
        outbox = worker.outbox
        conn = worker.conn
        assert outbox is not None and conn is not None
        if conn.closed:
            return
        try:
            done = outbox.flush()
        except OSError:  # it is gone: its sentinel (or hang-up) says so, and its tasks go elsewhere
            outbox.clear()
            worker.retiring = True
            done = True
        want = select.POLLIN if done else select.POLLIN | select.POLLOUT
        if worker.polling != want:
            worker.polling = want
            self._poller.modify(conn.fileno(), want)

    def _stop_worker(self, worker: _Worker) -> None:
        if not worker.stopping:
            worker.stopping = True
            try:
                self._send(worker, None)
            except OSError:
                pass

    # -- the supervisor ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # pragma: no cover - a bug here must not hang the callers
            util.sub_warning("pool supervisor failed: %r", exc)
            self._break(BrokenPoolError(f"the pool's supervisor thread failed: {exc!r}"))
            self._kill_all()
        finally:
            self._finish()

    def _loop(self) -> None:
        while True:
            self._drain_wake()
            # settle() waiters that asked before this round: their tasks are in _pending by now
            # (one who asks later is answered after the next round; its wake-up makes one)
            settling = len(self._settle_waiters)
            state = self._state
            if state == "terminating":
                self._break(BrokenPoolError("the pool was terminated before this task finished"), terminated=True)
                self._kill_all()
                return
            self._collect_thread_results()
            if self._repopulate:
                self._repopulate = False
                self._replace()
            self._dispatch()
            if settling:
                self._settled(settling)
            if state == "closing" and not self._pending and not any(w.inflight for w in self._workers):
                for worker in list(self._workers):
                    self._stop_worker(worker)
                if not self._workers:
                    return
            timeout = self._check_deadlines()
            if self._thread_results:
                continue
            events = self._poller.poll(timeout)
            # resolve every fd before handling any: handling one event may close a dead worker's
            # fds, and a replacement started meanwhile may get the same numbers
            ready = [(*self._by_fd[fd], ev) for fd, ev in events if fd in self._by_fd]
            for worker, what, ev in ready:
                if what == "exiting":
                    self._exited(worker)
                    continue
                if worker.ended:
                    continue
                if what == "conn":
                    if ev & select.POLLOUT:
                        self._flush(worker)
                    if ev & ~select.POLLOUT and not worker.ended:
                        self._read_results(worker)
                else:
                    self._worker_died(worker)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _read_results(self, worker: _Worker) -> None:
        """Handle every result the worker has sent so far (at least one message has arrived)."""
        conn = worker.conn
        reader = worker.reader
        assert conn is not None and reader is not None
        try:
            while not worker.ended:
                frames = None if reader.partial else conn._ready_frames()
                if frames is None:
                    # a large message (or one with descriptors): take its bytes as they come, never
                    # waiting for the rest -- a worker stopped half-way through stalls only itself
                    self._take(worker, reader.receive())
                    if reader.eof:
                        raise EOFError("the worker hung up")
                    if reader.partial:
                        return
                    continue
                if not frames:
                    return
                for frame in frames:
                    try:
                        msg = reduction.loads(frame)
                    except BaseException as exc:  # a result that cannot be unpickled here (even a
                        # __reduce__ that calls sys.exit: the supervisor thread must not die of it)
                        self._unreadable(worker, exc)
                        continue
                    self._handle(worker, msg, len(frame))
        except (EOFError, OSError):
            if not worker.ended:
                self._hung_up(worker)
        except BaseException as exc:  # a result (with buffers) that cannot be unpickled here
            self._unreadable(worker, exc)

    def _hung_up(self, worker: _Worker) -> None:
        """The worker closed its end of the connection: it is exiting (told to, or dying).

        Its sentinel says when the process has ended; the supervisor does not wait for that.  A
        worker told to stop with nothing in hand is done: it leaves the pool now (a replacement
        starts at once) and is reaped when it ends, however long it lingers (a non-daemon thread).
        Any other is given :data:`HANG_UP_GRACE` seconds to end before it is killed, so that its
        death (and exit code) is handled as a death."""
        self._close_channel(worker)
        if worker.stopping and not worker.inflight:
            self._forget_worker(worker)
            self._replace()
            return
        worker.retiring = True
        worker.hung_up = time.monotonic_ns()

    def _take(self, worker: _Worker, messages: list[Any]) -> None:
        sizes = worker.reader.sizes if worker.reader is not None else []
        for i, msg in enumerate(messages):
            if worker.ended:
                return
            if type(msg) is connection.Unreadable:
                self._unreadable(worker, msg.error)
            else:
                self._handle(worker, msg, sizes[i] if i < len(sizes) else 0)

    def _unreadable(self, worker: _Worker, exc: BaseException) -> None:
        util.sub_warning("pool: result from worker %s could not be read: %r", worker.pid, exc)
        if worker.inflight:
            task = worker.inflight.popleft()
            if task.policy == "break":  # as the stdlib's executor: a result it cannot read breaks it
                broken = BrokenPoolError(f"the result of {task.describe()} could not be unpickled here "
                                         f"({exc!r}); on_worker_death='break': no task can run")
                broken.__cause__ = exc
                self._finish_task(worker, task, False, broken)
                self._break(broken)
                return
            if not isinstance(exc, Exception):  # SystemExit from a __reduce__: get() must not exit
                wrapped = RuntimeError(f"the result of {task.describe()} could not be unpickled here: "
                                       f"rebuilding it raised {exc!r}")
                wrapped.__cause__ = exc
                exc = wrapped
            self._finish_task(worker, task, False, exc)

    def _collect_thread_results(self) -> None:
        results = self._thread_results
        while results:
            worker, msg = results.popleft()
            if msg[0] == "exit":
                if not worker.ended:
                    self._requeue(worker)
                    self._forget_worker(worker)
                    self._replace()
                continue
            self._handle(worker, msg)

    def _handle(self, worker: _Worker, msg: Any, nbytes: int = 0) -> None:
        if msg[0] == "init":
            error = msg[1]
            self._break(BrokenPoolError(
                f"the pool's initializer raised {type(error).__name__}: {error}; no task can run"
            ), cause=error)
            return
        if msg[0] == "exit":
            return
        tid, ok, value, over, elapsed = msg
        if not worker.inflight or worker.inflight[0].tid != tid:  # pragma: no cover - protocol bug
            raise RuntimeError(f"worker {worker.pid} answered task {tid}, expected {worker.inflight}")
        task = worker.inflight.popleft()
        task.elapsed = elapsed
        task.nbytes = nbytes
        worker.short = elapsed < SHORT_TASK
        worker.done += 1
        self._start_failures = 0
        if over:
            worker.retiring = True
        self._finish_task(worker, task, ok, value)
        if worker.retiring and not worker.inflight:
            self._stop_worker(worker)

    def _finish_task(self, worker: _Worker | None, task: Task, ok: bool, value: Any) -> None:
        task.worker = None
        try:
            task.job._done(task, ok, value)
        except BaseException as exc:  # a callback raised (SystemExit too): report it, keep the pool alive
            util.sub_warning("pool: result callback raised %r", exc)
            sys.stderr.write(f"gilfree: a callback of {task.describe()} raised:\n")
            traceback.print_exception(type(exc), exc, exc.__traceback__)

    def _capacity(self, worker: _Worker) -> int:
        if worker.stopping or worker.retiring or worker.ended:
            return 0
        depth = DEPTH_SHORT if worker.short else DEPTH_LONG
        if self._max_memory is not None:
            depth = 1  # a worker over its memory limit must not have tasks queued that it would still run
        if len(worker.inflight) > depth // 2:
            return 0  # refill in batches: one message (and one wake-up) for several short tasks
        room = depth - len(worker.inflight)
        if self._maxtasks is not None:
            room = min(room, self._maxtasks - worker.sent)
        return room

    def _dispatch(self) -> None:
        """Hand pending tasks to workers with room: round-robin (balance first), one message per worker."""
        self._dispatch_round()
        # a pool that starts workers on demand and is still growing: tasks submitted while that
        # round ran wait in _pending, each for a worker of its own; rounds until none is left or
        # nothing changes (then the next wake-up takes over)
        while self._on_demand and self._pending and len(self._workers) < self._size:
            before = (len(self._pending), len(self._workers))
            self._dispatch_round()
            if (len(self._pending), len(self._workers)) == before:
                return

    def _dispatch_round(self) -> None:
        pending = self._pending
        if not pending:
            return
        if self._on_demand and len(self._workers) < self._size:
            if not self._start_on_demand():
                return
            if len(self._workers) < self._size:
                # still growing: a task goes to an idle worker (a new one is idle) or waits for the
                # next round, which starts a worker for it -- never behind a busy worker's task (a
                # submit() can add to _pending while this round runs)
                rooms = {w: 1 for w in self._workers if not w.inflight and self._capacity(w) > 0}
            else:
                rooms = {w: room for w in self._workers if (room := self._capacity(w)) > 0}
        else:
            rooms = {w: room for w in self._workers if (room := self._capacity(w)) > 0}
        plans: dict[_Worker, list[Task]] = {}
        while pending and rooms:
            for worker in sorted(rooms, key=lambda w: len(w.inflight) + len(plans.get(w, ()))):
                if not pending:
                    break
                task = pending.popleft()
                if not task.job._start(task):
                    continue  # cancelled
                plans.setdefault(worker, []).append(task)
                rooms[worker] -= 1
                if not rooms[worker]:
                    del rooms[worker]
        for worker, tasks in plans.items():
            if worker.short:
                self._send_batch(worker, tasks)  # short tasks: one message for several
            else:
                for task in tasks:  # long ones: the worker starts the first while the next arrives
                    self._send_batch(worker, [task])

    def _start_on_demand(self) -> bool:
        """Start a worker for each pending task beyond the idle workers (up to the pool's size); False
        if one could not start (the engine is broken then)."""
        if self._state not in ("running", "closing") or self._broken is not None:
            return True
        idle = sum(1 for w in self._workers if not w.inflight and self._capacity(w) > 0)
        # a worker still exiting (it reached max_tasks_per_child, or was stopped) is one of the
        # executor's processes until its sentinel says it has gone (for EXIT_GRACE s at most): the
        # executor never runs more than max_workers, as the stdlib's joins a retiring worker first.
        # (A Pool, which starts its workers up front, replaces one at once: it never waits for a
        # worker that lingers at exit, tests/test_pool_promises.py)
        for _ in range(min(len(self._pending) - idle, self._size - len(self._workers) - self._lingering())):
            try:
                self._start_worker()
            except Exception as exc:
                self._break(BrokenPoolError(f"could not start a worker: {exc!r}"), cause=exc)
                return False
        return True

    def _send_batch(self, worker: _Worker, tasks: list[Task]) -> None:
        added: list[int] = []
        msgs = [self._task_message(worker, task, added) for task in tasks]
        try:
            self._send(worker, msgs)
        except OSError:  # the worker is gone: its sentinel will say so; run the tasks elsewhere
            self._forget_functions(worker, added)
            self._pending.extendleft(reversed(tasks))
            worker.retiring = True
            return
        except Exception as exc:  # an argument cannot be pickled: find which, fail only that task
            self._forget_functions(worker, added)
            if len(tasks) > 1:
                for task in tasks:
                    self._send_batch(worker, [task])
            else:
                self._finish_task(None, tasks[0], False, exc)
            return
        for task in tasks:
            task.worker = worker
            worker.inflight.append(task)
        worker.sent += len(tasks)
        if self._maxtasks is not None and worker.sent >= self._maxtasks:
            worker.retiring = True

    def _task_message(self, worker: _Worker, task: Task, added: list[int]) -> tuple[Any, ...]:
        """The message for one task; the function goes along the first time this worker sees it."""
        function = task.function
        fid = function.fid
        drop: list[int] = []
        fdef = None
        if fid not in worker.functions:
            fdef = function.func if self._threads else function.pickled
            worker.functions[fid] = None
            added.append(fid)
            while len(worker.functions) > FUNCTION_CACHE:
                drop.append(worker.functions.popitem(last=False)[0])
        else:
            worker.functions.move_to_end(fid)
        # per item: record each item's start in the slot (a timeout needs it; an imap chunk cut up
        # after a death needs to know which item was running)
        per_item = task.timeout is not None or task.kind >= EACH
        return (task.tid, fid, fdef, drop, task.kind, task.args, task.kwargs, per_item)

    @staticmethod
    def _forget_functions(worker: _Worker, fids: list[int]) -> None:
        for fid in fids:
            worker.functions.pop(fid, None)

    def _lingering(self) -> int:
        """The exiting workers that still count toward the pool's size (for ``EXIT_GRACE`` s)."""
        limit = time.monotonic_ns() - int(EXIT_GRACE * 1e9)
        return sum(1 for since in self._exiting_since.values() if since > limit)

    def _check_deadlines(self) -> int | None:
        """Kill workers whose task ran past its timeout, or that hung up and linger; return the poll
        timeout in ms."""
        soonest: float | None = None
        now = time.monotonic_ns()
        for worker, since in list(self._exiting_since.items()):
            remaining = since + int(EXIT_GRACE * 1e9) - now
            if remaining <= 0:  # counts no more: its replacement starts now
                del self._exiting_since[worker]
                soonest = 0  # the next round's dispatch starts its replacement
            elif soonest is None or remaining < soonest:
                soonest = remaining
        for worker in self._workers:
            if worker.hung_up is not None:
                remaining = worker.hung_up + int(HANG_UP_GRACE * 1e9) - now
                if remaining <= 0:
                    if worker.process is not None and worker.process.exitcode is None:
                        worker.process.kill()
                    worker.hung_up = now + 10**12  # killed: its sentinel will fire
                elif soonest is None or remaining < soonest:
                    soonest = remaining
                continue
            if not worker.inflight or worker.killed_for is not None:
                continue
            task = worker.inflight[0]
            if task.timeout is None:
                continue
            base = worker.index * _SLOT_WORDS
            if self._slots[base] != task.tid:  # not started yet: look again soon
                soonest = _RECHECK if soonest is None else min(soonest, _RECHECK)
                continue
            if self._slots[base + 3] == _SENDING:  # it returned: the rest is sending the result
                continue
            started = self._slots[base + 2]
            item = self._slots[base + 1]
            remaining = started + int(task.timeout * 1e9) - now
            if remaining <= 0:
                if self._threads:
                    continue  # threads cannot be killed (ThreadPool refuses task_timeout)
                worker.killed_for = TaskTimeoutError(task.timeout, worker.pid or 0, task.describe(),
                                                     item if task.kind != CALL else None)
                worker.process.kill()
            elif soonest is None or remaining < soonest:
                soonest = remaining
        if soonest is None:
            return None
        return max(1, int(soonest / 1e6) + 1)

    def _running(self, worker: _Worker) -> tuple[Task | None, int | None, bool]:
        """The task the worker was running (from its slot), the item of its chunk, and whether it
        had returned and was sending its result."""
        base = worker.index * _SLOT_WORDS
        tid = self._slots[base]
        if worker.inflight and worker.inflight[0].tid == tid:
            task = worker.inflight[0]
            tracked = task.kind >= EACH or task.timeout is not None  # items are recorded one by one
            item = self._slots[base + 1] if task.kind != CALL and tracked else None
            return task, item, self._slots[base + 3] == _SENDING
        return None, None, False

    def _worker_died(self, worker: _Worker) -> None:
        """The worker's process ended (its sentinel): fail, retry or cut up what it was running."""
        # results it sent before dying are intact: take them first
        conn = worker.conn
        if conn is not None and not conn.closed and worker.reader is not None:
            try:
                self._take(worker, worker.reader.receive(limit=None))  # everything it wrote, up to its end
            except (EOFError, OSError):
                pass
        if worker.ended:
            return
        worker.process.join(1)  # it has ended: this only reaps it
        exitcode = worker.process.exitcode
        task, item, sending = self._running(worker)
        if task is not None:
            worker.inflight.popleft()
        timed_out, worker.killed_for = worker.killed_for, None  # the error goes to the caller, with a
        # traceback through the caller's frames (the pool): the engine keeps no reference to it
        expected = worker.stopping and task is None and not worker.inflight
        self._requeue(worker)
        self._forget_worker(worker)
        if task is not None:
            if timed_out is not None and not sending:
                self._task_failed(worker, task, item, timed_out, retry=False)
            else:
                self._lost(worker, task, item, exitcode, sending)
        elif (not expected and self.break_on_idle_death and self._broken is None
              and self._state in ("running", "closing")):
            from ._errors import describe_exit

            self._break(BrokenPoolError(
                f"a worker (pid {worker.pid}) died with no task running ({describe_exit(exitcode)}) under "
                f"on_worker_death='break': a process in the pool was terminated abruptly; no task can run"))
        elif not expected and worker.done == 0 and self._state == "running" and not worker.stopping:
            self._start_failures += 1
            if self._start_failures >= MAX_START_FAILURES:
                from ._errors import describe_exit

                self._break(BrokenPoolError(
                    f"{self._start_failures} workers in a row ended before finishing a task (the last, pid "
                    f"{worker.pid}, {describe_exit(exitcode)}); the pool cannot run tasks.  Does the worker start "
                    f"fail (an import error under spawn, a crash at start), or do a task's arguments fail to "
                    f"unpickle in the worker (its output says)?"
                ))
        self._replace()

    def _lost(self, worker: _Worker, task: Task, item: int | None, exitcode: int | None,
              sending: bool = False) -> None:
        if isinstance(task.job, _Parts):
            item_no = None if item is None else task.index + item
        else:
            item_no = item
        error = WorkerLostError(worker.pid or 0, exitcode, task.tid, item_no, task.describe(), task.attempt, sending)
        if task.policy == "break":  # as the stdlib's executor: every unfinished task, this one too
            broken = BrokenPoolError(
                f"a worker died under on_worker_death='break' (a process in the pool was terminated abruptly "
                f"while the task was running or pending): {error}")
            broken.__cause__ = error
            self._finish_task(worker, task, False, broken)
            self._break(broken, cause=error)
            return
        self._task_failed(worker, task, None if sending else item, error, retry=task.policy == "retry")

    def _task_failed(self, worker: _Worker | None, task: Task, item: int | None, error: BaseException,
                     retry: bool) -> None:
        """The task's worker died (or was killed for a timeout) while it ran item ``item`` of it.

        An imap chunk (an ``EACH`` kind, whose items fail one by one) is cut up: the item that was
        running fails (or runs again), the items before it, whose results died with the worker, and
        after it run again; the chunk's job gets the whole as one result.  Anything else fails (or
        runs again) whole."""
        retry = retry and task.attempt <= task.retries
        if (task.kind >= EACH and item is not None and 0 <= item < task.size
                and (task.size > 1 or isinstance(task.job, _Parts))):  # a one-item piece of a cut chunk too
            self._cut(task, item, error, retry)
            return
        if retry:
            util.info("pool: retrying %s after its worker died (attempt %d)", task.describe(), task.attempt + 1)
            task.attempt += 1
            self._pending.appendleft(task)
        else:
            self._finish_task(worker, task, False, error)

    def _cut(self, task: Task, item: int, error: BaseException, retry: bool) -> None:
        if isinstance(task.job, _Parts):
            parts, base = task.job, task.index
        else:
            parts, base = _Parts(task), 0
        args = list(task.args)
        pieces = []
        if item:
            pieces.append(self._piece(parts, task, base, args[:item], 1))
        if retry:
            pieces.append(self._piece(parts, task, base + item, args[item : item + 1], task.attempt + 1))
        else:
            parts.values[base + item] = Failure(error)
        if item + 1 < len(args):
            pieces.append(self._piece(parts, task, base + item + 1, args[item + 1 :], 1))
        parts.left += len(pieces) - (1 if task.job is parts else 0)
        self._pending.extendleft(reversed(pieces))
        if parts.left == 0:
            parts.complete()

    @staticmethod
    def _piece(parts: _Parts, task: Task, offset: int, args: list[Any], attempt: int) -> Task:
        piece = Task(parts, offset, task.kind, task.function, args, task.kwargs, len(args), task.policy,
                     task.retries, task.timeout)
        piece.attempt = attempt
        return piece

    def _requeue(self, worker: _Worker) -> None:
        """Tasks sent to a worker that never started them go back to the front, in order."""
        while worker.inflight:
            task = worker.inflight.pop()
            task.worker = None
            self._pending.appendleft(task)

    def _replace(self) -> None:
        if self._on_demand:
            return  # _dispatch starts a worker when a task needs one
        if self._state not in ("running", "closing") or self._broken is not None:
            return
        if self._state == "closing" and not self._pending:
            return
        while len(self._workers) < self._size:
            try:
                self._start_worker()
            except Exception as exc:
                self._break(BrokenPoolError(f"could not start a replacement worker: {exc!r}"), cause=exc)
                return

    def _break(self, error: BaseException, cause: BaseException | None = None, terminated: bool = False) -> None:
        """Fail every unfinished task with ``error``; accept no more."""
        if cause is not None and error.__cause__ is None:
            error.__cause__ = cause
        with self._lock:
            if self._broken is None:
                self._broken = error
            pending = list(self._pending)
            self._pending.clear()
        busy = []
        for worker in list(self._workers):
            if worker.inflight:
                busy.append(worker)
            while worker.inflight:
                pending.append(worker.inflight.popleft())
        for task in pending:
            self._finish_task(None, task, False, self._broken)
        if not terminated:
            for worker in list(self._workers):
                if worker in busy and worker.process is not None and not worker.stopping:
                    # its task has failed already: as the stdlib does, do not wait for it to end (a
                    # shutdown(wait=True) would wait for the longest task still running)
                    worker.stopping = True
                    worker.process.terminate()
                else:
                    self._stop_worker(worker)

    def _kill_all(self) -> None:
        """Stop every worker now: idle ones are told to exit (they flush their output, as the stdlib's
        do), busy ones get SIGTERM; whatever is left after a second gets SIGKILL.

        Busy means it holds a task whose result has not arrived.  Not the slot: a worker that has
        sent its last result marks its slot idle a moment later, and a SIGTERM in that moment lost
        what it had printed (seen at interpreter exit, where the pool is terminated right after
        the last result was read)."""
        for worker in list(self._workers):
            if worker.process is None:
                self._stop_worker(worker)
            elif worker.inflight:  # running a task, or about to
                worker.process.terminate()
            else:
                self._stop_worker(worker)
        self._reap(1.0, threads=False)  # a busy thread cannot be stopped: do not wait for it

    def _abort_start(self) -> None:
        """A worker could not be started while the pool was being made: stop the ones that were, as the
        stdlib does (``terminate()`` each one still running, then ``join()`` it), and raise nothing.

        None of them has a task yet, so SIGTERM loses nothing.  gilfree's own processes get a bounded
        wait and then SIGKILL (nothing hangs); a ``Process`` of a context given by duck typing gets
        exactly the stdlib's calls, since it may offer nothing else."""
        from .process import BaseProcess  # L3

        started = list(self._workers)
        for worker in started:
            if worker.process is None:  # a thread: told to stop, it exits between tasks
                self._stop_worker(worker)
                continue
            self._close_channel(worker)
            if worker.process.exitcode is None:
                worker.process.terminate()
        deadline = time.monotonic() + 5.0
        for worker in started:
            process = worker.process
            if isinstance(process, BaseProcess):
                process.join(max(0.0, deadline - time.monotonic()))
                if process.exitcode is None:
                    process.kill()
                    process.join()
            elif process is not None:
                process.join()
            self._unpoll(worker.sentinel)
            self._workers.remove(worker)
            worker.ended = True

    def _reap(self, seconds: float, threads: bool = True) -> None:
        """Wait up to ``seconds`` in all for the workers to end, SIGKILL what is left, forget them."""
        deadline = time.monotonic() + seconds
        for worker in list(self._workers) + self._exiting:
            if worker.process is not None:
                worker.process.join(max(0.0, deadline - time.monotonic()))
                if worker.process.exitcode is None:
                    worker.process.kill()
                    worker.process.join(5)
            elif threads and worker.thread is not None:
                worker.thread.join(max(0.0, deadline - time.monotonic()))
            if not worker.ended:
                self._forget_worker(worker)
        for worker in list(self._exiting):
            self._exited(worker)

    def _finish(self) -> None:
        self._reap(5.0)  # after close(): the workers told to stop
        with self._lock:
            self._state = "closed"
        self._settled()
        with self._wake_lock:
            wake_w, self._wake_w = self._wake_w, -1
        util.close_fds(self._wake_r, wake_w)
        self._finished.set()
