"""Crash points of the queue protocols (issue 11): every step killed, and interrupted, exactly there.

Every name that ``crash_points("queue.")`` finds in the sources (C and Python) is a step boundary of
a queue protocol: put, put_many, get, get_many, spill segments (create, link, seal, unlink), the pool
of big-message segments (claim, write, queue, take, read), big one-off segments, JoinableQueue's
task_done and join, and the repair itself.  ``OPS`` maps each point to the operations that reach it;
a point without an operation fails :func:`test_every_point_has_an_operation`, so a point added to the
code cannot go untested.

For each (point, operation) a child process arms the point and runs the operation.  It must die
there by SIGKILL: a point it never reaches makes it exit 3, which fails the case instead of passing
silently.  The parent then checks, every wait bounded (each get has a timeout, join runs in a thread
that must end):

* ``qsize()`` first -- it must settle the dead holder's operation itself -- and it is the number of
  items the parent then gets;
* the items are the ones queued before, in order, plus or minus the operation's items all together
  or not at all: nothing duplicated, nothing corrupted, at most the items in the dying process's
  hand lost.  Which of the two is fixed by the point (``DONE_AT``): before its commit an operation
  is rolled back, from its commit on it has happened;
* a JoinableQueue's unfinished count is the number of items put and not yet done, ``task_done``
  raises only when it should, and ``join()`` returns once every item is done;
* no pool slot is left queued or held by a live process; put and get go on working (a pooled
  message too);
* nothing stays in /dev/shm once the queue is collected (the conftest leak check).

Start methods.  Every case runs under fork, spawn and forkserver: the child starts differently (under
spawn and forkserver the queue arrives pickled, with no inherited spill or pool mappings and cold C
caches, so other code paths reach the same points).  The matrix stays cheap because a case costs
little more than starting its child: the dead holder is found within the lock's 0.1 s slice, and
the parent drains without waiting.  Measured on the 2-core development machine, loaded: fork 71 cases
in ~25 s, spawn + forkserver 142 cases in ~50 s, the whole file ~90 s.  The pure-Python path
(``GILFREE_PURE_QUEUE=1``), where every point is a Python one, runs the fork and interrupt cases
again in a subprocess (:func:`test_pure_python_path`, ~10 s).

Interrupts.  At every Python-level point (a ``_crash.hit`` in queues.py; in the C build only those
the C code does not also have -- the others are Python in the pure-Python run) the same operations
run in this process with the point armed to raise KeyboardInterrupt, as a signal handler would: the
lock must not stay held, the operation is rolled back or done (as for a death), and the queue keeps
working for this thread and for another one.
"""

from __future__ import annotations

import gc
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from _helpers import SRC, crash_points

import gilfree
from gilfree import _crash, queues

pytestmark = pytest.mark.timeout(120)

PURE = queues._cqueue is None
BIG = b"B" * (3 << 20)  # > POOL_MAX: its own segment
POOLED = b"P" * 200_000  # > ring/8, <= POOL_MAX: a pool slot
LONG = "x" * 300  # a record of ~330 bytes: more than a full 4 KiB ring has left, less than ring/8

# -- the operations ------------------------------------------------------------------------------
# Each: setup(ctx) in the parent -> (queue, items queued before, what the operation does); the child
# runs run(queue).  "put" operations add their items at the end; "get" ones take the first n items.


class Case:
    def __init__(self, q, before, kind, items=(), taken=0, unfinished=None):
        self.q = q
        self.before = list(before)
        self.kind = kind  # "put", "get", "task_done", "join"
        self.items = list(items)  # what a put adds
        self.taken = taken  # how many items a get takes
        self.unfinished = unfinished  # a JoinableQueue's count before the operation


def _fill_ring(q, tag="f"):
    """Plain items until the ring has less than ~200 bytes left (the next LONG record spills)."""
    out = []
    h = q._h
    i = 0
    while q._cap - (h[queues._TAIL] - h[queues._HEAD]) > 200:
        item = (tag, i, "y" * 40)
        q.put(item)
        out.append(item)
        i += 1
    return out


def _setup(op, ctx):
    if op in ("put", "put_py", "put_pool", "put_big"):
        q = ctx.Queue()
        before = [("m", i) for i in range(3)]
        q.put_many(before)
        item = {"put": ("m", 100), "put_py": ["m", 100], "put_pool": POOLED, "put_big": BIG}[op]
        return Case(q, before, "put", [item])
    if op in ("put_many", "put_many_pool"):
        q = ctx.Queue()
        before = [("m", i) for i in range(3)]
        q.put_many(before)
        items = [("m", 100 + k) for k in range(4)]
        if op == "put_many_pool":
            items[1] = POOLED
        return Case(q, before, "put", items)
    if op == "put_joinable":
        q = ctx.JoinableQueue()
        before = [("m", 0), ("m", 1)]
        q.put_many(before)
        return Case(q, before, "put", [("m", 100)], unfinished=2)
    if op == "put_spill":  # the ring is full: this put starts a spill chain
        q = ctx.Queue(ring_size=4096)
        before = _fill_ring(q)
        return Case(q, before, "put", [("s", LONG)])
    if op == "put_spill_open":  # a chain is open: this put appends to its segment
        q = ctx.Queue(ring_size=4096)
        before = _fill_ring(q) + [("s", LONG)]
        q.put(before[-1])
        assert q._h[queues._WSEG]
        return Case(q, before, "put", [("m", 100)])
    if op == "put_spill_next":  # the open segment is full: this put links a new one
        q = ctx.Queue(ring_size=4096)
        saved, queues.SPILL_SIZE = queues.SPILL_SIZE, 4096
        try:
            before = _fill_ring(q)
            i = 0
            while True:
                item = ("s", i, LONG)
                q.put(item)
                before.append(item)
                i += 1
                seg = q._segs[q._h[queues._WSEG]]
                if int.from_bytes(seg[:8], "little") + 400 > len(seg):
                    break
        finally:
            queues.SPILL_SIZE = saved
        return Case(q, before, "put", [("n", LONG)])
    if op == "put_seal":  # the ring drained while a chain is open: this put seals it
        q = ctx.Queue(ring_size=4096)
        ring = _fill_ring(q)
        before = [("s", 0, LONG), ("s", 1, LONG)]
        q.put_many(before)
        assert q.get_many(len(ring), timeout=5) == ring
        return Case(q, before, "put", [("m", 100)])
    if op in ("get", "get_many"):
        q = ctx.Queue()
        before = [("m", i) for i in range(6)]
        q.put_many(before)
        return Case(q, before, "get", taken=1 if op == "get" else 4)
    if op in ("get_pool", "get_big"):
        q = ctx.Queue()
        before = [POOLED if op == "get_pool" else BIG, ("m", 1)]
        q.put_many(before)
        return Case(q, before, "get", taken=1)
    if op == "get_spill":  # ring LINK -> chain (sealed) -> ring again: one get_many reads it all
        q = ctx.Queue(ring_size=4096)
        ring = _fill_ring(q)
        chain = [("s", 0, LONG), ("s", 1, LONG)]
        q.put_many(chain)
        assert q.get_many(len(ring), timeout=5) == ring
        after = [("m", 0), ("m", 1)]
        q.put_many(after)
        return Case(q, chain + after, "get", taken=4)
    if op == "task_done":
        q = ctx.JoinableQueue()
        before = [("m", i) for i in range(3)]
        q.put_many(before)
        q.get(timeout=5)
        return Case(q, before[1:], "task_done", unfinished=3)
    if op == "join":
        q = ctx.JoinableQueue()
        q.put("m")
        q.get(timeout=5)
        q.task_done()
        return Case(q, [], "join", unfinished=0)
    if op == "repair":  # a producer died half-way through a put; this get repairs (and dies there)
        q = ctx.Queue()
        before = [("m", i) for i in range(3)]
        q.put_many(before)
        _run_child(ctx, q, "queue.put.published", 0, "put")
        return Case(q, before, "repair", taken=1)
    raise AssertionError(op)


def _run(q, op):
    """The operation, in the process that dies (or is interrupted) in it."""
    if op in ("put", "put_py", "put_pool", "put_big", "put_joinable", "put_spill", "put_spill_open",
              "put_spill_next", "put_seal"):
        q.put({"put": ("m", 100), "put_py": ["m", 100], "put_pool": POOLED, "put_big": BIG,
               "put_joinable": ("m", 100), "put_spill": ("s", LONG), "put_spill_open": ("m", 100),
               "put_spill_next": ("n", LONG), "put_seal": ("m", 100)}[op], timeout=5)
    elif op in ("put_many", "put_many_pool"):
        items = [("m", 100 + k) for k in range(4)]
        if op == "put_many_pool":
            items[1] = POOLED
        q.put_many(items, timeout=5)
    elif op in ("get", "get_pool", "get_big", "repair"):
        q.get(timeout=5)
    elif op == "get_many":
        q.get_many(4, timeout=5)
    elif op == "get_spill":
        q.get_many(100, timeout=5)
    elif op == "task_done":
        q.task_done()
    elif op == "join":
        q.join()
    else:
        raise AssertionError(op)


def _child(q, point, skip, op):
    _crash.arm(point, skip)
    _run(q, op)
    os._exit(3)  # the point was not reached


def _run_child(ctx, q, point, skip, op):
    p = ctx.Process(target=_child, args=(q, point, skip, op))
    p.start()
    p.join(30)
    if p.exitcode is None:
        p.kill()
        p.join(5)
    assert p.exitcode == -signal.SIGKILL, (
        f"{op} did not die at {point} (exit code {p.exitcode}; 3: the point was never reached)"
    )


#: point -> the operations that reach it
OPS = {
    "queue.put.locked": ["put", "put_py", "put_many", "put_pool", "put_joinable"],
    "queue.put.tx_begun": ["put", "put_py", "put_many", "put_big"],
    "queue.put.written": ["put", "put_py", "put_joinable"],
    "queue.put.published": ["put", "put_py", "put_joinable"],
    "queue.put.counted": ["put", "put_py", "put_joinable"],
    "queue.put.committed": ["put", "put_py", "put_many", "put_pool", "put_big", "put_joinable"],
    "queue.put_many.partial": ["put_many", "put_many_pool"],
    "queue.spill.created": ["put_spill", "put_spill_next"],
    "queue.spill.linked": ["put_spill", "put_spill_next"],
    "queue.spill.written": ["put_spill_open"],
    "queue.spill.published": ["put_spill_open"],
    "queue.spill.sealed": ["put_seal", "put_spill_next"],
    "queue.spill.unlinked": ["get_spill"],
    "queue.get.locked": ["get", "get_pool", "get_many"],
    "queue.get.tx_begun": ["get", "get_many", "get_big"],
    "queue.get.consumed": ["get", "get_pool"],
    "queue.get.counted": ["get", "get_many"],
    "queue.get.committed": ["get", "get_many", "get_pool"],
    "queue.get.unlocked": ["get", "get_pool", "get_spill"],
    "queue.get.link_followed": ["get_spill"],
    "queue.get.chain_left": ["get_spill"],
    "queue.get_many.partial": ["get_many", "get_spill"],
    "queue.pool.claimed": ["put_pool"],
    "queue.pool.written": ["put_pool"],
    "queue.pool.queued": ["put_pool", "put_many_pool"],
    "queue.pool.taken": ["get_pool"],
    "queue.pool.reading": ["get_pool"],
    "queue.pool.read": ["get_pool"],
    "queue.big.created": ["put_big"],
    "queue.big.attached": ["get_big"],
    "queue.big.unlinked": ["get_big"],
    "queue.task_done.locked": ["task_done"],
    "queue.task_done.lowered": ["task_done"],
    "queue.join.locked": ["join"],
    "queue.repair.begun": ["repair"],
    "queue.repair.rolled_back": ["repair"],
    "queue.repair.counted": ["repair"],
}
#: points whose hit comes after the operation took effect (committed, or a single store that is the step)
DONE_AT = {"queue.put.committed", "queue.get.committed", "queue.get.unlocked", "queue.spill.unlinked",
           "queue.pool.read", "queue.big.attached", "queue.big.unlinked", "queue.task_done.lowered",
           "queue.join.locked"}
#: hits to let pass first: die in the middle of a batch, not at its first record
SKIP = {"queue.put_many.partial": 1, "queue.get_many.partial": 1}
CASES = [(point, op) for point in sorted(OPS) for op in OPS[point]]


def test_every_point_has_an_operation():
    """Every crash point in the sources is in the matrix (and nothing else is)."""
    assert set(OPS) == set(crash_points("queue."))


# -- the checks ----------------------------------------------------------------------------------

def _norm(x):
    return tuple(_norm(v) for v in x) if isinstance(x, (list, tuple)) else x


def _drain(q, n_max=100_000):
    got = []  # no wait: qsize() has settled the dead holder's operation (a blocked get would be a bug)
    while len(got) < n_max:
        try:
            got += q.get_many(1000, block=False)
        except queues.Empty:
            return got
    raise AssertionError("the queue does not run dry")


def _check(case, point, dead: bool):
    """The invariants after the operation died (``dead``) or was interrupted at ``point``."""
    q = case.q
    done = point in DONE_AT
    n = q.qsize()  # first: it must settle the operation itself
    got = _drain(q)
    assert len(got) == n, f"qsize() said {n}, {len(got)} came"
    assert not q._h[queues._TX], "an operation is still marked in progress"
    before = [_norm(x) for x in case.before]
    got = [_norm(x) for x in got]
    if case.kind == "put":
        want = before + [_norm(x) for x in case.items] if done else before
        assert got == want, f"{'done' if done else 'rolled back'} put expected"
    elif case.kind in ("get", "repair"):
        taken = case.taken if done and case.kind == "get" else 0
        assert got == before[taken:], f"{'taken' if taken else 'nothing taken'} expected"
    else:
        assert got == before
    if case.unfinished is not None:
        unfinished = case.unfinished
        if case.kind == "put" and done:
            unfinished += len(case.items)
        if case.kind == "task_done" and done:
            unfinished -= 1
        assert q._h[queues._UNFINISHED] == unfinished
        for _ in range(unfinished):
            q.task_done()
        with pytest.raises(ValueError, match="too many times"):
            q.task_done()
        t = threading.Thread(target=q.join, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "join() does not return with every task done"
    for slot in range(queues._NPOOL):
        state = q._h[queues._POOL0 + slot]
        if state != queues._P_FREE:  # only a dead writer's or reader's, taken back when needed
            assert state & 0xFF in (queues._P_WRITING, queues._P_READING), (slot, state)
            assert dead and not gilfree.synchronize._pid_alive(state >> 8), (slot, state)
    q.put_many([("after", 1), POOLED])
    q.put(("after", 2))
    assert [_norm(x) for x in q.get_many(10, timeout=5)] == [("after", 1), POOLED, ("after", 2)]


def _collect(case):
    q = case.q
    case.q = None
    del q
    gc.collect()


# -- kill at every point ---------------------------------------------------------------------------

@pytest.mark.parametrize("point,op", CASES, ids=[f"{p[6:]}-{o}" for p, o in CASES])
def test_killed_at_point_fork(point, op):
    ctx = gilfree.get_context("fork")
    case = _setup(op, ctx)
    _run_child(ctx, case.q, point, SKIP.get(point, 0), op)
    _check(case, point, dead=True)
    _collect(case)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
@pytest.mark.parametrize("point,op", CASES, ids=[f"{p[6:]}-{o}" for p, o in CASES])
def test_killed_at_point_other_start_methods(point, op, method):
    ctx = gilfree.get_context(method)
    case = _setup(op, ctx)
    _run_child(ctx, case.q, point, SKIP.get(point, 0), op)
    _check(case, point, dead=True)
    _collect(case)


# -- Ctrl-C at every Python-level point --------------------------------------------------------------

def _python_points() -> set[str]:
    pattern = re.compile(r'_crash\.hit\(\s*"(queue\.[a-z0-9_.]+)"\s*\)')
    py = set(pattern.findall(Path(SRC, "gilfree", "queues.py").read_text()))
    if PURE:
        return py
    c = set(re.findall(r'GF_CRASH_POINT\(\s*"(queue\.[a-z0-9_.]+)"\s*\)', Path(SRC, "gilfree", "_cqueue.c").read_text()))
    return py - c  # the points C also has are interrupted in the pure-Python run


INTERRUPT_CASES = [(p, o) for p, o in CASES if p in _python_points()]


def test_interrupt_cases_cover_the_python_points():
    assert {p for p, _ in INTERRUPT_CASES} == _python_points()


@pytest.mark.parametrize("point,op", INTERRUPT_CASES, ids=[f"{p[6:]}-{o}" for p, o in INTERRUPT_CASES])
def test_interrupted_at_point(point, op):
    ctx = gilfree.get_context("fork")
    case = _setup(op, ctx)
    _crash.arm(point, SKIP.get(point, 0), "interrupt")
    try:
        with pytest.raises(KeyboardInterrupt, match=re.escape(point)):
            _run(case.q, op)
    finally:
        _crash.disarm()
    q = case.q
    assert not q._lock._is_mine(), "the lock stays held by the interrupted thread"
    got = []
    t = threading.Thread(target=lambda: got.append(q.qsize()))  # another thread can take the lock
    t.start()
    t.join(10)
    assert got, "another thread cannot take the queue lock"
    _check(case, point, dead=False)
    _collect(case)


# -- the same in pure Python -------------------------------------------------------------------------

@pytest.mark.skipif(PURE, reason="this run is the pure-Python one")
@pytest.mark.timeout(300)
def test_pure_python_path():
    """This file's fork and interrupt cases with GILFREE_PURE_QUEUE=1: every point is a Python one."""
    env = dict(os.environ, GILFREE_PURE_QUEUE="1")
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "fork and not other_start_methods or interrupt or every_point"],
        capture_output=True, text=True, env=env, timeout=280,
    )
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


def test_design_notes_table_every_point():
    """docs/design.md's state table of the queue protocols has one row per crash point, and only those."""
    doc = (Path(SRC).parent / "docs" / "design.md").read_text()
    section = doc[doc.index("## Queue protocol: states and crash points") :]
    section = section[: section.index("\n## ")]
    rows = re.findall(r"^\|[^\n]*\(`(queue\.[a-z0-9_.]+)`\)[^\n]*\|$", section, re.M)
    assert sorted(rows) == sorted(set(rows)), "a point has two rows"
    assert set(rows) == set(crash_points("queue."))
