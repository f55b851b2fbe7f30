"""The manager's server (layer L6, in :mod:`gilfree.managers`): :class:`Server`, which accepts and
authenticates connections (through :mod:`gilfree._gate`), serves each one in a thread of its own, keeps
the object table with a reference count per client, and releases a client's references when its last
connection closes; what it knows of a client (:class:`_ClientState`) and of a connection
(:class:`_ConnState`); :func:`public_methods`.
"""

from __future__ import annotations

import collections
import functools
import importlib
import itertools
import os
import queue
import select
import socket
import threading
import time

from .. import _gate, connection, util
from . import _client
from ._protocol import (
    _ATOMS,
    _WAKE,
    HELLO_MAX,
    MAX_HANDSHAKES,
    MAX_MESSAGE,
    MAX_TLS_HANDSHAKES,
    OP_CALL,
    OP_CREATE,
    OP_DECREF,
    OP_GETVALUE,
    OP_HELLO,
    OP_INCREF,
    OP_PIPES,
    OP_SERVICE,
    R_FAILED,
    R_OK,
    R_PROXY,
    R_REMOTE,
    SPARE_AFTER,
    TLSConfig,
    _address_family,
    _bad_request,
    _BadRequest,
    _call_failed,
    _Channel,
    _check_serializer,
    _ctx,
    _describe,
    _dumps_for,
    _HDR_pack,
    _request_problem,
    _short,
    _XmlChannel,
)
from ._proxies import AutoProxy

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    from typing import Any, Iterable, Mapping


def all_methods(obj: Any) -> list[str]:
    """The names of the callable attributes of ``obj``."""
    return [name for name in dir(obj) if callable(getattr(obj, name, None))]


def public_methods(obj: Any) -> list[str]:
    """The names of the callable attributes of ``obj`` that do not start with ``_``."""
    return [name for name in all_methods(obj) if name[0] != "_"]




def _resolve(spec: Any) -> Any:
    """``"package.module:attr.sub"`` -> the object; anything else is returned as it is."""
    if not isinstance(spec, str):
        return spec
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{spec!r} is not of the form 'module:callable'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class _ConnState:
    """A served connection, as its thread and the server's hang-up watcher see it."""

    __slots__ = ("client", "in_call", "dead", "hup", "fd", "wake", "sock")

    def __init__(self, client: _ClientState, sock: Any) -> None:
        self.client = client
        self.sock = sock
        self.fd = sock.fileno()
        self.wake = -1  # piped connection: the server's own write end of the request pipe (see _wake)
        self.in_call = False  # a method of a shared object is running for this connection
        self.dead = False  # the peer hung up while a method ran; its references are released
        self.hup = False  # the peer hung up (seen by the watcher); the thread will see EOF


class _ClientState:
    """What the server knows of one client process: its connections and the references it holds."""

    __slots__ = ("id", "pid", "conns", "refs", "peer")

    def __init__(self, client_id: bytes, pid: int, peer: str) -> None:
        self.id = client_id
        self.pid = pid
        self.peer = peer
        self.conns = 0
        self.refs: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<client pid {self.pid} ({self.peer}) connections={self.conns} references={sum(self.refs.values())}>"


#: The server's own references (proxies unpickled inside the server, for its own objects).
_LOCAL_CLIENT_ID = b"<server>"
#: Servers running in this process, by their bound address (for proxies rebuilt in the server).


class Server:
    """Serves the objects of a manager: ``Server(registry, address, authkey, serializer)``.

    Binds at once (loopback TCP or a Unix socket; ``address=None``: an abstract Unix socket with a
    random name); :meth:`serve_forever` serves until :meth:`stop`, a client's ``shutdown``, SIGTERM
    (when the caller installs a handler that calls :meth:`stop`) or, with ``lifeline``, until that
    descriptor becomes readable (the parent's sentinel).  ``tls`` (a :class:`TLSConfig`) is for TCP
    addresses only.  ``handshake_timeout`` bounds TLS and authentication for each connection.
    ``keepalive`` (seconds, ``(idle, interval, count[, user timeout])``, or None for the kernel's
    defaults; default :data:`gilfree.connection.KEEPALIVE`, 25 s) bounds how long a TCP client that
    vanished without a FIN or RST keeps its objects (see :func:`gilfree.connection._keepalive_timers`).

    Where this runs: in the server process; :meth:`serve_forever` blocks the calling thread.  Each
    connection gets a thread; methods of the objects run in those threads, concurrently.
    """

    #: the server-level requests a client may make (OP_SERVICE); subclasses may add to them
    services = frozenset({"dummy", "debug_info", "number_of_objects", "shutdown", "get_methods"})

    def __init__(
        self,
        registry: Mapping[str, tuple[Any, Any, Any, Any]],
        address: Any,
        authkey: bytes,
        serializer: str = "pickle",
        *,
        tls: TLSConfig | None = None,
        handshake_timeout: float | None = None,
        keepalive: Any = ...,
        max_message: int = MAX_MESSAGE,
        max_handshakes: int = MAX_HANDSHAKES,
        logger: logging.Logger | None = None,
    ) -> None:
        _check_serializer(serializer)
        if not isinstance(authkey, (bytes, bytearray)):
            raise TypeError(f"authkey should be a byte string, not {type(authkey).__name__}")
        self.registry = dict(registry)
        self.authkey = bytes(authkey)
        self.serializer = serializer
        if serializer == "pickle":
            self._channel_type: Any = _Channel
        else:
            self._channel_type = functools.partial(_XmlChannel, server_side=True)
        self.tls = tls
        self.handshake_timeout = connection.HANDSHAKE_TIMEOUT if handshake_timeout is None else handshake_timeout
        #: keepalive timers of accepted TCP connections (idle s, interval s, probes, user timeout s), or None
        self.keepalive = connection._keepalive_timers(connection.KEEPALIVE if keepalive is ... else keepalive)
        self.max_message = max_message
        self.max_handshakes = max_handshakes
        self._log = logger
        #: the default abstract socket: no file permissions guard it, so only this uid (and root) may connect
        self._private = address is None
        if address is None:
            address = f"\0gilfree-manager-{os.getpid()}-{os.urandom(6).hex()}"
        family = _address_family(address)
        if tls is not None:
            if family == socket.AF_UNIX:
                raise ValueError(f"TLS is for TCP addresses only, not the Unix socket {address!r}")
            self._ssl: Any = tls.server_context()
        else:
            self._ssl = None
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(socket.SOMAXCONN)  # the gate drains it at once; a full queue drops SYNs
        except BaseException:
            sock.close()
            raise
        self._listener: socket.socket | None = sock
        bound = sock.getsockname()
        if family == socket.AF_UNIX and isinstance(bound, bytes):
            bound = bound.decode("utf-8", "surrogateescape")
        self.address = bound
        self._unlink = family == socket.AF_UNIX and isinstance(address, str) and not address.startswith("\0")
        #: addresses under which clients reach this server (the bound one, and what HELLOs said)
        self._aliases: set[Any] = {self.address, address}
        self._objects: dict[str, list[Any]] = {}  # id -> [obj, exposed, method_to_typeid, typeid, refs]
        self._clients: dict[bytes, _ClientState] = {}
        self._local = _ClientState(_LOCAL_CLIENT_ID, os.getpid(), "the server itself")
        self._local.conns = 1
        self._lock = threading.RLock()
        #: DECREFs of this process's own proxies (their __del__), waiting for the lock to be free
        self._local_pending: collections.deque[str] = collections.deque()
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._stopping = False  # = self._stop.is_set(), read by every request (an attribute, not a call)
        self._stop_r, self._stop_w = os.pipe()
        self._conns: set[Any] = set()
        self._watched: dict[int, _ConnState] = {}
        self._watcher: threading.Thread | None = None
        self._epoll = select.epoll()
        self._gate: _gate.Gate | None = None
        #: raise the soft RLIMIT_NOFILE when descriptors run out (set it in a process that only serves)
        self.grow_fd_limit = False
        #: an authenticated connection for the thread started ahead (see _dispatch); None: stop waiting
        self._handoff: queue.SimpleQueue[tuple[Any, str] | None] = queue.SimpleQueue()
        self._spare_waiting = False
        self._log_marks: dict[str, tuple[float, int]] = {}
        self.stats = {"accepted": 0, "refused": 0, "disconnected": 0}
        self.pid = os.getpid()
        _client._local_servers[self.address] = self

    def __repr__(self) -> str:
        state = "stopped" if self._stop.is_set() else "serving"
        return (f"<{type(self).__name__} {_describe(self.address)} {state} objects={len(self._objects)} "
                f"clients={len(self._clients)}{' tls' if self.tls else ''}>")

    @property
    def listener(self) -> socket.socket | None:
        """The listening socket (None once the server stopped).  Closing it before :meth:`serve_forever`
        frees the address without serving (as the stdlib's ``server.listener.close()`` does)."""
        return self._listener

    # -- logging ---------------------------------------------------------------------------------
    def _logger(self) -> logging.Logger | None:
        """The logger given, or the package's if someone configured it (``log_to_stderr``); else None.

        Never imports ``logging`` itself: that costs a fresh server ~10 ms on its first connection."""
        if self._log is not None:
            return self._log
        logger = util._logger
        return logger if logger is not None and logger.handlers else None

    def _info(self, msg: str, *args: Any) -> None:
        logger = self._logger()
        if logger is not None:
            logger.info(msg, *args)

    def _warn(self, msg: str, *args: Any) -> None:
        logger = self._logger()
        if logger is not None:
            logger.warning(msg, *args)

    # -- running ---------------------------------------------------------------------------------
    def serve_forever(self, lifeline: int | None = None) -> None:
        """Serve until stopped (see the class docstring); then close every connection and return.

        The stdlib's ``serve_forever`` ends the process with ``sys.exit(0)``; this one returns, so a
        program can clean up after it.
        """
        accepter = threading.Thread(target=self._accept_loop, name="gilfree-manager-accept", daemon=True)
        accepter.start()
        try:
            # poll, not Event.wait: stop() may be called from a signal handler in this thread
            poller = select.poll()
            poller.register(self._stop_r, select.POLLIN)
            if lifeline is not None:
                poller.register(lifeline, select.POLLIN)
            while not self._stop.is_set():
                # a timeout, though the stop pipe wakes this: a signal the kernel gave another thread
                # only sets CPython's flag, and its handler runs when this thread runs Python again
                if lifeline is not None and any(fd == lifeline for fd, _ in poller.poll(1000)):
                    self._info("manager server %s: the process that started it has exited; stopping",
                               _describe(self.address))
                    break
                if lifeline is None:
                    poller.poll(1000)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
            accepter.join(5)
            self._close_all()

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return (callable from any thread or a signal handler)."""
        if not self._stop.is_set():
            self._stopping = True
            self._stop.set()
            try:
                os.write(self._stop_w, b"x")
            except OSError:
                pass

    def _close_all(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
            if self._unlink:
                try:
                    os.unlink(self.address)
                except OSError:
                    pass
        with self._lock:
            conns = list(self._conns)
            for state in self._watched.values():
                if not state.in_call:
                    self._wake(state)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        watcher = self._watcher
        if watcher is not None:  # it sees the stop pipe (registered in its epoll) and ends
            watcher.join(5)
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._stop_r = self._stop_w = -1
        self._epoll.close()
        _client._local_servers.pop(self.address, None)

    def _accept_loop(self) -> None:
        """Accept and authenticate connections (all at once, in this thread: see :mod:`gilfree._gate`);
        give each authenticated one a thread of its own."""
        listener = self._listener
        assert listener is not None
        uids = None
        if self._private:  # the default abstract socket has no file permissions: only our uid (and root)
            uids = frozenset({os.geteuid(), 0})
        binding = None
        if self._ssl is not None:
            certfile = self.tls.certfile if self.tls is not None else None

            def binding(sock: Any) -> bytes:
                return connection.channel_binding(sock, certfile)

        # a pending TLS peer costs OpenSSL's state (~45 KiB), not a few hundred bytes: a smaller table
        capacity = self.max_handshakes if self._ssl is None else min(self.max_handshakes, MAX_TLS_HANDSHAKES)
        gate = _gate.Gate(listener, self.authkey, timeout=self.handshake_timeout, capacity=capacity,
                          ssl_context=self._ssl, binding=binding, uids=uids, on_failure=self._handshake_failed,
                          grow_fd_limit=self.grow_fd_limit)
        self._gate = gate
        gate.watch(self._stop_r)
        self._start_spare()  # for the first client, who is often connecting already
        try:
            while not self._stop.is_set():
                try:
                    # a spare thread is started once the gate has been idle for a moment (not while a
                    # client waits for its answers: starting a thread takes the GIL for a while)
                    idle = not self._spare_waiting and not gate.pending
                    woken = gate.step(SPARE_AFTER if idle else None)
                    if idle and not gate.ready and not woken and not gate.pending:
                        self._start_spare()
                except Exception as exc:  # never let this thread die: every later client would wait in vain
                    if self._stop.is_set():
                        return
                    self._warn_limited("accept", "manager server %s: accepting connections failed: %s",
                                       _describe(self.address), exc)
                    time.sleep(0.05)
                    continue
                if woken or self._stop.is_set():
                    return
                while gate.ready:
                    self._dispatch(*gate.ready.popleft())
        finally:
            gate.close()
            if self._spare_waiting:
                self._spare_waiting = False
                self._handoff.put(None)

    # -- a thread for each authenticated connection ------------------------------------------------
    # One thread is always started ahead and waits for the next connection: starting a thread takes
    # 0.1-0.5 ms (it must run before start() returns), which would otherwise come between a client's
    # handshake and the answer to its HELLO.  The accept thread alone starts threads and hands over.
    def _dispatch(self, sock: Any, peer: str) -> None:
        if self._spare_waiting:
            self._spare_waiting = False
            self._handoff.put((sock, peer))
        else:
            try:
                threading.Thread(target=self._handle, args=(sock, peer), name=f"gilfree-manager {peer}",
                                 daemon=True).start()
            except Exception as exc:  # RuntimeError: can't start new thread (RLIMIT_NPROC, memory)
                self._turn_away(sock, peer, f"the manager server cannot start a thread for this "
                                            f"connection ({exc}); try again later")

    def _start_spare(self) -> None:
        if self._spare_waiting or self._stopping:
            return
        try:
            threading.Thread(target=self._spare, name="gilfree-manager (waiting for a connection)", daemon=True).start()
        except Exception:  # no thread to spare now: the next connection starts its own (or is told why not)
            return
        self._spare_waiting = True

    def _spare(self) -> None:
        item = self._handoff.get()
        if item is not None:
            sock, peer = item
            threading.current_thread().name = f"gilfree-manager {peer}"
            self._handle(sock, peer)

    def _other_serializer(self, chan: _Channel, data: Any) -> None:
        """A HELLO this server cannot read: if it is plainly the other serializer's (a pickle at an
        XML-RPC server, XML at a pickle server), tell the client so in its own format (only written,
        never read: nothing is unpickled), instead of a bare hang-up."""
        head = bytes(data[:4])
        if head[:1] == b"\x80":
            other = "pickle"
        elif head.lstrip()[:1] == b"<" or head[:2] in (b"\xff\xfe", b"\xfe\xff") or head[:3] == b"\xef\xbb\xbf":
            other = "xmlrpclib"
        else:
            return
        if other == self.serializer:
            return
        reason = (f"this manager's serializer is {self.serializer!r}, the client's is {other!r}: "
                  f"both ends must use the same serializer\n")
        try:
            chan.send_bytes(_dumps_for(other, (R_REMOTE, reason)))
        except Exception:
            pass

    def _turn_away(self, sock: Any, peer: str, reason: str) -> None:
        """Tell an authenticated client (waiting for the reply to its HELLO) why it is not served; close."""
        self.stats["refused"] += 1
        self._warn_limited("turned away", "manager server %s: turned away %s: %s", _describe(self.address), peer, reason)
        try:
            data = _dumps_for(self.serializer, (R_REMOTE, reason + "\n"))
            sock.settimeout(1.0)
            sock.sendall(_HDR_pack(len(data)) + data)
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass

    def _warn_limited(self, kind: str, msg: str, *args: Any) -> None:
        """Log a warning, at most one line per ``kind`` every :data:`gilfree._gate.LOG_INTERVAL` seconds,
        with the count of the ones left out (a flood must not become a flood of log lines)."""
        now = time.monotonic()
        last, quiet = self._log_marks.get(kind, (0.0, 0))
        if last and now - last < _gate.LOG_INTERVAL:
            self._log_marks[kind] = (last, quiet + 1)
            return
        self._log_marks[kind] = (now, 0)
        if quiet:
            msg += f" (and {quiet} more {kind} in the last {now - last:.0f} s)"
        self._warn(msg, *args)

    def _handshake_failed(self, failure: _gate.HandshakeFailed) -> None:
        """A peer failed to authenticate: count it, and log it (rate-limited per kind of failure)."""
        self.stats["refused"] += 1
        self._warn_limited(failure.kind, "manager server %s: refused %s: %s", _describe(self.address), failure.peer,
                           failure.reason)

    def _handle(self, sock: Any, peer: str) -> None:
        """An authenticated connection's thread: HELLO, then requests until the client goes away."""
        with self._lock:
            self._conns.add(sock)
        client = None
        chan: _Channel | None = None
        try:
            chan = self._channel_type(sock, peer, self.max_message)
            try:
                connection._tune_tcp(sock, self.keepalive)
                # the HELLO comes right behind the handshake: a peer that holds it back (it knows the key,
                # but is stuck or hostile) must not hold a thread for good
                chan._deadline = time.monotonic() + self.handshake_timeout
                data = chan.recv_bytes(HELLO_MAX)
                try:
                    hello = chan.loads(data)
                except Exception:
                    self._other_serializer(chan, data)
                    raise
                chan._deadline = None
                if type(hello) is not tuple or len(hello) != 4 or hello[0] != OP_HELLO:
                    raise ValueError(f"expected HELLO, received {str(hello)[:80]}")
                client = self._hello(hello, peer)
                chan.send((R_OK, self.pid))
            except Exception as exc:
                self.stats["refused"] += 1
                self._warn("manager server %s: dropped %s after authentication: %s", _describe(self.address), peer, exc)
                return
            self.stats["accepted"] += 1
            self._info("manager server %s: accepted %s (client pid %d)", _describe(self.address), peer, client.pid)
            _ctx.conn = conn_state = _ConnState(client, sock)
            self._watch(conn_state)
            self._serve(chan, client, hello[3])
        finally:
            state = _ctx.conn
            _ctx.conn = None
            with self._lock:
                self._conns.discard(sock)
                if state is not None:
                    self._watched.pop(state.fd, None)
                    dropped = state.dead
                    state.dead = True
                    if state.wake >= 0:
                        os.close(state.wake)
                        state.wake = -1
                else:
                    dropped = False
            if state is not None:
                try:
                    self._epoll.unregister(state.fd)
                except (OSError, ValueError):
                    pass
            try:
                sock.close()
            except OSError:
                pass
            if chan is not None:
                chan.close()  # its pipes, if any
            if client is not None and not dropped:
                self.stats["disconnected"] += 1
                self._drop_connection(client)

    # -- clients that hang up while a method runs for them -------------------------------------------
    def _watch(self, state: _ConnState) -> None:
        """Watch ``state``'s socket for a hang-up (EPOLLRDHUP), so that a client that dies while one of
        its calls blocks in the server (``Queue.get``) has its references released at once."""
        with self._lock:
            self._watched[state.fd] = state
            if self._watcher is None:
                self._epoll.register(self._stop_r, select.EPOLLIN)  # wakes the watcher at stop
                self._watcher = threading.Thread(target=self._watch_loop, name="gilfree-manager-watch", daemon=True)
                self._watcher.start()
        self._epoll.register(state.fd, select.EPOLLRDHUP | select.EPOLLONESHOT)

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                events = self._epoll.poll()
            except OSError:
                return
            for fd, mask in events:
                if fd == self._stop_r:
                    return
                with self._lock:
                    state = self._watched.get(fd)
                    if state is not None:
                        state.hup = True
                    if state is None or state.dead or not state.in_call:
                        # not busy: its own thread reads the EOF (or the wake-up, on pipes) and cleans up
                        if state is not None and not state.dead:
                            self._wake(state)
                        state = None
                    else:
                        state.dead = True
                if state is not None:
                    err = 0
                    if mask & select.EPOLLERR:  # the connection failed: a keepalive or user timeout, an RST
                        try:
                            err = state.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        except OSError:  # its thread closed it meanwhile
                            pass
                    if err in connection._GONE_ERRNOS:
                        self._warn("manager server %s: client pid %d stopped answering%s while a call was running "
                                   "for it; dropping it (%s)", _describe(self.address), state.client.pid,
                                   self._keepalive_text(), os.strerror(err))
                    else:
                        self._info("manager server %s: client pid %d hung up while a call was running for it",
                                   _describe(self.address), state.client.pid)
                    self.stats["disconnected"] += 1
                    self._drop_connection(state.client)

    def _keepalive_text(self) -> str:
        timers = self.keepalive
        if timers is None:
            return " (its machine or the network is gone)"
        return f" (no answer to TCP keepalive for {connection._keepalive_bound(timers):g} s: its machine or the network is gone)"

    def _hello(self, hello: tuple[Any, ...], peer: str) -> _ClientState:
        _, client_id, pid, alias = hello
        if not isinstance(client_id, bytes) or client_id == _LOCAL_CLIENT_ID or not isinstance(pid, int):
            raise ValueError("malformed HELLO")
        with self._lock:
            client = self._clients.get(client_id)
            if client is None:
                client = self._clients[client_id] = _ClientState(client_id, pid, peer)
            client.conns += 1
            if alias is not None and len(self._aliases) < 64:
                try:
                    self._aliases.add(alias)
                except TypeError:
                    pass
        return client

    def _drop_connection(self, client: _ClientState) -> None:
        """A connection of ``client`` closed; if it was its last, release every reference it held."""
        doomed: list[Any] = []
        with self._lock:
            client.conns -= 1
            if client.conns > 0 or self._clients.get(client.id) is not client:
                return
            del self._clients[client.id]
            refs, client.refs = client.refs, {}
            for ident, n in refs.items():
                doomed.append(self._release_locked(ident, n))
        released = sum(1 for d in doomed if d is not None)
        if refs:
            self._info("manager server %s: client pid %d is gone; dropped its %d references (%d objects released)",
                       _describe(self.address), client.pid, sum(refs.values()), released)
        del doomed  # the objects' destructors run here, outside the lock

    # -- the object table --------------------------------------------------------------------------
    def _register_locked(self, client: _ClientState, typeid: str, obj: Any, exposed: Any, m2t: Any) -> str:
        ident = f"{next(self._ids):x}"
        self._objects[ident] = [obj, frozenset(exposed), m2t or None, typeid, 1]
        client.refs[ident] = client.refs.get(ident, 0) + 1
        return ident

    def _release_locked(self, ident: str, n: int) -> Any:
        """Drop ``n`` references to ``ident``; return the entry if that was the last (to delete later)."""
        entry = self._objects.get(ident)
        if entry is None:
            return None
        entry[4] -= n
        if entry[4] > 0:
            return None
        return self._objects.pop(ident)

    def _exposed_for(self, typeid: str, obj: Any) -> tuple[Any, Any]:
        try:
            _, exposed, m2t, _ = self.registry[typeid]
        except KeyError:
            exposed, m2t = None, None
        if exposed is None:
            exposed = public_methods(obj)
        return tuple(exposed), m2t

    def _spec_for(self, typeid: str) -> Any:
        """How a client builds the proxy for ``typeid``: the proxy class, or None for AutoProxy."""
        entry = self.registry.get(typeid)
        proxytype = entry[3] if entry is not None else None
        if proxytype is None or proxytype is AutoProxy:
            return None
        return proxytype

    def create(self, client: _ClientState, typeid: str, args: tuple[Any, ...], kwds: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
        """Create an object of ``typeid``; ``client`` holds the first reference.  Runs in a connection thread."""
        try:
            entry = self.registry[typeid]
        except KeyError:
            raise ValueError(f"unknown typeid {typeid!r}: this server knows {sorted(self.registry)}") from None
        factory, exposed, m2t, proxytype = entry
        if factory is None:
            raise TypeError(f"typeid {typeid!r} has no callable in the server (registered with callable=None); "
                            "objects of that type can only be returned by methods")
        if isinstance(factory, str):
            factory = _resolve(factory)
            self.registry[typeid] = (factory, exposed, m2t, proxytype)
        obj = factory(*args, **kwds)
        if exposed is None:
            exposed = public_methods(obj)
        with self._lock:
            ident = self._register_locked(client, typeid, obj, exposed, m2t)
        return ident, tuple(exposed)

    def incref(self, client: _ClientState, ident: str) -> None:
        with self._lock:
            entry = self._objects.get(ident)
            if entry is None:
                raise KeyError(
                    f"the manager has no object with id {ident!r}: it was released because no proxy referred "
                    "to it any more (keep a proxy alive until every process that receives a copy has it)"
                )
            entry[4] += 1
            client.refs[ident] = client.refs.get(ident, 0) + 1
        if self._local_pending:
            self._drain_local()

    def decref(self, client: _ClientState, idents: Iterable[str]) -> None:
        doomed = []
        with self._lock:
            for ident in idents:
                if type(ident) is not str:
                    continue  # not an id (a malformed DECREF): nothing of this client's
                n = client.refs.get(ident, 0)
                if n <= 0:
                    continue  # not this client's (a stale or forged id): ignore
                if n == 1:
                    del client.refs[ident]
                else:
                    client.refs[ident] = n - 1
                doomed.append(self._release_locked(ident, 1))
        del doomed
        if self._local_pending:
            self._drain_local()

    # -- serving one connection ----------------------------------------------------------------------
    def _serve(self, chan: _Channel, client: _ClientState, alias: Any) -> None:
        _ctx.server, _ctx.client, _ctx.alias = self, client, alias
        objects = self._objects
        recv = chan.recv_frame
        loads = chan.loads
        state = _ctx.conn
        assert state is not None
        # The hot path (a method call) is written out here: one frame for the read, one for the reply.
        while not self._stopping:
            # nothing of the last request stays referenced while we wait: a released object must
            # really go (its nested proxies release theirs)
            data = msg = entry = result = None
            reply: Any = None
            try:
                data = recv()
            except EOFError:
                return
            except OSError as exc:
                if self._stopping:
                    pass
                elif connection._peer_gone(exc):
                    self._warn("manager server %s: client pid %d (%s) stopped answering%s; dropping it (%s)",
                               _describe(self.address), client.pid, chan.peer, self._keepalive_text(), exc.strerror or exc)
                else:
                    self._warn("manager server %s: dropped client pid %d (%s): %s",
                               _describe(self.address), client.pid, chan.peer, exc)
                return
            try:
                msg = loads(data)
                op = msg[0]
            except Exception as exc:
                if msg is None:
                    # an authenticated peer sent something we cannot read (a class the server cannot
                    # import, a corrupt pickle): answer with an error, the stream itself is intact
                    how = "unpickle" if self.serializer == "pickle" else f"read (serializer {self.serializer!r})"
                    text = f"the manager could not {how} a request: {type(exc).__name__}: {exc}\n"
                else:
                    text = _bad_request(msg, exc)
                if not self._reply(chan, (R_REMOTE, text), client):
                    return
                continue
            # A request of the wrong shape (a missing item, an unhashable id, a name that is not a str)
            # fails with one of these exceptions somewhere below; it is answered here, so the checks
            # cost nothing on the hot path (a try block is free until something raises).
            try:
                if op == OP_CALL:
                    try:
                        entry = objects[msg[1]]
                    except KeyError:
                        reply = (R_REMOTE, f"no object with id {msg[1]!r} in the manager (it was released)\n")
                    else:
                        name = msg[2]
                        if name in entry[1]:  # exposed
                            state.in_call = True
                            try:
                                kwds = msg[4]
                                if kwds:
                                    result = getattr(entry[0], name)(*msg[3], **kwds)
                                else:
                                    result = getattr(entry[0], name)(*msg[3])
                            except Exception as exc:
                                reply = _call_failed(msg, exc)
                            else:
                                m2t = entry[2]
                                if m2t is None or name not in m2t:
                                    reply = (R_OK, result)
                                else:
                                    reply = self._new_proxy(client, m2t[name], result)
                            state.in_call = False
                            if state.dead:
                                return
                        else:
                            reply = self._not_exposed(entry, name)
                elif op == OP_DECREF:
                    self.decref(client, msg[1])
                    continue
                elif op == OP_PIPES:
                    if not self._pipes(chan, state):
                        return
                    continue
                else:
                    reply = self._other(client, op, msg)
            except (IndexError, TypeError, KeyError, ValueError, AttributeError) as exc:
                state.in_call = False
                if state.dead:
                    return
                if op == OP_DECREF:  # no reply: the client does not wait for one
                    self._warn("manager server %s: ignored a malformed DECREF from client pid %d (%s): %s",
                               _describe(self.address), client.pid, chan.peer, _bad_request(msg, exc).rstrip())
                    continue
                reply = (R_REMOTE, _bad_request(msg, exc))
            if not self._reply(chan, reply, client):
                return
            if op == OP_SERVICE and reply[0] == R_OK and msg[1] == "shutdown":  # R_OK: msg[1] is a str
                self.stop()
                return

    def _pipes(self, chan: _Channel, state: _ConnState) -> bool:
        """OP_PIPES: move a Unix-socket connection's messages to a pair of pipes made here, whose client
        ends go to the client over the socket (SCM_RIGHTS); False if the client is gone.  Only asked
        for after authentication and HELLO, and the server receives no descriptors: the client does."""
        if chan.piped or chan.sock.family != socket.AF_UNIX or self._ssl is not None:
            return self._reply(chan, (R_REMOTE, "pipes are for plain Unix-socket connections, once\n"), state.client)
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        data = chan.dumps((R_OK, None))
        try:
            socket.send_fds(chan.sock, [_HDR_pack(len(data)) + data], [req_w, rep_r])
        except OSError:
            for fd in (req_r, req_w, rep_r, rep_w):
                os.close(fd)
            return False
        os.close(rep_r)
        chan.use_pipes(req_r, rep_w)
        with self._lock:
            if state.dead or self._stopping:
                os.close(req_w)
                return False
            state.wake = req_w
        return True

    def _wake(self, state: _ConnState) -> None:
        """Wake ``state``'s thread if it waits for a request on a pipe (the server stops, or the client
        hung up: a pipe shows no EOF while the server holds a write end).  Called with the lock held;
        the pipe is empty then (its thread waits for a request, or stops anyway), so this never blocks."""
        if state.wake >= 0:
            try:
                os.write(state.wake, _WAKE)
            except OSError:
                pass

    @staticmethod
    def _not_exposed(entry: list[Any], name: str) -> Any:
        if type(name) is not str:
            return (R_REMOTE, f"bad request: the method name should be a str, not {type(name).__name__}\n")
        if name == "__repr__" or name == "__str__":
            obj = entry[0]
            return (R_OK, repr(obj) if name == "__repr__" else str(obj))
        return (R_FAILED, AttributeError(
            f"method {name!r} of {entry[3]!r} object is not in exposed={sorted(entry[1])}"))

    def _new_proxy(self, client: _ClientState, typeid: str, result: Any) -> Any:
        """A method listed in ``method_to_typeid`` returned ``result``: serve it, reply with a proxy spec."""
        exposed_new, m2t_new = self._exposed_for(typeid, result)
        with self._lock:
            ident = self._register_locked(client, typeid, result, exposed_new, m2t_new)
        return (R_PROXY, (self._spec_for(typeid), typeid, ident, exposed_new))

    def _other(self, client: _ClientState, op: int, msg: tuple[Any, ...]) -> Any:
        """Every request but a call, a DECREF and OP_PIPES.  The request's shape is checked first (an
        R_REMOTE reply saying what is wrong); an exception of the work itself is the R_ERR reply."""
        problem = _request_problem(msg)
        if problem is not None:
            return (R_REMOTE, f"bad request {_short(msg)}: {problem}\n")
        try:
            if op == OP_CREATE:
                # an object that cannot be made (m.Pool(0)) fails below: R_FAILED, a RemoteError that
                # is also the factory's exception type
                return (R_OK, self.create(client, msg[1], msg[2], msg[3] or {}))
            if op == OP_INCREF:
                self.incref(client, msg[1])
                return (R_OK, None)
            if op == OP_GETVALUE:
                try:
                    return (R_OK, self._objects[msg[1]][0])
                except KeyError:
                    return (R_REMOTE, f"no object with id {msg[1]!r} in the manager (it was released)\n")
            if op == OP_SERVICE:
                name = msg[1]
                if name not in self.services:
                    return (R_REMOTE, f"unknown manager request {name!r}; known: {sorted(self.services)}\n")
                method = getattr(self, "service_" + name)
                try:
                    return (R_OK, method(client, *msg[2]))
                except TypeError as exc:
                    import inspect  # only here: a service called with the wrong arguments, or failing

                    try:
                        inspect.signature(method).bind(client, *msg[2])
                    except TypeError:
                        return (R_REMOTE, f"bad request {_short(msg)}: wrong arguments for the manager request "
                                          f"{name!r}: {exc}\n")
                    raise
            if op == OP_HELLO:
                return (R_REMOTE, "HELLO sent twice on one connection\n")
            return (R_REMOTE, f"bad request {_short(msg)}: unknown opcode {op!r}\n")
        except _BadRequest as exc:
            return (R_REMOTE, _bad_request(msg, exc))
        except Exception as exc:  # the server could not do it: a RemoteError in the client (as the stdlib's)
            return (R_FAILED, exc)

    def _reply(self, chan: _Channel, reply: Any, client: _ClientState) -> bool:
        """Send ``reply``; False if the client is gone.  A reply that cannot be pickled becomes a RemoteError."""
        if type(reply[1]) in _ATOMS:  # no proxy inside: no need to tell BaseProxy.__reduce__
            data = chan.dumps(reply)
        else:
            ctx = _ctx
            ctx.replying = True
            try:
                data = chan.dumps(reply)
            except Exception as exc:
                what = "result" if reply[0] == R_OK else "exception"
                data = chan.dumps((R_REMOTE, f"the manager could not pickle the {what} "
                                             f"({type(reply[1]).__name__}) to send it back: {exc}\n"))
            finally:
                ctx.replying = False
        try:
            chan.send_bytes(data)
            return True
        except OSError as exc:
            self._info("manager server %s: client pid %d went away before its reply was sent: %s",
                       _describe(self.address), client.pid, exc)
            return False

    # -- services --------------------------------------------------------------------------------
    def service_dummy(self, client: _ClientState) -> None:
        return None

    def service_shutdown(self, client: _ClientState) -> None:
        self._info("manager server %s: shutdown requested by client pid %d", _describe(self.address), client.pid)

    def service_number_of_objects(self, client: _ClientState) -> int:
        return len(self._objects)

    def service_debug_info(self, client: _ClientState) -> str:
        with self._lock:
            lines = [f"  {ident}:       refcount={entry[4]}\n    {repr(entry[0])[:75]}"
                     for ident, entry in self._objects.items()]
        return "\n".join(lines)

    def service_get_methods(self, client: _ClientState, ident: str) -> tuple[str, ...]:
        if type(ident) is not str:
            raise _BadRequest(f"an object id should be a str, not {type(ident).__name__}")
        return tuple(self._objects[ident][1])

    def _local_incref(self, ident: str) -> bool:
        try:
            self.incref(self._local, ident)
            return True
        except KeyError:
            return False

    def _local_decref(self, ident: str) -> None:
        # Runs in a proxy's __del__: maybe inside a collection on a thread that is in the middle of
        # changing the tables under the (reentrant) lock.  Re-entering would change them under its
        # feet, and waiting is not allowed there: leave it to the next incref/decref of any thread.
        self._local_pending.append(ident)
        if not self._lock._is_owned():  # type: ignore[attr-defined]
            self._drain_local()

    def _drain_local(self) -> None:
        if self._lock._is_owned():  # type: ignore[attr-defined]
            return  # an outer frame of this thread is changing the tables: the next incref/decref drains
        pending = self._local_pending
        idents = []
        while pending:
            idents.append(pending.popleft())
        if idents:
            self.decref(self._local, idents)
