"""Managers: objects that live in a server process, used from other processes through proxies (layer L6).

::

    client process (any thread)                      server process (or `gilfree manager serve`)
    ---------------------------                      -------------------------------------------
    proxy._callmethod(name, args)                    accept thread: poll(listener, stop pipe)
      │  link: one channel per (process, thread)       │ accept() ── new thread per connection
      │  per server, opened on first use,              ▼
      │  reused for every call                       connection thread
      ▼                                                TLS handshake (TCP, if configured)
    channel ── (CALL, id, name, args, kwds) ──────▶    HMAC-SHA256 both ways, 256-byte frames,
      [4-byte length][pickle]                          deadline -- nothing unpickled before this
      one write, one read for a small message          HELLO(client id, pid, address used)
      Unix socket: after HELLO, (PIPES) ──────────▶    two pipes made here, client ends sent back
        frames go over the pipes; a reader looks       (SCM_RIGHTS); the socket stays open, idle
        for up to 50 us before it sleeps               loop: read ─ unpickle ─ dispatch ─┐
                                                               objects[id] = (obj, exposed,
    result / exception / new proxy  ◀─────────────     method_to_typeid, typeid, refs) │
      (OK, value) | (ERR, exc) | (PROXY, spec)          reply: pickle ◀────────────────┘
                                                     EOF (or hang-up seen on the socket) on a
    proxy dropped ── (DECREF, ids), no reply ──────▶   client's last connection: every reference
                                                       it held is released

*Proxy* (:class:`BaseProxy` and subclasses; any process, any thread).  Holds a :class:`Token`
(typeid, server address, object id) and a *link* to the server.  A call is one typed request
(``(OP_CALL, id, name, args, kwds)``, an int opcode, not a tag string) and one reply on the calling
thread's channel.  A proxy holds one reference to its object: taken by the server for the client
that created it (``create``, a method listed in ``method_to_typeid``), or asked for with a
synchronous ``INCREF`` when a proxy is unpickled in another process (a forked child does it for the
proxies it inherited).  When the proxy is collected, its ``DECREF`` is sent on the thread's channel if
that channel is idle, or with the next request otherwise: it never opens a connection and never
writes into a message being sent.  Proxy classes are ordinary classes; :func:`MakeProxyType` builds
one with :func:`type` from a list of method names (no ``exec``).

*Link* (one per server address and authkey, per process).  A thread-local channel per thread; a
channel of a thread that ended goes back to a free list for the next new thread.  After a fork the
child starts with no channels and a new client identity.  A channel broken in the middle of a call
(Ctrl-C, the server gone) is discarded; if it was the process's last one, a new one is opened first,
so the server never sees the client disappear while it still holds proxies.

*Channel* (:class:`_Channel`).  The stdlib's framing (signed 4-byte big-endian length, ``-1`` + 8
bytes for huge messages) over a TCP, Unix or TLS socket, with buffered reads: a small reply costs one
``recv_into`` into a buffer the channel keeps.  On a Unix socket the client asks, after HELLO, for
a pair of pipes (``OP_PIPES``): the server makes them and sends the client's ends over the socket,
and both sides move their frames to them (a pipe costs the kernel half of what a socket does per
message).  The socket stays open and idle: the server learns of a client's end from it (the
epoll watcher) and then wakes the pipe's reader with a header no client sends (it holds a write
end of the request pipe for this, so the pipe itself never shows EOF).  A pipe's reader looks for
its message for up to :data:`SPIN` seconds before it sleeps in ``poll``, and stops looking for a
while after two misses (see :meth:`_Channel._spin_readinto`).  During the handshake every read has a deadline and a 256-byte limit; afterwards messages
are limited to :data:`MAX_MESSAGE` bytes and memory is allocated as the data arrives, not as a
length prefix claims.  The handshake is :mod:`gilfree.connection`'s HMAC-SHA256 challenge in both
directions: nothing an unauthenticated peer sends is unpickled.

*Server* (:class:`Server`).  An accept thread runs the gate (:mod:`gilfree._gate`): it authenticates
every connection at once, with no thread and a few hundred bytes per peer (at most
:data:`MAX_HANDSHAKES` at a time, the oldest of the largest group dropped when one more comes; a
peer that says nothing is dropped at the deadline), and hands each authenticated connection to a
thread of its own, which serves its requests one at a time.  Objects are kept in one table with a
reference count per client process (identified by the HELLO that opens each of its connections):
when the last connection of a client closes -- it exited, was killed, or lost the network -- all its
references are dropped, so objects only a dead client referred to are released.  A client machine that
vanishes without a FIN or RST (power off, network cut) is noticed by TCP keepalive: its objects are
released within 25 s (``keepalive=``; :data:`gilfree.connection.KEEPALIVE`), and a client's call to a
server that vanished raises within 25 s, saying it stopped answering.  There is no heartbeat of our own:
a stopped process (SIGSTOP, a debugger) is alive and keeps its objects, a client has no thread to
answer a ping, and the peer's kernel answers keepalive probes exactly when its machine and the network
are alive (docs/design.md, "A peer that vanishes").  A proxy that
arrives *inside* a request for an object of this server (a list stored in a managed dict) becomes a
server-side proxy that counts as a reference of the server itself; when it is sent back in a reply
it carries a reference taken for the receiving client, so nothing is freed while it is in flight.
The reply also carries the proxy type from the server's registry (the registry travels with the
token), so a process that never saw the manager's registry still builds the right proxy.
A server started by :meth:`BaseManager.start` also watches its parent: if the parent dies, it stops.

*Registry.*  ``register(typeid, callable, proxytype, exposed, method_to_typeid, create_method)``
as in the stdlib.  ``callable`` may also be a ``"module:attribute"`` string, imported in the server
when the first object of that type is created (``SyncManager.Pool`` is ``"gilfree.pool:Pool"``;
``gilfree manager serve --register TYPEID=module:callable`` uses the same mechanism).

This follows the design of CPython's ``multiprocessing/managers.py`` (a server thread per
connection, proxies with tokens, ``exposed``/``method_to_typeid``, the same public API); what
differs: int opcodes instead of ``'#RETURN'`` strings, one connection per process and thread instead
of a new connection for every ``create``/``incref``/``decref``, no ``exec``, references counted per
client so a dead client's objects are released, authentication and size limits before any
unpickling, TLS, loopback-only and abstract-socket defaults, and a server that ends with its parent.

Where this runs: proxies and managers in any process, on the calling thread; every proxy call blocks
for one round trip to the server (longer if the method itself blocks there, e.g. ``Queue.get``).  The
server's threads block in reads (on pipes: after looking for their message for up to 50 us) and in
the methods they call.
"""

from __future__ import annotations

import _pickle
import array
import collections
import copyreg
import importlib
import io
import itertools
import os
import queue
import select
import signal
import socket
import struct
import threading
import time
import types
import weakref

from .. import _gate, connection, process, reduction, util
from .._errors import ProcessError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    import ssl
    from typing import Any, Callable, Iterable, Mapping

__all__ = [
    "BaseManager",
    "SyncManager",
    "SharedMemoryManager",
    "BaseProxy",
    "Token",
    "RemoteError",
    "TLSConfig",
    "Server",
    "State",
    "Namespace",
    "Value",
    "Array",
    "AutoProxy",
    "MakeProxyType",
    "IteratorProxy",
    "AcquirerProxy",
    "ConditionProxy",
    "EventProxy",
    "BarrierProxy",
    "NamespaceProxy",
    "ValueProxy",
    "ListProxy",
    "BaseListProxy",
    "DictProxy",
    "ArrayProxy",
    "PoolProxy",
    "BasePoolProxy",
    "public_methods",
    "all_methods",
]

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
#: Connections that may be in their handshake at once; when one more arrives, the oldest of the largest
#: group (an address, an IPv6 /64, a uid) is dropped (see :mod:`gilfree._gate`).
MAX_HANDSHAKES = 1024
#: Seconds a plain client waits for the server's challenge before it sends an empty probe frame (a TLS
#: server answers it with "this manager speaks TLS"; a plain server skips it).
PROBE_AFTER = 1.0
#: Seconds a manager's server process gets to report its address after start().
START_TIMEOUT = 60.0

_HDR = struct.Struct("!i")
_HDR_pack = _HDR.pack
_HDR_unpack_from = _HDR.unpack_from
_HDR_LONG = struct.Struct("!Q")
#: A header no peer sends: written by the server into a request pipe to wake its reader (stop, hang-up).
_WAKE = _HDR.pack(-2)
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


def all_methods(obj: Any) -> list[str]:
    """The names of the callable attributes of ``obj``."""
    return [name for name in dir(obj) if callable(getattr(obj, name, None))]


def public_methods(obj: Any) -> list[str]:
    """The names of the callable attributes of ``obj`` that do not start with ``_``."""
    return [name for name in all_methods(obj) if name[0] != "_"]


# Dict views and arrays cross the wire as lists / arrays (as the stdlib's managers arrange).
def _rebuild_as_list(obj: Any) -> tuple[Any, tuple[Any, ...]]:
    return list, (list(obj),)


_VIEW_TYPES: tuple[type, ...] = (type({}.keys()), type({}.values()), type({}.items()))
for _view_type in _VIEW_TYPES:
    reduction.register(_view_type, _rebuild_as_list)
del _view_type


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
        n = len(data)
        header = _HDR.pack(n) if n <= 0x7FFFFFFF else _HDR.pack(-1) + _HDR_LONG.pack(n)
        if n <= _SMALL:
            self.write_all(header + data)
        else:
            self.write_all(header)
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
            except Exception:
                self._pickler = None  # its memo may be half-written; tier 1 + tier 2 below explain
                self._out = io.BytesIO()
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

    def send(self, obj: Any) -> None:
        data = self.dumps(obj)
        n = len(data)
        if n <= _SMALL:
            frame = _HDR_pack(n) + data
            k = self._write(frame)
            if k != n + 4:
                self.write_all(frame, k)
        else:
            self.send_bytes(data)

    def request(self, obj: Any) -> Any:
        """Send ``obj``, return the next message (unpickled): a client's call, one ``sendall`` and,
        for a small reply, one ``recv_into``."""
        data = self.dumps(obj)
        n = len(data)
        if n <= _SMALL:
            frame = _HDR_pack(n) + data
            k = self._write(frame)
            if k != n + 4:
                self.write_all(frame, k)
        else:
            self.send_bytes(data)
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
            if n == -2 and self._files:
                self._rbuf = b""
                raise EOFError(f"{self.peer}: connection closed by this end")  # _WAKE
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
        kind, _ = reduction.loads(chan.recv_bytes())
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


class _Context(threading.local):
    conn: _ConnState | None = None  # in a server's connection thread: that connection
    server: Server | None = None  # the server whose connection thread this is
    client: _ClientState | None = None  # ... serving this client
    alias: Any = None  # ... which reached the server at this address
    replying = False  # ... and a reply is being pickled right now


_ctx = _Context()


# ---------------------------------------------------------------------------------------------------
# The server


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
_local_servers: weakref.WeakValueDictionary[Any, Server] = weakref.WeakValueDictionary()


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
            sock.listen(128)
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
        self._log_marks: dict[str, tuple[float, int]] = {}
        self.stats = {"accepted": 0, "refused": 0, "disconnected": 0}
        self.pid = os.getpid()
        _local_servers[self.address] = self

    def __repr__(self) -> str:
        state = "stopped" if self._stop.is_set() else "serving"
        return (f"<{type(self).__name__} {_describe(self.address)} {state} objects={len(self._objects)} "
                f"clients={len(self._clients)}{' tls' if self.tls else ''}>")

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
                if lifeline is not None and any(fd == lifeline for fd, _ in poller.poll()):
                    self._info("manager server %s: the process that started it has exited; stopping",
                               _describe(self.address))
                    break
                if lifeline is None:
                    poller.poll()
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
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._stop_r = self._stop_w = -1
        self._epoll.close()
        _local_servers.pop(self.address, None)

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

        gate = _gate.Gate(listener, self.authkey, timeout=self.handshake_timeout, capacity=self.max_handshakes,
                          ssl_context=self._ssl, binding=binding, uids=uids, on_failure=self._handshake_failed)
        self._gate = gate
        gate.watch(self._stop_r)
        try:
            while not self._stop.is_set():
                try:
                    woken = gate.step()
                except OSError as exc:
                    if self._stop.is_set():
                        return
                    self._warn("manager server %s: accept failed: %s", _describe(self.address), exc)
                    time.sleep(0.01)
                    continue
                if woken or self._stop.is_set():
                    return
                while gate.ready:
                    sock, peer = gate.ready.popleft()
                    t = threading.Thread(target=self._handle, args=(sock, peer), name=f"gilfree-manager {peer}",
                                         daemon=True)
                    t.start()
        finally:
            gate.close()

    def _handshake_failed(self, failure: _gate.HandshakeFailed) -> None:
        """A peer failed to authenticate: count it, and log it -- at most one line per kind of failure
        every :data:`gilfree._gate.LOG_INTERVAL` seconds (a flood must not become a flood of log lines)."""
        self.stats["refused"] += 1
        kind = failure.kind
        now = time.monotonic()
        last, quiet = self._log_marks.get(kind, (0.0, 0))
        if now - last < _gate.LOG_INTERVAL and last:
            self._log_marks[kind] = (last, quiet + 1)
            return
        self._log_marks[kind] = (now, 0)
        more = f" (and {quiet} more {kind} in the last {now - last:.0f} s)" if quiet else ""
        self._warn("manager server %s: refused %s: %s%s", _describe(self.address), failure.peer, failure.reason, more)

    def _handle(self, sock: Any, peer: str) -> None:
        """An authenticated connection's thread: HELLO, then requests until the client goes away."""
        connection._tune_tcp(sock, self.keepalive)
        with self._lock:
            self._conns.add(sock)
        client = None
        chan: _Channel | None = None
        try:
            chan = _Channel(sock, peer, self.max_message)
            try:
                hello = reduction.loads(chan.recv_bytes())
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
                msg = _loads(data)
                op = msg[0]
            except Exception as exc:
                if msg is None:
                    # an authenticated peer sent something we cannot read (a class the server cannot
                    # import, a corrupt pickle): answer with an error, the stream itself is intact
                    text = f"the manager could not unpickle a request: {type(exc).__name__}: {exc}\n"
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
        return (R_ERR, AttributeError(
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
        except Exception as exc:
            return (R_ERR, exc)

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
                data = reduction.dumps((R_REMOTE, f"the manager could not pickle the {what} "
                                                   f"({type(reply[1]).__name__}) to send it back: {exc}\n"))
            finally:
                ctx.replying = False
        n = len(data)
        try:
            if n <= _SMALL:
                frame = _HDR_pack(n) + data
                k = chan._write(frame)
                if k != n + 4:
                    chan.write_all(frame, k)
            else:
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


def raise_fd_limit() -> None:
    """In a process that only serves (a manager's server): let it hold as many descriptors as the hard
    limit allows (up to 65,536), so that a flood of unauthenticated connections meets the gate's
    table limit, not EMFILE.  Nothing here uses ``select.select``, whose limit is 1,024."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):
        pass


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


def _check_serializer(serializer: str) -> None:
    if serializer != "pickle":
        raise ValueError(
            f"serializer {serializer!r} is not supported by gilfree's managers: use 'pickle' (messages are "
            "only unpickled after both sides proved the authkey)"
        )


# ---------------------------------------------------------------------------------------------------
# The client side: one link per server per process, one channel per thread


_client_id = os.urandom(16)
_links: dict[tuple[Any, bytes, TLSConfig | None], _Link] = {}
_links_lock = threading.Lock()


class _Holder:
    """Lives in a thread's local storage; when the thread ends, gives its channel back to the link."""

    __slots__ = ("link", "chan", "ident")

    def __init__(self, link: _Link, chan: _Channel, ident: int) -> None:
        self.link = link
        self.chan = chan
        self.ident = ident

    def __del__(self) -> None:
        chan = self.chan
        chans = self.link._chans
        if chans.get(self.ident) is chan:
            del chans[self.ident]
        if chan.sock is not None and chan.pid == os.getpid() and not chan.busy:
            self.link._free.append(chan)


class _Link:
    """This process's connections to one server (see the module docstring)."""

    def __init__(self, address: Any, authkey: bytes, tls: TLSConfig | None) -> None:
        self.address = address
        self.authkey = bytes(authkey)
        self.tls = tls
        self._reset()

    def _reset(self) -> None:
        self._local = threading.local()  # holds each thread's _Holder (the thread's end frees its channel)
        #: thread id -> its channel: what a call looks up (a dict is cheaper than a threading.local)
        self._chans: dict[int, _Channel] = {}
        self._free: list[_Channel] = []
        self._all: weakref.WeakSet[_Channel] = weakref.WeakSet()
        self._lock = threading.Lock()
        self.pending: list[str] = []
        self.server_pid: int | None = None

    def __repr__(self) -> str:
        return f"<_Link {_describe(self.address)} channels={len(self._all)} pending decrefs={len(self.pending)}>"

    # -- channels ---------------------------------------------------------------------------------
    def channel(self) -> _Channel:
        """This thread's channel, opened (or taken from a finished thread) on first use."""
        ident = _get_ident()
        chan = self._chans.get(ident)
        if chan is not None:
            return chan
        while True:
            try:
                chan = self._free.pop()
            except IndexError:
                chan = self._connect()
                break
            if chan.sock is not None:
                break
        self._local.holder = _Holder(self, chan, ident)
        self._chans[ident] = chan
        return chan

    def _connect(self) -> _Channel:
        address = self.address
        family = _address_family(address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            try:
                sock.connect(address)
            except OSError as exc:
                if exc.errno is None:
                    raise
                raise type(exc)(exc.errno, f"cannot connect to the manager at {_describe(address)}: "
                                f"{exc.strerror} (is it running? it may have been shut down)") from None
            connection._tune_tcp(sock)
            if self.tls is not None:
                if family == socket.AF_UNIX:
                    raise ValueError(f"TLS is for TCP addresses only, not the Unix socket {address!r}")
                sock.settimeout(connection.HANDSHAKE_TIMEOUT)
                try:
                    sock = _wrap_client(self.tls, sock, address)
                except OSError as exc:
                    raise _tls_failure(exc, address) from None
                sock.settimeout(None)
            elif not select.select([sock], [], [], PROBE_AFTER)[0]:
                # no challenge yet: a TLS server waits for our ClientHello and would never send one.
                # An empty frame makes a TLS server say so at once; a plain gilfree server skips it.
                sock.sendall(_HDR_pack(0))
            chan = _Channel(sock, f"manager at {_describe(address)}")
            binding = connection.channel_binding(sock)
            connection.answer_challenge(chan, self.authkey, binding=binding)  # type: ignore[arg-type]
            connection.deliver_challenge(chan, self.authkey, binding=binding)  # type: ignore[arg-type]
            chan.send((OP_HELLO, _client_id, os.getpid(), address))
            kind, value = reduction.loads(chan.recv_bytes())
            if kind != R_OK:
                raise RemoteError(value)
            self.server_pid = value
            if family == socket.AF_UNIX and _USE_PIPES:
                _take_pipes(chan)
        except BaseException:
            sock.close()
            raise
        self._all.add(chan)
        return chan

    def broken(self, chan: _Channel, exc: BaseException) -> None:
        """A call on ``chan`` failed with ``exc``: discard the channel; if the server stopped answering
        (TCP keepalive or user timeout), raise an error that says so, and open no replacement (a connect
        to a vanished machine would hang for minutes; the server drops this client anyway)."""
        if not connection._peer_gone(exc):
            self.discard(chan)
            return
        self.discard(chan, reconnect=False)
        assert isinstance(exc, OSError)
        bound = ""
        timers = connection._keepalive_timers(connection.KEEPALIVE)
        if timers is not None:
            bound = f" for {connection._keepalive_bound(timers):g} s (TCP keepalive)"
        raise OSError(exc.errno, f"the manager at {_describe(self.address)} stopped answering{bound}: its machine "
                      f"or the network to it is gone ({exc.strerror or exc})") from exc

    def discard(self, chan: _Channel, reconnect: bool = True) -> None:
        """Close a channel left in an unknown state (a call interrupted half-way)."""
        last = reconnect and all(c is chan or c.sock is None for c in list(self._all))
        if last and chan.sock is not None and chan.pid == os.getpid():
            # keep the client known to the server: open the replacement before closing this one
            try:
                self._free.append(self._connect())
            except Exception:
                pass
        chan.close()
        ident = _get_ident()
        if self._chans.get(ident) is chan:
            del self._chans[ident]
            try:
                del self._local.holder  # its __del__ sees a closed channel: not given to another thread
            except AttributeError:
                pass

    def close(self) -> None:
        """Close every channel (the manager was shut down)."""
        for chan in list(self._all):
            chan.close()
        self._reset()

    # -- requests ---------------------------------------------------------------------------------
    def call(self, request: tuple[Any, ...], manager: Any = None) -> Any:
        """Send ``request`` on this thread's channel and return the reply's value (or raise its error)."""
        chan = self._chans.get(_get_ident())
        if chan is None:
            chan = self.channel()
        if self.pending or _deferred:
            self._before_call(chan)
        chan.busy = True
        try:
            msg = chan.request(request)
        except BaseException as exc:
            chan.busy = False
            self.broken(chan, exc)
            raise
        chan.busy = False
        if msg[0] == R_OK:
            return msg[1]
        return self._unusual(msg, manager)

    def _before_call(self, chan: _Channel) -> None:
        if self.pending:
            self._flush(chan)
        if _deferred:
            _release_deferred()

    def _unusual(self, msg: tuple[Any, Any], manager: Any) -> Any:
        kind, value = msg
        if kind == R_ERR:
            raise value
        if kind == R_PROXY:
            spec, typeid, ident, exposed = value
            token = Token(typeid, self.address, ident)
            authkey = self.authkey
            serializer = "pickle"
            if spec is None:
                return AutoProxy(token, serializer, manager=manager, authkey=authkey, exposed=exposed, incref=False)
            return spec(token, serializer, manager=manager, authkey=authkey, exposed=exposed, incref=False)
        if kind == R_REMOTE:
            raise RemoteError(value)
        raise RemoteError(f"unexpected reply kind {kind!r} from the manager\n")

    def decref(self, ident: str) -> None:
        """Drop a reference: now on this thread's idle channel, else with the next request.  Never blocks
        on a connect; safe inside ``__del__`` (even one that runs while this thread is mid-call)."""
        self.pending.append(ident)
        chan = self._chans.get(_get_ident())
        if chan is not None and not chan.busy and chan.sock is not None and chan.pid == os.getpid():
            try:
                self._flush(chan)
            except Exception:
                pass

    def _flush(self, chan: _Channel) -> None:
        pending, self.pending = self.pending, []
        if not pending:
            return
        chan.busy = True
        try:
            chan.send((OP_DECREF, tuple(pending)))
        except BaseException as exc:
            chan.busy = False
            self.broken(chan, exc)
            raise
        chan.busy = False


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


def _get_link(address: Any, authkey: bytes, tls: TLSConfig | None = None) -> _Link:
    """This process's link to the server at ``address`` for ``authkey`` and ``tls`` (made on first use)."""
    key = (address, bytes(authkey), tls)
    link = _links.get(key)
    if link is None:
        with _links_lock:
            link = _links.get(key)
            if link is None:
                link = _links[key] = _Link(address, authkey, tls)
    return link


def _find_link(address: Any, authkey: bytes) -> _Link:
    """A link to ``address`` for a proxy that came without TLS settings: the TLS one if this process has
    one (a proxy rebuilt here registered it), else a plain one."""
    key = bytes(authkey)
    for (addr, k, tls), link in list(_links.items()):
        if addr == address and k == key and tls is not None:
            return link
    return _get_link(address, authkey, None)


def _forget_link(address: Any, authkey: bytes) -> None:
    """Close and forget every link to ``address`` (its server was shut down)."""
    for key in [k for k in list(_links) if k[0] == address and k[1] == bytes(authkey)]:
        link = _links.pop(key, None)
        if link is not None:
            link.close()


# Proxies that children may hold: a proxy pickled to start a child, or one that existed when this
# process forked, may be the child's only way to its object while the child starts -- the parent's
# copy is often dropped by Process.start() itself.  Its DECREF waits until those children have ended.
_fork_generation = 0
_deferred: list[list[Any]] = []  # [link, id, children to wait for, looked again]
_deferred_next = 0.0


_server_processes: weakref.WeakSet[Any] = weakref.WeakSet()  # managers' servers: not users of proxies


def _children() -> set[Any]:
    return {p for p in process._children if p not in _server_processes}


def _defer_decref(link: _Link, ident: str) -> None:
    _deferred.append([link, ident, _children(), False])


def _release_deferred() -> None:
    """Send the deferred DECREFs whose children have all ended (at most every 50 ms)."""
    global _deferred_next
    now = time.monotonic()
    if now < _deferred_next:
        return
    _deferred_next = now + 0.05
    children = _children()
    keep = []
    for entry in list(_deferred):
        link, ident, waiting, looked = entry
        if not looked:  # a child being started when the proxy was dropped is listed only now
            waiting |= set(children)
            entry[3] = True
            keep.append(entry)
            continue
        waiting = {p for p in waiting if p in children and p._popen is not None and p._popen.poll() is None}
        entry[2] = waiting
        if waiting:
            keep.append(entry)
        else:
            link.decref(ident)
    _deferred[:] = keep


def _before_fork() -> None:
    global _fork_generation
    _fork_generation += 1


def _after_fork_in_child() -> None:
    global _client_id, _links_lock
    _client_id = os.urandom(16)
    _links_lock = threading.Lock()
    _deferred.clear()  # the parent's obligations
    for link in list(_links.values()):
        link._reset()  # the parent's channels are the parent's: never written to from here


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------------------------------------
# Proxies


class BaseProxy:
    """Base class of proxies: ``BaseProxy(token, serializer, manager=None, authkey=None, exposed=None,
    incref=True, manager_owned=False)``.

    ``_callmethod(name, args, kwds)`` calls a method of the referent in the server and returns the
    result (a copy), raises the exception the method raised, or returns a new proxy for methods
    listed in ``method_to_typeid``.  ``_getvalue()`` returns a copy of the referent.  Proxies can be
    pickled: the receiving process connects to the server itself.
    """

    _exposed_: tuple[str, ...] | None = None
    _method_to_typeid_: dict[str, str] | None = None
    _isauto = False

    def __init__(
        self,
        token: Token,
        serializer: str = "pickle",
        manager: Any = None,
        authkey: bytes | None = None,
        exposed: Any = None,
        incref: bool = True,
        manager_owned: bool = False,
    ) -> None:
        _check_serializer(serializer)
        object.__setattr__(self, "_owned", False)  # for __del__ if anything below raises
        self._token = token
        self._id = token.id
        self._serializer = serializer
        self._manager = manager
        if authkey is None:
            authkey = manager._authkey if manager is not None else process.current_process().authkey
        self._authkey = process.AuthenticationString(authkey)
        if manager is not None:
            self._link = _get_link(token.address, self._authkey, manager._tls)
        else:
            self._link = _find_link(token.address, self._authkey)
        server = _local_servers.get(token.address)
        self._server = server if server is not None and server.pid == os.getpid() else None
        self._owner_pid = os.getpid()
        self._gen = _fork_generation
        self._manager_owned = manager_owned
        if manager_owned:
            pass
        elif incref:
            self._incref()
        else:
            self._owned = True
        util.register_after_fork(self, BaseProxy._after_fork)

    # -- references ------------------------------------------------------------------------------
    def _incref(self) -> None:
        if self._manager_owned:
            return
        if self._server is not None:
            if not self._server._local_incref(self._id):
                raise KeyError(f"the manager has no object with id {self._id!r} (released)")
        else:
            self._link.call((OP_INCREF, self._id))
        self._owned = True

    def _decref(self) -> None:
        if not self._owned:
            return
        self._owned = False
        if self._server is not None:
            self._server._local_decref(self._id)
        elif self._gen != _fork_generation:  # lent to a child (pickled for it, or inherited by a fork)
            _defer_decref(self._link, self._id)
        else:
            self._link.decref(self._id)

    def __del__(self) -> None:
        try:
            if self._owned and self._owner_pid == os.getpid():
                self._decref()
        except Exception:
            pass

    def _after_fork(self) -> None:
        """In a forked child: the inherited proxy takes a reference of its own (the child's)."""
        if self._owner_pid == os.getpid():
            return  # built in this process (unpickled in a spawned child): it holds its reference
        self._owned = False
        self._owner_pid = os.getpid()
        self._gen = _fork_generation
        self._server = None
        try:
            self._incref()
        except Exception as exc:
            util.info("a proxy inherited by pid %d could not take a reference: %s", os.getpid(), exc)

    # -- calls -----------------------------------------------------------------------------------
    def _callmethod(self, methodname: str, args: tuple[Any, ...] = (), kwds: dict[str, Any] | None = None) -> Any:
        """Call ``methodname(*args, **kwds)`` on the referent in the server; return the result."""
        # _Link.call, inlined: this is every proxy method's path
        link = self._link
        chan = link._chans.get(_get_ident())
        if chan is None:
            chan = link.channel()
        if link.pending or _deferred:
            link._before_call(chan)
        chan.busy = True
        try:
            msg = chan.request((OP_CALL, self._id, methodname, args, kwds or None))
        except BaseException as exc:
            chan.busy = False
            link.broken(chan, exc)
            raise
        chan.busy = False
        if msg[0] == R_OK:
            return msg[1]
        return link._unusual(msg, self._manager)

    def _getvalue(self) -> Any:
        """A copy of the referent."""
        return self._link.call((OP_GETVALUE, self._id))

    # -- pickling --------------------------------------------------------------------------------
    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        spec: Any = None if self._isauto else type(self)
        exposed = self._exposed_ if self._isauto else None
        token = self._token
        preincref = False
        if _ctx.replying and self._server is not None and self._server is _ctx.server:
            # a server-side proxy sent back to a client: take the client's reference now, so the
            # object cannot be released while the reply is in flight; address as the client knows it
            client = _ctx.client
            assert client is not None
            self._server.incref(client, self._id)
            preincref = True
            if _ctx.alias is not None:
                token = Token(token.typeid, _ctx.alias, token.id)
        authkey = None
        if reduction.spawning_popen() is not None:
            authkey = bytes(self._authkey)
            self._gen = -1  # lent to the child being started: see _defer_decref
        return _rebuild_proxy, (spec, token, self._serializer, exposed, self._link.tls, authkey, preincref)

    def __deepcopy__(self, memo: Any) -> Any:
        return self._getvalue()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} object, typeid {self._token.typeid!r} at {id(self):#x}; "
                f"id {self._id} in the manager at {_describe(self._token.address)}>")

    def __str__(self) -> str:
        try:
            return self._callmethod("__repr__")
        except Exception:
            return repr(self)[:-1] + "; '__str__()' failed>"


def _rebuild_proxy(spec: Any, token: Token, serializer: str, exposed: Any, tls: TLSConfig | None,
                   authkey: bytes | None, preincref: bool) -> BaseProxy:
    """Unpickle a proxy (in a client, in a child, or in the server that owns the object)."""
    server = _ctx.server
    if server is not None and not _ctx.replying and token.address in server._aliases:
        # a proxy for one of our own objects arrived inside a request: make it local to the server
        token = Token(token.typeid, server.address, token.id)
        authkey = server.authkey
    if authkey is None:
        authkey = process.current_process().authkey
    if tls is not None:
        _get_link(token.address, authkey, tls)
    incref = not preincref
    if spec is None:
        return AutoProxy(token, serializer, authkey=authkey, exposed=exposed, incref=incref)
    return spec(token, serializer, authkey=authkey, incref=incref)


def RebuildProxy(func: Any, token: Token, serializer: str, kwds: dict[str, Any]) -> BaseProxy:
    """The stdlib's name for rebuilding a proxy: ``func(token, serializer, **kwds)``."""
    return func(token, serializer, **kwds)


def _proxy_method(name: str) -> Callable[..., Any]:
    def method(self: BaseProxy, /, *args: Any, **kwds: Any) -> Any:
        return self._callmethod(name, args, kwds)

    method.__name__ = name
    method.__qualname__ = name
    method.__doc__ = f"Call ``{name}`` of the referent in the manager's server."
    return method


_proxy_types: dict[tuple[str, tuple[str, ...]], type] = {}


def MakeProxyType(name: str, exposed: Iterable[str], _cache: dict[Any, type] | None = None) -> type:
    """A subclass of :class:`BaseProxy` with one method per name in ``exposed`` (built with ``type()``)."""
    exposed = tuple(exposed)
    cache = _proxy_types if _cache is None else _cache
    key = (name, exposed)
    cls = cache.get(key)
    if cls is None:
        namespace: dict[str, Any] = {name_: _proxy_method(name_) for name_ in exposed}
        namespace["_exposed_"] = exposed
        namespace["__module__"] = __name__
        cls = type(name, (BaseProxy,), namespace)
        cache[key] = cls
    return cls


def AutoProxy(token: Token, serializer: str = "pickle", manager: Any = None, authkey: bytes | None = None,
              exposed: Any = None, incref: bool = True, manager_owned: bool = False) -> BaseProxy:
    """A proxy whose methods are the referent's public methods (or ``exposed``)."""
    if exposed is None:
        if manager is not None:
            link = _get_link(token.address, manager._authkey, manager._tls)
        else:
            link = _find_link(token.address, authkey if authkey is not None else process.current_process().authkey)
        exposed = link.call((OP_SERVICE, "get_methods", (token.id,)))
    cls = MakeProxyType(f"AutoProxy[{token.typeid}]", exposed)
    proxy = cls(token, serializer, manager=manager, authkey=authkey, incref=incref, manager_owned=manager_owned)
    proxy._isauto = True
    return proxy


# ---------------------------------------------------------------------------------------------------
# Managers


class State:
    """A manager's lifecycle: INITIAL, then STARTED, then SHUTDOWN."""

    __slots__ = ("value",)
    INITIAL = 0
    STARTED = 1
    SHUTDOWN = 2

    def __init__(self) -> None:
        self.value = State.INITIAL

    def __repr__(self) -> str:
        return f"<State {('initial', 'started', 'shutdown')[self.value]}>"


class BaseManager:
    """A server process holding shared objects, and the means to create them and connect to it.

    ``BaseManager(address=None, authkey=None, serializer='pickle', ctx=None, *, shutdown_timeout=1.0,
    tls=None)``.  ``address=None`` serves on an abstract Unix socket; a ``(host, port)`` serves TCP on
    that interface only (give ``("0.0.0.0", port)`` to accept other machines).  ``authkey`` defaults
    to the current process's authkey.  ``tls``: a :class:`TLSConfig` (TCP only).  ``keepalive``: the
    TCP keepalive of the server's connections (see :class:`Server`; default 25 s: a client machine
    that vanished without closing its connections has its objects released within that).

    Where this runs: in the process that creates it; :meth:`start` starts the server in a child
    (with ``ctx``'s start method) and blocks until it listens.
    """

    _registry: dict[str, tuple[Any, Any, Any, Any]] = {}
    _Server: type[Server] = Server

    def __init__(self, address: Any = None, authkey: bytes | None = None, serializer: str = "pickle",
                 ctx: Any = None, *, shutdown_timeout: float = 1.0, tls: TLSConfig | None = None,
                 keepalive: Any = ...) -> None:
        _check_serializer(serializer)
        if authkey is None:
            authkey = process.current_process().authkey
        if tls is not None and address is not None and _address_family(address) == socket.AF_UNIX:
            raise ValueError(f"TLS is for TCP addresses only, not the Unix socket {address!r}")
        self._address = address
        self._authkey = process.AuthenticationString(authkey)
        self._state = State()
        self._serializer = serializer
        self._ctx = ctx
        self._shutdown_timeout = shutdown_timeout
        self._tls = tls
        connection._keepalive_timers(connection.KEEPALIVE if keepalive is ... else keepalive)  # checked here
        self._keepalive = keepalive
        self._process: Any = None
        self._finalizer: util.Finalize | None = None

    def __repr__(self) -> str:
        state = ("initial", "started", "shut down")[self._state.value]
        where = f" at {_describe(self._address)}" if self._address is not None else ""
        pid = f" server pid {self._process.pid}" if self._process is not None else ""
        return f"<{type(self).__name__} {state}{where}{pid}>"

    @property
    def address(self) -> Any:
        return self._address

    def _check_initial(self) -> None:
        if self._state.value == State.STARTED:
            raise ProcessError("Already started server")
        if self._state.value == State.SHUTDOWN:
            raise ProcessError("Manager has shut down")

    def get_server(self, **options: Any) -> Server:
        """A :class:`Server` for this manager's registry, bound now, to run with ``serve_forever()``."""
        self._check_initial()
        options.setdefault("keepalive", self._keepalive)
        return self._Server(self._registry, self._address, self._authkey, self._serializer, tls=self._tls, **options)

    def connect(self) -> None:
        """Connect to a server started elsewhere (at ``address``, with ``authkey``)."""
        link = _get_link(self._address, self._authkey, self._tls)
        link.call((OP_SERVICE, "dummy", ()))
        self._state.value = State.STARTED

    def start(self, initializer: Callable[..., Any] | None = None, initargs: Iterable[Any] = ()) -> None:
        """Start the server in a child process; return once it listens."""
        self._check_initial()
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        ctx = self._ctx if self._ctx is not None else process.default_context
        if ctx is None:
            raise RuntimeError("no context: import gilfree (or pass ctx=gilfree.get_context(...))")
        reader, writer = connection.Pipe(duplex=False)
        self._process = ctx.Process(
            target=type(self)._run_server,
            args=(self._registry, self._address, self._authkey, self._serializer, writer,
                  initializer, tuple(initargs), self._tls, self._keepalive),
        )
        ident = ":".join(str(i) for i in self._process._identity)
        self._process.name = f"{type(self).__name__}-{ident}"
        self._process.start()
        _server_processes.add(self._process)
        writer.close()
        try:
            ready = connection.wait([reader, self._process.sentinel], START_TIMEOUT)
            message = reader.recv() if reader in ready or reader.poll() else None
        except EOFError:
            message = None
        finally:
            reader.close()
        if message is None or message[0] != R_OK:
            self._process.join(5)
            if self._process.exitcode is None:
                self._process.kill()
                self._process.join()
            if message is not None:
                raise message[1]
            raise ProcessError(
                f"the manager's server process (pid {self._process.pid}) ended with exit code "
                f"{self._process.exitcode} before it reported its address (see its error output above)"
            )
        self._address = message[1]
        self._state.value = State.STARTED
        self._finalizer = util.Finalize(
            self, type(self)._finalize_manager,
            args=(self._process, self._address, self._authkey, self._state, self._tls, self._shutdown_timeout),
            exitpriority=0,
        )

    @classmethod
    def _run_server(cls, registry: dict[str, Any], address: Any, authkey: bytes, serializer: str, writer: Any,
                    initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = (),
                    tls: TLSConfig | None = None, keepalive: Any = ...) -> None:
        """In the server process: run ``initializer``, bind, report the address, serve."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the terminal is for the parent
        try:
            if initializer is not None:
                initializer(*initargs)
            server = cls._Server(registry, address, authkey, serializer, tls=tls, keepalive=keepalive)
        except BaseException as exc:
            try:
                writer.send((R_ERR, exc))
            except Exception:
                writer.send((R_ERR, ProcessError(f"the manager's server failed to start: {exc!r}")))
            writer.close()
            raise
        writer.send((R_OK, server.address))
        writer.close()
        raise_fd_limit()
        util.info("manager serving at %r", server.address)
        parent = process.parent_process()
        server.serve_forever(lifeline=parent.sentinel if parent is not None else None)

    @staticmethod
    def _finalize_manager(proc: Any, address: Any, authkey: bytes, state: State, tls: TLSConfig | None,
                          shutdown_timeout: float) -> None:
        """Stop the server process: ask it to shut down, then terminate, then kill it."""
        if proc.is_alive():
            util.info("sending shutdown message to manager")
            try:
                link = _Link(address, authkey, tls)  # a private connection: works from any thread, at exit
                try:
                    link.call((OP_SERVICE, "shutdown", ()))
                finally:
                    link.close()
            except Exception:
                pass
            proc.join(timeout=shutdown_timeout)
            if proc.is_alive():
                util.info("manager still alive; terminating it")
                proc.terminate()
                proc.join(timeout=shutdown_timeout)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        state.value = State.SHUTDOWN
        _forget_link(address, authkey)

    def shutdown(self) -> None:
        """Stop the server this manager started (no-op if it started none, or did already).

        A manager that only connected (``connect()``) stops being usable itself; the server goes on
        and so does this process's link to it, which every other manager and proxy here that talks
        to that server shares: closing it would make the server release their objects.
        """
        if self._finalizer is not None:
            self._finalizer()
        elif self._state.value == State.STARTED and self._process is None:
            self._state.value = State.SHUTDOWN

    def join(self, timeout: float | None = None) -> None:
        """Wait for the server process to end."""
        if self._process is not None:
            self._process.join(timeout)
            if not self._process.is_alive():
                self._process = None

    def _link(self) -> _Link:
        if self._state.value != State.STARTED:
            raise ProcessError("the manager is not started: call start() or connect() first"
                               if self._state.value == State.INITIAL else "Manager has shut down")
        return _get_link(self._address, self._authkey, self._tls)

    def _create(self, typeid: str, /, *args: Any, **kwds: Any) -> tuple[Token, tuple[str, ...]]:
        """Create a shared object of ``typeid`` in the server; return its token and exposed methods."""
        ident, exposed = self._link().call((OP_CREATE, typeid, args, kwds or None))
        return Token(typeid, self._address, ident), exposed

    def _debug_info(self) -> str:
        return self._link().call((OP_SERVICE, "debug_info", ()))

    def _number_of_objects(self) -> int:
        return self._link().call((OP_SERVICE, "number_of_objects", ()))

    def __enter__(self) -> BaseManager:
        if self._state.value == State.INITIAL:
            self.start()
        if self._state.value != State.STARTED:
            raise ProcessError("Manager has shut down" if self._state.value == State.SHUTDOWN else "Unable to start server")
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @classmethod
    def register(cls, typeid: str, callable: Any = None, proxytype: Any = None, exposed: Iterable[str] | None = None,
                 method_to_typeid: Mapping[str, str] | None = None, create_method: bool = True) -> None:
        """Register ``typeid``: ``callable(*args, **kwds)`` (or a ``"module:callable"`` string) makes the
        objects in the server, ``proxytype`` stands for them in clients (AutoProxy by default)."""
        if not isinstance(typeid, str):
            raise TypeError(f"typeid must be a str, not {type(typeid).__name__}")
        if "_registry" not in cls.__dict__:
            cls._registry = cls._registry.copy()
        if proxytype is None:
            proxytype = AutoProxy
        exposed = exposed or getattr(proxytype, "_exposed_", None)
        method_to_typeid = method_to_typeid or getattr(proxytype, "_method_to_typeid_", None)
        if method_to_typeid:
            for key, value in method_to_typeid.items():
                if type(key) is not str or type(value) is not str:
                    raise TypeError(f"method_to_typeid maps method names to typeids (str to str), not {key!r} to {value!r}")
            method_to_typeid = dict(method_to_typeid)
        cls._registry[typeid] = (callable, tuple(exposed) if exposed is not None else None, method_to_typeid, proxytype)
        if create_method:
            def create(self: BaseManager, /, *args: Any, **kwds: Any) -> Any:
                token, exp = self._create(typeid, *args, **kwds)
                return proxytype(token, self._serializer, manager=self, authkey=self._authkey, exposed=exp, incref=False)

            create.__name__ = create.__qualname__ = typeid
            create.__doc__ = f"Create a shared {typeid!r} object in the server; return a proxy for it."
            setattr(cls, typeid, create)


# ---------------------------------------------------------------------------------------------------
# What SyncManager serves


class Namespace:
    """A plain object whose attributes are shared (``manager.Namespace(a=1)``)."""

    def __init__(self, /, **kwds: Any) -> None:
        self.__dict__.update(kwds)

    def __repr__(self) -> str:
        items = sorted(f"{k}={v!r}" for k, v in self.__dict__.items() if not k.startswith("_"))
        return f"{type(self).__name__}({', '.join(items)})"


class Value:
    """A shared value with ``get``/``set``/``.value`` (``typecode`` is kept, not enforced)."""

    def __init__(self, typecode: Any, value: Any, lock: Any = True) -> None:
        self._typecode = typecode
        self._value = value

    def get(self) -> Any:
        return self._value

    def set(self, value: Any) -> None:
        self._value = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._typecode!r}, {self._value!r})"

    value = property(get, set)


def Array(typecode: str, sequence: Iterable[Any], lock: Any = True) -> array.array:
    """A shared ``array.array``."""
    return array.array(typecode, sequence)


class _CallerGone(Exception):
    """Raised in the server to abandon a blocking call whose client hung up."""


def _caller_gone() -> bool:
    state = _ctx.conn
    return state is not None and (state.dead or state.hup)


class _ServedQueue(queue.Queue):  # type: ignore[type-arg]
    """The server side of ``SyncManager.Queue``: a ``queue.Queue`` whose blocking ``get``/``put`` give up
    when the client that waits has died, so the item it would have taken stays in the queue (the
    stdlib's server would hand it to the dead client's thread, and it would be lost)."""

    _SLICE = 0.25

    def _sliced(self, op: Callable[[bool, float | None], Any], block: bool, timeout: float | None) -> Any:
        if not block or _ctx.conn is None:
            return op(block, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = self._SLICE if deadline is None else min(self._SLICE, deadline - time.monotonic())
            try:
                return op(True, max(wait, 0.0))
            except (queue.Empty, queue.Full):
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                if _caller_gone():
                    raise _CallerGone("the client that waited has hung up") from None

    # An item that is there (a put into a queue without a limit) is taken at once: no slices, no clock,
    # and a Condition is notified only if someone waits on it (Condition.notify costs more than the
    # rest of a put).  This was 40% of the server's time per put/get.
    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        with self.mutex:
            items = self.queue  # what _qsize/_get/_put of queue.Queue use, without their calls
            if items:
                item = items.popleft()
                if self.not_full._waiters:  # type: ignore[attr-defined]
                    self.not_full.notify()
                return item
        return self._sliced(super().get, block, timeout)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if self.maxsize > 0:
            return self._sliced(lambda b, t: super(_ServedQueue, self).put(item, b, t), block, timeout)
        with self.mutex:
            self.queue.append(item)
            self.unfinished_tasks += 1
            if self.not_empty._waiters:  # type: ignore[attr-defined]
                self.not_empty.notify()
        return None


class IteratorProxy(BaseProxy):
    _exposed_ = ("__next__", "send", "throw", "close")

    def __iter__(self) -> IteratorProxy:
        return self

    def __next__(self, *args: Any) -> Any:
        return self._callmethod("__next__", args)

    def send(self, *args: Any) -> Any:
        return self._callmethod("send", args)

    def throw(self, *args: Any) -> Any:
        return self._callmethod("throw", args)

    def close(self, *args: Any) -> Any:
        return self._callmethod("close", args)


class AcquirerProxy(BaseProxy):
    _exposed_: tuple[str, ...] = ("acquire", "release")

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        args = (blocking,) if timeout is None else (blocking, timeout)
        return self._callmethod("acquire", args)

    def release(self) -> None:
        return self._callmethod("release")

    def __enter__(self) -> bool:
        return self._callmethod("acquire")

    def __exit__(self, *exc: object) -> None:
        return self._callmethod("release")


class ConditionProxy(AcquirerProxy):
    _exposed_: tuple[str, ...] = ("acquire", "release", "wait", "notify", "notify_all")

    def wait(self, timeout: float | None = None) -> bool:
        return self._callmethod("wait", (timeout,))

    def notify(self, n: int = 1) -> None:
        return self._callmethod("notify", (n,))

    def notify_all(self) -> None:
        return self._callmethod("notify_all")

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        result = predicate()
        if result:
            return result
        endtime = None if timeout is None else time.monotonic() + timeout
        waittime = None
        while not result:
            if endtime is not None:
                waittime = endtime - time.monotonic()
                if waittime <= 0:
                    break
            self.wait(waittime)
            result = predicate()
        return result


class EventProxy(BaseProxy):
    _exposed_ = ("is_set", "set", "clear", "wait")

    def is_set(self) -> bool:
        return self._callmethod("is_set")

    def set(self) -> None:
        return self._callmethod("set")

    def clear(self) -> None:
        return self._callmethod("clear")

    def wait(self, timeout: float | None = None) -> bool:
        return self._callmethod("wait", (timeout,))


class BarrierProxy(BaseProxy):
    _exposed_ = ("__getattribute__", "wait", "abort", "reset")

    def wait(self, timeout: float | None = None) -> int:
        return self._callmethod("wait", (timeout,))

    def abort(self) -> None:
        return self._callmethod("abort")

    def reset(self) -> None:
        return self._callmethod("reset")

    @property
    def parties(self) -> int:
        return self._callmethod("__getattribute__", ("parties",))

    @property
    def n_waiting(self) -> int:
        return self._callmethod("__getattribute__", ("n_waiting",))

    @property
    def broken(self) -> bool:
        return self._callmethod("__getattribute__", ("broken",))


class NamespaceProxy(BaseProxy):
    _exposed_ = ("__getattribute__", "__setattr__", "__delattr__")

    def __getattr__(self, key: str) -> Any:
        if key[0] == "_":
            return object.__getattribute__(self, key)
        return object.__getattribute__(self, "_callmethod")("__getattribute__", (key,))

    def __setattr__(self, key: str, value: Any) -> None:
        if key[0] == "_":
            object.__setattr__(self, key, value)
            return
        object.__getattribute__(self, "_callmethod")("__setattr__", (key, value))

    def __delattr__(self, key: str) -> None:
        if key[0] == "_":
            object.__delattr__(self, key)
            return
        object.__getattribute__(self, "_callmethod")("__delattr__", (key,))


class ValueProxy(BaseProxy):
    _exposed_ = ("get", "set")

    def get(self) -> Any:
        return self._callmethod("get")

    def set(self, value: Any) -> None:
        return self._callmethod("set", (value,))

    value = property(get, set)
    __class_getitem__: Any = classmethod(types.GenericAlias)


class BaseListProxy(BaseProxy):
    """Proxy of a list: every list method, each one round trip to the server."""

    _exposed_ = ("__add__", "__contains__", "__delitem__", "__getitem__", "__len__", "__mul__",
                 "__reversed__", "__rmul__", "__setitem__", "append", "count", "extend", "index",
                 "insert", "pop", "remove", "reverse", "sort", "__imul__")

    def __add__(self, other: Any) -> list[Any]:
        return self._callmethod("__add__", (other,))

    def __contains__(self, item: Any) -> bool:
        return self._callmethod("__contains__", (item,))

    def __delitem__(self, index: Any) -> None:
        return self._callmethod("__delitem__", (index,))

    def __getitem__(self, index: Any) -> Any:
        return self._callmethod("__getitem__", (index,))

    def __len__(self) -> int:
        return self._callmethod("__len__")

    def __mul__(self, n: int) -> list[Any]:
        return self._callmethod("__mul__", (n,))

    def __reversed__(self) -> Any:
        return self._callmethod("__reversed__")

    def __rmul__(self, n: int) -> list[Any]:
        return self._callmethod("__rmul__", (n,))

    def __setitem__(self, index: Any, value: Any) -> None:
        return self._callmethod("__setitem__", (index, value))

    def append(self, item: Any) -> None:
        return self._callmethod("append", (item,))

    def count(self, item: Any) -> int:
        return self._callmethod("count", (item,))

    def extend(self, items: Iterable[Any]) -> None:
        return self._callmethod("extend", (items,))

    def index(self, *args: Any) -> int:
        return self._callmethod("index", args)

    def insert(self, index: int, item: Any) -> None:
        return self._callmethod("insert", (index, item))

    def pop(self, *args: Any) -> Any:
        return self._callmethod("pop", args)

    def remove(self, item: Any) -> None:
        return self._callmethod("remove", (item,))

    def reverse(self) -> None:
        return self._callmethod("reverse")

    def sort(self, *args: Any, **kwds: Any) -> None:
        return self._callmethod("sort", args, kwds)


class ListProxy(BaseListProxy):
    def __iadd__(self, value: Iterable[Any]) -> ListProxy:  # type: ignore[override, misc]
        self._callmethod("extend", (value,))
        return self

    def __imul__(self, value: int) -> ListProxy:  # type: ignore[override, misc]
        self._callmethod("__imul__", (value,))
        return self

    __class_getitem__: Any = classmethod(types.GenericAlias)


class DictProxy(BaseProxy):
    """Proxy of a dict: every dict method, each one round trip; iteration goes through a server iterator."""

    _exposed_ = ("__contains__", "__delitem__", "__getitem__", "__iter__", "__len__", "__setitem__",
                 "clear", "copy", "get", "items", "keys", "pop", "popitem", "setdefault", "update", "values")
    _method_to_typeid_ = {"__iter__": "Iterator"}

    def __contains__(self, key: Any) -> bool:
        return self._callmethod("__contains__", (key,))

    def __delitem__(self, key: Any) -> None:
        return self._callmethod("__delitem__", (key,))

    def __getitem__(self, key: Any) -> Any:
        return self._callmethod("__getitem__", (key,))

    def __iter__(self) -> Any:
        return self._callmethod("__iter__")

    def __len__(self) -> int:
        return self._callmethod("__len__")

    def __setitem__(self, key: Any, value: Any) -> None:
        return self._callmethod("__setitem__", (key, value))

    def clear(self) -> None:
        return self._callmethod("clear")

    def copy(self) -> dict[Any, Any]:
        return self._callmethod("copy")

    def get(self, *args: Any) -> Any:
        return self._callmethod("get", args)

    def items(self) -> list[tuple[Any, Any]]:
        return self._callmethod("items")

    def keys(self) -> list[Any]:
        return self._callmethod("keys")

    def pop(self, *args: Any) -> Any:
        return self._callmethod("pop", args)

    def popitem(self) -> tuple[Any, Any]:
        return self._callmethod("popitem")

    def setdefault(self, *args: Any) -> Any:
        return self._callmethod("setdefault", args)

    def update(self, *args: Any, **kwds: Any) -> None:
        return self._callmethod("update", args, kwds)

    def values(self) -> list[Any]:
        return self._callmethod("values")

    __class_getitem__: Any = classmethod(types.GenericAlias)


ArrayProxy = MakeProxyType("ArrayProxy", ("__len__", "__getitem__", "__setitem__"))

BasePoolProxy = MakeProxyType("PoolProxy", (
    "apply", "apply_async", "close", "imap", "imap_unordered", "join", "map", "map_async",
    "starmap", "starmap_async", "terminate",
))
BasePoolProxy._method_to_typeid_ = {  # type: ignore[attr-defined]
    "apply_async": "AsyncResult",
    "map_async": "AsyncResult",
    "starmap_async": "AsyncResult",
    "imap": "Iterator",
    "imap_unordered": "Iterator",
}


class PoolProxy(BasePoolProxy):  # type: ignore[valid-type, misc]
    def __enter__(self) -> PoolProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()


class SyncManager(BaseManager):
    """A manager with the stdlib's shared types: ``dict``, ``list``, ``Namespace``, ``Queue``,
    ``JoinableQueue``, the locks, ``Condition``, ``Event``, ``Barrier``, ``Value``, ``Array``, ``Pool``.

    ``gilfree.Manager()`` returns a started one.  The queues and locks live in the server (a
    ``queue.Queue``, ``threading`` primitives); every operation is a round trip to it.
    """

    if TYPE_CHECKING:
        def dict(self, *args: Any, **kwds: Any) -> DictProxy: ...
        def list(self, *args: Any) -> ListProxy: ...
        def Namespace(self, **kwds: Any) -> NamespaceProxy: ...
        def Queue(self, maxsize: int = 0) -> Any: ...
        def JoinableQueue(self, maxsize: int = 0) -> Any: ...
        def Lock(self) -> AcquirerProxy: ...
        def RLock(self) -> AcquirerProxy: ...
        def Semaphore(self, value: int = 1) -> AcquirerProxy: ...
        def BoundedSemaphore(self, value: int = 1) -> AcquirerProxy: ...
        def Condition(self, lock: Any = None) -> ConditionProxy: ...
        def Event(self) -> EventProxy: ...
        def Barrier(self, parties: int, action: Any = None, timeout: float | None = None) -> BarrierProxy: ...
        def Value(self, typecode: Any, value: Any, lock: Any = True) -> ValueProxy: ...
        def Array(self, typecode: str, sequence: Any, lock: Any = True) -> Any: ...
        def Pool(self, processes: int | None = None, *args: Any, **kwds: Any) -> PoolProxy: ...


SyncManager.register("Queue", _ServedQueue)
SyncManager.register("JoinableQueue", _ServedQueue)
SyncManager.register("Event", threading.Event, EventProxy)
SyncManager.register("Lock", threading.Lock, AcquirerProxy)
SyncManager.register("RLock", threading.RLock, AcquirerProxy)
SyncManager.register("Semaphore", threading.Semaphore, AcquirerProxy)
SyncManager.register("BoundedSemaphore", threading.BoundedSemaphore, AcquirerProxy)
SyncManager.register("Condition", threading.Condition, ConditionProxy)
SyncManager.register("Barrier", threading.Barrier, BarrierProxy)
SyncManager.register("Pool", "gilfree.pool:Pool", PoolProxy)
SyncManager.register("list", list, ListProxy)
SyncManager.register("dict", dict, DictProxy)
SyncManager.register("Value", Value, ValueProxy)
SyncManager.register("Array", Array, ArrayProxy)
SyncManager.register("Namespace", Namespace, NamespaceProxy)
# types returned by methods of PoolProxy (and DictProxy.__iter__)
SyncManager.register("Iterator", proxytype=IteratorProxy, create_method=False)
SyncManager.register("AsyncResult", create_method=False)


# ---------------------------------------------------------------------------------------------------
# SharedMemoryManager


class SharedMemoryServer(Server):
    """A :class:`Server` that also owns shared-memory segments and unlinks them when it stops."""

    services = Server.services | {"track_segment", "release_segment", "list_segments"}

    def __init__(self, *args: Any, **kwds: Any) -> None:
        super().__init__(*args, **kwds)
        self._segments: list[str] = []

    def service_track_segment(self, client: _ClientState, name: str) -> None:
        """The server owns segment ``name`` from now on (the shared-memory tracker knows it)."""
        from .. import _tracker
        from .._start import get_executable

        if not isinstance(name, str) or "/" in name:
            raise ValueError(f"bad segment name {name!r}")
        _tracker.register("/" + name, get_executable())
        with self._lock:
            self._segments.append(name)

    def service_release_segment(self, client: _ClientState, name: str) -> None:
        """Unlink segment ``name`` now (if this server owns it)."""
        with self._lock:
            if name not in self._segments:
                return
            self._segments.remove(name)
        _unlink_segment(name)

    def service_list_segments(self, client: _ClientState) -> list[str]:
        with self._lock:
            return list(self._segments)

    def serve_forever(self, lifeline: int | None = None) -> None:
        try:
            super().serve_forever(lifeline)
        finally:
            with self._lock:
                names, self._segments = self._segments, []
            for name in names:
                _unlink_segment(name)


def _unlink_segment(name: str) -> None:
    import _posixshmem

    from .. import _tracker

    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass
    _tracker.unregister("/" + name)


class SharedMemoryManager(BaseManager):
    """A manager whose server owns shared-memory blocks: ``SharedMemory(size)`` and
    ``ShareableList(sequence)`` create them in the calling process, and the server unlinks them
    all when it shuts down (or the shared-memory tracker does, if the server is killed)."""

    _Server = SharedMemoryServer

    def _service(self, name: str, *args: Any) -> Any:
        return self._link().call((OP_SERVICE, name, args))

    def _adopt(self, shm: Any) -> None:
        """Hand the ownership of ``shm``'s segment over to the server."""
        from .. import _tracker

        _tracker.unregister("/" + shm.name)
        shm._track = False
        try:
            self._service("track_segment", shm.name)
        except BaseException:
            shm.unlink()
            raise

    def SharedMemory(self, size: int) -> Any:
        """A new :class:`~gilfree.shared_memory.SharedMemory` block of ``size`` bytes owned by the server."""
        from .. import shared_memory

        shm = shared_memory.SharedMemory(None, create=True, size=size)
        self._adopt(shm)
        return shm

    def ShareableList(self, sequence: Iterable[Any]) -> Any:
        """A new :class:`~gilfree.shared_memory.ShareableList` whose block the server owns."""
        from .. import shared_memory

        sl = shared_memory.ShareableList(sequence)
        self._adopt(sl.shm)
        return sl
