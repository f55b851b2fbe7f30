"""Test fixtures: start-method parametrization and the leak check every test runs under.

The pytest process makes itself a *child subreaper*, so a grandchild orphaned by a test (a child
program's children, a fork server's children) is re-parented to pytest and shows up in the check.
After each test, every process that is still a child of pytest (or of gilfree's fork server) and
every new entry in ``/dev/shm`` is a leak: the test fails.  Leftover processes are killed at once;
leaked ``/dev/shm`` entries are removed when the session ends (an entry that appeared during a test
may belong to another program on the machine, which must not lose it mid-run).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

import pytest
from _helpers import INFRA_SESSIONS, session_members, session_shm

import gilfree
from gilfree import _tracker
from gilfree._start import forkserver

METHODS = ["fork", "spawn", "forkserver"]
_PR_SET_CHILD_SUBREAPER = 36
SHM = "/dev/shm"


def _set_subreaper() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except OSError:
        pass


_set_subreaper()


def _proc_children(parents: set[int]) -> dict[int, tuple[str, str]]:
    """{pid: (state, cmdline)} of the processes whose parent is in ``parents``."""
    return gilfree.util.children_of(parents)


def _infrastructure() -> set[int]:
    """Long-lived helpers that belong to the session, not to a test."""
    pids = set()
    if forkserver.pid:
        pids.add(forkserver.pid)
    tracker = _tracker.tracker_pid()  # the shared-memory tracker, once a test created a segment
    if tracker:
        pids.add(tracker)
    mp = sys.modules.get("multiprocessing.forkserver")
    if mp is not None and getattr(mp._forkserver, "_forkserver_pid", None):
        pids.add(mp._forkserver._forkserver_pid)
    rt = sys.modules.get("multiprocessing.resource_tracker")
    if rt is not None and getattr(rt._resource_tracker, "_pid", None):
        pids.add(rt._resource_tracker._pid)
    pids |= session_members(INFRA_SESSIONS)  # the clusters of test_backends (session fixtures)
    return pids


def leftover_processes(wait: float = 5.0) -> dict[int, tuple[str, str]]:
    """Children (and fork-server children) still running after ``wait`` seconds; zombies are reaped."""
    deadline = time.monotonic() + wait
    me = os.getpid()
    while True:
        infra = _infrastructure()
        parents = {me} | ({forkserver.pid} if forkserver.pid else set())
        found = {pid: v for pid, v in _proc_children(parents).items() if pid not in infra}
        for pid, (state, _) in list(found.items()):
            if state == "Z" and pid not in _tracked_pids():
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                found.pop(pid)
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


def _tracked_pids() -> set[int]:
    return {p._popen.pid for p in gilfree.process._children if p._popen is not None}


def _shm_entries() -> set[str]:
    try:
        return set(os.listdir(SHM))
    except OSError:
        return set()


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Fail a test that leaves a process, a shared-memory segment or a semaphore behind."""
    before_shm = _shm_entries()
    yield
    problems = []
    left = leftover_processes()
    if left:
        problems.append("processes left running: " + "; ".join(f"pid {p} [{s}] {c}" for p, (s, c) in left.items()))
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in list(gilfree.process._children):
            p.join(5)
        leftover_processes(2.0)
    # entries mapped by a session fixture's cluster (test_backends: Dask's nannies keep the stdlib's
    # named semaphores there while they run) are the cluster's, which removes them when it stops
    new_shm = _shm_entries() - before_shm - session_shm(INFRA_SESSIONS)
    if new_shm:
        problems.append(f"left in {SHM}: {sorted(new_shm)}")
        # removed at the end of the session, not now: an entry may belong to another program
        # running on this machine (a concurrent test session), which must not lose it mid-test
        _leaked_shm.update(new_shm)
    if problems:
        pytest.fail("leak check: " + " | ".join(problems), pytrace=False)


@pytest.fixture(params=METHODS)
def method(request) -> str:
    return request.param


@pytest.fixture
def ctx(method):
    """A gilfree context for each start method."""
    return gilfree.get_context(method)


_leaked_shm: set[str] = set()


def pytest_sessionfinish(session, exitstatus):
    forkserver.stop()
    for name in _leaked_shm:
        try:
            os.unlink(os.path.join(SHM, name))
        except OSError:
            pass
