"""Helpers for tests that run whole programs, under gilfree and under the stdlib."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def write_program(tmp_path: Path, source: str, module: str = "gilfree", method: str | None = None, name: str = "prog.py") -> Path:
    """Write ``source`` as a program that imports ``module`` as ``multiprocessing``.

    ``source`` uses the name ``multiprocessing``; a ``set_start_method`` line is added if ``method``.
    """
    head = f"import {module} as multiprocessing\n"
    if method:
        head += f"multiprocessing.set_start_method({method!r}, force=True)\n"
    path = tmp_path / name
    path.write_text(head + textwrap.dedent(source))
    return path


def run_program(path: Path | list[str], timeout: float = 60, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a program with this interpreter; return the completed process (text output)."""
    args = [sys.executable, str(path)] if isinstance(path, Path) else [sys.executable, *path]
    full_env = dict(os.environ)
    # block-buffered output, as a user running the program into a pipe or file gets: each process
    # writes what it printed in one piece, so two processes' lines never mix inside a line
    full_env.pop("PYTHONUNBUFFERED", None)
    full_env["PYTHONPATH"] = SRC + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=str(cwd or (path.parent if isinstance(path, Path) else os.getcwd())))


def mask_pids(text: str) -> str:
    return re.sub(r"\b\d{3,}\b", "<N>", text)


#: seconds a test waits for a child to end
WAIT = 30


@contextlib.contextmanager
def running(ctx, target, *args):
    """Start a process; on the way out kill it if it still runs, and join it."""
    p = ctx.Process(target=target, args=args)
    del args  # as after a plain start(), the child's arguments are referenced only by the caller
    p.start()
    try:
        yield p
    finally:
        if p.exitcode is None:
            p.kill()
        p.join(WAIT)
        assert p.exitcode is not None, "child did not end"


#: Sessions (their leader's pid) of long-lived programs a test module started as session fixtures
#: (the Ray and Dask clusters of test_backends): the leak check counts their processes as
#: infrastructure, not as leaks.  Each fixture removes its entry when it has stopped them.
INFRA_SESSIONS: set[int] = set()


def session_members(sessions: set[int]) -> set[int]:
    """The pids of every process in these sessions (from /proc)."""
    found = set()
    if not sessions:
        return found
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[3]) in sessions:  # state, ppid, pgrp, session
            found.add(int(name))
    return found


#: The reaper's program: reads session ids from stdin ("+sid" to watch, "-sid" to forget); when its
#: stdin reads EOF or its parent ends (pidfd), it SIGKILLs every process of the watched sessions,
#: again until none is left (a dying process may still be forking), and exits.
_REAPER = r"""
import os, select, signal, sys, time
parent = int(sys.argv[1])
watched = set()
try:
    pidfd = os.pidfd_open(parent)
except (OSError, AttributeError):
    pidfd = None
buf = b""

def take(chunk):
    global buf
    buf += chunk
    *lines, buf = buf.split(b"\n")
    for line in lines:
        sid = int(line[1:])
        (watched.add if line[:1] == b"+" else watched.discard)(sid)

poller = select.poll()
poller.register(0, select.POLLIN)
if pidfd is not None:
    poller.register(pidfd, select.POLLIN)
done = pidfd is None and os.getppid() != parent  # the parent ended before we looked: reap now
while not done:
    for fd, _ in poller.poll(1000 if pidfd is None else None):
        if fd == pidfd:
            done = True
            continue
        chunk = os.read(0, 4096)
        if not chunk:
            done = True
            continue
        take(chunk)
    if pidfd is None and os.getppid() != parent:
        done = True
os.set_blocking(0, False)  # what the parent wrote before it died may not have been read yet
while True:
    try:
        chunk = os.read(0, 4096)
    except BlockingIOError:  # a forked child of the parent still holds the write end
        break
    if not chunk:
        break
    take(chunk)

def members():
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2:].split()[3]) in watched:
                found.add(int(name))
    return found

end = time.monotonic() + 10
while watched and time.monotonic() < end:
    pids = members()
    if not pids:
        break
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.1)
"""


class SessionReaper:
    """A watchdog process that kills every process of the registered sessions if this one dies.

    The clusters of test_backends run in sessions of their own (``start_new_session``) and fork
    further processes (Ray's raylet and GCS, Dask's nannies); a fixture stops them when the session
    ends, but a test runner killed with SIGKILL runs no fixture.  The reaper, in a session of its own
    (so a Ctrl-C to the terminal's group does not take it first), notices its parent's end through a
    pidfd and the EOF of its stdin, which only this process holds, and kills what was registered.
    """

    def __init__(self) -> None:
        r, w = os.pipe()
        self.proc = subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid())], stdin=r,
                                     start_new_session=True, close_fds=True)
        os.close(r)
        self._w = w

    def watch(self, sid: int) -> None:
        os.write(self._w, f"+{sid}\n".encode())

    def forget(self, sid: int) -> None:
        os.write(self._w, f"-{sid}\n".encode())

    def close(self) -> None:
        """Stop the reaper (it kills what is still registered), and wait for it."""
        if self._w >= 0:
            os.close(self._w)
            self._w = -1
        self.proc.wait(30)


def session_shm(sessions: set[int]) -> set[str]:
    """The /dev/shm entries that processes of these sessions have mapped (their semaphores and
    segments: Dask's nannies use the stdlib's named semaphores)."""
    names = set()
    for pid in session_members(sessions):
        try:
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read()
        except OSError:
            continue
        for line in maps.splitlines():
            path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
            if path.startswith("/dev/shm/"):
                names.add(path[len("/dev/shm/") :].removesuffix(" (deleted)"))
    return names


_CRASH_POINT = re.compile(r'(?:GF_CRASH_POINT|_crash\.hit)\(\s*"([a-z0-9_.]+)"\s*\)')


def crash_points(prefix: str = "") -> list[str]:
    """Every crash point named in gilfree's sources (C and Python) whose name starts with ``prefix``.

    Read from the sources, so that a point added to the code is tested without anyone listing it.
    """
    names: set[str] = set()
    for path in sorted(Path(SRC, "gilfree").rglob("*")):
        if path.suffix in (".py", ".c", ".h") and path.name != "_crash.h":
            names.update(_CRASH_POINT.findall(path.read_text()))
    return sorted(n for n in names if n.startswith(prefix))
