"""Logging, finalizers and after-fork hooks (layer L0).

Mirrors the public parts of ``multiprocessing.util``: :func:`get_logger`, :func:`log_to_stderr`,
:class:`Finalize`, :func:`register_after_fork`, :func:`is_exiting`.  Nothing here starts processes
or threads; the process layer calls :func:`_run_finalizers` at exit and :func:`_run_after_forkers` in
a freshly forked child.
"""

from __future__ import annotations

import collections
import itertools
import os
import sys
import threading
import weakref

# `typing` costs a spawned child several ms to import; annotations are strings here anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    from typing import Any, Callable

__all__ = [
    "SUBDEBUG",
    "SUBWARNING",
    "DEBUG",
    "INFO",
    "LOGGER_NAME",
    "DEFAULT_LOGGING_FORMAT",
    "Finalize",
    "HandoffLock",
    "children_of",
    "close_fds",
    "get_temp_dir",
    "abstract_sockets_supported",
    "is_abstract_socket_namespace",
    "recv_exact",
    "debug",
    "get_logger",
    "info",
    "is_exiting",
    "log_to_stderr",
    "register_after_fork",
    "sub_debug",
    "sub_warning",
]

SUBDEBUG = 5
DEBUG = 10
INFO = 20
SUBWARNING = 25

LOGGER_NAME = "gilfree"

DEFAULT_LOGGING_FORMAT = "[%(levelname)s/%(processName)s] %(message)s"

_logger: logging.Logger | None = None
_log_to_stderr = False


def sub_debug(msg: str, *args: Any) -> None:
    if _logger:
        _logger.log(SUBDEBUG, msg, *args, stacklevel=2)  # the record names the caller's file and line


def debug(msg: str, *args: Any) -> None:
    if _logger:
        _logger.log(DEBUG, msg, *args, stacklevel=2)  # the record names the caller's file and line


def info(msg: str, *args: Any) -> None:
    if _logger:
        _logger.log(INFO, msg, *args, stacklevel=2)  # the record names the caller's file and line


def sub_warning(msg: str, *args: Any) -> None:
    if _logger:
        _logger.log(SUBWARNING, msg, *args, stacklevel=2)  # the record names the caller's file and line


#: Linux's Unix sockets have an abstract namespace (an address that starts with a NUL byte): a
#: :class:`~gilfree.connection.Listener` on one leaves no file behind
abstract_sockets_supported = sys.platform.startswith("linux")


def is_abstract_socket_namespace(address: object) -> bool:
    """Whether ``address`` (str or bytes) names a socket in the abstract namespace."""
    if isinstance(address, (str, bytes)):
        return address[:1] in ("\0", b"\0")
    return False


_temp_dir: str | None = None


def get_temp_dir() -> str:
    """This process's own temporary directory, made on first use and removed when it exits.

    Listeners' socket files go there (``multiprocessing.util.get_temp_dir``); a forked child uses
    its parent's, as in the stdlib.
    """
    global _temp_dir
    if _temp_dir is None or not os.path.isdir(_temp_dir):
        import shutil
        import tempfile

        _temp_dir = tempfile.mkdtemp(prefix="gilfree-")
        Finalize(None, shutil.rmtree, args=(_temp_dir, True), exitpriority=-100)
    return _temp_dir


def get_logger() -> logging.Logger:
    """Return the package's logger, creating it on first use (as ``multiprocessing.get_logger``)."""
    global _logger
    if _logger is None:
        # Imported here, not at the top: ``logging`` costs a child process several ms of start-up
        # and most programs never log (docs/design.md, "start-up imports").
        import logging

        logging.addLevelName(SUBDEBUG, "SUBDEBUG")
        logging.addLevelName(SUBWARNING, "SUBWARNING")
        _logger = logging.getLogger(LOGGER_NAME)
        _logger.propagate = False
    return _logger


def log_to_stderr(level: int | str | None = None) -> logging.Logger:
    """Send the package's log records to stderr; children started later do the same."""
    import logging

    global _log_to_stderr
    logger = get_logger()
    if not any(getattr(h, "_gilfree_stderr", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(DEFAULT_LOGGING_FORMAT))
        handler._gilfree_stderr = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    if level:
        logger.setLevel(level)
    _log_to_stderr = True
    return logger


# --------------------------------------------------------------------------------------------------
# Finalizers: callbacks run when an object is collected, or at exit by priority.

_finalizer_registry: dict[tuple[Any, int], Finalize] = {}
_finalizer_counter = itertools.count()
_exiting = False


class Finalize:
    """Call ``callback(*args, **kwargs)`` when ``obj`` is collected, or at exit.

    With ``obj=None`` the finalizer runs only at exit, and only if ``exitpriority`` is given.
    Higher priorities run first; equal priorities run newest first.  A finalizer runs at most once
    and only in the process that created it (a forked child never runs its parent's).
    """

    def __init__(
        self,
        obj: object | None,
        callback: Callable[..., Any],
        args: tuple = (),
        kwargs: dict | None = None,
        exitpriority: int | None = None,
    ) -> None:
        if exitpriority is not None and not isinstance(exitpriority, int):
            raise TypeError(f"exitpriority must be None or an int, not {type(exitpriority).__name__}")
        if obj is None and exitpriority is None:
            raise TypeError("Finalize(None, ...) needs an exitpriority, or it would never run")
        self._weakref = weakref.ref(obj, self) if obj is not None else None
        self._callback: Callable[..., Any] | None = callback
        self._args = args
        self._kwargs = kwargs or {}
        self._key = (exitpriority, next(_finalizer_counter))
        self._pid = os.getpid()
        _finalizer_registry[self._key] = self

    def __call__(self, wr: object = None) -> Any:
        """Run the callback now (once); return its result, or None if it already ran."""
        try:
            del _finalizer_registry[self._key]
        except KeyError:
            return None
        if self._pid != os.getpid() or self._callback is None:
            return None
        callback, args, kwargs = self._callback, self._args, self._kwargs
        self._callback = self._args = self._kwargs = self._weakref = None  # type: ignore[assignment]
        return callback(*args, **kwargs)

    def cancel(self) -> None:
        """Forget the finalizer without running it."""
        _finalizer_registry.pop(self._key, None)
        self._callback = self._args = self._kwargs = self._weakref = None  # type: ignore[assignment]

    def still_active(self) -> bool:
        return self._key in _finalizer_registry

    def __repr__(self) -> str:
        obj = self._weakref() if self._weakref is not None else None
        name = getattr(self._callback, "__name__", repr(self._callback))
        state = "active" if self.still_active() else "done"
        return f"<Finalize {name} for {type(obj).__name__ if obj is not None else None} priority={self._key[0]} {state}>"


def _run_finalizers(minpriority: int | None = None) -> None:
    """Run the finalizers whose priority is at least ``minpriority`` (all with a priority if None)."""
    if minpriority is None:
        def wanted(key: tuple[Any, int]) -> bool:
            return key[0] is not None
    else:
        def wanted(key: tuple[Any, int]) -> bool:
            return key[0] is not None and key[0] >= minpriority
    keys = sorted((k for k in list(_finalizer_registry) if wanted(k)), reverse=True)
    for key in keys:
        finalizer = _finalizer_registry.get(key)
        if finalizer is None:
            continue
        try:
            finalizer()
        except Exception:
            import traceback

            traceback.print_exc()
    if minpriority is None:
        _finalizer_registry.clear()


def is_exiting() -> bool:
    """True once the process has begun shutting down."""
    return _exiting


def _set_exiting() -> None:
    global _exiting
    _exiting = True


# --------------------------------------------------------------------------------------------------
# After-fork hooks: objects that hold locks or threads register a function that repairs them in a
# freshly forked child.

_afterfork_registry: weakref.WeakValueDictionary[tuple[int, int, Callable[..., Any]], Any] = (
    weakref.WeakValueDictionary()
)
_afterfork_counter = itertools.count()


def register_after_fork(obj: object, func: Callable[[Any], Any]) -> None:
    """Call ``func(obj)`` in every child forked after this call, while ``obj`` is alive."""
    _afterfork_registry[(next(_afterfork_counter), id(obj), func)] = obj


def _run_after_forkers() -> None:
    for (_, _, func), obj in sorted(_afterfork_registry.items(), key=lambda kv: kv[0][0]):
        try:
            func(obj)
        except Exception as exc:
            info("after forker raised exception %s", exc)


def _after_fork_reset() -> None:
    """Called in a forked child before user code: finalizers belong to the parent."""
    global _exiting
    _exiting = False
    for key, fin in list(_finalizer_registry.items()):
        if fin._pid != os.getpid():
            _finalizer_registry.pop(key, None)


def close_fds(*fds: int) -> None:
    """Close each fd, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def fds_from_ancillary(anc: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors of the ``SCM_RIGHTS`` items in ``recvmsg``'s ancillary data (a trailing
    partial int, from a truncated message, is ignored)."""
    import _socket
    import array

    fds: list[int] = []
    for level, kind, payload in anc:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return fds


def _shm_prefix_from_env() -> str:
    value = os.environ.get("GILFREE_SHM_PREFIX", "")
    if len(value) > 16 or not all(c.isalnum() or c in "_-." for c in value):
        raise ValueError(
            f"GILFREE_SHM_PREFIX={value!r}: use at most 16 letters, digits, '_', '-' or '.' "
            f"(it starts the name of every shared-memory segment gilfree creates)"
        )
    return value


#: Prepended to the name of every named shared-memory segment gilfree creates (``SharedMemory``'s
#: generated names, queue segments): ``GILFREE_SHM_PREFIX``, read once at import; a spawned or
#: forkserver child gets its parent's value with the start-up data.  Read it as ``util.SHM_PREFIX``.
SHM_PREFIX = _shm_prefix_from_env()


#: What a spawned or forkserver child inherits from its parent's start-up data, for modules that may
#: never be imported in the child (reading it costs them nothing; importing them would cost the child).
inherited: dict[str, Any] = {}


def recv_exact(sock: Any, n: int, peer: str) -> bytes:
    """Read exactly ``n`` bytes from a socket; ``ConnectionError`` naming ``peer`` if it closes first."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"{peer} closed the connection after {len(data)} of {n} bytes")
        data += chunk
    return data


def children_of(parents: set[int]) -> dict[int, tuple[str, str]]:
    """``{pid: (state, command line)}`` of the processes whose parent is in ``parents``.

    Read from ``/proc`` (Linux; ``{}`` elsewhere).  For leak checks in tests and benchmarks.
    """
    found: dict[int, tuple[str, str]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) in parents:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                found[int(entry)] = (fields[0], cmd)
        except (OSError, ValueError):
            continue
    return found


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (AttributeError, ValueError, OSError):
            pass


# A lock that forked children must not inherit in the locked state is replaced in the child.
class ForkAwareThreadLock:
    """A ``threading.Lock`` that a forked child gets fresh, unlocked."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.acquire = self._lock.acquire
        self.release = self._lock.release
        register_after_fork(self, ForkAwareThreadLock._at_fork_reinit)

    def _at_fork_reinit(self) -> None:
        self._lock._at_fork_reinit()  # type: ignore[attr-defined]

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, *args: Any) -> None:
        self._lock.__exit__(*args)


class HandoffLock:
    """A lock whose finalizer-reachable work is never waited for: it is handed to the holder.

    The rule (docs/design.md, "Code that runs inside a collection"): code that can run arbitrary
    Python -- a :class:`Finalize` or weakref callback, ``__del__``, an at-fork handler, a signal
    handler -- must not wait for a lock its own thread may hold; a collection can start at any
    allocation, so the thread inside ``with lock:`` may be the very one that runs the finalizer.
    Such code calls :meth:`run_or_hand_off`: the work runs at once if the lock is free, else it
    waits in a deque (whose ``append`` is atomic, no lock) and the holder runs it before it releases.
    Ordinary code uses ``with lock:``.  No handed-off work is left behind: a releaser looks at the
    deque after releasing and takes the lock again if something arrived meanwhile.

    ``reentrant=True``: the holding thread may take it again (for state whose every change is safe
    to nest, such as the set of lifelines: a finalizer run inside ``os.fork()`` may start a process);
    handed-off work then runs when the outermost holder releases.
    """

    def __init__(self, reentrant: bool = False) -> None:
        self._lock = threading.Lock()
        self._handed: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._reentrant = reentrant
        self._owner = 0  # thread ident of the holder (reentrant locks only)
        self._depth = 0

    def acquire(self) -> None:
        if self._reentrant:
            me = threading.get_ident()
            if self._owner == me:
                self._depth += 1
                return
            self._lock.acquire()
            self._owner, self._depth = me, 1
            return
        self._lock.acquire()

    def release(self) -> None:
        """Run the handed-off work, then release (again while work keeps arriving)."""
        if self._reentrant:
            if self._depth > 1:
                self._depth -= 1
                return
        handed = self._handed
        while True:
            while handed:
                func, args = handed.popleft()
                try:
                    func(*args)
                except Exception as exc:  # finalizer work: report, never break the holder's code
                    info("handed-off %r raised %r", func, exc)
            if self._reentrant:
                self._owner, self._depth = 0, 0
            self._lock.release()
            if not handed or not self._lock.acquire(False):
                return
            if self._reentrant:
                self._owner, self._depth = threading.get_ident(), 1

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> HandoffLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def run_or_hand_off(self, func: Callable[..., Any], *args: Any) -> None:
        """Run ``func(*args)`` under the lock now if it is free, else leave it to the holder.  Never waits."""
        self._handed.append((func, args))
        if self._lock.acquire(False):
            if self._reentrant:
                self._owner, self._depth = threading.get_ident(), 1
            self.release()

    def reinit_in_child(self) -> None:
        """In a forked child: unlocked, and the parent's handed-off work dropped (it is the parent's)."""
        self._lock = threading.Lock()
        self._handed.clear()
        self._owner, self._depth = 0, 0
