"""Locks, semaphores, conditions, events and barriers.

1. Semantics compared with the stdlib's ``multiprocessing`` in the same test (return values, errors,
   reprs, ``_is_mine``/``_count`` as ``Condition`` uses them), with threads and with processes under
   every start method.
2. The seed's bank (``tests/seed/ex7_lock.py``): two processes add and subtract under a lock.
3. Robustness (gilfree only): a holder killed with SIGKILL is reported to waiters within a second
   (or taken over with ``on_owner_death="takeover"``), deaths that cost nothing are never reported,
   and Ctrl-C interrupts a blocked ``acquire``.

Every blocking call has a timeout and every process is joined (and killed first if still running).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import multiprocessing as std_mp
import os
import signal
import sys
import threading
import time
import traceback
import warnings

import pytest
from _helpers import running

import gilfree
from gilfree import OwnerDiedError, OwnerDiedWarning, _shm

#: An upper bound for anything that should happen promptly; reached only when something is broken.
WAIT = 20.0
LIBS = [gilfree, std_mp]


def std_ctx(ctx):
    """The stdlib context with the same start method as a gilfree context."""
    return std_mp.get_context(ctx.get_start_method())


def semlock(obj):
    """What has ``_is_mine``/``_count``: gilfree's lock itself, or the stdlib lock's ``_semlock``."""
    return getattr(obj, "_semlock", obj)




def recv(conn, timeout=WAIT):
    assert conn.poll(timeout), "no answer from the child"
    return conn.recv()


def in_thread(fn, *args, name=None):
    """Run ``fn(*args)`` in a daemon thread; return (thread, result dict with 'value' or 'error')."""
    result = {}

    def run():
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # noqa: B036 - reported to the test
            result["error"] = e
            result["time"] = time.monotonic()

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t, result


def call_in_thread(fn, *args, name=None):
    """``fn(*args)`` run in another thread; its value (or its exception, raised here)."""
    t, result = in_thread(fn, *args, name=name)
    t.join(WAIT)
    assert not t.is_alive(), "thread did not finish"
    if "error" in result:
        raise result["error"]
    return result["value"]


def until(predicate, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def waiters(cond) -> int:
    """The number of sleepers a Condition's repr shows (both libraries print it last)."""
    return int(repr(cond).rsplit(",", 1)[1].strip(" >)"))


# -- child targets (module level: picklable by reference under spawn and forkserver) -------------

def release_it(lock):
    lock.release()


def acquire_and_exit(lock):
    lock.acquire()


def hold(obj, conn):
    """Acquire the lock (of a Value: and start updating it), say so, and sleep until killed."""
    if hasattr(obj, "get_lock"):
        obj.get_lock().acquire()
        obj.value = 1  # half-way through an update when it is killed
    else:
        obj.acquire()
    conn.send("held")
    time.sleep(WAIT * 3)


def wait_for_lock(obj, conn):
    lock = obj.get_lock() if hasattr(obj, "get_lock") else obj
    conn.send("waiting")
    try:
        got = lock.acquire(timeout=WAIT)
    except OwnerDiedError as e:
        conn.send(("OwnerDiedError", e.pid, str(e)))
    else:
        conn.send(("acquired", got, ""))


def try_acquire(lock, timeout, conn):
    try:
        conn.send(("returned", lock.acquire(timeout=timeout)))
    except Exception as e:
        conn.send((type(e).__name__, str(e)))


def take_one_and_sleep(sem, conn):
    conn.send(sem.acquire(timeout=WAIT))
    time.sleep(WAIT * 3)


def release_n(sem, n):
    for _ in range(n):
        sem.release()


def wait_on_condition(cond, flag, use_wait_for, conn):
    with cond:
        conn.send(("timeout", cond.wait(0.1)))
        conn.send("waiting")  # sent while holding the lock: the parent can notify only once we sleep
        if use_wait_for:
            ok = cond.wait_for(lambda: flag.value == 7, timeout=WAIT)
        else:
            ok = cond.wait(timeout=WAIT)
        conn.send(("woken", ok, flag.value))


def event_child(ev, back, conn):
    conn.send(("initial", ev.is_set(), ev.wait(0.1)))
    conn.send(("waited", ev.wait(WAIT), ev.is_set()))
    back.set()


def bump(counter):
    with counter.get_lock():
        counter.value += 1


def barrier_child(barrier, slot, results):
    results[slot] = barrier.wait()


def bank(balance, lock, delta, n):
    for _ in range(n):
        with lock:
            balance.value += delta


def bank_own_lock(balance, delta, n):
    for _ in range(n):
        with balance.get_lock():
            balance.value += delta


def acquire_report_interrupt(lock, conn):
    conn.send("waiting")
    try:
        lock.acquire(timeout=WAIT)
    except BaseException:
        conn.send(traceback.format_exc())
        raise
    conn.send("acquired")


def wait_on_event(ev, conn):
    conn.send("waiting")
    conn.send(ev.wait(WAIT))


def sleep_on_condition(cond, conn):
    with cond:
        conn.send("waiting")
        conn.send(cond.wait(WAIT))


def hold_until_told(lock, conn):
    lock.acquire()
    conn.send((lock._block.arena.ident, lock._block.offset))
    assert conn.poll(WAIT) and conn.recv() == "release"
    lock.release()
    conn.send("released")


def use_everything(objs, conn):
    lock, rlock, sem, bsem, cond, event, barrier, value, array = objs
    report = {}
    with lock:
        report["lock_mine"] = lock._is_mine()
    with rlock, rlock:
        report["rlock_count"] = rlock._count()
    report["sem"] = sem.get_value()
    sem.release()
    bsem.acquire()
    report["bsem_repr"] = repr(bsem)
    with cond:
        cond.notify_all()
    report["event_was_set"] = event.is_set()
    event.set()
    report["barrier_index"] = barrier.wait(WAIT)
    with value.get_lock():
        value.value += 1
    array[:] = [9, 8, 7]
    conn.send(report)


# == 1. Semantics compared with the stdlib ========================================================

def lock_story(lib):
    lock = lib.Lock()
    out = [lock.acquire(), lock.acquire(False), lock.acquire(block=False), lock.acquire(True, 0)]
    t0 = time.monotonic()
    out.append(lock.acquire(timeout=0.2))
    waited = time.monotonic() - t0
    t0 = time.monotonic()
    out.append(lock.acquire(timeout=-1))  # a negative timeout means "do not wait"
    negative = time.monotonic() - t0
    lock.release()
    out.append(lock.acquire(False))
    lock.release()
    with pytest.raises(ValueError, match="released too many times"):
        lock.release()
    with lock as entered:
        out += [entered, lock.acquire(False)]
    out.append(lock.acquire(False))
    lock.release()
    return out, waited, negative


def test_lock_acquire_release_matches_stdlib():
    (g, g_waited, g_negative), (s, s_waited, s_negative) = [lock_story(lib) for lib in LIBS]
    assert g == s == [True, False, False, False, False, False, True, True, False, True]
    for waited in (g_waited, s_waited):
        assert 0.18 <= waited < 2.0
    for negative in (g_negative, s_negative):
        assert negative < 0.5


def test_lock_released_by_another_thread_like_stdlib():
    for lib in LIBS:
        lock = lib.Lock()
        lock.acquire()
        call_in_thread(lock.release)
        assert lock.acquire(False) is True
        # and a thread blocked in acquire is woken by a release from the main thread
        t, result = in_thread(lock.acquire, True, WAIT)
        time.sleep(0.1)
        assert "value" not in result
        lock.release()
        t.join(WAIT)
        assert result.get("value") is True, lib
        lock.release()


def test_lock_released_by_another_process_like_stdlib(ctx):
    for c in (ctx, std_ctx(ctx)):
        lock = c.Lock()
        lock.acquire()
        with running(c, release_it, lock) as p:
            p.join(WAIT)
        assert p.exitcode == 0
        t0 = time.monotonic()
        assert lock.acquire(timeout=WAIT) is True
        assert time.monotonic() - t0 < 1.0
        lock.release()


def lock_reprs(c):
    lock = c.Lock()
    reprs = [repr(lock)]
    lock.acquire()
    reprs.append(repr(lock))
    reprs.append(call_in_thread(repr, lock))
    lock.release()

    def in_t1():
        with lock:
            return repr(lock)

    reprs.append(call_in_thread(in_t1, name="T1"))
    with running(c, acquire_and_exit, lock) as p:
        p.join(WAIT)
    reprs.append(repr(lock))
    lock.release()  # a lock acquired by another process may be released here
    reprs.append(repr(lock))
    return reprs


def test_lock_repr_matches_stdlib(ctx):
    g, s = lock_reprs(ctx), lock_reprs(std_ctx(ctx))
    assert g == s == [
        "<Lock(owner=None)>",
        "<Lock(owner=MainProcess)>",
        "<Lock(owner=SomeOtherThread)>",
        "<Lock(owner=MainProcess|T1)>",
        "<Lock(owner=SomeOtherProcess)>",
        "<Lock(owner=None)>",
    ]


def test_lock_is_mine_and_count_per_thread_like_stdlib():
    for lib in LIBS:
        lock = lib.Lock()
        sl = semlock(lock)
        assert (sl._is_mine(), sl._count()) == (False, 0)
        lock.acquire()
        assert (sl._is_mine(), sl._count()) == (True, 1)
        assert call_in_thread(sl._is_mine) is False
        lock.release()
        assert (sl._is_mine(), sl._count()) == (False, 0)


def rlock_story(lib):
    lock = lib.RLock()
    sl = semlock(lock)
    out = [repr(lock), lock.acquire(), lock.acquire(), lock.acquire(timeout=0.1), repr(lock), sl._count(),
           sl._is_mine()]

    def other():
        r = [lock.acquire(False), lock.acquire(timeout=0.1), repr(lock), semlock(lock)._is_mine()]
        try:
            lock.release()
            r.append("released")
        except AssertionError as e:
            r.append(("AssertionError", str(e)))
        return r

    out.append(call_in_thread(other))
    lock.release()
    out.append(sl._count())
    lock.release()
    lock.release()
    out += [repr(lock), sl._count(), sl._is_mine()]
    with pytest.raises(AssertionError):
        lock.release()

    def in_t2():
        with lock, lock:
            return repr(lock)

    out.append(call_in_thread(in_t2, name="T2"))
    with lock as entered:
        out.append(entered)
    return out


def test_rlock_matches_stdlib():
    g, s = rlock_story(gilfree), rlock_story(std_mp)
    assert g == s == [
        "<RLock(None, 0)>", True, True, True, "<RLock(MainProcess, 3)>", 3, True,
        [False, False, "<RLock(SomeOtherThread, nonzero)>", False,
         ("AssertionError", "attempt to release recursive lock not owned by thread")],
        2, "<RLock(None, 0)>", 0, False, "<RLock(MainProcess|T2, 2)>", True,
    ]


def test_rlock_held_by_another_process_like_stdlib(ctx):
    for c in (ctx, std_ctx(ctx)):
        lock = c.RLock()
        with running(c, acquire_and_exit, lock) as p:
            p.join(WAIT)
        assert repr(lock) == "<RLock(SomeOtherProcess, nonzero)>"
        assert lock.acquire(False) is False
        with pytest.raises(AssertionError):
            lock.release()


def semaphore_story(lib):
    sem = lib.Semaphore(3)
    out = [repr(sem), sem.get_value(), sem.acquire(), sem.acquire(), sem.acquire(), sem.acquire(False),
           sem.get_value(), repr(sem)]
    t0 = time.monotonic()
    out.append(sem.acquire(timeout=0.2))
    waited = time.monotonic() - t0
    for _ in range(5):
        sem.release()  # an unbounded semaphore goes past its initial value
    out += [sem.get_value(), repr(sem)]
    # a negative value: ValueError here and in threading; the stdlib passes the OSError of sem_open on
    with pytest.raises(ValueError if lib is gilfree else (ValueError, OSError)):
        lib.Semaphore(-1)
    zero = lib.Semaphore(0)
    out += [zero.acquire(False), repr(zero)]
    return out, waited


def test_semaphore_matches_stdlib():
    (g, g_waited), (s, s_waited) = semaphore_story(gilfree), semaphore_story(std_mp)
    assert g == s == ["<Semaphore(value=3)>", 3, True, True, True, False, 0, "<Semaphore(value=0)>", False,
                      5, "<Semaphore(value=5)>", False, "<Semaphore(value=0)>"]
    for waited in (g_waited, s_waited):
        assert 0.18 <= waited < 2.0


def bounded_story(lib):
    sem = lib.BoundedSemaphore(2)
    out = [repr(sem), sem.get_value()]
    with pytest.raises(ValueError, match="released too many times"):
        sem.release()
    out += [sem.acquire(), repr(sem)]
    sem.release()
    with pytest.raises(ValueError):
        sem.release()
    out += [sem.get_value(), repr(lib.BoundedSemaphore()), repr(lib.BoundedSemaphore(0))]
    with pytest.raises(ValueError):
        lib.BoundedSemaphore(0).release()
    return out


def test_bounded_semaphore_matches_stdlib():
    assert bounded_story(gilfree) == bounded_story(std_mp) == [
        "<BoundedSemaphore(value=2, maxvalue=2)>", 2, True, "<BoundedSemaphore(value=1, maxvalue=2)>", 2,
        "<BoundedSemaphore(value=1, maxvalue=1)>", "<BoundedSemaphore(value=0, maxvalue=0)>",
    ]


def semaphore_wakeup_story(lib):
    sem = lib.Semaphore(0)
    started = [in_thread(sem.acquire, True, WAIT) for _ in range(3)]
    time.sleep(0.1)
    out = [sum("value" in r for _, r in started)]
    sem.release()
    sem.release()
    until(lambda: sum("value" in r for _, r in started) == 2)
    time.sleep(0.1)
    out.append(sum("value" in r for _, r in started))  # each release wakes one waiter
    sem.release()
    for t, _ in started:
        t.join(WAIT)
    return out + [[r.get("value") for _, r in started], sem.get_value()]


def test_semaphore_wakes_waiting_threads_one_per_release_like_stdlib():
    assert semaphore_wakeup_story(gilfree) == semaphore_wakeup_story(std_mp) == [0, 2, [True] * 3, 0]


def condition_thread_story(lib):
    cond = lib.Condition()
    out = [repr(cond)]
    with pytest.raises(AssertionError):
        cond.wait(0.01)
    with pytest.raises(AssertionError):
        cond.notify()
    with cond:
        t0 = time.monotonic()
        out.append(cond.wait(0.2))
        waited = time.monotonic() - t0
        out.append(cond.wait_for(lambda: 42, 0))  # true at once: its value, without waiting
        out.append(cond.wait_for(lambda: 0, 0.1))  # never true: its last value after the timeout
        cond.notify()  # nobody waits: nothing happens
        cond.notify_all()
    # a thread that does not hold the lock may not wait on it, even while another thread holds it
    with cond:
        with pytest.raises(AssertionError):
            call_in_thread(cond.wait, 0.1)
    state = {"go": False}
    results = []

    def waiter(use_wait_for):
        with cond:
            if use_wait_for:
                results.append(cond.wait_for(lambda: state["go"], WAIT))
            else:
                results.append(cond.wait(WAIT))

    threads = [in_thread(waiter, i == 2)[0] for i in range(3)]
    until(lambda: waiters(cond) == 3)
    out.append(repr(cond))
    with cond:
        cond.notify(2)  # wakes two; the wait_for waiter goes back to sleep if woken
    until(lambda: len(results) >= 1)
    time.sleep(0.1)
    with cond:
        state["go"] = True
        cond.notify_all()
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive()
    out.append(sorted(results))
    out.append(repr(cond))
    return out, waited


def test_condition_with_threads_matches_stdlib():
    (g, g_waited), (s, s_waited) = condition_thread_story(gilfree), condition_thread_story(std_mp)
    assert g == s == ["<Condition(<RLock(None, 0)>, 0)>", False, 42, 0,
                      "<Condition(<RLock(None, 0)>, 3)>", [True, True, True], "<Condition(<RLock(None, 0)>, 0)>"]
    for waited in (g_waited, s_waited):
        assert 0.18 <= waited < 2.0


def notify_n_story(lib):
    cond = lib.Condition(lib.Lock())
    woken = []

    def waiter():
        with cond:
            woken.append(cond.wait(WAIT))

    threads = [in_thread(waiter)[0] for _ in range(4)]
    until(lambda: waiters(cond) == 4)
    with cond:
        cond.notify(3)
    until(lambda: len(woken) == 3)
    time.sleep(0.1)
    out = [len(woken), waiters(cond)]
    with cond:
        cond.notify_all()
    for t in threads:
        t.join(WAIT)
    return out + [woken]


def test_condition_notify_n_wakes_n_threads_like_stdlib():
    assert notify_n_story(gilfree) == notify_n_story(std_mp) == [3, 1, [True] * 4]


def condition_process_story(c, cond):
    flag = c.Value("i", 0)
    conns = []
    with contextlib.ExitStack() as stack:
        procs = []
        for use_wait_for in (False, True):
            r, w = c.Pipe(duplex=False)
            conns.append(r)
            procs.append(stack.enter_context(running(c, wait_on_condition, cond, flag, use_wait_for, w)))
        out = [recv(r) for r in conns for _ in range(2)]
        until(lambda: waiters(cond) == 2)
        with cond:
            flag.value = 7
            cond.notify()  # wakes one of them
        until(lambda: any(r.poll() for r in conns))
        time.sleep(0.1)
        out.append(sum(r.poll() for r in conns))  # no more than one
        with cond:
            cond.notify_all()
        out.append([recv(r) for r in conns])
        for p in procs:
            p.join(WAIT)
    return out + [[p.exitcode for p in procs], waiters(cond)]


def test_condition_with_processes_matches_stdlib(ctx):
    std = std_ctx(ctx)
    g = condition_process_story(ctx, ctx.Condition(ctx.Lock()))
    s = condition_process_story(std, std.Condition())
    assert g == s == [("timeout", False), "waiting", ("timeout", False), "waiting", 1,
                      [("woken", True, 7), ("woken", True, 7)], [0, 0], 0]


def event_thread_story(lib):
    ev = lib.Event()
    out = [ev.is_set(), ev.wait(0.1), ev.wait(0)]
    t, result = in_thread(ev.wait, WAIT)
    time.sleep(0.1)
    out.append("value" in result)
    ev.set()
    t.join(WAIT)
    out += [result.get("value"), ev.is_set(), ev.wait(), ev.wait(0)]
    ev.set()  # setting twice keeps it set
    out.append(ev.is_set())
    ev.clear()
    out += [ev.is_set(), ev.wait(0.05)]
    ev.clear()
    out.append(ev.is_set())
    return out


def test_event_with_threads_matches_stdlib():
    assert event_thread_story(gilfree) == event_thread_story(std_mp) == [
        False, False, False, False, True, True, True, True, True, False, False, False,
    ]


def test_event_across_processes_matches_stdlib(ctx):
    for c in (ctx, std_ctx(ctx)):
        ev, back = c.Event(), c.Event()
        r, w = c.Pipe(duplex=False)
        with running(c, event_child, ev, back, w) as p:
            assert recv(r) == ("initial", False, False)
            time.sleep(0.1)
            ev.set()
            assert recv(r) == ("waited", True, True)
            assert back.wait(WAIT) is True
            p.join(WAIT)
        assert p.exitcode == 0
        ev.clear()
        assert (ev.is_set(), ev.wait(0.05), back.is_set()) == (False, False, True)


def barrier_thread_story(lib):
    actions = []
    b = lib.Barrier(3, action=lambda: actions.append(threading.current_thread().name), timeout=WAIT)
    out = [b.parties, b.n_waiting, b.broken]
    started = [in_thread(b.wait) for _ in range(2)]
    until(lambda: b.n_waiting == 2)
    out.append(b.n_waiting)
    last = b.wait()
    for t, _ in started:
        t.join(WAIT)
    out.append(sorted([last] + [r["value"] for _, r in started]))
    out += [len(actions), b.n_waiting, b.broken]
    # abort breaks the barrier for those waiting and for later callers
    t, result = in_thread(b.wait)
    until(lambda: b.n_waiting == 1)
    b.abort()
    t.join(WAIT)
    out += [type(result.get("error")).__name__, b.broken]
    with pytest.raises(threading.BrokenBarrierError):
        b.wait()
    b.reset()
    out.append(b.broken)
    # a timeout breaks it too
    t0 = time.monotonic()
    with pytest.raises(threading.BrokenBarrierError):
        b.wait(timeout=0.1)
    out += [b.broken, time.monotonic() - t0 < 2.0]
    b.reset()
    started = [in_thread(b.wait) for _ in range(3)]
    for t, _ in started:
        t.join(WAIT)
    out += [sorted(r["value"] for _, r in started), len(actions), b.broken]
    return out


def test_barrier_with_threads_matches_stdlib():
    assert barrier_thread_story(gilfree) == barrier_thread_story(std_mp) == [
        3, 0, False, 2, [0, 1, 2], 1, 0, False, "BrokenBarrierError", True, False, True, True, [0, 1, 2], 2,
        False,
    ]


def test_barrier_across_processes_matches_stdlib(ctx):
    for c in (ctx, std_ctx(ctx)):
        counter = c.Value("i", 0)
        barrier = c.Barrier(3, action=functools.partial(bump, counter), timeout=WAIT)
        results = c.Array("i", [-1, -1, -1])
        with contextlib.ExitStack() as stack:
            procs = [stack.enter_context(running(c, barrier_child, barrier, i, results)) for i in range(3)]
            for p in procs:
                p.join(WAIT)
        assert [p.exitcode for p in procs] == [0, 0, 0]
        assert sorted(results[:]) == [0, 1, 2]
        assert counter.value == 1, "the action runs once per crossing"
        assert (barrier.parties, barrier.n_waiting, barrier.broken) == (3, 0, False)


def test_barrier_repr_matches_stdlib():
    import re

    def shape(b):
        return re.sub(r"^<[\w.]+\.Barrier at 0x[0-9a-f]+", "<Barrier at ADDR", repr(b))

    reprs = []
    for lib in LIBS:
        b = lib.Barrier(2)
        before = shape(b)
        b.abort()
        reprs.append((before, shape(b)))
    assert reprs[0] == reprs[1]
    assert reprs[0][0] == "<Barrier at ADDR: waiters=0/2>"


def test_every_object_reaches_a_child_as_process_argument(ctx):
    lock, rlock, sem, bsem = ctx.Lock(), ctx.RLock(), ctx.Semaphore(2), ctx.BoundedSemaphore(2)
    cond, event, barrier = ctx.Condition(), ctx.Event(), ctx.Barrier(2, timeout=WAIT)
    value, array = ctx.Value("i", 41), ctx.Array("i", 3)
    r, w = ctx.Pipe(duplex=False)
    with running(ctx, use_everything, (lock, rlock, sem, bsem, cond, event, barrier, value, array), w) as p:
        index = barrier.wait(WAIT)
        report = recv(r)
        p.join(WAIT)
    assert p.exitcode == 0
    assert report == {"lock_mine": True, "rlock_count": 2, "sem": 2,
                      "bsem_repr": "<BoundedSemaphore(value=1, maxvalue=2)>", "event_was_set": False,
                      "barrier_index": 1 - index}
    assert sem.get_value() == 3 and bsem.get_value() == 1 and event.is_set()
    assert value.value == 42 and array[:] == [9, 8, 7]
    assert lock.acquire(False) and rlock.acquire(False)


@pytest.mark.parametrize("kind", ["Lock", "RLock", "Semaphore", "BoundedSemaphore", "Condition", "Event", "Barrier"])
def test_sending_through_a_pipe_is_refused_like_stdlib(kind):
    for lib in LIBS:
        obj = getattr(lib, kind)(2) if kind == "Barrier" else getattr(lib, kind)()
        a, b = lib.Pipe()
        try:
            with pytest.raises(RuntimeError, match="only be shared between processes through inheritance"):
                a.send(obj)
            assert not b.poll(0.05), "something arrived"
        finally:
            a.close()
            b.close()


# == 2. The seed's bank ===========================================================================

def test_bank_balance_is_exact(ctx):
    n = 20_000
    balance, own = ctx.Value("i", 100), ctx.Value("i", 100)
    lock = ctx.Lock()
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(running(ctx, bank, balance, lock, delta, n)) for delta in (1, -1)]
        procs += [stack.enter_context(running(ctx, bank_own_lock, own, delta, n)) for delta in (1, -1)]
        for p in procs:
            p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert balance.value == 100
    assert own.value == 100


# == 3. Robustness ================================================================================

KINDS = ["Lock", "RLock", "Semaphore", "BoundedSemaphore", "Value"]


def make_lock(ctx, kind, mode="raise"):
    """(what the child gets, the lock a waiter acquires) for each kind of lock."""
    if kind == "Value":
        v = ctx.Value("i", 0) if mode == "raise" else ctx.Value("i", 0, lock=ctx.RLock(on_owner_death=mode))
        return v, v.get_lock()
    lock = getattr(ctx, kind)(on_owner_death=mode)
    return lock, lock


@pytest.mark.parametrize("kind", KINDS)
def test_killed_holder_is_reported_within_a_second(ctx, kind):
    obj, lock = make_lock(ctx, kind)
    r, w = ctx.Pipe(duplex=False)
    with running(ctx, hold, obj, w) as p:
        assert recv(r) == "held"
        pid = p.pid
        p.kill()  # not joined yet: a zombie is as dead as a reaped process
        t0 = time.monotonic()
        with pytest.raises(OwnerDiedError) as info:
            lock.acquire(timeout=WAIT)
        elapsed = time.monotonic() - t0
    assert elapsed < 1.0, f"took {elapsed:.2f} s to notice"
    err = info.value
    assert isinstance(err, RuntimeError) and isinstance(err, gilfree.ProcessError)
    assert err.pid == pid and err.lock is lock
    assert f"pid {pid}" in str(err)
    if kind == "Value":
        assert "lock of Value('i')" in str(err)
        assert "half-updated" in str(err)
        assert obj.get_obj().value == 1  # what the dead process wrote (bypassing the held lock)
    # the lock stays held by the dead process: every waiter is told, a non-blocking try just fails
    with pytest.raises(OwnerDiedError):
        lock.acquire(timeout=WAIT)
    assert lock.acquire(False) is False


def test_one_dead_holder_among_several_is_named():
    ctx = gilfree.get_context("fork")
    sem = ctx.Semaphore(2)
    r1, w1 = ctx.Pipe(duplex=False)
    r2, w2 = ctx.Pipe(duplex=False)
    with running(ctx, hold, sem, w1) as alive, running(ctx, hold, sem, w2) as doomed:
        assert recv(r1) == recv(r2) == "held"
        assert sem.get_value() == 0
        doomed.kill()
        with pytest.raises(OwnerDiedError) as info:
            sem.acquire(timeout=WAIT)
        assert info.value.pid == doomed.pid != alive.pid


ROBUST_CASES = [(kind, "fork") for kind in KINDS] + [("Lock", "spawn"), ("Value", "forkserver")]


@pytest.mark.parametrize("kind, method", ROBUST_CASES)
def test_waiters_blocked_before_the_kill_are_told(kind, method):
    ctx = gilfree.get_context(method)
    obj, lock = make_lock(ctx, kind)
    r, w = ctx.Pipe(duplex=False)
    wr, ww = ctx.Pipe(duplex=False)
    with running(ctx, hold, obj, w) as holder:
        assert recv(r) == "held"
        with running(ctx, wait_for_lock, obj, ww) as waiter:
            assert recv(wr) == "waiting"
            t, result = in_thread(lock.acquire, True, WAIT)
            time.sleep(0.3)  # both are asleep in acquire by now
            assert not result
            pid = holder.pid
            holder.kill()
            killed = time.monotonic()
            t.join(WAIT)
            answer = recv(wr)
            waiter.join(WAIT)
    assert isinstance(result.get("error"), OwnerDiedError), result
    assert result["error"].pid == pid
    assert result["time"] - killed < 2.0
    assert answer[:2] == ("OwnerDiedError", pid)
    assert f"pid {pid}" in answer[2]
    assert waiter.exitcode == 0


@pytest.mark.parametrize("kind, method", ROBUST_CASES)
def test_takeover_acquires_with_a_warning(kind, method):
    ctx = gilfree.get_context(method)
    obj, lock = make_lock(ctx, kind, mode="takeover")
    r, w = ctx.Pipe(duplex=False)
    with running(ctx, hold, obj, w) as p:
        assert recv(r) == "held"
        pid = p.pid
        p.kill()
        t0 = time.monotonic()
        with pytest.warns(OwnerDiedWarning, match=f"pid {pid}.*half-updated"):
            assert lock.acquire(timeout=WAIT) is True
        assert time.monotonic() - t0 < 1.0
    assert lock.recovered_from == pid
    if kind in ("Lock", "RLock", "Value"):
        assert lock._is_mine() and lock._count() == 1
    if kind == "Value":
        assert obj.value == 1  # the RLock is ours: reading the value re-enters it
    lock.release()
    # from now on it is an ordinary lock again
    if kind in ("Semaphore", "BoundedSemaphore"):
        assert lock.get_value() == 1
    assert lock.acquire(timeout=1) is True
    assert lock.recovered_from is None
    lock.release()
    if kind == "BoundedSemaphore":
        with pytest.raises(ValueError):
            lock.release()
    elif kind != "Semaphore":
        with pytest.raises((ValueError, AssertionError)):
            lock.release()
    r2, w2 = ctx.Pipe(duplex=False)
    with running(ctx, try_acquire, lock, 0.5, w2) as p2:  # another process gets it too
        assert recv(r2) == ("returned", True)
        p2.join(WAIT)


def test_takeover_refused_by_a_warnings_filter_leaves_the_lock_to_the_next_waiter():
    ctx = gilfree.get_context("fork")
    for lock in (ctx.Lock(on_owner_death="takeover"), ctx.RLock(on_owner_death="takeover")):
        r, w = ctx.Pipe(duplex=False)
        with running(ctx, hold, lock, w) as p:
            assert recv(r) == "held"
            p.kill()
            with warnings.catch_warnings():
                warnings.simplefilter("error", OwnerDiedWarning)
                with pytest.raises(OwnerDiedWarning):
                    lock.acquire(timeout=WAIT)
            # acquire raised, so we do not hold it: the dead process does, and the next waiter takes over
            assert not lock._is_mine()
            assert lock.acquire(False) is False
            with pytest.warns(OwnerDiedWarning):
                assert lock.acquire(timeout=WAIT) is True
            assert lock.recovered_from == p.pid
            lock.release()
            assert lock.acquire(False) is True
            lock.release()


def test_on_owner_death_is_checked():
    with pytest.raises(ValueError, match="on_owner_death"):
        gilfree.Lock(on_owner_death="ignore")


def test_semaphore_used_as_a_signal_never_reports_a_death(ctx):
    sem = ctx.Semaphore(0)
    r, w = ctx.Pipe(duplex=False)
    with running(ctx, take_one_and_sleep, sem, w) as consumer:
        with running(ctx, release_n, sem, 2) as producer:
            producer.join(WAIT)
        assert recv(r) is True
        consumer.kill()  # holds the token it took when it dies
        consumer.join(WAIT)
    assert sem.acquire(timeout=WAIT) is True  # the second token
    t0 = time.monotonic()
    assert sem.acquire(timeout=0.5) is False  # nothing left: a plain timeout, not OwnerDiedError
    assert time.monotonic() - t0 >= 0.45
    sem.release()
    assert sem.acquire(timeout=1) is True


def test_lock_handed_off_then_first_holder_dies_is_not_reported(ctx):
    lock = ctx.Lock()
    r, w = ctx.Pipe(duplex=False)
    with running(ctx, hold, lock, w) as first:
        assert recv(r) == "held"
        lock.release()  # handed off: the first holder's record no longer says who holds it
        assert lock.acquire(timeout=WAIT) is True
        first.kill()
        first.join(WAIT)
    # we hold it; waiters wait and time out, they are not told about the dead first holder
    t, result = in_thread(lock.acquire, True, 0.5)
    r2, w2 = ctx.Pipe(duplex=False)
    with running(ctx, try_acquire, lock, 0.5, w2) as other:
        assert recv(r2) == ("returned", False)
        other.join(WAIT)
    t.join(WAIT)
    assert result == {"value": False}
    lock.release()
    assert lock.acquire(timeout=1) is True
    lock.release()


def test_lock_acquired_in_a_child_and_released_here_then_child_dies():
    ctx = gilfree.get_context("fork")
    lock = ctx.Lock()
    with running(ctx, acquire_and_exit, lock) as p:
        p.join(WAIT)
    lock.release()
    assert lock.acquire(timeout=1) is True
    t0 = time.monotonic()
    assert call_in_thread(lock.acquire, True, 0.3) is False
    assert time.monotonic() - t0 >= 0.25
    lock.release()


def test_repeated_acquire_release_by_exiting_children_stays_usable():
    ctx = gilfree.get_context("fork")
    lock = ctx.Lock()
    counter = ctx.Value("i", 0)
    for _ in range(5):
        with running(ctx, bank, counter, lock, 1, 10) as p:
            p.join(WAIT)
        assert p.exitcode == 0
    assert counter.value == 50
    assert lock.acquire(timeout=1) is True
    lock.release()


def test_event_set_is_not_stopped_by_a_killed_waiter(ctx):
    """The stdlib's Event.set() waits forever for a waiter that was killed; ours counts it out."""
    ev = ctx.Event()
    r1, w1 = ctx.Pipe(duplex=False)
    r2, w2 = ctx.Pipe(duplex=False)
    with running(ctx, wait_on_event, ev, w1) as doomed, running(ctx, wait_on_event, ev, w2) as alive:
        assert recv(r1) == recv(r2) == "waiting"
        until(lambda: waiters(ev._cond) == 2)
        doomed.kill()
        doomed.join(WAIT)
        t0 = time.monotonic()
        set_thread, result = in_thread(ev.set)
        set_thread.join(WAIT)
        assert not set_thread.is_alive(), "Event.set() hangs"
        assert time.monotonic() - t0 < 1.0
        assert recv(r2) is True
        alive.join(WAIT)
    assert result == {"value": None}
    assert alive.exitcode == 0
    assert waiters(ev._cond) == 0
    ev.clear()
    assert ev.wait(0.05) is False
    ev.set()
    assert ev.wait(1) is True


def test_condition_notify_counts_out_dead_sleepers():
    ctx = gilfree.get_context("fork")
    cond = ctx.Condition()
    conns, procs = [], []
    with contextlib.ExitStack() as stack:
        for _ in range(3):
            r, w = ctx.Pipe(duplex=False)
            conns.append(r)
            procs.append(stack.enter_context(running(ctx, sleep_on_condition, cond, w)))
        for r in conns:
            assert recv(r) == "waiting"
        until(lambda: waiters(cond) == 3)
        for p in procs[:2]:
            p.kill()
            p.join(WAIT)
        t0 = time.monotonic()
        with cond:
            cond.notify(2)  # hands out two wake-ups: the live sleeper takes one, the dead cannot
        assert time.monotonic() - t0 < 1.0
        assert recv(conns[2]) is True
        procs[2].join(WAIT)
        with cond:
            t0 = time.monotonic()
            cond.notify_all()  # the other dead sleeper: counted out again, once
            assert time.monotonic() - t0 < 1.0
        assert waiters(cond) == 0
        # and the condition works as before
        t, result = in_thread(lambda: (cond.acquire(), cond.wait(WAIT), cond.release())[1])
        until(lambda: waiters(cond) == 1)
        with cond:
            cond.notify()
        t.join(WAIT)
        assert result == {"value": True}


def test_condition_with_more_sleepers_than_recorded_slots():
    cond = gilfree.Condition()
    n = gilfree.synchronize.SLEEPER_SLOTS + 6
    woken = []

    def sleeper():
        with cond:
            woken.append(cond.wait(WAIT))

    threads = [in_thread(sleeper)[0] for _ in range(n)]
    until(lambda: waiters(cond) == n)
    with cond:
        cond.notify(gilfree.synchronize.SLEEPER_SLOTS - 1)  # within the table: exactly that many
    until(lambda: len(woken) == gilfree.synchronize.SLEEPER_SLOTS - 1)
    time.sleep(0.2)
    assert len(woken) == gilfree.synchronize.SLEEPER_SLOTS - 1
    with cond:
        cond.notify(2)  # reaches beyond the table: those sleepers all wake (documented), none is lost
    until(lambda: len(woken) == n)
    for t in threads:
        t.join(WAIT)
    assert woken == [True] * n
    assert waiters(cond) == 0


def test_condition_starts_clean_in_reused_memory():
    dirty = [_shm.Block(gilfree._csync.COND_SIZE) for _ in range(40)]
    for block in dirty:
        block.memoryview()[:] = b"\x7f" * block.requested  # pids of processes that do not exist
    del dirty, block
    gc.collect()
    conds = [gilfree.Condition() for _ in range(40)]
    assert all(c._cv._sleepers() == [] and c._cv._waiting() == 0 for c in conds)
    cond = conds[-1]
    t, result = in_thread(lambda: (cond.acquire(), cond.wait(WAIT), cond.release())[1])
    until(lambda: waiters(cond) == 1)
    with cond:
        cond.notify()
    t.join(WAIT)
    assert result == {"value": True} and waiters(cond) == 0


def test_ctrl_c_interrupts_a_child_blocked_in_acquire(ctx):
    lock = ctx.Lock()
    lock.acquire()
    r, w = ctx.Pipe(duplex=False)
    with running(ctx, acquire_report_interrupt, lock, w) as p:
        assert recv(r) == "waiting"
        time.sleep(0.3)
        os.kill(p.pid, signal.SIGINT)
        text = recv(r, timeout=5)
        p.join(WAIT)
    assert "KeyboardInterrupt" in text
    assert "lock.acquire(timeout=WAIT)" in text, text
    assert p.exitcode == 1
    lock.release()


def _interrupt_main_after(seconds):
    timer = threading.Timer(seconds, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    timer.start()
    return timer


@pytest.mark.parametrize("what", ["Lock", "RLock", "Semaphore", "Condition", "Event"])
def test_ctrl_c_interrupts_a_blocked_wait_in_this_process(what):
    if what == "Lock":
        obj = gilfree.Lock()
        obj.acquire()
        block = functools.partial(obj.acquire, timeout=5)
    elif what == "RLock":  # held by another thread
        obj = gilfree.RLock()
        held, holder_done = threading.Event(), threading.Event()
        t, _ = in_thread(lambda: (obj.acquire(), held.set(), holder_done.wait(WAIT), obj.release()))
        assert held.wait(WAIT)
        block = functools.partial(obj.acquire, timeout=5)
    elif what == "Semaphore":
        block = functools.partial(gilfree.Semaphore(0).acquire, timeout=5)
    elif what == "Condition":
        cond = gilfree.Condition()

        def block():
            with cond:
                return cond.wait(5)
    else:
        block = functools.partial(gilfree.Event().wait, 5)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = _interrupt_main_after(0.3)
    try:
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            block()
            time.sleep(1)  # (a late KeyboardInterrupt lands here; the time check below fails)
        elapsed = time.monotonic() - t0
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGINT, old)
        if what == "RLock":
            holder_done.set()
            t.join(WAIT)
    assert elapsed < 2.0


def test_ctrl_c_arriving_between_two_sleeps_is_not_lost():
    """A signal that lands while the waiter is not inside its futex call (here: waiting for the GIL
    after a slice ran out) must still interrupt it, not wait for the whole acquire to end."""
    lock = gilfree.Lock()
    lock.acquire()
    main = threading.main_thread().ident

    def hog_then_interrupt():
        time.sleep(0.15)  # the main thread is asleep in acquire() by now
        end = time.monotonic() + 0.35  # several slices: the waiter wakes and queues for the GIL
        while time.monotonic() < end:
            pass
        signal.pthread_kill(main, signal.SIGINT)

    old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(5.0)  # the hog keeps the GIL until it ends
    t = threading.Thread(target=hog_then_interrupt, daemon=True)
    try:
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            t.start()
            lock.acquire(timeout=5)
            time.sleep(1)
        elapsed = time.monotonic() - t0
    finally:
        sys.setswitchinterval(old_interval)
        t.join(WAIT)
        signal.signal(signal.SIGINT, old_handler)
    assert elapsed < 2.0


def test_a_signal_whose_handler_returns_does_not_end_the_wait():
    calls = []
    old = signal.signal(signal.SIGUSR1, lambda *a: calls.append(a))
    lock = gilfree.Lock()
    lock.acquire()
    timer = threading.Timer(0.1, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1))
    try:
        timer.start()
        t0 = time.monotonic()
        assert lock.acquire(timeout=0.5) is False
        elapsed = time.monotonic() - t0
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGUSR1, old)
    assert len(calls) == 1
    assert 0.45 <= elapsed < 2.0


def test_condition_wait_keeps_working_after_a_lock_hand_off():
    """Condition asks the lock whether this thread holds it; a hand-off must not confuse it."""
    ctx = gilfree.get_context("fork")
    lock = ctx.Lock()
    with running(ctx, acquire_and_exit, lock) as p:
        p.join(WAIT)
    lock.release()  # released here, acquired in the child: a hand-off
    cond = ctx.Condition(lock)
    with cond:
        assert lock._is_mine()
        assert repr(lock) == "<Lock(owner=MainProcess)>"
        assert cond.wait(0.05) is False
        t, result = in_thread(cond.wait, 0.05)
        t.join(WAIT)
        assert isinstance(result.get("error"), AssertionError)
    assert lock.acquire(False) is True
    lock.release()


def test_lock_given_to_a_child_and_dropped_here_keeps_its_memory(ctx):
    """``start()`` forgets its arguments; the child's lock must not be reused for the next one."""
    here, there = ctx.Pipe()
    with running(ctx, hold_until_told, ctx.Lock(), there) as p:
        where = recv(here)
        gc.collect()
        fresh = [ctx.Lock() for _ in range(50)]
        ident, offset = where
        assert not [lock for lock in fresh if lock._block.arena.ident == ident
                    and lock._block.offset <= offset < lock._block.offset + lock._block.size]
        assert not any(start <= offset < start + size for start, size in _shm.heap._free[ident]), \
            "the child's lock is in the free list"
        assert all(lock.acquire(False) for lock in fresh)
        here.send("release")
        assert recv(here) == "released"
        p.join(WAIT)
    assert p.exitcode == 0
    assert [lock._get_value() for lock in fresh] == [0] * 50, "the child's release freed a lock of ours"
    # once the child is joined, its lock's memory is free again (at the next allocation)
    new = ctx.Lock()
    ident, offset = where
    assert (new._block.arena.ident, new._block.offset) == where or any(
        start <= offset < start + size for start, size in _shm.heap._free[ident])
