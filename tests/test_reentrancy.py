"""Code that runs inside a collection never waits for a lock its own thread may hold.

Finalizers, weakref callbacks, ``__del__`` and at-fork handlers run in the middle of other code: a
garbage collection can start at any allocation, and ``os.fork()`` runs the at-fork handlers of every
library (filelock, which Ray and Dask import, registers one).  Each test here puts such code exactly
where it hurts -- on the thread that holds the lock the finalizer needs -- and checks that it neither
waits for itself nor changes shared tables under the holder's feet.  Each failed (hung, or corrupted
a table) before the fix.
"""

from __future__ import annotations

import gc
import os
import threading

import pytest
from _helpers import run_program, write_program

import gilfree
from gilfree import _tracker, util
from gilfree._start import _common

pytestmark = pytest.mark.timeout(60)


def _in_thread(func, timeout: float = 10.0):
    """Run ``func`` on a daemon thread; fail (instead of hanging) if it has not returned in time."""
    out: list = []

    def run() -> None:
        try:
            out.append(("ok", func()))
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            out.append(("raised", exc))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{func.__name__} waited for a lock its own thread holds (still blocked after {timeout} s)"
    kind, value = out[0]
    if kind == "raised":
        raise value
    return value


# -- the fork launcher ------------------------------------------------------------------------------

LAUNCH_WITH_COLLECTING_AT_FORK_HANDLER = """
import gc, os, sys

def work():
    pass

class Cycle:
    pass

def dead_child_in_a_cycle():
    # a finished child whose Process object is reachable only through a reference cycle: only a
    # collection frees it, and its finalizer then releases the child's lifeline
    p = multiprocessing.Process(target=work)
    p.start()
    p.join()
    c = Cycle()
    c.me = c
    c.p = p

collected = []

def before_fork():
    # what filelock's at-fork handler can do: run a collection inside os.fork()
    collected.append(gc.collect())

if __name__ == "__main__":
    gc.disable()
    for _ in range(3):
        dead_child_in_a_cycle()
    os.register_at_fork(before=before_fork)
    p = multiprocessing.Process(target=work)
    p.start()
    p.join()
    print("exitcode", p.exitcode, "collections", len(collected), "freed", collected[0] > 0)
    del p
    gc.collect()
    from gilfree._start import _common
    print("lifelines left", len(_common._lifelines))
"""


def test_launch_survives_an_at_fork_handler_that_collects_dead_children(tmp_path):
    prog = write_program(tmp_path, LAUNCH_WITH_COLLECTING_AT_FORK_HANDLER, method="fork")
    out = run_program(prog, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("exitcode 0 collections ") and lines[0].endswith("freed True"), out.stdout
    assert lines[1] == "lifelines left 0", out.stdout  # the released lifelines were closed, none leaked


def test_release_lifeline_inside_the_launch_guard_is_handed_to_the_holder():
    r, w = _common.new_lifeline()
    os.close(r)

    def release_while_holding():
        with _common._lifeline_guard:  # the launcher holds it across os.fork()
            _common.release_lifeline(w)  # a finalizer run by a collection on the same thread
            still_open = w in _common._lifelines
        return still_open, w in _common._lifelines

    still_open_inside, open_after = _in_thread(release_while_holding)
    assert still_open_inside  # not done under the holder's feet ...
    assert not open_after  # ... but done by the holder before it released the guard
    with pytest.raises(OSError):
        os.fstat(w)


def test_handoff_lock_runs_work_handed_while_it_releases():
    lock = util.HandoffLock()
    ran: list[int] = []

    def hand_more(n: int) -> None:
        ran.append(n)
        if n < 3:
            lock.run_or_hand_off(hand_more, n + 1)  # work that hands off more work, while held

    def go():
        with lock:
            lock.run_or_hand_off(hand_more, 1)
            assert ran == []
        return list(ran)

    assert _in_thread(go) == [1, 2, 3]
    assert not lock.locked()


def test_handoff_lock_reports_a_failing_handed_work_and_still_releases():
    lock = util.HandoffLock()

    def boom() -> None:
        raise RuntimeError("finalizer failed")

    def go():
        with lock:
            lock.run_or_hand_off(boom)
        return lock.locked()

    assert _in_thread(go) is False


# -- the shared-memory tracker client ---------------------------------------------------------------

def test_tracker_forget_inside_the_tracker_lock_does_not_wait_for_itself():
    client = _tracker._client
    table: dict = {"gfx_reentrant_probe": ("probe",)}

    def forget_while_holding():
        with client.lock:  # e.g. registering a segment; a collection runs a queue's sweep here
            client._send_forget(table, b"x", "gfx_reentrant_probe", ("probe",))
            inside = "gfx_reentrant_probe" in table
        return inside, "gfx_reentrant_probe" in table

    inside, after = _in_thread(forget_while_holding)
    assert inside and not after


# -- the manager's own proxies ------------------------------------------------------------------------

def test_server_local_decref_under_its_own_lock_is_deferred_then_drained():
    # A proxy living in the server's own process drops its reference from __del__: a collection can
    # run that on a thread that is in the middle of changing the server's tables under its lock.
    from gilfree.managers import Server, SyncManager

    server = Server(SyncManager._registry, None, os.urandom(32), "pickle")
    try:
        ident, _ = server.create(server._local, "dict", (), {})
        assert server._local_incref(ident)  # the proxy's reference (create's own is the client's)
        refs = lambda: server._objects[ident][4] if ident in server._objects else 0  # noqa: E731

        def go():
            with server._lock:  # changing the tables; the proxy's __del__ runs here
                server._local_decref(ident)
                during = refs()
            server.incref(server._local, ident)  # the next incref/decref of any thread drains it
            return during, refs()

        during, after = _in_thread(go)
        assert during == 2  # not changed under the holder's feet
        assert after == 2  # +1 by the incref, -1 by the deferred decref
        assert not server._local_pending
    finally:
        server.stop()


def test_gc_during_proxy_traffic_loses_no_reference():
    # Many short-lived proxies in reference cycles, collected at arbitrary allocations while other
    # proxies are being made: every object made is released in the end, none twice.
    with gilfree.Manager() as m:
        keep = []
        for i in range(300):
            d = m.dict(i=i)
            cyc: list = [d]
            cyc.append(cyc)
            if i % 7 == 0:
                keep.append(d)
            del d, cyc
            if i % 13 == 0:
                gc.collect()
        gc.collect()
        assert [k["i"] for k in keep] == list(range(0, 300, 7))
        m._number_of_objects()  # a request: the decrefs waiting on this channel go with it
        assert m._number_of_objects() == len(keep)


FINALIZER_STARTS_A_PROCESS_DURING_A_LAUNCH = """
import gc, os, weakref

def noop():
    pass

busy = False

def start_one(ctx):
    global busy
    if busy:
        return
    busy = True
    p = ctx.Process(target=noop)
    p.start()
    p.join(10)
    print("from the finalizer", p.exitcode, flush=True)
    busy = False

class Cycle:
    def __init__(self, ctx):
        self.me = self
        weakref.finalize(self, start_one, ctx)

if __name__ == "__main__":
    ctx = multiprocessing.get_context()
    os.register_at_fork(before=gc.collect)  # the finalizer runs inside os.fork(), in the launch
    gc.disable()
    for i in range(2):
        Cycle(ctx)
        p = ctx.Process(target=noop)
        p.start()
        p.join(10)
        print("launched", p.exitcode, flush=True)
"""


def test_a_finalizer_that_starts_a_process_inside_a_launch(tmp_path):
    """Found by the breaker: the finalizer's start() waited for the lifeline guard its own thread
    held across os.fork()."""
    prog = write_program(tmp_path, FINALIZER_STARTS_A_PROCESS_DURING_A_LAUNCH, method="fork")
    out = run_program(prog, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines.count("launched 0") == 2 and lines.count("from the finalizer 0") >= 1, out.stdout


def test_reentrant_handoff_lock_nests_and_runs_handed_work_at_the_outermost_release():
    lock = util.HandoffLock(reentrant=True)
    ran: list[str] = []

    def go():
        with lock:
            with lock:  # the same thread, again (a finalizer inside the launch)
                lock.run_or_hand_off(ran.append, "handed")
            assert ran == [] and lock.locked()
        return list(ran), lock.locked()

    assert _in_thread(go) == (["handed"], False)
