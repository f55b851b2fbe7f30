#!/usr/bin/env python
"""Benchmarks: gilfree next to the stdlib's ``multiprocessing``, measured in one run, reported as ratios.

Usage (from the repository root)::

    python benchmarks/run.py                 # full run (7 rounds), table on stdout
    python benchmarks/run.py --quick         # fewer rounds, smaller sizes (well under 20 s)
    python benchmarks/run.py --markdown      # the table as Markdown
    python benchmarks/run.py --only pipe_roundtrip --repeat 15
    python benchmarks/run.py --methods fork,forkserver --json /tmp/bench.json
    python benchmarks/run.py --list          # the cases and what they measure

Method.  A *case* has one *implementation* per library ("stdlib", "gilfree"; later peers are
optional and skipped when they cannot be imported).  An implementation is set up once per case
(children started, fork server warmed up...), measured once unrecorded (warm-up), then measured
``repeat`` times, interleaved with the other implementations: in round ``r`` the order is rotated by
``r`` (AB, BA, AB, ...), so a slow phase of a noisy machine hurts every implementation alike.  The
report gives the median per implementation, its spread (min-max and the quartiles in the JSON), and
the ratio of each implementation to the stdlib, always as "times faster": above 1 means better than
the stdlib, whether the unit is a time (lower is better) or a throughput (higher is better).  Numbers
are reported, never asserted on.

This file is self-contained (stdlib + gilfree + optional numpy) so that the ``gilfree`` CLI can import
it by path and call :func:`run` and :func:`format_table`.  The child-side functions live in
``_targets.py`` next to it, which this module puts on ``sys.path`` (children inherit it), so they can
be imported by name under every start method.

Top-level imports are kept to ``os``/``sys``/``time``: spawned children (and, on Python 3.11, the
stdlib's forkserver children) re-import the main module, which is this file when it runs as a
script; anything heavier is imported where it is used.
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False  # not `from typing import ...`: typing costs a spawned child a few ms to import
if TYPE_CHECKING:  # pragma: no cover - annotations only
    from typing import Any, Callable, Iterable

_HERE = os.path.dirname(os.path.abspath(__file__))
if not any(os.path.abspath(p or os.curdir) == _HERE for p in sys.path):
    sys.path.append(_HERE)  # appended, not prepended: nothing of the caller's is shadowed

import _targets  # noqa: E402

if os.path.dirname(os.path.abspath(_targets.__file__)) != _HERE:  # pragma: no cover
    raise ImportError(
        f"benchmarks: another module named _targets ({_targets.__file__}) shadows {_HERE}/_targets.py"
    )

#: The implementation every other one is compared with.
BASELINE = "stdlib"
#: Column order of the report; peers (e.g. "faster_fifo") are appended by the cases that use them.
IMPLEMENTATIONS = ["stdlib", "gilfree"]
#: Rounds of a full run and of ``--quick``.
DEFAULT_REPEAT = 7
QUICK_REPEAT = 3
#: Seconds any single wait on a child may take before the benchmark is declared broken.
TIMEOUT = 60.0
START_METHODS = ("fork", "spawn", "forkserver")
MB = 1_000_000  # throughput is in MB/s with MB = 10**6 bytes


class Skip(Exception):
    """Raised by an implementation's setup when it cannot run here (module missing, no such method)."""


# ---------------------------------------------------------------------------------------------------
# The registry


class Case:
    """One benchmark: what it measures, and one factory per implementation.

    ``impls[name](params)`` sets the implementation up and returns a *bench*: an object with
    ``measure() -> float`` (one measurement, in ``unit``) and ``close()`` (tear down; called once,
    even after an error), or a plain callable, taken as ``measure`` with nothing to close.  It raises
    :class:`Skip` if the implementation cannot run here.  ``params`` is ``full`` updated with
    ``quick`` under ``--quick``.
    """

    def __init__(
        self,
        name: str,
        description: str,
        unit: str,
        higher_is_better: bool,
        impls: dict[str, Callable[[dict[str, Any]], Any]],
        full: dict[str, Any] | None = None,
        quick: dict[str, Any] | None = None,
        start_method: str | None = None,
        warmup: int = 1,
    ) -> None:
        self.name = name
        self.description = description
        self.unit = unit
        self.higher_is_better = higher_is_better
        self.impls = impls
        self.full = dict(full or {})
        self.quick = dict(quick or {})
        self.start_method = start_method
        self.warmup = warmup

    def params(self, quick: bool) -> dict[str, Any]:
        params = dict(self.full)
        if quick:
            params.update(self.quick)
        return params

    def __repr__(self) -> str:
        return f"<Case {self.name} [{self.unit}, {'higher' if self.higher_is_better else 'lower'} is better]>"


CASES: list[Case] = []


def register(case: Case) -> Case:
    """Add a case to the registry (names are unique); new implementations get a report column."""
    if any(c.name == case.name for c in CASES):
        raise ValueError(f"duplicate benchmark case {case.name!r}")
    CASES.append(case)
    for impl in case.impls:
        if impl not in IMPLEMENTATIONS:
            IMPLEMENTATIONS.append(impl)
    return case


def require(module: str) -> Any:
    """Import ``module`` for an implementation, or :class:`Skip` it if that is impossible."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Skip(f"{module} is not importable ({exc})") from None


def _mp(impl: str) -> Any:
    """The ``multiprocessing``-like module of an implementation."""
    if impl == "stdlib":
        import multiprocessing

        return multiprocessing
    if impl == "gilfree":
        import gilfree

        return gilfree
    raise ValueError(f"{impl!r} has no multiprocessing-like module")


def _context(impl: str, method: str) -> Any:
    mp = _mp(impl)
    if method not in mp.get_all_start_methods():
        raise Skip(f"start method {method!r} is not available here")
    return mp.get_context(method)


def _ipc_context(impl: str) -> Any:
    """The context used to start the (long-lived) peer of the pipe benchmarks: fork where it exists."""
    mp = _mp(impl)
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _per_impl(
    factory: Callable[..., Any], impls: Iterable[str] = ("stdlib", "gilfree"), **kwargs: Any
) -> dict[str, Any]:
    """``{impl: params -> factory(impl, params, **kwargs)}`` for multiprocessing-like implementations."""

    def bind(impl: str) -> Callable[[dict[str, Any]], Any]:
        return lambda params: factory(impl, params, **kwargs)

    return {impl: bind(impl) for impl in impls}


# ---------------------------------------------------------------------------------------------------
# Helpers for benches that start children


def _finish(p: Any, timeout: float = TIMEOUT) -> int | None:
    """Join ``p`` (terminate, then kill it if it does not end); close it; return its exit code."""
    p.join(timeout)
    if p.exitcode is None:
        p.terminate()
        p.join(5)
        if p.exitcode is None:
            p.kill()
            p.join(5)
    code = p.exitcode
    if code is not None:
        try:
            p.close()
        except (ValueError, AttributeError):
            pass
    return code


def _start_peer(
    ctx: Any, target: Callable[..., Any], args: tuple[Any, ...], child_ends: Iterable[Any]
) -> Any:
    """Start a daemonic child running ``target(*args)``; close our copies of ``child_ends``."""
    p = ctx.Process(target=target, args=args, daemon=True)
    p.start()
    for c in child_ends:
        c.close()
    return p


def _wait_reply(conn: Any, what: str) -> None:
    if not conn.poll(TIMEOUT):
        raise TimeoutError(f"no {what} from the child within {TIMEOUT:g} s")


# ---------------------------------------------------------------------------------------------------
# (a) process start + join


class ProcessStart:
    """Start and join ``processes`` trivial children one after the other; ms per process."""

    def __init__(self, impl: str, params: dict[str, Any]) -> None:
        self.ctx = _context(impl, params["method"])
        self.n = params["processes"]
        # One process before anything is timed: starts the fork server (and the stdlib's resource
        # tracker, which its spawn and forkserver start on first use), so one-time costs are excluded.
        self._run(1)

    def _run(self, n: int) -> float:
        procs = []
        t0 = time.perf_counter()
        for _ in range(n):
            p = self.ctx.Process(target=_targets.noop)
            p.start()
            p.join(TIMEOUT)
            procs.append(p)
            if p.exitcode != 0:
                break
        elapsed = time.perf_counter() - t0
        for p in procs:
            code = _finish(p)
            if code != 0:
                raise RuntimeError(f"a trivial child ended with exit code {code}")
        return elapsed

    def measure(self) -> float:
        return self._run(self.n) / self.n * 1e3

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------
# (b) Pipe round trips


class RoundTrip:
    """Round trips of a small message through a duplex Pipe to an echoing child; µs per round trip."""

    def __init__(self, impl: str, params: dict[str, Any], raw: bool = False) -> None:
        ctx = _ipc_context(impl)
        self.raw = raw
        self.n = params["round_trips"]
        self.msg = b"x" * params["bytes"] if raw else tuple(range(params["items"]))
        self.conn, child = ctx.Pipe()
        target = _targets.echo_bytes if raw else _targets.echo
        self.proc = _start_peer(ctx, target, (child, (self.conn,)), [child])

    def measure(self) -> float:
        send, recv = (
            (self.conn.send_bytes, self.conn.recv_bytes) if self.raw else (self.conn.send, self.conn.recv)
        )
        msg, n = self.msg, self.n
        reply = None
        t0 = time.perf_counter()
        for _ in range(n):
            send(msg)
            reply = recv()
        elapsed = time.perf_counter() - t0
        if reply != msg:
            raise RuntimeError(f"echo returned {reply!r}, sent {msg!r}")
        return elapsed / n * 1e6

    def close(self) -> None:
        try:
            if self.raw:
                self.conn.send_bytes(b"")
            else:
                self.conn.send(None)
        except OSError:
            pass
        self.conn.close()
        _finish(self.proc)


# ---------------------------------------------------------------------------------------------------
# (c) Pipe throughput


class Throughput:
    """``total_mb`` MB in ``message_mb`` MB messages, parent -> child, acknowledged at the end; MB/s.

    ``mode``: "bytes" (send_bytes/recv_bytes on a duplex Pipe), "bytes_oneway" (the same on a
    ``Pipe(duplex=False)``, acknowledged on a second one), "pickle" (send/recv of bytes objects),
    "numpy" (send/recv of float64 arrays).
    """

    def __init__(self, impl: str, params: dict[str, Any], mode: str) -> None:
        ctx = _ipc_context(impl)
        size = int(params["message_mb"] * MB)
        self.count = max(1, int(params["total_mb"] * MB) // size)
        self.mode = mode
        if mode == "numpy":
            np = require("numpy")
            self.payload: Any = np.arange(size // 8, dtype=np.float64)
            size = self.payload.nbytes
        else:
            self.payload = os.urandom(size)
        self.size = size
        if mode == "bytes_oneway":
            r, self.conn = ctx.Pipe(duplex=False)
            self.ack, ack_w = ctx.Pipe(duplex=False)
            args: tuple[Any, ...] = (r, ack_w, (self.conn, self.ack))
            self.proc = _start_peer(ctx, _targets.sink_bytes, args, [r, ack_w])
        else:
            self.conn, child = ctx.Pipe()
            self.ack = self.conn
            if mode == "bytes":
                self.proc = _start_peer(ctx, _targets.sink_bytes, (child, None, (self.conn,)), [child])
            else:
                self.proc = _start_peer(ctx, _targets.sink_objects, (child, (self.conn,)), [child])

    def measure(self) -> float:
        payload, count = self.payload, self.count
        raw = self.mode in ("bytes", "bytes_oneway")
        send = self.conn.send_bytes if raw else self.conn.send
        t0 = time.perf_counter()
        for _ in range(count):
            send(payload)
        if raw:
            send(b"")
            _wait_reply(self.ack, "acknowledgement")
            got = int.from_bytes(self.ack.recv_bytes(), "big")
        else:
            send(None)
            _wait_reply(self.ack, "acknowledgement")
            got = self.ack.recv()
        elapsed = time.perf_counter() - t0
        if got != count * self.size:
            raise RuntimeError(f"the child received {got} bytes, {count * self.size} were sent")
        return count * self.size / elapsed / MB

    def close(self) -> None:
        try:
            if self.mode in ("bytes", "bytes_oneway"):
                self.conn.send_bytes(b"Q")
            else:
                self.conn.send("quit")
        except OSError:
            pass
        self.conn.close()
        self.ack.close()
        _finish(self.proc)


# ---------------------------------------------------------------------------------------------------
# (d) locks and shared state


class LockUncontended:
    """``with lock:`` in one process, ``ops`` times; ns per operation."""

    def __init__(self, impl: str, params: dict[str, Any]) -> None:
        self.lock = _mp(impl).Lock()
        self.ops = params["ops"]

    def measure(self) -> float:
        lock = self.lock
        t0 = time.perf_counter()
        for _ in range(self.ops):
            with lock:
                pass
        return (time.perf_counter() - t0) / self.ops * 1e9

    def close(self) -> None:
        del self.lock


class LockCounter:
    """``processes`` processes x ``n`` times ``with v.get_lock(): v.value += 1``; seconds, exact total."""

    def __init__(self, impl: str, params: dict[str, Any]) -> None:
        self.ctx = _ipc_context(impl)
        self.n, self.processes = params["n"], params["processes"]

    def measure(self) -> float:
        value = self.ctx.Value("i", 0)
        procs = [self.ctx.Process(target=_targets.count_up, args=(value, self.n)) for _ in range(self.processes)]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        for p in procs:
            if _finish(p) != 0:
                raise RuntimeError("a counting child failed")
        elapsed = time.perf_counter() - t0
        if value.value != self.n * self.processes:
            raise RuntimeError(f"final value {value.value}, expected {self.n * self.processes}")
        return elapsed

    def close(self) -> None:
        pass


class ArraySum:
    """A ``mb`` MB float64 array to a child that returns its sum; seconds per round trip.

    stdlib: ``Pool(1).apply(sum, (arr,))`` (the array is pickled each time); gilfree: a
    ``gilfree.shared_array`` sent through a Pipe to a started child (a handle travels); floor: an
    in-process ``np.copy`` of the array, the cost of touching the memory once.
    """

    def __init__(self, impl: str, params: dict[str, Any]) -> None:
        np = require("numpy")
        n = int(params["mb"] * MB) // 8
        self.impl = impl
        self.expected = float(n * (n - 1) / 2)
        if impl == "floor":
            self.arr = np.arange(n, dtype=np.float64)
        elif impl == "stdlib":
            import multiprocessing

            self.arr = np.arange(n, dtype=np.float64)
            self.pool = multiprocessing.get_context("fork").Pool(1)
            self.pool.apply(_targets.noop)
        else:
            import gilfree

            self.arr = gilfree.shared_array(n, np.float64)
            self.arr[:] = np.arange(n, dtype=np.float64)
            ctx = _ipc_context(impl)
            self.conn, child = ctx.Pipe()
            self.proc = _start_peer(ctx, _targets.sum_server, (child, (self.conn,)), [child])

    def measure(self) -> float:
        t0 = time.perf_counter()
        if self.impl == "floor":
            self.arr.copy()
            return time.perf_counter() - t0
        if self.impl == "stdlib":
            got = self.pool.apply(_targets.array_sum, (self.arr,))
        else:
            self.conn.send(self.arr)
            _wait_reply(self.conn, "sum")
            got = self.conn.recv()
        elapsed = time.perf_counter() - t0
        if got != self.expected:
            raise RuntimeError(f"the child summed {got}, expected {self.expected}")
        return elapsed

    def close(self) -> None:
        if self.impl == "stdlib":
            self.pool.close()
            self.pool.join()
        elif self.impl == "gilfree":
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.conn.close()
            _finish(self.proc)
        del self.arr


# ---------------------------------------------------------------------------------------------------
# The cases of this suite


def _register_builtin_cases() -> None:
    start_notes = {
        "fork": "os.fork() of the parent.",
        "spawn": "a fresh interpreter that imports the library and the main module. The first start "
        "(which also starts the stdlib's resource tracker) is done before timing.",
        "forkserver": "a fork of the fork server. The server is started and warmed up (one process "
        "started and joined) before timing, for both libraries alike, so its one-time start-up "
        "(and the stdlib's resource tracker) is excluded.",
    }
    for method in START_METHODS:
        register(
            Case(
                name=f"process_start_{method}",
                description=f"Process(target=noop).start(); join(), {{processes}} processes one after the "
                f"other per sample, time per process. Start method {method}: {start_notes[method]}",
                unit="ms",
                higher_is_better=False,
                impls=_per_impl(ProcessStart),
                full={"method": method, "processes": 10},
                quick={"processes": 4},
                start_method=method,
            )
        )
    ipc = "The child is started (fork) and warmed up before timing."
    register(
        Case(
            name="pipe_roundtrip_object",
            description="Round-trip latency: send() a tuple of {items} small ints through a duplex Pipe "
            "to a child that recv()s and send()s it back; {round_trips} round trips per sample. " + ipc,
            unit="µs",
            higher_is_better=False,
            impls=_per_impl(RoundTrip),
            full={"round_trips": 5000, "items": 4},
            quick={"round_trips": 1000},
        )
    )
    register(
        Case(
            name="pipe_roundtrip_bytes",
            description="Round-trip latency without pickling: send_bytes() of {bytes} bytes through a duplex "
            "Pipe, echoed back with recv_bytes()/send_bytes(); {round_trips} round trips per sample. " + ipc,
            unit="µs",
            higher_is_better=False,
            impls=_per_impl(RoundTrip, raw=True),
            full={"round_trips": 5000, "bytes": 16},
            quick={"round_trips": 1000},
        )
    )
    throughput = [
        ("bytes", "send_bytes()/recv_bytes() through a duplex Pipe"),
        (
            "bytes_oneway",
            "send_bytes()/recv_bytes() through Pipe(duplex=False) (ack on a second one-way Pipe)",
        ),
        ("pickle", "send()/recv() of bytes objects (pickled) through a duplex Pipe"),
        ("numpy", "send()/recv() of float64 numpy arrays through a duplex Pipe (skipped without numpy)"),
    ]
    for mode, how in throughput:
        register(
            Case(
                name=f"pipe_throughput_{mode}",
                description=f"Throughput parent -> child: {{total_mb}} MB in {{message_mb}} MB messages, {how}; "
                f"the child acknowledges the byte count at the end (included in the time). " + ipc,
                unit="MB/s",
                higher_is_better=True,
                impls=_per_impl(Throughput, mode=mode),
                full={"total_mb": 100, "message_mb": 1},
                quick={"total_mb": 20},
            )
        )


    register(
        Case(
            name="lock_uncontended",
            description="`with lock:` on an uncontended Lock in one process, {ops} times per sample; ns per operation.",
            unit="ns",
            higher_is_better=False,
            impls=_per_impl(LockUncontended),
            full={"ops": 1_000_000},
            quick={"ops": 200_000},
        )
    )
    register(
        Case(
            name="lock_counter",
            description="{processes} processes (fork) each {n} times `with v.get_lock(): v.value += 1` on one "
            "Value('i'); seconds for all, the final value checked to be exact.",
            unit="s",
            higher_is_better=False,
            impls=_per_impl(LockCounter),
            full={"processes": 2, "n": 100_000},
            quick={"n": 20_000},
        )
    )
    register(
        Case(
            name="array_sum_in_child",
            description="A {mb} MB float64 array sent to a child that returns its sum. stdlib: Pool(1).apply "
            "(the array is pickled every time); gilfree: the array is a gilfree.shared_array, sent through a "
            "Pipe to a started child (a handle of a few dozen bytes travels). floor: np.copy of the array "
            "in-process, the cost of reading the memory once. Both arrays are created once, before timing.",
            unit="s",
            higher_is_better=False,
            impls={**_per_impl(ArraySum), "floor": lambda params: ArraySum("floor", params)},
            full={"mb": 100},
            quick={"mb": 20},
        )
    )


_register_builtin_cases()


# ---------------------------------------------------------------------------------------------------
# (e) queues


class QueueFlow:
    """``producers`` children put ``messages`` items in total into one queue; the parent gets them all.

    Implementations: the stdlib's ``Queue`` ("stdlib") and ``SimpleQueue`` ("stdlib_simple"),
    ``gilfree.Queue`` and ``faster_fifo.Queue``.  ``batch`` > 0: producers use ``put_many`` and the
    parent ``get_many`` where the library has them (the stdlib does not: one item at a time).  The
    time runs from the first child's start to the last item received; the unit is items/s, or MB/s
    when ``item_bytes`` is large.
    """

    def __init__(self, impl: str, params: dict[str, Any]) -> None:
        import multiprocessing

        self.impl = impl
        self.producers = params["producers"]
        self.n = params["messages"] // self.producers * self.producers
        self.batch = params.get("batch", 0)
        size = params.get("item_bytes", 0)
        self.item: Any = os.urandom(size) if size else (1, "small", 2.5)
        self.mb = size >= 100_000
        self.ctx = multiprocessing.get_context("fork")
        if impl == "gilfree":
            import gilfree

            self.ctx = gilfree.get_context("fork")
            self.make: Any = self.ctx.Queue
        elif impl == "stdlib":
            self.make = self.ctx.Queue
        elif impl == "stdlib_simple":
            self.make = self.ctx.SimpleQueue
        else:
            ff = require("faster_fifo")
            self.make = lambda: ff.Queue(max_size_bytes=max(10_000_000, 4 * size))

    def measure(self) -> float:
        q = self.make()
        per = self.n // self.producers
        batch = self.batch if self.impl in ("gilfree", "faster_fifo") else 0
        procs = [self.ctx.Process(target=_targets.queue_produce, args=(q, per, self.item, batch), daemon=True)
                 for _ in range(self.producers)]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        got = 0
        if batch and self.impl == "gilfree":
            while got < self.n:
                got += len(q.get_many(100_000, timeout=TIMEOUT))
        elif batch:
            while got < self.n:
                got += len(q.get_many(timeout=TIMEOUT, max_messages_to_get=100_000))
        else:
            get = q.get
            for _ in range(self.n):
                get()
            got = self.n
        elapsed = time.perf_counter() - t0
        for p in procs:
            if _finish(p) != 0:
                raise RuntimeError("a producer failed")
        if self.mb:
            return self.n * len(self.item) / elapsed / MB
        return self.n / elapsed

    def close(self) -> None:
        pass


def _register_queue_cases() -> None:
    def bind(impl: str) -> Callable[[dict[str, Any]], Any]:
        return lambda params: QueueFlow(impl, params)

    impls = {impl: bind(impl) for impl in ("stdlib", "stdlib_simple", "gilfree", "faster_fifo")}
    common = "Producers are forked children, the consumer is the parent; a new queue per sample. "
    register(Case("queue_1to1", common + "1 producer puts {messages} small tuples, the parent gets them "
                  "one by one; items/s.", "items/s", True, impls,
                  full={"producers": 1, "messages": 200_000}, quick={"messages": 50_000}))
    register(Case("queue_4to1", common + "4 producers put {messages} small tuples in total, the parent gets "
                  "them one by one; items/s.", "items/s", True, impls,
                  full={"producers": 4, "messages": 200_000}, quick={"messages": 50_000}))
    register(Case("queue_get_many", common + "1 producer, {messages} small tuples: put_many in batches of "
                  "{batch} and get_many where the library has them (the stdlib: put/get one by one); items/s.",
                  "items/s", True, impls,
                  full={"producers": 1, "messages": 200_000, "batch": 1000}, quick={"messages": 50_000}))
    register(Case("queue_1mib", common + "1 producer puts {messages} bytes objects of {item_bytes} bytes, "
                  "the parent gets them; MB/s.", "MB/s", True, impls,
                  full={"producers": 1, "messages": 200, "item_bytes": 1 << 20}, quick={"messages": 50}))


_register_queue_cases()


# ---------------------------------------------------------------------------------------------------
# (f) managers


class ManagerOps:
    """A forked child makes ``ops`` set+get pairs on a ``Manager().dict()`` (or put+get pairs on a
    ``Manager().Queue()``), timed inside the child; ops/s (one op = the pair).  The manager (fork
    context) is started once per implementation, a child per sample."""

    def __init__(self, impl: str, params: dict[str, Any]) -> None:
        self.ctx = _mp(impl).get_context("fork")
        self.kind = params["kind"]
        self.n = params["ops"]
        self.manager = self.ctx.Manager()
        self.obj = self.manager.dict() if self.kind == "dict" else self.manager.Queue()

    def measure(self) -> float:
        r, w = self.ctx.Pipe(duplex=False)
        p = self.ctx.Process(target=_targets.manager_ops, args=(self.kind, self.obj, self.n, w))
        p.start()
        w.close()
        _wait_reply(r, "timing")
        elapsed = r.recv()
        r.close()
        if _finish(p) != 0:
            raise RuntimeError("the manager client failed")
        return self.n / elapsed

    def close(self) -> None:
        del self.obj
        self.manager.shutdown()


class ManagerStart:
    """``Manager()`` until it serves (its first ``dict()`` answered); ms.  Shut down outside the timing."""

    def __init__(self, impl: str, params: dict[str, Any]) -> None:
        self.ctx = _mp(impl).get_context(params["method"])

    def measure(self) -> float:
        t0 = time.perf_counter()
        m = self.ctx.Manager()
        m.dict()
        elapsed = time.perf_counter() - t0
        m.shutdown()
        return elapsed * 1e3

    def close(self) -> None:
        pass


def _register_manager_cases() -> None:
    register(Case("manager_dict_child", "A forked child does {ops} `d[k] = i; d[k]` pairs on a Manager().dict(), "
                  "timed in the child; pairs/s.", "ops/s", True, _per_impl(ManagerOps),
                  full={"kind": "dict", "ops": 5000}, quick={"ops": 1000}))
    register(Case("manager_queue_child", "A forked child does {ops} `q.put(i); q.get()` pairs on a "
                  "Manager().Queue(), timed in the child; pairs/s.", "ops/s", True, _per_impl(ManagerOps),
                  full={"kind": "queue", "ops": 5000}, quick={"ops": 1000}))
    register(Case("manager_start", "Manager() (fork) until its first dict() is answered; ms.", "ms", False,
                  _per_impl(ManagerStart), full={"method": "fork"}))


_register_manager_cases()


# ---------------------------------------------------------------------------------------------------
# (g) pools


class PoolBench:
    """One pool (2 workers, fork) per implementation, started once; each sample is one call.

    ``work``: "map" (``map(f, items, chunksize)``), "cpu" (200 tasks of ~10 ms CPU), "numpy"
    (``apply(array_sum, (a 100 MB array,))``), "start" (start a pool, run one task, stop it).
    Implementations: the stdlib's ``Pool`` ("stdlib") and ``ProcessPoolExecutor`` ("stdlib_executor"),
    gilfree's ``Pool``, loky's executor, joblib's ``Parallel`` (loky backend), mpire's ``WorkerPool``,
    and for "cpu" the same work without a pool ("serial").  Where a library has no chunksize
    argument its default batching is used.
    """

    def __init__(self, impl: str, params: dict[str, Any]) -> None:
        self.impl = impl
        self.work = params["work"]
        self.workers = params.get("workers", 2)
        self.items: Any = list(range(params.get("items", 0)))
        self.chunksize = params.get("chunksize")
        self.func: Any = _targets.square
        if self.work == "cpu":
            self.func = _targets.busy
            self.items = [params["task_ms"]] * params["tasks"]
        elif self.work == "numpy":
            np = require("numpy")
            self.func = _targets.array_sum
            self.items = [np.ones(params["mb"] * MB // 8)]
        self.pool: Any = None
        self.executor: Any = None
        if self.work != "start" and impl != "serial":
            self._open()

    def _open(self) -> None:
        impl, n = self.impl, self.workers
        if impl in ("stdlib", "gilfree"):
            self.pool = _mp(impl).get_context("fork").Pool(n)
        elif impl == "stdlib_executor":
            import concurrent.futures
            import multiprocessing

            self.executor = concurrent.futures.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"))
        elif impl == "loky":
            self.executor = require("loky").get_reusable_executor(max_workers=n)
        elif impl == "joblib":
            joblib = require("joblib")
            self.pool = joblib.Parallel(n_jobs=n, backend="loky")
            self.pool.__enter__()
        elif impl == "mpire":
            self.pool = require("mpire").WorkerPool(n_jobs=n, start_method="fork", keep_alive=True)
        else:
            raise ValueError(impl)

    def _shut(self) -> None:
        if self.executor is not None:
            if self.impl == "loky":
                self.executor.shutdown(wait=True, kill_workers=True)
            else:
                self.executor.shutdown(wait=True)
            self.executor = None
        if self.pool is not None:
            if self.impl == "joblib":
                self.pool.__exit__(None, None, None)
            elif self.impl == "mpire":
                self.pool.terminate()
            else:
                self.pool.terminate()
                self.pool.join()
            self.pool = None

    def _map(self, func: Any, items: list[Any]) -> list[Any]:
        impl, cs = self.impl, self.chunksize
        if impl == "serial":
            return [func(x) for x in items]
        if impl in ("stdlib", "gilfree"):
            return self.pool.map(func, items, cs) if cs else self.pool.map(func, items)
        if impl in ("stdlib_executor", "loky"):
            return list(self.executor.map(func, items, chunksize=cs or 1))
        if impl == "joblib":
            delayed = require("joblib").delayed
            if cs:
                self.pool.batch_size = cs
            return list(self.pool(delayed(func)(x) for x in items))
        if impl == "mpire":
            return list(self.pool.map(func, items, chunk_size=cs) if cs else self.pool.map(func, items))
        raise ValueError(impl)

    def measure(self) -> float:
        if self.work == "start":
            t0 = time.perf_counter()
            self._open()
            self._map(_targets.square, [1])
            elapsed = time.perf_counter() - t0
            self._shut()
            return elapsed * 1e3
        t0 = time.perf_counter()
        out = self._map(self.func, self.items)
        elapsed = time.perf_counter() - t0
        if len(out) != len(self.items):
            raise RuntimeError(f"{self.impl}: {len(out)} results for {len(self.items)} tasks")
        return elapsed * 1e3

    def close(self) -> None:
        self._shut()


def _register_pool_cases() -> None:
    peers = ("stdlib", "stdlib_executor", "gilfree", "loky", "joblib", "mpire")

    def bind(impl: str) -> Callable[[dict[str, Any]], Any]:
        return lambda params: PoolBench(impl, params)

    def impls(names: Iterable[str]) -> dict[str, Any]:
        return {impl: bind(impl) for impl in names}

    common = "Pools of {workers} workers (fork), started once; "
    # the executors (stdlib's, loky's) default to chunksize=1: 100k futures took 26 s and 28 s per
    # sample here, so they sit this case out
    register(Case("pool_map_100k", common + "map(x*x) over a list of {items} ints with each library's "
                  "default chunking (the executors, whose default is 1 item per task, are left out); ms.",
                  "ms", False, impls(("stdlib", "gilfree", "joblib", "mpire")),
                  full={"work": "map", "items": 100_000}, quick={"items": 20_000}))
    register(Case("pool_map_1k_c1", common + "map(x*x) over {items} ints with chunksize=1 (joblib: "
                  "batch_size=1); ms.", "ms", False, impls(peers),
                  full={"work": "map", "items": 1000, "chunksize": 1}, quick={"items": 300}))
    register(Case("pool_cpu_200x10ms", common + "map over {tasks} tasks of {task_ms} ms of CPU each; "
                  "'serial' runs them in this process; ms.", "ms", False, impls(("serial", *peers)),
                  full={"work": "cpu", "tasks": 200, "task_ms": 10}, quick={"tasks": 50}))
    register(Case("pool_numpy_100mb", common + "apply(sum, (a {mb} MB numpy array,)) (executors: submit, "
                  "joblib: one delayed call); ms.", "ms", False,
                  impls(("stdlib", "stdlib_executor", "gilfree", "loky", "joblib")),
                  full={"work": "numpy", "mb": 100}, quick={"mb": 20}))
    register(Case("pool_start", "Start a pool of {workers} workers (fork), run one tiny task, stop it; "
                  "ms until the result (stopping is not timed).", "ms", False, impls(peers),
                  full={"work": "start"}))


_register_pool_cases()


# ---------------------------------------------------------------------------------------------------
# (h) pools on a cluster: Ray and Dask


class _SharedCluster:
    """One local cluster per engine, shared by the implementations of a case (so they are compared
    on the same workers), started by the first setup and stopped by the last close.  Its start-up
    is not timed."""

    users = {"ray": 0, "dask": 0}
    dask_cluster: Any = None

    @classmethod
    def open(cls, engine: str, workers: int) -> Any:
        if engine == "ray":
            ray = require("ray")
            if cls.users["ray"] == 0 and not ray.is_initialized():
                ray.init(address="local", num_cpus=workers, include_dashboard=False, configure_logging=False,
                         log_to_driver=False)
            cls.users["ray"] += 1
            return None
        distributed = require("distributed")
        if cls.users["dask"] == 0:
            cls.dask_cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                        host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                                        silence_logs=40)
        cls.users["dask"] += 1
        return cls.dask_cluster.scheduler_address

    @classmethod
    def close(cls, engine: str) -> None:
        cls.users[engine] -= 1
        if cls.users[engine]:
            return
        if engine == "ray":
            require("ray").shutdown()
        else:
            cls.dask_cluster.close()
            cls.dask_cluster = None


class ClusterBench:
    """``map`` on a local cluster of {workers} single-threaded worker processes, per implementation:
    the stdlib's local ``Pool`` (for scale), gilfree's ``Pool(backend=...)``, ``ray.util.multiprocessing.
    Pool`` ("ray_pool") and joblib's Dask backend ("joblib_dask": ``Parallel`` under
    ``parallel_backend("dask")``), each with its library's default chunking."""

    def __init__(self, impl: str, params: dict[str, Any]) -> None:
        self.impl = impl
        self.engine = params["engine"]
        workers = params.get("workers", 2)
        if params["work"] == "cpu":
            self.func: Any = _targets.busy
            self.items: list[Any] = [params["task_ms"]] * params["tasks"]
        else:
            self.func = _targets.square
            self.items = list(range(params["items"]))
        self.shared = impl != "stdlib"
        self.pool: Any = None
        self.client: Any = None
        if impl == "stdlib":
            import multiprocessing

            self.pool = multiprocessing.get_context("fork").Pool(workers)
            return
        address = _SharedCluster.open(self.engine, workers)
        try:
            if impl.startswith("gilfree"):
                import gilfree

                self.pool = gilfree.Pool(workers, backend=self.engine, address=address)
            elif impl == "ray_pool":
                self.pool = require("ray.util.multiprocessing").Pool(workers)
            elif impl == "joblib_dask":
                self.client = require("distributed").Client(address, set_as_default=True)
                self.joblib = require("joblib")
            else:
                raise ValueError(impl)
        except BaseException:
            self.close()
            raise

    def measure(self) -> float:
        t0 = time.perf_counter()
        if self.impl == "joblib_dask":
            joblib = self.joblib
            with joblib.parallel_backend("dask"):
                out = joblib.Parallel()(joblib.delayed(self.func)(x) for x in self.items)
        else:
            out = self.pool.map(self.func, self.items)
        elapsed = time.perf_counter() - t0
        if len(out) != len(self.items):
            raise RuntimeError(f"{self.impl}: {len(out)} results for {len(self.items)} tasks")
        return elapsed * 1e3

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            if self.impl != "ray_pool":
                self.pool.join()
            self.pool = None
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.shared:
            self.shared = False
            _SharedCluster.close(self.engine)


def _register_cluster_cases() -> None:
    def bind(impl: str) -> Callable[[dict[str, Any]], Any]:
        return lambda params: ClusterBench(impl, params)

    for engine, peer in (("ray", "ray_pool"), ("dask", "joblib_dask")):
        impls = {name: bind(name) for name in ("stdlib", f"gilfree_{engine}", peer)}
        common = (f"A local {engine} cluster of {{workers}} single-threaded workers (started once, not timed), "
                  f"gilfree's Pool(backend={engine!r}) beside {peer}; 'stdlib' is a local fork Pool for scale; ")
        register(Case(f"{engine}_map_10k", common + "map(x*x) over {items} ints, default chunking; ms.", "ms",
                      False, impls, full={"engine": engine, "work": "map", "items": 10_000},
                      quick={"items": 2_000}))
        register(Case(f"{engine}_cpu_200x10ms", common + "map over {tasks} tasks of {task_ms} ms of CPU each; ms.",
                      "ms", False, impls, full={"engine": engine, "work": "cpu", "tasks": 200, "task_ms": 10},
                      quick={"tasks": 50}))


_register_cluster_cases()


# ---------------------------------------------------------------------------------------------------
# Statistics


def _quantile(data: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of non-empty ``data``."""
    s = sorted(data)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _summary(samples: list[float]) -> dict[str, float]:
    return {
        "median": _quantile(samples, 0.5),
        "min": min(samples),
        "max": max(samples),
        "q1": _quantile(samples, 0.25),
        "q3": _quantile(samples, 0.75),
        "n": len(samples),
    }


def _speedup(base: float, other: float, higher_is_better: bool) -> float:
    """How many times better ``other`` is than ``base`` (> 1: better), for either direction."""
    if higher_is_better:
        return other / base if base > 0 else float("inf")
    return base / other if other > 0 else float("inf")


# ---------------------------------------------------------------------------------------------------
# Running


def _describe(case: Case, params: dict[str, Any]) -> str:
    try:
        return case.description.format(**params)
    except (KeyError, IndexError, ValueError):
        return case.description


def select_cases(only: Iterable[str] | None = None, methods: Iterable[str] | None = None) -> list[Case]:
    """The registered cases matching any pattern of ``only`` (a glob or a substring of the name);
    of the process start cases, only those of ``methods``."""
    import fnmatch

    patterns = [p for item in (only or []) for p in str(item).split(",") if p]
    wanted_methods = None if methods is None else {m for item in methods for m in str(item).split(",") if m}
    selected = []
    for case in CASES:
        if patterns and not any(fnmatch.fnmatchcase(case.name, p) or p in case.name for p in patterns):
            continue
        if (
            wanted_methods is not None
            and case.start_method is not None
            and case.start_method not in wanted_methods
        ):
            continue
        selected.append(case)
    return selected


def _as_bench(obj: Any) -> Any:
    if hasattr(obj, "measure"):
        return obj

    class _Plain:
        measure = staticmethod(obj)

        @staticmethod
        def close() -> None:
            pass

    return _Plain()


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def run_case(
    case: Case,
    quick: bool = False,
    repeat: int | None = None,
    impls: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Set up, warm up and measure every implementation of ``case``, interleaved; return the result."""
    import gc

    rounds = repeat if repeat is not None else (QUICK_REPEAT if quick else DEFAULT_REPEAT)
    if rounds < 1:
        raise ValueError("repeat must be at least 1")
    params = case.params(quick)
    wanted = list(case.impls) if impls is None else [i for i in case.impls if i in set(impls)]
    names = sorted(wanted, key=lambda i: IMPLEMENTATIONS.index(i))
    samples: dict[str, list[float]] = {}
    skipped: dict[str, str] = {}
    errors: dict[str, str] = {}
    orders: list[list[str]] = []
    benches: dict[str, Any] = {}
    t_start = time.perf_counter()

    def measure(name: str) -> float | None:
        try:
            value = float(benches[name].measure())
        except Exception as exc:
            errors[name] = _error(exc)
            _close(name)
            return None
        return value

    def _close(name: str) -> None:
        bench = benches.pop(name, None)
        if bench is not None:
            try:
                bench.close()
            except Exception as exc:
                errors.setdefault(name, f"while closing: {_error(exc)}")

    try:
        for name in names:
            try:
                benches[name] = _as_bench(case.impls[name](params))
            except Skip as exc:
                skipped[name] = str(exc)
            except Exception as exc:
                errors[name] = _error(exc)
        active = [n for n in names if n in benches]
        for w in range(case.warmup):
            k = w % max(1, len(active))
            for name in active[k:] + active[:k]:
                if name in benches:
                    gc.collect()
                    measure(name)
        for r in range(rounds):
            active = [n for n in names if n in benches]
            if not active:
                break
            k = r % len(active)
            order = active[k:] + active[:k]
            orders.append(order)
            for name in order:
                gc.collect()
                value = measure(name)
                if value is not None:
                    samples.setdefault(name, []).append(value)
    finally:
        for name in list(benches):
            _close(name)

    stats = {name: {"samples": s, **_summary(s)} for name, s in samples.items()}
    ratios: dict[str, Any] = {}
    base = stats.get(BASELINE)
    if base is not None:
        for name, st in stats.items():
            if name == BASELINE:
                continue
            paired = [_speedup(b, o, case.higher_is_better) for b, o in zip(base["samples"], st["samples"])]
            ratios[name] = {
                "speedup": _speedup(base["median"], st["median"], case.higher_is_better),
                "paired": paired,
                "paired_min": min(paired) if paired else None,
                "paired_max": max(paired) if paired else None,
            }
    return {
        "name": case.name,
        "description": _describe(case, params),
        "unit": case.unit,
        "higher_is_better": case.higher_is_better,
        "params": params,
        "rounds": rounds,
        "order": orders,
        "stats": stats,
        "ratios": ratios,
        "skipped": skipped,
        "errors": errors,
        "seconds": time.perf_counter() - t_start,
    }


#: Facts about the latest :func:`run` (leftover processes, /dev/shm entries, wall time); saved in the JSON.
last_run: dict[str, Any] = {}


def _helper_pids() -> dict[str, int | None]:
    """Long-lived helper processes of both libraries (fork servers, the stdlib's resource tracker)."""
    pids: dict[str, int | None] = {}
    mod = sys.modules.get("gilfree._start._forkserver")
    pids["gilfree.forkserver"] = getattr(getattr(mod, "forkserver", None), "pid", None)
    mod = sys.modules.get("multiprocessing.forkserver")
    pids["stdlib.forkserver"] = getattr(getattr(mod, "_forkserver", None), "_forkserver_pid", None)
    mod = sys.modules.get("multiprocessing.resource_tracker")
    pids["stdlib.resource_tracker"] = getattr(getattr(mod, "_resource_tracker", None), "_pid", None)
    # gilfree's shared-memory tracker exits by itself when its last client (this process) exits
    mod = sys.modules.get("gilfree._tracker")
    pids["gilfree.shm_tracker"] = mod.tracker_pid() if mod is not None else None
    return pids


def _stop_new_helpers(before: dict[str, int | None]) -> None:
    """Stop the helper processes this run started (those running before are left alone)."""
    after = _helper_pids()
    stops = {
        "gilfree.forkserver": lambda: sys.modules["gilfree._start._forkserver"].forkserver.stop(),
        "stdlib.forkserver": lambda: sys.modules["multiprocessing.forkserver"]._forkserver._stop(),
        "stdlib.resource_tracker": lambda: sys.modules[
            "multiprocessing.resource_tracker"
        ]._resource_tracker._stop(),
    }
    for key, stop in stops.items():
        if after.get(key) and not before.get(key):
            try:
                stop()
            except Exception:  # private API of the stdlib: at exit they stop by themselves anyway
                pass


def _children_of(pid: int) -> dict[int, str]:
    """{pid: "state cmdline"} of the processes whose parent is ``pid`` (Linux; {} elsewhere)."""
    from gilfree.util import children_of

    return {child: f"{state} {cmd}" for child, (state, cmd) in children_of({pid}).items()}


def _shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def _warm_allocator() -> None:
    """Put the C allocator in the state a process reaches once it has freed a large block.

    glibc serves blocks of 128 KiB or more with mmap (fresh, page-faulting memory every time) until
    the first such block of up to 32 MiB is freed; from then on its mmap and trim thresholds are
    raised and 1 MB messages reuse heap memory.  Which state a process is in depends on its history
    (the tour has sent a 16 MB array before it runs the benchmarks; a fresh script has not), and it
    moves the stdlib's large-message throughput by 2-4x.  Freeing one 16 MiB block makes every run
    start from the same, "warm" state -- the less flattering one for gilfree.  Elsewhere: no effect.
    """
    block = bytearray(16 << 20)
    del block


HEAP_STATES = ("warm", "natural")


def run(
    quick: bool = False,
    only: list[str] | None = None,
    repeat: int | None = None,
    methods: list[str] | None = None,
    impls: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
    heap: str = "warm",
) -> list[dict[str, Any]]:
    """Run the selected cases; return one result dict per case (see :func:`run_case`).

    ``only``: name patterns (globs or substrings); ``methods``: start methods of the process start
    cases; ``impls``: implementations to measure (default all); ``progress``: called with a line of
    text as each case starts and ends (``None``: silent); ``heap``: "warm" (default) first brings
    the allocator to a known state (see :func:`_warm_allocator`), "natural" leaves it as the calling
    process has it.  Helper processes started on the way (fork servers, the stdlib's resource
    tracker) are stopped at the end; anything else still running is recorded in :data:`last_run`.
    """
    if heap not in HEAP_STATES:
        raise ValueError(f"heap must be one of {HEAP_STATES}, not {heap!r}")
    say = progress or (lambda line: None)
    cases = select_cases(only, methods)
    if heap == "warm":
        _warm_allocator()
    helpers = _helper_pids()
    children_before = set(_children_of(os.getpid()))
    shm_before = _shm_entries()
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    results = []
    try:
        for i, case in enumerate(cases, 1):
            say(f"[{i}/{len(cases)}] {case.name} ...")
            result = run_case(case, quick=quick, repeat=repeat, impls=impls)
            results.append(result)
            say(f"[{i}/{len(cases)}] {_one_line(result)}")
    finally:
        _stop_new_helpers(helpers)
        leftovers = {}
        deadline = time.monotonic() + 5
        while True:  # give exiting children a moment; zombies of ours are reaped by the libraries
            for mod in ("multiprocessing", "gilfree"):
                if mod in sys.modules:
                    sys.modules[mod].active_children()
            known = set(_helper_pids().values())  # helpers that outlive the run on purpose
            leftovers = {
                p: v for p, v in _children_of(os.getpid()).items() if p not in children_before and p not in known
            }
            if not leftovers or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        shm_new = sorted(_shm_entries() - shm_before)
        last_run.clear()
        last_run.update(
            {
                "wall_seconds": time.perf_counter() - t0,
                "heap": heap,
                "loadavg_before": load_before,
                "loadavg_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                "leftover_processes": {str(k): v for k, v in leftovers.items()},
                "dev_shm_new": shm_new,
            }
        )
        if leftovers:
            say(f"WARNING: processes left running after the benchmarks: {leftovers}")
        if shm_new:
            say(f"WARNING: new entries in /dev/shm after the benchmarks: {shm_new}")
    return results


# ---------------------------------------------------------------------------------------------------
# Reporting


def _fmt(x: float) -> str:
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if x < 100 else f"{x:.0f}x"


def _one_line(result: dict[str, Any]) -> str:
    parts = []
    for name, st in result["stats"].items():
        parts.append(f"{name} {_fmt(st['median'])} {result['unit']}")
    for name, r in result["ratios"].items():
        parts.append(f"{name} {_fmt_ratio(r['speedup'])} vs {BASELINE}")
    for name, msg in result["errors"].items():
        parts.append(f"{name} ERROR {msg}")
    for name in result["skipped"]:
        parts.append(f"{name} skipped")
    return f"{result['name']}: " + ", ".join(parts) + f"  ({result['seconds']:.1f} s)"


def format_table(results: list[dict[str, Any]], markdown: bool = False) -> str:
    """The results as a table (plain text, or Markdown), followed by notes on skips and errors."""
    present = [i for i in IMPLEMENTATIONS if any(i in r["stats"] or i in r["errors"] for r in results)]
    # ratio columns only when there is a baseline to compare with
    others = [i for i in present if i != BASELINE] if BASELINE in present else []
    header = ["case", "unit"] + [f"{i} median (min-max)" for i in present]
    header += [f"{i} vs {BASELINE} (x faster)" for i in others]
    rows = []
    notes = []
    # an implementation skipped everywhere (an optional peer not installed) gets a note, not a column
    for impl in IMPLEMENTATIONS:
        reasons = sorted({r["skipped"][impl] for r in results if impl in r["skipped"]})
        if impl not in present and reasons:
            notes.append(f"{impl}: skipped ({'; '.join(reasons)})")
    for r in results:
        unit = r["unit"] + (" ↑" if r["higher_is_better"] else " ↓")
        row = [r["name"], unit]
        for impl in present:
            st = r["stats"].get(impl)
            if st is not None:
                row.append(f"{_fmt(st['median'])} ({_fmt(st['min'])}-{_fmt(st['max'])})")
            elif impl in r["errors"]:
                row.append("error")
                notes.append(f"{r['name']} / {impl}: error: {r['errors'][impl]}")
            elif impl in r["skipped"]:
                row.append("skipped")
                notes.append(f"{r['name']} / {impl}: skipped: {r['skipped'][impl]}")
            else:
                row.append("-")
        for impl in others:
            ratio = r["ratios"].get(impl)
            if ratio is None:
                row.append("-")
            else:
                cell = _fmt_ratio(ratio["speedup"])
                if ratio["paired"] and len(ratio["paired"]) > 1:
                    cell += f" [{_fmt_ratio(ratio['paired_min'])}-{_fmt_ratio(ratio['paired_max'])}]"
                row.append(cell)
        for impl, msg in r["errors"].items():
            if impl in r["stats"]:
                notes.append(f"{r['name']} / {impl}: error after {r['stats'][impl]['n']} samples: {msg}")
        rows.append(row)

    if markdown:
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---", "---"] + ["--:"] * (len(header) - 2)) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        widths = [max(len(str(row[c])) for row in [header, *rows]) for c in range(len(header))]

        def line(cells: list[str]) -> str:
            return "  ".join(
                str(c).ljust(w) if j < 2 else str(c).rjust(w) for j, (c, w) in enumerate(zip(cells, widths))
            ).rstrip()

        lines = [line(header), line(["-" * w for w in widths])] + [line(row) for row in rows]
    rounds = sorted({r["rounds"] for r in results})
    lines.append("")
    legend = (
        f"Median of {'/'.join(map(str, rounds)) or '?'} interleaved rounds, (min-max) of the samples; "
        f"↓ lower is better, ↑ higher is better."
    )
    if others:
        legend += (
            f" '{' / '.join(others)} vs {BASELINE}' = how many times faster than {BASELINE} (> 1: better), "
            f"from the medians; [range] of the per-round paired ratios."
        )
    lines.append(legend)
    if notes:
        lines.append("")
        lines += [("- " if markdown else "  ") + n for n in notes]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """Where the numbers come from: interpreter, platform, CPUs, load, library versions."""
    import datetime
    import multiprocessing
    import platform

    import gilfree

    info: dict[str, Any] = {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version,
        "python_implementation": platform.python_implementation(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gilfree_version": getattr(gilfree, "__version__", None),
        "start_methods": multiprocessing.get_all_start_methods(),
    }
    try:
        import numpy

        info["numpy_version"] = numpy.__version__
    except ImportError:
        info["numpy_version"] = None
    return info


def save_json(results: list[dict[str, Any]], path: str, settings: dict[str, Any] | None = None) -> str:
    """Write machine info, settings, the latest run's facts and ``results`` to ``path``; return it."""
    import json

    doc = {
        "machine": machine_info(),
        "settings": settings or {},
        "run": dict(last_run),
        "results": results,
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    default_json = os.path.join(_HERE, "results", "latest.json")
    parser = argparse.ArgumentParser(
        description="Benchmark gilfree against the stdlib's multiprocessing (reporting only).",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_REPEAT} rounds and smaller sizes (the tour)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        metavar="N",
        help=f"rounds per case (default {DEFAULT_REPEAT}, {QUICK_REPEAT} with --quick)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAME",
        help="run the cases whose name matches (glob or substring; repeat or comma-separate)",
    )
    parser.add_argument(
        "--methods",
        default=None,
        metavar="M[,M]",
        help=f"start methods of the process start cases (default: {','.join(START_METHODS)})",
    )
    parser.add_argument(
        "--impls",
        default=None,
        metavar="I[,I]",
        help=f"implementations to measure (default: all of {','.join(IMPLEMENTATIONS)})",
    )
    parser.add_argument(
        "--heap",
        choices=HEAP_STATES,
        default="warm",
        help="allocator state to start from: warm (default, reproducible) or natural "
        "(as this fresh process has it); see README",
    )
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument(
        "--json",
        default=default_json,
        metavar="PATH",
        help="where to write the results (default: %(default)s)",
    )
    parser.add_argument("--no-json", action="store_true", help="do not write a JSON file")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `gilfree bench -- --quick` passes the separator on
        argv = argv[1:]
    args = parser.parse_args(argv)

    if args.list:
        for case in select_cases(args.only, [args.methods] if args.methods else None):
            print(f"{case.name}  [{case.unit}, {'higher' if case.higher_is_better else 'lower'} is better]")
            print(f"    {_describe(case, case.params(args.quick))}")
        return 0
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    methods = args.methods.split(",") if args.methods else None
    impls = args.impls.split(",") if args.impls else None
    if not select_cases(args.only, methods):
        parser.error("no case matches --only/--methods (see --list)")

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    results = run(
        quick=args.quick,
        only=args.only,
        repeat=args.repeat,
        methods=methods,
        impls=impls,
        progress=progress,
        heap=args.heap,
    )
    print(format_table(results, markdown=args.markdown))
    if not args.no_json:
        settings = {
            "quick": args.quick,
            "repeat": args.repeat,
            "only": args.only,
            "methods": methods,
            "impls": impls,
            "heap": args.heap,
        }
        path = save_json(results, args.json, settings)
        print(f"\nresults written to {os.path.relpath(path)}", file=sys.stderr)
    return 1 if any(r["errors"] for r in results) or last_run.get("leftover_processes") else 0


if __name__ == "__main__":
    sys.exit(main())
