"""Connections: ``Pipe``, ``Listener``/``Client``, ``wait`` (layer L2).

A :class:`Connection` sends whole messages over a file descriptor -- one end of an ``os.pipe``, of a
socket pair, or of a TCP/Unix socket::

       sender process                                   receiver process
    send(obj) ── pickle (reduction, 2 tiers) ──┐
                                               │ header + pickle chunks + out-of-band buffers,
                                               │ one writev/sendmsg, no copy of large payloads
                                               ▼
                                  [ kernel pipe / socket buffer ]
                                               │ readv/recv_into straight into the buffers
                                               ▼               the message will live in
                                            recv() ── unpickle ──> obj

Framing.  Every message starts with a signed 4-byte big-endian length ``n``:

* ``n >= 0``: ``n`` payload bytes follow (the stdlib's framing, so ``send_bytes``/``recv_bytes``
  interoperate with ``multiprocessing.connection``);
* ``n == -1``: an 8-byte length follows, then the payload (the stdlib's framing for > 2 GiB);
* ``n == -3``: (gilfree's) the next message carries file descriptors; it comes on its own, so
  that only the next header needs ``recvmsg`` and every other read is a plain one;
* ``n == -2``: a gilfree message with out-of-band buffers: ``!IQ`` (buffer count ``k``, pickle
  length), ``k`` 8-byte buffer lengths, then the pickle, then the ``k`` buffers.  Used only by
  :meth:`Connection.send` for buffers of at least :data:`OOB_MIN` bytes.

(``-5`` says which memfds a peer released, see :data:`_RELEASED`; ``-6`` is taken by the managers'
channels, whose server wakes a pipe's reader with it: ``gilfree.managers._protocol._WAKE``.)

File descriptors in a sent object (another ``Connection``, a socket) travel as ``SCM_RIGHTS``
ancillary data with the header, so they work over duplex pipes and Unix-socket connections.

Authentication (:class:`Listener` / :func:`Client` with an ``authkey``) is the HMAC-SHA256
challenge-response of CPython 3.12+, done in both directions before a single pickled byte is read,
within :data:`HANDSHAKE_TIMEOUT` seconds, so a silent or hostile peer cannot stall ``accept()``.
TCP connections have keepalive and a user timeout (:func:`_tune_tcp`, :data:`KEEPALIVE`): a peer that
vanished without a FIN or RST (machine off, network cut) makes a read fail within 25 s.

Where this runs: in any process, on the calling thread.  ``recv``/``send`` block until the whole
message has moved; ``poll`` and ``wait`` block up to their timeout.  A Connection is not
thread-safe (as in the stdlib): use one per thread, or a lock.
"""

from __future__ import annotations

import _pickle as pickle  # the C pickler itself: `pickle.py` would also import `re` (start-up imports, design.md)
import _socket  # the C module: `_socket.py` costs a spawned child ~5 ms (start-up imports, design.md)
import array
import errno
import fcntl
import mmap
import operator
import os
import select
import stat
import struct
import sys
import threading
import time
import weakref

from . import reduction, util
from ._errors import AuthenticationError, BufferTooShort

# Modules a spawned child would import for nothing are imported where they are used: `typing` (only
# annotations), `hmac` (only Listener/Client authentication), `hashlib` and `ssl` (only TLS channel
# bindings), `tempfile` (only default Unix addresses).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Iterable, NoReturn

__all__ = ["Client", "Connection", "Listener", "Pipe", "wait", "deliver_challenge", "answer_challenge",
           "channel_binding"]

#: Buffers at least this large travel out of band, read straight into their final memory.
OOB_MIN = 256 * 1024
#: Seconds a peer gets to complete the authentication handshake.
HANDSHAKE_TIMEOUT = 20.0
#: peers a Listener authenticates at once; when more arrive, the oldest of the largest group is dropped
LISTENER_HANDSHAKES = 256
#: Bytes asked of the kernel for a pipe's buffer (fewer context switches for large messages).
PIPE_BUFFER = 1 << 20
#: Most descriptors one message may carry.
MAX_FDS = 253

_HDR = struct.Struct("!i")
_HDR_LONG = struct.Struct("!Q")
_HDR_EXT = struct.Struct("!IQ")
_SMALL = 1 << 16
#: A large message is read in pieces: the first this large, each next one at most as large as what
#: has arrived so far (so a length the peer claims but does not send allocates nothing more).
_FIRST_PIECE = 1 << 20
_IOV_MAX = 1024
_F_SETPIPE_SZ = 1031
_ANC_SPACE = _socket.CMSG_SPACE(MAX_FDS * 4)
_MSG_CTRUNC = int(_socket.MSG_CTRUNC)
_MSG_WAITALL = int(_socket.MSG_WAITALL)
_MSG_PEEK = int(_socket.MSG_PEEK)
_MSG_DONTWAIT = int(_socket.MSG_DONTWAIT)
#: Descriptors that arrive with a message are close-on-exec, as every descriptor Python makes (PEP 446).
_MSG_CMSG_CLOEXEC = int(getattr(_socket, "MSG_CMSG_CLOEXEC", 0))
_PEEK_SIZE = 1 << 16
#: A header that says "the next message carries file descriptors" (gilfree's extension).
_FDS_NEXT = -3
#: In a ``-2`` frame, a buffer length with this bit set: the buffer is not in the stream but in a
#: memfd that came with the message (the last descriptors of the message, in buffer order).  Bits
#: 40-62 then hold the memfd's number in the sender's cache, bits 0-39 the length.
_IN_FD = 1 << 63
_FD_LEN_BITS = 40
_FD_LEN_MASK = (1 << _FD_LEN_BITS) - 1
_FD_ID_MASK = (1 << 23) - 1
#: ``-5``: (gilfree's) "these memfds of yours are free again": a count and 4-byte numbers follow.
_RELEASED = -5
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
#: memfds a connection keeps for reuse: at most this many, and this many bytes of idle ones.
_MEMFD_KEEP = 8
_MEMFD_IDLE_BYTES = 256 << 20
#: Bytes asked of the kernel for each direction of a duplex Pipe (as PIPE_BUFFER for one-way pipes).
SOCKET_BUFFER = 1 << 20  # a plain int: enum arithmetic costs a microsecond per message

#: How long a TCP peer that vanished without FIN or RST (machine off, network cut) goes unnoticed, in
#: seconds: every TCP connection gilfree makes or accepts (:class:`Listener`, :func:`Client`, managers)
#: asks the kernel to probe an idle peer (``SO_KEEPALIVE``) and to give up on data it does not
#: acknowledge (``TCP_USER_TIMEOUT``) -- see :func:`_keepalive_timers` and :func:`_tune_tcp`.
KEEPALIVE_BOUND = 25.0


def _keepalive_timers(keepalive: Any) -> tuple[int, int, int, float] | None:
    """``(idle s, interval s, probes, user timeout s)`` for a keepalive setting, or None (leave the kernel's).

    ``keepalive`` is None (or ``"off"``, ``0``): the kernel's defaults (no keepalive at all on Linux);
    a number ``N`` of seconds: idle ``0.4 N``, then a probe every ``0.2 N``, 3 probes, so a silent
    peer is given up after ``N`` (25 -> 10 + 3 x 5); a tuple or a string ``"idle,interval,count"``
    with an optional fourth item, the user timeout in seconds.

    The user timeout is ``idle + interval x count`` unless given: Linux lets ``TCP_USER_TIMEOUT``
    override ``TCP_KEEPCNT`` (man 7 tcp: an idle connection is dropped at the first probe due after
    the user timeout has passed since the peer was last heard from), so a longer one would stretch the
    keepalive bound and a shorter one would cut the probes short.  With this choice both say the same:
    a peer silent for ``idle + interval x count`` seconds is gone -- whether the connection was idle
    (probes unanswered) or had data in flight (retransmissions unacknowledged; without a user timeout
    the kernel retries for ~15 minutes, and keepalive does not probe while data is outstanding).
    """
    if keepalive is None or keepalive is False:
        return None
    if isinstance(keepalive, str):
        text = keepalive.strip().lower()
        if text in ("", "off", "no", "none", "0"):
            return None
        keepalive = tuple(float(x) for x in text.split(",")) if "," in text else float(text)
    if isinstance(keepalive, (int, float)):
        if keepalive <= 0:
            return None
        n = float(keepalive)
        keepalive = (n * 0.4, n * 0.2, 3)
    if not 3 <= len(keepalive) <= 4:
        raise ValueError(f"keepalive should be seconds, None or (idle, interval, count[, user timeout]), not {keepalive!r}")
    idle, interval, count = max(1, round(keepalive[0])), max(1, round(keepalive[1])), max(1, int(keepalive[2]))
    user = float(keepalive[3]) if len(keepalive) == 4 else float(idle + interval * count)
    if user <= 0:
        raise ValueError(f"keepalive: the user timeout should be positive, not {user!r}")
    return idle, interval, count, user


def _keepalive_bound(timers: tuple[int, int, int, float]) -> float:
    """Seconds after which a silent peer is given up with these timers (Linux: the first probe due
    once the user timeout has passed since the peer was last heard from)."""
    idle, interval, _, user = timers
    k = max(1, -(-(user - idle) // interval))
    return idle + k * interval


#: The keepalive timers of TCP connections (see :func:`_keepalive_timers`): ``GILFREE_TCP_KEEPALIVE``
#: is seconds (the bound), ``idle,interval,count[,user_timeout]``, or ``off`` (the kernel's defaults).
KEEPALIVE = _keepalive_timers(os.environ.get("GILFREE_TCP_KEEPALIVE", str(KEEPALIVE_BOUND)))
_SOL_TCP = _socket.IPPROTO_TCP
_TCP_OPTS = tuple(getattr(_socket, name, None) for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT", "TCP_USER_TIMEOUT"))


def _tune_tcp(sock: Any, keepalive: Any = ...) -> None:
    """Set a connected socket's options for gilfree's traffic: ``TCP_NODELAY`` (small messages go at
    once), and the keepalive timers (``...``: :data:`KEEPALIVE`; else as :func:`_keepalive_timers`
    reads them) so that a peer that vanished without a FIN or RST is noticed: a read then fails with
    ``TimeoutError`` (``ETIMEDOUT``, or ``EHOSTUNREACH`` if a router said so).  Unix sockets are left
    alone (a Unix peer's end is always seen)."""
    if sock.family not in (_socket.AF_INET, _socket.AF_INET6):
        return
    sock.setsockopt(_SOL_TCP, _socket.TCP_NODELAY, 1)
    timers = _keepalive_timers(KEEPALIVE if keepalive is ... else keepalive)
    if timers is None:
        return
    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE, 1)
    idle, interval, count, user = timers
    for opt, value in zip(_TCP_OPTS, (idle, interval, count, max(1, round(user * 1000)))):
        if opt is not None:
            sock.setsockopt(_SOL_TCP, opt, value)


#: errnos of a connection whose peer stopped answering (keepalive or user timeout; a router's verdict)
_GONE_ERRNOS = frozenset({errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH})


def _peer_gone(exc: BaseException) -> bool:
    """Whether ``exc`` (from a read or write) says the TCP peer stopped answering: keepalive probes or
    data went unacknowledged for the whole bound (not a FIN, an RST or our own timeout)."""
    return isinstance(exc, OSError) and exc.errno in _GONE_ERRNOS


default_family = "AF_UNIX"
families = ["AF_INET", "AF_UNIX"] + (["AF_INET6"] if _socket.has_ipv6 else [])


_ZEROS = memoryview(bytes(_FIRST_PIECE))  # never written: all its pages map the kernel's one zero page


def _grow(buf: bytearray, k: int) -> None:
    """Append ``k`` zero bytes to ``buf``, copied from :data:`_ZEROS` (a source that stays in the cache;
    ``buf += bytes(k)`` would fault in a fresh page for every 4 KiB it reads)."""
    whole, rest = divmod(k, len(_ZEROS))
    for _ in range(whole):
        buf += _ZEROS
    if rest:
        buf += _ZEROS[:rest]


def _socket_for(fd: int) -> _socket.socket:
    """A socket object over ``fd`` in blocking mode, leaving the descriptor's own flags as they were.

    ``_socket.socket(fileno=fd)`` applies :func:`socket.setdefaulttimeout`: under a default timeout it
    would make the descriptor non-blocking and every ``recv`` time out in the middle of a message.
    """
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    s = _socket.socket(fileno=fd)
    if s.gettimeout() is not None:
        s.settimeout(None)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return s


def _view(chunk: Any) -> memoryview:
    view = memoryview(chunk)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _flat(chunk: Any) -> Any:
    """``chunk`` as something ``writev``/``sendmsg`` accept: bytes as they are, other buffers as flat views.

    A :class:`pickle.PickleBuffer` over a Fortran-ordered array is contiguous but not C-contiguous;
    its ``raw()`` view is the flat byte view that the kernel calls need.
    """
    if type(chunk) is bytes:
        return chunk
    if isinstance(chunk, pickle.PickleBuffer):
        return chunk.raw()
    return _view(chunk)


class Connection:
    """One end of a message channel over a file descriptor (``multiprocessing.connection.Connection``).

    ``Connection(handle, readable=True, writable=True)`` takes ownership of the fd ``handle``.
    """

    #: When set (by gilfree's own channels, e.g. a pool's worker pipes) and this is a Unix socket,
    #: :meth:`send` puts out-of-band buffers of at least this many bytes in a memfd that travels as a
    #: descriptor: one copy in, none out (the receiver maps it, writeable) instead of two copies
    #: through the socket.  Receiving such buffers needs nothing set.
    _shm_min: int | None = None

    def __init__(self, handle: int, readable: bool = True, writable: bool = True) -> None:
        handle = operator.index(handle)
        if handle < 0:
            raise ValueError(f"invalid file descriptor {handle}")
        if not readable and not writable:
            raise ValueError("at least one of `readable` and `writable` must be True")
        try:
            self._is_socket = stat.S_ISSOCK(os.fstat(handle).st_mode)
        except OSError:  # not open (yet): as the stdlib, the first use raises, not the constructor
            self._is_socket = False
        self._handle: int | None = handle
        self._readable = readable
        self._writable = writable
        #: while set (during the authentication handshake), every read waits at most until then
        self._deadline: float | None = None
        # Unix sockets carry fds with the message; others (pipes, TCP) do not.
        self._sock: _socket.socket | None = None
        if self._is_socket:
            try:
                sock = _socket_for(handle)
            except OSError:
                sock = None
            if sock is not None:
                if sock.family == _socket.AF_UNIX:
                    self._sock = sock
                else:
                    sock.detach()
        self._kind = "unix socket" if self._sock is not None else ("socket" if self._is_socket else "pipe")
        self._memfds: _MemfdCache | None = None  # memfds this end sends large buffers in (_shm_min)
        self._released: list[int] | None = None  # the peer's memfds this end has unmapped since

    # -- state ---------------------------------------------------------------------------------
    def __repr__(self) -> str:
        mode = "/".join(m for m, on in (("read", self._readable), ("write", self._writable)) if on)
        state = "closed" if self._handle is None else f"fd={self._handle}"
        return f"<{type(self).__name__} {state} {mode} {self._kind}>"

    @property
    def closed(self) -> bool:
        """True if the connection is closed."""
        return self._handle is None

    @property
    def readable(self) -> bool:
        return self._readable

    @property
    def writable(self) -> bool:
        return self._writable

    def fileno(self) -> int:
        """The connection's file descriptor (for ``select``/``wait``)."""
        return self._check_closed()

    def _check_closed(self) -> int:
        if self._handle is None:
            raise OSError("handle is closed")
        return self._handle

    def close(self) -> None:
        """Close the connection; further use raises ``OSError``.  Idempotent."""
        handle, self._handle = self._handle, None
        if handle is not None:
            if self._sock is not None:
                self._sock.detach()
                self._sock = None
            os.close(handle)
        if self._memfds is not None and self._memfds.pid == os.getpid():
            self._memfds.close()
            self._memfds = None

    def _detach(self) -> int:
        handle = self._check_closed()
        self._handle = None
        if self._sock is not None:
            self._sock.detach()
            self._sock = None
        return handle

    def __del__(self) -> None:
        if getattr(self, "_handle", None) is not None:
            try:
                self.close()
            except OSError:
                pass

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _rebuild_connection, (reduction.DupFd(self._check_closed()), self._readable, self._writable)

    # -- sending -------------------------------------------------------------------------------
    def _check_writable(self) -> int:
        fd = self._check_closed()
        if not self._writable:
            raise OSError("connection is read-only")
        return fd

    def _check_readable(self) -> int:
        fd = self._check_closed()
        if not self._readable:
            raise OSError("connection is write-only")
        return fd

    def send(self, obj: Any) -> None:
        """Send a picklable object (lambdas and closures included); the peer gets it from :meth:`recv`.

        An object that cannot be pickled raises :class:`~gilfree.PicklingError` here, before
        anything is written, so the stream stays usable.
        """
        self._check_writable()
        data = reduction.dumps_small(obj)
        if data is not None and len(data) <= 0x7FFFFFFF:
            n = len(data)
            self._write([_HDR.pack(n) + data] if n <= _SMALL else [_HDR.pack(n), data], [])
            return
        bufs, fds, memfds = self._encode(obj, False)
        try:
            self._write(bufs, fds)
        finally:
            if memfds:
                self._memfd_cache().sent(memfds)

    def _encode(self, obj: Any, small: bool = True) -> tuple[list[Any], list[int], list[int]]:
        """One message for ``obj``, as :meth:`send` writes it: its buffers, the descriptors that go
        with it, and the numbers of the memfds (of :meth:`_memfd_cache`) it lends the peer.
        ``small=False``: the fast pickler was tried already."""
        data = reduction.dumps_small(obj) if small else None
        if data is not None and len(data) <= 0x7FFFFFFF:
            n = len(data)
            return ([_HDR.pack(n) + data] if n <= _SMALL else [_HDR.pack(n), data]), [], []
        fds: list[int] = []
        if self._sock is None:
            chunks, oob = reduction.dump_chunks(obj, OOB_MIN)
        else:
            # collect the fds met while pickling (what reduction.fd_channel does, without its cost)
            chan = reduction._chan
            saved = chan.sending, chan.sent
            chan.sending, chan.sent = True, fds
            try:
                chunks, oob = reduction.dump_chunks(obj, OOB_MIN)
            finally:
                chan.sending, chan.sent = saved
            if len(fds) > MAX_FDS:
                raise ValueError(f"a message can carry at most {MAX_FDS} file descriptors, not {len(fds)}")
        if not oob and len(chunks) == 1 and type(chunks[0]) is bytes and len(chunks[0]) <= _SMALL:
            data = chunks[0]  # the common case: one small pickle
            return [_HDR.pack(len(data)) + data], fds, []
        chunks = [_flat(c) for c in chunks]
        size = 0
        for c in chunks:
            size += len(c) if type(c) is bytes else c.nbytes
        if oob:
            oob = [_flat(b) for b in oob]
            lengths = [b.nbytes for b in oob]
            shm_min = self._shm_min
            if shm_min is not None and self._sock is not None and any(n >= shm_min for n in lengths):
                return self._encode_with_memfds(size, chunks, oob, lengths, fds, shm_min)
            header = _HDR.pack(-2) + _HDR_EXT.pack(len(oob), size) + struct.pack(f"!{len(oob)}Q", *lengths)
            return [header, *chunks, *oob], fds, []
        if size <= 0x7FFFFFFF:
            if len(chunks) == 1:
                return ([_HDR.pack(size) + chunks[0]] if size <= _SMALL else [_HDR.pack(size), chunks[0]]), fds, []
            return [_HDR.pack(size), *chunks], fds, []
        return [_HDR.pack(-1) + _HDR_LONG.pack(size), *chunks], fds, []

    def _encode_with_memfds(
        self, size: int, chunks: list[Any], oob: list[Any], lengths: list[int], fds: list[int], shm_min: int
    ) -> tuple[list[Any], list[int], list[int]]:
        """A ``-2`` frame whose large buffers travel as memfds (see :attr:`_shm_min`).

        A memfd the receiver has let go of (it says so with a ``-5`` frame before its next message)
        is reused: its pages are already allocated, so a repeated large argument costs one copy.
        The caller hands the memfd numbers to the cache's ``sent`` once the message is written.
        """
        cache = self._memfd_cache()
        sent: list[int] = []
        inline: list[Any] = []
        try:
            for i, buf in enumerate(oob):
                n = lengths[i]
                if n >= shm_min and n <= _FD_LEN_MASK and len(fds) + len(sent) < MAX_FDS:
                    ident = cache.take(n)
                    sent.append(ident)
                    cache.fill(ident, buf)
                    lengths[i] = _IN_FD | (ident << _FD_LEN_BITS) | n
                else:
                    inline.append(buf)
        except BaseException:
            cache.release(sent)
            raise
        header = _HDR.pack(-2) + _HDR_EXT.pack(len(oob), size) + struct.pack(f"!{len(oob)}Q", *lengths)
        return [header, *chunks, *inline], fds + [cache.fd(ident) for ident in sent], sent

    def _memfd_cache(self) -> _MemfdCache:
        cache = self._memfds
        if cache is None or cache.pid != os.getpid():
            cache = self._memfds = _MemfdCache()
        return cache

    def _released_frame(self) -> bytes:
        """The ``-5`` frame that returns the peer's memfds this process has unmapped (or ``b""``)."""
        released = self._released
        if not released:
            return b""
        ids = released[:]
        del released[: len(ids)]  # finalizers may append meanwhile, from any thread
        return _HDR.pack(_RELEASED) + struct.pack(f"!I{len(ids)}I", len(ids), *ids)

    def send_bytes(self, buf: Any, offset: int = 0, size: int | None = None) -> None:
        """Send ``buf[offset:offset+size]`` (any bytes-like object) as one message."""
        self._check_writable()
        view = _view(buf)
        n = view.nbytes
        if offset < 0:
            raise ValueError("offset is negative")
        if n < offset:
            raise ValueError("buffer length < offset")
        if size is None:
            size = n - offset
        elif size < 0:
            raise ValueError("size is negative")
        elif offset + size > n:
            raise ValueError("buffer length < offset + size")
        if offset or size != n:
            view = view[offset : offset + size]
        if size <= 0x7FFFFFFF:
            bufs: list[Any] = [_HDR.pack(size) + view] if size <= _SMALL else [_HDR.pack(size), view]
        else:
            bufs = [_HDR.pack(-1) + _HDR_LONG.pack(size), view]
        self._write(bufs, [])

    def _write(self, bufs: list[Any], fds: list[int]) -> None:
        fd = self._handle
        assert fd is not None
        sock = self._sock
        if self._released:
            released = self._released_frame()
            if fds:
                assert sock is not None
                sock.sendall(released)
            else:
                bufs = [released, *bufs]
        if fds:
            assert sock is not None
            # announced on its own, so the receiver reads the next header with recvmsg (a header
            # sent together with the descriptors would hand them to a plain read, which drops them)
            sock.sendall(_HDR.pack(_FDS_NEXT))
            anc = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds))]
            n = sock.sendmsg(bufs[:_IOV_MAX], anc)
        elif len(bufs) == 1:
            n = sock.send(bufs[0]) if sock is not None else os.write(fd, bufs[0])
        elif sock is not None:
            n = sock.sendmsg(bufs[:_IOV_MAX])
        else:
            n = os.writev(fd, bufs[:_IOV_MAX])
        total = 0
        for b in bufs:
            total += len(b) if type(b) is bytes else memoryview(b).nbytes
        if n == total:
            return
        # Partial write (a full pipe or socket buffer): continue from where the kernel stopped.
        views = [_view(b) for b in bufs]
        while views:
            while views and n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            if not views:
                return
            if n:
                views[0] = views[0][n:]
            n = sock.sendmsg(views[:_IOV_MAX]) if sock is not None else os.writev(fd, views[:_IOV_MAX])

    # -- receiving -----------------------------------------------------------------------------
    def _await_data(self, fd: int) -> None:
        """Wait until ``fd`` has data, up to :attr:`_deadline` (set only during the handshake)."""
        assert self._deadline is not None
        remaining = self._deadline - time.monotonic()
        if remaining <= 0 or not wait([fd], remaining):
            raise TimeoutError("timed out waiting for the peer to send (the rest of) a message")

    def _read_into(self, view: memoryview, done: int = 0, total: int | None = None, what: str = "message") -> None:
        """Fill ``view`` from the stream.

        ``done`` bytes of the message were read before ``view``; the whole message is ``total``
        bytes (for the error message when the peer closes early).
        """
        fd = self._handle
        assert fd is not None
        size, got = view.nbytes, 0
        if total is None:
            total = done + size
        sock = self._sock
        while got < size:
            if self._deadline is not None:
                self._await_data(fd)
            if sock is not None:
                # MSG_WAITALL: the kernel fills the whole view before returning (one system call
                # instead of one per socket-buffer's worth); a signal or EOF may still cut it short
                n = sock.recv_into(view[got:], 0, _MSG_WAITALL if self._deadline is None else 0)
            else:
                n = os.readv(fd, [view[got:]])
            if n == 0:
                raise EOFError(
                    f"connection closed by the peer in the middle of a {what}: got {done + got} of {total} bytes"
                )
            got += n

    def _read_pieces(self, n: int, done: int, total: int, what: str) -> list[bytes]:
        """Read exactly ``n`` bytes as a list of ``bytes`` pieces (for a message read as ``bytes``).

        The first piece asks for at most :data:`_FIRST_PIECE` bytes, each next one for at most as
        many as have arrived so far: memory grows with what the peer sends, not with the length it
        claims (a peer that claims 2 GiB and stalls costs a megabyte).  The pieces are allocated
        uninitialized (``recv``/``read``), so a large message costs no zero-fill: the kernel's copy
        into the pieces and one copy to join them.
        """
        fd = self._handle
        assert fd is not None
        sock = self._sock
        flags = _MSG_WAITALL if self._deadline is None else 0
        pieces: list[bytes] = []
        got = 0
        while got < n:
            ask = min(n - got, max(got, _FIRST_PIECE))
            if self._deadline is not None:
                self._await_data(fd)
            # MSG_WAITALL: the kernel fills the whole piece before returning (a signal or EOF may
            # still cut it short); a pipe returns what it holds
            piece = sock.recv(ask, flags) if sock is not None else os.read(fd, ask)
            if not piece:
                raise EOFError(f"connection closed by the peer in the middle of a {what}: got {done + got} of {total} bytes")
            got += len(piece)
            pieces.append(piece)
        return pieces

    def _read_buffer(self, n: int, done: int = 0, total: int | None = None, what: str = "message") -> bytearray:
        """Read exactly ``n`` bytes into a new (writable) bytearray: an out-of-band buffer.

        The buffer starts at :data:`_FIRST_PIECE` bytes and at most doubles as the bytes arrive, so a
        length the peer claims but never sends allocates nothing more.  (Measured against joining
        pieces as :meth:`_read_pieces` does: reading straight into the buffer costs one copy less.)
        """
        if total is None:
            total = done + n
        if n <= _FIRST_PIECE:
            buf = bytearray(n)
            self._read_into(memoryview(buf), done, total, what)
            return buf
        buf = bytearray(_FIRST_PIECE)
        filled = 0
        while True:
            with memoryview(buf) as view, view[filled:] as rest:
                self._read_into(rest, done + filled, total, what)
            filled = len(buf)
            if filled == n:
                return buf
            _grow(buf, min(n - filled, filled))

    def _read_exact(self, n: int, done: int = 0, total: int | None = None, what: str = "message") -> Any:
        """Read exactly ``n`` bytes: ``bytes`` (or a bytearray when a small read came short)."""
        fd = self._handle
        assert fd is not None
        if total is None:
            total = done + n
        if n > _SMALL:
            pieces = self._read_pieces(n, done, total, what)
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if n == 0:
            return b""
        if self._deadline is not None:
            self._await_data(fd)
        data = self._sock.recv(n) if self._sock is not None else os.read(fd, n)
        if len(data) == n:
            return data
        if not data:
            raise EOFError(f"connection closed by the peer in the middle of a {what}: got {done} of {total} bytes")
        rest = bytearray(n)
        rest[: len(data)] = data
        self._read_into(memoryview(rest)[len(data) :], done + len(data), total, what)
        return rest

    def _read_header(self) -> tuple[int, list[int]]:
        """Read a message's 4-byte length; return it and any descriptors that came with it.

        A message that carries descriptors is announced by a :data:`_FDS_NEXT` header sent on its
        own; only then is the next header read with ``recvmsg`` (the descriptors ride on its first
        byte).  Every other header is a plain read, which is cheaper.
        """
        n = _HDR.unpack(self._read_raw_header())[0]
        while n == _RELEASED:
            (count,) = struct.unpack("!I", self._read_exact(4, 4, 8, "message header"))
            if count > 65536:
                self._bad_message(f"bad message header: {count} released buffers")
            ids = struct.unpack(f"!{count}I", self._read_exact(4 * count, 8, 8 + 4 * count, "message header"))
            cache = self._memfds
            if cache is not None and cache.pid == os.getpid():
                cache.release(ids)
            n = _HDR.unpack(self._read_raw_header())[0]
        if n != _FDS_NEXT:
            return n, []
        fds: list[int] = []
        sock = self._sock
        if sock is None:
            self._bad_message("the peer announced file descriptors on a connection that cannot carry them")
        if self._deadline is not None:
            self._await_data(self._handle)  # type: ignore[arg-type]
        data, anc, flags, _ = sock.recvmsg(4, _ANC_SPACE, _MSG_CMSG_CLOEXEC)
        fds.extend(util.fds_from_ancillary(anc))
        if flags & _MSG_CTRUNC:
            util.close_fds(*fds)
            raise OSError("a message carried more file descriptors than allowed; they were dropped")
        if len(data) < 4:
            try:
                if not data:
                    raise EOFError("connection closed by the peer")
                data += self._read_exact(4 - len(data), len(data), 4, "message header")
            except BaseException:
                util.close_fds(*fds)
                raise
        return _HDR.unpack(data)[0], fds

    def _read_raw_header(self) -> bytes:
        fd = self._handle
        assert fd is not None
        if self._deadline is not None:
            self._await_data(fd)
        data = self._sock.recv(4) if self._sock is not None else os.read(fd, 4)
        if len(data) < 4:
            if not data:
                raise EOFError("connection closed by the peer")
            data += self._read_exact(4 - len(data), len(data), 4, "message header")
        return data

    def _bad_message(self, message: str) -> NoReturn:
        """The stream cannot be read past this point: stop reading, as the stdlib does, and raise.

        A duplex connection stays open for writing (the peer may be told what went wrong); a
        read-only one is closed.
        """
        if self._writable:
            self._readable = False
        else:
            self.close()
        raise OSError(message)

    def _recv_frame(self, maxlength: int | None = None) -> tuple[Any, list[Any], list[int]]:
        n, fds = self._read_header()
        try:
            if n >= 0 or n == -1:
                head = 4
                if n == -1:
                    head = 4 + _HDR_LONG.size
                    n = _HDR_LONG.unpack(self._read_exact(_HDR_LONG.size, 4, head, "message header"))[0]
                if maxlength is not None and n > maxlength:
                    self._bad_message(f"bad message length: {n} bytes, more than maxlength={maxlength}")
                return self._read_exact(n, head, head + n), [], fds
            if n == -2:
                head = 4 + _HDR_EXT.size
                count, size = _HDR_EXT.unpack(self._read_exact(_HDR_EXT.size, 4, head, "message header"))
                if count > 65536:
                    self._bad_message(f"bad message header: {count} out-of-band buffers")
                lengths = struct.unpack(f"!{count}Q", self._read_exact(8 * count, head, head + 8 * count, "message header"))
                head += 8 * count
                in_fd = sum(1 for length in lengths if length & _IN_FD)
                if in_fd > len(fds):
                    self._bad_message(f"bad message: {in_fd} buffers in memfds but {len(fds)} descriptors came")
                memfds = fds[len(fds) - in_fd :]
                body = size + sum(length for length in lengths if not length & _IN_FD)
                if maxlength is not None and body > maxlength:
                    self._bad_message(f"bad message length: {body} bytes, more than maxlength={maxlength}")
                total = head + body
                data = self._read_exact(size, head, total)
                done = head + size
                buffers: list[Any] = []
                mapped = 0
                for length in lengths:
                    if length & _IN_FD:
                        buffers.append(self._map_memfd(memfds[mapped], length))
                        mapped += 1
                    else:
                        buffers.append(self._read_buffer(length, done, total))
                        done += length
                util.close_fds(*memfds)
                return data, buffers, fds[: len(fds) - in_fd]
            self._bad_message(f"bad message header: length {n}; the peer does not speak this protocol")
        except BaseException:
            util.close_fds(*fds)
            raise

    def recv(self) -> Any:
        """Receive an object sent with :meth:`send`; ``EOFError`` when the other end is closed."""
        self._check_readable()
        data, buffers, fds = self._recv_frame()
        if not fds:
            return reduction.loads(data, buffers=buffers)
        claimed: set[int] = set()

        def resolve(token: int) -> int:
            claimed.add(token)
            return fds[token]

        try:
            with reduction.fd_channel(resolve=resolve):
                return reduction.loads(data, buffers=buffers)
        finally:
            util.close_fds(*(fd for i, fd in enumerate(fds) if i not in claimed))

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        """Receive a message sent with :meth:`send_bytes` as ``bytes``."""
        self._check_readable()
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        data, buffers, fds = self._recv_frame(maxlength)
        util.close_fds(*fds)
        if buffers:
            raise OSError("received an object message (sent with send()), not a bytes message")
        return data if type(data) is bytes else bytes(data)

    def recv_bytes_into(self, buf: Any, offset: int = 0) -> int:
        """Read a message into the writable buffer ``buf`` at ``offset``; return its size.

        Raises :class:`BufferTooShort` (holding the whole message) if it does not fit.
        """
        self._check_readable()
        view = _view(buf)
        if offset < 0:
            raise ValueError("negative offset")
        if offset > view.nbytes:
            raise ValueError("offset too large")
        data, buffers, fds = self._recv_frame()
        util.close_fds(*fds)
        if buffers:
            raise OSError("received an object message (sent with send()), not a bytes message")
        size = len(data)
        if size > view.nbytes - offset:
            raise BufferTooShort(bytes(data))
        view[offset : offset + size] = data
        return size

    def _ready_frames(self) -> list[memoryview] | None:
        """The payloads of the plain messages that have fully arrived, read with one peek and one read.

        ``[]``: nothing has arrived.  ``None``: the next message is not a small plain one (it has
        out-of-band buffers or descriptors, or is still arriving): read it with :meth:`recv`, which
        waits for the rest.  For gilfree's own channels, where one thread reads many small messages
        (a pool's supervisor): it saves the header read and a ``poll`` per message.  Unix sockets only.
        """
        sock = self._sock
        if sock is None or self._deadline is not None or not self._readable:
            return None
        try:
            data = sock.recv(_PEEK_SIZE, _MSG_PEEK | _MSG_DONTWAIT)
        except BlockingIOError:
            return []
        if not data:
            raise EOFError("connection closed by the peer")
        end, size = 0, len(data)
        spans = []
        while end + 4 <= size:
            (n,) = _HDR.unpack_from(data, end)
            if n < 0 or end + 4 + n > size:
                break
            spans.append((end + 4, n))
            end += 4 + n
        if not spans:
            return None
        got = sock.recv_into(bytearray(end), end, _MSG_WAITALL)  # consume what was parsed, no further
        if got != end:  # pragma: no cover - the bytes were there a moment ago
            self._bad_message(f"lost {end - got} bytes of peeked messages")
        view = memoryview(data)
        return [view[start : start + n] for start, n in spans]

    def _map_memfd(self, fd: int, word: int) -> Any:
        """Map a memfd that came with a message; tell the sender when the mapping is gone."""
        length = word & _FD_LEN_MASK
        ident = (word >> _FD_LEN_BITS) & _FD_ID_MASK
        if os.fstat(fd).st_size < length:
            raise OSError(f"bad message: a memfd of {os.fstat(fd).st_size} bytes came for a {length}-byte buffer")
        mapping = mmap.mmap(fd, length, flags=mmap.MAP_SHARED | _MAP_POPULATE)
        released = self._released
        if released is None:
            released = self._released = []
        weakref.finalize(mapping, released.append, ident)
        return mapping

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether there is data to read (or the peer closed); wait up to ``timeout`` seconds."""
        fd = self._check_readable()
        return bool(wait([fd], timeout))


class _MemfdCache:
    """The memfds one end of a connection sends large buffers in, kept for reuse.

    A memfd is *busy* from the moment it is filled until the peer says it unmapped it (``-5``),
    then *idle* and reusable; at most :data:`_MEMFD_KEEP` are kept and :data:`_MEMFD_IDLE_BYTES`
    of idle ones, beyond that a memfd is closed once sent (the peer's mapping keeps the memory).
    Only the sending thread uses it, apart from :meth:`release` (the receiving thread): a lock.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._next = 0
        self._entries: dict[int, list[Any]] = {}  # id -> [fd, mmap, size, busy]

    def take(self, n: int) -> int:
        with self._lock:
            best = None
            for ident, (_, _, size, busy) in self._entries.items():
                if not busy and n <= size <= 2 * n and (best is None or size < self._entries[best][2]):
                    best = ident
            if best is not None:
                self._entries[best][3] = True
                return best
            self._next = (self._next + 1) & _FD_ID_MASK
            ident = self._next
            fd = os.memfd_create("gilfree-buffer", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, n)
                mapping = mmap.mmap(fd, n)
            except BaseException:
                os.close(fd)
                raise
            self._entries[ident] = [fd, mapping, n, True]
            return ident

    def fill(self, ident: int, buf: Any) -> None:
        view = memoryview(buf).cast("B")
        self._entries[ident][1][: view.nbytes] = view

    def fd(self, ident: int) -> int:
        return int(self._entries[ident][0])

    def sent(self, idents: list[int]) -> None:
        """After sending: forget the memfds beyond what is kept (their memory lives on in the peer)."""
        with self._lock:
            while len(self._entries) > _MEMFD_KEEP:
                ident = next(i for i in self._entries if i in idents or not self._entries[i][3])
                self._drop(ident)
            idle = [(i, e[2]) for i, e in self._entries.items() if not e[3]]
            while sum(size for _, size in idle) > _MEMFD_IDLE_BYTES:
                self._drop(idle.pop(0)[0])

    def release(self, idents: Iterable[int]) -> None:
        with self._lock:
            for ident in idents:
                entry = self._entries.get(ident)
                if entry is not None:
                    entry[3] = False

    def _drop(self, ident: int) -> None:
        fd, mapping, _, _ = self._entries.pop(ident)
        mapping.close()
        os.close(fd)

    def close(self) -> None:
        with self._lock:
            for ident in list(self._entries):
                self._drop(ident)


class Outbox:
    """Messages for one connection, written as the socket takes them, never blocking.

    For a thread that serves many connections from one poll loop (a pool's supervisor, which must
    go on reading results while a worker is slow to take a large task): :meth:`put` encodes a
    message (an object that cannot be pickled raises here, and nothing is queued); :meth:`flush`
    writes what the kernel accepts now and says whether everything went.  Poll the connection for
    ``POLLOUT`` while :meth:`flush` returns False.  Messages go out whole and in order, exactly as
    :meth:`Connection.send` would write them.  Unix-socket connections only.
    """

    __slots__ = ("conn", "_segments", "pending_bytes")

    def __init__(self, conn: Connection) -> None:
        if conn._sock is None:
            raise ValueError("an Outbox needs a Unix-socket connection (a duplex Pipe)")
        self.conn = conn
        # each segment: [views still to write, descriptors (ride on its first write), memfd numbers]
        self._segments: list[list[Any]] = []
        #: bytes queued and not yet written
        self.pending_bytes = 0

    def __bool__(self) -> bool:
        return bool(self._segments)

    def put(self, obj: Any) -> None:
        conn = self.conn
        conn._check_writable()
        bufs, fds, memfds = conn._encode(obj)
        segments = self._segments
        if conn._released:
            segments.append([[memoryview(conn._released_frame())], [], []])
        if fds:  # announced on its own, as _write does: only the next header is read with recvmsg
            segments.append([[memoryview(_HDR.pack(_FDS_NEXT))], [], []])
        views = [_view(b) for b in bufs]
        segments.append([views, fds, memfds])
        for v in views:
            self.pending_bytes += v.nbytes

    def flush(self) -> bool:
        """Write what the socket takes without waiting; True once nothing is left.

        ``OSError`` (``BrokenPipeError``...) when the peer is gone.
        """
        sock = self.conn._sock
        assert sock is not None
        segments = self._segments
        while segments:
            segment = segments[0]
            views, fds = segment[0], segment[1]
            try:
                if fds:
                    anc = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds))]
                    n = sock.sendmsg(views[:_IOV_MAX], anc, _MSG_DONTWAIT)
                    segment[1] = []  # the descriptors went with the first byte
                else:
                    n = sock.sendmsg(views[:_IOV_MAX], [], _MSG_DONTWAIT)
            except BlockingIOError:
                return False
            self.pending_bytes -= n
            while views and n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            if views:
                if n:
                    views[0] = views[0][n:]
                continue
            del segments[0]
            if segment[2]:
                self.conn._memfd_cache().sent(segment[2])
        return True

    def clear(self) -> None:
        """Forget what was not written (the peer is gone)."""
        while self._segments:
            segment = self._segments.pop(0)
            if segment[2]:
                self.conn._memfd_cache().sent(segment[2])
        self.pending_bytes = 0


class Inbox:
    """Messages read from a connection as their bytes arrive, never waiting for the rest of one.

    The reading half of :class:`Outbox`, for a thread serving many connections from one poll loop:
    :meth:`receive` takes what the socket holds now and returns the messages that completes; a
    message still arriving stays buffered, so a peer that stops in the middle of a large message
    (stopped, swapped out, dying) stalls only itself.  Reads every frame :meth:`Connection.send`
    writes (descriptors and memfds included).  Unix-socket connections only.
    """

    __slots__ = ("conn", "_buf", "_start", "_fds", "_next_fds", "_chunk", "eof", "sizes")

    _READ = 1 << 20  # bytes asked of the kernel per read
    _MAX_READ = 16 << 20  # bytes read per call at most: other connections get their turn

    def __init__(self, conn: Connection) -> None:
        if conn._sock is None:
            raise ValueError("an Inbox needs a Unix-socket connection (a duplex Pipe)")
        self.conn = conn
        self._buf = bytearray()
        self._start = 0  # parsed up to here
        self._fds: list[list[int]] = []  # descriptor groups received, oldest first
        self._next_fds: list[int] | None = None  # the next frame's descriptors (after a -3 header)
        self._chunk = bytearray(self._READ)
        #: the peer closed its end (after the messages returned)
        self.eof = False
        #: the size in bytes (memfds included) of each message the last :meth:`receive` returned
        self.sizes: list[int] = []

    @property
    def partial(self) -> bool:
        """Whether part of a message has arrived and the rest has not."""
        return len(self._buf) > self._start or self._next_fds is not None

    def receive(self, limit: int | None = _MAX_READ) -> list[Any]:
        """The messages that have fully arrived (read without waiting; at most ``limit`` bytes).

        Sets :attr:`eof` when the peer has closed its end; ``EOFError`` if it did so in the middle of a
        message, ``OSError`` for a stream that is not gilfree's framing.
        """
        sock = self.conn._sock
        assert sock is not None
        chunk = self._chunk
        got = 0
        while limit is None or got < limit:
            try:
                n, anc, flags, _ = sock.recvmsg_into([chunk], _ANC_SPACE, _MSG_DONTWAIT | _MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                break
            fds = util.fds_from_ancillary(anc)
            if flags & _MSG_CTRUNC:
                util.close_fds(*fds)
                self._bad("a message carried more file descriptors than allowed")
            if fds:
                self._fds.append(fds)
            if n == 0:
                self.eof = True
                break
            self._buf += memoryview(chunk)[:n]
            got += n
        messages = self._parse()
        if self.eof and self.partial:
            raise EOFError(f"connection closed by the peer in the middle of a message ({len(self._buf) - self._start} "
                           f"bytes of it had arrived)")
        return messages

    def _bad(self, message: str) -> NoReturn:
        self.close()
        raise OSError(message)

    def _parse(self) -> list[Any]:
        buf = self._buf
        end = len(buf)
        out: list[Any] = []
        sizes = self.sizes = []
        pos = self._start
        while end - pos >= 4:
            (n,) = _HDR.unpack_from(buf, pos)
            if n >= 0 or n == -1:
                head = 4
                if n == -1:
                    if end - pos < 12:
                        break
                    (n,) = _HDR_LONG.unpack_from(buf, pos + 4)
                    head = 12
                if end - pos < head + n:
                    break
                data = bytes(buf[pos + head : pos + head + n])
                pos += head + n
                fds, self._next_fds = self._next_fds or [], None  # a plain frame announced with descriptors
                out.append(self._load(data, [], fds))
                sizes.append(n)
            elif n == _FDS_NEXT:
                if not self._fds:
                    break  # the descriptors ride on the next frame's first byte: not read yet
                self._next_fds = self._fds.pop(0)
                pos += 4
            elif n == _RELEASED:
                if end - pos < 8:
                    break
                (count,) = struct.unpack_from("!I", buf, pos + 4)
                if count > 65536:
                    self._bad(f"bad message header: {count} released buffers")
                if end - pos < 8 + 4 * count:
                    break
                ids = struct.unpack_from(f"!{count}I", buf, pos + 8)
                cache = self.conn._memfds
                if cache is not None and cache.pid == os.getpid():
                    cache.release(ids)
                pos += 8 + 4 * count
            elif n == -2:
                head = 4 + _HDR_EXT.size
                if end - pos < head:
                    break
                count, size = _HDR_EXT.unpack_from(buf, pos + 4)
                if count > 65536:
                    self._bad(f"bad message header: {count} out-of-band buffers")
                if end - pos < head + 8 * count:
                    break
                lengths = struct.unpack_from(f"!{count}Q", buf, pos + head)
                head += 8 * count
                inline = sum(length for length in lengths if not length & _IN_FD)
                if end - pos < head + size + inline:
                    break
                fds = self._next_fds or []
                self._next_fds = None
                in_fd = sum(1 for length in lengths if length & _IN_FD)
                if in_fd > len(fds):
                    util.close_fds(*fds)
                    self._bad(f"bad message: {in_fd} buffers in memfds but {len(fds)} descriptors came")
                memfds = fds[len(fds) - in_fd :]
                at = pos + head
                data = bytes(buf[at : at + size])
                at += size
                buffers: list[Any] = []
                try:
                    mapped = 0
                    for length in lengths:
                        if length & _IN_FD:
                            buffers.append(self.conn._map_memfd(memfds[mapped], length))
                            mapped += 1
                        else:
                            buffers.append(bytearray(buf[at : at + length]))
                            at += length
                finally:
                    util.close_fds(*memfds)
                pos = at
                out.append(self._load(data, buffers, fds[: len(fds) - in_fd]))
                sizes.append(size + sum(length & _FD_LEN_MASK for length in lengths))
            else:
                self._bad(f"bad message header: length {n}; the peer does not speak this protocol")
        if pos == end:
            buf.clear()
            self._start = 0
        elif pos > (1 << 20):
            del buf[:pos]
            self._start = 0
        else:
            self._start = pos
        return out

    def _load(self, data: bytes, buffers: list[Any], fds: list[int] | None = None) -> Any:
        """Unpickle one message; a message that cannot be unpickled is returned as the exception
        (wrapped in :class:`Unreadable`), so the messages after it are not lost."""
        try:
            if not fds:
                return reduction.loads(data, buffers=buffers)
            claimed: set[int] = set()

            def resolve(token: int) -> int:
                claimed.add(token)
                return fds[token]

            try:
                with reduction.fd_channel(resolve=resolve):
                    return reduction.loads(data, buffers=buffers)
            finally:
                util.close_fds(*(fd for i, fd in enumerate(fds) if i not in claimed))
        except Exception as exc:
            return Unreadable(exc)

    def close(self) -> None:
        for group in self._fds:
            util.close_fds(*group)
        self._fds.clear()
        if self._next_fds:
            util.close_fds(*self._next_fds)
        self._next_fds = None
        self._buf = bytearray()
        self._start = 0


class Unreadable:
    """A message that arrived whole but could not be unpickled (:class:`Inbox`): the error."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _rebuild_connection(df: Any, readable: bool, writable: bool) -> Connection:
    return Connection(df.detach(), readable, writable)


def _set_pipe_buffer(fd: int) -> None:
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_BUFFER)
    except OSError:
        pass  # above the system's limit (pipe-max-size): keep the default


def Pipe(duplex: bool = True) -> tuple[Connection, Connection]:
    """Return two connected :class:`Connection` objects.

    Duplex pipes are Unix socket pairs (they can carry file descriptors); one-way pipes are
    ``os.pipe`` with a 1 MiB kernel buffer where the system allows it.
    """
    if duplex:
        s1, s2 = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
        for s in (s1, s2):
            s.setblocking(True)  # under socket.setdefaulttimeout() a new socket is non-blocking
            for option in (_socket.SO_SNDBUF, _socket.SO_RCVBUF):
                try:
                    s.setsockopt(_socket.SOL_SOCKET, option, SOCKET_BUFFER)  # capped by net.core.[wr]mem_max
                except OSError:
                    pass
        return Connection(s1.detach()), Connection(s2.detach())
    r, w = os.pipe()
    _set_pipe_buffer(w)
    return Connection(r, writable=False), Connection(w, readable=False)


# --------------------------------------------------------------------------------------------------
# wait()

def wait(object_list: Iterable[Any], timeout: float | None = None) -> list[Any]:
    """Wait until some of ``object_list`` are ready; return those (``[]`` on timeout).

    Objects may be :class:`Connection` objects, sockets, process sentinels (ints) or anything with
    a ``fileno()``.  A connection is ready when it has data or its peer closed.
    """
    objects = list(object_list)
    poller = select.poll()
    by_fd: dict[int, list[Any]] = {}
    for obj in objects:
        fd = obj if isinstance(obj, int) else obj.fileno()
        if fd not in by_fd:
            by_fd[fd] = []
            poller.register(fd, select.POLLIN)
        by_fd[fd].append(obj)
    deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
    while True:
        ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
        events = poller.poll(ms)
        if events:
            ready = {fd for fd, _ in events}
            return [obj for obj in objects if (obj if isinstance(obj, int) else obj.fileno()) in ready]
        if deadline is not None and time.monotonic() >= deadline:
            return []


# --------------------------------------------------------------------------------------------------
# Authentication: HMAC-SHA256 challenge-response, as in CPython 3.12+ (wire-compatible with it).

_CHALLENGE = b"#CHALLENGE#"
_WELCOME = b"#WELCOME#"
_FAILURE = b"#FAILURE#"
# the stdlib's names for the same protocol facts (public before 3.12; code and tests read them)
CHALLENGE, WELCOME, FAILURE = _CHALLENGE, _WELCOME, _FAILURE
CONNECTION_TIMEOUT = HANDSHAKE_TIMEOUT
#: what a gilfree server sends, followed by the reason, to a peer it turns away before authentication
_REFUSED = b"#REFUSED#"
_DIGEST = b"{sha256}"
_NONCE_BYTES = 40
MESSAGE_LENGTH = _NONCE_BYTES  # the stdlib's name for it
_AUTH_MAX = 256


def _auth_recv(conn: Connection, deadline: float, timeout: float, step: str) -> bytes:
    """One handshake message, whole, by ``deadline``: a peer that sends nothing, or only part of a
    message, cannot keep us waiting longer."""
    conn._deadline = deadline
    try:
        return conn.recv_bytes(_AUTH_MAX)
    except TimeoutError as exc:
        raise AuthenticationError(
            f"the peer did not answer within {timeout:g} s during the handshake ({step})"
        ) from exc
    except EOFError as exc:
        raise AuthenticationError(f"the peer closed the connection during the handshake ({step})") from exc
    except OSError as exc:
        raise AuthenticationError(f"the peer sent an invalid handshake message ({step}): {exc}") from exc
    finally:
        conn._deadline = None


def _auth_send(conn: Connection, data: bytes, step: str) -> None:
    try:
        conn.send_bytes(data)
    except OSError as exc:  # the peer left (BrokenPipeError, ConnectionResetError)
        raise AuthenticationError(f"the peer closed the connection during the handshake ({step}): {exc}") from exc


def _refusal(message: bytes) -> AuthenticationError | None:
    """The error for a ``#REFUSED#`` frame (a gilfree server turned us away and said why), else None."""
    if message.startswith(_REFUSED):
        reason = message[len(_REFUSED):].decode("utf-8", "replace")
        return AuthenticationError(f"the server refused the connection: {reason}")
    return None


def _check_key(authkey: Any) -> bytes:
    if not isinstance(authkey, (bytes, bytearray)):
        raise TypeError(f"authkey should be a byte string, not {type(authkey).__name__}")
    return bytes(authkey)


def _auth_digest(key: bytes, message: bytes, binding: bytes = b"") -> bytes:
    """The answer to the challenge ``message`` (the bytes after ``#CHALLENGE#``, starting with
    ``{sha256}``), as sent on the wire: ``b"{sha256}"`` + HMAC-SHA256(``key``, ``message`` + ``binding``).

    With ``binding=b""`` this is CPython 3.12+'s answer.  Both sides of every handshake (this module's
    and the manager server's) compute it here, so the two always agree.
    """
    import hmac

    return _DIGEST + hmac.new(key, message + binding, "sha256").digest()


_server_cert_digests: dict[str, bytes] = {}


def _server_cert_digest(certfile: str) -> bytes:
    """SHA-256 of the first certificate in the PEM file ``certfile`` (the server's own, as
    ``load_cert_chain`` takes it), in DER form; read once per process and path, as the server's
    SSLContext reads it once."""
    digest = _server_cert_digests.get(certfile)
    if digest is None:
        import hashlib
        import ssl

        with open(certfile, encoding="ascii", errors="replace") as f:
            text = f.read()
        begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
        start = text.find(begin)
        stop = text.find(end, start)
        if start < 0 or stop < 0:
            raise ValueError(f"{certfile} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
        der = ssl.PEM_cert_to_DER_cert(text[start : stop + len(end)])
        digest = _server_cert_digests[certfile] = hashlib.sha256(der).digest()
    return digest


def channel_binding(sock: Any, certfile: str | None = None) -> bytes:
    """What ties an authentication handshake to the TLS connection ``sock`` it runs on.

    ``b""`` for a socket that is not an ``ssl.SSLSocket``.  For a TLS socket: its ``tls-unique``
    channel binding (a value both ends of one TLS session share and no other session has), followed
    by the SHA-256 of the server's certificate in DER form -- on the client the certificate the peer
    presented, on the server the first certificate of ``certfile`` (its own, required there).  Pass
    the result as ``binding=`` to :func:`deliver_challenge` and :func:`answer_challenge` on both ends:
    a relay that terminates TLS holds two sessions (and its own certificate), so the two ends compute
    different values and the handshake fails.
    """
    ssl = sys.modules.get("ssl")  # not imported: then no socket can be an SSLSocket
    if ssl is None or not isinstance(sock, ssl.SSLSocket):
        return b""
    unique = sock.get_channel_binding("tls-unique")
    if not unique:
        raise AuthenticationError("the TLS connection has no tls-unique channel binding (handshake not done?)")
    if sock.server_side:
        if certfile is None:
            raise ValueError("channel_binding() of a server's TLS socket needs certfile= (the server's certificate)")
        return unique + _server_cert_digest(os.fspath(certfile))
    import hashlib

    der = sock.getpeercert(binary_form=True)
    if not der:
        raise AuthenticationError("the TLS server presented no certificate")
    return unique + hashlib.sha256(der).digest()


def _create_response(authkey: bytes, message: bytes) -> bytes:
    """The answer to the challenge ``message`` (the stdlib's name, 3.12+): ``{sha256}`` + the HMAC.

    gilfree speaks only HMAC-SHA256: a legacy (unprefixed, MD5) or ``{md5}`` challenge raises
    AuthenticationError instead of being answered with a weaker MAC."""
    if not message.startswith(_DIGEST):
        raise AuthenticationError(f"gilfree answers only {_DIGEST.decode()} challenges, got {message[:16]!r}")
    return _auth_digest(_check_key(authkey), message)


def _verify_challenge(authkey: bytes, message: bytes, response: bytes) -> None:
    """Raise AuthenticationError unless ``response`` is the HMAC-SHA256 answer to ``message``."""
    import hmac

    if not response.startswith(_DIGEST):
        raise AuthenticationError("the response is not an HMAC-SHA256 answer (gilfree accepts no other)")
    if not hmac.compare_digest(response, _auth_digest(_check_key(authkey), message)):
        raise AuthenticationError("digest received was wrong")


def deliver_challenge(conn: Connection, authkey: bytes, timeout: float | None = None, *, binding: bytes = b"") -> None:
    """Challenge the peer to prove it knows ``authkey``; raise AuthenticationError if it does not.

    ``binding`` (see :func:`channel_binding`) is appended to the challenge before the HMAC: the peer
    must have computed the same one.  With ``b""`` the exchange is CPython 3.12+'s, byte for byte.
    """
    key = _check_key(authkey)
    timeout = HANDSHAKE_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    message = _DIGEST + os.urandom(_NONCE_BYTES)
    _auth_send(conn, _CHALLENGE + message, "sending our challenge")
    response = _auth_recv(conn, deadline, timeout, "waiting for the answer to our challenge")
    refused = _refusal(response)
    if refused is not None:
        raise refused
    import hmac

    if not hmac.compare_digest(response, _auth_digest(key, message, binding)):
        try:
            conn.send_bytes(_FAILURE)
        except OSError:
            pass
        if not response.startswith(_DIGEST):
            raise AuthenticationError("the peer answered the challenge without HMAC-SHA256 (wrong protocol or an old client)")
        if binding:
            raise AuthenticationError(
                "digest received was wrong: the peer does not know the authkey, or it answered for another "
                "TLS connection (a TLS-terminating relay between it and us?)"
            )
        raise AuthenticationError("digest received was wrong: the peer does not know the authkey")
    _auth_send(conn, _WELCOME, "welcoming the peer")


def answer_challenge(conn: Connection, authkey: bytes, timeout: float | None = None, *, binding: bytes = b"") -> None:
    """Prove to the peer that we know ``authkey``; raise AuthenticationError if it refuses us.

    ``binding``: as for :func:`deliver_challenge` (the same value on both ends, or the proof fails).
    """
    key = _check_key(authkey)
    timeout = HANDSHAKE_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    message = _auth_recv(conn, deadline, timeout, "waiting for the challenge")
    refused = _refusal(message)
    if refused is not None:
        raise refused
    if not message.startswith(_CHALLENGE + _DIGEST):
        raise AuthenticationError(f"expected an HMAC-SHA256 challenge, received {message[:40]!r}")
    payload = message[len(_CHALLENGE) :]
    if len(payload) < len(_DIGEST) + 20:
        raise AuthenticationError("the challenge is too short to be safe")
    _auth_send(conn, _auth_digest(key, payload, binding), "answering the challenge")
    reply = _auth_recv(conn, deadline, timeout, "waiting for the verdict")
    refused = _refusal(reply)
    if refused is not None:
        raise refused
    if reply != _WELCOME:
        if binding:
            raise AuthenticationError(
                "the server refused our proof of the authkey on this TLS connection: either it has a different "
                "authkey, or the authkey handshake did not match this TLS connection -- something between you "
                "and the server (a TLS-terminating proxy?) holds its own TLS session, so the server saw another "
                "connection than ours.  Connect to the server directly, and keep the hostname check on "
                "(TLSConfig(check_hostname=True), the default), which refuses a certificate for another name"
            )
        raise AuthenticationError("digest sent was rejected: the peer has a different authkey")


# --------------------------------------------------------------------------------------------------
# Listener and Client

def address_type(address: Any) -> str:
    """The family name of an address: a (host, port) tuple is AF_INET(6), a str is AF_UNIX."""
    if isinstance(address, tuple):
        return "AF_INET6" if ":" in str(address[0]) else "AF_INET"
    if isinstance(address, str) and address.startswith("\\\\"):
        return "AF_PIPE"  # a Windows named pipe (\\.\pipe\name): refused by _validate_family here
    if isinstance(address, (str, bytes)):
        return "AF_UNIX"
    raise ValueError(f"address type of {address!r} unrecognized: use (host, port) for TCP or a path for a Unix socket")


def arbitrary_address(family: str) -> Any:
    """A fresh address for a listener of ``family``."""
    if family == "AF_INET":
        return ("localhost", 0)
    if family == "AF_INET6":
        return ("::1", 0)
    if family == "AF_UNIX":
        return os.path.join(util.get_temp_dir(), f"listener-{os.getpid()}-{os.urandom(6).hex()}")
    raise ValueError(f"unrecognized family {family!r}; use one of {families}")


def _validate_family(family: str) -> None:
    if family not in families:
        raise ValueError(f"family {family!r} is not available here; use one of {families}")


class Listener:
    """A bound, listening socket whose ``accept()`` returns authenticated :class:`Connection` objects.

    ``Listener(address=None, family=None, backlog=1, authkey=None)``.  With an ``authkey`` each
    accepted peer must prove it knows the key (and learns that we do) before ``accept`` returns;
    a peer that fails makes ``accept`` raise :class:`AuthenticationError`, and the listener stays
    open for the next one.
    """

    def __init__(self, address: Any = None, family: str | None = None, backlog: int = 1, authkey: bytes | None = None) -> None:
        family = family or (address and address_type(address)) or default_family
        _validate_family(family)
        if family == "AF_INET" and address is not None and ":" in str(address[0]):
            family = "AF_INET6"
        address = address or arbitrary_address(family)
        if authkey is not None:
            authkey = _check_key(authkey)
        self._authkey = authkey
        self._family = family
        import socket  # Listener and Client need the full module; connections do not

        sock = socket.socket(getattr(socket, family))
        self._unlink: util.Finalize | None = None
        try:
            if family != "AF_UNIX":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(True)
            sock.bind(address)
            sock.listen(backlog)
        except BaseException:  # OSError, or TypeError for an address of the wrong family
            sock.close()
            raise
        self._socket: Any = sock
        self._address = sock.getsockname()
        if family == "AF_UNIX" and isinstance(address, (str, bytes)) and address[:1] not in ("\0", b"\0"):
            self._unlink = util.Finalize(self, os.unlink, args=(address,), exitpriority=0)
        self._last_accepted: Any = None
        self._gate: Any = None
        self._failures: list[Any] = []
        self._accept_lock = threading.Lock()

    def __repr__(self) -> str:
        state = "closed" if self._socket is None else "listening"
        auth = "authenticated" if self._authkey is not None else "no authkey"
        return f"<{type(self).__name__} {self._family} {self._address!r} {auth} {state}>"

    def accept(self) -> Connection:
        """Wait for a peer; authenticate it if there is an authkey; return the connection.

        With an authkey, peers are authenticated concurrently (see :mod:`gilfree._gate`): a peer that
        is slow or silent never delays another.  A peer that fails its handshake makes ``accept``
        raise :class:`AuthenticationError` (as in the stdlib), but only when no authenticated peer
        is waiting; the listener keeps serving either way."""
        if self._socket is None:
            raise OSError("listener is closed")
        if self._authkey is None:
            s, self._last_accepted = self._socket.accept()  # EINTR: retried (PEP 475)
            s.setblocking(True)
            _tune_tcp(s)
            return Connection(s.detach())
        with self._accept_lock:  # one thread at a time drives the gate; another waits here for its turn
            if self._socket is None:  # closed while this thread waited for its turn
                raise OSError("listener is closed")
            gate = self._gate
            if gate is None:
                from . import _gate

                gate = self._gate = _gate.Gate(self._socket, self._authkey, timeout=HANDSHAKE_TIMEOUT,
                                               capacity=LISTENER_HANDSHAKES, on_failure=self._peer_failed)
            gate.timeout = HANDSHAKE_TIMEOUT
            try:
                while not gate.ready:
                    if self._failures:
                        failure = self._failures[-1]
                        others = len(self._failures) - 1
                        self._failures.clear()
                        more = f" (and {others} other peer{'s' if others > 1 else ''} since the last accept)" if others else ""
                        raise AuthenticationError(f"{failure.reason}{more}")
                    try:
                        gate.step(1.0)  # wakes now and then: another thread may close the listener
                    except (OSError, ValueError):
                        if self._socket is None:
                            raise OSError("listener is closed") from None
                        raise
                    if self._socket is None:
                        raise OSError("listener is closed")
                s, _ = gate.ready.popleft()
            finally:
                if self._socket is None and self._gate is gate:  # closed by another thread meanwhile
                    self._gate = None
                    gate.close()
        _tune_tcp(s)
        try:
            self._last_accepted = s.getpeername()
        except OSError:
            self._last_accepted = None
        return Connection(s.detach())

    def _peer_failed(self, failure: Any) -> None:
        # a peer turned away for want of our own descriptors is not its failure: accept() goes on waiting
        # (the gate told the peer why); the others are raised by accept(), as the stdlib does
        if failure.kind != "busy":
            self._failures.append(failure)

    def close(self) -> None:
        """Stop listening (and remove the Unix socket file).  Idempotent."""
        sock, self._socket = self._socket, None
        if self._accept_lock.acquire(blocking=False):  # else a thread in accept() closes the gate itself
            try:
                gate, self._gate = self._gate, None
                if gate is not None:
                    gate.close()
            finally:
                self._accept_lock.release()
        if sock is not None:
            sock.close()
        if self._unlink is not None:
            unlink, self._unlink = self._unlink, None
            try:
                unlink()
            except FileNotFoundError:
                pass

    @property
    def address(self) -> Any:
        return self._address

    @property
    def last_accepted(self) -> Any:
        return self._last_accepted

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def Client(address: Any, family: str | None = None, authkey: bytes | None = None) -> Connection:
    """Connect to a :class:`Listener` at ``address``; with an ``authkey``, authenticate both ways."""
    family = family or address_type(address)
    _validate_family(family)
    if family == "AF_INET" and ":" in str(address[0]):
        family = "AF_INET6"
    import socket  # Listener and Client need the full module; connections do not

    s = socket.socket(getattr(socket, family))
    try:
        s.setblocking(True)
        s.connect(address)
        _tune_tcp(s)
    except BaseException:
        s.close()
        raise
    conn = Connection(s.detach())
    if authkey is not None:
        try:
            answer_challenge(conn, authkey)
            deliver_challenge(conn, authkey)
        except BaseException:
            conn.close()
            raise
    return conn
