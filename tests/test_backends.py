"""Pool and ProcessPoolExecutor on Ray and Dask clusters (issue 7).

Session fixtures start real clusters on this machine, on loopback only: a two-node Ray cluster
(nodes at 127.0.0.2 and 127.0.0.3 -- Ray replaces 127.0.0.1 by the machine's network address --
with token authentication on every node and on this driver) and a Dask scheduler with two workers
on 127.0.0.1.  Each program is started in its own session and stopped by killing the processes of
that session (never ``ray stop``: it kills every Ray process on the machine by name).  The cluster
processes import this module by name (PYTHONPATH), as workers of a real deployment import the
user's installed code.
"""

from __future__ import annotations

import concurrent.futures.process as cfp
import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
from _helpers import INFRA_SESSIONS, SRC, SessionReaper, session_members, session_shm

import gilfree
from gilfree.executor import ProcessPoolExecutor
from gilfree.pool import BrokenPoolError, RemoteTraceback

TESTS = str(Path(__file__).resolve().parent)
BIN = os.path.dirname(sys.executable)
START_TIMEOUT = 90.0

# not imported here: Ray reads RAY_AUTH_MODE / RAY_AUTH_TOKEN when it is imported, and the cluster
# fixture sets them first
HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason=f"ray is not installable for Python {sys.version_info[0]}."
                               f"{sys.version_info[1]} here (no wheel)")

# ---------------------------------------------------------------------------------------------
# functions the cluster workers run (imported by name there)


def square(x):
    return x * x


def fail_on(x, bad=3):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def pid_of(_=None):
    return os.getpid()


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


def record_and_sleep(path, seconds):
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return seconds


def add_one_in_place(arr):
    arr += 1  # raises if the array is read-only
    return arr


_INIT_CALLS: dict[str, int] = {}


def count_init(token):
    _INIT_CALLS[token] = _INIT_CALLS.get(token, 0) + 1


def init_count(token):
    time.sleep(0.01)
    return os.getpid(), _INIT_CALLS.get(token, 0)


def failing_init():
    raise RuntimeError("no database here")


# ---------------------------------------------------------------------------------------------
# the clusters


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([TESTS, SRC] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra or {})
    return env


@pytest.fixture(scope="session")
def reaper():
    """Kills the clusters' sessions if this test runner dies without running the fixtures' teardown
    (a SIGKILLed pytest left a Dask scheduler, its workers and a two-node Ray cluster running)."""
    watchdog = SessionReaper()
    INFRA_SESSIONS.add(watchdog.proc.pid)
    try:
        yield watchdog
    finally:
        watchdog.close()
        INFRA_SESSIONS.discard(watchdog.proc.pid)


class _Programs:
    """Programs started each in its own session, stopped by killing every process of those sessions."""

    def __init__(self, logdir: str, reaper: SessionReaper) -> None:
        self.logdir = logdir
        self.reaper = reaper
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(os.path.join(self.logdir, f"{name}.log"), "wb")
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        log.close()
        self.procs.append(proc)
        INFRA_SESSIONS.add(proc.pid)
        self.reaper.watch(proc.pid)
        return proc

    def log(self, name: str) -> str:
        with open(os.path.join(self.logdir, f"{name}.log"), errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        """SIGTERM (they clean up), then SIGKILL what is left; remove what they held in /dev/shm."""
        sessions = {p.pid for p in self.procs}
        shm = session_shm(sessions)
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            pids = session_members(sessions)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and session_members(sessions) - _zombies():
                time.sleep(0.1)
                _reap()
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        _reap()
        INFRA_SESSIONS.difference_update(sessions)
        for sid in sessions:
            self.reaper.forget(sid)
        for name in shm:  # mapped by these processes: theirs, left behind by a SIGKILL
            with contextlib.suppress(OSError):
                os.unlink(os.path.join("/dev/shm", name))


def _zombies() -> set[int]:
    found = set()
    for pid in gilfree.util.children_of({os.getpid()}):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    found.add(pid)
    return found


def _reap() -> None:
    """Reap cluster processes re-parented to pytest (it is a child subreaper, see conftest)."""
    for pid in _zombies():
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


@pytest.fixture(scope="session")
def dask_cluster(reaper):
    """A Dask scheduler and two single-threaded workers on 127.0.0.1; yields the scheduler address."""
    distributed = pytest.importorskip("distributed")
    logdir = tempfile.mkdtemp(prefix="gf-dask-")
    programs = _Programs(logdir, reaper)
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = _cluster_env()
    try:
        programs.start("scheduler", [os.path.join(BIN, "dask"), "scheduler", "--host", "127.0.0.1", "--port",
                                     str(port), "--no-dashboard"], env)
        for i in range(2):
            programs.start(f"worker{i}", [os.path.join(BIN, "dask"), "worker", address, "--nworkers", "1",
                                          "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"], env)
        client = distributed.Client(address, timeout=START_TIMEOUT, set_as_default=False)
        try:
            client.wait_for_workers(2, timeout=START_TIMEOUT)
        finally:
            client.close()
        yield address
    finally:
        programs.stop()
        shutil.rmtree(logdir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(reaper):
    """A two-node Ray cluster (1 CPU each) on 127.0.0.2 / 127.0.0.3 with token authentication on every
    node and on this driver; yields the head's address."""
    if not HAVE_RAY:
        pytest.skip(needs_ray.kwargs["reason"])
    temp = tempfile.mkdtemp(prefix="gf-ray-", dir="/tmp")  # short: Ray puts unix sockets in it
    programs = _Programs(temp, reaper)
    port = _free_port()
    address = f"127.0.0.2:{port}"
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}  # the same on every node
    env = _cluster_env(auth)
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)  # this driver too, before ray is imported (it reads them then)
    import ray

    ray_bin = os.path.join(BIN, "ray")
    common = ["--num-cpus=1", "--block", "--disable-usage-stats"]
    try:
        programs.start("head", [ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.2",
                                "--include-dashboard=false", f"--temp-dir={temp}", *common], env)
        _wait_for(lambda: "Ray runtime started" in programs.log("head"), "the Ray head", programs, "head")
        programs.start("node2", [ray_bin, "start", f"--address={address}", "--node-ip-address=127.0.0.3", *common],
                       env)
        _wait_for(lambda: "Ray runtime started" in programs.log("node2"), "the second Ray node", programs, "node2")
        ray.init(address=address, _node_ip_address="127.0.0.2", include_dashboard=False, configure_logging=False)
        try:
            _wait_for(lambda: sum(n["Alive"] for n in ray.nodes()) == 2, "two live Ray nodes", programs, "node2")
        finally:
            ray.shutdown()
        yield address
    finally:
        programs.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for(condition, what, programs, log) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start within {START_TIMEOUT:g} s; its log:\n{programs.log(log)[-3000:]}")
        time.sleep(0.2)


@pytest.fixture(params=["dask", pytest.param("ray", marks=needs_ray)])
def cluster(request):
    """(backend, address) of each session cluster."""
    if request.param == "ray":
        return "ray", request.getfixturevalue("ray_cluster")
    return "dask", request.getfixturevalue("dask_cluster")


@pytest.fixture
def pool(cluster):
    backend, address = cluster
    with gilfree.Pool(2, backend=backend, address=address) as p:
        yield p
    p.join()


# ---------------------------------------------------------------------------------------------
# the pool API on both engines


def test_map_imap_orders(pool):
    assert pool.map(square, range(50)) == [x * x for x in range(50)]
    assert pool.map(square, range(20), chunksize=1) == [x * x for x in range(20)]
    assert list(pool.imap(square, range(30))) == [x * x for x in range(30)]
    assert list(pool.imap(square, range(30), chunksize=4)) == [x * x for x in range(30)]
    assert sorted(pool.imap_unordered(square, range(30))) == sorted(x * x for x in range(30))
    assert pool.starmap(pow, [(2, 3), (3, 2), (10, 0)]) == [8, 9, 1]
    assert pool.apply(square, (7,)) == 49
    assert pool.map(square, []) == []
    assert pool.map(lambda x: x + 1, [1, 2]) == [2, 3]  # a lambda travels by value


def test_unordered_results_come_as_they_complete(pool):
    # 3 s: longer than Ray takes to start a worker process on a busy machine (it starts them per driver)
    out = list(pool.imap_unordered(sleep_for, [3.0, 0.0], chunksize=1))
    assert out == [0.0, 3.0]


def test_callbacks_in_input_order_and_error_callback(pool):
    got, errors = [], []
    results = [pool.apply_async(square, (i,), callback=got.append) for i in range(6)]
    for r in results:
        r.get(60)
    assert sorted(got) == [i * i for i in range(6)]
    whole = []
    pool.map_async(square, range(10), chunksize=3, callback=whole.append).get(60)
    assert whole == [[x * x for x in range(10)]]
    r = pool.apply_async(fail_on, (3,), error_callback=errors.append)
    with pytest.raises(ValueError, match="bad item 3") as info:
        r.get(60)
    assert errors and errors[0] is info.value
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback) and "fail_on" in str(cause) and 'raise ValueError' in str(cause)


def test_map_error_and_imap_per_item_errors(pool):
    with pytest.raises(ValueError, match="bad item 3") as info:
        pool.map(fail_on, range(8), chunksize=2)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    it = pool.imap(fail_on, range(6), chunksize=3)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad item 3"):
        next(it)
    assert list(it) == [4, 5]  # the chunk's other items still come back


def test_initializer_once_per_process(cluster):
    backend, address = cluster
    token = secrets.token_hex(4)
    with gilfree.Pool(2, initializer=count_init, initargs=(token,), backend=backend, address=address) as p:
        out = p.map(init_count, [token] * 30, chunksize=1)
    assert {count for _, count in out} == {1}, out


def test_initializer_that_raises_breaks_the_pool(cluster):
    backend, address = cluster
    with gilfree.Pool(1, initializer=failing_init, backend=backend, address=address) as p:
        with pytest.raises(RuntimeError, match="no database here"):
            p.apply(square, (2,))
        with pytest.raises(BrokenPoolError, match="initializer raised RuntimeError"):
            p.apply(square, (2,))


class _Bar:
    def __init__(self):
        self.n, self.closed = 0, False

    def update(self, n):
        self.n += n

    def close(self):
        self.closed = True


def test_progress_and_auto_chunking(pool):
    bar = _Bar()
    assert pool.map(square, range(40), progress=bar) == [x * x for x in range(40)]
    assert bar.n == 40 and bar.closed
    bar = _Bar()
    it = pool.imap(square, range(3000), progress=bar)
    assert list(it) == [x * x for x in range(3000)]
    assert bar.n == 3000 and bar.closed
    assert it._size > 8, it  # chunks grew from 1: the tasks report how long they took


def test_numpy_arguments_are_writable(pool):
    np = pytest.importorskip("numpy")
    a = np.zeros(200_000)  # beyond Ray's inline limit: it would come out of the object store read-only
    out = pool.apply(add_one_in_place, (a,))
    assert out.flags.writeable and float(out.sum()) == 200_000.0
    assert float(a.sum()) == 0.0  # the caller's array is untouched
    outs = pool.map(add_one_in_place, [np.zeros(3), np.ones(3)])
    assert [o.tolist() for o in outs] == [[1.0] * 3, [2.0] * 3]


def test_function_goes_to_the_object_store_once_per_call(pool):
    np = pytest.importorskip("numpy")
    big = np.arange(1_000_000, dtype=np.float64)  # 8 MB the function closes over
    backend = pool._engine.backend
    puts = []
    original = backend.put_function
    backend.put_function = lambda pickled: (puts.append(len(pickled)), original(pickled))[1]
    try:
        out = pool.map(lambda i: float(big[i]), range(0, 1_000_000, 50_000), chunksize=1)
    finally:
        del backend.put_function
    assert out == [float(i) for i in range(0, 1_000_000, 50_000)]
    assert len(puts) == 1 and puts[0] > 8_000_000


def test_calls_are_not_deduplicated(pool):
    function = os.urandom  # the same function and arguments every time: Dask would run it once (pure)
    results = [pool.apply_async(function, (8,)) for _ in range(4)]
    assert len({r.get(60) for r in results}) == 4


def test_executor_submit_and_map(cluster):
    backend, address = cluster
    with ProcessPoolExecutor(2, backend=backend, address=address) as ex:
        assert ex.submit(square, 9).result(60) == 81
        assert list(ex.map(square, range(12), chunksize=5)) == [x * x for x in range(12)]
        assert list(ex.map(pow, [2, 3], [5, 2])) == [32, 9]
        future = ex.submit(fail_on, 3)
        with pytest.raises(ValueError, match="bad item 3"):
            future.result(60)
        # the executor chains the worker's traceback as the stdlib's executor does (its class)
        assert type(future.exception().__cause__) is cfp._RemoteTraceback
        assert "state=running" in repr(ex)


def test_repr_and_state(pool, cluster):
    backend, address = cluster
    assert f"on {backend}" in repr(pool._engine) and "state=running" in repr(pool._engine)
    assert "state=RUN" in repr(pool) and "pool_size=2" in repr(pool)
    assert pool.pids == []


# ---------------------------------------------------------------------------------------------
# terminate, lifetimes


def _pids_in(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _wait_running(path: Path, n: int) -> list[int]:
    deadline = time.monotonic() + 60
    while len(_pids_in(path)) < n:
        assert time.monotonic() < deadline, "the tasks did not start"
        time.sleep(0.05)
    return _pids_in(path)


@needs_ray
def test_ray_terminate_stops_running_tasks(ray_cluster, tmp_path):
    path = tmp_path / "pids"
    p = gilfree.Pool(2, backend="ray", address=ray_cluster)
    results = [p.apply_async(record_and_sleep, (str(path), 60)) for _ in range(3)]
    pids = _wait_running(path, 2)
    t0 = time.monotonic()
    p.terminate()
    for r in results:
        with pytest.raises(BrokenPoolError, match="terminated"):
            r.get(10)
    p.join()
    deadline = time.monotonic() + 20
    while any(map(_alive, pids)):  # force=True: Ray killed the workers running them
        assert time.monotonic() < deadline, f"Ray workers {pids} still run their tasks"
        time.sleep(0.1)
    assert time.monotonic() - t0 < 30
    assert len(_pids_in(path)) == 2  # the third task never started


def test_dask_terminate_on_an_existing_cluster(dask_cluster, tmp_path):
    path = tmp_path / "pids"
    p = gilfree.Pool(2, backend="dask", address=dask_cluster)
    results = [p.apply_async(record_and_sleep, (str(path), 1.0)) for _ in range(3)]
    _wait_running(path, 2)
    p.terminate()
    for r in results:
        with pytest.raises(BrokenPoolError, match="terminated"):
            r.get(10)
    p.join()
    assert "state=TERMINATE" in repr(p)
    time.sleep(1.5)  # the running ones finish in the background (documented); leave the workers idle


def test_dask_local_cluster_started_and_stopped_by_the_pool(tmp_path):
    pytest.importorskip("distributed")
    path = tmp_path / "pids"
    p = gilfree.Pool(2, backend="dask")
    assert "(local cluster)" in repr(p._engine)
    assert sorted(p.map(square, range(10))) == [x * x for x in range(10)]
    pids = set(p.map(pid_of, range(20), chunksize=1))
    assert os.getpid() not in pids and len(pids) <= 2
    results = [p.apply_async(record_and_sleep, (str(path), 60)) for _ in range(2)]
    running = _wait_running(path, 2)
    p.terminate()
    for r in results:
        with pytest.raises(BrokenPoolError):
            r.get(10)
    assert p._engine.join(30)
    deadline = time.monotonic() + 20
    while any(map(_alive, running)):  # the pool closed its cluster: the workers are gone
        assert time.monotonic() < deadline, f"local Dask workers {running} still run"
        time.sleep(0.1)
    # and nothing is left: the autouse leak check looks for children of this process


def test_dask_local_cluster_close_and_join():
    pytest.importorskip("distributed")
    with ProcessPoolExecutor(backend="dask") as ex:  # max_workers: the local cluster's
        assert ex._max_workers >= 1
        assert ex.submit(square, 3).result(60) == 9
    assert ex._engine.state == "closed"


@needs_ray
def test_ray_maxtasksperchild_is_max_calls(ray_cluster):
    with gilfree.Pool(2, maxtasksperchild=1, backend="ray", address=ray_cluster) as p:
        pids = p.map(pid_of, range(6), chunksize=1)
    assert len(set(pids)) == 6  # every task in a fresh worker process


def test_dask_maxtasksperchild_warns(dask_cluster):
    with pytest.warns(RuntimeWarning, match="not enforced with backend='dask'"):
        p = gilfree.Pool(1, maxtasksperchild=2, backend="dask", address=dask_cluster)
    with p:
        assert p.map(square, range(4)) == [0, 1, 4, 9]


@needs_ray
def test_ray_shares_the_process_connection(ray_cluster):
    import ray

    with gilfree.Pool(1, backend="ray", address=ray_cluster) as a, gilfree.Pool(1, backend="ray", address=ray_cluster) as b:
        assert a.apply(square, (3,)) == 9 and b.apply(square, (4,)) == 16
        with pytest.raises(ValueError, match="one Ray connection"):
            gilfree.Pool(1, backend="ray", address="127.0.0.9:1")
    a.join()
    b.join()
    assert not ray.is_initialized()  # the last gilfree pool disconnected; the cluster still runs
    with gilfree.Pool(2, backend="ray", address=ray_cluster) as c:
        assert c.map(square, range(4)) == [0, 1, 4, 9]


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("backend, module, extra", [("ray", "ray", "gilfree[ray]"),
                                                     ("dask", "distributed", "gilfree[dask]")])
def test_engine_not_installed(monkeypatch, backend, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    with pytest.raises(ImportError, match=rf"pip install '{extra.replace('[', '.').replace(']', '.')}'"):
        gilfree.Pool(2, backend=backend)
    with pytest.raises(ImportError, match="not installed"):
        ProcessPoolExecutor(2, backend=backend)


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend='spark'"):
        gilfree.Pool(2, backend="spark")
    with pytest.raises(ValueError, match="needs backend='ray' or backend='dask'"):
        gilfree.Pool(2, address="tcp://127.0.0.1:8786")
    with pytest.raises(ValueError, match="needs backend='ray' or backend='dask'"):
        ProcessPoolExecutor(2, address="tcp://127.0.0.1:8786")
    with pytest.raises(ValueError, match="max_memory_per_child=1000 is not supported"):
        gilfree.Pool(2, backend="dask", max_memory_per_child=1000)


def test_task_timeout_refused(dask_cluster):
    with gilfree.Pool(1, backend="dask", address=dask_cluster) as p:
        with pytest.raises(ValueError, match="task_timeout=5 is not supported"):
            p.apply_async(square, (1,), task_timeout=5)


def test_unreachable_dask_scheduler():
    pytest.importorskip("distributed")
    port = _free_port()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConnectionError, match=rf"could not connect to 'tcp://127.0.0.1:{port}'"):
            ProcessPoolExecutor(1, backend="dask", address=f"tcp://127.0.0.1:{port}")
