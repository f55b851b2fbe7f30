"""The ``gilfree`` command (layer L9): ``gilfree tour``, ``gilfree bench``, ``gilfree manager serve``.

``python -m gilfree tour`` walks through what gilfree does, one chapter per capability, each chapter
running the real thing (processes, pipes, sockets) and printing what happened, then ends with a short
benchmark against the stdlib measured on the spot.  ``python -m gilfree bench`` runs the full
side-by-side benchmark (``benchmarks/run.py`` of a source checkout).  ``gilfree manager serve`` runs a
manager server for other machines (see :func:`manager_serve`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import queue
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import gilfree

__all__ = ["main"]

# ---------------------------------------------------------------------------------------------------
# Targets run by the tour's child processes (module-level, so every start method can import them).


def _square(n: int, conn: gilfree.Connection) -> None:
    conn.send((gilfree.current_process().name, os.getpid(), n * n))
    conn.close()


def _echo(conn: gilfree.Connection) -> None:
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        conn.send(msg)


def _serve_one(listener_address: object, authkey: bytes, conn: gilfree.Connection) -> None:
    from gilfree.connection import Client

    try:
        with Client(listener_address, authkey=authkey) as c:
            conn.send(f"received {c.recv()!r}")
    except gilfree.AuthenticationError as exc:
        conn.send(f"AuthenticationError({exc})")


def _bank(balance: object, lock: object, amount: int) -> None:
    for _ in range(10000):
        with lock:  # type: ignore[attr-defined]
            balance.value += amount  # type: ignore[attr-defined]


def _fill_rows(arr: object, rows: slice, value: float) -> None:
    arr[rows] = value  # type: ignore[index]


def _hold_and_die(lock: object, ready: object) -> None:
    lock.acquire()  # type: ignore[attr-defined]
    ready.set()  # type: ignore[attr-defined]
    time.sleep(60)  # killed long before


def _square_into(numbers: list[int], q: object) -> None:
    for n in numbers:
        q.put(n * n)  # type: ignore[attr-defined]


def _consume(q: object, results: object) -> None:
    while True:
        item = q.get()  # type: ignore[attr-defined]
        if item is None:
            return
        results.put(item)  # type: ignore[attr-defined]


def _array_through_queue(q: object, out: object) -> None:
    arr = q.get()  # type: ignore[attr-defined]
    out.put((arr.shape, float(arr[-1])))  # type: ignore[attr-defined]


def _print_records(records: object) -> None:
    for record in records:  # type: ignore[attr-defined]
        print(f"   Name: {record[0]}  Score: {record[1]}", flush=True)


def _insert_record(record: object, records: object) -> None:
    records.append(record)  # type: ignore[attr-defined]
    print("   New record added!", flush=True)


_BOARD: dict[str, object] = {}


def _board() -> dict[str, object]:
    """The tour's served manager hands out this one dict (it lives in the server process)."""
    return _BOARD


def _tour_client(address: object, authkey: bytes, conn: gilfree.Connection) -> None:
    from gilfree.managers import SyncManager

    class BoardManager(SyncManager):
        pass

    BoardManager.register("board")
    m = BoardManager(address, authkey)
    try:
        m.connect()
        board = m.board()  # type: ignore[attr-defined]
        board.update(visitor=os.getpid())
        conn.send(f"connected, wrote its pid; the board now holds {sorted(board.keys())}")
    except gilfree.AuthenticationError as exc:
        conn.send(f"refused: AuthenticationError({exc})")
    conn.close()


# ---------------------------------------------------------------------------------------------------
# Presentation helpers

_WIDTH = 78


def _title(number: int, text: str) -> None:
    print()
    print(f"{number}. {text}")
    print("=" * min(_WIDTH, len(text) + 4))


def _say(text: str) -> None:
    print(textwrap.fill(" ".join(text.split()), _WIDTH))


def _show(label: str, value: object) -> None:
    print(f"   {label:<34} {value}")


def _code(text: str) -> None:
    print(textwrap.indent(textwrap.dedent(text).strip("\n"), "    | "))


# ---------------------------------------------------------------------------------------------------
# Chapters


def chapter_processes() -> None:
    _title(1, "Processes, under every start method")
    _say("""Each start method runs the same target in a child.  'fork' copies the parent; 'spawn'
    starts a fresh interpreter; 'forkserver' forks children from a small server started once.""")
    for method in gilfree.get_all_start_methods():
        ctx = gilfree.get_context(method)
        r, w = ctx.Pipe(duplex=False)
        t0 = time.perf_counter()
        p = ctx.Process(target=_square, args=(12, w))
        p.start()
        w.close()
        name, pid, result = r.recv()
        p.join()
        r.close()
        _show(f"{method}:", f"{name} (pid {pid}) computed 12*12 = {result}, exit code {p.exitcode}, "
              f"{(time.perf_counter() - t0) * 1000:.0f} ms")
    p = gilfree.get_context("spawn").Process(target=time.sleep, args=(30,))
    p.start()
    p.terminate()
    p.join()
    _show("a terminated child:", repr(p))


def chapter_lambdas() -> None:
    _title(2, "Functions just work: lambdas and closures in a spawned child")
    _say("""The stdlib pickles functions by name, so a lambda or a closure sent to a 'spawn' child
    raises PicklingError.  gilfree tries the stdlib pickler first and falls back to pickling by
    value (cloudpickle) only for what cannot be found by name.""")
    ctx = gilfree.get_context("spawn")
    r, w = ctx.Pipe(duplex=False)
    base = 1000

    def closure(x: int) -> None:
        w.send(("closure", base + x))

    for target, args in ((lambda: w.send(("lambda", sum(range(10)))), ()), (closure, (7,))):
        p = ctx.Process(target=target, args=args)
        p.start()
        kind, value = r.recv()
        p.join()
        _show(f"a {kind} ran in a spawned child:", f"result {value}, exit code {p.exitcode}")
    w.close()
    r.close()
    _say("""And what cannot be pickled at all is refused in the sender, naming what and where:""")
    import threading

    try:
        gilfree.reduction.dumps({"jobs": [1, 2, threading.Lock()]})
    except gilfree.PicklingError as exc:
        _show("sending {'jobs': [1, 2, Lock()]}:", f"PicklingError at {exc.path}: {exc.culprit_type}")


def chapter_pipes() -> None:
    _title(3, "Pipes: messages, bytes, numpy arrays, connections")
    ctx = gilfree.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_echo, args=(b,))
    p.start()
    b.close()
    t0 = time.perf_counter()
    n = 2000
    for i in range(n):
        a.send(i)
        a.recv()
    rtt = (time.perf_counter() - t0) / n * 1e6
    _show("round trip of a small object:", f"{rtt:.1f} us (to a spawned echo process)")
    try:
        import numpy as np

        arr = np.arange(2_000_000, dtype=np.float64)
        t0 = time.perf_counter()
        a.send(arr)
        back = a.recv()
        dt = time.perf_counter() - t0
        _show("a 16 MB numpy array there and back:", f"{dt * 1000:.0f} ms, equal: {bool((back == arr).all())}, "
              f"writeable: {back.flags.writeable}")
    except ImportError:
        _show("numpy:", "not installed (pip install gilfree[numpy]); skipped")
    a.close()
    p.join()
    _say("""Large buffers travel out of band: the pickle holds a reference, the bytes go straight from
    the array's memory into the pipe and straight into the receiver's new array.""")


def chapter_listener() -> None:
    _title(4, "Listener and Client: authenticated connections")
    _say("""With an authkey, both sides prove they know it (HMAC-SHA256 challenge-response, as in
    CPython 3.12+) before a single pickled byte is read.  A client with the wrong key is refused on
    both ends, and the listener goes on serving.""")
    from gilfree.connection import Listener

    key = os.urandom(16)
    ctx = gilfree.get_context("spawn")
    with Listener(("127.0.0.1", 0), authkey=key) as listener:
        _show("listening on:", listener.address)
        for label, client_key in (("right key", key), ("wrong key", b"not the key"), ("right key again", key)):
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_serve_one, args=(listener.address, client_key, w))
            p.start()
            w.close()
            try:
                conn = listener.accept()
                conn.send(f"hello, {label}")
                conn.close()
                outcome = "accepted"
            except gilfree.AuthenticationError as exc:
                outcome = f"refused: AuthenticationError({exc})"
            client_saw = r.recv()
            p.join()
            r.close()
            _show(f"{label}, listener:", outcome)
            _show(f"{label}, client:", client_saw)


def chapter_shared_state() -> None:
    _title(5, "Shared state: Value, shared numpy arrays, robust locks")
    _say("""The seed's bank: two processes deposit and withdraw 10,000 times each under a Lock, on a
    shared Value.  The balance must end where it started.""")
    ctx = gilfree.get_context("spawn")
    balance = ctx.Value("i", 100)
    lock = ctx.Lock()
    procs = [ctx.Process(target=_bank, args=(balance, lock, amount)) for amount in (-1, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    _show("Final balance =", balance.value)
    try:
        import numpy as np

        arr = gilfree.shared_array((2, 1_000_000), np.float64)
        procs = [ctx.Process(target=_fill_rows, args=(arr, slice(i, i + 1), float(i + 1))) for i in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        _show("a 16 MB shared numpy array:", f"row sums written by two children: {arr.sum(axis=1).tolist()}")
        _show("what travelled to each child:", f"a handle of {len(gilfree.reduction.dumps(arr))} bytes, no copy")
    except ImportError:
        _show("numpy:", "not installed (pip install gilfree[numpy]); skipped")
    _say("""A lock whose holder dies: the stdlib's waiter would block forever.  gilfree's waiter finds
    the dead holder within a tenth of a second and says so -- or takes the lock over, if the lock
    was made for that.""")
    for mode in ("raise", "takeover"):
        lock = ctx.Lock(on_owner_death=mode)
        ready = ctx.Event()
        p = ctx.Process(target=_hold_and_die, args=(lock, ready))
        p.start()
        ready.wait(30)
        p.kill()
        p.join()
        t0 = time.perf_counter()
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", gilfree.OwnerDiedWarning)
                lock.acquire(timeout=10)
            outcome = f"took it over from pid {lock.recovered_from}"
            lock.release()
        except gilfree.OwnerDiedError as exc:
            outcome = f"OwnerDiedError: holder pid {exc.pid} is dead"
        _show(f"holder SIGKILLed, on_owner_death={mode!r}:", f"{outcome}, after {time.perf_counter() - t0:.2f} s")


def chapter_queues() -> None:
    _title(6, "Queues: shared memory, no feeder thread, survives a killed consumer")
    _say("""The seed's producer puts four squares and returns; it is joined before anyone reads (with
    the stdlib's feeder thread that can deadlock for large data), then the parent reads them.""")
    ctx = gilfree.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_square_into, args=([1, 2, 3, 4], q))
    p.start()
    p.join()
    _show("joined before reading; exit code:", p.exitcode)
    _show("Queue elements:", [q.get() for _ in range(4)])
    try:
        import numpy as np

        out = ctx.Queue()
        big = np.arange(100 * 1_000_000 // 8, dtype=np.float64)
        p = ctx.Process(target=_array_through_queue, args=(q, out))
        p.start()
        t0 = time.perf_counter()
        q.put(big)
        shape, last = out.get(timeout=60)
        p.join()
        _show("a 100 MB numpy array through a queue:", f"{(time.perf_counter() - t0) * 1000:.0f} ms, child saw "
              f"shape {shape}, last value {last:.0f} (its own shared segment, not the ring)")
    except ImportError:
        _show("numpy:", "not installed (pip install gilfree[numpy]); skipped")
    _say("""A consumer killed with SIGKILL while it works: the queue's lock is robust and every
    message is published or consumed by a single store, so the others go on and nothing is torn or
    duplicated; at most the message in the dead consumer's hands is lost.""")
    work, results = ctx.Queue(), ctx.Queue()
    consumers = [ctx.Process(target=_consume, args=(work, results)) for _ in range(2)]
    for c in consumers:
        c.start()
    work.put_many(range(20_000))
    time.sleep(0.05)
    consumers[0].kill()
    consumers[0].join()
    work.put_many([None, None])
    consumers[1].join()
    got: list[int] = []
    while True:
        try:
            got += results.get_many(30_000, timeout=1)
        except queue.Empty:
            break
    _show("20,000 messages, one consumer killed:", f"{len(got)} delivered, {len(set(got))} distinct, "
          f"{20_000 - len(got)} lost (at most 1 allowed)")


def chapter_manager() -> None:
    _title(7, "Managers: shared objects in a server process, on this machine or across the network")
    _say("""The seed's records: a list lives in the manager's server process; one child appends a
    record, another prints them all, each through a proxy.""")
    ctx = gilfree.get_context("spawn")
    with ctx.Manager() as manager:
        records = manager.list([("Sam", 10), ("Adam", 9), ("Kevin", 9)])  # type: ignore[attr-defined]
        for target, args in ((_insert_record, (("Jeff", 8), records)), (_print_records, (records,))):
            p = ctx.Process(target=target, args=args)
            p.start()
            p.join()
        _show("the proxy in this process:", repr(records)[:70] + "...>")
    _say("""Served on a loopback TCP port: a second process that knows the authkey connects and uses the
    server's objects; one that does not is refused before anything it sends is unpickled (HMAC-SHA256
    both ways; add TLS with TLSConfig, or run `gilfree manager serve` for other machines).""")
    from gilfree.managers import DictProxy, SyncManager

    class BoardManager(SyncManager):
        pass

    BoardManager.register("board", _board, DictProxy)
    key = os.urandom(16)
    with BoardManager(("127.0.0.1", 0), key, ctx=ctx) as served:
        board = served.board()  # type: ignore[attr-defined]
        board["owner"] = os.getpid()
        _show("serving on:", f"{served.address[0]}:{served.address[1]}")
        for label, client_key in (("with the authkey", key), ("with a wrong key", b"guess")):
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_tour_client, args=(served.address, client_key, w))
            p.start()
            w.close()
            _show(f"a second process {label}:", r.recv())
            p.join()
            r.close()
        t0 = time.perf_counter()
        n = 2000
        for i in range(n):
            board["i"] = i
            board["i"]
        _show("set+get on the served dict:", f"{n / (time.perf_counter() - t0):,.0f} ops/s (TCP loopback)")


def _pool_square(n: int) -> int:
    print(f"Worker process id for {n}: {os.getpid()}", flush=True)
    return n * n


def _pool_die_on(n: int) -> int:
    if n == 13:
        os.kill(os.getpid(), 9)  # SIGKILL, as the OOM killer would
    time.sleep(0.01)
    return n


def chapter_pool() -> None:
    _title(8, "Pools: lambdas, progress bars, and a worker killed mid-map that the pool survives")
    _say("""The seed's pool: map a function over a list; each worker prints its pid.""")
    ctx = gilfree.get_context("spawn")
    with ctx.Pool() as p:
        _show("result:", p.map(_pool_square, [1, 2, 3, 4, 5]))
    _say("""A lambda (the stdlib raises PicklingError), with a progress bar (tqdm, optional).""")
    with ctx.Pool(2) as p:
        scale = 3
        try:
            out = p.map(lambda x: x * scale, range(2000), chunksize=50, progress={"desc": "lambda map", "ncols": 70})
        except ImportError as exc:
            _show("progress bar:", f"{exc}; mapping without it")
            out = p.map(lambda x: x * scale, range(2000), chunksize=50)
        _show("sum of the results:", sum(out))
        _say("""A worker is SIGKILLed while it runs item 13 (the stdlib's pool would wait forever for
        that result).  Here exactly that task fails with WorkerLostError, the worker is replaced, and
        the other tasks finish; with on_worker_death='retry' the task would run again.""")
        results = [p.apply_async(_pool_die_on, (i,)) for i in range(20)]
        ok, lost = [], []
        for r in results:
            try:
                ok.append(r.get(60))
            except gilfree.WorkerLostError as exc:
                lost.append(exc)
        _show("tasks that succeeded:", f"{len(ok)} of 20")
        _show("the lost task:", str(lost[0]) if lost else "none")
        _show("the pool goes on:", p.map(abs, [-1, -2, -3]))


def _cluster_task(n: int) -> tuple[int, int]:
    return n * n, os.getpid()


def chapter_cluster() -> None:
    _title(9, "Beyond one machine: the same Pool on a Dask (or Ray) cluster")
    _say("""Pool(backend="dask") runs the same map on a Dask cluster: without an address the pool
    starts a local one (loopback, one worker process per slot) and stops it when it closes; with
    address="tcp://host:8786" it joins an existing scheduler and leaves it running.  The function
    goes to the cluster's workers once per call, the pool's chunking keeps Dask's per-task cost
    (a millisecond or two) low, and errors come back with the remote traceback.""")
    import importlib.util

    if importlib.util.find_spec("distributed") is None:
        _show("dask:", "not installed; pip install 'gilfree[dask]' to run this chapter")
    else:
        t0 = time.perf_counter()
        with gilfree.Pool(2, backend="dask") as p:
            started = time.perf_counter() - t0
            out = p.map(_cluster_task, range(1000))
            _show("local Dask cluster started in:", f"{started:.1f} s")
            _show("sum of squares of 0..999:", sum(v for v, _ in out))
            _show("worker processes used:", len({pid for _, pid in out}))
            try:
                p.apply(int, ("not a number",))
            except ValueError as exc:
                _show("a remote error:", f"{type(exc).__name__}: {exc} (remote traceback chained)")
    if importlib.util.find_spec("ray") is None:
        _show("ray:", "not installed; pip install 'gilfree[ray]' for Pool(backend='ray')")
        return
    if os.environ.get("GILFREE_TOUR_SKIP_RAY"):  # the test suite's: it tests Ray on its own cluster
        _show("ray:", "skipped (GILFREE_TOUR_SKIP_RAY is set)")
        return
    _say("""Ray is installed: the same map with backend="ray" (a private local Ray instance, which
    takes Ray several seconds to start).""")
    t0 = time.perf_counter()
    with gilfree.Pool(2, backend="ray") as p:
        out = p.map(_cluster_task, range(1000))
        _show("sum of squares on Ray:", f"{sum(v for v, _ in out)} ({time.perf_counter() - t0:.1f} s with start-up)")


def _find_benchmarks() -> Path | None:
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "benchmarks" / "run.py"
        if candidate.exists():
            return candidate
    return None


def _load_benchmarks() -> object | None:
    path = _find_benchmarks()
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("gilfree_benchmarks_run", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def chapter_benchmark() -> None:
    _title(10, "Measured here, now: gilfree beside the stdlib")
    bench = _load_benchmarks()
    if bench is None:
        _say("The benchmark runner lives in benchmarks/run.py of a source checkout; not found here.")
        return
    _say("""A quick run (few repetitions, interleaved, medians); `python benchmarks/run.py` runs the
    full one.  Ratios above 1 mean gilfree is faster.""")
    results = bench.run(quick=True)  # type: ignore[attr-defined]
    print(bench.format_table(results))  # type: ignore[attr-defined]


CHAPTERS: list[tuple[str, Callable[[], None]]] = [
    ("processes", chapter_processes),
    ("lambdas", chapter_lambdas),
    ("pipes", chapter_pipes),
    ("listener", chapter_listener),
    ("shared", chapter_shared_state),
    ("queues", chapter_queues),
    ("manager", chapter_manager),
    ("pool", chapter_pool),
    ("cluster", chapter_cluster),
    ("benchmark", chapter_benchmark),
]


def tour(only: list[str] | None = None) -> int:
    print(f"gilfree {gilfree.__version__} tour  (Python {sys.version.split()[0]}, {gilfree.cpu_count()} CPUs, "
          f"default start method {gilfree.get_start_method()!r})")
    for name, chapter in CHAPTERS:
        if only and name not in only:
            continue
        chapter()
    leftovers = gilfree.active_children()
    print()
    print(f"End of the tour. Children still running: {len(leftovers)}.")
    return 0 if not leftovers else 1


def _parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--address must be HOST:PORT (e.g. 0.0.0.0:50000 or [::1]:50000), not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


#: Shortest authkey ``gilfree manager serve`` accepts (bytes).
MIN_AUTHKEY = 16

_KEY_HOWTO = ("make a good key with `head -c 32 /dev/urandom > {f} && chmod 600 {f}` (or "
              "`python -c \"import secrets; print(secrets.token_hex(32))\" > {f} && chmod 600 {f}`)")


def authkey_from_file(path: str | os.PathLike[str]) -> bytes:
    """The authkey a key file holds: its bytes exactly as they are, except that ONE trailing newline
    (``\\n`` or ``\\r\\n``) is dropped when everything before it is printable UTF-8 text.

    The rule: a text key written with ``echo secret > FILE`` (or an editor) means ``b"secret"``, the
    bytes a client types; a binary key (``head -c 32 /dev/urandom > FILE``) is used as it is, even
    when its last byte happens to be a newline or a space (stripping it would make a key that no
    client uses).  Nothing else is ever removed: a text key's spaces are part of it.  Clients can
    read a key file the same way with this function.
    """
    data = Path(path).read_bytes()
    for newline in (b"\r\n", b"\n"):
        if data.endswith(newline):
            rest = data[: -len(newline)]
            try:
                text = rest.decode("utf-8")
            except UnicodeDecodeError:
                return data
            return rest if text.isprintable() else data
    return data


def _serve_authkey(path: str) -> bytes:
    """The authkey for ``manager serve``: refused (ValueError saying how to fix it) when the file can
    be read by others than its owner, or the key is shorter than :data:`MIN_AUTHKEY` bytes."""
    mode = os.stat(path).st_mode
    if mode & 0o077:
        raise ValueError(f"the authkey file {path} is open to its group or to others (mode {mode & 0o777:03o}): "
                         f"anyone who can read it can use this server (and run code in it); "
                         f"make it private with `chmod 600 {path}`")
    key = authkey_from_file(path)
    if len(key) < MIN_AUTHKEY:
        what = "empty" if not key else f"only {len(key)} bytes"
        raise ValueError(f"the authkey in {path} is {what}; use at least {MIN_AUTHKEY} bytes: "
                         + _KEY_HOWTO.format(f=path))
    return key


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def manager_serve(args: argparse.Namespace) -> int:
    """``gilfree manager serve``: a SyncManager server for other processes and machines.

    Logs each connection (accepted, refused and why, closed) to stderr, refuses peers that do not
    prove the authkey, and on SIGTERM (or Ctrl-C) closes every connection and exits with status 0.
    ``--register TYPEID=module:callable`` adds types; the callable is imported when the first object
    of that type is created.  Runs in this process, blocking until stopped.
    """
    import logging
    import signal

    from gilfree import managers, util

    logger = util.get_logger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s gilfree-manager %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        address = _parse_address(args.address)
        key = _serve_authkey(args.authkey_file)
        tls = None
        if args.tls_cert or args.tls_key or args.tls_ca:
            if not args.tls_cert:
                raise ValueError("--tls-key and --tls-ca need --tls-cert (the server's certificate)")
            tls = managers.TLSConfig(args.tls_cert, args.tls_key, args.tls_ca)

        class ServedManager(managers.SyncManager):
            pass

        for item in args.register or ():
            typeid, sep, target = item.partition("=")
            if not sep or ":" not in target or not typeid:
                raise ValueError(f"--register takes TYPEID=module:callable, not {item!r}")
            ServedManager.register(typeid, target)
        server = ServedManager(address, key, tls=tls).get_server(logger=logger)
    except (OSError, ValueError) as exc:
        logger.error("cannot serve: %s", exc)
        return 2
    stopped_by: list[str] = []

    def on_signal(signum: int, frame: object) -> None:
        stopped_by.append(signal.Signals(signum).name)
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack on stderr
    if tls is None and not _is_loopback(server.address[0]):
        logger.warning(
            "NOT ENCRYPTED: listening on %s:%d without TLS.  The authkey handshake proves the key but does "
            "not encrypt: every request and reply, pickles included, travels in clear, and anyone on the "
            "path can read it or alter it (an altered pickle runs code in this server or its clients).  "
            "Serve with --tls-cert/--tls-key (and --tls-ca to require client certificates), or on "
            "127.0.0.1 behind a tunnel.", server.address[0], server.address[1])
    typeids = sorted(t for t, entry in ServedManager._registry.items() if entry[0] is not None)
    logger.info("serving on %s:%d%s; types: %s", server.address[0], server.address[1],
                " with TLS" + (" (client certificates required)" if args.tls_ca else "") if tls else "",
                ", ".join(typeids))
    server.grow_fd_limit = True  # this process only serves: a flood may have the descriptors it can
    server.serve_forever()
    logger.info("stopped (%s); %d connections were accepted, %d refused",
                stopped_by[0] if stopped_by else "shutdown request", server.stats["accepted"], server.stats["refused"])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gilfree", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_tour = sub.add_parser("tour", help="a guided tour of every capability, ending with a quick benchmark")
    p_tour.add_argument("--chapter", action="append", choices=[n for n, _ in CHAPTERS],
                        help="run only this chapter (repeatable)")
    sub.add_parser("bench", help="the side-by-side benchmark against the stdlib (options: see benchmarks/run.py --help)")
    p_manager = sub.add_parser("manager", help="run a manager server for other processes and machines")
    manager_sub = p_manager.add_subparsers(dest="manager_command", required=True)
    p_serve = manager_sub.add_parser("serve", help="serve a SyncManager (dict, list, Queue, locks...) on HOST:PORT")
    p_serve.add_argument("--address", required=True, metavar="HOST:PORT",
                         help="where to listen; 127.0.0.1 for this machine only, 0.0.0.0 for every interface")
    p_serve.add_argument("--authkey-file", required=True, metavar="FILE",
                         help="file holding the shared secret, at least 16 bytes, mode 600: its exact bytes (one "
                              "trailing newline after a text key is dropped); clients pass the same bytes as authkey")
    p_serve.add_argument("--tls-cert", metavar="PEM", help="the server's certificate: serve TLS")
    p_serve.add_argument("--tls-key", metavar="PEM", help="the server certificate's private key")
    p_serve.add_argument("--tls-ca", metavar="PEM",
                         help="require client certificates signed by this CA (mutual TLS: recommended for other machines)")
    p_serve.add_argument("--register", action="append", metavar="TYPEID=module:callable",
                         help="serve objects made by module.callable under TYPEID (repeatable)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "manager":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return manager_serve(args)
    if args.command == "tour":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return tour(args.chapter)
    bench = _load_benchmarks()
    if bench is None:
        print("benchmarks/run.py not found: run this from a source checkout of gilfree", file=sys.stderr)
        return 2
    return int(bench.main(rest) or 0)  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
