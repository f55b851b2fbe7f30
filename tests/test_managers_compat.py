"""Managers where CPython's suite measures them: the ``xmlrpclib`` serializer, the errors of the server
itself (a method that is not exposed, a create that fails) as ``RemoteError``, ``exposed`` names with a
leading underscore, a manager used before ``start()``, a server's ``listener``.  Each scenario runs on
the stdlib's managers and on gilfree's, and the results are compared."""

from __future__ import annotations

import gc
import multiprocessing as std_mp
import multiprocessing.managers as std_managers
import os
import queue
import time
import weakref

import pytest
from _helpers import WAIT

import gilfree
from gilfree import connection, managers
from gilfree.managers import RemoteError

pytestmark = pytest.mark.timeout(60)

# -- what the managers serve (module level: every start method imports it) -------------------------------

_queue: queue.Queue = queue.Queue()


def _get_queue():
    return _queue


class FooBar:
    def f(self):
        return "f()"

    def g(self):
        raise ValueError("g failed")

    def _h(self):
        return "_h()"

    def big(self):
        return 1 << 40

    def items(self):
        return iter([1, 2, 3])

    def empty(self):
        raise queue.Empty


def _classes(mod):
    """Manager classes of ``mod`` (the stdlib's managers or gilfree's), registered alike."""

    class QueueManager(mod.BaseManager):
        pass

    class QueueManager2(mod.BaseManager):  # the same interface, without the callables (a client)
        pass

    class MyManager(mod.BaseManager):
        pass

    QueueManager.register("get_queue", callable=_get_queue)
    QueueManager2.register("get_queue")
    MyManager.register("Foo", callable=FooBar, method_to_typeid={"items": "Iter"})
    MyManager.register("Bar", callable=FooBar, exposed=("f", "_h"))
    MyManager.register("Iter", proxytype=mod.IteratorProxy, create_method=False)
    return QueueManager, QueueManager2, MyManager


STD = _classes(std_managers)
OURS = _classes(managers)
VALUES = ("hello world", None, True, 2.25, "hall\xe5 v\xe4rlden", "\u043f\u0440\u0438\u0432\u0456\u0442", b"hall\xe5 v\xe4rlden")


def _putter(which, address, authkey):
    _, client_cls, _ = STD if which == "std" else OURS
    m = client_cls(address=address, authkey=authkey, serializer="xmlrpclib")
    m.connect()
    m.get_queue().put(VALUES)


def _remote_scenario(which, mp_ctx):
    """CPython's test_remote: a queue served with serializer='xmlrpclib', filled by a child that connects."""
    server_cls, client_cls, _ = STD if which == "std" else OURS
    authkey = os.urandom(32)
    out = {}
    manager = server_cls(address=("127.0.0.1", 0), authkey=authkey, serializer="xmlrpclib")
    manager.start()
    try:
        p = mp_ctx.Process(target=_putter, args=(which, manager.address, authkey))
        p.start()
        client = client_cls(address=manager.address, authkey=authkey, serializer="xmlrpclib")
        client.connect()
        q = client.get_queue()
        out["got"] = q.get(timeout=WAIT)  # a tuple arrives as a list
        with pytest.raises(TypeError, match="cannot marshal"):
            q.put(time.sleep)  # XML-RPC cannot carry a function
        q.put([1, {"a": b"x"}])
        out["again"] = q.get()
        p.join(WAIT)
        out["exitcode"] = p.exitcode
        del q
    finally:
        manager.shutdown()
    return out


def test_xmlrpclib_serializer_as_the_stdlibs(ctx):
    expected = _remote_scenario("std", std_mp.get_context(ctx.get_start_method()))
    got = _remote_scenario("ours", ctx)
    assert got == expected
    assert got["got"] == list(VALUES)


def test_xmlrpclib_errors_and_returned_proxies():
    _, _, my_cls = OURS
    with my_cls(serializer="xmlrpclib", ctx=gilfree.get_context("fork")) as m:
        foo, bar = m.Foo(), m.Bar()
        assert foo.f() == "f()" and bar._h() == "_h()"
        with pytest.raises(ValueError, match="g failed"):  # a builtin exception is rebuilt as itself
            foo.g()
        with pytest.raises(queue.Empty):
            foo.empty()
        with pytest.raises(RemoteError) as info:
            foo._callmethod("_h")
        assert isinstance(info.value, AttributeError)
        with pytest.raises(RemoteError, match="int exceeds XML-RPC limits"):
            foo.big()  # the result cannot travel: the client is told why, the connection goes on
        it = foo.items()  # method_to_typeid: a proxy of the client's registered proxy type
        assert isinstance(it, managers.IteratorProxy)
        assert list(it) == [1, 2, 3]
        assert foo.f() == "f()"


def test_xmlrpclib_server_unpickles_nothing(tmp_path):
    """A peer that knows the authkey but sends a pickle to an xmlrpclib server gets an error; nothing runs."""
    from gilfree.managers import _client, _protocol

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    _, _, my_cls = OURS
    with my_cls(serializer="xmlrpclib", ctx=gilfree.get_context("fork")) as m:
        link = _client._Link(m.address, m._authkey, None, "xmlrpclib")  # authenticates, HELLO in XML
        chan = link.channel()
        chan.send_bytes(_protocol.reduction.dumps((_protocol.OP_CALL, "1", "f", (Evil(),), None)))
        kind, text = chan.loads(chan.recv_frame())
        assert kind == _protocol.R_REMOTE and "could not read (serializer 'xmlrpclib') a request" in text
        assert not marker.exists()
        # an XML bomb (entities within entities) is refused before it is parsed
        bomb = ('<?xml version="1.0"?><!DOCTYPE b [<!ENTITY a "aaaaaaaaaa">'
                + "".join(f'<!ENTITY a{i + 1} "{("&a%s;" % (i or "")) * 10}">' for i in range(8))
                + "]><methodResponse><params><param><value><string>&a8;</string></value></param>"
                "</params></methodResponse>")
        chan.send_bytes(bomb.encode())
        kind, text = chan.loads(chan.recv_frame())
        assert kind == _protocol.R_REMOTE and "DOCTYPE" in text
        assert m.Foo().f() == "f()"  # the server goes on
        link.close()
    assert not marker.exists()


def _my_manager_scenario(which, mp_ctx):
    """CPython's _TestMyManager.common: exposed names with a leading underscore, a method not exposed."""
    _, _, my_cls = STD if which == "std" else OURS
    out = {}
    with my_cls(ctx=mp_ctx) as m:
        foo, bar = m.Foo(), m.Bar()
        out["foo"] = [n for n in ("f", "g", "_h") if hasattr(foo, n)]
        out["bar"] = [n for n in ("f", "g", "_h") if hasattr(bar, n)]
        out["bar._h"] = (bar._h(), bar._callmethod("_h"))
        error = std_managers.RemoteError if which == "std" else RemoteError
        try:
            foo._callmethod("_h")
        except error as exc:
            out["not exposed"] = "RemoteError"
            out["_exc"] = exc
        with pytest.raises(ValueError):
            foo.g()
    return out


def test_not_exposed_is_a_remote_error_as_in_the_stdlib():
    expected = _my_manager_scenario("std", std_mp.get_context("fork"))
    got = _my_manager_scenario("ours", gilfree.get_context("fork"))
    exc = got.pop("_exc")
    expected.pop("_exc")
    assert got == expected
    assert isinstance(exc, AttributeError)  # and what gilfree raised before: both except clauses catch it
    assert "'_h' of 'Foo' object is not in exposed" in str(exc)


@pytest.mark.parametrize("processes", [0, -1])
def test_pool_that_cannot_be_made_is_a_remote_error(processes):
    for mp_ctx, error in ((std_mp.get_context("fork"), std_managers.RemoteError),
                          (gilfree.get_context("fork"), RemoteError)):
        with mp_ctx.Manager() as m:
            with pytest.raises(error) as info:
                m.Pool(processes)
            if error is RemoteError:
                assert isinstance(info.value, ValueError)
                assert str(info.value) == "Number of processes must be at least 1"
            assert m.dict() is not None  # the manager goes on


def test_shared_memory_manager_before_start_is_a_value_error():
    for mod in (std_managers, managers):
        smm = mod.SharedMemoryManager()
        with pytest.raises(ValueError):
            smm.SharedMemory(size=9)
    with pytest.raises(gilfree.ProcessError, match="not started"):
        managers.SharedMemoryManager().ShareableList([1])


def _restart_scenario(which):
    """CPython's test_rapid_restart: get_server(), close its listener, start; again at the same address."""
    server_cls, _, _ = STD if which == "std" else OURS
    authkey = os.urandom(32)
    manager = server_cls(address=("127.0.0.1", 0), authkey=authkey, serializer="xmlrpclib")
    srvr = manager.get_server()
    addr = srvr.address
    srvr.listener.close()
    manager.start()
    try:
        q = manager.get_queue()
        q.put("hello")
        first = q.get()
        del q
    finally:
        manager.shutdown()
    manager = server_cls(address=addr, authkey=authkey, serializer="xmlrpclib")
    manager.start()
    try:
        same = manager.address == addr
    finally:
        manager.shutdown()
    return first, same


def test_listener_of_an_unserved_server_can_be_closed():
    assert _restart_scenario("ours") == _restart_scenario("std") == ("hello", True)


# -- exceptions raised by proxies are not kept alive by a cycle (CPython 3.13's TestManagerExceptions) -------

def test_exceptions_from_a_proxy_are_freed_without_the_collector():
    gc_was = gc.isenabled()
    with gilfree.get_context("fork").Manager() as m:
        q = m.Queue()
        _, _, my_cls = OURS
        with my_cls(ctx=gilfree.get_context("fork")) as mine:
            foo = mine.Foo()
            gc.disable()
            try:
                for call in (q.get_nowait, foo.empty, lambda: foo._callmethod("_h"), lambda: m.Pool(0)):
                    wr = None
                    try:
                        call()
                    except Exception as exc:
                        wr = weakref.ref(exc)
                    assert wr is not None and wr() is None, call
            finally:
                if gc_was:
                    gc.enable()


class _FakeConnection:
    """Replies as the stdlib's server would (CPython's test_dispatch)."""

    def send(self, payload):
        self.sent = payload

    def recv(self):
        return "#ERROR", queue.Empty()


def test_dispatch_over_a_connection_and_with_the_stdlibs_reply_tags():
    for mod in (std_managers, managers):
        with pytest.raises(queue.Empty):
            mod.dispatch(_FakeConnection(), None, None)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        wr = None
        try:
            managers.dispatch(_FakeConnection(), None, None)
        except queue.Empty as exc:
            wr = weakref.ref(exc)
        assert wr is not None and wr() is None
    finally:
        if gc_was:
            gc.enable()
    assert isinstance(managers.convert_to_error("#TRACEBACK", "text\n"), RemoteError)
    assert isinstance(managers.convert_to_error("#NOPE", None), ValueError)
    # over a real connection to a gilfree server: authenticate, HELLO, then calls
    with gilfree.get_context("fork").Manager() as m:
        d = m.dict(a=1)
        with connection.Client(m.address, authkey=bytes(m._authkey)) as c:
            c.send((managers.OP_HELLO, os.urandom(16), os.getpid(), None))
            assert c.recv()[0] == managers.R_OK
            assert managers.dispatch(c, d._id, "__getitem__", ("a",)) == 1
            managers.dispatch(c, d._id, "update", (), {"b": 2})
            with pytest.raises(KeyError):
                managers.dispatch(c, d._id, "__getitem__", ("zz",))
            with pytest.raises(RemoteError):
                managers.dispatch(c, d._id, "no_such_method")
        assert d.copy() == {"a": 1, "b": 2}


def _child_uses_xml_proxies(d, lst, out):
    d["x"] = os.getpid()
    lst.append(len(d))
    out.put(sorted(d.keys()))


def test_xmlrpclib_proxies_in_children(ctx):
    """A proxy of an xmlrpclib manager passed to a child talks XML-RPC there too (its link is the
    serializer's); dict views arrive as lists; a proxy cannot be an argument (as in the stdlib)."""
    with managers.SyncManager(serializer="xmlrpclib", ctx=ctx) as m:
        d, lst, out = m.dict(a=1), m.list(), m.Queue()
        p = ctx.Process(target=_child_uses_xml_proxies, args=(d, lst, out))
        p.start()
        p.join(WAIT)
        assert p.exitcode == 0
        assert out.get(timeout=WAIT) == ["a", "x"]
        assert lst._getvalue() == [2]
        assert d.items() == [["a", 1], ["x", p.pid]]  # XML-RPC has no tuples
        with pytest.raises(TypeError, match="cannot marshal"):
            d["p"] = lst
        assert list(d) == ["a", "x"]  # __iter__ (method_to_typeid): an IteratorProxy, over XML-RPC
