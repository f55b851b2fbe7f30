"""Every step of the lock, semaphore and condition protocols is a crash point: kill a process there.

Each crash point named in ``_csync.c`` (``lock.*``, ``sem.*``, ``cond.*``) has a scenario below: a
child arms the point (:func:`gilfree._crash.arm`), runs the operation that reaches it and SIGKILLs
itself exactly there (a child that ends any other way fails the test, so a point that is never
reached cannot pass silently); the parent then checks the promises with bounded waits: nobody
hangs, a dead holder is reported (``OwnerDiedError``) or taken over within a few slices, a live
holder never is, no unit of a semaphore is lost or invented, a Condition's notify is never spent on
a dead sleeper and never blocks.  The "stop" scenarios freeze a live process between two steps and
check that nobody mistakes it for a dead one.  Every scenario runs under fork, spawn and forkserver.
docs/design.md ("Lock protocols: states and crash points") has the state table these follow.
"""

from __future__ import annotations

import multiprocessing as std_mp
import os
import random
import signal
import threading
import time
import warnings

import pytest
from _helpers import crash_points

import gilfree
from gilfree import OwnerDiedError, OwnerDiedWarning, _crash

#: seconds any single wait in these tests may take before it counts as a hang
BOUND = 3.0
KILLED = -signal.SIGKILL


# -- children (module level: picklable by reference under spawn and forkserver) -------------------

def die_acquiring(point, lock, skip=0):
    _crash.arm(point, skip)
    lock.acquire()
    os._exit(3)  # not reached when the point fires


def die_releasing(point, lock):
    lock.acquire()
    _crash.arm(point)
    lock.release()
    os._exit(3)


def die_waiting_for(point, lock, ready):
    _crash.arm(point)
    ready.set()
    lock.acquire(timeout=BOUND)
    os._exit(3)


def acquire_and_exit(lock):
    lock.acquire()
    os._exit(0)


def die_trying(point, sem):
    _crash.arm(point)
    sem.acquire(False)
    os._exit(3)


def stop_acquiring(point, lock):
    _crash.arm(point, action="stop")
    lock.acquire()
    lock.release()
    os._exit(0)


def die_in_cond_wait(point, cond, timeout):
    _crash.arm(point)
    with cond:
        cond.wait(timeout)
    os._exit(3)


def hold_then_die_releasing(sem, ready, go):
    sem.acquire()
    ready.set()
    go.wait(BOUND * 3)
    _crash.arm("sem.release.given")
    sem.release()
    os._exit(3)


def die_setting_event(point, event):
    _crash.arm(point)
    event.set()
    os._exit(3)


def die_notifying(point, cond):
    _crash.arm(point)
    with cond:
        cond.notify()
    os._exit(3)


def stop_checking_then_acquire(point, lock, result):
    # waits for a lock held by someone else; stops inside its dead-holder check (after reading)
    _crash.arm(point, action="stop")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OwnerDiedWarning)
        try:
            ok = lock.acquire(timeout=BOUND * 2)
        except OwnerDiedError as e:
            result.value = -e.pid
            os._exit(0)
    result.value = 1 if ok and not lock.recovered_from else 2
    if ok:
        lock.release()
    os._exit(0)


def release_and_exit(lock, go):
    go.wait(BOUND * 3)
    lock.release()
    os._exit(0)


def hold_in_a_thread_then_leave_main(lock, flag):
    import ctypes

    def hold():
        with lock:
            flag.value = 1
            time.sleep(2)
            flag.value = 2
        os._exit(0)  # the process ends with this thread, whatever other threads it has

    threading.Thread(target=hold).start()
    while flag.value != 1:
        time.sleep(0.01)
    ctypes.CDLL(None).pthread_exit(None)  # the main thread leaves; `hold` goes on


def event_waiter(event, out):
    try:
        out.put(("returned", event.wait()))
    except OwnerDiedError as e:
        out.put(("died", e.pid))


# -- helpers -----------------------------------------------------------------------------------

def run_victim(ctx, target, *args, expect=KILLED):
    p = ctx.Process(target=target, args=args)
    p.start()
    p.join(BOUND * 3)
    if p.exitcode is None:
        p.kill()
        p.join(BOUND)
        pytest.fail(f"{target.__name__}{args[:1]} did not reach its crash point (still running)")
    assert p.exitcode == expect, f"{target.__name__}{args[:1]} ended with {p.exitcode}, not at its crash point"
    return p.pid


def start_stopped(ctx, target, *args):
    """Start a child that stops itself (SIGSTOP) at a crash point; return it once it is stopped."""
    p = ctx.Process(target=target, args=args)
    p.start()
    deadline = time.monotonic() + BOUND * 3
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{p.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            state = "?"
        if state == "T":
            return p
        if p.exitcode is not None:
            break
        time.sleep(0.01)
    p.kill()
    p.join(BOUND)
    pytest.fail(f"{target.__name__}{args[:1]} did not stop at its crash point")


def resume_and_join(p):
    os.kill(p.pid, signal.SIGCONT)
    p.join(BOUND * 3)
    assert p.exitcode == 0, f"the stopped child ended with {p.exitcode}"


def expect_owner_died(lock, pid):
    t0 = time.monotonic()
    with pytest.raises(OwnerDiedError) as info:
        lock.acquire(timeout=BOUND)
    assert info.value.pid == pid
    assert time.monotonic() - t0 < 1.0, "a dead holder must be found within a few 0.1 s slices"


def expect_takeover(lock, pid):
    t0 = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OwnerDiedWarning)
        assert lock.acquire(timeout=BOUND)
    assert time.monotonic() - t0 < 1.0
    assert lock.recovered_from == pid
    lock.release()


def expect_free(lock):
    """Free, reported by nobody as held by the dead: acquire at once, release, then again."""
    assert lock.acquire(timeout=BOUND), "the lock should be free"
    lock.release()
    assert lock.acquire(False)
    lock.release()


LOCKS = {
    "Lock": lambda ctx, **kw: ctx.Lock(**kw),
    "RLock": lambda ctx, **kw: ctx.RLock(**kw),
    "BoundedSemaphore1": lambda ctx, **kw: ctx.BoundedSemaphore(1, **kw),
}


# -- Lock and RLock: the owner in the word ------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(LOCKS))
@pytest.mark.parametrize("point", ["lock.acquire.taken", "lock.release.before"])
def test_death_holding_the_lock_is_reported(ctx, kind, point):
    lock = LOCKS[kind](ctx)
    target = die_acquiring if point == "lock.acquire.taken" else die_releasing
    pid = run_victim(ctx, target, point, lock)
    expect_owner_died(lock, pid)
    expect_owner_died(lock, pid)  # the lock stays the dead holder's: every waiter is told


@pytest.mark.parametrize("kind", sorted(LOCKS))
@pytest.mark.parametrize("point", ["lock.acquire.taken", "lock.release.before"])
def test_death_holding_the_lock_is_taken_over(ctx, kind, point):
    lock = LOCKS[kind](ctx, on_owner_death="takeover")
    target = die_acquiring if point == "lock.acquire.taken" else die_releasing
    pid = run_victim(ctx, target, point, lock)
    expect_takeover(lock, pid)
    expect_free(lock)


@pytest.mark.parametrize("kind", sorted(LOCKS))
def test_death_right_after_release_leaves_it_free_and_no_stale_holder(ctx, kind):
    # issue 11 item 2: a dead pid left on record while the lock is free made a waiter "take over"
    # the next live holder
    lock = LOCKS[kind](ctx, on_owner_death="takeover")
    run_victim(ctx, die_releasing, "lock.release.freed", lock)
    expect_free(lock)
    holder = start_stopped(ctx, stop_acquiring, "lock.acquire.taken", lock)  # live, holding it
    try:
        t0 = time.monotonic()
        assert not lock.acquire(timeout=0.5), "a live holder was taken over"
        assert time.monotonic() - t0 >= 0.45
        assert lock.recovered_from is None
    finally:
        resume_and_join(holder)
    expect_free(lock)


@pytest.mark.parametrize("kind", sorted(LOCKS))
def test_dead_sleeper_costs_one_wakeup_at_most(ctx, kind):
    # issue 11 item 12: a waiter killed in its sleep left the waiter count raised for good, so every
    # later release made a futex system call
    lock = LOCKS[kind](ctx)
    lock.acquire()
    ready = ctx.Event()
    run_victim(ctx, die_waiting_for, "lock.wait.flagged", lock, ready)
    assert lock._sleeping()  # the dead waiter announced itself
    lock.release()
    assert not lock._sleeping(), "the release should clear the waiters flag"
    expect_free(lock)
    assert not lock._sleeping()


@pytest.mark.parametrize("kind", sorted(LOCKS))
def test_death_right_after_taking_over(ctx, kind):
    lock = LOCKS[kind](ctx, on_owner_death="takeover")
    first = ctx.Process(target=acquire_and_exit, args=(lock,))
    first.start()
    first.join(BOUND)
    assert first.exitcode == 0
    ready = ctx.Event()
    pid = run_victim(ctx, die_waiting_for, "lock.takeover.swapped", lock, ready)
    expect_takeover(lock, pid)  # the second dead holder is the one on record


@pytest.mark.parametrize("kind", sorted(LOCKS))
def test_live_holder_stopped_after_taking_is_never_taken_over(ctx, kind):
    lock = LOCKS[kind](ctx, on_owner_death="takeover")
    holder = start_stopped(ctx, stop_acquiring, "lock.acquire.taken", lock)
    try:
        assert not lock.acquire(timeout=0.5)
    finally:
        resume_and_join(holder)
    expect_free(lock)


# -- counting semaphores: the journal ------------------------------------------------------------

SEMS = {
    "Semaphore": lambda ctx, **kw: ctx.Semaphore(2, **kw),
    "BoundedSemaphore": lambda ctx, **kw: ctx.BoundedSemaphore(2, **kw),
}


def drain(sem):
    """Take every free unit without waiting; return how many."""
    n = 0
    while sem.acquire(False):
        n += 1
    return n


@pytest.mark.parametrize("kind", sorted(SEMS))
def test_semaphore_death_after_claiming_a_slot_loses_nothing(ctx, kind):
    sem = SEMS[kind](ctx)
    run_victim(ctx, die_acquiring, "sem.acquire.claimed", sem)
    assert sem.get_value() == 2
    assert drain(sem) == 2
    assert not sem.acquire(timeout=0.5)  # no false OwnerDiedError from the unpaid claim
    sem.release()
    sem.release()
    assert sem.get_value() == 2 and sem._tracking()


@pytest.mark.parametrize("kind", sorted(SEMS))
@pytest.mark.parametrize("point", ["sem.acquire.taken", "sem.acquire.recorded"])
def test_semaphore_death_while_taking_is_reported(ctx, kind, point):
    # issue 11 item 1: the count was lowered and the holder recorded in two steps; a death between
    # them lost the unit for good with nobody on record
    sem = SEMS[kind](ctx)
    pid = run_victim(ctx, die_acquiring, point, sem)
    assert drain(sem) == 1
    expect_owner_died(sem, pid)
    sem.release()
    assert sem.get_value() == 1


@pytest.mark.parametrize("kind", sorted(SEMS))
@pytest.mark.parametrize("point", ["sem.acquire.taken", "sem.acquire.recorded"])
def test_semaphore_death_while_taking_is_taken_over(ctx, kind, point):
    sem = SEMS[kind](ctx, on_owner_death="takeover")
    pid = run_victim(ctx, die_acquiring, point, sem)
    assert drain(sem) == 1
    expect_takeover(sem, pid)  # takes the dead holder's unit, then gives it back
    assert sem.get_value() == 1
    sem.release()
    assert sem.get_value() == 2


@pytest.mark.parametrize("kind", sorted(SEMS))
@pytest.mark.parametrize("point", ["sem.release.given", "sem.release.forgotten"])
def test_semaphore_death_while_releasing_keeps_the_unit_and_no_stale_holder(ctx, kind, point):
    sem = SEMS[kind](ctx, on_owner_death="takeover")
    run_victim(ctx, die_releasing, point, sem)
    assert drain(sem) == 2
    t0 = time.monotonic()
    assert not sem.acquire(timeout=0.5), "a unit was invented, or a live holder taken over"
    assert time.monotonic() - t0 >= 0.45
    sem.release()
    sem.release()
    assert sem.get_value() == 2


@pytest.mark.parametrize("kind", sorted(SEMS))
def test_semaphore_death_while_repairing_another_death(ctx, kind):
    sem = SEMS[kind](ctx)
    first = run_victim(ctx, die_acquiring, "sem.acquire.taken", sem)
    run_victim(ctx, die_trying, "sem.repair.fixed", sem)  # dies while finishing the first one's step
    assert drain(sem) == 1  # the repair is redone; one unit is free, the other the first victim's
    expect_owner_died(sem, first)
    sem.release()
    assert sem.get_value() == 1


@pytest.mark.parametrize("point", ["sem.acquire.taken", "sem.release.given"])
def test_semaphore_live_process_stopped_between_two_steps(ctx, point):
    # a live process frozen with the journal set: others must neither take it for dead nor spin
    # forever holding the GIL (found by the breaker: acquire(timeout) ignored its timeout)
    sem = ctx.Semaphore(2)
    stopped = start_stopped(ctx, stop_acquiring, point, sem)
    try:
        t0 = time.monotonic()
        assert not sem.acquire(False)
        assert not sem.acquire(timeout=0.3)
        assert time.monotonic() - t0 < 1.5, "the waits ignored their timeouts"
        released = []
        t = threading.Thread(target=lambda: released.append(sem.release()), daemon=True)
        t.start()  # waits (without the GIL) until the frozen step is finished
        t.join(0.3)
        assert t.is_alive() and not released
    finally:
        resume_and_join(stopped)
    t.join(BOUND)
    assert released == [None]
    assert sem.get_value() == 3  # 2, plus the release above (a Semaphore has no maximum)
    assert drain(sem) == 3


# -- Condition ---------------------------------------------------------------------------------

def sleeper_thread(cond, results, timeout=BOUND * 2):
    def run():
        try:
            with cond:
                results.append(cond.wait(timeout))
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            results.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def until(predicate, timeout=BOUND):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


@pytest.mark.parametrize("point", ["cond.wait.registered", "cond.wait.unlocked"])
def test_condition_sleeper_dies_then_notify_reaches_a_live_one(ctx, point):
    cond = ctx.Condition(ctx.Lock(on_owner_death="takeover"))
    run_victim(ctx, die_in_cond_wait, point, cond, BOUND)  # older than the live sleeper below
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OwnerDiedWarning)  # registered: it died holding the lock
        t = sleeper_thread(cond, results)
        until(lambda: any(pid == os.getpid() for pid, _ in cond._cv._sleepers()))
        t0 = time.monotonic()
        with cond:
            cond.notify()
        t.join(BOUND)
    assert results == [True], "notify was spent on the dead sleeper"
    assert time.monotonic() - t0 < 1.0
    assert cond._cv._sleepers() == []


@pytest.mark.parametrize("point", ["cond.wait.woken", "cond.wait.freed"])
def test_condition_sleeper_dies_after_waking_then_all_goes_on(ctx, point):
    # issue 11 item 4: a sleeper killed between being woken and reporting made notify() block forever
    cond = ctx.Condition(ctx.Lock())
    run_victim(ctx, die_in_cond_wait, point, cond, 0.05)  # times out, then dies
    t0 = time.monotonic()
    with cond:
        cond.notify_all()  # must not wait for anyone
    assert time.monotonic() - t0 < 0.5
    results = []
    t = sleeper_thread(cond, results)
    until(lambda: cond._cv._waiting() == 1)
    with cond:
        cond.notify()
    t.join(BOUND)
    assert results == [True]


def test_condition_notifier_dies_after_marking_a_sleeper(ctx):
    # issue 11 item 9: `with cond: cond.wait()` after the notifier died holding the lock raised
    # AssertionError from __exit__, masking the OwnerDiedError
    cond = ctx.Condition(ctx.Lock())
    results = []
    t = sleeper_thread(cond, results)
    until(lambda: cond._cv._waiting() == 1)
    pid = run_victim(ctx, die_notifying, "cond.notify.marked", cond)
    t.join(BOUND)
    assert not t.is_alive(), "the notified sleeper hangs"
    assert len(results) == 1 and isinstance(results[0], OwnerDiedError), results
    assert results[0].pid == pid


# -- found by the breaker (each failed on the first version of the new protocol) ------------------

def test_holder_that_released_and_exited_during_the_check_is_not_reported(ctx):
    # the waiter read owner P, P released and exited normally, the waiter found P dead: it reported
    # OwnerDiedError(P) (or took over) although nobody died holding the lock
    lock = ctx.Lock(on_owner_death="takeover")
    go = ctx.Event()
    owner = ctx.Process(target=release_and_exit, args=(lock, go))
    lock.acquire()
    owner.start()  # fork: inherits nothing of ours but the lock; it releases the lock we hold
    result = ctx.RawValue("i", 0)
    waiter = start_stopped(ctx, stop_checking_then_acquire, "lock.check.read", lock, result)
    go.set()
    owner.join(BOUND)
    assert owner.exitcode == 0
    resume_and_join(waiter)
    assert result.value == 1, f"waiter ended with {result.value} (negative: OwnerDiedError(pid), 2: took over)"


def test_semaphore_release_by_a_dying_holder_during_a_scan_invents_no_unit(ctx):
    # a waiter scanning the holder table found the slot of a process that had just released (count
    # raised, journal set) and died before erasing its slot: it took over a unit that was free
    sem = ctx.BoundedSemaphore(2, on_owner_death="takeover")
    dying = ctx.Event()
    sem.acquire()  # the parent holds one unit; the victim will hold the other
    holder_ready = ctx.Event()
    victim = ctx.Process(target=hold_then_die_releasing, args=(sem, holder_ready, dying))
    victim.start()
    assert holder_ready.wait(BOUND)
    result = ctx.RawValue("i", 0)
    waiter = start_stopped(ctx, stop_checking_then_acquire, "sem.check.scan", sem, result)
    dying.set()
    victim.join(BOUND)
    assert victim.exitcode == KILLED
    resume_and_join(waiter)
    assert result.value == 1, f"waiter ended with {result.value} (2: took over a unit that was free)"
    sem.release()
    assert sem.get_value() == 2
    with pytest.raises(ValueError):
        sem.release()


def test_event_setter_killed_while_notifying_wakes_every_waiter(ctx):
    event = ctx.Event()
    out = ctx.Queue()
    waiters = [ctx.Process(target=event_waiter, args=(event, out)) for _ in range(2)]
    for p in waiters:
        p.start()
    until(lambda: event._cond._cv._waiting() == 2, timeout=BOUND * 3)
    setter = run_victim(ctx, die_setting_event, "cond.notify.marked", event)  # one marked, one not
    got = sorted(out.get(timeout=BOUND) for _ in waiters)
    for p in waiters:
        p.join(BOUND)
        assert p.exitcode == 0
    # both return: the lock's holder died in set(), so taking it back raises for both
    assert got == [("died", setter), ("died", setter)]


def test_barrier_with_more_parties_than_condition_slots(ctx):
    parties = gilfree.synchronize.SLEEPER_SLOTS + 8
    barrier = ctx.Barrier(parties, timeout=BOUND * 5)
    errors = []

    def party():
        try:
            for _ in range(3):
                barrier.wait()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=party, daemon=True) for _ in range(parties)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BOUND * 6)
    assert not errors and not any(t.is_alive() for t in threads)


def test_condition_overflow_notify_does_not_wake_a_later_sleeper(ctx):
    cond = ctx.Condition()
    n = gilfree.synchronize.SLEEPER_SLOTS + 4
    results = []
    threads = [sleeper_thread(cond, results) for _ in range(n)]
    until(lambda: cond._cv._waiting() == n)
    with cond:
        cond.notify_all()
    for t in threads:
        t.join(BOUND)
    assert results == [True] * n
    late = []
    t = sleeper_thread(cond, late, timeout=0.3)
    t.join(BOUND)
    assert late == [False], "a sleeper that started after the notify was woken by it"


def test_semaphore_tracks_again_once_its_holders_fit_the_table(ctx):
    # holders beyond the table turned death checks off for the life of the semaphore
    n = 60
    sem = ctx.BoundedSemaphore(n)
    for _ in range(n):  # threads of one process hold one record each: more than the table
        assert sem.acquire(False)
    assert not sem._tracking()
    for _ in range(n):
        sem.release()
    assert sem._tracking(), "a whole bounded semaphore should trust its records again"
    pid = run_victim(ctx, die_acquiring, "sem.acquire.recorded", sem)
    assert sem._dead_holder() == pid  # what a blocked waiter finds after its slice
    assert sem.get_value() == n - 1


def test_live_thread_of_a_process_whose_main_thread_left_is_not_taken_over(ctx):
    lock = ctx.Lock(on_owner_death="takeover")
    flag = ctx.RawValue("i", 0)
    p = ctx.Process(target=hold_in_a_thread_then_leave_main, args=(lock, flag))
    p.start()
    until(lambda: flag.value == 1)
    time.sleep(0.2)  # the main thread has left: /proc shows the leader as a zombie
    try:
        assert not lock.acquire(timeout=0.5), "took over a lock a live thread holds"
        assert flag.value == 1
    finally:
        p.join(BOUND * 2)
    assert flag.value == 2
    assert p.exitcode == 0, f"the holder did not end cleanly: {p.exitcode}"
    expect_free(lock)


def wait_on_event_forever(event):
    event.wait()


def test_dead_sleeper_beyond_the_table_does_not_wake_a_later_one_early(ctx):
    # a sleeper beyond the table killed while waiting stayed counted; a later notify gave it a
    # token that a much later Event.wait() (no timeout) took: it returned False, unset
    event = ctx.Event()
    results = []
    threads = []
    for _ in range(gilfree.synchronize.SLEEPER_SLOTS):
        t = threading.Thread(target=lambda: results.append(event.wait(BOUND * 2)), daemon=True)
        t.start()
        threads.append(t)
    until(lambda: event._cond._cv._waiting() == gilfree.synchronize.SLEEPER_SLOTS)
    ghost = ctx.Process(target=wait_on_event_forever, args=(event,))
    ghost.start()
    until(lambda: event._cond._cv._waiting() == gilfree.synchronize.SLEEPER_SLOTS + 1, timeout=BOUND * 3)
    ghost.kill()
    ghost.join(BOUND)
    event.set()
    for t in threads:
        t.join(BOUND)
    assert results == [True] * gilfree.synchronize.SLEEPER_SLOTS
    event.clear()
    late = []
    threads = [threading.Thread(target=lambda: late.append(event.wait(0.3)), daemon=True)
               for _ in range(gilfree.synchronize.SLEEPER_SLOTS + 2)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(BOUND)
    assert late == [False] * len(threads) and time.monotonic() - t0 >= 0.25


def test_notify_and_acquire_arguments_as_the_stdlib():
    for cond in (gilfree.Condition(), std_mp.Condition()):
        with cond:
            cond.notify(2**70)  # any number bounds how many are woken
            cond.notify(1.5)
    for lock in (gilfree.Lock(), std_mp.Lock()):
        with pytest.raises(TypeError):
            lock.acquire(False, "1")  # the timeout is checked even when not blocking


# -- every point has a scenario ------------------------------------------------------------------

COVERED = {
    "lock.check.read", "sem.check.scan",
    "lock.acquire.taken", "lock.release.before", "lock.release.freed", "lock.wait.flagged",
    "lock.takeover.swapped",
    "sem.acquire.claimed", "sem.acquire.taken", "sem.acquire.recorded", "sem.release.given",
    "sem.release.forgotten", "sem.repair.fixed",
    "cond.wait.registered", "cond.wait.unlocked", "cond.wait.woken", "cond.wait.freed", "cond.notify.marked",
}


def test_every_crash_point_belongs_to_a_matrix():
    # lock.*, sem.*, cond.* are killed here; queue.* in test_queue_crash.py; pool.* in
    # test_pool_promises.py.  A point with another prefix would be named in the code and killed nowhere.
    assert {name.split(".")[0] for name in crash_points()} <= {"lock", "sem", "cond", "queue", "pool"}


def test_every_lock_crash_point_has_a_scenario():
    named = set(crash_points("lock.")) | set(crash_points("sem.")) | set(crash_points("cond."))
    assert named == COVERED, f"points without a scenario: {named - COVERED}; gone: {COVERED - named}"


# -- random kills: the second net (bounded) -------------------------------------------------------

def hammer(lock, inside, ready):
    ready.set()
    while True:
        with lock:
            inside.value += 1
            if inside.value != 1:
                os._exit(7)  # exclusion broken
            inside.value -= 1


@pytest.mark.parametrize("kind", ["Lock", "RLock", "Semaphore1"])
def test_random_kills_never_leave_a_lock_held_by_nobody(kind):
    # issue 11 item 1: SIGKILLed at random in an acquire/release loop, the old lock was sometimes
    # "held, unrecorded": acquire(timeout=3) then returned False with no OwnerDiedError
    ctx = gilfree.get_context("fork")
    make = {"Lock": ctx.Lock, "RLock": ctx.RLock, "Semaphore1": lambda: ctx.BoundedSemaphore(1)}[kind]
    rng = random.Random(11)
    inside = ctx.RawValue("i", 0)
    for _ in range(40):
        lock = make()
        ready = ctx.Event()
        p = ctx.Process(target=hammer, args=(lock, inside, ready))
        p.start()
        assert ready.wait(BOUND)
        time.sleep(rng.uniform(0.0005, 0.01))
        p.kill()
        p.join(BOUND)
        assert p.exitcode == KILLED
        inside.value = 0
        t0 = time.monotonic()
        try:
            assert lock.acquire(timeout=BOUND), "held by nobody on record: the waiter timed out"
            lock.release()
        except OwnerDiedError as e:
            assert e.pid == p.pid
        assert time.monotonic() - t0 < 1.0


# -- timeouts (issue 11 item 13: inf, nan and huge timeouts were undefined behaviour in C) ----------

def test_timeouts_inf_huge_and_nan():
    lock = gilfree.Lock()
    assert lock.acquire(timeout=float("inf"))
    threading.Timer(0.2, lock.release).start()
    t0 = time.monotonic()
    assert lock.acquire(timeout=1e300)  # "forever": waits for the release, does not fail at once
    assert 0.1 < time.monotonic() - t0 < BOUND
    with pytest.raises(ValueError, match="nan"):
        lock.acquire(timeout=float("nan"))
    assert not lock.acquire(timeout=-1)  # negative: do not wait (as the stdlib's SemLock)
    lock.release()
    sem = gilfree.Semaphore(0)
    threading.Timer(0.2, sem.release).start()
    assert sem.acquire(timeout=float("inf"))


def test_event_set_interrupted_between_its_steps_leaves_no_sleeper_behind():
    # a signal handler raising inside set() (between notifying and raising the flag, or the other
    # way round) must not leave sleepers asleep for good with the flag set
    event = gilfree.Event()
    results = []
    t = threading.Thread(target=lambda: results.append(event.wait(BOUND * 2)), daemon=True)
    t.start()
    until(lambda: event._cond._cv._waiting() == 1)
    real_notify = event._cond.notify_all

    def interrupted_notify():
        real_notify()
        raise KeyboardInterrupt  # as a handler would, right after this step

    event._cond.notify_all = interrupted_notify
    with pytest.raises(KeyboardInterrupt):
        event.set()
    event._cond.notify_all = real_notify
    time.sleep(0.2)
    assert t.is_alive() and not event.is_set()  # set() did not happen: the sleeper sleeps on
    real_release = event._flag.release

    def interrupted_release():
        real_release()
        raise KeyboardInterrupt

    event._flag.release = interrupted_release
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        event.set()  # the flag is raised: the sleeper must be awake, not sleep to its timeout
    t.join(BOUND)
    assert results == [True] and time.monotonic() - t0 < 1.0
