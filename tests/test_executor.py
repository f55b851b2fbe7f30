"""ProcessPoolExecutor where it used to break (issue 12): requeued futures, the "break" policy, exit
with pending work, an executor left to the GC, and the exit function racing a closed Process.

Each test failed before the change it covers; the ones that compare run the stdlib beside gilfree.
"""

from __future__ import annotations

import concurrent.futures as cf
import concurrent.futures.process as cfp
import gc
import os
import signal
import sys
import time

import pytest
from _helpers import run_program, write_program

import gilfree
from gilfree import TaskTimeoutError, WorkerLostError
from gilfree.executor import ProcessPoolExecutor

pytestmark = pytest.mark.timeout(120)


def die_on(x, bad=0):
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def sleep_then(x, seconds):
    time.sleep(seconds)
    return x


def die_after(seconds):
    time.sleep(seconds)
    os.kill(os.getpid(), signal.SIGKILL)


def _gone(pid: int, within: float) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # our own child: reaped by its owner, or a zombie until then
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


# -- 3. a future requeued after its worker died before starting it ---------------------------


@pytest.mark.parametrize("policy", ["fail", "retry"])
def test_futures_sent_to_a_dying_worker_run_elsewhere(method, policy):
    """The worker had the next futures in hand (prefetched, RUNNING) when it died: they went back to
    the queue, ``set_running_or_notify_cancel`` raised on a RUNNING future, the supervisor died and
    the futures stayed RUNNING for good."""
    with ProcessPoolExecutor(1, mp_context=method, on_worker_death=policy, retries=0) as ex:
        doomed = ex.submit(die_on, 0)
        after = [ex.submit(sleep_then, i, 0.01) for i in range(1, 8)]
        with pytest.raises(WorkerLostError):
            doomed.result(30)
        assert [f.result(30) for f in after] == list(range(1, 8))
        assert ex.submit(die_on, 5).result(30) == 5  # the supervisor is alive


def test_futures_sent_behind_a_timed_out_task_run_elsewhere(method):
    with ProcessPoolExecutor(1, mp_context=method, task_timeout=0.5) as ex:
        slow = ex.submit(sleep_then, "slow", 30)
        after = [ex.submit(sleep_then, i, 0.01) for i in range(5)]
        with pytest.raises(TaskTimeoutError):
            slow.result(30)
        assert [f.result(30) for f in after] == list(range(5))


# -- 12. on_worker_death="break" is the stdlib's behaviour -----------------------------------


@pytest.mark.parametrize("impl", ["gilfree", "gilfree-default", "stdlib"])
def test_break_gives_every_unfinished_future_broken_process_pool(method, impl):
    """"break" is the default (issue 14): code written for the stdlib catches what it always caught."""
    if impl == "stdlib":
        ex = cf.ProcessPoolExecutor(2, mp_context=__import__("multiprocessing").get_context(method))
    elif impl == "gilfree-default":
        ex = ProcessPoolExecutor(2, mp_context=method)
    else:
        ex = ProcessPoolExecutor(2, mp_context=method, on_worker_death="break")
    with ex:
        doomed = ex.submit(die_after, 0.5)
        slow = [ex.submit(sleep_then, i, 5) for i in range(4)]  # running, sent, or waiting
        for f in [doomed, *slow]:
            with pytest.raises(cfp.BrokenProcessPool):  # the stdlib's class catches gilfree's
                f.result(30)
        with pytest.raises(cfp.BrokenProcessPool):
            ex.submit(sleep_then, 1, 0)
        with pytest.raises(cfp.BrokenProcessPool):
            ex.map(sleep_then, [1], [0])


def test_broken_process_pool_is_the_stdlibs_and_gilfrees():
    assert issubclass(gilfree.executor.BrokenProcessPool, cfp.BrokenProcessPool)
    assert gilfree.BrokenProcessPool is gilfree.executor.BrokenProcessPool  # beside ProcessPoolExecutor
    assert issubclass(gilfree.executor.BrokenProcessPool, cf.BrokenExecutor)
    assert issubclass(gilfree.executor.BrokenProcessPool, gilfree.BrokenPoolError)


# -- 9. exit with pending futures; an executor left to the GC ----------------------------------

EXIT_WITH_PENDING = """
import os, sys, time
from concurrent.futures import ProcessPoolExecutor as StdExecutor

def record(path, i):
    time.sleep(0.05)
    with open(os.path.join(path, str(i)), "w"):
        pass
    return i

if __name__ == "__main__":
    out = sys.argv[1]
    if multiprocessing.__name__ == "gilfree":
        ex = multiprocessing.ProcessPoolExecutor(2)
    else:
        ex = StdExecutor(2, mp_context=multiprocessing.get_context())
    futures = [ex.submit(record, out, i) for i in range(20)]
    print("submitted", len(futures))
    # no shutdown(): the program ends with the futures pending
"""


@pytest.mark.parametrize("module", ["gilfree", "multiprocessing"])
def test_exit_runs_the_pending_futures(tmp_path, method, module):
    out = tmp_path / "out"
    out.mkdir()
    prog = write_program(tmp_path, EXIT_WITH_PENDING, module=module, method=method)
    res = run_program([str(prog), str(out)], timeout=60)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert sorted(int(n) for n in os.listdir(out)) == list(range(20))


SUBMIT_AT_EXIT = """
import atexit

@atexit.register
def run_last():
    try:
        ex.submit(abs, -1)
    except RuntimeError as exc:
        print("runtime-error:", exc)

if __name__ == "__main__":
    if multiprocessing.__name__ == "gilfree":
        ex = multiprocessing.ProcessPoolExecutor(2)
    else:
        from concurrent.futures import ProcessPoolExecutor
        ex = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context())
    print(ex.submit(abs, -42).result())
"""


@pytest.mark.parametrize("module", ["gilfree", "multiprocessing"])
def test_submit_after_interpreter_shutdown_raises(tmp_path, module):
    prog = write_program(tmp_path, SUBMIT_AT_EXIT, module=module, method="spawn")
    res = run_program(prog, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "42" and len(lines) == 2, res.stdout
    # the stdlib says "after shutdown" (its exit hook marked the executor shut down); gilfree names why
    assert lines[1].startswith("runtime-error: cannot schedule new futures after"), res.stdout


def _abandoned_executor(method):
    ex = ProcessPoolExecutor(2, mp_context=method)
    future = ex.submit(sleep_then, "done", 0.3)
    pids = set(ex.pids)
    return future, pids


def test_an_executor_left_to_the_gc_finishes_its_futures_and_stops_its_workers(method):
    future, pids = _abandoned_executor(method)
    gc.collect()
    assert future.result(30) == "done"  # what was submitted still runs
    assert pids and all(_gone(pid, 10) for pid in pids), "the workers outlived their executor"


# -- 9. the exit function and a Process closed by another thread -------------------------------

EXIT_FUNCTION_RACE = """
import os, sys, time
import gilfree.process as gp

def noop():
    pass

def slow_write(path):
    time.sleep(1.0)
    with open(path, "w") as f:
        f.write("done")

if __name__ == "__main__":
    finished = multiprocessing.Process(target=noop)
    finished.start()
    finished.join()
    slow = multiprocessing.Process(target=slow_write, args=(sys.argv[1],))
    slow.start()
    listed = gp.active_children

    def racing():
        # what a pool's supervisor thread does between the exit function's look and its join:
        # close a Process object the exit function has already listed
        children = listed()
        finished.close()
        return [finished, *children]

    gp.active_children = racing
"""


def test_exit_function_skips_a_process_closed_meanwhile(tmp_path, method):
    marker = tmp_path / "marker"
    prog = write_program(tmp_path, EXIT_FUNCTION_RACE, method=method)
    res = run_program([str(prog), str(marker)], timeout=60)
    assert res.returncode == 0, res.stderr
    assert "process object is closed" not in res.stderr, res.stderr
    assert marker.exists() and marker.read_text() == "done", "the non-daemonic child was not joined at exit"


# -- the results of map are not kept alive by the executor --------------------------------------


class Dummy:
    pass


def make_dummy(_):
    return Dummy()


def test_map_keeps_no_reference_to_a_result_the_caller_dropped(method):
    """CPython's test_free_reference: each result is freed once the caller lets it go."""
    import weakref

    with ProcessPoolExecutor(2, mp_context=method) as ex:
        for obj in ex.map(make_dummy, range(10)):
            ref = weakref.ref(obj)
            del obj
            gc.collect()
            assert ref() is None


# -- a forked child does not wait at its exit for its parent's executors (found by the breaker) ---


def noop():
    pass


def test_a_forked_child_exits_while_an_executor_is_open_in_the_parent():
    """The exit hook ran in forked children too, on their copies of the parent's executors: it
    waited for a supervisor thread that did not come along, and the child never exited."""
    ctx = gilfree.get_context("fork")
    with ProcessPoolExecutor(1, mp_context=ctx) as ex:
        assert ex.submit(abs, -3).result(30) == 3
        p = ctx.Process(target=noop)
        start = time.monotonic()
        p.start()
        p.join(20)
        if p.exitcode is None:
            p.kill()
            p.join()
        assert p.exitcode == 0
        assert time.monotonic() - start < 4  # it waited for nothing (it used to hang, or take 5 s)
        with ctx.Pool(2) as pool:  # pool workers are forked children too
            assert pool.map(abs, [-1, -2]) == [1, 2]
            pool.close()
            start = time.monotonic()
            pool.join()
            assert time.monotonic() - start < 4


# -- the stdlib's private attributes that code reads (issue 14: CPython's own tests read them) -----


def test_the_stdlib_executors_private_attributes(method):
    with ProcessPoolExecutor(2, mp_context=method) as ex:
        assert ex.submit(sleep_then, 1, 0).result(30) == 1
        procs = ex._processes
        # under spawn and forkserver a worker starts when a task finds none idle, as the stdlib's do
        assert len(procs) == (2 if method == "fork" else 1)
        assert all(p.is_alive() and p.pid == pid and p.exitcode is None for pid, p in procs.items())
        assert repr(procs[next(iter(procs))])
        assert ex._broken is False
        assert ex._mp_context is gilfree.get_context(method)
        thread = ex._executor_manager_thread
        assert thread is not None and thread.is_alive()
        busy = [ex.submit(sleep_then, i, 30) for i in range(2)]
        deadline = time.monotonic() + 30
        while not all(f.running() for f in busy) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)  # both workers are inside their task
        procs = ex._processes
        assert len(procs) == 2
        for p in procs.values():
            p.kill()  # as CPython's test_deadlock does: the default policy breaks the executor
        with pytest.raises(cfp.BrokenProcessPool):
            busy[0].result(30)
        assert isinstance(ex._broken, str) and "died" in ex._broken, ex._broken
    thread.join(30)
    assert not thread.is_alive()


# -- a result that cannot be pickled, or whose pickling exits (CPython's test_deadlock cases) -----


class ExitAtPickle:
    def __reduce__(self):
        sys.exit(3)


class ErrorAtPickle:
    def __reduce__(self):
        from pickle import PicklingError

        raise PicklingError("error at pickle")


def make(cls):
    return cls()


@pytest.mark.parametrize("impl", ["gilfree", "stdlib"])
def test_a_result_whose_pickling_fails_or_exits(method, impl):
    """The future gets the pickling's own exception (SystemExit, PicklingError), as from the stdlib, and
    the worker survives it (before: SystemExit killed it, and the pickling error came as
    MaybeEncodingError)."""
    if impl == "stdlib":
        ex = cf.ProcessPoolExecutor(1, mp_context=__import__("multiprocessing").get_context(method))
    else:
        ex = ProcessPoolExecutor(1, mp_context=method)
    with ex:
        with pytest.raises(SystemExit):
            ex.submit(make, ExitAtPickle).result(30)
        with pytest.raises(__import__("pickle").PicklingError, match="error at pickle"):
            ex.submit(make, ErrorAtPickle).result(30)
        assert ex.submit(sleep_then, 7, 0).result(30) == 7


def test_the_pool_reports_such_a_result_as_maybe_encoding_error(method):
    with gilfree.get_context(method).Pool(1) as pool:
        for cls in (ExitAtPickle, ErrorAtPickle):
            with pytest.raises(gilfree.pool.MaybeEncodingError):
                pool.apply(make, (cls,))
        assert pool.apply(sleep_then, (7, 0)) == 7


# -- found by the breaker of the changes above --------------------------------------------------


def test_a_break_does_not_wait_for_the_other_workers_tasks(method):
    """A death breaks the executor while another worker runs a long task: that task has failed with the
    rest, and leaving the ``with`` block does not wait for it (before: 30 s for a 30 s task)."""
    t0 = time.monotonic()
    with ProcessPoolExecutor(2, mp_context=method) as ex:
        long = ex.submit(sleep_then, 1, 60)
        time.sleep(0.5)
        ex.submit(die_after, 0)
        with pytest.raises(cfp.BrokenProcessPool):
            long.result(30)
    assert time.monotonic() - t0 < 15


class BadRepr:
    def __reduce__(self):
        raise ValueError("no pickle")

    def __repr__(self):
        raise RuntimeError("no repr either")


class ExitEachItem:
    def __reduce__(self):
        raise SystemExit(7)


class NoRebuild(Exception):
    def __init__(self, a, b):
        super().__init__(a)


class RaisesNoRebuild:
    def __reduce__(self):
        raise NoRebuild(1, 2)


def bad_every_fourth(i):
    return ExitEachItem() if i % 4 == 2 else i


def test_results_that_fail_in_every_way_fail_only_their_task(method):
    """A result whose repr raises too, an exception that cannot be rebuilt in the caller, an imap item
    whose pickling exits: each fails only itself, and the same worker goes on (before: the worker died,
    or the caller got a TypeError from rebuilding the error, or the whole imap chunk was lost)."""
    with ProcessPoolExecutor(1, mp_context=method) as ex:
        with pytest.raises(Exception, match="no pickle"):  # gilfree's PicklingError, explaining the ValueError
            ex.submit(make, BadRepr).result(30)
        # the error itself where it can be rebuilt here (an earlier test may have registered a reducer
        # that rebuilds it), else MaybeEncodingError: never the TypeError of a failed rebuild
        with pytest.raises((NoRebuild, gilfree.pool.MaybeEncodingError)):
            ex.submit(make, RaisesNoRebuild).result(30)
        assert ex.submit(sleep_then, 7, 0).result(30) == 7
    with gilfree.get_context(method).Pool(1) as pool:
        pid = pool.apply(os.getpid)
        for cls in (BadRepr, RaisesNoRebuild):
            with pytest.raises(gilfree.pool.MaybeEncodingError):
                pool.apply(make, (cls,))
        got = []
        it = pool.imap(bad_every_fourth, range(8), chunksize=4)
        for _ in range(8):
            try:
                got.append(next(it))
            except gilfree.pool.MaybeEncodingError:
                got.append("bad")
        assert got == [0, 1, "bad", 3, 4, 5, "bad", 7]
        assert pool.apply(os.getpid) == pid


# -- CPython 3.13's test_concurrent_futures (issue 14): each ran on the stdlib and gilfree ------------


def _executor(impl, method, workers, **kwargs):
    if impl == "stdlib":
        return cf.ProcessPoolExecutor(workers, mp_context=__import__("multiprocessing").get_context(method), **kwargs)
    return ProcessPoolExecutor(workers, mp_context=method, **kwargs)


def raise_runtime_error():
    raise RuntimeError(123)  # the line the remote traceback shows


@pytest.mark.parametrize("impl", ["gilfree", "stdlib"])
def test_a_workers_traceback_is_the_stdlibs_remote_traceback(method, impl):
    """Code (and test_traceback) checks ``type(exc.__cause__) is concurrent.futures.process._RemoteTraceback``
    (before: gilfree's own RemoteTraceback class)."""
    with _executor(impl, method, 1) as ex:
        exc = ex.submit(raise_runtime_error).exception(30)
    assert type(exc) is RuntimeError and exc.args == (123,)
    assert type(exc.__cause__) is cfp._RemoteTraceback
    assert "raise RuntimeError(123)  # the line the remote traceback shows" in exc.__cause__.tb


@pytest.mark.parametrize("impl", ["gilfree", "stdlib"])
def test_max_tasks_per_child_refuses_fork_and_defaults_to_spawn(impl):
    """As the stdlib 3.11+: a replacement worker is never forked from a process running threads (before:
    gilfree accepted fork, and with no context used the default start method)."""
    with pytest.raises(ValueError, match="fork"):
        _executor(impl, "fork", 1, max_tasks_per_child=2)
    ex = (cf.ProcessPoolExecutor if impl == "stdlib" else ProcessPoolExecutor)(1, max_tasks_per_child=1)
    with ex:
        assert ex._mp_context.get_start_method() == "spawn"
        first = ex.submit(os.getpid).result(60)
        assert ex.submit(os.getpid).result(60) != first  # one task per worker


@pytest.mark.parametrize("impl", ["gilfree", "stdlib"])
def test_worker_processes_stay_usable_after_shutdown(method, impl):
    """``executor._processes`` taken before shutdown: join, is_alive and exitcode still work after it
    (before: ValueError, the engine had closed the Process objects)."""
    ex = _executor(impl, method, 2)
    assert list(ex.map(abs, range(-4, 4))) == [4, 3, 2, 1, 0, 1, 2, 3]
    procs = ex._processes
    assert procs
    ex.shutdown()
    for p in procs.values():
        p.join()
        assert not p.is_alive()
        assert p.exitcode == 0


@pytest.mark.parametrize("impl", ["gilfree", "stdlib"])
def test_call_queue_join_thread(method, impl):
    """``executor._call_queue.join_thread()`` after a shutdown without wait returns once the workers are
    fed and gone; before the shutdown it raises (the stdlib's assertion) rather than wait forever
    (before: no ``_call_queue``)."""
    ex = _executor(impl, method, 3)
    res = ex.map(abs, range(-5, 5))
    call_queue = ex._call_queue
    with pytest.raises(AssertionError):
        call_queue.join_thread()
    thread = ex._executor_manager_thread
    procs = ex._processes
    ex.shutdown(wait=False)
    thread.join(30)
    assert not thread.is_alive()
    for p in procs.values():
        p.join(30)
    call_queue.join_thread()
    assert list(res) == [abs(v) for v in range(-5, 5)]


def _raise_unpickling_error():
    raise __import__("pickle").UnpicklingError("no rebuild here")


def _exit_in_rebuild():
    sys.exit(1)


class FailsToUnpickle:
    def __reduce__(self):
        return _raise_unpickling_error, ()


class ExitsInUnpickle:
    def __reduce__(self):
        return _exit_in_rebuild, ()


@pytest.mark.parametrize("cls", [FailsToUnpickle, ExitsInUnpickle])
@pytest.mark.parametrize("impl", ["gilfree", "stdlib"])
def test_a_result_that_fails_to_unpickle_breaks_the_executor(method, impl, cls):
    """CPython's test_error/exit_during_result_unpickle_in_result_handler: BrokenProcessPool, and the
    executor is broken (before: the unpickling error itself, or a RuntimeError wrapping SystemExit)."""
    with _executor(impl, method, 2) as ex:
        with pytest.raises(cfp.BrokenProcessPool):
            ex.submit(make, cls).result(30)
        with pytest.raises(cfp.BrokenProcessPool):
            ex.submit(abs, -1).result(30)


def test_under_fail_a_result_that_fails_to_unpickle_fails_alone(method):
    with ProcessPoolExecutor(1, mp_context=method, on_worker_death="fail") as ex:
        with pytest.raises(__import__("pickle").UnpicklingError):
            ex.submit(make, FailsToUnpickle).result(30)
        assert ex.submit(abs, -1).result(30) == 1


def init_fail(log_queue):
    import logging
    from logging.handlers import QueueHandler

    logger = logging.getLogger("concurrent.futures")
    logger.addHandler(QueueHandler(log_queue))
    logger.setLevel("CRITICAL")
    logger.propagate = False
    raise ValueError("error in initializer")


@pytest.mark.parametrize("impl", ["gilfree", "stdlib"])
def test_a_failing_initializer_is_logged_and_breaks_the_executor(method, impl):
    """The worker logs the initializer's exception on the ``concurrent.futures`` logger, CRITICAL with its
    traceback, as the stdlib's does (before: the executor broke, nothing was logged)."""
    import queue as std_queue

    ctx = __import__("multiprocessing").get_context(method) if impl == "stdlib" else gilfree.get_context(method)
    log_queue = ctx.Queue()
    ex = None
    try:
        with _executor(impl, method, 2, initializer=init_fail, initargs=(log_queue,)) as ex:
            try:
                future = ex.submit(abs, -1)
            except cf.BrokenExecutor:
                pass
            else:
                with pytest.raises(cf.BrokenExecutor):
                    future.result(30)
            with pytest.raises(cf.BrokenExecutor):
                ex.submit(abs, -1)
        messages = []
        try:
            while True:
                messages.append(log_queue.get(timeout=1).getMessage())
        except std_queue.Empty:
            pass
        assert any("ValueError: error in initializer" in m for m in messages), messages
    finally:
        log_queue.close()
        log_queue.join_thread()
        del log_queue, ex  # the stdlib unlinks a spawn Queue's semaphores when the Queue is collected
        gc.collect()


@pytest.mark.parametrize("impl", ["gilfree", "stdlib"])
def test_an_idle_workers_death_breaks_the_executor(method, impl):
    """As the stdlib's: any worker killed breaks the executor, busy or not (before: gilfree replaced an
    idle one silently, and CPython's test_killed_child got no BrokenProcessPool)."""
    with _executor(impl, method, 2) as ex:
        assert ex.submit(abs, -1).result(30) == 1
        for p in ex._processes.values():
            p.kill()
        deadline = time.monotonic() + 30
        while not ex._broken and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ex._broken
        with pytest.raises(cfp.BrokenProcessPool):
            ex.submit(abs, -1)


@pytest.mark.parametrize("policy", ["fail", "retry"])
def test_under_fail_and_retry_an_idle_workers_death_replaces_it(method, policy):
    with ProcessPoolExecutor(2, mp_context=method, on_worker_death=policy) as ex:
        assert ex.submit(abs, -1).result(30) == 1
        old = set(ex.pids)
        for p in ex._processes.values():
            p.kill()
        deadline = time.monotonic() + 30
        # under fork the dead are replaced at once; under spawn and forkserver workers start on demand
        full = 2 if method == "fork" else 0
        while (set(ex.pids) & old or len(ex.pids) < full) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not set(ex.pids) & old
        assert not ex._broken
        assert [ex.submit(abs, -i).result(30) for i in range(4)] == [0, 1, 2, 3]


@pytest.mark.parametrize("impl", ["gilfree", "stdlib"])
def test_shutdown_cancel_futures_runs_the_started_ones(method, impl):
    """CPython's test_cancel_futures: some futures cancelled, some (those a worker took) finish (before:
    submit returned before the supervisor had handed any task over, and every future was cancelled)."""
    ex = _executor(impl, method, 5)
    fs = [ex.submit(time.sleep, 0.1) for _ in range(50)]
    ex.shutdown(cancel_futures=True)
    cancelled = [f for f in fs if f.cancelled()]
    others = [f for f in fs if not f.cancelled()]
    assert len(cancelled) > 20
    assert others
    for f in others:
        assert f.done() and f.exception() is None


def test_a_supervisor_that_cannot_start_leaves_no_worker(method, monkeypatch):
    """At interpreter finalization a thread cannot start (CPython's test_python_finalization_error,
    gh-109047): the constructor raises that RuntimeError, as the stdlib's submit does, and stops the
    workers it had started (before: they were left running).  The Pool shares the engine."""
    import threading

    start = threading.Thread.start

    def failing_start(self):
        if "supervisor" in self.name:
            raise RuntimeError("can't create new thread at interpreter shutdown")
        return start(self)

    monkeypatch.setattr(threading.Thread, "start", failing_start)
    with pytest.raises(RuntimeError, match="interpreter shutdown"):
        ProcessPoolExecutor(2, mp_context=method)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="interpreter shutdown"):
        monkeypatch.setattr(threading.Thread, "start", failing_start)
        gilfree.get_context(method).Pool(2)


@pytest.mark.parametrize("impl", ["gilfree", "stdlib"])
def test_workers_start_on_demand_except_under_fork(method, impl):
    """As the stdlib's (3.9+): under spawn and forkserver a worker starts when a task finds none idle, and
    idle workers are reused; under fork all start with the executor (before: all started up front
    under every method, and CPython's test_idle_process_reuse_* and test_processes_terminate failed)."""
    with _executor(impl, method, 4) as ex:
        for _ in range(3):
            assert ex.submit(abs, -2).result(60) == 2
        assert len(ex._processes) == (4 if method == "fork" else 1)
        busy = [ex.submit(sleep_then, i, 2) for i in range(3)]
        assert len(ex._processes) == (4 if method == "fork" else 3)
        assert [f.result(60) for f in busy] == [0, 1, 2]


EXIT_WITH_REPLACEMENTS = """
import os, sys, time

def record(path, i):
    time.sleep(0.2)
    with open(os.path.join(path, str(i)), "w"):
        pass
    return i

if __name__ == "__main__":
    ex = multiprocessing.ProcessPoolExecutor(1, max_tasks_per_child=1)
    futures = [ex.submit(record, sys.argv[1], i) for i in range(3)]
    # no shutdown(): the workers for futures 1 and 2 start after the script's last line has run
"""


def test_workers_started_at_exit_find_the_main_modules_functions(tmp_path):
    """CPython deletes ``__main__.__file__`` once the script has run, before the exit hooks: a worker
    spawned then (here a replacement, max_tasks_per_child=1) got no main module and failed every task
    with "Can't get attribute 'record'" (before: only future 0 ran)."""
    out = tmp_path / "out"
    out.mkdir()
    prog = write_program(tmp_path, EXIT_WITH_REPLACEMENTS, module="gilfree", method="spawn")
    res = run_program([str(prog), str(out)], timeout=60)
    assert res.returncode == 0, res.stderr
    assert sorted(int(n) for n in os.listdir(out)) == [0, 1, 2], res.stderr


def start_time_then_linger_at_exit(seconds):
    import atexit

    atexit.register(time.sleep, seconds)  # the worker's exit takes this long after its last result
    return time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process of the machine


@pytest.mark.parametrize("impl", ["gilfree", "stdlib"])
def test_a_retiring_worker_counts_until_it_has_exited(impl):
    """max_workers is a limit on processes: a worker that reached max_tasks_per_child and is still
    exiting is one of them, so its replacement starts once it has gone, as the stdlib's executor
    joins it first (before: the replacement started at once, and 2 workers ran with max_workers=1)."""
    ex = (cf.ProcessPoolExecutor if impl == "stdlib" else ProcessPoolExecutor)(1, max_tasks_per_child=1)
    with ex:
        first, second = [ex.submit(start_time_then_linger_at_exit, 1.0) for _ in range(2)]
        assert second.result(60) - first.result(60) >= 1.0


def start_time_then_keep_the_worker_alive(seconds):
    import threading

    threading.Thread(target=time.sleep, args=(seconds,)).start()  # not daemonic: the worker's exit waits
    return time.monotonic()


def test_a_retiring_worker_that_does_not_exit_delays_its_replacement_only_for_a_while(monkeypatch):
    """A worker kept alive at exit (a non-daemonic thread) counts toward max_workers only for
    EXIT_GRACE seconds: the executor does not stall behind it (the stdlib's waits for it forever)."""
    from gilfree import _workers

    monkeypatch.setattr(_workers, "EXIT_GRACE", 1.0)
    with ProcessPoolExecutor(1, max_tasks_per_child=1) as ex:
        first, second = [ex.submit(start_time_then_keep_the_worker_alive, 4.0) for _ in range(2)]
        gap = second.result(60) - first.result(60)
        assert 1.0 <= gap < 3.5
