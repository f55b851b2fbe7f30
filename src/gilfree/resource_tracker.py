"""``multiprocessing.resource_tracker``'s API over gilfree's shared-memory tracker (layer L5).

Programs written for the stdlib call this module for two things: to stop the tracker from removing a
segment at exit (``resource_tracker.unregister(shm._name, "shared_memory")``, the usual cure for the
stdlib's warnings about segments a process only attached to), and, rarely, to have a segment they
created some other way removed when they end (``register``).  Both work here, with gilfree's
ownership rule (:mod:`gilfree.shared_memory`): what a process registers is removed when *that
process* ends without unregistering it, and one stderr line names each segment removed.

- ``register(name, "shared_memory")``: this process owns ``name`` (the path given to ``shm_open``,
  with its leading slash, as ``SharedMemory._name``).  ``"noop"`` (and ``"dummy"``): the tracker only
  remembers the name; nothing is removed for it.
- ``unregister(name, rtype)``: this process no longer owns ``name``; the tracker will not remove it.
  Segments other processes created keep their owner: in gilfree a process that only attaches never
  registers anything, so there is nothing of its own for it to unregister.
- Named semaphores are not tracked: gilfree's locks live in anonymous memory and leave nothing behind
  (``"semaphore"`` is not in :data:`_CLEANUP_FUNCS`; registering it raises ``ValueError``).

:class:`ResourceTracker` is one connection to a tracker; the module's functions use this process's
own (:data:`_resource_tracker`, the one :class:`~gilfree.shared_memory.SharedMemory` uses).  A new
instance starts a tracker of its own, whose exit code (``_exitcode`` after ``_stop()``) is 1 if a
client ended owning something, as the stdlib's.

Where this runs: any process, the calling thread; a call blocks for one send, plus once the connect
(and the start of the tracker when none answers).
"""

from __future__ import annotations

import _posixshmem
import os

from . import _tracker

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable

__all__ = ["ensure_running", "register", "unregister"]


def _noop(name: str) -> None:
    """Removes nothing: the resource type the tracker only counts."""


#: resource type -> what removes a resource of that type (the stdlib's table; the tests remove
#: resources with it)
_CLEANUP_FUNCS: dict[str, Callable[[str], None]] = {
    "noop": _noop,
    "dummy": _noop,
    "shared_memory": _posixshmem.shm_unlink,
}

_NAME_MAX = 255  # bytes of a shm_open name after its leading slash (Linux's NAME_MAX)


def _check(name: str, rtype: str) -> None:
    if rtype not in _CLEANUP_FUNCS:
        raise ValueError(f"cannot register {name!r}. Unknown resource type {rtype!r}")
    if not isinstance(name, str):
        raise TypeError(f"a resource name is a str, not {type(name).__name__}")
    if "\0" in name:
        raise ValueError("embedded null character in a resource name")
    if rtype == "shared_memory" and len(os.fsencode(name.lstrip("/"))) > _NAME_MAX:
        # no segment can have this name: shm_open would have refused it
        raise ValueError(f"shared memory name too long ({len(name)} characters; at most {_NAME_MAX} bytes)")


def _identity(name: str) -> _tracker.Ident:
    try:
        st = os.stat(_tracker.SHM_DIR + "/" + name.lstrip("/"))
    except OSError:
        return _tracker.NO_IDENT  # not created yet: removed by name
    return (st.st_dev, st.st_ino)


class ResourceTracker:
    """One connection to a tracker process (the stdlib's class, over :mod:`gilfree._tracker`).

    The module-level :data:`_resource_tracker` is this process's own connection; another instance
    has a connection, and a tracker, of its own.
    """

    def __init__(self, _client: _tracker._Client | None = None) -> None:
        if _client is None:
            _client = _tracker._Client()
            _client.address = None  # a tracker of its own, not the one this process inherited
        self._client = _client

    @property
    def _pid(self) -> int | None:
        """Pid of the tracker this instance is connected to (None before :meth:`ensure_running`)."""
        return self._client.peer_pid()

    @property
    def _exitcode(self) -> int | None:
        """Exit code of the tracker this instance started, once :meth:`_stop` has reaped it."""
        return self._client.exitcode

    def ensure_running(self) -> None:
        """Connect to the tracker, starting one if none answers (again if it has died)."""
        from ._start import get_executable

        self._client.ensure_connected(get_executable())

    def _check_alive(self) -> bool:
        """Whether this instance is connected to a running tracker."""
        return self._client.alive()

    def getfd(self) -> int:
        """The descriptor of the connection to the tracker (connecting first)."""
        self.ensure_running()
        sock = self._client.sock
        if sock is None:
            raise OSError("not connected to the shared-memory tracker")
        return sock.fileno()

    def register(self, name: str, rtype: str) -> None:
        """Have the tracker remove ``name`` if this process ends without unregistering it."""
        _check(name, rtype)
        from ._start import get_executable

        if rtype == "shared_memory":
            self._client.register(name, _identity(name), get_executable(), False)
        else:
            self._client.register(name, _tracker.NO_IDENT, get_executable(), False, note=True)

    def unregister(self, name: str, rtype: str) -> None:
        """This process no longer owns ``name``: the tracker will not remove it."""
        _check(name, rtype)
        self._client._send_forget(self._client.owned, _tracker.GIVEN, name, _tracker.NO_IDENT)

    def _stop(self) -> None:
        """Leave the tracker; if it was started here and this was its last client, wait for it."""
        self._client.goodbye()


_resource_tracker = ResourceTracker(_tracker._client)
ensure_running = _resource_tracker.ensure_running
register = _resource_tracker.register
unregister = _resource_tracker.unregister
getfd = _resource_tracker.getfd
