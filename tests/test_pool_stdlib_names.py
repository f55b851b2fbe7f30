"""Pool behaviour that programs (and CPython's own tests) rely on beyond the documented API: the
stdlib pool's private names (``_pool``, ``_state``, ``_processes``, ``_repopulate_pool``), the
unclosed-pool warning, where imap raises the error of its input, and a pool whose workers fail to
start.  Each scenario runs on the stdlib and on gilfree, and both must behave the same."""

from __future__ import annotations

import gc
import multiprocessing as std_mp
import multiprocessing.pool as std_pool
import os
import time
import unittest.mock
import warnings

import pytest

import gilfree
import gilfree.pool as gf_pool


def square(x):
    return x * x


class SayWhen(ValueError):
    pass


def failing_input(total, when):
    for i in range(total):
        if i == when:
            raise SayWhen(f"the input failed at {i}")
        yield i


@pytest.fixture(params=["stdlib", "gilfree"])
def impl(request, method):
    """(context, pool module) of the stdlib or of gilfree, for each start method."""
    if request.param == "stdlib":
        yield std_mp.get_context(method), std_pool
        gc.collect()  # a stdlib pool and its imap iterators form cycles: its named semaphores go with them
    else:
        yield gilfree.get_context(method), gf_pool


def _wait_until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- _pool, _processes -----------------------------------------------------------------------------


def test_pool_lists_the_worker_processes(impl):
    ctx, _ = impl
    with ctx.Pool(3) as pool:
        assert pool._processes == 3
        workers = list(pool._pool)
        assert len(workers) == 3
        pids = [p.pid for p in workers]
        assert None not in pids and len(set(pids)) == 3
        assert all(p.is_alive() for p in workers)
        assert set(pool.map(_pid, range(12), chunksize=1)) <= set(pids)
        if ctx.__module__.startswith("gilfree"):
            assert sorted(pids) == sorted(pool.pids)


def _pid(_):
    return os.getpid()


def test_workers_that_left_the_pool_stay_usable(impl):
    # a caller holding pool._pool from before the workers were recycled may still ask them
    # is_alive(), exitcode, join() (the stdlib never closes them; gilfree did)
    ctx, _ = impl
    pool = ctx.Pool(2, maxtasksperchild=1)
    try:
        first = list(pool._pool)  # the stdlib changes its list in place
        assert pool.map(square, range(6), chunksize=1) == [x * x for x in range(6)]
        assert _wait_until(lambda: not any(p.is_alive() for p in first))
        for p in first:
            p.join(5)
            assert p.exitcode == 0
            assert not p.is_alive()
        # the pool keeps its size, with other processes
        assert _wait_until(lambda: len(pool._pool) == 2 and all(p.is_alive() for p in pool._pool))
        assert not {p.pid for p in first} & {p.pid for p in pool._pool}
    finally:
        pool.terminate()
        pool.join()


def test_repopulate_pool_keeps_the_pool_full(impl):
    ctx, _ = impl
    pool = ctx.Pool(3, maxtasksperchild=2)
    try:
        before = sorted(p.pid for p in pool._pool)
        results = [pool.apply_async(square, (i,)) for i in range(30)]
        assert [r.get(30) for r in results] == [i * i for i in range(30)]
        pool._repopulate_pool()
        assert _wait_until(lambda: len(pool._pool) == 3 and all(p.is_alive() for p in pool._pool))
        assert sorted(p.pid for p in pool._pool) != before
    finally:
        pool.close()
        pool.join()


def test_thread_pool_lists_its_threads():
    for module in (std_pool, gf_pool):
        pool = module.ThreadPool(3)
        try:
            assert len(pool._pool) == 3
            assert all(t.is_alive() for t in pool._pool)
        finally:
            pool.close()
            pool.join()


# -- _state and the unclosed-pool warning ----------------------------------------------------------


def test_state_follows_close_and_terminate(impl):
    ctx, module = impl
    pool = ctx.Pool(1)
    assert pool._state == module.RUN == "RUN"
    pool.close()
    assert pool._state == module.CLOSE == "CLOSE"
    pool.join()
    assert pool._state == module.CLOSE
    pool = ctx.Pool(1)
    pool.terminate()
    assert pool._state == module.TERMINATE == "TERMINATE"
    pool.join()


@pytest.mark.parametrize("kind", ["Pool", "ThreadPool"])
def test_a_pool_collected_in_state_run_warns_with_the_stdlib_text(impl, kind):
    # what CPython's test_resource_warning does: a finished pool forced back to RUN must warn as
    # unclosed, in the stdlib's words (code importing gilfree as multiprocessing matches them)
    ctx, module = impl
    pool = ctx.Pool(1) if kind == "Pool" else module.ThreadPool(1)
    pool.terminate()
    pool.join()
    pool._state = module.RUN
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pool = None
        gc.collect()
    messages = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert len(messages) == 1
    assert messages[0].startswith("unclosed running multiprocessing pool <")


def test_a_closed_pool_does_not_warn(impl):
    ctx, _ = impl
    pool = ctx.Pool(1)
    pool.close()
    pool.join()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pool = None
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


# -- imap: the input raises --------------------------------------------------------------------------


@pytest.mark.parametrize("chunksize, before", [(1, 7), (2, 6), (4, 4), (7, 7)])
def test_imap_raises_the_input_error_after_the_whole_chunks_before_it(impl, chunksize, before):
    # the chunk the input failed in is not run: its items before the failure are not delivered
    ctx, _ = impl
    with ctx.Pool(2) as pool:
        it = pool.imap(square, failing_input(20, 7), chunksize)
        assert [next(it) for _ in range(before)] == [x * x for x in range(before)]
        with pytest.raises(SayWhen):
            next(it)


@pytest.mark.parametrize("chunksize, before", [(1, 7), (2, 6), (4, 4)])
def test_imap_unordered_raises_the_input_error_after_the_whole_chunks_before_it(impl, chunksize, before):
    ctx, module = impl
    with ctx.Pool(2) as pool:
        it = pool.imap_unordered(square, failing_input(20, 7), chunksize)
        got = []
        with pytest.raises(SayWhen):
            for value in it:
                got.append(value)
        # only results of the whole chunks; the stdlib may raise before some of them arrive, gilfree
        # raises once they all have
        assert set(got) <= {x * x for x in range(before)}
        if module is gf_pool:
            assert sorted(got) == [x * x for x in range(before)]


def test_imap_automatic_chunks_deliver_every_item_read_before_the_input_error(ctx):
    # gilfree's default chunksize=None: as the stdlib's default chunksize=1 does, every item the
    # input gave before failing is delivered, then the error
    with ctx.Pool(2) as pool:
        for when in (0, 1, 7, 100):
            it = pool.imap(square, failing_input(200, when))
            assert [next(it) for _ in range(when)] == [x * x for x in range(when)]
            with pytest.raises(SayWhen):
                next(it)


# -- workers that fail to start ----------------------------------------------------------------------


def test_a_failed_worker_start_stops_the_started_ones_and_raises(impl):
    # CPython's TestPoolNotLeakOnFailure: a context (by duck typing) whose 4th process fails to start
    _, module = impl
    made = []
    left = [3]

    class FailingProcess:
        def __init__(self, **kwargs):
            self.name = "Fake Process"
            self.exitcode = None
            self.state = None
            made.append(self)

        def start(self):
            if left[0] <= 0:
                raise OSError("start failed on purpose")
            left[0] -= 1
            self.state = "started"

        def terminate(self):
            self.state = "stopping"

        def join(self):
            if self.state == "stopping":
                self.state = "stopped"

        def is_alive(self):
            return self.state in ("started", "stopping")

    with pytest.raises(OSError, match="start failed on purpose"):
        module.Pool(5, context=unittest.mock.MagicMock(Process=FailingProcess))
    assert len(made) == 4
    assert not any(p.is_alive() for p in made)


def test_a_stdlib_context_still_runs_gilfree_workers(method):
    with gf_pool.Pool(2, context=std_mp.get_context(method)) as pool:
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]
        assert all(isinstance(p, gilfree.process.BaseProcess) for p in pool._pool)
