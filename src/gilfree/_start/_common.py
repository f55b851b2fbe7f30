"""What the three launchers share (layer L4): the child handle, lifelines, start-up data, ``__main__``.

Every child gets a *lifeline*: a pipe whose write end only its parent holds.  The read end is the
child's ``parent_process().sentinel``: it reads EOF when the parent dies.  A *daemonic* child also
asks the kernel (``F_SETOWN`` + ``F_SETSIG`` + ``O_ASYNC``) to send it SIGKILL the moment that
happens, so daemonic children never outlive a parent killed with SIGKILL -- without a watcher
thread and without polling.  Forked siblings inherit each other's write ends; an at-fork hook closes
them in every forked child, so only the parent keeps a child's lifeline open.

The parent's ``sentinel`` for a child it forked or spawned is a pidfd (Linux >= 5.3): it becomes
readable when the child exits, whatever fds the child's own children inherited.

Spawned and forkserver children receive a *payload* through the lifeline pipe before it becomes a
lifeline: the preparation data (``sys.path``, working directory, how to import ``__main__``) and the
pickled process object, each length-prefixed.
"""

from __future__ import annotations

import _signal as signal  # the C module: `signal.py` builds enums (start-up imports, design.md)
import fcntl
import marshal
import os
import struct
import sys

from .. import process, reduction, util
from .._errors import MainModuleNotGuardedError
from ..connection import wait

# `typing` costs a spawned child several ms to import; annotations are strings here anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_F_SETSIG = 10
_F_SETPIPE_SZ = 1031
_PAYLOAD = struct.Struct("!QQI")  # length of preparation data, of the process object, number of fds

# ---------------------------------------------------------------------------------------------------
# Lifelines

#: Guards ``_lifelines``: a fork never happens between a pipe's creation and its registration, nor
#: between a write end's removal and its close (a child would keep a sibling's lifeline open).
#: ``release_lifeline`` runs in finalizers, maybe inside ``os.fork()`` on the thread that holds the
#: guard (an at-fork handler that collects): it never waits, it hands the release to the holder.
#: Reentrant: a finalizer run there may also start a process (a new lifeline, a nested fork).
_lifeline_guard = util.HandoffLock(reentrant=True)
_lifelines: set[int] = set()  # write ends held by this process


def new_lifeline() -> tuple[int, int]:
    """A (read end, write end) pipe; the write end is closed in every child forked after this."""
    with _lifeline_guard:
        r, w = os.pipe()
        _lifelines.add(w)
    try:
        fcntl.fcntl(w, _F_SETPIPE_SZ, 1 << 20)  # the payload fits without blocking the parent
    except OSError:
        pass
    return r, w


def release_lifeline(w: int) -> None:
    """Close a lifeline's write end (the child sees EOF; a daemonic child is killed).

    Never waits (safe in finalizers): if the guard is taken, its holder closes it before releasing.
    """
    _lifeline_guard.run_or_hand_off(_release_lifeline, w)


def _release_lifeline(w: int) -> None:
    if w in _lifelines:
        _lifelines.discard(w)
        util.close_fds(w)


def _close_inherited_lifelines() -> None:
    # runs in the child after any os.fork(): the parent's lifelines are not ours to hold (those whose
    # release was handed off are still in the set, so they are closed here too)
    _lifeline_guard.reinit_in_child()
    for w in list(_lifelines):
        util.close_fds(w)
    _lifelines.clear()


os.register_at_fork(after_in_child=_close_inherited_lifelines)


def arm_lifeline(r: int) -> None:
    """In a daemonic child: ask for SIGKILL when the parent's end of ``r`` closes.

    If the parent is already gone, exit now.
    """
    try:
        fcntl.fcntl(r, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(r, _F_SETSIG, signal.SIGKILL)
        fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_ASYNC)
    except (OSError, AttributeError):  # not Linux: the parent's exit handler still terminates us
        return
    if wait([r], timeout=0):
        os._exit(1)


# ---------------------------------------------------------------------------------------------------
# Sentinels and the child handle

def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


class ChildPopen:
    """Handle of a child this process forked or spawned (``Popen`` in the stdlib's terms).

    ``sentinel`` becomes readable when the child exits; ``poll``/``wait`` reap it.
    """

    method = ""

    def __init__(self, process_obj: process.BaseProcess) -> None:
        util._flush_std_streams()
        self.returncode: int | None = None
        self.pid = 0
        self.sentinel = -1
        self._pidfd: int | None = None
        self._lifeline_w = -1
        self._finalizer: util.Finalize | None = None
        self._launch(process_obj)

    def _launch(self, process_obj: process.BaseProcess) -> None:
        raise NotImplementedError

    def _track(self, pid: int, lifeline_w: int, sentinel: int | None = None, extra: tuple[int, ...] = ()) -> None:
        """Record a started child: its pid, our lifeline end, and a sentinel for it."""
        self.pid = pid
        self._lifeline_w = lifeline_w
        self._pidfd = _pidfd(pid)
        if sentinel is None:
            if self._pidfd is None:
                raise OSError("this system has no pidfd_open; gilfree needs Linux >= 5.3")
            sentinel = self._pidfd
        self.sentinel = sentinel
        fds = tuple(fd for fd in {self._pidfd, sentinel, *extra} if fd is not None and fd >= 0)
        self._finalizer = util.Finalize(self, _close_child_fds, (lifeline_w, fds))

    def __repr__(self) -> str:
        state = "running" if self.returncode is None else f"exitcode={self.returncode}"
        return f"<{type(self).__name__} pid={self.pid} {state}>"

    def poll(self, flag: int = os.WNOHANG) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, flag)
            except ChildProcessError:
                # Someone else reaped it (a SIGCHLD handler, os.wait()); its status is lost.
                if wait([self.sentinel], 0):
                    self.returncode = 255
                return self.returncode
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        if self.returncode is None:
            if timeout is not None and not wait([self.sentinel], timeout):
                return None
            return self.poll(os.WNOHANG if timeout == 0.0 else 0)
        return self.returncode

    def _send_signal(self, sig: int) -> None:
        if self.returncode is not None:
            return
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass
        except OSError:
            if self.wait(timeout=0.1) is None:
                raise

    def terminate(self) -> None:
        self._send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self._send_signal(signal.SIGKILL)

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()


def _close_child_fds(lifeline_w: int, fds: tuple[int, ...]) -> None:
    release_lifeline(lifeline_w)
    util.close_fds(*fds)


# ---------------------------------------------------------------------------------------------------
# Start-up data for spawned and forkserver children

def own_atexit() -> None:
    """In a forked child: forget the atexit handlers of the process it is a copy of (they are that
    process's), keep only the exit hook of the package; the launcher runs what the child registers
    before its ``os._exit``."""
    import atexit

    atexit._clear()
    atexit.register(process._exit_function)


def preparation_data(name: str, start_method: str) -> dict[str, Any]:
    """What a fresh interpreter needs to look like its parent before it unpickles the process."""
    data: dict[str, Any] = {
        "name": name,
        "sys_path": list(sys.path),
        "sys_argv": list(sys.argv),
        "authkey": bytes(process.current_process().authkey),
        "dir": os.getcwd(),
        "orig_dir": process.ORIGINAL_DIR,
        "start_method": start_method,
        "log_level": util._logger.getEffectiveLevel() if util._logger is not None else None,
        "log_to_stderr": util._log_to_stderr,
        # the shared-memory tracker's address, if this process has used one (the module is not
        # imported otherwise: a child that does not use shared memory does not pay for it)
        "shm_tracker": (
            sys.modules["gilfree._tracker"].address()
            if "gilfree._tracker" in sys.modules
            else util.inherited.get("shm_tracker")
        ),
        # segment names must agree across the tree even if the environment changed since import
        "shm_prefix": util.SHM_PREFIX,
    }
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name_ = getattr(spec, "name", None)
    if name_:
        if _main_runs_in_children(main):
            data["main_name"] = name_
    elif _main_runs_in_children(main):
        path = reduction.main_file(main)  # also once the interpreter deleted __main__.__file__ (at exit)
        if path and os.path.exists(path):
            main_path = os.path.normpath(os.path.join(process.ORIGINAL_DIR or os.getcwd(), path))
            data["main_path"] = main_path
            code = _compiled_main(main_path)
            if code is not None:
                data["main_code"] = code
    return data


def dump_payload(prep: dict[str, Any], process_obj: process.BaseProcess, popen: Any, fds: list[int]) -> list[bytes]:
    """Pickle the start-up data; fds met inside ``process_obj`` are appended to ``fds``.

    ``fds[0]`` is the lifeline; a pickled fd with token ``i`` is ``fds[i + 1]`` in the child.
    """
    prep_bytes = reduction.dumps(prep)
    with reduction.fd_channel(sending=True, spawning=popen) as channel:
        obj_bytes = reduction.dumps(process_obj)
    fds.extend(channel.sent)
    return [_PAYLOAD.pack(len(prep_bytes), len(obj_bytes), len(fds)), struct.pack(f"!{len(fds)}i", *fds), prep_bytes, obj_bytes]


def write_payload(w: int, parts: list[bytes]) -> None:
    """Write the payload into the lifeline; a child that already died is not an error here."""
    data = b"".join(parts)
    view = memoryview(data)
    try:
        while view:
            n = os.write(w, view)
            view = view[n:]
    except BrokenPipeError:
        pass  # the child is gone; join() reports its exit code, its stderr says why


def _read_exact(fd: int, n: int) -> bytes:
    parts = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError("the parent closed the start-up pipe before sending the process")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def read_payload(fd: int) -> tuple[bytes, bytes, list[int]]:
    n_prep, n_obj, n_fds = _PAYLOAD.unpack(_read_exact(fd, _PAYLOAD.size))
    fds = list(struct.unpack(f"!{n_fds}i", _read_exact(fd, 4 * n_fds)))
    return _read_exact(fd, n_prep), _read_exact(fd, n_obj), fds


# ---------------------------------------------------------------------------------------------------
# __main__ in a fresh interpreter

_importing_main = False
#: in a spawned or forkserver child: the parent's start method, which becomes this child's default
inherited_start_method: str | None = None


def prepare(data: dict[str, Any]) -> None:
    """In a fresh child: adopt the parent's name, paths and logging; import its ``__main__``."""
    if "name" in data:
        process.current_process().name = data["name"]
    if "authkey" in data:
        process.current_process().authkey = data["authkey"]
    if data.get("log_to_stderr"):
        util.log_to_stderr()
    if data.get("log_level") is not None:
        util.get_logger().setLevel(data["log_level"])
    if "sys_path" in data:
        sys.path = data["sys_path"]
    if "sys_argv" in data:
        sys.argv = data["sys_argv"]
    if "dir" in data:
        try:
            os.chdir(data["dir"])
        except OSError:
            pass
    if "orig_dir" in data:
        process.ORIGINAL_DIR = data["orig_dir"]
    if "shm_prefix" in data:
        util.SHM_PREFIX = data["shm_prefix"]
    if data.get("shm_tracker"):
        # read by gilfree._tracker when (if) it is first imported: a child that does not use shared
        # memory must not pay for importing it
        util.inherited["shm_tracker"] = data["shm_tracker"]
        tracker = sys.modules.get("gilfree._tracker")
        if tracker is not None:
            tracker.set_address(data["shm_tracker"])
    global inherited_start_method
    inherited_start_method = data.get("start_method")
    if "main_name" in data:
        _import_main_by_name(data["main_name"])
    elif "main_path" in data:
        _import_main_from_path(data["main_path"], data.get("main_code"))


def _install_main(module: Any) -> None:
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module


_main_code_cache: dict[str, tuple[tuple[float, int], bytes]] = {}


def _compiled_main(path: str) -> bytes | None:
    """The main script compiled once, marshalled, for every spawned child (None: let it compile).

    The stdlib makes each spawned child read and compile the main script again; for a large
    script that is most of a child's start-up.  Recompiled when the file changes.
    """
    if not path.endswith(".py"):
        return None
    try:
        st = os.stat(path)
        key = (st.st_mtime, st.st_size)
        cached = _main_code_cache.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        with open(path, "rb") as f:
            source = f.read()
        code = marshal.dumps(compile(source, path, "exec", dont_inherit=True))
    except (OSError, SyntaxError, ValueError):
        return None
    _main_code_cache[path] = (key, code)
    return code


def _import_main_from_path(path: str, main_code: bytes | None = None) -> None:
    global _importing_main
    current = sys.modules.get("__mp_main__")
    if current is not None and getattr(current, "__file__", None) == path:
        _install_main(current)
        return
    import types

    module = types.ModuleType("__mp_main__")
    module.__file__ = path
    module.__builtins__ = __builtins__  # type: ignore[attr-defined]
    _install_main(module)
    if os.path.isdir(path) or not path.endswith(".py"):
        import runpy

        _importing_main = True
        try:
            result = runpy.run_path(path, run_name="__mp_main__")
        finally:
            _importing_main = False
        module.__dict__.update(result)
        return
    if main_code is not None:
        code = marshal.loads(main_code)
    else:
        with open(path, "rb") as f:
            source = f.read()
        code = compile(source, path, "exec", dont_inherit=True)
    _importing_main = True
    try:
        exec(code, module.__dict__)
    finally:
        _importing_main = False


def _import_main_by_name(name: str) -> None:
    global _importing_main
    current = sys.modules.get("__mp_main__")
    if current is not None and getattr(current, "__gilfree_main_name__", None) == name:
        _install_main(current)
        return
    import runpy
    import types

    _importing_main = True
    try:
        content = runpy.run_module(name, run_name="__mp_main__", alter_sys=True)
    finally:
        _importing_main = False
    module = types.ModuleType("__mp_main__")
    module.__dict__.update(content)
    module.__gilfree_main_name__ = name  # type: ignore[attr-defined]
    _install_main(module)


# ---------------------------------------------------------------------------------------------------
# The missing `if __name__ == "__main__":` guard

_FIX = (
    "\n\n    if __name__ == \"__main__\":\n        ...  # the code that starts processes, pools or managers\n"
)


def _guard_message(where: str, method: str) -> str:
    return (
        f"A process was started at import time of the main module ({where}), outside an "
        f"`if __name__ == \"__main__\":` block; with the {method!r} start method every child imports the "
        f"main module again and would start processes itself.  Fix: move that code under the guard:"
        + _FIX
    )


_unguarded_cache: dict[str, list[tuple[int, int]]] = {}


def _unguarded_ranges(path: str) -> list[tuple[int, int]]:
    """Line ranges of module-level code of ``path`` that is not inside any ``if`` statement."""
    if path not in _unguarded_cache:
        import ast  # only when a process is started from main-module code (start-up imports, design.md)

        blocks = (ast.With, ast.AsyncWith, ast.For, ast.AsyncFor, ast.While, ast.Try, getattr(ast, "TryStar", ast.Try))
        ranges: list[tuple[int, int]] = []
        try:
            with open(path, "rb") as f:
                tree = ast.parse(f.read(), path)
        except (OSError, SyntaxError, ValueError):
            tree = None

        def visit(stmts: list[Any]) -> None:
            for node in stmts:
                if isinstance(node, (ast.If, ast.Match, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    continue  # an `if` may be a guard of any kind; definitions run nothing
                if isinstance(node, blocks):
                    ranges.append((node.lineno, node.lineno))  # the header line, then the blocks
                    for field in ("body", "orelse", "finalbody"):
                        visit(getattr(node, field, None) or [])
                    for handler in getattr(node, "handlers", None) or []:
                        visit(handler.body)
                else:
                    ranges.append((node.lineno, node.end_lineno or node.lineno))

        if tree is not None:
            visit(tree.body)
        _unguarded_cache[path] = ranges
    return _unguarded_cache[path]


def _main_runs_in_children(main: Any) -> bool:
    """Whether a spawned child runs the main module again, as the stdlib decides: not a package's or a
    directory's ``__main__`` (``python -m pkg``, ``python dir``: their functions travel by value, see
    ``reduction._main_is_reimportable``), not the IPython launcher (``ipython.py``), not a main module
    without a file (the REPL, ``-c``).  The same rule as what travels by reference:
    :func:`gilfree.reduction.main_runs_in_children`."""
    return reduction.main_runs_in_children(main)


def check_main_guard(method: str) -> None:
    """Raise :class:`MainModuleNotGuardedError` if a process is started by unguarded main-module code.

    In a child importing the main module, any start is an error (the stdlib's "bootstrapping phase"
    case).  In the parent, a start from a line of the main module that no ``if`` encloses would
    make every spawned child start processes too; it is refused before a child is launched.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if _importing_main:
        raise MainModuleNotGuardedError(_guard_message(str(path), method))
    if not path or main is None or not _main_runs_in_children(main):
        return  # no child runs it again: nothing can recurse
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_name == "<module>" and frame.f_globals is main.__dict__):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return
    line = frame.f_lineno
    if any(a <= line <= b for a, b in _unguarded_ranges(path)):
        raise MainModuleNotGuardedError(_guard_message(f"{path}, line {line}", method))


# ---------------------------------------------------------------------------------------------------
# Starting a fresh interpreter

_executable = sys.executable


def set_executable(path: str) -> None:
    """The Python interpreter that spawned children and the fork server run (``set_executable``)."""
    global _executable
    _executable = os.fsdecode(path)


def get_executable() -> str:
    return _executable


def _interpreter_flags() -> list[str]:
    """Command-line options that make the child interpreter behave like this one."""
    flags = sys.flags
    args = []
    for flag, opt in (("debug", "d"), ("optimize", "O"), ("dont_write_bytecode", "B"), ("no_user_site", "s"),
                      ("ignore_environment", "E"), ("verbose", "v"), ("bytes_warning", "b"), ("quiet", "q")):
        value = getattr(flags, flag, 0)
        if value > 0:
            args.append("-" + opt * value)
    if getattr(flags, "isolated", 0):
        args.append("-I")
    if getattr(flags, "safe_path", False):
        args.append("-P")
    args.extend("-W" + opt for opt in sys.warnoptions)
    for key, value in getattr(sys, "_xoptions", {}).items():
        args.append("-X" + (key if value is True else f"{key}={value}"))
    return args


def spawn_interpreter(code: str, argv: list[str], fds: list[int]) -> int:
    """Start ``python -c code *argv`` with ``fds`` inherited at the same numbers; return its pid."""
    exe = _executable
    actions = [(os.POSIX_SPAWN_DUP2, fd, fd) for fd in fds]
    return os.posix_spawn(exe, [exe, *_interpreter_flags(), "-c", code, *argv], os.environ, file_actions=actions)
