"""Proxies (layer L6, in :mod:`gilfree.managers`): :class:`BaseProxy`, how a proxy is pickled and
rebuilt, :func:`MakeProxyType`, :func:`AutoProxy`, and the proxy classes of SyncManager's types.

A proxy takes and releases its reference by the rules of :mod:`gilfree.managers._client`.  This module
does not import the server's: a proxy learns that it runs in a server's connection thread from
``_protocol._ctx``, and finds a server in its own process through ``_client._local_server``.
"""

from __future__ import annotations

import os
import time
import types

from .. import process, reduction, util
from . import _client
from ._protocol import (
    OP_CALL,
    OP_GETVALUE,
    OP_SERVICE,
    R_OK,
    TLSConfig,
    Token,
    _check_serializer,
    _ctx,
    _describe,
    _get_ident,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Iterable


def _authkey_for(authkey: bytes | None, manager: Any) -> bytes:
    """The authkey a proxy uses: the one given, else its manager's, else this process's."""
    if authkey is not None:
        return authkey
    return manager._authkey if manager is not None else process.current_process().authkey


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
        self._authkey = process.AuthenticationString(_authkey_for(authkey, manager))
        self._link = _client._link_for(token.address, self._authkey, manager, serializer)
        self._server = _client._local_server(token.address)
        self._owner_pid = os.getpid()
        self._gen = _client._fork_generation
        self._manager_owned = manager_owned
        if manager_owned:
            pass
        elif incref:
            self._incref()
        else:
            self._owned = True
        util.register_after_fork(self, BaseProxy._after_fork)

    # -- references (the rules: gilfree.managers._client) ---------------------------------------------
    def _incref(self) -> None:
        if self._manager_owned:
            return
        _client._take_ref(self._link, self._server, self._id)
        self._owned = True

    def _decref(self) -> None:
        if not self._owned:
            return
        self._owned = False
        _client._drop_ref(self._link, self._server, self._id, self._gen)

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
        self._gen = _client._fork_generation
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
        if link.pending or _client._deferred:
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
        try:
            return link._unusual(msg, self._manager)
        finally:
            msg = None  # the exception it raises must not be kept alive by this frame

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
        _client._get_link(token.address, authkey, tls, serializer)  # _find_link finds it for the proxies to come
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
        link = _client._link_for(token.address, _authkey_for(authkey, manager), manager, serializer)
        exposed = link.call((OP_SERVICE, "get_methods", (token.id,)))
    cls = MakeProxyType(f"AutoProxy[{token.typeid}]", exposed)
    proxy = cls(token, serializer, manager=manager, authkey=authkey, incref=incref, manager_owned=manager_owned)
    proxy._isauto = True
    return proxy


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
