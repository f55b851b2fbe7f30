"""The client side of managers (layer L6, in :mod:`gilfree.managers`): this process's links to servers
(:class:`_Link`: one per server, one channel per thread) and the rules by which proxies take and release
their references.

The rules (each written once, here; :class:`~gilfree.managers.BaseProxy` and
:class:`~gilfree.managers.BaseManager` call these functions):

1. Links.  A process has one link per (server address, authkey, TLS settings) (:func:`_get_link`).  A
   proxy made by a manager uses the manager's TLS settings; one that came without them uses the TLS
   link of its address if this process has one, else a plain one (:func:`_link_for`).
2. Channels.  A link opens one channel per thread on first use; a finished thread's channel goes to
   the next new thread.  A channel is written to only by the process that opened it, and a DECREF only
   when it is idle (:func:`_idle_here`): never in the middle of another message, never by a forked
   child on its parent's connection.
3. Taking a reference (:func:`_take_ref`).  A proxy owns at most one reference.  The server takes it
   for the client that created the object (``create``, a ``method_to_typeid`` result: the proxy is
   built with ``incref=False``); a proxy unpickled in another process asks with ``OP_INCREF`` (unless
   the server took it while sending the reply that carried it: ``preincref``); a forked child takes one
   of its own for each proxy it inherited.  A proxy in the server's own process counts its reference
   in the server's table, with no message (:func:`_local_server`).
4. Releasing it (:func:`_drop_ref`), once, when the process that owns the proxy drops it: in the
   server's own process into its table; for a proxy lent to children (pickled to start one, or held
   across a fork) only when those children have ended (:func:`_defer_decref`, :func:`_release_deferred`);
   otherwise as a DECREF on this thread's idle channel, or with its next request (:meth:`_Link.decref`).
5. Closing.  The server drops every reference of a client whose last connection closes, so a link never
   closes its last channel before a replacement is open (:meth:`_Link.discard`), and a link is closed
   only when the manager that started its server has shut that server down (:func:`_forget_link`); a
   manager that only connected leaves the link open, since every proxy here shares it.
6. Fork.  The child gets a new client identity and empty links (the parent's channels are never written
   from the child), and none of the parent's deferred DECREFs (:func:`_after_fork_in_child`).

Module state that is rebound (``_client_id``, ``_links_lock``, ``_fork_generation``, ``_deferred_next``)
is read by other modules as ``_client.X``, never imported by name.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import weakref

from .. import connection, process
from . import _protocol
from ._protocol import (
    OP_CALL,
    OP_DECREF,
    OP_HELLO,
    OP_INCREF,
    R_ERR,
    R_FAILED,
    R_OK,
    R_PROXY,
    R_REMOTE,
    RemoteError,
    TLSConfig,
    Token,
    _address_family,
    _as_remote_error,
    _Channel,
    _channel_type,
    _describe,
    _get_ident,
    _HDR_pack,
    _take_pipes,
    _tls_failure,
    _wrap_client,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._server import Server


_client_id = os.urandom(16)
_links: dict[tuple[Any, bytes, TLSConfig | None, str], _Link] = {}
_links_lock = threading.Lock()
#: Servers running in this process, by their bound address (for proxies rebuilt in the server).
_local_servers: weakref.WeakValueDictionary[Any, Server] = weakref.WeakValueDictionary()


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
        if _idle_here(chan):
            self.link._free.append(chan)


class _Link:
    """This process's connections to one server (see the module docstring)."""

    def __init__(self, address: Any, authkey: bytes, tls: TLSConfig | None, serializer: str = "pickle") -> None:
        self.address = address
        self.authkey = bytes(authkey)
        self.tls = tls
        self.serializer = serializer
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
            elif not connection.wait([sock], _protocol.PROBE_AFTER):  # poll, not select: any fd number
                # no challenge yet: a TLS server waits for our ClientHello and would never send one.
                # An empty frame makes a TLS server say so at once; a plain gilfree server skips it.
                sock.sendall(_HDR_pack(0))
            chan = _channel_type(self.serializer)(sock, f"manager at {_describe(address)}")
            binding = connection.channel_binding(sock)
            connection.answer_challenge(chan, self.authkey, binding=binding)  # type: ignore[arg-type]
            connection.deliver_challenge(chan, self.authkey, binding=binding)  # type: ignore[arg-type]
            # the address as this client knows it (for proxies it sends back); XML cannot carry an abstract
            # socket's NUL, and proxies do not travel under XML-RPC anyway
            chan.send((OP_HELLO, _client_id, os.getpid(), address if self.serializer == "pickle" else None))
            kind, value = chan.loads(chan.recv_bytes())
            if kind != R_OK:
                raise RemoteError(value)
            self.server_pid = value
            if family == socket.AF_UNIX and _protocol._USE_PIPES:
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
        try:
            return self._unusual(msg, manager)
        finally:
            msg = None  # an exception raised must not be kept alive by this frame (its traceback's)

    def _before_call(self, chan: _Channel) -> None:
        if self.pending:
            self._flush(chan)
        if _deferred:
            _release_deferred()

    def _unusual(self, msg: tuple[Any, Any] | None, manager: Any) -> Any:
        assert msg is not None
        kind, value = msg
        if kind == R_ERR or kind == R_FAILED:
            # neither this frame nor the caller's (see call, _callmethod) may keep the exception: it
            # would hold its traceback, which holds the frame (a cycle only the collector breaks)
            msg = None
            try:
                raise value if kind == R_ERR else _as_remote_error(value)
            finally:
                value = None
        if kind == R_PROXY:
            from ._proxies import AutoProxy  # not at import time: proxies are built on this module

            spec, typeid, ident, exposed = value
            token = Token(typeid, self.address, ident)
            authkey = self.authkey
            serializer = self.serializer
            if spec is None and manager is not None and serializer != "pickle":
                # the class did not travel (XML-RPC): the one this client registered for typeid
                entry = getattr(manager, "_registry", {}).get(typeid)
                if entry is not None and entry[-1] is not None:
                    spec = entry[-1]
            if spec is None or spec is AutoProxy:
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
        if chan is not None and _idle_here(chan):
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



#: The stdlib's reply tags, read by :func:`dispatch` and :func:`convert_to_error` as the codes they stand for
#: (code written against the stdlib's functions, a connection that replies as the stdlib's server does).
_STDLIB_KINDS = {"#RETURN": R_OK, "#ERROR": R_ERR, "#TRACEBACK": R_REMOTE, "#UNSERIALIZABLE": R_REMOTE}


def convert_to_error(kind: Any, result: Any) -> BaseException:
    """The exception a reply that is not a success stands for: the method's own (``R_ERR``, the stdlib's
    ``'#ERROR'``), a RemoteError (``R_FAILED``, ``R_REMOTE``, ``'#TRACEBACK'``, ``'#UNSERIALIZABLE'``),
    or a ValueError naming a kind that is none of these."""
    code = _STDLIB_KINDS.get(kind, kind) if isinstance(kind, str) else kind
    if code == R_ERR:
        return result
    if code == R_FAILED:
        return _as_remote_error(result)
    if code == R_REMOTE:
        if not isinstance(result, str):
            raise TypeError(f"Result {result!r} (kind {kind!r}) type is {type(result)}, not str")
        return RemoteError(f"Unserializable message: {result}\n" if kind == "#UNSERIALIZABLE" else result)
    return ValueError(f"Unrecognized message type {kind!r}")


def dispatch(c: Any, id: str, methodname: str, args: Any = (), kwds: Any = None) -> Any:
    """Call ``methodname(*args, **kwds)`` of the object ``id`` over ``c`` and return the result, or raise
    :func:`convert_to_error`'s exception.  ``c`` is a :mod:`gilfree.connection` connection to the
    server, authenticated, that sent its ``(OP_HELLO, client id, pid, None)``; a proxy needs none of
    this (its link does it), this is the stdlib's function for code that speaks to a server itself."""
    c.send((OP_CALL, id, methodname, tuple(args), dict(kwds) if kwds else None))
    kind, result = c.recv()
    if kind == R_OK or kind == "#RETURN":
        return result
    try:
        raise convert_to_error(kind, result)
    finally:
        del result  # the exception must not be kept alive by this frame (its traceback holds the frame)


def _idle_here(chan: _Channel) -> bool:
    """Whether this process may write a message on ``chan`` now (rule 2): it is open, it was opened by
    this process (not inherited across a fork), and no message is being sent or awaited on it."""
    return chan.sock is not None and chan.pid == os.getpid() and not chan.busy


def _get_link(address: Any, authkey: bytes, tls: TLSConfig | None = None, serializer: str = "pickle") -> _Link:
    """This process's link to the server at ``address`` for ``authkey``, ``tls`` and ``serializer`` (made
    on first use)."""
    key = (address, bytes(authkey), tls, serializer)
    link = _links.get(key)
    if link is None:
        with _links_lock:
            link = _links.get(key)
            if link is None:
                link = _links[key] = _Link(address, authkey, tls, serializer)
    return link


def _find_link(address: Any, authkey: bytes, serializer: str = "pickle") -> _Link:
    """A link to ``address`` for a proxy that came without TLS settings: the TLS one if this process has
    one (a proxy rebuilt here registered it), else a plain one."""
    key = bytes(authkey)
    for (addr, k, tls, ser), link in list(_links.items()):
        if addr == address and k == key and tls is not None and ser == serializer:
            return link
    return _get_link(address, authkey, None, serializer)


def _link_for(address: Any, authkey: bytes, manager: Any = None, serializer: str = "pickle") -> _Link:
    """The link a proxy for an object at ``address`` uses (rule 1): with the TLS settings and serializer
    of ``manager`` if it was made by one, else as :func:`_find_link` decides."""
    if manager is not None:
        return _get_link(address, authkey, manager._tls, manager._serializer)
    return _find_link(address, authkey, serializer)


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


def _local_server(address: Any) -> Server | None:
    """The server at ``address`` if it runs in this process: its objects' references are counted in its
    table directly, with no message (rule 3)."""
    server = _local_servers.get(address)
    return server if server is not None and server.pid == os.getpid() else None


def _take_ref(link: _Link, server: Server | None, ident: str) -> None:
    """Take a reference to object ``ident`` for this process (rule 3): in ``server``'s table if the
    proxy lives in the server's process, else with a synchronous ``OP_INCREF`` on ``link``."""
    if server is not None:
        if not server._local_incref(ident):
            raise KeyError(f"the manager has no object with id {ident!r} (released)")
    else:
        link.call((OP_INCREF, ident))


def _drop_ref(link: _Link, server: Server | None, ident: str, generation: int) -> None:
    """Release this process's reference to ``ident`` (rule 4).  ``generation`` is the proxy's
    :data:`_fork_generation` when it took the reference (-1: it was pickled for a child being started);
    if a fork happened since, children may still rely on the object and the DECREF waits for them."""
    if server is not None:
        server._local_decref(ident)
    elif generation != _fork_generation:  # lent to a child (pickled for it, or inherited by a fork)
        _defer_decref(link, ident)
    else:
        link.decref(ident)


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
