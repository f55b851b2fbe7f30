"""Descriptors that travel where ``SCM_RIGHTS`` cannot: through a one-way pipe, a queue, a plain pickle.

When a :class:`~gilfree.connection.Connection` or a socket is pickled outside a channel that carries
descriptors (:func:`gilfree.reduction.fd_channel`: a child's start-up data, a Unix-socket
Connection), :func:`gilfree.reduction.DupFd` hands a duplicate of the descriptor to this process's
*sharer* and pickles a :class:`SharedFd` -- the sharer's address and a random 128-bit key.  The
receiver's ``SharedFd.detach()`` connects to the sharer, presents the key and gets the descriptor
with ``SCM_RIGHTS``::

    sender process                                    receiver process
    DupFd(fd) ── dup, table[key] = (dup, expiry) ──┐
    pickle: SharedFd(address, key, pid) ───────────┼──> (pipe / queue / anything) ──> SharedFd.detach()
                                                   │                                     │ connect, key
    sharer thread <────────────────────────────────┼─────────────────────────────────────┘
        table.pop(key) ── sendmsg(SCM_RIGHTS) ─────┴──────────────────────────────────> fd, owned

Promises.

* **One receiver, once.**  A key is good for one ``detach``; the entry (and the sender's duplicate)
  is gone after it.  A second ``detach`` of the same pickle raises ``OSError``.
* **Nothing lives forever.**  A descriptor nobody claims is closed :data:`SHARE_TTL` seconds after it
  was pickled (the sender's thread wakes for the next expiry); :func:`stop` closes all at once.
* **Only our user, only with the key.**  The sharer listens on a Unix socket (an abstract one on
  Linux, else in a 0700 directory), checks the peer's uid (``SO_PEERCRED``) and reads a fixed-size
  key within :data:`REQUEST_TIMEOUT` seconds; a wrong key gets a refusal and no descriptor.  Nothing
  is unpickled from a peer.  Requests are read side by side (``poll``; at most :data:`_MAX_PENDING`
  wait for their key, the oldest goes): a peer that sends nothing holds up no other receiver.
* **The sender exits first.**  A process that exits while descriptors it shared are unclaimed
  keeps serving them for up to :data:`EXIT_LINGER` seconds (a child that puts a Connection on a
  queue and returns is the common case: its parent is usually reading already), then closes them.
  A receiver that comes later gets an ``OSError`` naming the sender's pid (the stdlib's sharer dies
  with its process at once, and its receiver gets a bare connection error).  Within the sending
  process itself, ``detach`` takes the descriptor straight from the table.
* **fork.**  A forked child starts with an empty table: it closes the duplicates and the listening
  socket it inherited (the parent still serves them).

Where this runs: ``DupFd`` on the thread that pickles; one daemon thread per process
(``gilfree-resource-sharer``) serves requests while it has descriptors out, and ends
:data:`IDLE_EXIT` seconds after the last was claimed or expired; ``detach`` on the thread that
unpickles.
"""

from __future__ import annotations

import _socket
import array
import os
import secrets
import struct
import sys
import threading
import time

from . import util

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["DupFd", "SharedFd", "revoke", "stop", "SHARE_TTL"]

#: Seconds an unclaimed descriptor is kept for its receiver before the sender closes it.
SHARE_TTL = 300.0
#: Seconds a process that exits waits for the receivers of the descriptors it shared (only while
#: some are unclaimed); then they are closed.
EXIT_LINGER = 2.0
#: Seconds the sharer's thread stays with nothing to hand out before it ends (the next share starts
#: another): a process is multi-threaded only while it has descriptors out.
IDLE_EXIT = 1.0
#: Seconds a peer of the sharer gets to send its key (and a receiver to get its answer).
REQUEST_TIMEOUT = 10.0
_KEY_SIZE = 16
#: Connections whose key has not fully come yet that the sharer keeps at once (more: the oldest goes).
_MAX_PENDING = 64
_MSG_NOSIGNAL = getattr(_socket, "MSG_NOSIGNAL", 0)
_OK = b"\x01"
_REFUSED = b"\x00"


class _Sharer:
    """This process's table of shared descriptors and the thread that hands them out."""

    def __init__(self) -> None:
        # reentrant: a finalizer, weakref callback or signal handler that pickles a Connection may run
        # on a thread that holds it (inside share/take), and must not deadlock there
        self.lock = threading.RLock()
        self.table: dict[bytes, tuple[int, float]] = {}
        self.listener: _socket.socket | None = None
        self.address: Any = None
        self.tmpdir: str | None = None
        self.thread: threading.Thread | None = None
        self.wake_r = self.wake_w = -1
        self.stopping = threading.Event()

    # -- sender side ---------------------------------------------------------------------------
    def share(self, fd: int) -> tuple[Any, bytes]:
        key = secrets.token_bytes(_KEY_SIZE)
        # Every duplicate is made, and closed, with the lock held, and a fork takes the lock first
        # (see _before_fork): a child forked by another thread never inherits one that is in no table.
        with self.lock:
            self._start()
            dup = os.dup(fd)
            try:
                self.table[key] = (dup, time.monotonic() + SHARE_TTL)
            except BaseException:  # KeyboardInterrupt from a signal handler: not a duplicate in no table
                os.close(dup)
                raise
            address = self.address
            if len(self.table) == 1:
                self._wake()  # the thread may be waiting to retire: it has work again
        return address, key

    def take(self, key: bytes) -> int | None:
        with self.lock:
            entry = self.table.pop(key, None)
            if entry is not None and not self.table and self.thread is not threading.current_thread():
                self._wake()  # the last one went without the thread: it may retire
        return None if entry is None else entry[0]

    def _start(self) -> None:
        if self.thread is not None:
            return
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        tmpdir = None
        wake_r = wake_w = -1
        try:
            if sys.platform.startswith("linux"):
                address: Any = "\0gilfree-rs-" + secrets.token_hex(12)
            else:
                import tempfile

                tmpdir = tempfile.mkdtemp(prefix="gilfree-rs-")  # 0700
                address = os.path.join(tmpdir, "s")
            sock.bind(address)
            sock.listen(64)
            sock.setblocking(False)
            wake_r, wake_w = os.pipe()
            os.set_blocking(wake_w, False)
        except BaseException:
            sock.close()
            util.close_fds(*(fd for fd in (wake_r, wake_w) if fd >= 0))
            raise
        if self.thread is not None:
            # a reentrant share (a finalizer or signal handler run on this thread while the lock was
            # held, above) started the thread meanwhile: it serves; ours is not needed
            sock.close()
            util.close_fds(wake_r, wake_w)
            if tmpdir is not None:
                import shutil

                shutil.rmtree(tmpdir, ignore_errors=True)
            return
        self.tmpdir = tmpdir
        self.wake_r, self.wake_w = wake_r, wake_w
        self.listener, self.address = sock, address
        global _finalizer_pid
        if _finalizer_pid != os.getpid():
            _finalizer_pid = os.getpid()
            util.Finalize(None, _linger_then_stop, exitpriority=10)
        stopping = threading.Event()
        self.stopping = stopping
        self.thread = threading.Thread(
            target=self._serve, args=(sock, self.wake_r, stopping), name="gilfree-resource-sharer", daemon=True
        )
        self.thread.start()

    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed by stop()
            pass

    # -- the thread ----------------------------------------------------------------------------
    def _serve(self, listener: _socket.socket, wake_r: int, stopping: threading.Event) -> None:
        """Hand out descriptors, close expired ones, retire when idle.  Requests are read side by side
        (``poll``, nothing blocks): a peer that connects and sends nothing (or a slow trickle) holds only
        its own slot, for at most :data:`REQUEST_TIMEOUT` s, never the claims of others."""
        import select

        poller = select.poll()
        lfd = listener.fileno()
        poller.register(lfd, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        #: connections whose key is still coming: fd -> [socket, key so far, deadline]
        pending: dict[int, list[Any]] = {}
        idle_since: float | None = None
        try:
            while True:
                with self.lock:
                    if stopping.is_set():
                        return
                    now = time.monotonic()
                    table = self.table.copy()  # a snapshot: a reentrant share may change the table
                    expired = [k for k, (_, t) in table.items() if t <= now]
                    fds = [e[0] for e in (self.table.pop(k, None) for k in expired) if e is not None]
                    if self.table:
                        idle_since = None
                        left = [t for _, t in table.values() if t > now]
                        timeout = min(left) - now if left else 0.0  # none left: a reentrant share's, look again
                    else:
                        idle_since = now if idle_since is None else idle_since
                        timeout = idle_since + IDLE_EXIT - now
                        if timeout <= 0:  # nothing to hand out for a while: no thread left behind
                            self._retire()
                            util.close_fds(*fds)
                            return
                    util.close_fds(*fds)
                if fds:
                    util.debug(f"resource sharer: closed {len(fds)} descriptor(s) nobody claimed in {SHARE_TTL:g} s")
                for fd in [fd for fd, p in pending.items() if p[2] <= now]:  # too slow: dropped
                    self._drop(pending, poller, fd)
                if pending:
                    timeout = min(timeout, min(p[2] for p in pending.values()) - now)
                try:
                    events = poller.poll(max(timeout, 0.0) * 1000.0)
                except InterruptedError:
                    continue
                except (OSError, ValueError):  # closed by stop()
                    return
                for fd, ev in events:
                    if fd == wake_r:
                        if ev & select.POLLNVAL:
                            return
                        try:
                            os.read(wake_r, 4096)
                        except BlockingIOError:
                            pass
                        except OSError:
                            return
                    elif fd == lfd:
                        if ev & select.POLLNVAL or stopping.is_set():
                            return
                        self._accept(listener, pending, poller)
                    elif fd in pending:
                        self._read_key(pending, poller, fd)
        finally:
            for p in pending.values():
                p[0].close()
            with self.lock:
                if self.thread is threading.current_thread():
                    # ended without retiring: its socket was closed under it (a finalizer shared while
                    # stop() ran, and stop took this thread's socket); the next share starts anew
                    self._retire()

    def _accept(self, listener: _socket.socket, pending: dict[int, list[Any]], poller: Any) -> None:
        """Take the connections waiting (a few at a time); each is answered when its key has come."""
        import select

        for _ in range(16):
            try:
                fd, _ = listener._accept()  # type: ignore[attr-defined]  # the C socket's accept
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # EMFILE and the like: expiries go on, requests wait
                util.debug(f"resource sharer: accept failed: {exc!r}")
                time.sleep(0.1)
                return
            conn = _socket.socket(fileno=fd)
            try:
                conn.setblocking(False)
                peercred = getattr(_socket, "SO_PEERCRED", None)
                if peercred is not None:  # elsewhere the socket is in a 0700 directory: only our uid gets in
                    _pid, uid, _gid = struct.unpack(
                        "3i", conn.getsockopt(_socket.SOL_SOCKET, peercred, struct.calcsize("3i")))
                    if uid != os.getuid() and uid != 0:
                        conn.send(_REFUSED, _MSG_NOSIGNAL)
                        conn.close()
                        continue
            except OSError as exc:
                util.debug(f"resource sharer: a request failed: {exc!r}")
                conn.close()
                continue
            if len(pending) >= _MAX_PENDING:  # a flood of silent peers: the oldest makes room
                self._drop(pending, poller, next(iter(pending)))
            pending[fd] = [conn, b"", time.monotonic() + REQUEST_TIMEOUT]
            poller.register(fd, select.POLLIN)
            self._read_key(pending, poller, fd)  # a receiver sends its key at once: usually here already

    def _drop(self, pending: dict[int, list[Any]], poller: Any, fd: int) -> None:
        conn = pending.pop(fd)[0]
        try:
            poller.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass
        conn.close()

    def _read_key(self, pending: dict[int, list[Any]], poller: Any, fd: int) -> None:
        """Read what has come of a peer's key; with all of it, answer: the descriptor, or a refusal."""
        entry = pending[fd]
        conn = entry[0]
        try:
            part = conn.recv(_KEY_SIZE - len(entry[1]))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            part = b""
        if not part:
            self._drop(pending, poller, fd)
            return
        entry[1] += part
        if len(entry[1]) < _KEY_SIZE:
            return
        key = entry[1]
        try:
            poller.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass
        del pending[fd]
        try:
            self._answer(conn, key)
        except Exception as exc:  # one peer's trouble is that peer's; the thread serves on
            util.debug(f"resource sharer: a request failed: {exc!r}")
        finally:
            conn.close()

    def _retire(self) -> None:
        """The thread ends (the lock is held): close the socket and pipe; the next share starts anew."""
        self.thread = None
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()
        util.close_fds(*(fd for fd in (self.wake_r, self.wake_w) if fd >= 0))
        self.wake_r = self.wake_w = -1
        self.address = None
        if self.tmpdir is not None:
            import shutil

            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def _answer(self, conn: _socket.socket, key: bytes) -> None:
        """A peer of our uid sent a whole key: it gets the descriptor, or a refusal (never a signal:
        ``MSG_NOSIGNAL``, in case the peer is gone and SIGPIPE is not ignored in this process)."""
        with self.lock:  # the duplicate is closed with the lock held (see share)
            fd = self.take(key)
            if fd is None:
                conn.send(_REFUSED, _MSG_NOSIGNAL)
                return
            try:  # a non-blocking socket: never waits with the lock held
                conn.sendmsg([_OK], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", [fd]))], _MSG_NOSIGNAL)
            finally:
                os.close(fd)  # sent or not, the key is spent: the receiver gets it now or never

    # -- life cycle ----------------------------------------------------------------------------
    def stop(self, timeout: float | None = None) -> None:
        with self.lock:
            thread, self.thread = self.thread, None
            self.stopping.set()
            fds = [fd for fd, _ in self.table.values()]
            self.table.clear()
            util.close_fds(*fds)
            fds = []
            listener, self.listener = self.listener, None
            wake_r, wake_w, self.wake_r, self.wake_w = self.wake_r, self.wake_w, -1, -1
            tmpdir, self.tmpdir = self.tmpdir, None
        if wake_w >= 0:
            try:
                os.write(wake_w, b"\0")
            except OSError:
                pass
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if listener is not None:
            listener.close()
        util.close_fds(*fds, *(fd for fd in (wake_r, wake_w) if fd >= 0))
        if tmpdir is not None:
            import shutil

            shutil.rmtree(tmpdir, ignore_errors=True)

    def linger_then_stop(self) -> None:
        """At exit: give the receivers of what is unclaimed up to :data:`EXIT_LINGER` s, then stop."""
        deadline = time.monotonic() + EXIT_LINGER
        while self.table and self.thread is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.table:
            util.debug(f"resource sharer: {len(self.table)} descriptor(s) unclaimed at exit were closed")
        self.stop(1.0)

    def after_fork_in_child(self) -> None:
        """The parent's table and socket are the parent's: close our inherited copies, start empty."""
        fds = [fd for fd, _ in self.table.values()] + [fd for fd in (self.wake_r, self.wake_w) if fd >= 0]
        listener = self.listener
        self.__init__()  # type: ignore[misc]  # a fresh lock too: the parent's may have been held
        if listener is not None:
            listener.close()
        util.close_fds(*fds)


_sharer = _Sharer()
_finalizer_pid = 0


def _linger_then_stop() -> None:
    _sharer.linger_then_stop()


def _after_fork_in_child() -> None:
    _sharer.after_fork_in_child()


_fork_held = threading.local()


def _before_fork() -> None:
    # no duplicate is between os.dup and the table (or between the table and close) while we fork.
    # Whoever holds the lock does only short non-blocking work; the bound is for what cannot be
    # foreseen (a finalizer of the holder's that waits for a lock the forking thread holds)
    _fork_held.lock = _sharer.lock if _sharer.lock.acquire(timeout=1.0) else None


def _after_fork_in_parent() -> None:
    lock = getattr(_fork_held, "lock", None)
    _fork_held.lock = None
    if lock is not None:
        lock.release()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


class SharedFd:
    """A descriptor held by a process's sharer: what a pickled ``DupFd`` becomes off a channel."""

    __slots__ = ("address", "key", "pid")

    def __init__(self, address: Any, key: bytes, pid: int) -> None:
        self.address, self.key, self.pid = address, key, pid

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return SharedFd, (self.address, self.key, self.pid)

    def __repr__(self) -> str:
        return f"<SharedFd from pid {self.pid}>"

    def detach(self) -> int:
        """Get the descriptor (once); the caller owns it.  ``OSError`` if it cannot be had."""
        if self.pid == os.getpid():
            fd = _sharer.take(self.key)
            if fd is None:
                raise OSError(f"this shared descriptor was received already or expired (unclaimed for {SHARE_TTL:g} s)")
            return fd
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(REQUEST_TIMEOUT)
            try:
                sock.connect(self.address)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise OSError(
                    f"the process that sent this descriptor (pid {self.pid}) has exited or stopped sharing "
                    f"before it was received"
                ) from exc
            sock.sendall(self.key, _MSG_NOSIGNAL)  # a sharer that hung up: EPIPE, never SIGPIPE
            fds = _recv_fds(sock, 1)
        finally:
            sock.close()
        if fds is None:
            raise OSError(
                f"the descriptor sent by pid {self.pid} was received already or expired "
                f"(unclaimed for {SHARE_TTL:g} s)"
            )
        return fds[0]


def _recv_fds(sock: _socket.socket, count: int) -> list[int] | None:
    """Read the sharer's one-byte answer; the descriptors on it, exactly ``count`` (else ``OSError``)."""
    flags = getattr(_socket, "MSG_CMSG_CLOEXEC", 0)
    data, anc, mflags, _ = sock.recvmsg(1, _socket.CMSG_SPACE(count * 4), flags)
    fds = util.fds_from_ancillary(anc)
    if data != _OK or len(fds) != count or mflags & _socket.MSG_CTRUNC:
        util.close_fds(*fds)
        if data == _REFUSED or not data:
            return None
        raise OSError("the resource sharer answered with a malformed message")
    return fds


def DupFd(fd: int) -> SharedFd:
    """Share a duplicate of ``fd`` until one receiver takes it (or :data:`SHARE_TTL` passes)."""
    address, key = _sharer.share(fd)
    return SharedFd(address, key, os.getpid())


def revoke(shared: list[SharedFd]) -> None:
    """Close the descriptors of ``shared`` (this process's, not yet claimed): no receiver will come."""
    pid = os.getpid()
    with _sharer.lock:  # the duplicates are closed with the lock held (see _Sharer.share)
        fds = [_sharer.take(s.key) for s in shared if s.pid == pid]
        util.close_fds(*(fd for fd in fds if fd is not None))


def stop(timeout: float | None = None) -> None:
    """Stop this process's sharer: close every descriptor not yet claimed; the thread ends."""
    _sharer.stop(timeout)
