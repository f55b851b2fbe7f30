"""The gate: authenticating accepted connections all at once, with no thread and almost no memory per peer
(layer L2, beside :mod:`gilfree.connection`).

A :class:`Listener` with an authkey and a manager's :class:`~gilfree.managers.Server` both put their
listening socket behind a :class:`Gate`.  The gate accepts every connection at once, runs each
peer's handshake (TLS if configured, then the HMAC-SHA256 challenge in both directions, the frames
of :func:`gilfree.connection.deliver_challenge` and ``answer_challenge``) as a small state machine
driven by one ``epoll``, and hands over only the peers that proved the key::

    listening socket ── accept() ──▶ pending peer: a non-blocking socket, a deadline, a 260-byte buffer
                                       │ TLS (server side, if configured): the first 9 bytes must be
                                       │   a ClientHello of at most TLS_HELLO_MAX bytes (peeked,
                                       │   before OpenSSL sees any); do_handshake() until done
                                       │ send   #CHALLENGE#{sha256}<40 random bytes>
                                       │ read   their answer (an empty frame first is skipped: a
                                       │        manager client's "are you TLS?" probe)
                                       │ send   #WELCOME#   (or #FAILURE#, and the peer is closed)
                                       │ read   their challenge;  send our answer
                                       │ read   #WELCOME#
                                       ▼
                                     ready: handed to the owner (a blocking socket, nothing read past
                                     the last handshake frame)

What a peer that has not authenticated may cost: one socket, one entry in a table of at most
``capacity`` entries, and reads of at most :data:`AUTH_MAX` bytes into a buffer of that size (a TLS
peer also holds OpenSSL's handshake state, ~45 KiB: a TLS server gives the gate a smaller table).  Nothing
it sends is unpickled, no descriptor it sends is taken (plain ``recv``: the kernel discards
``SCM_RIGHTS``), no length it claims is allocated (a frame of more than :data:`AUTH_MAX` bytes, or any
of the long / out-of-band headers, ends the handshake at once).  Each peer has a deadline
(``timeout``).  When the table is full, a newcomer is not turned away: the oldest pending peer of the
largest group is dropped -- one still in its TLS handshake first, if any -- (a group is an IPv4
address, IPv4-mapped ones included, an IPv6 /64, or a Unix peer's uid), so a
single source that floods the gate only ever displaces its own connections, and on a shared address
(loopback) a real client, which finishes its handshake in a few milliseconds, would have to be
outlived by ``capacity`` newer connections to be dropped.  If ``accept`` fails for want of
descriptors (EMFILE) while someone waits, the soft limit is raised once (``grow_fd_limit``), then a
pending peer is dropped by the same rule, and with none pending the newcomer is accepted on a spare
descriptor and turned away.  Each turn accepts first (a full listen queue drops SYNs), then advances
the peers past TLS, then those in it, each for a bounded number of steps.

Peers turned away by the gate (table full, no descriptor, a uid not allowed, a plain client at a
TLS server) are
told why in a frame ``#REFUSED#<reason>`` when the socket can take it, so that a gilfree client
says what happened instead of "connection closed".

Where this runs: in the thread that calls :meth:`Gate.step` (a manager server's accept thread, or
the thread in ``Listener.accept()``); nothing here blocks except :meth:`Gate.step`'s wait, which
ends at the next event, the earliest deadline, or its ``timeout``.
"""

from __future__ import annotations

import collections
import errno
import hmac
import os
import select
import socket
import struct
import time

from . import connection

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

AUTH_MAX = connection._AUTH_MAX
_HDR = struct.Struct("!i")
_CHALLENGE = connection._CHALLENGE
_WELCOME = connection._WELCOME
_FAILURE = connection._FAILURE
_DIGEST = connection._DIGEST
_REFUSED = connection._REFUSED
_NONCE_BYTES = connection._NONCE_BYTES
_TLS_HANDSHAKE_RECORD = b"\x16"

# steps of a pending peer
_TLS_PEEK, _TLS, _ANSWER, _THEIRS, _VERDICT = range(5)
_STEP_NAMES = ("waiting for the TLS handshake", "in the TLS handshake", "waiting for the answer to our challenge",
               "waiting for the peer's challenge", "waiting for the verdict")

#: Largest ClientHello a TLS peer may announce (real ones are 0.2-2 KiB; with post-quantum key shares ~3).
TLS_HELLO_MAX = 16 << 10
#: Most connections accepted per wake-up before pending handshakes get their turn.
_ACCEPT_BATCH = 64
#: Most reads or writes for one peer before the others get their turn (a whole handshake takes ~10).
_STEPS_PER_TURN = 16
#: Seconds between two log lines about the same kind of refusal (the others are counted).
LOG_INTERVAL = 10.0


class _Pending:
    __slots__ = ("sock", "fd", "group", "name", "deadline", "step", "buf", "want", "out", "message",
                 "binding", "events", "probed")

    def __init__(self, sock: Any, group: Any, name: str, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.group = group
        self.name = name
        self.deadline = deadline
        self.step = _ANSWER
        self.buf = b""  # the frame being read: header, then body (never more than AUTH_MAX + 4 bytes)
        self.want = 0  # body length once the header is in
        self.out = b""  # bytes still to send
        self.message = b""  # our challenge's message (what their answer is an HMAC of)
        self.binding = b""
        self.events = 0
        self.probed = False  # the one empty frame a peer may send (a manager client's TLS probe) came


class HandshakeFailed(Exception):
    """A peer failed its handshake (``kind``: "refused", "timeout", "closed", "evicted", "invalid"), or was
    turned away for want of the server's own resources ("busy": no descriptor left)."""

    def __init__(self, peer: str, kind: str, reason: str) -> None:
        super().__init__(f"{peer}: {reason}")
        self.peer = peer
        self.kind = kind
        self.reason = reason


def peer_group(sock: Any, address: Any) -> tuple[Any, str]:
    """(group, readable name) of an accepted peer: its IPv4 address, its IPv6 /64, or its uid."""
    if isinstance(address, tuple) and address:
        host = str(address[0])
        if ":" in host:
            try:
                import ipaddress

                ip6 = ipaddress.IPv6Address(host.split("%")[0])
                mapped = ip6.ipv4_mapped  # an IPv4 client of a dual-stack server: its own group
                group: Any = ("ip", str(mapped)) if mapped is not None else ("ip6", ip6.packed[:8])
            except ValueError:
                group = ("ip6", host)
            return group, f"[{host}]:{address[1]}"
        return ("ip", host), f"{host}:{address[1]}"
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", creds)
        return ("uid", uid), f"unix peer pid {pid} uid {uid}"
    except OSError:
        return ("uid", None), "unix peer"


def raise_fd_limit() -> bool:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (at most 65,536); True if it grew.
    Done on the first EMFILE, not at start-up: importing ``resource`` costs a server 0.5 ms.  Nothing
    in a manager's server uses ``select.select`` on a connection (its limit is 1,024)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return True
    except (ImportError, ValueError, OSError):
        pass
    return False


def _frame(data: bytes) -> bytes:
    return _HDR.pack(len(data)) + data


class Gate:
    """Accepts connections on ``listener`` and authenticates them with ``authkey``, all concurrently.

    ``Gate(listener, authkey, timeout=..., capacity=..., ssl_context=None, binding=None,
    uids=None, on_failure=None)``:

    - ``ssl_context``: a server-side :class:`ssl.SSLContext`; the TLS handshake runs first.
    - ``binding(ssl_socket) -> bytes``: the channel binding mixed into both HMACs (see
      :func:`gilfree.connection.channel_binding`); the client must compute the same.
    - ``uids``: for a Unix socket, the peer uids let in (others are refused before anything is
      read); None lets every uid try the authkey.
    - ``on_failure(HandshakeFailed)``: called for each peer that fails (in the stepping thread).

    :meth:`step` waits for and handles events; authenticated sockets collect in :attr:`ready` as
    ``(socket, peer name)`` (blocking sockets).  :meth:`close` closes the pending peers (not the
    listener, which belongs to the caller).
    """

    def __init__(
        self,
        listener: socket.socket,
        authkey: bytes,
        *,
        timeout: float,
        capacity: int,
        ssl_context: Any = None,
        binding: Callable[[Any], bytes] | None = None,
        uids: frozenset[int] | None = None,
        on_failure: Callable[[HandshakeFailed], None] | None = None,
        grow_fd_limit: bool = False,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.listener = listener
        self.authkey = bytes(authkey)
        self.timeout = timeout
        self.capacity = capacity
        self.ssl_context = ssl_context
        self.binding = binding
        self.uids = uids
        self.on_failure = on_failure
        self.grow_fd_limit = grow_fd_limit
        self._tcp = listener.family != socket.AF_UNIX
        listener.setblocking(False)
        self._listen_fd = listener.fileno()
        self._epoll = select.epoll()
        self._epoll.register(self._listen_fd, select.EPOLLIN)
        self._extra: set[int] = set()
        #: fd -> pending peer, in order of arrival (= order of deadlines: all have the same timeout)
        self._pending: dict[int, _Pending] = {}
        self._groups: dict[Any, dict[int, _Pending]] = {}
        self.ready: collections.deque[tuple[Any, str]] = collections.deque()
        #: a descriptor kept in reserve: closed to accept (and refuse) a peer when the process has no other
        self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.stats = {"authenticated": 0, "refused": 0, "evicted": 0, "timeout": 0, "closed": 0, "invalid": 0,
                      "busy": 0}

    def __repr__(self) -> str:
        return f"<Gate pending={len(self._pending)}/{self.capacity} ready={len(self.ready)} {self.stats}>"

    @property
    def pending(self) -> int:
        return len(self._pending)

    def watch(self, fd: int) -> None:
        """Also wake :meth:`step` when ``fd`` becomes readable (a stop pipe); step then returns it."""
        self._epoll.register(fd, select.EPOLLIN)
        self._extra.add(fd)

    # -- the loop ----------------------------------------------------------------------------------
    def step(self, timeout: float | None = None) -> list[int]:
        """Wait up to ``timeout`` seconds (None: until something happens) for events and handle them;
        return the watched fds (:meth:`watch`) that became readable."""
        wait = -1.0 if timeout is None else max(0.0, timeout)
        if self._pending:
            first = next(iter(self._pending.values()))
            until = max(0.0, first.deadline - time.monotonic())
            wait = until if wait < 0 else min(wait, until)
        try:
            events = self._epoll.poll(wait)
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            events = []
        woken = []
        ready = []
        for fd, _mask in events:
            if fd == self._listen_fd:
                self._accept()  # first: a full listen queue makes the kernel drop a newcomer's SYN (1 s)
            elif fd in self._extra:
                woken.append(fd)
            else:
                p = self._pending.get(fd)
                if p is not None:
                    ready.append(p)
        # peers past TLS first: their steps are cheap; a TLS handshake costs a private-key operation
        for p in ready:
            if p.step >= _ANSWER:
                self._advance(p)
        for p in ready:
            if p.step < _ANSWER and p.events != -1:
                self._advance(p)
        self._expire()
        return woken

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if not self._out_of_descriptors():
                        return
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # the peer gave up before we accepted it
                raise
            self._admit(sock, address)

    def _out_of_descriptors(self) -> bool:
        """``accept`` failed for want of a descriptor (Linux reserves one before it looks at the queue, so
        this also happens when nobody waits).  If someone does wait: make room by dropping a pending
        peer (the oldest of the largest group), or, with none pending, accept it on the spare descriptor
        and turn it away saying why -- so that a full table of authenticated connections does not
        leave a connection in the queue for ``epoll`` to report again and again.  True to try again."""
        if not connection.wait([self._listen_fd], 0):  # poll, not select: any fd number
            return False  # nobody is waiting
        if self.grow_fd_limit:
            self.grow_fd_limit = False  # once
            if raise_fd_limit():
                return True
        if self._pending:
            self._evict(self._victim(), "the server is out of file descriptors")
            return True
        if self._spare < 0:
            return False
        os.close(self._spare)
        self._spare = -1
        try:
            sock, address = self.listener.accept()
        except OSError:
            return False
        finally:
            try:
                self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._spare = -1
        _, name = peer_group(sock, address)
        self._say_refused(sock, "the server is out of file descriptors; try again later")
        sock.close()
        self._failed(HandshakeFailed(name, "busy", "turned away: the server is out of file descriptors"))
        return True

    def _victim(self) -> _Pending:
        """Who makes room: in the largest group, the oldest peer still in its TLS handshake if there is one
        (a peer past TLS has done the work a real client does; a replayed ClientHello has not), else
        the oldest."""
        group = max(self._groups.values(), key=len)
        if self.ssl_context is not None:
            for p in group.values():
                if p.step < _ANSWER:
                    return p
        return next(iter(group.values()))

    def _admit(self, sock: socket.socket, address: Any) -> None:
        group, name = peer_group(sock, address)
        if self.uids is not None and not self._tcp and group[1] not in self.uids:
            self._say_refused(sock, f"this server accepts connections only from uid {sorted(self.uids)[0]}")
            sock.close()
            self._failed(HandshakeFailed(name, "refused", "refused: its uid may not connect to this socket"))
            return
        if len(self._pending) >= self.capacity:
            self._evict(self._victim(),
                        f"{self.capacity} connections were authenticating; the oldest of the largest group is dropped")
        sock.setblocking(False)
        if self._tcp:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        p = _Pending(sock, group, name, time.monotonic() + self.timeout)
        self._pending[p.fd] = p
        self._groups.setdefault(group, {})[p.fd] = p
        if self.ssl_context is not None:
            p.step = _TLS_PEEK
            self._arm(p, select.EPOLLIN)
            return
        self._challenge(p)
        self._advance(p)

    # -- one peer ----------------------------------------------------------------------------------
    def _arm(self, p: _Pending, events: int) -> None:
        """Wait for ``events`` on ``p``'s socket (registering it on first use)."""
        if p.events == events or p.events == -1:
            return
        if p.events == 0:
            self._epoll.register(p.fd, events)
        else:
            self._epoll.modify(p.fd, events)
        p.events = events

    def _challenge(self, p: _Pending) -> None:
        p.message = _DIGEST + os.urandom(_NONCE_BYTES)
        p.out = _frame(_CHALLENGE + p.message)
        p.step = _ANSWER

    def _advance(self, p: _Pending) -> None:
        """Move ``p``'s handshake as far as its socket allows; re-arm its events."""
        try:
            for _ in range(_STEPS_PER_TURN):
                if p.out:
                    k = p.sock.send(p.out)
                    p.out = p.out[k:]
                    if p.out:
                        self._arm(p, select.EPOLLOUT)
                        return
                step = p.step
                if step == _TLS_PEEK:
                    head = p.sock.recv(9, socket.MSG_PEEK)
                    if not head:
                        raise EOFError
                    if head[:1] != _TLS_HANDSHAKE_RECORD:
                        self._say_refused(p.sock, "this manager speaks TLS: connect with tls=TLSConfig(...) "
                                                  "(cafile=, and certfile=/keyfile= if it asks for a client certificate)")
                        self._fail(p, "refused", "refused: a plain (non-TLS) client at a TLS server")
                        return
                    if len(head) < 9:  # the record and handshake headers are not all here yet: wait for more
                        self._arm(p, select.EPOLLIN | select.EPOLLET)  # (level-triggered would spin on them)
                        return
                    # record: type, version (2), length (2); handshake: type (1: ClientHello), length (3).
                    # OpenSSL makes room for the length a ClientHello claims: refuse a claim no client makes
                    claimed = int.from_bytes(head[6:9], "big")
                    if head[1] != 3 or head[5] != 1 or claimed > TLS_HELLO_MAX:
                        raise _Invalid(f"sent a TLS record that is not a ClientHello of at most {TLS_HELLO_MAX} "
                                       f"bytes (version {head[1]}.{head[2]}, handshake type {head[5]}, {claimed} "
                                       "bytes claimed)")
                    p.sock = self.ssl_context.wrap_socket(p.sock, server_side=True, do_handshake_on_connect=False)
                    p.step = _TLS
                    continue
                if step == _TLS:
                    p.sock.do_handshake()
                    if self.binding is not None:
                        p.binding = self.binding(p.sock)
                    self._challenge(p)
                    continue
                frame = self._read_frame(p)
                if frame is None:
                    self._arm(p, select.EPOLLIN)
                    return
                if step == _ANSWER:
                    expected = connection._auth_digest(self.authkey, p.message, p.binding)
                    if not hmac.compare_digest(frame, expected):
                        try:
                            p.sock.send(_frame(_FAILURE))
                        except OSError:
                            pass
                        if not frame.startswith(_DIGEST):
                            why = "answered the challenge without HMAC-SHA256 (wrong protocol or an old client)"
                        else:
                            why = "digest received was wrong: the peer does not know the authkey"
                            if p.binding:
                                why += " (or the TLS channel it answered on is not this one: a relay)"
                        self._fail(p, "refused", why)
                        return
                    p.out = _frame(_WELCOME)
                    p.step = _THEIRS
                elif step == _THEIRS:
                    if not frame.startswith(_CHALLENGE + _DIGEST):
                        self._fail(p, "invalid", f"expected an HMAC-SHA256 challenge, received {frame[:40]!r}")
                        return
                    payload = frame[len(_CHALLENGE):]
                    if len(payload) < len(_DIGEST) + 20:
                        self._fail(p, "invalid", "its challenge is too short to be safe")
                        return
                    p.out = _frame(connection._auth_digest(self.authkey, payload, p.binding))
                    p.step = _VERDICT
                else:  # _VERDICT
                    if frame != _WELCOME:
                        self._fail(p, "refused", "it rejected our digest: it has a different authkey")
                        return
                    self._done(p)
                    return
            self._arm(p, select.EPOLLOUT if p.out else select.EPOLLIN)  # its turn is over; it comes back
        except (BlockingIOError, InterruptedError):
            self._arm(p, select.EPOLLIN)
        except EOFError:
            self._fail(p, "closed", f"closed the connection {_STEP_NAMES[p.step]}")
        except _Invalid as exc:
            self._fail(p, "invalid", str(exc))
        except OSError as exc:
            if self.ssl_context is not None:
                import ssl

                if isinstance(exc, ssl.SSLWantReadError):
                    self._arm(p, select.EPOLLIN)
                    return
                if isinstance(exc, ssl.SSLWantWriteError):
                    self._arm(p, select.EPOLLOUT)
                    return
                if isinstance(exc, ssl.SSLError):
                    self._fail(p, "refused", f"TLS handshake failed: {exc}")
                    return
            self._fail(p, "closed", f"connection error {_STEP_NAMES[p.step]}: {exc}")

    def _read_frame(self, p: _Pending) -> bytes | None:
        """The next whole handshake frame, or None if the socket has no more for now.  Reads exactly what
        the frame needs, never past it (the bytes behind it belong to the owner)."""
        while True:
            buf = p.buf
            if len(buf) < 4:
                data = p.sock.recv(4 - len(buf))
                if not data:
                    raise EOFError
                p.buf = buf = buf + data
                if len(buf) < 4:
                    continue
                n = _HDR.unpack(buf)[0]
                if n < 0 or n > AUTH_MAX:
                    raise _Invalid(f"sent a handshake header claiming {n} bytes; at most {AUTH_MAX} are allowed "
                                   "before authentication (not a gilfree peer, or not authenticated yet)")
                if n == 0:
                    p.buf = b""
                    if p.step == _ANSWER and not p.probed:
                        p.probed = True
                        continue  # a client's "are you TLS?" probe: once
                    raise _Invalid("sent an empty handshake message")
                p.want = n
            need = p.want - (len(buf) - 4)
            if need > 0:
                data = p.sock.recv(need)
                if not data:
                    raise EOFError
                p.buf = buf = buf + data
                if len(data) < need:
                    continue
            p.buf = b""
            return buf[4:]

    # -- endings -----------------------------------------------------------------------------------
    def _forget(self, p: _Pending) -> None:
        self._pending.pop(p.fd, None)
        group = self._groups.get(p.group)
        if group is not None:
            group.pop(p.fd, None)
            if not group:
                del self._groups[p.group]
        if p.events:
            try:
                self._epoll.unregister(p.fd)
            except (OSError, ValueError):
                pass
        p.events = -1

    def _done(self, p: _Pending) -> None:
        self._forget(p)
        p.sock.setblocking(True)
        self.stats["authenticated"] += 1
        self.ready.append((p.sock, p.name))

    def _fail(self, p: _Pending, kind: str, reason: str) -> None:
        self._forget(p)
        try:
            p.sock.close()
        except OSError:
            pass
        self._failed(HandshakeFailed(p.name, kind, reason))

    def _failed(self, failure: HandshakeFailed) -> None:
        self.stats[failure.kind] += 1
        if self.on_failure is not None:
            self.on_failure(failure)

    def _evict(self, p: _Pending, why: str) -> None:
        if p.step != _TLS:  # (in the middle of a TLS handshake, plain bytes would only confuse it)
            self._say_refused(p.sock, f"the server is busy: {why}; try again")
        self._fail(p, "evicted", f"dropped before it authenticated: {why}")

    @staticmethod
    def _say_refused(sock: Any, reason: str) -> None:
        """Best effort, never blocking: tell a peer we turn away why (a gilfree client reports it)."""
        try:
            sock.setblocking(False)
            sock.send(_frame((_REFUSED + reason.encode())[:AUTH_MAX]))
        except (OSError, ValueError):
            pass

    def _expire(self) -> None:
        if not self._pending:
            return
        now = time.monotonic()
        while self._pending:
            p = next(iter(self._pending.values()))
            if p.deadline > now:
                return
            self._fail(p, "timeout", f"the peer did not answer within {self.timeout:g} s during the "
                                     f"handshake ({_STEP_NAMES[p.step]})")

    def close(self) -> None:
        """Close every pending peer and the ready sockets nobody took; unregister the listener."""
        for p in list(self._pending.values()):
            self._forget(p)
            try:
                p.sock.close()
            except OSError:
                pass
        while self.ready:
            sock, _ = self.ready.popleft()
            try:
                sock.close()
            except OSError:
                pass
        try:
            self._epoll.close()
        except OSError:
            pass
        if self._spare >= 0:
            os.close(self._spare)
            self._spare = -1


class _Invalid(OSError):
    """A handshake frame no honest peer sends."""
