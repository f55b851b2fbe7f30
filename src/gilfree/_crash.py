"""Crash points: named steps of gilfree's protocols where a test makes a process die (layer L0).

Every protocol that more than one process takes part in (a lock, a queue record, a pool slot) is a
sequence of steps, and a process may be SIGKILLed between any two of them.  Each step boundary is
marked in the code with a name::

    if _crash.on:
        _crash.hit("queue.get.consumed")          # Python

    GF_CRASH_POINT("lock.acquire.taken");         /* C (gilfree/_crash.h) */

and the crash-point tests enumerate those names from the sources, make a process die exactly there
(or stop there, alive, or raise ``KeyboardInterrupt`` there as a signal handler would), and check
what the survivors see.  When nothing is armed -- always, outside those tests -- a point costs one
test of a module attribute (Python) or one predictable branch (C).

Arm with :func:`arm` in the process that should die (it arms the C extensions that are loaded too),
or for a whole process tree with ``GILFREE_CRASH_AT="name[:skip[:action]]"`` in the environment,
read when this module and the extensions load.  ``skip`` lets that many hits pass first.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["on", "arm", "disarm", "hit", "ACTIONS"]

#: What an armed point does: die (SIGKILL), stop (SIGSTOP, resumed by SIGCONT), or raise
#: KeyboardInterrupt (Python points only: what a signal handler can do between two bytecodes).
ACTIONS = {"kill": 1, "stop": 2, "interrupt": 3}
_C_MODULES = ("gilfree._csync", "gilfree._cqueue")

on = False
_name = ""
_skip = 0
_action = 1


def arm(name: str, skip: int = 0, action: str = "kill") -> None:
    """Make this process die (or stop, or be interrupted) at the point ``name``, after ``skip`` hits."""
    global on, _name, _skip, _action
    code = ACTIONS[action]
    on = False
    _name, _skip, _action = name, max(0, skip), code
    on = bool(name)
    for modname in _C_MODULES:  # only those loaded: arming must not import anything
        module = sys.modules.get(modname)
        if module is not None:
            module._arm_crash(name if code != 3 else "", skip, code)


def disarm() -> None:
    arm("")


def hit(name: str) -> None:
    """A crash point in Python code (call only under ``if _crash.on:``)."""
    global _skip, on
    if name != _name:
        return
    if _skip > 0:
        _skip -= 1
        return
    if _action == 1:
        os.kill(os.getpid(), signal.SIGKILL)
        while True:  # pragma: no cover - the signal is on its way
            signal.pause()
    on = False  # once
    if _action == 2:
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    raise KeyboardInterrupt(f"crash point {name}")


def _from_env() -> None:
    spec = os.environ.get("GILFREE_CRASH_AT")
    if not spec:
        return
    name, _, rest = spec.partition(":")
    skip, _, action = rest.partition(":")
    arm(name, int(skip or 0), action or "kill")


_from_env()
