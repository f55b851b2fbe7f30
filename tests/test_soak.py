"""Randomised kill soak: a second net beside the exact crash-point tests (marker ``soak``).

Children loop over a lock-protected critical section or over queue puts and gets; the parent
SIGKILLs one of them at a random moment, starts a replacement, and checks after every kill that
the survivors make progress within a bounded time; at the end it checks the invariants:

- locks (Lock, RLock, Semaphore(1) and Semaphore(2), takeover mode): a live holder never has
  company beyond the semaphore's value (an owner word, or per worker a sequence number read twice for Semaphore(2),
  checked on the way in and out); every acquire with a
  timeout succeeds (or raises ``OwnerDiedError``, counted) -- one that times out is a hang; the
  shared counter, bumped inside, agrees with the workers' own counts up to one per kill (value 1);
  after the last kill the parent acquires the full value within a second;
- queues (Queue and JoinableQueue, small, pooled and big messages, put/put_many/get/get_many): no
  message delivered twice, none torn (a CRC), none lost beyond the batch in the hands of each
  killed process; a JoinableQueue's unfinished count is off by at most the messages in killed
  consumers' hands, and ``join()`` returns once they are accounted for;
- nothing of the run stays in ``/dev/shm`` (the leak check of ``conftest``).

Not run by default (``-m "not soak"`` in pyproject's addopts); ``bash scripts/test -m soak`` runs it,
for ``GILFREE_SOAK_SECONDS`` seconds in all (default 60), shared among the cases.
"""

from __future__ import annotations

import os
import queue
import random
import threading
import time
import zlib

import pytest

import gilfree
from gilfree import OwnerDiedError

pytestmark = [pytest.mark.soak, pytest.mark.timeout(0)]  # bounded by the soak's own deadlines

TOTAL_SECONDS = float(os.environ.get("GILFREE_SOAK_SECONDS", "60"))
LOCK_CASES = ["Lock", "RLock", "Semaphore1", "Semaphore2"]
QUEUE_CASES = ["Queue", "JoinableQueue"]
PER_CASE = TOTAL_SECONDS / (len(LOCK_CASES) + len(QUEUE_CASES))
PROGRESS_WAIT = 5.0  # after a kill, the survivors must have moved on within this long

ctx = gilfree.get_context("fork")


def _kill(p) -> None:
    if p.exitcode is None:
        p.kill()
    p.join(10)
    assert p.exitcode is not None, f"pid {p.pid} did not die"


# -- locks ----------------------------------------------------------------------------------------

N_LOCK_WORKERS = 4
# layout of the shared array: counter, number of slots, owner pid (value 1), the slots of the current
# workers, then per worker slot: a sequence number bumped on the way in and out (odd: inside; value
# 2), own count, timeouts, owner-died errors, pid, exclusion violations seen
_COUNTER, _NSLOTS, _OWNER, _CURRENT, _SLOT0, _SLOT_WORDS = 0, 1, 2, 3, 8, 8
_SEQ, _OWN, _TIMEOUTS, _DIED, _PID, _VIOLATIONS = range(6)
MAX_SLOTS = 2000


def _make_lock(kind: str):
    if kind == "Lock":
        return ctx.Lock(on_owner_death="takeover"), 1
    if kind == "RLock":
        return ctx.RLock(on_owner_death="takeover"), 1
    value = 1 if kind == "Semaphore1" else 2
    return ctx.Semaphore(value, on_owner_death="takeover"), value


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] not in (b"Z", b"X")


def _others_inside(arr, slot: int) -> int:
    """How many other live workers were inside at one instant (while this one is inside).

    Reading flags one after the other is not a snapshot: a worker read inside may leave and another
    enter (on the unit just freed) before its flag is read, and both would be counted.  So each
    worker's sequence number (odd: inside) is read in two passes; one whose number is odd and the
    same in both was inside all the time between its two reads, and every such interval contains
    the instant between the passes.  Liveness only goes from alive to dead, so checking it
    afterwards can only under-count.
    """
    others = sorted({s for s in (arr[_CURRENT + i] for i in range(N_LOCK_WORKERS)) if s >= 0 and s != slot})
    first = [arr[_SLOT0 + s * _SLOT_WORDS + _SEQ] for s in others]
    second = [arr[_SLOT0 + s * _SLOT_WORDS + _SEQ] for s in others]
    return sum(1 for s, a, b in zip(others, first, second)
               if a == b and a & 1 and _alive(arr[_SLOT0 + s * _SLOT_WORDS + _PID]))


def _lock_worker(lock, arr, slot: int, value: int, reentrant: bool) -> None:
    """Acquire/release in a tight loop (kills land in the lock's own steps as often as inside)."""
    base = _SLOT0 + slot * _SLOT_WORDS
    me = os.getpid()
    nap = random.Random(me)
    arr[base + _PID] = me
    while True:
        try:
            got = lock.acquire(timeout=2.0)
        except OwnerDiedError:
            arr[base + _DIED] += 1
            continue
        if not got:
            arr[base + _TIMEOUTS] += 1
            continue
        if reentrant:
            lock.acquire()
        if value == 1:
            # the owner word: whoever is inside wrote its pid; a dead one's stays until overwritten
            prev = arr[_OWNER]
            if prev and prev != me and _alive(prev):
                arr[base + _VIOLATIONS] += 1
            arr[_OWNER] = me
        else:  # say so, then look who else is inside (a dead worker's number stays odd: only the living count)
            arr[base + _SEQ] += 1
            if _others_inside(arr, slot) >= value:
                arr[base + _VIOLATIONS] += 1
        arr[_COUNTER] += 1
        arr[base + _OWN] += 1
        if nap.random() < 0.02:  # now and then stay inside a while: company, if any, has time to come
            time.sleep(0.0002)
            if value > 1 and _others_inside(arr, slot) >= value:
                arr[base + _VIOLATIONS] += 1
        if value == 1:
            if arr[_OWNER] != me:  # someone came in while we were inside
                arr[base + _VIOLATIONS] += 1
            arr[_OWNER] = 0
        else:
            arr[base + _SEQ] += 1
        if reentrant:
            lock.release()
        lock.release()


@pytest.mark.parametrize("kind", LOCK_CASES)
def test_lock_kill_soak(kind):
    lock, value = _make_lock(kind)
    arr = ctx.RawArray("q", _SLOT0 + MAX_SLOTS * _SLOT_WORDS)
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    slots = 0
    workers: dict[int, object] = {}
    for i in range(N_LOCK_WORKERS):
        arr[_CURRENT + i] = -1  # not started yet (0 would name slot 0)

    def start(i: int) -> None:
        nonlocal slots
        p = ctx.Process(target=_lock_worker, args=(lock, arr, slots, value, kind == "RLock"), daemon=True)
        arr[_CURRENT + i] = slots
        slots += 1
        arr[_NSLOTS] = slots
        p.start()
        workers[i] = p

    kills = 0
    stalls = []
    crashed = []  # exit codes of workers that ended by themselves (an exception: see their stderr)
    try:
        for i in range(N_LOCK_WORKERS):
            start(i)
        deadline = time.monotonic() + PER_CASE
        while time.monotonic() < deadline and slots < MAX_SLOTS:
            time.sleep(rng.uniform(0.001, 0.03))
            for i, p in list(workers.items()):
                if p.exitcode is not None:
                    crashed.append(p.exitcode)
                    start(i)
            victim = rng.randrange(N_LOCK_WORKERS)
            _kill(workers[victim])
            kills += 1
            start(victim)
            before = arr[_COUNTER]
            t0 = time.monotonic()
            while arr[_COUNTER] == before and time.monotonic() - t0 < PROGRESS_WAIT:
                time.sleep(0.001)
            if arr[_COUNTER] == before:
                stalls.append(kills)
    finally:
        for p in workers.values():
            _kill(p)
    own = sum(arr[_SLOT0 + s * _SLOT_WORDS + _OWN] for s in range(slots))
    timeouts = sum(arr[_SLOT0 + s * _SLOT_WORDS + _TIMEOUTS] for s in range(slots))
    died = sum(arr[_SLOT0 + s * _SLOT_WORDS + _DIED] for s in range(slots))
    violations = sum(arr[_SLOT0 + s * _SLOT_WORDS + _VIOLATIONS] for s in range(slots))
    # after the last kill: the full value can be taken within a second (dead holders taken over)
    taken = 0
    final_error = None
    try:
        for _ in range(value):
            if lock.acquire(timeout=1.0):
                taken += 1
    except OwnerDiedError as exc:
        final_error = exc
    for _ in range(taken):
        lock.release()
    summary = (f"{kind}: {kills} kills, {arr[_COUNTER]} critical sections, own counts {own}, "
               f"{timeouts} acquire timeouts (2 s), {died} OwnerDiedError, {violations} exclusion "
               f"violations, stalls after kills {stalls[:10]}, workers that crashed {crashed[:10]}, "
               f"final acquire {taken}/{value} {final_error!r}")
    print(summary)
    assert kills > 0 and arr[_COUNTER] > 0, summary
    assert violations == 0, summary
    assert not stalls, summary
    assert not crashed, summary
    assert timeouts == 0, summary
    assert died == 0, summary  # takeover mode: a dead holder is taken over, never reported
    if value == 1:  # two holders of a Semaphore(2) bump the shared counter without exclusion
        assert 0 <= arr[_COUNTER] - own <= kills, summary
    assert taken == value and final_error is None, summary


# -- queues ---------------------------------------------------------------------------------------

N_PRODUCERS, N_CONSUMERS = 3, 3
MAX_INCARNATIONS, MAX_SEQ = 400, 4000
BATCH = 4  # put_many / get_many take at most this many: the most a kill can cost
# sizes: ring (64 KiB ring: up to 8 KiB), pool (up to 2 MiB), own segment (above 2 MiB)
SIZES = (8, 100, 3000, 20_000, 200_000, 2_500_000)
WEIGHTS = (30, 30, 15, 10, 5, 1)


def _body(rng: random.Random) -> bytes:
    size = rng.choices(SIZES, WEIGHTS)[0]
    return rng.randbytes(size) if size < 100_000 else bytes([rng.randrange(256)]) * size


def _producer(q, done, inc: int, stop) -> None:
    rng = random.Random(inc)
    seq = 0
    while seq < MAX_SEQ - BATCH and not stop.value:
        n = rng.randint(1, BATCH) if rng.random() < 0.4 else 1
        msgs = []
        for k in range(n):
            body = _body(rng)
            msgs.append((inc, seq + k, zlib.crc32(body), body))
        if n == 1 and rng.random() < 0.7:
            q.put(msgs[0], timeout=10)
        else:
            q.put_many(msgs, timeout=10)
        seq += n
        done[inc] = seq  # everything below this was put


def _consumer(q, seen, bad, joinable: bool) -> None:
    rng = random.Random()
    while True:
        try:
            if rng.random() < 0.5:
                ms = q.get_many(rng.randint(1, BATCH), timeout=0.5)
            else:
                ms = [q.get(timeout=0.5)]
        except queue.Empty:
            continue
        for k, m in enumerate(ms):
            if m is None:
                if joinable:
                    q.task_done()
                for _ in ms[k + 1 :]:  # only more sentinels follow: they are the others'
                    q.put(None)
                    if joinable:
                        q.task_done()
                return
            inc, seq, crc, body = m
            if not (0 <= inc < MAX_INCARNATIONS and 0 <= seq < MAX_SEQ) or zlib.crc32(body) != crc:
                bad.value += 1
            else:
                seen[inc * MAX_SEQ + seq] += 1
            if joinable:
                q.task_done()


@pytest.mark.parametrize("kind", QUEUE_CASES)
def test_queue_kill_soak(kind):
    joinable = kind == "JoinableQueue"
    q = (ctx.JoinableQueue if joinable else ctx.Queue)(ring_size=1 << 16)
    seen = ctx.RawArray("b", MAX_INCARNATIONS * MAX_SEQ)
    done = ctx.RawArray("q", MAX_INCARNATIONS)
    bad = ctx.RawValue("q", 0)
    stop = ctx.RawValue("b", 0)  # not an Event: its lock is not what this soak is about
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    incarnations = 0
    producers: dict[int, object] = {}
    consumers: dict[int, object] = {}
    kills = {"producer": 0, "consumer": 0}
    stalls = []
    crashed = []  # (role, exit code) of children that ended by themselves with an error

    def start_producer(i: int) -> None:
        nonlocal incarnations
        p = ctx.Process(target=_producer, args=(q, done, incarnations, stop), daemon=True)
        incarnations += 1
        p.start()
        producers[i] = p

    def start_consumer(i: int) -> None:
        p = ctx.Process(target=_consumer, args=(q, seen, bad, joinable), daemon=True)
        p.start()
        consumers[i] = p

    def progress() -> int:
        return sum(done[i] for i in range(incarnations))

    try:
        for i in range(N_PRODUCERS):
            start_producer(i)
        for i in range(N_CONSUMERS):
            start_consumer(i)
        deadline = time.monotonic() + PER_CASE
        while time.monotonic() < deadline and incarnations < MAX_INCARNATIONS:
            time.sleep(rng.uniform(0.005, 0.1))
            role = rng.choice(("producer", "consumer"))
            table, restart = (producers, start_producer) if role == "producer" else (consumers, start_consumer)
            i = rng.randrange(len(table))
            if table[i].exitcode is not None and table[i].exitcode != 0:
                crashed.append((role, table[i].exitcode))
            _kill(table[i])
            kills[role] += 1
            restart(i)
            for j, p in list(producers.items()):  # a producer that reached its end: a new one
                if p.exitcode is not None:
                    p.join(10)
                    if p.exitcode != 0:
                        crashed.append(("producer", p.exitcode))
                    start_producer(j)
            for j, p in list(consumers.items()):  # consumers end only on a None, or an error
                if p.exitcode is not None:
                    crashed.append(("consumer", p.exitcode))
                    start_consumer(j)
            before = progress()
            t0 = time.monotonic()
            while progress() == before and time.monotonic() - t0 < PROGRESS_WAIT:
                time.sleep(0.002)
            if progress() == before:
                stalls.append((role, kills[role]))
        stop.value = 1
        for p in producers.values():
            p.join(30)
        failed_producers = [p.exitcode for p in producers.values() if p.exitcode != 0]
        for _ in consumers:
            q.put(None, timeout=10)
        for p in consumers.values():
            p.join(30)
        failed_consumers = [p.exitcode for p in consumers.values() if p.exitcode != 0]
    finally:
        stop.value = 1
        for p in [*producers.values(), *consumers.values()]:
            _kill(p)
    duplicates = lost = extra = 0
    for inc in range(incarnations):
        row = seen[inc * MAX_SEQ : (inc + 1) * MAX_SEQ]
        confirmed = done[inc]
        duplicates += sum(1 for c in row if c > 1)
        lost += sum(1 for c in row[:confirmed] if c == 0)
        extra += sum(1 for c in row[confirmed + BATCH :] if c)  # never even attempted
    left = q.qsize()
    unfinished = None
    join_ok = True
    if joinable:
        from gilfree import queues

        unfinished = q._h[queues._UNFINISHED]
    summary = (f"{kind}: kills {kills}, {incarnations} producers, {progress()} messages put, "
               f"{duplicates} duplicated, {bad.value} torn, {lost} lost (allowed {BATCH * kills['consumer']}), "
               f"{extra} never sent, {left} left, unfinished {unfinished}, stalls {stalls[:10]}, "
               f"children that crashed {crashed[:10]}, "
               f"exit codes of the last producers {failed_producers} consumers {failed_consumers}")
    if joinable and unfinished is not None and 0 <= unfinished <= BATCH * kills["consumer"] + left:
        for _ in range(left):
            q.get(timeout=5)
            q.task_done()
        for _ in range(unfinished - left):
            q.task_done()
        waiter = threading.Thread(target=q.join, daemon=True)
        waiter.start()
        waiter.join(5)
        join_ok = not waiter.is_alive()
    print(summary)
    assert sum(kills.values()) > 0 and progress() > 0, summary
    assert duplicates == 0 and bad.value == 0 and extra == 0, summary
    assert lost <= BATCH * kills["consumer"], summary
    assert not stalls, summary
    assert failed_producers == [] and failed_consumers == [] and not crashed, summary
    if joinable:
        assert unfinished is not None and 0 <= unfinished - left <= BATCH * kills["consumer"], summary
        assert join_ok, summary + "; join() did not return"
    else:
        assert left == 0, summary
