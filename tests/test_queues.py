"""Queues: stdlib semantics (compared with multiprocessing's), FIFO, no feeder-thread deadlock, big
messages through shared segments, crash safety under SIGKILL, and the pure-Python fallback."""

from __future__ import annotations

import gc
import multiprocessing as std_mp
import multiprocessing.queues
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import zlib

import pytest
from _helpers import run_program, write_program

import gilfree
from gilfree import queues

pytestmark = pytest.mark.timeout(60)

SHM = "/dev/shm"


def _segments(q) -> list[str]:
    return [n for n in os.listdir(SHM) if n.startswith(q._prefix)]


def _join_all(procs, timeout=20):
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join(5)


# -- the public surface ---------------------------------------------------------------------------

def test_exports():
    for name in ("Queue", "SimpleQueue", "JoinableQueue", "queues"):
        assert name in gilfree.__all__
    assert gilfree.Queue is queues.Queue and isinstance(gilfree.Queue, type)
    assert gilfree.JoinableQueue is queues.JoinableQueue
    assert gilfree.SimpleQueue is queues.SimpleQueue
    for method in ("fork", "spawn", "forkserver"):
        ctx = gilfree.get_context(method)
        assert isinstance(ctx.Queue(), queues.Queue)
        assert isinstance(ctx.JoinableQueue(3), queues.JoinableQueue)
        assert isinstance(ctx.SimpleQueue(), queues.SimpleQueue)
    assert queues.Empty is queue.Empty and queues.Full is queue.Full


def test_repr():
    q = gilfree.Queue(5)
    q.put(1)
    assert repr(q) == f"<Queue(maxsize=5, qsize=1, ring={queues.RING_SIZE})>"
    q.close()
    assert repr(q).endswith("closed>")


# -- stdlib semantics, side by side ---------------------------------------------------------------

@pytest.fixture(params=["stdlib", "gilfree"])
def mp(request):
    return std_mp.get_context("fork") if request.param == "stdlib" else gilfree.get_context("fork")


def _settle(q):
    # the stdlib's feeder thread needs a moment before the data is in the pipe
    time.sleep(0.05) if isinstance(q, std_mp.queues.Queue) else None


def test_put_get_order_and_sizes(mp):
    q = mp.Queue()
    assert q.empty() and q.qsize() == 0 and not q.full()
    items = [1, "two", (3, 4.0), None, {"five": [5]}, b"six" * 100]
    for x in items:
        q.put(x)
    _settle(q)
    assert q.qsize() == len(items) and not q.empty()
    assert [q.get(timeout=5) for _ in items] == items
    assert q.empty() and q.qsize() == 0
    q.close()
    q.join_thread()


def test_empty_raises_empty(mp):
    q = mp.Queue()
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(queue.Empty):
        q.get(False)
    t0 = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    assert 0.15 <= time.monotonic() - t0 < 2


def test_bounded_queue_full(mp):
    q = mp.Queue(2)
    q.put(1)
    q.put_nowait(2)
    _settle(q)
    assert q.full() and q.qsize() == 2
    with pytest.raises(queue.Full):
        q.put_nowait(3)
    t0 = time.monotonic()
    with pytest.raises(queue.Full):
        q.put(3, timeout=0.2)
    assert 0.15 <= time.monotonic() - t0 < 2
    assert q.get() == 1
    q.put(3, timeout=1)
    assert [q.get(), q.get()] == [2, 3]


def test_blocked_put_wakes_when_an_item_is_taken(mp):
    q = mp.Queue(1)
    q.put("a")
    threading.Timer(0.2, q.get).start()
    t0 = time.monotonic()
    q.put("b", timeout=5)
    assert 0.1 < time.monotonic() - t0 < 4
    assert q.get(timeout=5) == "b"


def test_blocked_get_wakes_on_put(mp):
    q = mp.Queue()
    threading.Timer(0.2, q.put, ("late",)).start()
    assert q.get(timeout=5) == "late"


def test_negative_timeout(mp):
    """A negative timeout is no wait (``timeout = deadline - now``), on every method (issue 11, item 8)."""
    for make in (mp.Queue, mp.JoinableQueue):
        q = make()
        t0 = time.monotonic()
        with pytest.raises(queue.Empty):
            q.get(True, -1)
        with pytest.raises(queue.Empty):
            q.get(timeout=-0.001)
        q.put(1, timeout=-1)
        _settle(q)
        assert q.get(timeout=-1) == 1
        bounded = make(1)
        bounded.put(1, True, -5)
        _settle(bounded)
        with pytest.raises(queue.Full):
            bounded.put(2, timeout=-1)
        assert time.monotonic() - t0 < 2
        if hasattr(q, "get_many"):
            with pytest.raises(queue.Empty):
                q.get_many(5, timeout=-1)
            with pytest.raises(queue.Full):
                bounded.put_many([2], timeout=-1)
            q.put_many([1, 2], timeout=-1)
            assert q.get_many(5, timeout=-1) == [1, 2]


def test_closed_queue(mp):
    q = mp.Queue()
    with pytest.raises(AssertionError):
        q.join_thread()
    q.close()
    with pytest.raises(ValueError):
        q.put(1)
    with pytest.raises(ValueError):
        q.get()
    q.join_thread()
    q.cancel_join_thread()


def test_joinable_queue(mp):
    q = mp.JoinableQueue()
    with pytest.raises(ValueError, match="too many times"):
        q.task_done()
    for i in range(3):
        q.put(i)
    done = []

    def worker():
        for _ in range(3):
            done.append(q.get(timeout=5))
            time.sleep(0.02)
            q.task_done()

    t = threading.Thread(target=worker)
    t.start()
    q.join()
    assert done == [0, 1, 2]
    t.join()
    with pytest.raises(ValueError):
        q.task_done()


def test_simple_queue(mp):
    q = mp.SimpleQueue()
    assert q.empty()
    q.put([1, 2])
    assert not q.empty()
    assert q.get() == [1, 2]
    q.close()


def _joinable_worker(q):
    while True:
        item = q.get()
        q.task_done()
        if item is None:
            break


def test_joinable_queue_across_processes(ctx):
    q = ctx.JoinableQueue()
    p = ctx.Process(target=_joinable_worker, args=(q,))
    p.start()
    q.put_many(range(100))
    q.put(None)
    q.join()
    p.join(20)
    assert p.exitcode == 0


# -- gilfree's additions --------------------------------------------------------------------------

def test_put_many_get_many():
    q = gilfree.Queue()
    q.put_many(range(1000))
    assert q.qsize() == 1000
    assert q.get_many(10) == list(range(10))
    assert q.get_many(10_000) == list(range(10, 1000))
    with pytest.raises(queue.Empty):
        q.get_many(5, timeout=0.05)
    with pytest.raises(queue.Empty):
        q.get_many(5, block=False)
    b = gilfree.Queue(3)
    with pytest.raises(ValueError):
        b.put_many(range(4))
    b.put_many([1, 2])
    with pytest.raises(queue.Full):
        b.put_many([3, 4], timeout=0.05)
    assert b.qsize() == 2  # all or nothing


def test_unpicklable_put_raises_in_caller():
    q = gilfree.Queue()
    lock = threading.Lock()
    with pytest.raises(gilfree.PicklingError):
        q.put({"ok": 1, "bad": lock})
    with pytest.raises(gilfree.PicklingError):
        q.put_many([1, lock])
    assert q.empty()
    q.put(lambda x: x + 1)  # tier 2
    assert q.get(timeout=5)(1) == 2
    q.put("still usable")
    assert q.get(timeout=5) == "still usable"


class _RefusesPickling:
    def __reduce__(self):
        raise AttributeError("not today")


@pytest.mark.parametrize("impl", ["stdlib", "gilfree"])
def test_a_subclass_hook_for_unpicklable_objects_is_honoured(impl):
    # the stdlib's Queue calls _on_queue_feeder_error(e, obj) from its feeder thread; a subclass
    # that overrides it is told instead of the raise, with what pickling raised, and put returns
    base = std_mp.queues.Queue if impl == "stdlib" else gilfree.queues.Queue
    ctx = std_mp.get_context() if impl == "stdlib" else gilfree.get_context()
    seen = []

    class Safe(base):
        @staticmethod
        def _on_queue_feeder_error(e, obj):
            seen.append((type(e), type(obj)))

    q = Safe(ctx=ctx)
    bad = _RefusesPickling()
    q.put(bad)
    q.put("next")
    assert q.get(timeout=10) == "next"
    assert seen == [(AttributeError, _RefusesPickling)]
    assert q.empty()
    q.close()
    q.join_thread()


class _Celsius:
    def __init__(self, v):
        self.v = v


def test_put_follows_reducers_registered_later():
    from gilfree import reduction

    q = gilfree.Queue()
    q.put((1, "a"))  # the C path pickles plain objects by itself from here on
    assert q.get(timeout=5) == (1, "a")
    reduction.register(_Celsius, lambda c: (float, (c.v,)))
    try:
        q.put((_Celsius(3.5), "x"))
        assert q.get(timeout=5) == (3.5, "x")
        q.put_many([(_Celsius(1.0),), 2])
        assert q.get_many(10, timeout=5) == [(1.0,), 2]
    finally:
        reduction._extra_reducers.pop(_Celsius)
        reduction._table_copyreg_len = -1
    q.put(("__main__", 2))  # a pickle that names __main__ (as a string): the receiver decides nothing
    q.put_many([("__main__",), b"__main__"])
    assert q.get_many(10, timeout=5) == [("__main__", 2), ("__main__",), b"__main__"]


@pytest.mark.parametrize("impl", [gilfree, std_mp])
def test_put_get_argument_forms(impl):
    q = impl.Queue()
    q.put(1)
    q.put(2, False)
    q.put(3, True, 5)
    q.put(4, block=False)
    q.put(5, timeout=5)
    q.put(obj=6)
    q.put_nowait(7)
    got = [q.get(), q.get(True), q.get(True, 5), q.get(block=True), q.get(timeout=5)]
    if impl is std_mp:
        time.sleep(0.2)  # its feeder thread must have written the rest before a non-blocking get
    got += [q.get_nowait(), q.get(False)]
    assert got == [1, 2, 3, 4, 5, 6, 7]
    for bad_put in (lambda: q.put(), lambda: q.put(1, True, 1, 2), lambda: q.put(1, color=2)):
        with pytest.raises(TypeError):
            bad_put()
    with pytest.raises(TypeError):
        q.get(True, 1, 2)
    with pytest.raises(TypeError):
        q.get(color=1)
    with pytest.raises(queue.Empty):
        q.get(timeout=0.01)
    q.close()
    with pytest.raises(ValueError):
        q.put(1)
    with pytest.raises(ValueError):
        q.get()


def _plain(rng, depth=0):
    kind = rng.randrange(8 if depth < 5 else 7)
    if kind == 0:
        return rng.choice((None, True, False))
    if kind == 1:
        bits = rng.choice((7, 8, 9, 16, 17, 31, 32, 33, 63, 64, 65, 100))
        return rng.randrange(-(2**bits), 2**bits)
    if kind == 2:
        return rng.choice((0.0, -0.0, 1.5, -2.25e300, 5e-324, float("inf"), float("-inf"), float("nan"), rng.random()))
    if kind == 3:
        return "".join(chr(rng.choice((rng.randrange(32, 127), rng.randrange(128, 0x10FFFF))))
                       for _ in range(rng.choice((0, 1, 5, 255, 256, 300))))
    if kind == 4:
        return "\ud800 lone surrogate"
    if kind == 5:
        return rng.randbytes(rng.choice((0, 3, 255, 256, 400)))
    if kind == 6:
        return complex(1, 2)
    return tuple(_plain(rng, depth + 1) for _ in range(rng.choice((0, 1, 2, 3, 4, 7))))


def _same(a, b):
    return type(a) is type(b) and (
        all(_same(x, y) for x, y in zip(a, b)) and len(a) == len(b) if type(a) is tuple else repr(a) == repr(b)
    )


@pytest.mark.skipif(queues._cqueue is None, reason="the C extension")
def test_the_c_pickle_of_plain_data_reads_back_the_same():
    import pickle

    rng = random.Random(5)
    written = 0
    for _ in range(3000):
        obj = _plain(rng)
        data = queues._cqueue.mini_dumps(obj)
        if data is not None:
            written += 1
            assert _same(pickle.loads(data), obj), obj
    assert written > 1000
    q = gilfree.Queue()
    objs = [_plain(rng) for _ in range(300)]
    for obj in objs:
        q.put(obj)
    assert all(_same(a, b) for a, b in zip(q.get_many(1000, timeout=5), objs))


def test_qsize_exact_right_after_put():
    q = gilfree.Queue()
    for i in range(100):
        q.put(i)
        assert q.qsize() == i + 1


def _fifo_producer(q, pid, n):
    for i in range(n):
        q.put((pid, i))


def _check_fifo(got, producers, n):
    seen = {p: [] for p in range(producers)}
    for pid, i in got:
        seen[pid].append(i)
    for pid in seen:
        assert seen[pid] == list(range(n)), pid


def test_fifo_per_producer_threads():
    q = gilfree.Queue()
    threads = [threading.Thread(target=_fifo_producer, args=(q, p, 3000)) for p in range(4)]
    for t in threads:
        t.start()
    got = [q.get(timeout=10) for _ in range(4 * 3000)]
    for t in threads:
        t.join()
    _check_fifo(got, 4, 3000)


def test_fifo_per_producer_processes(ctx):
    q = ctx.Queue(ring_size=1 << 14)  # small: records spill into segments too
    procs = [ctx.Process(target=_fifo_producer, args=(q, p, 3000)) for p in range(3)]
    for p in procs:
        p.start()
    got = []
    while len(got) < 3 * 3000:
        got += q.get_many(500, timeout=20)
    _join_all(procs)
    assert all(p.exitcode == 0 for p in procs)
    _check_fifo(got, 3, 3000)
    assert q.empty()


def test_spill_chain_interleaved():
    q = gilfree.Queue(ring_size=4096)
    expected, got = [], []
    n = 0
    for round_ in range(20):
        k = random.randrange(1, 800)
        q.put_many(range(n, n + k)) if round_ % 2 else [q.put(i) for i in range(n, n + k)]
        expected += range(n, n + k)
        n += k
        assert q.qsize() == len(expected) - len(got)
        for _ in range(random.randrange(0, q.qsize() + 1)):
            got.append(q.get_nowait())
    got += q.get_many(10**6, block=False) if not q.empty() else []
    assert got == expected and q.empty()
    del q
    gc.collect()


def _put_and_return(q, n):
    q.put(b"y" * 10_000_000)
    for i in range(n):
        q.put(i)


def test_child_that_put_can_be_joined_before_reading(ctx):
    q = ctx.Queue()
    p = ctx.Process(target=_put_and_return, args=(q, 100_000))
    p.start()
    p.join(30)  # the stdlib deadlocks here (the feeder thread waits for a reader)
    assert p.exitcode == 0
    assert q.qsize() == 100_001
    assert q.get(timeout=5) == b"y" * 10_000_000
    got = []
    while len(got) < 100_000:
        got += q.get_many(100_000, timeout=5)
    assert got == list(range(100_000))


def _sum_arrays(q, out):
    while True:
        a = q.get()
        if a is None:
            break
        out.put(float(a.sum()))


def test_large_numpy_arrays_and_bytes(ctx):
    np = pytest.importorskip("numpy")
    q, out = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_sum_arrays, args=(q, out))
    p.start()
    arrays = [np.arange(n, dtype=np.float64) for n in (10, 200_000, 3_000_000)]
    for a in arrays:
        q.put(a)
    q.put(None)
    sums = [out.get(timeout=20) for _ in arrays]
    p.join(20)
    assert sums == [float(a.sum()) for a in arrays]
    big = os.urandom(5_000_000)
    q.put(big)
    q.put(bytearray(big))
    a = np.ones((1000, 1000))
    q.put(a)
    assert q.get(timeout=5) == big
    assert q.get(timeout=5) == bytearray(big)
    b = q.get(timeout=5)
    assert (a == b).all() and b.flags.writeable
    assert _segments(q) == [] and _segments(out) == []


def _pool_names(q) -> list[str]:
    return sorted(n for n in _segments(q) if n[len(q._prefix)] == "p")


def _put_blobs(q, blobs):
    for b in blobs:
        q.put(b)


def test_big_messages_reuse_the_pool_segments(ctx):
    q = ctx.Queue()
    blobs = [os.urandom(300_000 + 1000 * i) for i in range(40)]  # > ring/8: big, <= POOL_MAX: pooled
    p = ctx.Process(target=_put_blobs, args=(q, blobs))
    p.start()
    got = [q.get(timeout=10) for _ in blobs]
    p.join(10)
    assert got == blobs
    assert 1 <= len(_pool_names(q)) <= queues._NPOOL
    assert [n for n in _segments(q) if n not in _pool_names(q)] == []  # no one-off segment left
    assert all(q._h[queues._POOL0 + i] == queues._P_FREE for i in range(queues._NPOOL))


def test_full_pool_falls_back_to_own_segments_in_order():
    q = gilfree.Queue()
    blobs = [os.urandom(200_000) for _ in range(queues._NPOOL + 5)]
    for b in blobs:
        q.put(b)
    states = [q._h[queues._POOL0 + i] for i in range(queues._NPOOL)]
    assert states == [queues._P_QUEUED] * queues._NPOOL
    assert q.get_many(100, timeout=5) == blobs
    assert all(q._h[queues._POOL0 + i] == queues._P_FREE for i in range(queues._NPOOL))


def _fail_on_load():
    raise RuntimeError("cannot be unpickled here")


class _FailsOnLoad:
    def __reduce__(self):
        return _fail_on_load, ()


def test_get_many_loses_only_the_item_that_fails_to_unpickle():
    """As get() would: the good items come back, in order; the bad one's error is raised by the next
    call (issue 11, item 6: the whole batch was lost).  Pool slots and segments are given back."""
    q = gilfree.Queue()
    blobs = [os.urandom(200_000) for _ in range(3)]
    q.put_many([blobs[0], _FailsOnLoad(), 1, blobs[1], (2, "x"), _FailsOnLoad(), blobs[2]])
    assert q.get_many(10, timeout=5) == [blobs[0], 1, blobs[1], (2, "x"), blobs[2]]
    assert all(q._h[queues._POOL0 + i] == queues._P_FREE for i in range(queues._NPOOL))
    assert q.empty()
    q.put("next")
    with pytest.raises(RuntimeError, match="cannot be unpickled"):
        q.get(timeout=5)
    with pytest.raises(RuntimeError, match="cannot be unpickled"):
        q.get_many(5, timeout=5)
    assert q.get_many(5, timeout=5) == ["next"]
    q.put_many([_FailsOnLoad(), "after"])  # nothing good in front: raised at once
    with pytest.raises(RuntimeError, match="cannot be unpickled"):
        q.get_many(1, timeout=5)
    assert q.get(timeout=5) == "after"
    q.put_many([_FailsOnLoad(), b"x" * 300_000, _FailsOnLoad()])
    with pytest.raises(RuntimeError, match="cannot be unpickled"):
        q.get_many(1, timeout=5)
    assert q.get_many(5, timeout=5) == [b"x" * 300_000]
    with pytest.raises(RuntimeError, match="cannot be unpickled"):
        q.get_many(1, timeout=5)
    assert all(q._h[queues._POOL0 + i] == queues._P_FREE for i in range(queues._NPOOL))
    assert q.empty()
    del q  # the errors' tracebacks refer to it
    gc.collect()


def test_pool_slot_of_a_dead_process_is_taken_back():
    q = gilfree.Queue()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    for i in range(queues._NPOOL):  # every slot held by a process that died writing or reading it
        q._h[queues._POOL0 + i] = (int(dead) << 8) | (queues._P_WRITING if i % 2 else queues._P_READING)
    blob = os.urandom(500_000)
    q.put(blob)
    assert q._h[queues._POOL0 + 0] == queues._P_QUEUED  # taken back, not a one-off segment
    assert q.get(timeout=5) == blob
    assert q._h[queues._POOL0 + 0] == queues._P_FREE


def test_unread_segments_are_removed_with_the_queue():
    q = gilfree.Queue(ring_size=4096)
    q.put(os.urandom(100_000))
    for i in range(2000):
        q.put(i)
    prefix = q._prefix
    assert [n for n in os.listdir(SHM) if n.startswith(prefix)]
    del q
    gc.collect()
    assert [n for n in os.listdir(SHM) if n.startswith(prefix)] == []


# -- segments have owners the tracker knows (issue 11 item 10) -------------------------------------

BIG = 3 << 20  # above POOL_MAX: a big message in a segment of its own ("<prefix>b<random>")


def _wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _put_big(q, fill):
    q.put(bytes([fill]) * BIG)


def _put_big_and_die(q):
    q.put(b"p" * BIG)
    os.kill(os.getpid(), signal.SIGKILL)


def test_producer_killed_before_publishing_leaves_no_segment(ctx):
    # The producer pickles into its own segment, then waits for room in the full queue: killed
    # there, its segment is removed at once, while the queue's creator (this process) lives.
    q = ctx.Queue(maxsize=1)
    q.put(0)
    for round_ in range(3):  # and they do not pile up
        p = ctx.Process(target=_put_big, args=(q, round_))
        p.start()
        try:
            assert _wait_for(lambda: any(n.startswith(q._prefix + "b") for n in os.listdir(SHM)), 30)
        finally:
            p.kill()
            p.join(10)
        assert _wait_for(lambda: not _segments(q)), _segments(q)
    assert q.get(timeout=5) == 0 and q.empty()


def test_killed_producer_s_segment_is_removed_without_a_leak_report(tmp_path):
    # a queue's own segment is gilfree's business: the tracker removes it quietly (the stderr line
    # "... its owner ended without calling unlink()" is for the user's SharedMemory blocks)
    path = write_program(tmp_path, """
import os, time
def put_big(q):
    q.put(b"x" * (3 << 20))

if __name__ == "__main__":
    q = multiprocessing.Queue(maxsize=1)
    q.put(0)
    p = multiprocessing.Process(target=put_big, args=(q,))
    p.start()
    deadline = time.monotonic() + 30
    while not any(n.startswith(q._prefix + "b") for n in os.listdir("/dev/shm")):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    p.kill()
    p.join()
    while any(n.startswith(q._prefix + "b") for n in os.listdir("/dev/shm")):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    print("removed", q.get(timeout=5))
""", method="fork")
    res = run_program(path, timeout=60)
    assert (res.returncode, res.stdout, res.stderr) == (0, "removed 0\n", "")


def test_published_big_message_outlives_its_producer(ctx):
    q = ctx.Queue()
    p = ctx.Process(target=_put_big_and_die, args=(q,))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    time.sleep(0.3)  # time for the tracker to act on the producer's death, if it (wrongly) would
    assert q.get(timeout=10) == b"p" * BIG


def _spill_and_die(q):
    q._lock.acquire()
    # what _new_spill does before the LINK that would reach the segment is committed
    seq = q._h[queues._NEXT_SEQ]
    q._h[queues._NEXT_SEQ] = seq + 1
    queues._shm_create(f"{q._prefix}{seq}", queues.SPILL_SIZE)
    os.kill(os.getpid(), signal.SIGKILL)  # dies holding the queue lock


def test_spill_segment_of_a_holder_that_died_before_linking_it_is_removed_by_the_repair(ctx):
    q = ctx.Queue(ring_size=4096)
    q.put_many(list(range(1000)))  # a spill chain that stays in use
    chained = set(_segments(q))
    p = ctx.Process(target=_spill_and_die, args=(q,))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    assert len(_segments(q)) == len(chained) + 1  # the orphan
    assert q.get(timeout=10) == 0  # takes the lock over, repairs
    assert set(_segments(q)) == chained  # the orphan is gone while the creator lives; the chain stays
    assert q.get_many(2000, timeout=10) == list(range(1, 1000))


def _create_fill_and_die(tmp, method, with_reader):
    ctx = gilfree.get_context(method)
    q = ctx.Queue(ring_size=4096)
    q.put_many(list(range(2000)))  # a spill chain
    q.put(b"m" * 100_000)  # a pool slot
    q.put(b"b" * BIG)  # a segment of its own
    pid = 0
    if with_reader:
        r = ctx.Process(target=_late_reader, args=(q, tmp))
        r.start()
        pid = r.pid
    with open(os.path.join(tmp, "prefix.tmp"), "w") as f:
        f.write(f"{q._prefix} {pid}")
    os.rename(os.path.join(tmp, "prefix.tmp"), os.path.join(tmp, "prefix"))
    os.kill(os.getpid(), signal.SIGKILL)


def _late_reader(q, tmp):
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(tmp, "go")) and time.monotonic() < deadline:
        time.sleep(0.01)
    got = q.get_many(5000, timeout=10)
    while len(got) < 2002:
        got += q.get_many(5000, timeout=10)
    ok = got[:2000] == list(range(2000)) and got[2000] == b"m" * 100_000 and got[2001] == b"b" * BIG
    with open(os.path.join(tmp, "result.tmp"), "w") as f:
        f.write(f"{ok} {q.empty()}")
    os.rename(os.path.join(tmp, "result.tmp"), os.path.join(tmp, "result"))  # seen whole or not at all


def _creator_run(ctx, tmp_path, with_reader):
    p = ctx.Process(target=_create_fill_and_die, args=(str(tmp_path), ctx.get_start_method(), with_reader))
    p.start()
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    prefix, reader = (tmp_path / "prefix").read_text().split()
    return prefix, int(reader)


def _named(prefix):
    return [n for n in os.listdir(SHM) if n.startswith(prefix)]


def test_sigkilled_creator_leaves_no_segment(ctx, tmp_path):
    prefix, _ = _creator_run(ctx, tmp_path, with_reader=False)
    assert _wait_for(lambda: not _named(prefix)), _named(prefix)


def test_sigkilled_creator_s_segments_stay_while_a_user_lives(ctx, tmp_path):
    prefix, reader = _creator_run(ctx, tmp_path, with_reader=True)
    try:
        time.sleep(1.0)  # the tracker has seen the creator's death by now
        kinds = {n[len(prefix):][:1] for n in _named(prefix)}
        assert {"1", "p", "b"} <= kinds, _named(prefix)  # spill, pool, big: the reader needs them
        (tmp_path / "go").write_text("")
        assert _wait_for(lambda: (tmp_path / "result").exists(), 30)
        assert (tmp_path / "result").read_text() == "True True"
        # once the reader (the last process that maps the queue) has gone, nothing stays
        assert _wait_for(lambda: not _named(prefix)), _named(prefix)
    finally:
        try:
            os.kill(reader, signal.SIGKILL)  # only if the test failed before it ended
        except ProcessLookupError:
            pass


# -- crash safety ---------------------------------------------------------------------------------

def _message(pid, i, rng):
    size = rng.choice((8, 100, 3000, 20_000))  # ring, spill, and (ring 64 KiB / 8) big segments
    body = rng.randbytes(size)
    return (pid, i, zlib.crc32(body), body)


def _stress_producer(q, pid, n, pause):
    rng = random.Random(pid)
    for i in range(n):
        q.put(_message(pid, i, rng))
        if pause and i % 50 == 0:
            time.sleep(pause)


def _stress_consumer(q, results):
    while True:
        m = q.get()
        if m is None:
            break
        pid, i, crc, body = m
        results.put((pid, i, zlib.crc32(body) == crc))


def test_sigkilled_consumers_lose_at_most_one_message_each(ctx):
    q = ctx.Queue(ring_size=1 << 16)
    results = ctx.Queue()
    producers = [ctx.Process(target=_stress_producer, args=(q, pid, 600, 0.002)) for pid in range(3)]
    consumers = [ctx.Process(target=_stress_consumer, args=(q, results)) for _ in range(3)]
    for p in producers + consumers:
        p.start()
    rng = random.Random(7)
    kills = 0
    collected = []
    deadline = time.monotonic() + 8
    # kill until the producers are done, and at least 8 times (consumers then drain what is left)
    while (kills < 8 or any(p.is_alive() for p in producers)) and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.0, 0.05))
        victim = rng.randrange(len(consumers))
        consumers[victim].kill()
        consumers[victim].join(5)
        kills += 1
        consumers[victim] = ctx.Process(target=_stress_consumer, args=(q, results))
        consumers[victim].start()
        try:
            collected += results.get_many(10_000, block=False)
        except queue.Empty:
            pass
    _join_all(producers)
    for _ in consumers:
        q.put(None)
    _join_all(consumers)
    assert [p.exitcode for p in producers + consumers] == [0] * 6
    while not results.empty():
        collected += results.get_many(10_000, timeout=5)
    keys = [(pid, i) for pid, i, _ in collected]
    assert len(keys) == len(set(keys)), "a message was delivered twice"
    assert all(ok for _, _, ok in collected), "a torn message"
    missing = 3 * 600 - len(keys)
    assert 0 <= missing <= kills, (missing, kills)
    assert q.empty(), q
    assert kills >= 8
    del q, results
    gc.collect()


_MIXED_SIZES = (8, 100, 3000, 20_000, 200_000)  # ring 64 KiB: ring, spill, pool (> 8 KiB) messages


def _mixed_producer(q, pid, n):
    rng = random.Random(pid)
    for i in range(n):
        body = rng.randbytes(rng.choice(_MIXED_SIZES))
        m = (pid, i, zlib.crc32(body), body)
        q.put_many([m]) if i % 3 == 0 else q.put(m)
        if i % 20 == 0:
            time.sleep(0.001)


def _mixed_consumer(q, results):
    rng = random.Random()
    while True:
        try:
            ms = q.get_many(rng.choice((1, 5)), timeout=0.5) if rng.random() < 0.5 else [q.get(timeout=0.5)]
        except queue.Empty:
            continue
        nones = 0
        for m in ms:
            if m is None:
                nones += 1
                continue
            pid, i, crc, body = m
            results.put((pid, i, zlib.crc32(body) == crc))
        if nones:
            for _ in range(nones - 1):
                q.put(None)
            return


def test_sigkilled_producers_and_consumers_with_pooled_messages(ctx):
    """Producers and consumers killed at random while messages of every kind (ring, spill, pool) flow."""
    n = 300
    q = ctx.Queue(ring_size=1 << 16)
    results = ctx.Queue()
    producers = [ctx.Process(target=_mixed_producer, args=(q, k, n)) for k in range(3)]
    consumers = [ctx.Process(target=_mixed_consumer, args=(q, results)) for _ in range(3)]
    for p in producers + consumers:
        p.start()
    rng = random.Random(11)
    consumer_kills, killed_producers, collected = 0, set(), []
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline and any(p.is_alive() for p in producers):
        time.sleep(rng.uniform(0.0, 0.03))
        k = rng.randrange(3)
        if rng.random() < 0.1 and k not in killed_producers and producers[k].is_alive():
            producers[k].kill()
            producers[k].join(5)
            killed_producers.add(k)
        else:
            consumers[k].kill()
            consumers[k].join(5)
            consumer_kills += 1
            consumers[k] = ctx.Process(target=_mixed_consumer, args=(q, results))
            consumers[k].start()
        try:
            collected += results.get_many(10_000, block=False)
        except queue.Empty:
            pass
    _join_all(producers, 30)
    for _ in consumers:
        q.put(None)
    _join_all(consumers)
    assert [c.exitcode for c in consumers] == [0] * 3
    while not results.empty():
        collected += results.get_many(10_000, timeout=5)
    keys = [(pid, i) for pid, i, _ in collected]
    assert len(keys) == len(set(keys)), "a message was delivered twice"
    assert all(ok for _, _, ok in collected), "a torn message"
    lost = 0
    for k in range(3):
        got = [i for pid, i in keys if pid == k]
        sent = (max(got) + 1 if got else 0) if k in killed_producers else n
        lost += sent - len(got)
    # a consumer killed after get_many returned loses that batch (up to 5 here), a producer the one it held
    assert 0 <= lost <= 5 * consumer_kills + len(killed_producers), (lost, consumer_kills, killed_producers)
    assert q.empty(), q
    del q, results
    gc.collect()


def test_sigkilled_producer_leaves_a_prefix_of_its_messages(ctx):
    q = ctx.Queue(ring_size=1 << 16)
    p = ctx.Process(target=_stress_producer, args=(q, 0, 10**9, 0))
    p.start()
    while q.qsize() < 2000:
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.join(5)
    got = []
    while not q.empty():
        got += q.get_many(10_000, timeout=5)
    assert [i for _, i, _, _ in got] == list(range(len(got)))
    assert all(zlib.crc32(body) == crc for _, _, crc, body in got)
    q.put("after")
    assert q.get(timeout=5) == "after"
    del q
    gc.collect()


def _hold_lock_and_die(q):
    q._lock.acquire()
    q._h[queues._COUNT] += 5  # derived state left wrong, as by a death half-way through a put
    os._exit(0)  # dies holding the queue lock


def _consume_pooled_and_die(q):
    q._lock.acquire()
    q._take_record([])  # consumed: committed, but its slot is not marked as being read yet
    os._exit(0)  # dies holding the queue lock


def test_pool_slot_of_a_holder_that_died_in_between_is_freed_by_the_repair(ctx):
    q = ctx.Queue()
    blobs = [os.urandom(300_000), os.urandom(300_000)]
    q.put_many(blobs)
    assert [q._h[queues._POOL0 + i] for i in range(2)] == [queues._P_QUEUED] * 2
    p = ctx.Process(target=_consume_pooled_and_die, args=(q,))
    p.start()
    p.join(10)
    assert q.get(timeout=10) == blobs[1]  # the first one is the message the dead consumer had
    assert all(q._h[queues._POOL0 + i] == queues._P_FREE for i in range(queues._NPOOL))
    assert q.empty()


def test_lock_holder_death_is_taken_over_and_repaired(ctx):
    q = ctx.Queue()
    q.put_many(["a", "b"])
    p = ctx.Process(target=_hold_lock_and_die, args=(q,))
    p.start()
    p.join(10)
    t0 = time.monotonic()
    assert q.get(timeout=10) == "a"
    assert time.monotonic() - t0 < 5
    assert q.qsize() == 1
    assert q.get(timeout=5) == "b"


# -- the pure-Python fallback ----------------------------------------------------------------------

@pytest.mark.skipif(os.environ.get("GILFREE_PURE_QUEUE") == "1", reason="already the fallback")
@pytest.mark.timeout(240)
def test_pure_python_fallback():
    """This file's tests (but the slowest) again with GILFREE_PURE_QUEUE=1: no C hot path, polling waits."""
    env = dict(os.environ, GILFREE_PURE_QUEUE="1")
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "not pure_python and not sigkilled_consumers"],
        capture_output=True, text=True, env=env, timeout=220,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_fallback_is_in_use_when_asked():
    assert (queues._cqueue is None) == (os.environ.get("GILFREE_PURE_QUEUE") == "1")


# -- issue 11: a death or Ctrl-C at an exact instruction, hostile bytes, stdlib details -------------
# These use no crash point (so that they also run on the code before the fix, where they fail): a
# child stops itself with sys.settrace at a given line, or a lock wrapper raises as a signal handler.

def _die_at(func_name, event, line_text=None, nth=1):
    """SIGKILL this process at the ``nth`` ``event`` ('line' or 'return') in function ``func_name``
    (for 'line': the line whose source contains ``line_text``)."""
    import linecache

    seen = [0]

    def local(frame, ev, arg):
        if ev == event and (line_text is None or line_text in linecache.getline(frame.f_code.co_filename, frame.f_lineno)):
            seen[0] += 1
            if seen[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
        return local

    def global_trace(frame, ev, arg):
        return local if frame.f_code.co_name == func_name else None

    sys.settrace(global_trace)


def _put_and_die(q, items, func_name, event, line_text, nth):
    q._fast = False  # the Python path, where the trace can stop it
    _die_at(func_name, event, line_text, nth)
    if len(items) == 1:
        q.put(items[0])
    else:
        q.put_many(items)
    os._exit(3)  # not reached: it died at that line


def _killed_putting(ctx, q, items, func_name, event, line_text=None, nth=1):
    p = ctx.Process(target=_put_and_die, args=(q, items, func_name, event, line_text, nth))
    p.start()
    p.join(20)
    assert p.exitcode == -signal.SIGKILL, f"the child did not die at {func_name}/{event} (exit code {p.exitcode})"


def _drain(q):
    got = []
    while True:
        try:
            got.append(q.get(timeout=0.5))
        except queue.Empty:
            return got


def test_joinable_count_survives_a_death_between_publish_and_count(ctx):
    """Item 5: killed after the record was published, before the unfinished count was raised, join()
    returned early and task_done() raised.  Now the count and the record go together."""
    q = ctx.JoinableQueue()
    q.put(["before"])
    _killed_putting(ctx, q, [["x"]], "_append", "return")
    got = _drain(q)
    assert got[0] == ["before"] and got[1:] in ([], [["x"]])
    for _ in got:
        q.task_done()  # raised ValueError before the fix
    t = threading.Thread(target=q.join, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive()
    with pytest.raises(ValueError):
        q.task_done()


def test_put_many_is_all_or_nothing_under_sigkill(ctx):
    """Item 13: a producer killed half-way through put_many left a prefix of the batch queued."""
    q = ctx.Queue()
    _killed_putting(ctx, q, [["a"], ["b"], ["c"]], "_append", "return", nth=2)
    assert q.qsize() == 0
    assert _drain(q) == []
    q.put_many([1, 2])
    assert q.get_many(5, timeout=5) == [1, 2]


def test_qsize_is_right_after_a_death_before_anyone_takes_over(ctx):
    """Item 13: qsize() said 0 while a message killed before being counted was there (until the next
    takeover); now it settles the operation first."""
    q = ctx.Queue()
    _killed_putting(ctx, q, [["x"]], "_append", "line", "h[_COUNT]")  # the line that counts it
    n = q.qsize()
    assert n == len(_drain(q))


class _InterruptAfterAcquire:
    """The queue lock, but Ctrl-C lands right after an acquire returns (before the caller's ``try``)."""

    def __init__(self, lock):
        self._l = lock
        self.armed = True

    def acquire(self, *args):
        got = self._l.acquire(*args)
        if got and self.armed:
            self.armed = False
            raise KeyboardInterrupt("after acquire")
        return got

    def __getattr__(self, name):
        return getattr(self._l, name)


@pytest.mark.parametrize("site", ["put_many", "get_many", "pool", "task_done", "join"])
def test_ctrl_c_right_after_taking_the_lock_releases_it(site):
    """Item 3: a KeyboardInterrupt between the queue lock being taken and the caller's try left the
    lock held by the live process: everybody else waited forever."""
    q = gilfree.JoinableQueue()
    q.put_many(["a", "b"])
    q.get(timeout=5)
    real = q._lock
    q._lock = wrapper = _InterruptAfterAcquire(real)
    action = {
        "put_many": lambda: q.put_many(["c"]),
        "get_many": lambda: q.get_many(5, timeout=5),
        "pool": lambda: q.put(b"p" * 300_000),  # claims a pool slot under the lock
        "task_done": q.task_done,
        "join": q.join,
    }[site]
    with pytest.raises(KeyboardInterrupt):
        action()
    assert not wrapper.armed
    q._lock = real
    assert not real._is_mine()
    got = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=5)))
    t.start()
    t.join(10)
    assert got == ["b"]
    assert all(q._h[queues._POOL0 + i] == queues._P_FREE for i in range(queues._NPOOL))


def _corrupt_and_get(q, word, value):
    q._ring.cast("I")[word] = value  # the ring's record header at the head: [length, kind]
    try:
        q.get(timeout=2)
    except queues.CorruptQueueError as e:
        assert q._prefix[3:-1] in str(e), e
        q.put("after")
        assert q.get(timeout=2) == "after"
        os._exit(0)
    os._exit(4)  # read something


@pytest.mark.parametrize("word,value", [(0, 0xFFFFFFF0), (0, 1 << 20), (1, 77)])
def test_corrupt_record_is_reported_not_a_crash(word, value):
    """Item 7: a corrupted record length made the reader read past its ring (segfault)."""
    q = gilfree.Queue(ring_size=4096)
    q.put(("x", 1))
    p = gilfree.get_context("fork").Process(target=_corrupt_and_get, args=(q, word, value))
    p.start()
    p.join(20)
    assert p.exitcode == 0, f"reader exit code {p.exitcode}"


def test_simple_queue_after_close_raises_oserror_as_the_stdlib():
    """Item 13: SimpleQueue use after close() raised ValueError; the stdlib's raises OSError."""
    for q in (std_mp.SimpleQueue(), gilfree.SimpleQueue()):
        q.put(1)
        q.close()
        for call in (q.get, lambda q=q: q.put(2), q.empty):
            with pytest.raises(OSError, match="handle is closed"):
                call()
