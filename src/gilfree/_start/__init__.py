"""Launchers: how a child process is started (layer L4).

One protocol, three implementations.  A launcher (``Popen`` in the stdlib's terms) is created by
``Process.start()`` with the process object and starts the child at once; it then offers ``pid``,
``sentinel`` (an fd that becomes readable when the child ends), ``poll()``, ``wait(timeout)``,
``terminate()``, ``kill()`` and ``close()``.

========== ============================================ ==========================================
method     how the child starts                         what it costs
========== ============================================ ==========================================
fork       ``os.fork()``; the child is a copy            fastest; unsafe with threads in the parent
spawn      ``posix_spawn`` of a fresh interpreter        an interpreter start + imports
forkserver fork of a server spawned once                 one socket round trip per start
========== ============================================ ==========================================
"""

from __future__ import annotations

from . import _common
from ._common import ChildPopen, get_executable, set_executable
from ._fork import ForkPopen
from ._forkserver import ForkServerPopen, forkserver
from ._spawn import SpawnPopen

__all__ = [
    "LAUNCHERS",
    "ChildPopen",
    "ForkPopen",
    "SpawnPopen",
    "ForkServerPopen",
    "forkserver",
    "get_executable",
    "set_executable",
    "inherited_start_method",
]

LAUNCHERS: dict[str, type[ChildPopen]] = {
    "fork": ForkPopen,
    "spawn": SpawnPopen,
    "forkserver": ForkServerPopen,
}


def inherited_start_method() -> str | None:
    """In a spawned or forkserver child, the start method its parent used; else None."""
    return _common.inherited_start_method
