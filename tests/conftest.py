"""Test fixtures: start-method parametrization and the leak check every test runs under.

The pytest process makes itself a *child subreaper*, so a grandchild orphaned by a test (a child
program's children, a fork server's children) is re-parented to pytest and shows up in the check.
After each test, every process that is still a child of pytest (or of gilfree's fork server) and
every new entry in ``/dev/shm`` that belongs to this run is a leak: the test fails.  Leftover
processes are killed at once; leaked ``/dev/shm`` entries are removed when the session ends.

Which ``/dev/shm`` entries belong to this run (other programs on the machine, another test session
among them, create and remove entries at the same time; they are none of this run's business):

- every entry whose name starts with this run's prefix: the session sets ``GILFREE_SHM_PREFIX``
  to a random ``gt<6 hex>_`` before gilfree is imported, and every process of the run inherits it
  (children, and the programs the tests run), so every named segment gilfree creates carries it;
- any other entry (the stdlib's ``psm_*`` blocks and ``sem.mp-*`` semaphores of the differential
  tests, a block a test names itself) that a process of this run -- pytest and its descendants --
  was seen mapping during the test: a sampler process (not a thread: pytest must stay
  single-threaded for the tests' forks) looks at their ``/proc/<pid>/maps`` every
  ``SAMPLE_EVERY`` seconds while a test runs, and once more at its end.  The stdlib's names carry
  a random part we cannot set, so a stdlib entry that a process of this run created and left
  without ever mapping it for one sampling period (killed between ``shm_open`` and ``mmap``) is
  missed; nothing is ever counted that a process of this run did not have.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

#: This run's prefix of gilfree's segment names: set before gilfree is imported (util reads it once).
#: Always a new one: a test session run by a test is a run of its own.
RUN_PREFIX = f"gt{os.urandom(3).hex()}_"
os.environ["GILFREE_SHM_PREFIX"] = RUN_PREFIX

import pytest  # noqa: E402
from _helpers import INFRA_SESSIONS, session_members, session_shm  # noqa: E402

import gilfree  # noqa: E402
from gilfree import _tracker  # noqa: E402
from gilfree._start import forkserver  # noqa: E402

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
    if _sampler is not None:
        pids.add(_sampler.proc.pid)  # the leak check's own /dev/shm sampler
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


#: seconds between two looks at what this run's processes map
SAMPLE_EVERY = 0.02


# The sampler is a process of its own, not a thread: a thread in pytest would make every fork a test
# does a fork of a multi-threaded process (a DeprecationWarning from 3.12 on, and a real hazard).
# It reads commands on stdin: b"S" starts a test (forget what was seen), b"E" ends it (one more
# look, then it writes the names seen, NUL-separated, after an 8-byte length).
_SAMPLER = r"""
import os, select, struct, sys
root, every = int(sys.argv[1]), float(sys.argv[2])
me = os.getpid()

def descendants():
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    todo.extend(int(c) for c in f.read().split())
            except (OSError, ValueError):
                continue
    found.discard(me)
    return found

def look(seen):
    for pid in descendants():
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                data = f.read()
        except OSError:
            continue
        start = 0
        while True:
            i = data.find(b" /dev/shm/", start)
            if i < 0:
                break
            end = data.find(b"\n", i)
            end = len(data) if end < 0 else end
            start = end
            name = data[i + 10 : end]
            if not name.endswith(b" (deleted)"):
                seen.add(name)

seen, active = set(), False
while True:
    ready, _, _ = select.select([0], [], [], every if active else None)
    if not ready:
        look(seen)
        continue
    cmd = os.read(0, 1)
    if not cmd:
        break
    if cmd == b"S":
        seen, active = set(), True
        look(seen)
    elif cmd == b"E":
        look(seen)
        active = False
        out = b"\0".join(sorted(seen))
        os.write(1, struct.pack("<Q", len(out)) + out)
"""


class ShmSampler:
    """Collects the ``/dev/shm`` entries that this run's processes map, while a test runs."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-S", "-c", _SAMPLER, str(os.getpid()), str(SAMPLE_EVERY)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)

    def start(self) -> None:
        self.proc.stdin.write(b"S")

    def stop(self) -> set[str]:
        self.proc.stdin.write(b"E")
        n = struct.unpack("<Q", self._read(8))[0]
        data = self._read(n)
        return {os.fsdecode(x) for x in data.split(b"\0")} if data else set()

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.proc.stdout.read(n - len(data))
            if not chunk:
                raise RuntimeError("the /dev/shm sampler of the leak check has ended")
            data += chunk
        return data

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stdout.close()


_sampler: ShmSampler | None = None


def sampler() -> ShmSampler:
    global _sampler
    if _sampler is None or _sampler.proc.poll() is not None:
        _sampler = ShmSampler()
    return _sampler


def ours(entries: set[str], seen: set[str]) -> set[str]:
    """The entries that belong to this run: gilfree's with this run's prefix, or seen mapped by it."""
    return {e for e in entries if e.startswith(RUN_PREFIX) or e in seen}


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Fail a test that leaves a process, a shared-memory segment or a semaphore behind."""
    before_shm = _shm_entries()
    watcher = sampler()
    watcher.start()
    try:
        yield
    finally:
        seen = watcher.stop()
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
    new_shm = ours(_shm_entries() - before_shm, seen) - session_shm(INFRA_SESSIONS)
    if new_shm:
        problems.append(f"left in {SHM}: {sorted(new_shm)}")
        # removed at the end of the session (a process of the test that is still being reaped may
        # be using it)
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
    if _sampler is not None:
        _sampler.close()
    for name in _leaked_shm:
        try:
            os.unlink(os.path.join(SHM, name))
        except OSError:
            pass


# -- network namespaces (root only): a server namespace with a bridge, two client namespaces ----------

def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def netns():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    tag = f"gf{os.getpid() % 100000}"
    names = [f"{tag}s", f"{tag}a", f"{tag}b"]
    bridge = f"{tag}br"
    try:
        probe = _ip("netns", "add", names[0], check=False)
        if probe.returncode != 0:
            pytest.skip(f"cannot create network namespaces here: {probe.stderr.strip()}")
        for ns in names[1:]:
            _ip("netns", "add", ns)
        # a bridge in the server's namespace, one veth pair per client namespace
        _ip("-n", names[0], "link", "add", bridge, "type", "bridge")
        _ip("-n", names[0], "link", "set", bridge, "up")
        _ip("-n", names[0], "addr", "add", "10.231.0.1/24", "dev", bridge)
        for i, ns in enumerate(names[1:], start=2):
            _ip("link", "add", f"{tag}v{i}", "type", "veth", "peer", "name", f"{tag}p{i}")
            _ip("link", "set", f"{tag}v{i}", "netns", ns)
            _ip("link", "set", f"{tag}p{i}", "netns", names[0])
            _ip("-n", names[0], "link", "set", f"{tag}p{i}", "master", bridge)
            _ip("-n", names[0], "link", "set", f"{tag}p{i}", "up")
            _ip("-n", ns, "addr", "add", f"10.231.0.{i}/24", "dev", f"{tag}v{i}")
            _ip("-n", ns, "link", "set", f"{tag}v{i}", "up")
        for ns in names:
            _ip("-n", ns, "link", "set", "lo", "up")
        yield names
    finally:
        for ns in names:
            _ip("netns", "del", ns, check=False)
