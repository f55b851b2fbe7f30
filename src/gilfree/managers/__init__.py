"""Managers: objects that live in a server process, used from other processes through proxies (layer L6).

::

    client process, any thread (_proxies, _client)   server process, or `gilfree manager serve` (_server)
    ----------------------------------------------   ----------------------------------------------------
    proxy._callmethod(name, args)                    accept thread: poll(listener, stop pipe)
      │  link: one channel per (process, thread)       │ accept() ── new thread per connection
      │  per server, opened on first use,              ▼
      │  reused for every call                       connection thread
      ▼                                                TLS handshake (TCP, if configured)
    channel ── (CALL, id, name, args, kwds) ──────▶    HMAC-SHA256 both ways, 256-byte frames,
      [4-byte length][pickle] (_protocol)              deadline -- nothing unpickled before this
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

Where each part lives (each module imports only those above it):

    _protocol   opcodes, reply codes, limits and tunables, Token, RemoteError, TLSConfig, the framed
                _Channel (a socket, or pipes), the request-shape checks, _ctx (a server's thread?)
    _served     what SyncManager serves: Namespace, Value, Array, its Queue, dict views as lists
    _client     links (one per server, a channel per thread), the rules by which proxies take and
                release references, deferred DECREFs, what a fork changes
    _proxies    BaseProxy, pickling and rebuilding proxies, MakeProxyType, AutoProxy, proxy classes
    _server     Server: the gate, a thread per connection, the object table, the hang-up watcher
    __init__    BaseManager, SyncManager, SharedMemoryManager, and every name of gilfree.managers

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

import os
import signal
import socket
import sys
import threading
import types

from .. import _gate, connection, process, reduction, util
from .._errors import ProcessError
from . import _client, _protocol, _proxies, _served, _server
from ._client import (
    _after_fork_in_child,
    _before_fork,
    _children,
    _defer_decref,
    _deferred,
    _find_link,
    _forget_link,
    _get_link,
    _Holder,
    _Link,
    _links,
    _local_servers,
    _release_deferred,
    _server_processes,
    convert_to_error,
    dispatch,
)
from ._protocol import (
    _ATOMS,
    _FORMS,
    _HDR,
    _HDR_LONG,
    _RECV_SIZE,
    _SMALL,
    _WAKE,
    HANDSHAKE_MAX,
    MAX_HANDSHAKES,
    MAX_MESSAGE,
    OP_CALL,
    OP_CREATE,
    OP_DECREF,
    OP_GETVALUE,
    OP_HELLO,
    OP_INCREF,
    OP_PIPES,
    OP_SERVICE,
    R_ERR,
    R_OK,
    R_PROXY,
    R_REMOTE,
    RemoteError,
    TLSConfig,
    Token,
    _address_family,
    _bad_request,
    _BadRequest,
    _call_failed,
    _Channel,
    _check_serializer,
    _Context,
    _copyreg_table,
    _ctx,
    _describe,
    _get_ident,
    _HDR_pack,
    _HDR_unpack_from,
    _loads,
    _peer_name,
    _perf_counter,
    _request_problem,
    _short,
    _take_pipes,
    _tls_failure,
    _wrap_client,
)
from ._proxies import (
    AcquirerProxy,
    ArrayProxy,
    AutoProxy,
    BarrierProxy,
    BaseListProxy,
    BasePoolProxy,
    BaseProxy,
    ConditionProxy,
    DictProxy,
    EventProxy,
    IteratorProxy,
    ListProxy,
    MakeProxyType,
    NamespaceProxy,
    PoolProxy,
    RebuildProxy,
    ValueProxy,
    _proxy_method,
    _proxy_types,
    _rebuild_proxy,
)
from ._served import (
    _VIEW_TYPES,
    Array,
    Namespace,
    Value,
    _caller_gone,
    _CallerGone,
    _rebuild_as_list,
    _ServedQueue,
)
from ._server import (
    _LOCAL_CLIENT_ID,
    Server,
    _ClientState,
    _ConnState,
    _resolve,
    all_methods,
    public_methods,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Iterable, Mapping

    from ._client import _client_id, _fork_generation, _links_lock
    from ._protocol import _USE_PIPES, PROBE_AFTER, SPIN, SPIN_SKIP, START_TIMEOUT


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
    "NotStartedError",
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


# Names whose value lives in one of the package's modules and is read there at run time, or is rebound
# there: not copied here (a copy would go stale), but read and written through (``managers.SPIN = 0``
# sets ``_protocol.SPIN``, which every channel reads).
_FORWARDED: dict[str, types.ModuleType] = {
    "SPIN": _protocol,
    "SPIN_SKIP": _protocol,
    "PROBE_AFTER": _protocol,
    "START_TIMEOUT": _protocol,
    "_USE_PIPES": _protocol,
    "_client_id": _client,
    "_links_lock": _client,
    "_fork_generation": _client,
    "_deferred_next": _client,
}


if not TYPE_CHECKING:
    def __getattr__(name: str) -> Any:
        home = _FORWARDED.get(name)
        if home is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        return getattr(home, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_FORWARDED})


class _Package(types.ModuleType):
    """This package's module type: assigning a forwarded name sets it where it is used."""

    def __setattr__(self, name: str, value: Any) -> None:
        home = _FORWARDED.get(name)
        if home is not None:
            setattr(home, name, value)
        else:
            super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name in _FORWARDED:
            raise AttributeError(f"{name} cannot be deleted from {__name__}")
        super().__delattr__(name)


sys.modules[__name__].__class__ = _Package


# ---------------------------------------------------------------------------------------------------
# Managers


class NotStartedError(ProcessError, ValueError):
    """A manager was used before ``start()`` or ``connect()`` (a ValueError too: the stdlib's
    SharedMemoryManager raises that, having no address to connect to)."""


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
        link = _client._link_for(self._address, self._authkey, self)
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
            ready = connection.wait([reader, self._process.sentinel], _protocol.START_TIMEOUT)
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
            args=(self._process, self._address, self._authkey, self._state, self._tls, self._shutdown_timeout,
                  self._serializer),
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
        server.grow_fd_limit = True  # a process of its own: a flood may have the descriptors it can
        util.info("manager serving at %r", server.address)
        parent = process.parent_process()
        server.serve_forever(lifeline=parent.sentinel if parent is not None else None)

    @staticmethod
    def _finalize_manager(proc: Any, address: Any, authkey: bytes, state: State, tls: TLSConfig | None,
                          shutdown_timeout: float, serializer: str = "pickle") -> None:
        """Stop the server process: ask it to shut down, then terminate, then kill it."""
        if proc.is_alive():
            util.info("sending shutdown message to manager")
            try:
                link = _Link(address, authkey, tls, serializer)  # a private connection: works from any thread, at exit
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
        _forget_link(address, authkey)  # the server is gone: this process's links to it may close (rule 5)

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
            if self._state.value == State.INITIAL:
                raise NotStartedError("the manager is not started: call start() or connect() first")
            raise ProcessError("Manager has shut down")
        return _client._link_for(self._address, self._authkey, self)

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
