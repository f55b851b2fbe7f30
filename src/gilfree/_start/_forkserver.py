"""The forkserver start method (layer L4): children are forked from a small server process.

::

    parent process                         fork server (spawned once, on first use)
    --------------                         -----------
    ensure_running():  posix_spawn ───────> serve(): adopt sys.path/cwd, import the preload
      config ──alive pipe──────────────>   modules (``__main__`` by default), then loop:
      (alive pipe stays open: its EOF      poll(listener, alive pipe, SIGCHLD wake-up pipe)
       tells the server the parent died)
                                             │
    start():                                 │
      connect to the abstract Unix socket ──>│ accept; nonce ──> HMAC(key, nonce) <── client
      send b"S" + fds [lifeline r, ...]  ───>│ (SCM_RIGHTS)
                                             │ fork ──> child: close server fds, run_child(r):
      <────────────── pid (8 bytes) ─────────│          payload from the lifeline, bootstrap,
      payload ──lifeline pipe──────────────────────────> os._exit(code)
                                             │
      sentinel = that socket                 │ SIGCHLD: waitpid, send exit code (4 bytes), close
      poll(): read the exit code <───────────│

One server per parent process.  Only a client that knows the server's random key (sent to it
through the alive pipe, never on a command line) can make it fork.  The server exits when the alive
pipe reads EOF, i.e. when the parent exits or is killed; its children are not its to keep alive
(daemonic ones have their own lifeline to the real parent).

Where this runs: ``ensure_running``/``connect`` in the parent, on the thread that starts a process
(serialised by a lock); :func:`serve` in the server, single-threaded, blocking only in ``poll``.
"""

from __future__ import annotations

import _signal as signal  # the C module: `signal.py` builds enums (start-up imports, design.md)
import _socket  # the C module: `socket.py` costs every child ~5 ms (start-up imports, design.md)
import array
import os
import select
import struct
import sys
import threading

from .. import process, reduction, util
from . import _common

# `typing` costs a spawned child several ms to import; annotations are strings here anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SERVER_CODE = "from gilfree._start._forkserver import serve; serve()"
_KEY_BYTES = 32
_CLIENT_TIMEOUT = 5.0
_MAX_FDS = 254


def _mac(key: bytes, nonce: bytes) -> bytes:
    import hmac  # start-up imports (design.md): only the fork server and its clients need it

    return hmac.new(key, nonce, "sha256").digest()


def _send_fds(sock: Any, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds))])


def _recv_fds(sock: Any, size: int, maxfds: int) -> tuple[bytes, list[int]]:
    data, anc, _, _ = sock.recvmsg(size, _socket.CMSG_SPACE(maxfds * 4))
    fds = array.array("i")
    for level, kind, payload in anc:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def _recv_exact(sock: Any, n: int) -> bytes:
    return util.recv_exact(sock, n, "the fork server (or its client)")


class ForkServer:
    """The parent's handle on its fork server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._address: str | None = None
        self._alive_w: int | None = None
        self._key = b""
        self._preload: list[str] = ["__main__"]

    def __repr__(self) -> str:
        state = f"pid={self._pid}" if self._pid else "not running"
        return f"<ForkServer {state} preload={self._preload}>"

    def set_preload(self, modules: list[str]) -> None:
        """Modules the server imports once so that children start with them loaded."""
        if not all(isinstance(m, str) for m in modules):
            raise TypeError("module_names must be a list of strings")
        self._preload = list(modules)

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def _forkserver_pid(self) -> int | None:
        """The stdlib's name for the server's pid (``multiprocessing.forkserver._forkserver``)."""
        return self._pid

    def _running(self) -> bool:
        if self._pid is None:
            return False
        try:
            pid, _ = os.waitpid(self._pid, os.WNOHANG)
        except ChildProcessError:
            pid = self._pid
        if pid == 0:
            return True
        self._forget()
        return False

    def _forget(self) -> None:
        if self._alive_w is not None:
            _common.release_lifeline(self._alive_w)
        self._pid = self._alive_w = self._address = None

    def ensure_running(self) -> None:
        """Start the server unless it is running (and restart it if it died)."""
        with self._lock:
            if self._running():
                return
            address = f"\0gilfree-forkserver-{os.getpid()}-{os.urandom(8).hex()}"
            listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            try:
                listener.bind(address)
                listener.listen(128)
                key = os.urandom(_KEY_BYTES)
                r, w = _common.new_lifeline()
                try:
                    pid = _common.spawn_interpreter(SERVER_CODE, [str(listener.fileno()), str(r)], [listener.fileno(), r])
                finally:
                    os.close(r)
            finally:
                listener.close()
            prep = _common.preparation_data("ForkServer", "forkserver")
            config = reduction.dumps({"key": key, "prep": prep, "preload": self._preload})
            _common.write_payload(w, [struct.pack("!Q", len(config)), config])
            self._pid, self._alive_w, self._address, self._key = pid, w, address, key

    def stop(self, timeout: float = 5.0) -> None:
        """Close the alive pipe and reap the server (the server's children are not touched)."""
        with self._lock:
            pid = self._pid
            if pid is None:
                return
            self._forget()
            fd = _common._pidfd(pid)
            if fd is not None:
                from ..connection import wait

                wait([fd], timeout)
                os.close(fd)
            try:
                os.waitpid(pid, os.WNOHANG if fd is not None else 0)
            except ChildProcessError:
                pass

    def connect(self, fds: list[int]) -> tuple[int, int]:
        """Ask the server to fork a child that gets ``fds``; return (status socket fd, child pid)."""
        self.ensure_running()
        assert self._address is not None
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(_CLIENT_TIMEOUT * 2)
            sock.connect(self._address)
            nonce = _recv_exact(sock, _KEY_BYTES)
            sock.sendall(_mac(self._key, nonce))
            _send_fds(sock, b"S", fds)
            pid = struct.unpack("!q", _recv_exact(sock, 8))[0]
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return sock.detach(), pid


forkserver = ForkServer()


class ForkServerPopen(_common.ChildPopen):
    method = "forkserver"

    def _launch(self, process_obj: process.BaseProcess) -> None:
        _common.check_main_guard(self.method)
        prep = _common.preparation_data(process_obj._name, self.method)
        r, w = _common.new_lifeline()
        fds = [r]
        try:
            payload = _common.dump_payload(prep, process_obj, self, fds)
            status_fd, pid = forkserver.connect(fds)
        except BaseException:
            os.close(r)
            _common.release_lifeline(w)
            raise
        os.close(r)
        self._track(pid, w, sentinel=status_fd)
        _common.write_payload(w, payload)

    def poll(self, flag: int = os.WNOHANG) -> int | None:
        if self.returncode is None:
            from ..connection import wait

            if not wait([self.sentinel], 0 if flag == os.WNOHANG else None):
                return None
            try:
                data = os.read(self.sentinel, 4)
                self.returncode = struct.unpack("!i", data)[0] if len(data) == 4 else 255
            except OSError:
                self.returncode = 255
        return self.returncode


# ---------------------------------------------------------------------------------------------------
# The server

def serve() -> None:
    """Main loop of the fork server: ``python -c "...; serve()" <listener fd> <alive fd>``."""
    listener_fd, alive_fd = int(sys.argv[-2]), int(sys.argv[-1])
    (size,) = struct.unpack("!Q", _common._read_exact(alive_fd, 8))
    config: dict[str, Any] = reduction.loads(_common._read_exact(alive_fd, size))
    key: bytes = config["key"]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent to handle
    prep = dict(config["prep"])
    preload = config["preload"]
    if "__main__" not in preload:
        prep.pop("main_path", None)
        prep.pop("main_name", None)
    try:
        _common.prepare(prep)
    except BaseException as exc:  # a broken __main__ is reported by each child that needs it
        util.info("fork server could not import __main__: %r", exc)
    for name in preload:
        if name != "__main__":
            try:
                __import__(name)
            except ImportError:
                util.info("fork server could not preload %r", name)

    sig_r, sig_w = os.pipe()
    os.set_blocking(sig_r, False)
    os.set_blocking(sig_w, False)
    signal.set_wakeup_fd(sig_w)
    signal.signal(signal.SIGCHLD, lambda *args: None)
    listener = _socket.socket(fileno=listener_fd)
    pending: dict[int, Any] = {}
    poller = select.poll()
    for fd in (listener_fd, alive_fd, sig_r):
        poller.register(fd, select.POLLIN)

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = pending.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(struct.pack("!i", os.waitstatus_to_exitcode(status)))
                except OSError:
                    pass
                conn.close()

    while True:
        for fd, _ in poller.poll():
            if fd == alive_fd:
                os._exit(0)  # the parent is gone
            if fd == sig_r:
                try:
                    while os.read(sig_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                reap()
            if fd == listener_fd:
                try:
                    conn = _socket.socket(fileno=listener._accept()[0])  # type: ignore[attr-defined]
                except OSError:
                    continue
                fds: list[int] = []
                try:
                    conn.settimeout(_CLIENT_TIMEOUT)
                    nonce = os.urandom(_KEY_BYTES)
                    conn.sendall(nonce)
                    mac = _recv_exact(conn, 32)
                    import hmac

                    if not hmac.compare_digest(mac, _mac(key, nonce)):
                        raise PermissionError("wrong key")
                    msg, fds = _recv_fds(conn, 1, _MAX_FDS)
                    if msg != b"S" or not fds:
                        raise ValueError("bad request")
                except (OSError, EOFError, ValueError):
                    util.close_fds(*fds)
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        _common.own_atexit()
                        signal.set_wakeup_fd(-1)
                        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                        signal.signal(signal.SIGINT, signal.default_int_handler)
                        listener.close()
                        conn.close()
                        for other in pending.values():
                            other.close()
                        util.close_fds(alive_fd, sig_r, sig_w)
                        from ._child import run_child

                        code = run_child(fds[0], fds)
                    except SystemExit as exc:
                        code = exc.code if isinstance(exc.code, int) else 1
                    except BaseException:
                        import traceback

                        traceback.print_exc()
                    finally:
                        import atexit

                        atexit._run_exitfuncs()
                        util._flush_std_streams()
                        os._exit(code)
                util.close_fds(*fds)
                try:
                    conn.settimeout(None)
                    conn.sendall(struct.pack("!q", pid))
                except OSError:
                    pass
                pending[pid] = conn
