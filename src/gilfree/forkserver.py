"""``multiprocessing.forkserver``'s public names, over gilfree's fork server (layer L4).

``ensure_running()`` starts this process's fork server (or restarts it if it died) and
``set_forkserver_preload(names)`` sets the modules it imports once; ``_forkserver`` is the server's
handle, whose ``_forkserver_pid`` code reads to watch or signal the server, as with the stdlib's.

The stdlib's ``get_inherited_fds`` and ``connect_to_new_process`` are its own launch protocol (a
child reading its descriptors from the server's socket); gilfree's children are launched by
:mod:`gilfree._start._forkserver`, whose protocol is described there, and those two are not offered.
"""

from __future__ import annotations

from ._start._forkserver import forkserver as _forkserver

__all__ = ["ensure_running", "set_forkserver_preload"]

ensure_running = _forkserver.ensure_running


def set_forkserver_preload(module_names: list[str]) -> None:
    """Modules the fork server imports once, so that every child starts with them loaded."""
    _forkserver.set_preload(module_names)

