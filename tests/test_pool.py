"""Pool, ThreadPool, ProcessPoolExecutor and gilfree.dummy: the stdlib's behaviour, and what gilfree adds
(a dead worker fails one task, task timeouts, recycling, lazy imap, progress bars, Ctrl-C)."""

from __future__ import annotations

import itertools
import multiprocessing as std_mp
import os
import signal
import sys
import threading
import time

import pytest
from _helpers import run_program, write_program

import gilfree
from gilfree.executor import BrokenProcessPool, ProcessPoolExecutor
from gilfree.pool import MaybeEncodingError, RemoteTraceback, ThreadPool

# ---------------------------------------------------------------------------------------------
# functions the workers run (importable by name under spawn and forkserver)


def square(x):
    return x * x


def add(a, b):
    return a + b


def fail_on(x, bad=3):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def pid_of(_=None):
    return os.getpid()


def sleep_then(x, seconds=0.05):
    time.sleep(seconds)
    return x


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


def die_on(x, bad=2):
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def die_once(path, x):
    """Dies the first time (creates ``path``), succeeds after."""
    if not os.path.exists(path):
        with open(path, "w"):
            pass
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def exit_with(code):
    os._exit(code)


def raise_base(kind):
    if kind == "exit":
        raise SystemExit(3)
    raise KeyboardInterrupt


def unpicklable_result(_=None):
    return threading.Lock()


def grow_memory(mb):
    global _hoard
    _hoard = bytearray(mb << 20)
    for i in range(0, len(_hoard), 4096):
        _hoard[i] = 1
    return os.getpid()


_init_value = None


def set_init(value):
    global _init_value
    _init_value = value


def get_init(_=None):
    return _init_value


def bad_init():
    raise RuntimeError("initializer failed on purpose")


def array_sum(a):
    return float(a.sum()), a.flags.writeable


def array_double(a):
    return a * 2


# ---------------------------------------------------------------------------------------------
# the stdlib API, side by side


def test_map_apply_starmap_match_stdlib(ctx, method):
    std = std_mp.get_context(method)
    with std.Pool(2) as ref, ctx.Pool(2) as got:
        assert got.map(square, range(50)) == ref.map(square, range(50))
        assert got.map(square, range(50), chunksize=7) == ref.map(square, range(50), chunksize=7)
        assert got.map(square, []) == ref.map(square, []) == []
        assert got.apply(add, (2, 3)) == ref.apply(add, (2, 3)) == 5
        assert got.apply(add, (), {"a": 1, "b": 2}) == 3
        assert got.starmap(add, [(1, 2), (3, 4)]) == ref.starmap(add, [(1, 2), (3, 4)])
        assert list(got.imap(square, range(20))) == list(ref.imap(square, range(20)))
        assert list(got.imap(square, range(20), chunksize=3)) == list(ref.imap(square, range(20), chunksize=3))
        assert sorted(got.imap_unordered(square, range(20))) == sorted(ref.imap_unordered(square, range(20)))
        assert got.map_async(square, range(5)).get(10) == ref.map_async(square, range(5)).get(10)
        assert got.starmap_async(add, [(1, 1)]).get(10) == [2]


def test_lambdas_and_closures(ctx):
    offset = 10
    with ctx.Pool(2) as pool:
        assert pool.map(lambda x: x + offset, range(5)) == [10, 11, 12, 13, 14]
        assert pool.apply(lambda: "hello") == "hello"


def test_async_result_api_and_callbacks(ctx):
    seen, errors = [], []
    with ctx.Pool(2) as pool:
        r = pool.apply_async(sleep_then, (7, 0.3), callback=seen.append)
        assert not r.ready()
        with pytest.raises(ValueError, match="not ready"):
            r.successful()
        with pytest.raises(gilfree.TimeoutError):
            r.get(0.01)
        assert r.get(10) == 7 and r.ready() and r.successful()
        assert seen == [7]
        bad = pool.apply_async(fail_on, (3,), error_callback=errors.append)
        bad.wait(10)
        assert not bad.successful()
        assert isinstance(errors[0], ValueError)
        m = pool.map_async(square, range(10), callback=seen.append)
        m.wait(10)
        assert seen[-1] == [x * x for x in range(10)]
        assert "ApplyResult" in repr(r) and "ok" in repr(r)


def test_exception_carries_remote_traceback(ctx):
    with ctx.Pool(2) as pool:
        with pytest.raises(ValueError, match="bad item 3") as info:
            pool.apply(fail_on, (3,))
        cause = info.value.__cause__
        assert isinstance(cause, RemoteTraceback)
        assert "fail_on" in str(cause) and "raise ValueError" in str(cause)
        with pytest.raises(ValueError, match="bad item 3"):
            pool.map(fail_on, range(10))
        # the pool still works
        assert pool.map(square, range(3)) == [0, 1, 4]


def test_imap_item_errors_do_not_lose_neighbours(ctx):
    with ctx.Pool(2) as pool:
        for chunksize in (None, 1, 4):
            it = pool.imap(fail_on, range(6), chunksize=chunksize)
            out = []
            for _ in range(6):
                try:
                    out.append(next(it))
                except ValueError as exc:
                    out.append(str(exc))
            assert out == [0, 1, 2, "bad item 3", 4, 5]
            with pytest.raises(StopIteration):
                next(it)


def test_imap_next_timeout(ctx):
    with ctx.Pool(1) as pool:
        it = pool.imap(sleep_then, [1], chunksize=1)
        with pytest.raises(gilfree.TimeoutError):
            it.next(timeout=0.001)
        assert it.next(timeout=10) == 1


def test_state_errors_like_stdlib(ctx):
    pool = ctx.Pool(1)
    with pytest.raises(ValueError, match="still running"):
        pool.join()
    pool.close()
    with pytest.raises(ValueError, match="not running"):
        pool.apply_async(square, (1,))
    pool.join()
    with pytest.raises(ValueError):
        ctx.Pool(0)
    with pytest.raises(ValueError):
        ctx.Pool(1, maxtasksperchild=0)
    with pytest.raises(TypeError):
        ctx.Pool(1, initializer=3)
    with pytest.raises(ValueError, match="on_worker_death"):
        ctx.Pool(1, on_worker_death="explode")


def test_close_join_finishes_submitted_work(ctx):
    pool = ctx.Pool(2)
    results = [pool.apply_async(sleep_then, (i, 0.05)) for i in range(6)]
    pool.close()
    pool.join()
    assert [r.get(0) for r in results] == list(range(6))
    assert pool.pids == []


def test_terminate_fails_unfinished_results(ctx):
    pool = ctx.Pool(1)
    r = pool.apply_async(sleep_then, (1, 30))
    time.sleep(0.2)
    t0 = time.monotonic()
    pool.terminate()
    pool.join()
    assert time.monotonic() - t0 < 10
    with pytest.raises(gilfree.BrokenPoolError, match="terminated"):
        r.get(1)


def test_initializer_and_initargs(ctx):
    with ctx.Pool(2, initializer=set_init, initargs=("ready",)) as pool:
        assert set(pool.map(get_init, range(4))) == {"ready"}


def test_initializer_that_raises_breaks_the_pool(ctx):
    with ctx.Pool(2, initializer=bad_init) as pool:
        with pytest.raises(gilfree.BrokenPoolError, match="initializer") as info:
            pool.apply(square, (2,))
        assert "initializer failed on purpose" in str(info.value.__cause__)


def test_function_sent_once_per_worker(ctx):
    # the function object is pickled once per call and sent once per worker: a function that is
    # expensive to pickle does not cost that per task
    counter = {"n": 0}

    class Counted:
        def __reduce__(self):
            counter["n"] += 1
            return (int, (1,))

    payload = Counted()

    def f(x, payload=payload):
        return x

    with ctx.Pool(2) as pool:
        assert pool.map(f, range(200), chunksize=1) == list(range(200))
    assert counter["n"] == 1


# ---------------------------------------------------------------------------------------------
# a worker that dies


def test_dead_worker_fails_only_its_task(ctx):
    with ctx.Pool(2) as pool:
        results = [pool.apply_async(die_on, (i,)) for i in range(6)]
        outcomes = []
        for r in results:
            try:
                outcomes.append(r.get(30))
            except gilfree.WorkerLostError as exc:
                outcomes.append(exc)
        assert [o for o in outcomes if not isinstance(o, Exception)] == [0, 1, 3, 4, 5]
        err = outcomes[2]
        assert err.exitcode == -signal.SIGKILL and err.pid > 0
        assert "SIGKILL" in str(err) and "out-of-memory" in str(err) and "die_on" in str(err)
        assert pool.map(square, range(4)) == [0, 1, 4, 9]  # replaced, still working
        assert len(pool.pids) == 2


def test_dead_worker_in_map_fails_the_map_not_the_pool(ctx):
    with ctx.Pool(2) as pool:
        with pytest.raises(gilfree.WorkerLostError) as info:
            pool.map(die_on, range(8), chunksize=2)
        assert info.value.item is None  # items are not tracked one by one without a task_timeout
        with pytest.raises(gilfree.WorkerLostError, match=r"item 1 of its chunk") as info:
            pool.map(die_on, [0, 2, 4], chunksize=3, task_timeout=60)
        assert info.value.item == 1
        assert pool.map(square, range(3)) == [0, 1, 4]


def test_os_exit_in_task_is_named(ctx):
    with ctx.Pool(1) as pool:
        with pytest.raises(gilfree.WorkerLostError, match=r"exited with code 7.*os\._exit\(7\)"):
            pool.apply(exit_with, (7,))
        assert pool.apply(square, (3,)) == 9


def test_retry_policy_runs_the_task_again(ctx, tmp_path):
    marker = str(tmp_path / "died")
    with ctx.Pool(2, on_worker_death="retry", retries=2) as pool:
        assert pool.apply(die_once, (marker, 5)) == 5
    with ctx.Pool(1) as pool:
        # retries exhausted: fails, naming the attempts
        with pytest.raises(gilfree.WorkerLostError, match="each of 3 attempts"):
            pool.apply(die_on, (2,), on_worker_death="retry", retries=2)


def test_break_policy_fails_everything_unfinished(ctx):
    with ctx.Pool(1, on_worker_death="break") as pool:
        slow = [pool.apply_async(sleep_then, (i, 0.2)) for i in range(3)]
        doomed = pool.apply_async(die_on, (2,))
        after = pool.apply_async(square, (3,))
        assert [r.get(30) for r in slow] == [0, 1, 2]
        with pytest.raises(gilfree.BrokenPoolError) as info:  # the running task too, naming the death
            doomed.get(30)
        assert isinstance(info.value.__cause__, gilfree.WorkerLostError)
        with pytest.raises(gilfree.BrokenPoolError):
            after.get(30)
        with pytest.raises(gilfree.BrokenPoolError):
            pool.apply(square, (1,))


def test_task_timeout_kills_and_replaces(ctx):
    with ctx.Pool(2, task_timeout=0.5) as pool:
        t0 = time.monotonic()
        with pytest.raises(gilfree.TaskTimeoutError, match="task_timeout=0.5") as info:
            pool.apply(sleep_then, (1, 30))
        assert time.monotonic() - t0 < 10
        assert isinstance(info.value, gilfree.TimeoutError)
        # the replacement works (a per-call timeout overrides the pool's: a loaded machine may
        # stretch even a short task, and this line checks the worker, not the clock)
        assert pool.apply(sleep_then, (2, 0.01), task_timeout=60) == 2
        # per call, and per item of a chunk
        with pytest.raises(gilfree.TaskTimeoutError, match="item 1"):
            pool.map(sleep_for, [0.0, 30], chunksize=2, task_timeout=0.3)


def test_maxtasksperchild_recycles_without_loss(ctx):
    with ctx.Pool(2, maxtasksperchild=3) as pool:
        results = pool.map(pid_of, range(30), chunksize=1)
    assert len(results) == 30
    assert len(set(results)) >= 10  # 30 tasks, 3 per worker


def test_max_memory_per_child_recycles(ctx):
    with ctx.Pool(1, max_memory_per_child=200 << 20) as pool:
        first = pool.apply(grow_memory, (300,))
        second = pool.apply(pid_of)
        assert first != second
        assert pool.apply(pid_of) == second


def test_unpicklable_result_is_an_error(ctx):
    with ctx.Pool(1) as pool:
        with pytest.raises(MaybeEncodingError, match="Error sending result"):
            pool.apply(unpicklable_result)
        assert pool.apply(square, (4,)) == 16


def test_unpicklable_argument_is_an_error(ctx):
    with ctx.Pool(1) as pool:
        with pytest.raises(TypeError):
            pool.apply(square, (threading.Lock(),))
        assert pool.apply(square, (4,)) == 16


@pytest.mark.parametrize("kind", ["exit", "interrupt"])
def test_base_exception_fails_the_task_only(ctx, kind):
    with ctx.Pool(1) as pool:
        with pytest.raises((SystemExit, KeyboardInterrupt)):
            pool.apply_async(raise_base, (kind,)).get(30)
        assert pool.apply(square, (5,)) == 25


def test_endless_generator_through_imap_is_lazy(ctx):
    pulled = itertools.count()
    source = (next(pulled) for _ in itertools.count())
    with ctx.Pool(2) as pool:
        it = pool.imap(square, source)
        got = [next(it) for _ in range(2000)]
        assert got == [x * x for x in range(2000)]
        ahead = next(pulled) - 2000
        assert ahead < 50_000  # bounded: chunks in flight, not the whole (endless) input
        unordered = pool.imap_unordered(square, itertools.count())
        assert len([next(unordered) for _ in range(500)]) == 500


def test_imap_input_error_is_raised_in_turn(ctx):
    def source():
        yield 1
        yield 2
        raise RuntimeError("input broke")

    with ctx.Pool(2) as pool:
        it = pool.imap(square, source())
        assert next(it) == 1 and next(it) == 4
        with pytest.raises(RuntimeError, match="input broke"):
            next(it)


def test_large_numpy_arguments_and_results_through_shared_memory(ctx):
    np = pytest.importorskip("numpy")
    a = np.arange(2_000_000, dtype=np.float64)  # 16 MB
    with ctx.Pool(1) as pool:
        total, writeable = pool.apply(array_sum, (a,))
        assert total == float(a.sum()) and writeable
        doubled = pool.apply(array_double, (a,))
        assert (doubled == a * 2).all()
        for _ in range(3):  # the memfds are reused
            assert pool.apply(array_sum, (a,))[0] == total


def test_progress_bar(ctx, capsys):
    pytest.importorskip("tqdm")
    with ctx.Pool(2) as pool:
        assert pool.map(square, range(40), progress=True) == [x * x for x in range(40)]
        assert list(pool.imap(square, range(10), progress={"desc": "imapping"})) == [x * x for x in range(10)]
    err = capsys.readouterr().err
    assert "40/40" in err and "imapping" in err and "10/10" in err


def test_progress_without_tqdm_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with gilfree.get_context("fork").Pool(1) as pool:
        with pytest.raises(ImportError, match=r"gilfree\[tqdm\]"):
            pool.map(square, range(3), progress=True)


def test_repr(ctx):
    pool = ctx.Pool(2)
    try:
        assert "state=RUN" in repr(pool) and "pool_size=2" in repr(pool)
        it = pool.imap(square, range(3))
        assert "IMapIterator" in repr(it) and "(auto)" in repr(it)
        list(it)
    finally:
        pool.terminate()
    assert "state=TERMINATE" in repr(pool) or "state=CLOSE" in repr(pool)


def test_pool_cannot_be_pickled(ctx):
    import pickle

    with ctx.Pool(1) as pool:
        with pytest.raises(NotImplementedError):
            pickle.dumps(pool)


# ---------------------------------------------------------------------------------------------
# Ctrl-C, and a parent that is killed


CTRL_C_PROGRAM = """
import os, sys, time

def slow(x):
    time.sleep(60)
    return x

if __name__ == "__main__":
    pool = multiprocessing.Pool(2)
    print("pids", *pool.pids, flush=True)
    try:
        pool.map(slow, range(4))
    except KeyboardInterrupt:
        print("interrupted once", flush=True)
        sys.exit(1)
"""


def test_ctrl_c_during_map_gives_one_keyboard_interrupt(method, tmp_path):
    import subprocess

    path = write_program(tmp_path, CTRL_C_PROGRAM, method=method)
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "src"))
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("pids"), (line, proc.stderr.read() if proc.poll() is not None else "")
        pids = [int(p) for p in line.split()[1:]]
        time.sleep(0.5)  # the map is running
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the whole process group
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "interrupted once" in out
    assert err.count("KeyboardInterrupt") == 0, err  # no traceback from any worker
    for pid in pids:
        assert not _alive(pid), f"worker {pid} outlived the program"


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


KILLED_PARENT_PROGRAM = """
import os, time

def slow(x):
    time.sleep(60)

if __name__ == "__main__":
    pool = multiprocessing.Pool(2)
    pool.map_async(slow, range(4))
    print("pids", *pool.pids, flush=True)
    time.sleep(60)
"""


def test_no_orphans_when_the_parent_is_killed(method, tmp_path):
    import subprocess

    path = write_program(tmp_path, KILLED_PARENT_PROGRAM, method=method)
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "src"))
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()[1:]]
        assert len(pids) == 2
        proc.kill()
        proc.wait(30)
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_seed_style_program_without_close(method, tmp_path):
    program = write_program(tmp_path, """
    def square(n):
        return n * n

    if __name__ == "__main__":
        p = multiprocessing.Pool()
        print(p.map(square, [1, 2, 3]))
    """, method=method)
    result = run_program(program)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[1, 4, 9]\n"


# ---------------------------------------------------------------------------------------------
# ThreadPool and gilfree.dummy


def test_thread_pool_passes_objects_unpickled():
    lock = threading.Lock()
    with ThreadPool(3) as pool:
        assert pool.map(lambda x: x is lock, [lock, None]) == [True, False]
        assert pool.apply(threading.get_ident) != threading.get_ident()
        with pytest.raises(ValueError, match="bad item 3") as info:
            pool.apply(fail_on, (3,))
        assert info.value.__traceback__ is not None
        assert list(pool.imap(square, range(5))) == [0, 1, 4, 9, 16]
    with pytest.raises(ValueError, match="task_timeout"):
        gilfree.pool.ThreadPool(1).apply(square, (1,), task_timeout=1)


def test_dummy_module_matches_stdlib_dummy():
    import multiprocessing.dummy as std_dummy

    from gilfree import dummy

    for name in std_dummy.__all__:
        assert hasattr(dummy, name), name
    with dummy.Pool(2) as pool:
        assert pool.map(square, range(4)) == [0, 1, 4, 9]
    results = []
    p = dummy.Process(target=results.append, args=(1,))
    p.start()
    p.join()
    assert results == [1] and p.exitcode == 0
    a, b = dummy.Pipe()
    a.send("x")
    assert b.poll(1) and b.recv() == "x"
    ns = dummy.Manager().Namespace(x=1)
    assert ns.x == 1


# ---------------------------------------------------------------------------------------------
# ProcessPoolExecutor


def test_executor_submit_map_shutdown(method):
    with ProcessPoolExecutor(2, mp_context=gilfree.get_context(method)) as ex:
        assert ex.submit(add, 1, b=2).result(30) == 3
        assert list(ex.map(add, range(5), range(5), chunksize=2)) == [0, 2, 4, 6, 8]
        assert ex.submit(lambda: "lambda").result(30) == "lambda"
        with pytest.raises(ValueError, match="bad item 3"):
            ex.submit(fail_on, 3).result(30)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(add, 1, 2)


def test_executor_worker_death_fails_one_future(method):
    with ProcessPoolExecutor(2, mp_context=method, on_worker_death="fail") as ex:  # the default is "break"
        futures = [ex.submit(die_on, i) for i in range(4)]
        with pytest.raises(gilfree.WorkerLostError):
            futures[2].result(30)
        assert [f.result(30) for i, f in enumerate(futures) if i != 2] == [0, 1, 3]
    with ProcessPoolExecutor(1, mp_context=method, on_worker_death="break") as ex:
        doomed = ex.submit(die_on, 2)
        with pytest.raises(BrokenProcessPool) as info:  # as the stdlib: the running future too
            doomed.result(30)
        assert isinstance(info.value.__cause__, gilfree.WorkerLostError)
        later = ex.submit(square, 2) if ex._engine.broken is None else None
        if later is not None:
            with pytest.raises(BrokenProcessPool):
                later.result(30)
        with pytest.raises(BrokenProcessPool):
            ex.submit(square, 2)


def test_executor_cancel_futures_and_map_timeout():
    import concurrent.futures as cf

    ex = ProcessPoolExecutor(1, mp_context="fork")
    running = ex.submit(sleep_then, 1, 0.5)
    queued = [ex.submit(sleep_then, i, 0.5) for i in range(10)]
    deadline = time.monotonic() + 10
    while not running.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    ex.shutdown(wait=True, cancel_futures=True)
    assert running.result() == 1
    assert sum(f.cancelled() for f in queued) >= 7
    with ProcessPoolExecutor(1, mp_context="fork") as ex:
        with pytest.raises(cf.TimeoutError):
            list(ex.map(sleep_then, [1, 2], [5, 5], timeout=0.2))


def test_stdlib_context_is_accepted(method):
    with gilfree.pool.Pool(1, context=std_mp.get_context(method)) as pool:
        assert pool._ctx is gilfree.get_context(method)
        assert pool.map(square, [2, 3]) == [4, 9]


class _NotImportableInWorkers:
    def __reduce__(self):
        return (_fail_to_rebuild, ())


def _fail_to_rebuild():
    raise ImportError("no such module in the worker")


def test_function_that_cannot_be_unpickled_fails_each_task_clearly(ctx):
    import functools

    func = functools.partial(add, _NotImportableInWorkers())
    with ctx.Pool(1) as pool:
        for _ in range(2):
            with pytest.raises(RuntimeError, match="could not unpickle the function: ImportError"):
                pool.apply(func, (1,))
        assert pool.apply(square, (3,)) == 9
