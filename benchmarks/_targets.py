"""Child-side functions of the benchmarks in ``run.py``.

They live in their own small module, importable by name, so that a child started with any start
method (fork, spawn, forkserver) and by either implementation (the stdlib's ``multiprocessing`` or
``gilfree``) finds them the same way.  ``run.py`` puts this directory on ``sys.path``; spawned and
forkserver children inherit that ``sys.path`` from their parent.

The module imports nothing at top level, so importing it costs a spawned child (almost) nothing.
The functions are duck-typed: they get a ``Connection`` of whichever implementation started them.

Every loop ends when its peer says so (a quit message) or when the peer's end closes (``EOFError``):
``close`` lists connections the child inherited but must not hold (the parent's ends, copied into a
forked child), so that a parent that dies leaves its children a closed pipe rather than a hang.
"""


def _close(conns):
    for c in conns:
        try:
            c.close()
        except OSError:
            pass


def noop():
    """The trivial target of the process start benchmarks."""


def echo(conn, close=()):
    """Send back every object received, until ``None`` (or EOF)."""
    _close(close)
    recv, send = conn.recv, conn.send
    try:
        while True:
            obj = recv()
            if obj is None:
                break
            send(obj)
    except EOFError:
        pass
    finally:
        conn.close()


def echo_bytes(conn, close=()):
    """Send back every byte message received, until an empty one (or EOF)."""
    _close(close)
    recv, send = conn.recv_bytes, conn.send_bytes
    try:
        while True:
            data = recv()
            if not data:
                break
            send(data)
    except EOFError:
        pass
    finally:
        conn.close()


def sink_bytes(conn, ack=None, close=()):
    """Receive byte messages; an empty one asks for the byte count so far (then resets it); b"Q" quits.

    The count goes back as 8 bytes on ``ack`` (``conn`` itself if None).
    """
    _close(close)
    ack = conn if ack is None else ack
    recv = conn.recv_bytes
    total = 0
    try:
        while True:
            data = recv()
            n = len(data)
            if n == 0:
                ack.send_bytes(total.to_bytes(8, "big"))
                total = 0
            elif n == 1 and data == b"Q":
                break
            else:
                total += n
    except EOFError:
        pass
    finally:
        conn.close()
        if ack is not conn:
            ack.close()


def sink_objects(conn, close=()):
    """Receive buffer objects (bytes, numpy arrays); ``None`` asks for the byte count; "quit" quits."""
    _close(close)
    recv = conn.recv
    total = 0
    try:
        while True:
            obj = recv()
            if obj is None:
                conn.send(total)
                total = 0
            elif isinstance(obj, str):
                break
            else:
                total += memoryview(obj).nbytes
    except EOFError:
        pass
    finally:
        conn.close()


def sum_server(conn, close=()):
    """Send back ``float(arr.sum())`` for every array received, until ``None`` (or EOF)."""
    _close(close)
    try:
        while True:
            arr = conn.recv()
            if arr is None:
                break
            conn.send(float(arr.sum()))
    except EOFError:
        pass
    finally:
        conn.close()


def array_sum(arr):
    """What a stdlib pool worker computes in the shared-array benchmark."""
    return float(arr.sum())


def count_up(value, n):
    """``n`` times: ``with lock: value.value += 1`` (the lock benchmark)."""
    lock = value.get_lock()
    for _ in range(n):
        with lock:
            value.value += 1


def queue_produce(q, n, item, batch=0):
    """Put ``n`` copies of ``item`` into ``q`` (``put_many`` in batches of ``batch`` if > 0)."""
    if batch:
        chunk = [item] * batch
        for start in range(0, n, batch):
            q.put_many(chunk[: min(batch, n - start)])
    else:
        put = q.put
        for _ in range(n):
            put(item)


def manager_ops(kind, obj, n, conn):
    """``n`` round trips through a manager proxy, timed here in the child; seconds go back on ``conn``.

    ``kind`` "dict": ``obj[k] = i; obj[k]`` (a set and a get); "queue": ``obj.put(i); obj.get()``.
    """
    import time

    t0 = time.perf_counter()
    if kind == "dict":
        for i in range(n):
            k = i & 63
            obj[k] = i
            if obj[k] != i:
                raise AssertionError("the dict lost a write")
    else:
        put, get = obj.put, obj.get
        for i in range(n):
            put(i)
            get()
    conn.send(time.perf_counter() - t0)
    conn.close()


def square(x):
    """The tiny task of the pool benchmarks."""
    return x * x


def busy(ms):
    """About ``ms`` milliseconds of CPU work (process time, so a busy machine does not shorten it)."""
    from time import process_time

    end = process_time() + ms / 1000.0
    n = 0
    while process_time() < end:
        n += 1
    return n
