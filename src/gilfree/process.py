"""Process objects and per-process state (layer L3).

:class:`BaseProcess` has the stdlib's API and semantics (``multiprocessing.process.BaseProcess``).
How a child is started is not decided here: a subclass supplies ``_Popen(process_obj)``, a
*launcher* from the ``_start`` layer, chosen by the context the class belongs to
(``gilfree.Process`` follows the default context; ``get_context("spawn").Process`` always spawns).

Per-process state lives in this module: the current process, the parent, the set of children not
yet reaped.  In a child, :meth:`BaseProcess._bootstrap` resets that state, runs the target, prints an
uncaught exception's traceback as ``Process <name>:`` + traceback (exit code 1), maps
``sys.exit(n)`` to exit code ``n``, and at the end terminates daemonic children and joins the
others, as the stdlib does -- except that a daemonic child that ignores SIGTERM is killed after
:data:`DAEMON_GRACE` seconds instead of being waited for forever.

Where this runs: ``start``/``join``/``terminate`` in the parent, on the calling thread; ``join``
blocks up to its timeout.  ``_bootstrap`` runs in the child, once.
"""

from __future__ import annotations

import atexit
import itertools
import os
import sys
import threading

from . import reduction, util
from .connection import wait

# `typing` costs a spawned child several ms to import; annotations are strings here anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Iterable, Mapping

__all__ = [
    "BaseProcess",
    "AuthenticationString",
    "current_process",
    "parent_process",
    "active_children",
    "ORIGINAL_DIR",
]

#: Seconds a daemonic child gets to exit after SIGTERM when its parent exits, before SIGKILL.
DAEMON_GRACE = 5.0

try:
    ORIGINAL_DIR: str | None = os.path.abspath(os.getcwd())
except OSError:
    ORIGINAL_DIR = None

def _exitcode_name(code: int) -> str:
    """``-15`` -> ``"-SIGTERM"`` (as the stdlib's repr shows it); other codes as they are."""
    if code >= 0:
        return str(code)
    import signal  # only for a repr: `signal.py` builds enums a spawned child need not pay for

    try:
        return f"-{signal.Signals(-code).name}"
    except ValueError:
        return str(code)


class AuthenticationString(bytes):
    """The per-process authkey: bytes that refuse to be pickled except to start a child."""

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        if reduction.spawning_popen() is None:
            raise TypeError(
                "Pickling an AuthenticationString object is disallowed for security reasons: the "
                "authkey reaches a child only when the child is started"
            )
        return AuthenticationString, (bytes(self),)

    def __repr__(self) -> str:
        return "AuthenticationString(<hidden>)"


class BaseProcess:
    """A process that runs ``target(*args, **kwargs)``, or the ``run()`` method of a subclass."""

    #: start method name of the context this class belongs to; None = the default context's
    _start_method: str | None = None

    @staticmethod
    def _Popen(process_obj: BaseProcess) -> Any:
        raise NotImplementedError("use a context's Process class, e.g. gilfree.Process")

    def __init__(
        self,
        group: None = None,
        target: Callable[..., object] | None = None,
        name: str | None = None,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        daemon: bool | None = None,
    ) -> None:
        if group is not None:
            raise ValueError("group argument must be None for now (as in the stdlib)")
        count = next(_process_counter)
        self._identity: tuple[int, ...] = _current_process._identity + (count,)
        self._config: dict[str, Any] = _current_process._config.copy()
        self._parent_pid: int | None = os.getpid()
        self._parent_name: str = _current_process.name
        self._popen: Any = None
        self._closed = False
        self._target = target
        self._args = tuple(args)
        self._kwargs = dict(kwargs or {})
        self._name: str = name or type(self).__name__ + "-" + ":".join(str(i) for i in self._identity)
        if daemon is not None:
            self.daemon = daemon

    def _check_closed(self) -> None:
        if self._closed:
            raise ValueError("process object is closed")

    def run(self) -> None:
        """What the child runs; by default ``target(*args, **kwargs)``.  Override in a subclass."""
        if self._target:
            self._target(*self._args, **self._kwargs)

    def start(self) -> None:
        """Start the child process."""
        self._check_closed()
        if self._popen is not None:
            raise AssertionError("cannot start a process twice")
        if self._parent_pid != os.getpid():
            raise AssertionError("can only start a process object created by current process")
        if _current_process._config.get("daemon"):
            raise AssertionError("daemonic processes are not allowed to have children")
        _cleanup()
        self._popen = self._Popen(self)
        self._sentinel = self._popen.sentinel
        # Drop references the child has its own copy of, so they can be collected here.
        del self._target, self._args, self._kwargs
        _children.add(self)

    def terminate(self) -> None:
        """Send SIGTERM to the child."""
        self._check_closed()
        if self._popen is not None:
            self._popen.terminate()

    def kill(self) -> None:
        """Send SIGKILL to the child."""
        self._check_closed()
        if self._popen is not None:
            self._popen.kill()

    def join(self, timeout: float | None = None) -> None:
        """Wait until the child exits, or ``timeout`` seconds pass; reaps it."""
        self._check_closed()
        if self._parent_pid != os.getpid():
            raise AssertionError("can only join a child process")
        if self._popen is None:
            raise AssertionError("can only join a started process")
        res = self._popen.wait(timeout)
        if res is not None:
            _children.discard(self)

    def is_alive(self) -> bool:
        """Whether the child is running (reaps it if it has exited)."""
        self._check_closed()
        if self is _current_process:
            return True
        if self._parent_pid != os.getpid():
            raise AssertionError("can only test a child process")
        if self._popen is None:
            return False
        if self._popen.poll() is None:
            return True
        _children.discard(self)
        return False

    def close(self) -> None:
        """Release the resources of a finished process; most methods raise ValueError afterwards."""
        if self._popen is not None:
            if self._popen.poll() is None:
                raise ValueError(
                    "Cannot close a process while it is still running. You should first call join() or terminate()."
                )
            self._popen.close()
            self._popen = None
            del self._sentinel
            _children.discard(self)
        self._closed = True

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError("name must be a string")
        self._name = name

    @property
    def daemon(self) -> bool:
        """Whether the process is daemonic: terminated when its parent exits, may not have children."""
        return bool(self._config.get("daemon", False))

    @daemon.setter
    def daemon(self, daemonic: bool) -> None:
        if self._popen is not None:
            raise AssertionError("process has already started")
        self._config["daemon"] = daemonic

    @property
    def authkey(self) -> bytes:
        return self._config["authkey"]

    @authkey.setter
    def authkey(self, authkey: bytes) -> None:
        self._config["authkey"] = AuthenticationString(authkey)

    @property
    def exitcode(self) -> int | None:
        """The exit code (negative signal number if killed by a signal), None while running."""
        self._check_closed()
        if self._popen is None:
            return None
        return self._popen.poll()

    @property
    def ident(self) -> int | None:
        self._check_closed()
        if self is _current_process:
            return os.getpid()
        return self._popen and self._popen.pid

    pid = ident

    @property
    def sentinel(self) -> int:
        """An fd that becomes ready when the process ends (for ``connection.wait``)."""
        self._check_closed()
        try:
            return self._sentinel
        except AttributeError:
            raise ValueError("process not started") from None

    def __repr__(self) -> str:
        exitcode = None
        if self is _current_process:
            status = "started"
        elif self._closed:
            status = "closed"
        elif self._parent_pid != os.getpid():
            status = "unknown"
        elif self._popen is None:
            status = "initial"
        else:
            exitcode = self._popen.poll()
            status = "started" if exitcode is None else "stopped"
        info = [type(self).__name__, "name=%r" % self._name]
        if self._popen is not None:
            info.append("pid=%s" % self._popen.pid)
        info.append("parent=%s" % self._parent_pid)
        info.append(status)
        if exitcode is not None:
            info.append("exitcode=%s" % _exitcode_name(exitcode))
        if self.daemon:
            info.append("daemon")
        return "<%s>" % " ".join(info)

    # -- in the child ----------------------------------------------------------------------------
    def _bootstrap(self, parent_sentinel: int | None = None) -> int:
        """Run the process in the child; return its exit code (the launcher then calls ``os._exit``)."""
        global _current_process, _parent_process, _process_counter, _children
        exitcode = 1
        try:
            for hook in _bootstrap_hooks:
                hook(self)
            _process_counter = itertools.count(1)
            _children = set()
            _close_stdin()
            _current_process = self
            _parent_process = _ParentProcess(self._parent_name, self._parent_pid, parent_sentinel)
            if hasattr(threading.main_thread(), "_set_native_id"):
                threading.main_thread()._set_native_id()  # type: ignore[attr-defined]
            util._after_fork_reset()
            util._run_after_forkers()
            util.info("child process calling self.run()")
            try:
                self.run()
                exitcode = 0
            finally:
                _exit_function()
        except SystemExit as e:
            if e.code is None:
                exitcode = 0
            elif isinstance(e.code, int):
                exitcode = e.code
            else:
                sys.stderr.write(str(e.code) + "\n")
                exitcode = 1
        except BaseException:
            exitcode = 1
            import traceback

            sys.stderr.write(f"Process {self.name}:\n")
            traceback.print_exc()
        finally:
            try:
                threading._shutdown()  # type: ignore[attr-defined]
            except BaseException:
                pass
            util.info("process exiting with exitcode %d" % exitcode)
            util._flush_std_streams()
        return exitcode


class _MainProcess(BaseProcess):
    def __init__(self) -> None:
        self._identity = ()
        self._name = "MainProcess"
        self._parent_pid = None
        self._parent_name = ""
        self._popen = None
        self._closed = False
        self._config = {"authkey": AuthenticationString(os.urandom(32)), "semprefix": "/gf"}

    def close(self) -> None:
        pass


class _ParentProcess(BaseProcess):
    """What ``parent_process()`` returns in a child: name, pid, and liveness via a sentinel."""

    def __init__(self, name: str, pid: int | None, sentinel: int | None) -> None:
        self._identity = ()
        self._name = name
        self._pid = pid
        self._parent_pid = None
        self._popen = None
        self._closed = False
        self._sentinel = sentinel  # type: ignore[assignment]
        self._config = {}

    def is_alive(self) -> bool:
        if self._sentinel is None:
            return False
        return not wait([self._sentinel], timeout=0)

    @property
    def ident(self) -> int | None:  # type: ignore[override]
        return self._pid

    pid = ident  # type: ignore[assignment]

    def join(self, timeout: float | None = None) -> None:
        if self._sentinel is not None:
            wait([self._sentinel], timeout=timeout)

    def __repr__(self) -> str:
        return f"<_ParentProcess name={self._name!r} pid={self._pid}>"


def _close_stdin() -> None:
    """A child must not read the parent's terminal: stdin becomes /dev/null, as in the stdlib."""
    if sys.stdin is None:
        return
    try:
        sys.stdin.close()
    except (OSError, ValueError):
        pass
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
        try:
            sys.stdin = open(fd, encoding="utf-8", closefd=False)
        except BaseException:
            os.close(fd)
            raise
    except (OSError, ValueError):
        pass


_current_process: BaseProcess = _MainProcess()
_parent_process: BaseProcess | None = None
_process_counter = itertools.count(1)
_children: set[BaseProcess] = set()
#: called with the process object at the start of ``_bootstrap`` in the child (the context layer
#: registers one that makes the child's default start method its parent's)
_bootstrap_hooks: list[Callable[[BaseProcess], None]] = []
#: the default context, filled in by the context layer when it is imported (an arrow pointing down,
#: like ``_bootstrap_hooks``): layers below it that start processes on the caller's behalf (the
#: manager's server) use it when they are given no context
default_context: Any = None


def current_process() -> BaseProcess:
    """The Process object of the process calling this."""
    return _current_process


def parent_process() -> BaseProcess | None:
    """The parent's Process object (name, pid, is_alive), or None in the main process."""
    return _parent_process


def _cleanup() -> None:
    for p in list(_children):
        popen = p._popen  # read once: another thread may close the object meanwhile
        if popen is None or popen.poll() is not None:
            _children.discard(p)


def active_children() -> list[BaseProcess]:
    """The children of this process that are still running (reaps the ones that ended)."""
    _cleanup()
    return list(_children)


def _exit_function() -> None:
    """At exit: run finalizers, terminate daemonic children (SIGKILL after a grace), join the rest.

    Another thread (a pool's supervisor) may close a Process object while this runs: a closed one
    is skipped, never allowed to end the function early (that left non-daemonic children orphaned).
    """
    util._set_exiting()
    util.info("process shutting down")
    util._run_finalizers(0)
    daemons = [p for p in active_children() if p.daemon]
    for p in daemons:
        util.info("calling terminate() for daemon %s", p.name)
        _ignoring_closed(p, "terminate")
    for p in daemons:
        _ignoring_closed(p, "join", DAEMON_GRACE)
        if _ignoring_closed(p, "is_alive"):
            util.info("daemon %s ignored SIGTERM for %s s: killing it", p.name, DAEMON_GRACE)
            _ignoring_closed(p, "kill")
    for p in active_children():
        util.info("calling join() for process %s", p.name)
        _ignoring_closed(p, "join")
    util._run_finalizers()


def _ignoring_closed(p: BaseProcess, method: str, *args: Any) -> Any:
    """``p.method(*args)``; None if the object was closed meanwhile or its child already reaped."""
    try:
        return getattr(p, method)(*args)
    except (ValueError, AttributeError, OSError):  # closed (no _popen), or reaped by its closer
        return None


atexit.register(_exit_function)
