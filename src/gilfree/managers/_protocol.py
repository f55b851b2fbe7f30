"""The managers' wire protocol (layer L6, the bottom of :mod:`gilfree.managers`): opcodes and reply
codes, the limits and tunables, :class:`Token`, :class:`RemoteError`, :class:`TLSConfig`, the framed
:class:`_Channel` (a socket, or after ``OP_PIPES`` a pair of pipes), the checks that explain a malformed
request, and ``_ctx``, the thread-local state that tells a proxy's ``__reduce__`` and ``_rebuild_proxy``
whether they run in a server's connection thread.

Nothing here knows of proxies, links or the server; all of those import this module.  Tunables read at
run time (``SPIN``, ``SPIN_SKIP``, ``PROBE_AFTER``, ``START_TIMEOUT``, ``_USE_PIPES``) live here only:
other modules read them as ``_protocol.X``, and ``gilfree.managers.X = ...`` sets them here.
"""

from __future__ import annotations

import _pickle
import copyreg
import io
import os
import select
import socket
import struct
import threading
import time

from .. import connection, reduction

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from typing import Any, Callable

    from ._server import Server, _ClientState, _ConnState


# ---------------------------------------------------------------------------------------------------
# The protocol: small tuples whose first item is an int opcode.

OP_CALL = 0  # (OP_CALL, id, method name, args, kwds or None)      -> reply
OP_CREATE = 1  # (OP_CREATE, typeid, args, kwds)                   -> (R_OK, (id, exposed))
OP_INCREF = 2  # (OP_INCREF, id)                                   -> (R_OK, None)
OP_DECREF = 3  # (OP_DECREF, (id, ...))                            no reply
OP_GETVALUE = 4  # (OP_GETVALUE, id)                               -> (R_OK, copy of the object)
OP_SERVICE = 5  # (OP_SERVICE, name, args)                         -> reply (server-level requests)
OP_HELLO = 6  # (OP_HELLO, client id, pid, address used)           -> (R_OK, server pid)
OP_PIPES = 7  # (OP_PIPES,) on a Unix socket: -> (R_OK, None) + two pipe ends (SCM_RIGHTS)

R_OK = 0  # (R_OK, value)
R_ERR = 1  # (R_ERR, exception raised by the method): raised as it is in the caller
R_PROXY = 2  # (R_PROXY, (proxy spec, typeid, id, exposed)): a method_to_typeid result
R_REMOTE = 3  # (R_REMOTE, text): something went wrong in the server itself -> RemoteError
#: (R_FAILED, exception): the server could not do what was asked (create an object, call a method that is
#: not exposed, take a reference): raised as a RemoteError that is also of the exception's own type
R_FAILED = 4

#: Seconds a piped channel looks for a message before it sleeps (see _Channel._spin_readinto);
#: GILFREE_MANAGER_SPIN_US=0 turns looking off.
SPIN = float(os.environ.get("GILFREE_MANAGER_SPIN_US", "50")) / 1e6
#: Reads for which a channel does not look after two looks in a row found nothing (a loaded machine
#: then pays at most 2 looks per SPIN_SKIP + 2 reads).
SPIN_SKIP = 256

#: Largest message accepted after authentication (bytes).
MAX_MESSAGE = 1 << 31
#: Largest message accepted during the handshake (bytes).
HANDSHAKE_MAX = 256
#: Seconds the accept thread must have had nothing to do before it starts a thread for the next connection.
SPARE_AFTER = 0.005
#: Largest HELLO (the first message after authentication) a server reads, within ``handshake_timeout``.
HELLO_MAX = 1 << 16
#: Connections that may be in their handshake at once; when one more arrives, the oldest of the largest
#: group (an address, an IPv6 /64, a uid) is dropped (see :mod:`gilfree._gate`).
MAX_HANDSHAKES = 1024
#: The same for a TLS server: a pending TLS peer holds OpenSSL's handshake state (~45 KiB each).
MAX_TLS_HANDSHAKES = 256
#: Seconds a plain client waits for the server's challenge before it sends an empty probe frame (a TLS
#: server answers it with "this manager speaks TLS"; a plain server skips it).
PROBE_AFTER = 1.0
#: Seconds a manager's server process gets to report its address after start().
START_TIMEOUT = 60.0

_HDR = struct.Struct("!i")
_HDR_pack = _HDR.pack
_HDR_unpack_from = _HDR.unpack_from
_HDR_LONG = struct.Struct("!Q")
#: The header of a wake-up: written by the server into a request pipe to wake its reader (the server
#: stops, or the client hung up), and sent by no peer.  A code of its own: -1, -2, -3 and -5 are
#: :mod:`gilfree.connection`'s (long, out-of-band, descriptors next, released buffers).
_WAKE_CODE = -6
_WAKE = _HDR.pack(_WAKE_CODE)
_loads = _pickle.loads
_get_ident = threading.get_ident
_perf_counter = time.perf_counter
#: Results that cannot contain a proxy (and always pickle), replied without the thread-local flag.
_ATOMS = frozenset({type(None), bool, int, float, str, bytes})
_copyreg_table = copyreg.dispatch_table
_RECV_SIZE = 1 << 16
_SMALL = 1 << 16


class RemoteError(Exception):
    """An error in the manager's server that is not an exception of the called method itself
    (an unpicklable result, an unknown object id); the message carries the server's account."""

    def __str__(self) -> str:
        return "\n" + "-" * 75 + "\n" + str(self.args[0]) + "-" * 75 if self.args else ""


_remote_types: dict[type, type] = {}


def _rebuild_remote(cls: type, args: tuple[Any, ...]) -> BaseException:
    return _remote_error_type(cls)(*args)


def _remote_error_type(cls: type) -> type:
    """A subclass of both :class:`RemoteError` and ``cls`` (made once per class): what a failure of the server
    itself is raised as, so that both ``except RemoteError`` (the stdlib raises that) and ``except cls``
    catch it."""
    combined = _remote_types.get(cls)
    if combined is None:
        if issubclass(cls, RemoteError):
            return cls

        def reduce(self: BaseException) -> tuple[Any, ...]:
            return _rebuild_remote, (cls, self.args)

        namespace = {"__module__": RemoteError.__module__, "__str__": cls.__str__, "__reduce__": reduce,
                     "__doc__": f"A failure of the manager's server, raised there as {cls.__qualname__}."}
        combined = type(f"RemoteError[{cls.__qualname__}]", (RemoteError, cls), namespace)
        _remote_types[cls] = combined
    return combined


def _as_remote_error(exc: BaseException) -> BaseException:
    """``exc`` (raised in the server, doing what the server was asked) as a RemoteError of its own type."""
    try:
        new = _remote_error_type(type(exc))(*exc.args)
    except Exception:  # a class that cannot be combined or rebuilt from its args
        return RemoteError(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}\n")
    if getattr(exc, "__dict__", None):
        try:
            new.__dict__.update(exc.__dict__)
        except Exception:
            pass
    new.__cause__ = exc.__cause__
    return new


class Token:
    """What identifies a shared object: its type id, the address of its server, and its id there."""

    __slots__ = ("typeid", "address", "id")

    def __init__(self, typeid: str, address: Any, id: str) -> None:
        self.typeid = typeid
        self.address = address
        self.id = id

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return Token, (self.typeid, self.address, self.id)

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.typeid, self.address, self.id)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.typeid, self.address, self.id = state

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Token) and (self.typeid, self.address, self.id) == (
            other.typeid, other.address, other.id)

    def __hash__(self) -> int:
        return hash((self.typeid, self.id))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(typeid={self.typeid!r}, address={self.address!r}, id={self.id!r})"


class TLSConfig:
    """TLS settings for a manager served on TCP, as file paths (so they can travel to other processes).

    Server side: ``certfile``/``keyfile`` are the server's certificate and key (required);
    ``cafile``, if given, makes the server require a client certificate signed by it.
    Client side: ``cafile`` verifies the server's certificate (the system's CAs if None);
    ``certfile``/``keyfile`` are the client's own certificate, if the server asks for one.  The
    server's certificate must name the host the client connects to (the address's host, a DNS name or
    an IP address), or ``server_hostname`` when given; ``check_hostname=False`` turns that check off
    (any certificate the CA signed is then accepted, whoever it was made for).  A manager that listens
    on ``("0.0.0.0", port)`` and is its own client connects to the name ``0.0.0.0``: give it the
    ``server_hostname`` its certificate holds.

    Authentication is bound to the TLS connection (:func:`gilfree.connection.channel_binding`): the
    authkey handshake succeeds only if client and server see the same TLS session and the same server
    certificate, so a relay that terminates TLS cannot pass it on.

    One ``TLSConfig`` may hold both sides (a test, or a manager whose server and clients share a
    directory of certificates).  The same object is used by :class:`BaseManager`'s server and by every
    proxy of that manager, including proxies passed to other processes.
    """

    __slots__ = ("certfile", "keyfile", "cafile", "server_hostname", "check_hostname", "_contexts")

    def __init__(
        self,
        certfile: str | None = None,
        keyfile: str | None = None,
        cafile: str | None = None,
        server_hostname: str | None = None,
        check_hostname: bool = True,
    ) -> None:
        self.certfile = os.fspath(certfile) if certfile is not None else None
        self.keyfile = os.fspath(keyfile) if keyfile is not None else None
        self.cafile = os.fspath(cafile) if cafile is not None else None
        self.server_hostname = server_hostname
        self.check_hostname = bool(check_hostname)
        self._contexts: dict[str, Any] = {}

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return TLSConfig, self._key()

    def _key(self) -> tuple[Any, ...]:
        return (self.certfile, self.keyfile, self.cafile, self.server_hostname, self.check_hostname)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TLSConfig) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        parts = [f"{k}={v!r}" for k, v in zip(("certfile", "keyfile", "cafile", "server_hostname"), self._key()) if v]
        if not self.check_hostname:
            parts.append("check_hostname=False")
        return f"TLSConfig({', '.join(parts)})"

    def hostname_for(self, address: Any) -> str:
        """The name a client checks the server's certificate against when it connects to ``address``
        (and sends as SNI): ``server_hostname`` if given, else the address's host."""
        return self.server_hostname if self.server_hostname is not None else str(address[0])

    def server_context(self) -> ssl.SSLContext:
        """The SSLContext a server wraps accepted sockets with (built once per process)."""
        ctx = self._contexts.get("server")
        if ctx is None:
            import ssl

            if not self.certfile:
                raise ValueError("a TLS server needs a certificate: TLSConfig(certfile=..., keyfile=...)")
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(self.certfile, self.keyfile)
            connection._server_cert_digest(self.certfile)  # the channel binding reads the file when the context does
            if self.cafile:
                ctx.load_verify_locations(self.cafile)
                ctx.verify_mode = ssl.CERT_REQUIRED
            self._contexts["server"] = ctx
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """The SSLContext a client connects with (built once per process; the host name to check is
        given to ``wrap_socket``, see :meth:`hostname_for`)."""
        ctx = self._contexts.get("client")
        if ctx is None:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cafile:
                ctx.load_verify_locations(self.cafile)
            else:
                ctx.load_default_certs()
            ctx.check_hostname = self.check_hostname
            ctx.verify_mode = ssl.CERT_REQUIRED
            if self.certfile:
                ctx.load_cert_chain(self.certfile, self.keyfile)
            self._contexts["client"] = ctx
        return ctx

def _address_family(address: Any) -> int:
    if isinstance(address, tuple):
        return socket.AF_INET6 if ":" in str(address[0]) else socket.AF_INET
    if isinstance(address, (str, bytes)):
        return socket.AF_UNIX
    raise ValueError(
        f"manager address {address!r} is neither (host, port) for TCP nor a str for a Unix socket"
    )


def _describe(address: Any) -> str:
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    if isinstance(address, str) and address.startswith("\0"):
        return "@" + address[1:]
    return str(address)

# ---------------------------------------------------------------------------------------------------
# Channels


class _Channel:
    """Framed messages over a connected stream socket (TCP, Unix or TLS): one end, one thread at a time.

    ``send(obj)`` pickles (both tiers) and writes one frame; ``recv_bytes()`` returns the next frame's
    payload.  Reads are buffered: a small message costs one ``recv``.  With ``_deadline`` set (the
    handshake) each read waits at most until then and raises ``TimeoutError``.  ``recv_bytes``
    checks a frame's announced length against ``maxlength`` (or :attr:`max_message`) before reading
    it, and large frames are collected as they arrive.  ``send_bytes``/``recv_bytes``/``_deadline``
    are what :func:`gilfree.connection.deliver_challenge` and ``answer_challenge`` use.
    """

    __slots__ = ("sock", "peer", "_rbuf", "_deadline", "max_message", "busy", "pid", "_out", "_pickler",
                 "_table", "_view", "_write", "_readinto", "_read", "_files", "_pipe_readinto", "_poll",
                 "_spin", "_misses", "_skip", "__weakref__")

    def __init__(self, sock: Any, peer: str, max_message: int = MAX_MESSAGE) -> None:
        self.sock = sock
        self.peer = peer
        self._rbuf = b""
        self._deadline: float | None = None
        self.max_message = max_message
        #: True while a request is being sent or its reply read (a DECREF must not cut in)
        self.busy = False
        self.pid = os.getpid()
        self._out = io.BytesIO()
        self._pickler: Any = None
        self._table: Any = None
        self._view: memoryview | None = None  # receive buffer of the fast path (after the handshake)
        # where frames go and come from: the socket, or after use_pipes() a pair of pipes
        self._write: Callable[[Any], int] = sock.send
        self._readinto: Callable[[Any], int] = sock.recv_into
        self._read: Callable[[int], bytes] = sock.recv
        self._files: tuple[Any, ...] = ()

    def __repr__(self) -> str:
        state = "closed" if self.sock is None else ("busy" if self.busy else "idle")
        return f"<_Channel {self.peer} {state}>"

    def close(self) -> None:
        sock, self.sock = self.sock, None
        files, self._files = self._files, ()
        for f in (sock, *files):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass

    def use_pipes(self, rfd: int, wfd: int) -> None:
        """From now on read frames from pipe ``rfd`` and write them to pipe ``wfd`` (the channel owns both);
        the socket stays open, unused, so that the peer sees this end go away.  A pipe round trip
        costs the kernel about half of a Unix socket's (no socket buffers to allocate per message)."""
        rf, wf = io.FileIO(rfd, "rb"), io.FileIO(wfd, "wb")
        self._files = (rf, wf)
        self._write = wf.write
        if SPIN <= 0:
            self._readinto, self._read = rf.readinto, rf.read
            return
        os.set_blocking(rfd, False)  # this end is ours alone: see _spin_readinto
        self._pipe_readinto = rf.readinto
        self._poll = select.poll()
        self._poll.register(rfd, select.POLLIN)
        self._spin, self._misses, self._skip = SPIN, 0, 0
        self._readinto, self._read = self._spin_readinto, self._pipe_read

    def _spin_readinto(self, view: Any) -> int:
        """Read what the pipe has into ``view``; if it has nothing yet, look again for up to :data:`SPIN`
        seconds before sleeping in ``poll``.  A process that sleeps is woken on the other core only
        after that core left its idle state: 50-90 us per round trip on an idle 2-core VM, 7 us
        when both ends look.  Adaptive: after two looks in a row that found nothing (the peer is
        busy, or waits for a CPU) this channel sleeps at once for its next :data:`SPIN_SKIP` reads (its pipe made
        blocking for them: one call per read, not a poll and a read)."""
        readinto = self._pipe_readinto
        if self._skip:  # not looking for now: the pipe is blocking, one read
            self._skip -= 1
            if not self._skip:
                k = readinto(view)
                os.set_blocking(self._files[0].fileno(), False)
                return k
            return readinto(view)
        k = readinto(view)
        if k is not None:
            return k
        end = _perf_counter() + self._spin
        while True:
            k = readinto(view)
            if k is not None:
                self._misses = 0
                return k
            if _perf_counter() > end:
                break
        self._misses += 1
        if self._misses >= 2:  # stop looking for a while: blocking reads, one call each
            self._misses = 0
            self._skip = SPIN_SKIP
            os.set_blocking(self._files[0].fileno(), True)
            return readinto(view)
        poll = self._poll.poll
        while True:
            poll()
            k = readinto(view)
            if k is not None:
                return k

    def _pipe_read(self, n: int) -> bytes:
        view = memoryview(bytearray(n))
        k = self._spin_readinto(view)
        return view[:k].tobytes()

    @property
    def piped(self) -> bool:
        return bool(self._files)

    # -- writing ---------------------------------------------------------------------------------
    def send_bytes(self, data: Any) -> None:
        """Write ``data`` as one frame: a small one with its header in one write (the common case: one
        ``send``), a large one as the header and then the data."""
        n = len(data)
        if n <= _SMALL:
            frame = _HDR_pack(n) + data
            k = self._write(frame)
            if k != n + 4:
                self.write_all(frame, k)
            return
        self.write_all(_HDR.pack(n) if n <= 0x7FFFFFFF else _HDR.pack(-1) + _HDR_LONG.pack(n))
        self.write_all(data)

    def write_all(self, data: Any, done: int = 0) -> None:
        """Write ``data`` from offset ``done`` on, however many writes it takes."""
        if self.sock is None:
            raise OSError("channel is closed")
        view = memoryview(data).cast("B")[done:]
        write = self._write
        while view:
            view = view[write(view):]

    def dumps(self, obj: Any) -> bytes:
        """Pickle ``obj``: a C pickler kept by this channel (with gilfree's reducers) for the common case,
        gilfree's two tiers (by-value functions, explanations of what cannot be pickled) otherwise.

        The rules of :func:`gilfree.reduction.dumps_small` (the full path when tier 1 fails, while this
        thread collects descriptors for another message, or when ``__main__`` is mentioned and a child
        could not import it), with the pickler held by the channel: 0.6 us for a call instead of 2 us.
        """
        pickler = self._pickler
        if pickler is None or self._table is not reduction._table or reduction._table_copyreg_len != len(_copyreg_table):
            pickler = self._new_pickler()
        if not reduction._chan.sending:
            out = self._out
            try:
                pickler.dump(obj)
            except BaseException as exc:
                self._pickler = None  # its memo may be half-written; tier 1 + tier 2 below explain
                self._out = io.BytesIO()
                if not isinstance(exc, Exception):
                    raise
            else:
                pickler.clear_memo()
                data = out.getvalue()
                out.seek(0)
                out.truncate()
                if data.find(b"__main__") < 0 or reduction._main_is_reimportable():
                    return data
        return reduction.dumps(obj)

    def _new_pickler(self) -> Any:
        table = reduction._dispatch_table()
        pickler = self._pickler = _pickle.Pickler(self._out, 5)
        pickler.dispatch_table = self._table = table
        return pickler

    #: how a received message is read (the XML-RPC channel has its own)
    loads = staticmethod(_loads)

    def send(self, obj: Any) -> None:
        self.send_bytes(self.dumps(obj))

    def request(self, obj: Any) -> Any:
        """Send ``obj``, return the next message (unpickled): a client's call, one ``sendall`` and,
        for a small reply, one ``recv_into``."""
        self.send_bytes(self.dumps(obj))
        return _loads(self.recv_frame())

    def recv_frame(self) -> Any:
        """The next frame's payload, after the handshake: a ``memoryview`` of the channel's buffer (valid
        until the next read) when the frame came whole in one read, else ``bytes``.  The fast path
        of a call: one ``recv_into``, no allocation for the data."""
        view = self._view
        if self._rbuf or view is None or self._deadline is not None:
            if view is None and self._deadline is None:
                self._view = memoryview(bytearray(_RECV_SIZE))
            return self.recv_bytes()
        if self.sock is None:
            raise OSError("channel is closed")
        k = self._readinto(view)
        if k > 4:
            n = _HDR_unpack_from(view)[0]
            if n == k - 4 and n <= self.max_message:
                return view[4:k]
        elif not k:
            raise EOFError(f"{self.peer} closed the connection")
        self._rbuf = view[:k].tobytes()  # a part of a frame, or more than one: the general path
        return self.recv_bytes()

    # -- reading ---------------------------------------------------------------------------------
    def _recv_some(self, n: int, got: int, total: int | None) -> bytes:
        sock = self.sock
        if sock is None:
            raise OSError("channel is closed")
        if self._deadline is None:
            data = self._read(n)
        else:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out waiting for the peer to send (the rest of) a message")
            sock.settimeout(remaining)
            try:
                data = sock.recv(n)
            except TimeoutError:
                raise TimeoutError("timed out waiting for the peer to send (the rest of) a message") from None
            finally:
                if self.sock is not None:
                    sock.settimeout(None)
        if not data:
            if got == 0 and total is None:
                raise EOFError(f"{self.peer} closed the connection")
            what = f"{got} of {total} bytes" if total is not None else f"{got} bytes of a message header"
            raise EOFError(f"{self.peer} closed the connection in the middle of a message: got {what}")
        return data

    def recv_bytes(self, maxlength: int | None = None) -> Any:
        buf = self._rbuf
        while len(buf) < 4:
            buf += self._recv_some(_RECV_SIZE, len(buf), None if not buf else 4)
        n = _HDR.unpack_from(buf)[0]
        start = 4
        if n < 0:
            if n == _WAKE_CODE and self._files:
                self._rbuf = b""
                raise EOFError(f"{self.peer}: connection closed by this end")
            if n != -1:
                self._rbuf = b""
                raise OSError(f"bad message header from {self.peer}: length {n}; the peer does not speak this protocol")
            while len(buf) < 12:
                buf += self._recv_some(_RECV_SIZE, len(buf), 12)
            n = _HDR_LONG.unpack_from(buf, 4)[0]
            start = 12
        limit = self.max_message if maxlength is None else maxlength
        if n > limit:
            self._rbuf = b""
            raise OSError(f"{self.peer} announced a message of {n} bytes; the limit here is {limit}")
        end = start + n
        if len(buf) >= end:
            self._rbuf = buf[end:] if len(buf) > end else b""
            return buf[start:end]
        self._rbuf = b""
        parts = [buf[start:]]
        got = len(buf) - start
        while got < n:
            data = self._recv_some(min(n - got, 1 << 20), start + got, start + n)
            parts.append(data)
            got += len(data)
        if got > n:  # the peer sent the next message right behind this one
            last = parts[-1]
            cut = len(last) - (got - n)
            parts[-1], self._rbuf = last[:cut], last[cut:]
        return b"".join(parts)


#: Whether clients of a Unix-socket server move their messages to pipes (GILFREE_MANAGER_PIPES=0: no).
_USE_PIPES = os.environ.get("GILFREE_MANAGER_PIPES", "1") != "0"


def _take_pipes(chan: _Channel) -> None:
    """Client side of OP_PIPES: ask the server for a pair of pipes and use them from now on.  A server
    that does not offer them answers with an error, and the connection stays on its socket."""
    chan.send((OP_PIPES,))
    data, fds, flags, _ = socket.recv_fds(chan.sock, 4096, 2, socket.MSG_CMSG_CLOEXEC)
    if len(fds) != 2 or flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        fds = []
    chan._rbuf = data
    try:
        kind, _ = chan.loads(chan.recv_bytes())
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    if kind == R_OK and fds:
        wfd, rfd = fds
        chan.use_pipes(rfd, wfd)
    else:
        for fd in fds:
            os.close(fd)


def _peer_name(sock: Any, address: Any) -> str:
    if isinstance(address, tuple) and address:
        return f"{address[0]}:{address[1]}"
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", creds)
        return f"unix peer pid {pid} uid {uid}"
    except OSError:
        return "unix peer"


# ---------------------------------------------------------------------------------------------------
# Thread-local state that tells a proxy's __reduce__ / _rebuild_proxy where it is being (un)pickled.



class _Context(threading.local):
    conn: _ConnState | None = None  # in a server's connection thread: that connection
    server: Server | None = None  # the server whose connection thread this is
    client: _ClientState | None = None  # ... serving this client
    alias: Any = None  # ... which reached the server at this address
    replying = False  # ... and a reply is being pickled right now


_ctx = _Context()



class _BadRequest(ValueError):
    """A request whose shape or arguments are wrong (answered with R_REMOTE, not raised in the client as is)."""


#: What each request looks like, for the message that answers a malformed one.
_FORMS = {
    OP_CALL: "(OP_CALL, id: str, method name: str, args: tuple, kwds: dict or None)",
    OP_CREATE: "(OP_CREATE, typeid: str, args: tuple, kwds: dict or None)",
    OP_INCREF: "(OP_INCREF, id: str)",
    OP_DECREF: "(OP_DECREF, (id: str, ...))",
    OP_GETVALUE: "(OP_GETVALUE, id: str)",
    OP_SERVICE: "(OP_SERVICE, name: str, args: tuple)",
}


def _short(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception:
        text = f"<{type(obj).__name__}>"
    return text if len(text) <= 200 else text[:200] + "..."


def _request_problem(msg: Any) -> str | None:
    """What is wrong with the shape of request ``msg`` (a str), or None.  Never on the hot path: a
    call is only checked after it failed, the other requests are not frequent."""
    if type(msg) is not tuple:
        return f"a request should be a tuple (opcode, ...), not {type(msg).__name__}"
    if not msg:
        return "a request should be a tuple (opcode, ...), not an empty tuple"
    op = msg[0]
    form = _FORMS.get(op) if type(op) is int else None
    if form is None:
        return None  # an unknown opcode (or HELLO, PIPES): answered by the dispatch
    n = {OP_CALL: 5, OP_CREATE: 4, OP_INCREF: 2, OP_DECREF: 2, OP_GETVALUE: 2, OP_SERVICE: 3}[op]
    if len(msg) != n:
        return f"{len(msg)} items, expected {form}"
    what = None
    if op in (OP_CALL, OP_INCREF, OP_GETVALUE) and type(msg[1]) is not str:
        what = f"the object id should be a str, not {type(msg[1]).__name__}"
    elif op == OP_CALL and type(msg[2]) is not str:
        what = f"the method name should be a str, not {type(msg[2]).__name__}"
    elif op in (OP_CALL, OP_CREATE) and type(msg[-2]) is not tuple:
        what = f"the arguments should be a tuple, not {type(msg[-2]).__name__}"
    elif op in (OP_CALL, OP_CREATE) and msg[-1] is not None and type(msg[-1]) is not dict:
        what = f"the keyword arguments should be a dict or None, not {type(msg[-1]).__name__}"
    elif op == OP_CREATE and type(msg[1]) is not str:
        what = f"the typeid should be a str, not {type(msg[1]).__name__}"
    elif op == OP_SERVICE and type(msg[1]) is not str:
        what = f"the request name should be a str, not {type(msg[1]).__name__}"
    elif op == OP_SERVICE and type(msg[2]) is not tuple:
        what = f"the arguments should be a tuple, not {type(msg[2]).__name__}"
    elif op == OP_DECREF and type(msg[1]) not in (tuple, list):
        what = f"the ids should be a tuple, not {type(msg[1]).__name__}"
    return None if what is None else f"{what}; expected {form}"


def _bad_request(msg: Any, exc: BaseException) -> str:
    """The text of the R_REMOTE reply to a request that failed with ``exc`` because of its shape."""
    if isinstance(exc, _BadRequest):
        return f"bad request {_short(msg)}: {exc}\n"
    problem = _request_problem(msg)
    if problem is None:
        problem = f"{type(exc).__name__}: {exc}"
    return f"bad request {_short(msg)}: {problem}\n"


def _call_failed(msg: Any, exc: Exception) -> Any:
    """The reply to a call whose method raised ``exc``: (R_ERR, exc), unless the request itself was
    malformed (its arguments not a tuple, ...): then R_REMOTE saying so."""
    problem = _request_problem(msg)
    if problem is None:
        return (R_ERR, exc)
    return (R_REMOTE, f"bad request {_short(msg)}: {problem}\n")


#: The serializers of a manager's messages after authentication.  ``'xmlrpclib'`` carries only what
#: XML-RPC can: None, bool, int (32-bit), float, str, bytes, lists (tuples arrive as lists), dicts with
#: str keys, datetimes; nothing is built from the peer's data but those (safe with a peer one does not
#: trust further than its authkey).  Proxies do not travel as arguments or results (as in the stdlib); a
#: method listed in ``method_to_typeid`` still returns a proxy, of the client's registered proxy type.
SERIALIZERS = ("pickle", "xmlrpclib")


def _check_serializer(serializer: str) -> None:
    if serializer not in SERIALIZERS:
        raise ValueError(f"unknown serializer {serializer!r}: a manager's messages are 'pickle' (the default) "
                         "or 'xmlrpclib'")


def _channel_type(serializer: str) -> type[_Channel]:
    return _Channel if serializer == "pickle" else _XmlChannel


def _dumps_for(serializer: str, obj: Any) -> bytes:
    """``obj`` serialized as a server's reply with ``serializer`` (outside any channel)."""
    if serializer == "pickle":
        return reduction.dumps(obj)
    return _xml_dumps(_xml_reply(obj))


# -- XML-RPC (serializer='xmlrpclib') -----------------------------------------------------------------
#: Exceptions a client rebuilds from an XML-RPC error reply (by name: nothing is imported on the peer's
#: word); any other arrives as a RemoteError saying what it was.
_XML_EXCEPTIONS: dict[tuple[str, str], type] = {}


def _xml_exceptions() -> dict[tuple[str, str], type]:
    if not _XML_EXCEPTIONS:
        import builtins
        import queue

        for name, value in vars(builtins).items():
            # Exception only: a server never sends SystemExit, KeyboardInterrupt or GeneratorExit (it
            # catches Exception), and a hostile one must not make the client raise them
            if isinstance(value, type) and issubclass(value, Exception):
                _XML_EXCEPTIONS[("builtins", name)] = value
        for cls in (queue.Empty, queue.Full, RemoteError):
            _XML_EXCEPTIONS[(cls.__module__, cls.__qualname__)] = cls
    return _XML_EXCEPTIONS


def _xml_dumps(obj: Any) -> bytes:
    import xmlrpc.client

    return xmlrpc.client.dumps((obj,), methodresponse=True, allow_none=True).encode("utf-8")


def _refuse_doctype(*args: Any) -> None:
    raise ValueError("an XML-RPC message with a DOCTYPE (refused)")


def _xml_loads(data: Any) -> Any:
    """The value of an XML-RPC document.  XML-RPC has no use for a DTD, and its entities are how XML
    bombs work: the parser itself refuses a DOCTYPE (a search of the bytes for ``<!DOCTYPE`` missed
    one in UTF-16, which expat reads as well)."""
    import xmlrpc.client

    parser, unmarshaller = xmlrpc.client.getparser(use_builtin_types=True)
    expat = parser._parser  # type: ignore[attr-defined]
    expat.StartDoctypeDeclHandler = _refuse_doctype
    expat.EntityDeclHandler = _refuse_doctype
    parser.feed(bytes(data))
    parser.close()
    return unmarshaller.close()[0]


_XML_ATOMS = (type(None), bool, int, float, str, bytes)


def _xml_reply(reply: Any) -> Any:
    """A server's reply in a form XML-RPC can carry: an exception as [module, name, args] (args as text
    unless they are plain values), a new proxy without its proxy class (the client uses its own)."""
    kind = reply[0]
    if kind == R_ERR or kind == R_FAILED:
        exc = reply[1]
        cls = type(exc)
        args = list(exc.args)
        if not all(type(a) in _XML_ATOMS and (type(a) is not int or -(1 << 31) <= a < (1 << 31)) for a in args):
            args = [str(exc)]
        return (kind, [cls.__module__, cls.__qualname__, args])
    if kind == R_PROXY:
        _, typeid, ident, exposed = reply[1]
        return (kind, (None, typeid, ident, exposed))
    if type(reply[1]) in _XML_VIEWS:  # dict.keys() & co arrive as lists (as they do with pickle)
        return (kind, list(reply[1]))
    return reply


_XML_VIEWS: tuple[type, ...] = (type({}.keys()), type({}.values()), type({}.items()))


def _xml_exception(value: Any) -> BaseException:
    """The exception an XML-RPC error reply describes (see :func:`_xml_reply`)."""
    try:
        module, name, args = value
        cls = _xml_exceptions().get((module, name))
        if cls is not None:
            return cls(*args)
    except Exception:
        pass
    return RemoteError(f"{value!r}\n")


class _XmlChannel(_Channel):
    """A channel whose messages, after authentication, are XML-RPC documents (``serializer='xmlrpclib'``):
    the same frames, handshake and limits as :class:`_Channel`.  The server's end (``server_side``) makes
    tuples of a request's argument lists again, and sends what XML-RPC cannot carry as a RemoteError."""

    __slots__ = ("server_side",)

    def __init__(self, sock: Any, peer: str, max_message: int = MAX_MESSAGE, server_side: bool = False) -> None:
        super().__init__(sock, peer, max_message)
        self.server_side = server_side

    def dumps(self, obj: Any) -> bytes:
        if not self.server_side:
            return _xml_dumps(obj)
        try:
            return _xml_dumps(_xml_reply(obj))
        except Exception as exc:
            return _xml_dumps((R_REMOTE, f"the manager could not send its reply with serializer 'xmlrpclib': "
                                         f"{type(exc).__name__}: {exc}\n"))

    def loads(self, data: Any) -> Any:  # type: ignore[override]
        msg = _xml_loads(data)
        if type(msg) is not list or not msg:
            return msg
        msg = tuple(msg)
        op, n = msg[0], len(msg)
        if self.server_side:  # a request: its argument list is a tuple again
            where = {OP_CALL: 3, OP_CREATE: 2, OP_SERVICE: 2, OP_HELLO: 3}.get(op)
            if where is not None and n == {OP_CALL: 5, OP_CREATE: 4, OP_SERVICE: 3, OP_HELLO: 4}[op] \
                    and type(msg[where]) is list:
                msg = (*msg[:where], tuple(msg[where]), *msg[where + 1:])
        elif n == 2 and (op == R_ERR or op == R_FAILED):
            msg = (op, _xml_exception(msg[1]))
        return msg

    def request(self, obj: Any) -> Any:
        self.send_bytes(_xml_dumps(obj))
        return self.loads(self.recv_frame())

def _tls_failure(exc: OSError, address: Any) -> OSError:
    """The error for a TLS handshake that failed, saying what the usual causes mean."""
    reason = getattr(exc, "reason", None)
    where = _describe(address)
    if reason == "WRONG_VERSION_NUMBER" or reason == "RECORD_LAYER_FAILURE":
        return ConnectionError(f"the manager at {where} does not speak TLS (it answered in plain text): "
                               "connect without tls=, or start its server with TLS")
    if isinstance(exc, TimeoutError):
        return TimeoutError(f"the TLS handshake with the manager at {where} did not finish within "
                            f"{connection.HANDSHAKE_TIMEOUT:g} s")
    return exc


def _wrap_client(tls: TLSConfig, sock: socket.socket, address: Any) -> Any:
    """``sock``, connected to the server at ``address``, wrapped in TLS; the server's certificate must
    name ``tls.hostname_for(address)`` unless ``tls.check_hostname`` is False."""
    import ssl

    hostname = tls.hostname_for(address)
    try:
        return tls.client_context().wrap_socket(sock, server_hostname=hostname)
    except ssl.SSLCertVerificationError as exc:
        # 62: X509_V_ERR_HOSTNAME_MISMATCH, 64: X509_V_ERR_IP_ADDRESS_MISMATCH
        if exc.verify_code not in (62, 64):
            raise
        err = ssl.SSLCertVerificationError(
            exc.errno,
            f"the manager at {_describe(address)} presented a certificate that does not name {hostname!r} "
            f"({exc.verify_message}): connect by a name the certificate holds, or pass "
            f"TLSConfig(server_hostname=...) naming it; TLSConfig(check_hostname=False) accepts any certificate "
            f"the CA signed, including one made for another machine [{exc.reason}]",
        )
        err.verify_code, err.verify_message = exc.verify_code, exc.verify_message
        raise err from None

