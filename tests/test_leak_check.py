"""The leak check of ``conftest`` on a busy machine: other programs' ``/dev/shm`` entries are not this
run's leaks, and this run's real leaks are still caught.

Each test runs a small pytest session of its own (a run with its own ``GILFREE_SHM_PREFIX``) under the
same ``conftest``, and looks at its outcome.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

pytestmark = pytest.mark.timeout(300)

# An unrelated program: creates and removes /dev/shm entries in a loop, under every name the leak
# check cares about (the stdlib's psm_/sem.mp-, gilfree's gf_/gfq without and with another prefix),
# keeping each for 0-300 ms, so that entries appear during a test and outlive it.
NOISE = r"""
import mmap, os, random, signal, sys, time
made = {}
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
rng = random.Random()
def gone(n):
    try:
        os.unlink("/dev/shm/" + n)
    except FileNotFoundError:
        pass  # a test session of an older gilfree removes what it took for its own leaks

kinds = ["psm_", "sem.mp-", "gf_", "gfq%08x_" % rng.getrandbits(32), "gtzzzzzz_gf_"]
open("%s" % sys.argv[1], "w").close()  # started
while not stop:
    name = rng.choice(kinds) + os.urandom(4).hex()
    path = "/dev/shm/" + name
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, 4096)
    made[name] = (mmap.mmap(fd, 4096) if rng.random() < 0.5 else None, time.monotonic() + rng.uniform(0, 0.3))
    os.close(fd)
    for n, (m, until) in list(made.items()):
        if time.monotonic() > until:
            gone(n)
            del made[n]
    time.sleep(0.005)
for n in made:
    gone(n)
"""


def _pytest(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("GILFREE_SHM_PREFIX", None)  # the inner run's conftest draws its own anyway
    env.pop("PYTEST_ADDOPTS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)


def test_other_programs_shm_traffic_does_not_fail_the_leak_check(tmp_path):
    started = tmp_path / "started"
    noise = subprocess.Popen([sys.executable, "-c", NOISE, str(started)], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert started.exists() and noise.poll() is None
        time.sleep(0.3)  # entries come and go from now on
        res = _pytest([
            "tests/test_shared_memory.py::test_create_write_attach",
            "tests/test_shared_memory.py::test_shareable_list_matches_stdlib",
            "tests/test_queues.py::test_spill_chain_interleaved",
            "tests/test_queues.py::test_unread_segments_are_removed_with_the_queue",
            "tests/test_queues.py::test_producer_killed_before_publishing_leaves_no_segment",
        ], cwd=ROOT)
        assert noise.poll() is None, "the unrelated program stopped early"
    finally:
        noise.send_signal(signal.SIGTERM)
        noise.wait(30)
    assert noise.returncode == 0
    assert res.returncode == 0 and "leak check" not in res.stdout, res.stdout[-3000:]
    assert re.search(r"\b\d+ passed", res.stdout), res.stdout[-3000:]


LEAKY = '''
import multiprocessing
import time
from multiprocessing import resource_tracker
from multiprocessing import shared_memory as std_shm

import gilfree
from gilfree import shared_memory as gf_shm

kept = []


def test_leaks_a_gilfree_segment():
    kept.append(gf_shm.SharedMemory(create=True, size=10, track=False))


def test_leaks_a_stdlib_segment():
    shm = std_shm.SharedMemory(create=True, size=10)
    resource_tracker.unregister(shm._name, "shared_memory")  # nobody cleans up after us
    kept.append(shm)


def _leak_in_child(conn):
    shm = std_shm.SharedMemory(create=True, size=10)
    resource_tracker.unregister(shm._name, "shared_memory")
    conn.send(shm.name)
    time.sleep(0.3)  # mapped for a while, then the process ends without unlink()


def test_leaks_a_stdlib_segment_in_a_child():
    ctx = gilfree.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_leak_in_child, args=(child,))
    p.start()
    assert parent.poll(30)
    parent.recv()
    p.join(30)
    assert p.exitcode == 0


def test_clean():
    shm = gf_shm.SharedMemory(create=True, size=10)
    shm.close()
    shm.unlink()
'''


def test_a_leak_of_this_run_is_caught(tmp_path):
    (tmp_path / "test_leaky.py").write_text(textwrap.dedent(LEAKY))
    res = _pytest(["-p", "conftest", "-p", "no:randomly", "test_leaky.py"], cwd=tmp_path)
    out = res.stdout
    assert res.returncode != 0, out[-3000:]
    for name in ("test_leaks_a_gilfree_segment", "test_leaks_a_stdlib_segment",
                 "test_leaks_a_stdlib_segment_in_a_child"):
        assert re.search(rf"ERROR at teardown of {name} _+\nleak check: left in /dev/shm", out), out[-3000:]
    assert "test_clean" not in out, out[-3000:]
    assert re.search(r"\b4 passed, .*\b3 errors\b", out), out[-3000:]


# -- the clusters' watchdog: a test runner killed with SIGKILL leaves no cluster behind ---------

RUNNER = r"""
import os, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from _helpers import SessionReaper

reaper = SessionReaper()
sessions = []
for watched in (True, False):
    # a "cluster": a program in a session of its own that forks a grandchild, as Ray's head does
    p = subprocess.Popen(["sh", "-c", "sleep 120 & sleep 120"], start_new_session=True)
    if watched:
        reaper.watch(p.pid)
    sessions.append(p.pid)
print(reaper.proc.pid, *sessions, flush=True)
time.sleep(120)
"""


def _members(sid: int) -> set[int]:
    from _helpers import session_members

    return {pid for pid in session_members({sid}) if not _zombie(pid)}


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return True


def test_a_killed_runner_leaves_no_watched_session_behind():
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, str(TESTS)], stdout=subprocess.PIPE, text=True)
    try:
        reaper_pid, watched, unwatched = map(int, runner.stdout.readline().split())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (len(_members(watched)) < 2 or len(_members(unwatched)) < 2):
            time.sleep(0.05)
        assert len(_members(watched)) >= 2 and len(_members(unwatched)) >= 2  # sh and its children
        runner.kill()  # as SIGKILL to pytest: no fixture teardown runs
        runner.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _members(watched):
            time.sleep(0.05)
        assert not _members(watched), "the watched session outlived the killed runner"
        assert len(_members(unwatched)) >= 2  # the control: nothing else would have killed them
    finally:
        runner.kill()
        runner.wait(10)
        from _helpers import session_members

        leftovers = session_members({watched, unwatched, reaper_pid}) if "watched" in locals() else set()
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # they were re-parented to this pytest (a child subreaper): reap them
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                if not any(not _zombie(p) for p in leftovers) and not _pending_zombies(leftovers):
                    break
                time.sleep(0.05)


def _pending_zombies(pids: set[int]) -> bool:
    return any(os.path.exists(f"/proc/{p}") for p in pids)
