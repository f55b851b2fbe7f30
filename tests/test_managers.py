"""Managers: the stdlib's API and semantics (compared with multiprocessing's), proxies across every start
method, reference counting (including clients that die), hostile peers, TLS, and a manager served
across network namespaces."""

from __future__ import annotations

import gc
import multiprocessing as std_mp
import multiprocessing.managers as std_managers
import os
import pickle
import queue
import re
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _helpers import SRC, WAIT, running

import gilfree
from gilfree import connection, managers
from gilfree.managers import BaseManager, BaseProxy, SyncManager, TLSConfig, Token

pytestmark = pytest.mark.timeout(60)

KEY = b"test-manager-key"


def _until(predicate, timeout=WAIT, step=0.02):
    """Poll ``predicate`` until true (or ``timeout`` s); return its last value (no timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- child targets (module level: every start method can import them) ------------------------------------

def _child_uses_everything(d, lst, ns, q, lock, ev, val, arr, out):
    d["child"] = os.getpid()
    d["count"] = d["count"] + 1
    lst.append("from child")
    lst += [1, 2]
    ns.seen = True
    q.put(("hello", os.getpid()))
    with lock:
        val.value += 10
    arr[0] = 99
    ev.set()
    out.put("done")


def _child_appends(lst, n):
    for i in range(n):
        lst.append(i)


def _child_nested(d):
    inner = d["inner"]
    inner.append("child")
    d["made_in_child"] = d["factory"]  # a proxy stored by a client, copied to another key


def _child_holds_objects(address, authkey, ready):
    m = SyncManager(address, authkey)
    m.connect()
    held = [m.dict({"i": i}) for i in range(5)]  # noqa: F841 - held until killed
    q = m.Queue()
    ready.set()
    q.get()  # blocks in the server until this process is killed


def _child_makes_objects_and_dies(address, authkey):
    m = SyncManager(address, authkey)
    m.connect()
    held = [m.dict({"i": i}) for i in range(5)]  # noqa: F841 - held until the process ends
    os._exit(0)  # no DECREFs: the server learns it from the hang-up


def _child_queue_consumer(q, results):
    while True:
        item = q.get()
        if item is None:
            return
        results.put(item * 2)


def _child_threads(d, n_threads):
    def work(t):
        for i in range(20):
            d[(t, i)] = i

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _serve_in_child(manager_cls, address, authkey, options, conn):
    m = manager_cls(address, authkey)
    server = m.get_server(**options)
    conn.send(server.address)
    conn.close()
    server.serve_forever()


def _remote_client(address, authkey, out):
    m = SyncManager(address, authkey)
    try:
        m.connect()
        d = m.shared_dict()
        d["remote"] = os.getpid()
        out.put("ok")
    except gilfree.AuthenticationError as exc:
        out.put(f"refused: {exc}")


class Counter:
    """A user type served by a custom manager."""

    def __init__(self, start=0):
        self.n = start

    def incr(self, by=1):
        self.n += by
        return self.n

    def value(self):
        return self.n

    def _private(self):
        return "hidden"

    def children(self):
        return [Counter(1), Counter(2)]

    def spawn_counter(self):
        return Counter(self.n * 10)


class CounterProxy(BaseProxy):
    _exposed_ = ("incr", "value", "spawn_counter")
    _method_to_typeid_ = {"spawn_counter": "Counter"}

    def incr(self, by=1):
        return self._callmethod("incr", (by,))

    def value(self):
        return self._callmethod("value")

    def spawn_counter(self):
        return self._callmethod("spawn_counter")


class MyManager(BaseManager):
    pass


MyManager.register("Counter", Counter, CounterProxy)
MyManager.register("AutoCounter", Counter)
MyManager.register("OrderedDict", "collections:OrderedDict")
MyManager.register("Restricted", Counter, exposed=("value",))


_shared_dict: dict = {}


def _get_shared_dict():
    return _shared_dict


SyncManager.register("shared_dict", _get_shared_dict, managers.DictProxy)


def _use_counter(c, out):
    out.put(c.incr(5))


# -- the public surface ------------------------------------------------------------------------------------

def test_exports_and_context_method():
    assert "Manager" in gilfree.__all__ and "managers" in gilfree.__all__
    assert gilfree.managers is managers
    for name in ("BaseManager", "SyncManager", "SharedMemoryManager", "BaseProxy", "Token", "RemoteError",
                 "Namespace", "Value", "Array", "AutoProxy", "MakeProxyType", "DictProxy", "ListProxy",
                 "ValueProxy", "NamespaceProxy", "AcquirerProxy", "ConditionProxy", "EventProxy",
                 "BarrierProxy", "IteratorProxy", "PoolProxy", "ArrayProxy"):
        assert hasattr(managers, name), name
        assert hasattr(std_managers, name) or name == "TLSConfig", name
    for typeid in ("dict", "list", "Namespace", "Queue", "JoinableQueue", "Lock", "RLock", "Semaphore",
                   "BoundedSemaphore", "Condition", "Event", "Barrier", "Value", "Array", "Pool"):
        assert callable(getattr(SyncManager, typeid)), typeid
    assert SyncManager._registry["Pool"][0] == "gilfree.pool:Pool"


def test_make_proxy_type_has_no_exec():
    cls = managers.MakeProxyType("P", ("a", "__len__"))
    assert issubclass(cls, BaseProxy) and cls._exposed_ == ("a", "__len__")
    assert managers.MakeProxyType("P", ("a", "__len__")) is cls
    import inspect

    assert "exec(" not in inspect.getsource(managers)


def test_reprs(ctx):
    m = SyncManager(ctx=ctx)
    assert repr(m) == "<SyncManager initial>"
    with m:
        assert repr(m).startswith("<SyncManager started at @gilfree-manager-") and f"server pid {m._process.pid}" in repr(m)
        d = m.dict()
        r = repr(d)
        assert r.startswith("<DictProxy object, typeid 'dict' at 0x") and f"; id {d._id} in the manager at @gilfree-manager-" in r
        assert str(d) == "{}"
        assert repr(d._token) == f"Token(typeid='dict', address={m.address!r}, id={d._id!r})"
        assert repr(m.Namespace(a=1, _b=2)) .startswith("<NamespaceProxy object")
        assert str(m.Namespace(b=2, a=1)) == "Namespace(a=1, b=2)"
        assert str(m.Value("i", 3)) == "Value('i', 3)"
    assert repr(m).startswith("<SyncManager shut down")
    assert repr(TLSConfig("c.pem", "k.pem", cafile="ca.pem")) == "TLSConfig(certfile='c.pem', keyfile='k.pem', cafile='ca.pem')"
    assert repr(managers.State()) == "<State initial>"


def test_server_repr():
    server = SyncManager(("127.0.0.1", 0), KEY).get_server()
    try:
        assert repr(server) == f"<Server 127.0.0.1:{server.address[1]} serving objects=0 clients=0>"
    finally:
        server.stop()
        server._close_all()
    assert "stopped" in repr(server)


# -- stdlib semantics, side by side -------------------------------------------------------------------------

def _scenario(m):
    """Operations whose results must match between the stdlib's manager and gilfree's."""
    out = {}
    d = m.dict({"a": 1})
    d["b"] = [1, 2]
    d.update(c=3)
    out["dict"] = (sorted(d.keys()), sorted(d.values(), key=repr), sorted(d.items(), key=repr), len(d), "a" in d,
                   d.get("zz", "default"), d.setdefault("e", 5), d.pop("e"), sorted(d.copy()), str(m.dict({1: 2})),
                   sorted(iter(d)), d._getvalue() == {"a": 1, "b": [1, 2], "c": 3})
    try:
        d["missing"]
    except KeyError as exc:
        out["keyerror"] = repr(exc)
    lst = m.list(range(5))
    lst.append(5)
    lst.extend([6, 7])
    lst += [8]
    lst *= 2
    lst.insert(0, -1)
    lst.remove(-1)
    lst.reverse()
    lst.sort()
    out["list"] = (list(lst), lst[2:5], lst[-1], len(lst), 3 in lst, lst.count(3), lst.index(4), lst.pop(),
                   list(reversed(lst))[:3], lst + [100], lst * 1 == list(lst), str(lst)[:10])
    del lst[0]
    lst[0] = "x"
    out["list2"] = list(lst)[:4]
    try:
        lst[1000]
    except IndexError as exc:
        out["indexerror"] = repr(exc)
    ns = m.Namespace(x=1)
    ns.y = "two"
    del ns.x
    out["ns"] = (str(ns), ns.y, hasattr(ns, "x"))
    v = m.Value("d", 1.5)
    v.value *= 2
    out["value"] = (v.value, v.get())
    a = m.Array("i", [1, 2, 3])
    a[1] = 20
    out["array"] = (len(a), a[1], list(a))
    q = m.Queue()
    q.put(1)
    q.put_nowait("two")
    out["queue"] = (q.qsize(), q.get(), q.get_nowait(), q.empty())
    try:
        q.get(timeout=0.01)
    except queue.Empty:
        out["empty"] = "Empty"
    jq = m.JoinableQueue()
    jq.put(1)
    jq.get()
    jq.task_done()
    jq.join()
    lock, rlock = m.Lock(), m.RLock()
    out["locks"] = (lock.acquire(), lock.acquire(timeout=0.01), lock.release(), rlock.acquire(), rlock.acquire(), rlock.release(), rlock.release())
    sem = m.BoundedSemaphore(1)
    with sem:
        pass
    try:
        sem.release()
    except ValueError as exc:
        out["bounded"] = type(exc).__name__
    ev = m.Event()
    out["event"] = (ev.is_set(), ev.wait(0.01), ev.set(), ev.is_set(), ev.wait())
    cond = m.Condition()
    with cond:
        out["cond"] = (cond.wait(0.01), cond.wait_for(lambda: True), cond.notify(), cond.notify_all())
    bar = m.Barrier(1)
    out["barrier"] = (bar.parties, bar.n_waiting, bar.broken, bar.wait())
    out["semaphore"] = m.Semaphore(2).acquire()
    return out


def test_same_results_as_stdlib_manager():
    with std_mp.get_context("fork").Manager() as sm:
        expected = _scenario(sm)
    with gilfree.get_context("fork").Manager() as gm:
        got = _scenario(gm)
    assert got == expected


@pytest.mark.parametrize("impl", ["stdlib", "gilfree"])
def test_an_object_that_cannot_be_made_raises_remote_error(impl):
    # the stdlib's server answers a failed creation with its traceback, as a RemoteError (CPython's
    # _TestPool.test_make_pool under a manager: m.Pool(0) raises RemoteError)
    if impl == "stdlib":
        manager, error = std_mp.get_context("fork").Manager(), std_managers.RemoteError
    else:
        manager, error = gilfree.get_context("fork").Manager(), managers.RemoteError
    with manager as m:
        with pytest.raises(error, match=r"Number of processes must be at least 1") as info:
            m.Pool(0)
        if impl == "gilfree":  # gilfree's RemoteError is also of the original type
            assert isinstance(info.value, ValueError)
        with pytest.raises(error, match=r"'int' object is not iterable") as info:
            m.list(5)
        if impl == "gilfree":
            assert isinstance(info.value, TypeError)
        assert m.list([1, 2])[:] == [1, 2]  # the connection goes on


def test_same_exception_for_non_exposed_method():
    class Restricted(BaseManager):
        pass

    Restricted.register("c", Counter, exposed=("value",))
    with Restricted(ctx=gilfree.get_context("fork")) as m:
        c = m.c(5)
        assert c.value() == 5
        with pytest.raises(AttributeError, match=r"'incr' of 'c' object is not in exposed=\['value'\]"):
            c._callmethod("incr")


# -- proxies in children, under every start method --------------------------------------------------------

def test_proxies_work_in_children(ctx):
    with ctx.Manager() as m:
        d, lst, ns, q = m.dict({"count": 0}), m.list(), m.Namespace(seen=False), m.Queue()
        lock, ev, val, arr = m.Lock(), m.Event(), m.Value("i", 1), m.Array("i", [0, 0])
        out = ctx.Queue()
        with running(ctx, _child_uses_everything, d, lst, ns, q, lock, ev, val, arr, out) as p:
            assert out.get(timeout=WAIT) == "done"
            p.join(WAIT)
        assert p.exitcode == 0
        assert d["count"] == 1 and d["child"] == p.pid
        assert list(lst) == ["from child", 1, 2]
        assert ns.seen is True
        assert q.get(timeout=5) == ("hello", p.pid)
        assert val.value == 11 and arr[0] == 99 and ev.is_set()


def test_seed_ex4_records_in_children(ctx):
    with ctx.Manager() as m:
        records = m.list([("Sam", 10), ("Adam", 9)])
        with running(ctx, _child_appends, records, 3) as p:
            p.join(WAIT)
        assert p.exitcode == 0
        assert list(records) == [("Sam", 10), ("Adam", 9), 0, 1, 2]


def test_proxy_through_a_queue_and_threads(ctx):
    with ctx.Manager() as m:
        d = m.dict()
        with running(ctx, _child_threads, d, 4) as p:
            p.join(WAIT)
        assert p.exitcode == 0
        assert len(d) == 80
        # each thread of the child had its own channel; all of them were one client
        q = gilfree.Queue()
        q.put(d)
        d2 = q.get(timeout=5)
        assert d2[(3, 19)] == 19 and d2._id == d._id


def test_nested_proxies(ctx):
    with ctx.Manager() as m:
        d = m.dict()
        inner = m.list(["parent"])
        d["inner"] = inner
        d["factory"] = m.list(["f"])  # referenced only through the dict
        with running(ctx, _child_nested, d) as p:
            p.join(WAIT)
        assert p.exitcode == 0
        assert list(inner) == ["parent", "child"]

        def reads(dd):  # in a function: pytest's assertion rewriting keeps temporaries alive
            return list(dd["inner"]), list(dd["made_in_child"]), type(dd["inner"])

        assert reads(d) == (["parent", "child"], ["f"], managers.ListProxy)
        before = m._number_of_objects()
        del d
        gc.collect()
        # the dict, and the list referenced only by it, are released; `inner` is still ours
        assert _until(lambda: m._number_of_objects() == before - 2, timeout=3), m._debug_info()
        assert list(inner) == ["parent", "child"]


# -- reference counting ---------------------------------------------------------------------------------

def test_objects_released_when_proxies_go():
    with gilfree.get_context("fork").Manager() as m:
        base = m._number_of_objects()
        proxies = [m.dict() for _ in range(10)]
        assert m._number_of_objects() == base + 10
        copies = [gilfree.reduction.loads(gilfree.reduction.dumps(p)) for p in proxies]
        del proxies
        gc.collect()
        assert m._number_of_objects() == base + 10  # the copies still refer to them
        del copies
        gc.collect()
        assert m._number_of_objects() == base
        assert "refcount=" not in m._debug_info()


def test_dead_client_objects_released(ctx):
    with ctx.Manager() as m:
        base = m._number_of_objects()
        ready = ctx.Event()
        with running(ctx, _child_holds_objects, m.address, bytes(m._authkey), ready) as p:
            assert ready.wait(WAIT)
            assert _until(lambda: m._number_of_objects() == base + 6)
            p.kill()  # in the middle of a call (Queue.get blocks in the server)
            p.join(WAIT)
        assert _until(lambda: m._number_of_objects() == base)
        d = m.dict(x=1)  # the server still serves
        assert d["x"] == 1


def test_interrupted_call_keeps_the_client_known():
    with gilfree.get_context("fork").Manager() as m:
        d = m.dict(a=1)
        link = d._link
        chan = link.channel()
        link.discard(chan)  # what a Ctrl-C in the middle of a call does
        assert d["a"] == 1


# -- custom managers, registration ------------------------------------------------------------------------

def test_custom_manager_and_method_to_typeid(ctx):
    with MyManager(ctx=ctx) as m:
        c = m.Counter(2)
        assert c.incr() == 3
        child = c.spawn_counter()
        assert isinstance(child, CounterProxy) and child.value() == 30
        auto = m.AutoCounter(7)
        assert type(auto).__name__ == "AutoProxy[AutoCounter]"
        assert auto.incr(3) == 10 and sorted(auto._exposed_) == ["children", "incr", "spawn_counter", "value"]
        assert not hasattr(auto, "_private")
        od = m.OrderedDict([("z", 1), ("a", 2)])  # a "module:callable" resolved in the server
        assert list(od.keys()) == ["z", "a"]
        out = ctx.Queue()
        with running(ctx, _use_counter, auto, out) as p:
            assert out.get(timeout=WAIT) == 15
            p.join(WAIT)
        assert auto.value() == 15


def test_register_validates():
    class M(BaseManager):
        pass

    with pytest.raises(TypeError, match="method_to_typeid maps method names to typeids"):
        M.register("x", dict, method_to_typeid={"a": 1})
    assert "x" not in BaseManager._registry


class LockMaker:
    def make(self):
        return threading.Lock()


def test_unpicklable_result_is_a_remote_error():
    class M(BaseManager):
        pass

    M.register("LockMaker", LockMaker)
    with M(ctx=gilfree.get_context("fork")) as m:
        maker = m.LockMaker()
        with pytest.raises(managers.RemoteError, match=r"could not pickle the result \(lock\)"):
            maker.make()
        d = gilfree.get_context("fork").Manager()
        try:
            proxy = d.dict()
            with pytest.raises(gilfree.PicklingError):
                proxy["lock"] = threading.Lock()  # refused in the caller; nothing sent
            assert "lock" not in proxy
        finally:
            d.shutdown()


def test_lambdas_travel_to_the_manager():
    with gilfree.get_context("spawn").Manager() as m:
        d = m.dict()
        scale = 3
        d["f"] = lambda x: x * scale  # by value (cloudpickle), as everywhere in gilfree
        assert d["f"](2) == 6


# -- servers: get_server, connect, TCP, authentication ---------------------------------------------------

def test_served_manager_with_connect(ctx):
    r, w = ctx.Pipe(duplex=False)
    with running(ctx, _serve_in_child, SyncManager, ("127.0.0.1", 0), KEY, {}, w) as p:
        w.close()
        address = r.recv()
        m = SyncManager(address, KEY)
        m.connect()
        d = m.shared_dict()
        out = ctx.Queue()
        for key in (KEY, b"wrong key"):
            with running(ctx, _remote_client, address, key, out) as c:
                result = out.get(timeout=WAIT)
                c.join(WAIT)
            if key == KEY:
                assert result == "ok"
            else:
                assert result.startswith("refused: digest")
        assert d["remote"] > 0
        m._link().call((managers.OP_SERVICE, "shutdown", ()))
        p.join(WAIT)
        assert p.exitcode == 0
        m.shutdown()


def test_shutdown_of_a_connected_manager_leaves_other_managers_objects_alone():
    """Issue 13, item 6: a second manager connected to the same server and shut down closed the
    process-wide link to it, and the server released the first manager's objects
    (``RemoteError: no object with id '1'``)."""
    with SyncManager(("127.0.0.1", 0), KEY, ctx=gilfree.get_context("fork")) as a:
        d = a.dict(x=1)
        b = SyncManager(a.address, KEY)
        b.connect()
        assert b.dict(y=2)["y"] == 2
        b.shutdown()
        assert d.copy() == {"x": 1}  # the first manager's object is still there
        d["z"] = 3
        assert a.dict(w=4)["w"] == 4 and d["z"] == 3
        with pytest.raises(gilfree.ProcessError, match="shut down"):
            b.dict()


def test_wrong_authkey_is_refused():
    with SyncManager(("127.0.0.1", 0), KEY, ctx=gilfree.get_context("fork")) as m:
        other = SyncManager(m.address, b"not the key")
        with pytest.raises(gilfree.AuthenticationError):
            other.connect()
        assert m.dict(a=1)["a"] == 1
    assert m.address[0] == "127.0.0.1"


def test_start_failure_is_reported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError, match="Address already in use"):
            SyncManager(s.getsockname(), KEY, ctx=gilfree.get_context("fork")).start()


def test_connect_to_nothing_says_what_happened():
    with pytest.raises(OSError, match=r"cannot connect to the manager at 127\.0\.0\.1:1: .*shut down"):
        SyncManager(("127.0.0.1", 1), KEY).connect()


def test_state_errors():
    m = SyncManager(ctx=gilfree.get_context("fork"))
    with pytest.raises(gilfree.ProcessError, match="not started"):
        m.dict()
    m.start()
    with pytest.raises(gilfree.ProcessError, match="Already started"):
        m.start()
    m.shutdown()
    with pytest.raises(gilfree.ProcessError, match="shut down"):
        m.start()
    m.shutdown()  # twice is fine


def test_server_ends_with_its_parent(tmp_path):
    prog = tmp_path / "orphan.py"
    prog.write_text(
        "import gilfree, os, sys, time\n"
        "if __name__ == '__main__':\n"
        "    m = gilfree.Manager()\n"
        "    print(m._process.pid, flush=True)\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    env = dict(os.environ, PYTHONPATH=SRC)
    res = subprocess.run([sys.executable, str(prog)], capture_output=True, text=True, env=env, timeout=60)
    server_pid = int(res.stdout.split()[0])
    assert _until(lambda: not _alive(server_pid))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    if state == "Z":
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return True


# -- hostile peers ----------------------------------------------------------------------------------------

@pytest.fixture
def served():
    """A TCP manager on loopback with a short handshake deadline, and its Server's pid."""
    ctx = gilfree.get_context("fork")
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_serve_in_child, args=(SyncManager, ("127.0.0.1", 0), KEY, {"handshake_timeout": 0.5}, w))
    p.start()
    w.close()
    address = r.recv()
    m = SyncManager(address, KEY)
    m.connect()
    try:
        yield m, p
    finally:
        try:
            m._link().call((managers.OP_SERVICE, "shutdown", ()))
        except Exception:
            p.kill()
        p.join(WAIT)
        m.shutdown()


def _raw(address, payload=b"", read=True):
    s = socket.create_connection(address)
    try:
        if payload:
            s.sendall(payload)
        if read:
            s.settimeout(10)
            try:
                while s.recv(4096):
                    pass
            except OSError:
                pass
    finally:
        s.close()


def test_hostile_inputs_do_not_disturb_good_clients(served):
    m, server = served
    d = m.dict()
    hostile = [
        os.urandom(1000),                                  # garbage
        struct.pack("!i", 2_000_000_000) + b"x" * 10,        # oversized length prefix
        struct.pack("!i", -1) + struct.pack("!Q", 1 << 60),  # oversized long prefix
        struct.pack("!i", -7),                               # bad header
        struct.pack("!i", 100) + b"#CHALL",                  # truncated frame
        b"",                                                 # says nothing: the handshake deadline
    ]
    for payload in hostile:
        threading.Thread(target=_raw, args=(m.address, payload)).start()
        d[len(d)] = payload[:8]
    # a client that authenticates and then sends a bad frame, or a pickle the server cannot load
    for junk in (struct.pack("!i", -5), struct.pack("!i", 5) + b"\x80\x05garb"):
        link = managers._Link(m.address, KEY, None)
        chan = link.channel()
        chan.sock.sendall(junk)
        if len(junk) > 4:
            assert managers.reduction.loads(chan.recv_bytes())[0] == managers.R_REMOTE
        link.close()
    assert len(d) == len(hostile)
    assert d[0] == hostile[0][:8]
    assert m.dict(ok=True)["ok"] is True


_SERVE_LOGGING = """
import sys
from gilfree.managers import SyncManager
server = SyncManager(("127.0.0.1", 0), sys.argv[1].encode()).get_server()
print(repr(server.address), flush=True)
server.serve_forever()
"""


def test_malformed_requests_get_an_error_and_the_connection_goes_on():
    """An authenticated client that sends requests of the wrong shape (issue 13, item 7) gets an
    R_REMOTE reply for each (a malformed DECREF, which has no reply, is ignored) on the same
    connection; nothing is printed by the server, and other clients are served."""
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _SERVE_LOGGING, KEY.decode()], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = eval(proc.stdout.readline())
        link = managers._Link(address, KEY, None)
        chan = link.channel()
        ident, _ = link.call((managers.OP_CREATE, "dict", (), None))
        C, S, D = managers.OP_CALL, managers.OP_SERVICE, managers.OP_DECREF
        malformed = [
            (C,), (), 5, None, "abc", [C], ([C],), (99,),
            (C, [1], "x", (), None), (C, {}, "x", (), None), (C, ident), (C, ident, 5, (), None),
            (C, ident, ["x"], (), None), (C, ident, "__len__"), (C, ident, "__len__", 5, None),
            (C, ident, "__len__", (), 5), (C, ident, "__len__", (), ["k"]),
            (managers.OP_CREATE,), (managers.OP_CREATE, ["dict"], (), None), (managers.OP_CREATE, "dict", 5, None),
            (managers.OP_CREATE, "dict", (), 5), (managers.OP_INCREF,), (managers.OP_INCREF, [1]),
            (managers.OP_GETVALUE,), (managers.OP_GETVALUE, {}), (S,), (S, ["dummy"], ()), (S, "dummy", 5),
            (S, "dummy", (1, 2)), (S, "get_methods", ()), (S, "get_methods", ([1],)), (S, "get_methods", (5,)),
            (S, "shutdown", 5), (S, 5, ()),
        ]
        for request in malformed:
            reply = chan.request(request)
            assert reply[0] == managers.R_REMOTE, (request, reply)
            assert "request" in reply[1], (request, reply)
        for request in [(D,), (D, 5), (D, None), (D, [[1]]), (D, ("nope", [1], 7)), (D, 5, 6)]:
            chan.send(request)
            assert chan.request((S, "dummy", ())) == (managers.R_OK, None), request
        assert chan.request((C, ident, "__setitem__", ("a", 1), None)) == (managers.R_OK, None)
        assert chan.request((C, ident, "__getitem__", ("a",), None)) == (managers.R_OK, 1)
        # a method that raises still raises its own exception (not a "bad request")
        reply = chan.request((C, ident, "__getitem__", ("zz",), None))
        assert reply[0] == managers.R_ERR and isinstance(reply[1], KeyError)
        other = SyncManager(address, KEY)
        other.connect()
        d = other.dict(x=1)
        assert d["x"] == 1
        del d
        link.call((S, "shutdown", ()))
        link.close()
        assert proc.wait(WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert err == "", err


def test_many_connections_keep_memory_bounded(served):
    m, server = served

    def cycles(n, auth):
        for _ in range(n):
            if auth:
                link = managers._Link(m.address, KEY, None)
                link.call((managers.OP_SERVICE, "dummy", ()))
                link.close()
            else:
                _raw(m.address, b"", read=False)

    cycles(200, False)
    cycles(100, True)
    before = _rss_kib(server.pid)
    cycles(2000, False)
    cycles(500, True)
    after = _rss_kib(server.pid)
    assert after - before < 16 * 1024, (before, after)
    assert m.dict(ok=1)["ok"] == 1


def test_silent_clients_are_dropped_at_the_deadline(served):
    m, server = served
    socks = [socket.create_connection(m.address) for _ in range(5)]
    try:
        for s in socks:
            s.settimeout(WAIT)
            data = s.recv(4096)  # the challenge
            assert b"#CHALLENGE#" in data
            while data:
                data = s.recv(4096)  # then EOF once the deadline passed
    finally:
        for s in socks:
            s.close()
    assert m.dict(ok=1)["ok"] == 1


# -- TLS ---------------------------------------------------------------------------------------------------

def _fds_and_threads(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def test_wake_up_header_has_a_code_of_its_own():
    """The server's wake-up of a piped reader is not a header gilfree.connection uses (-2 is its
    out-of-band message): a reader that sees -2 on a manager pipe calls it a bad header, not a wake-up."""
    code = struct.unpack("!i", managers._WAKE)[0]
    assert code < 0 and code not in (-1, -2, -3, connection._FDS_NEXT, connection._RELEASED)
    r, w = os.pipe()
    chan = managers._Channel(socket.socket(socket.AF_UNIX), "test")
    chan.use_pipes(r, os.dup(w))
    try:
        os.write(w, managers._WAKE)
        with pytest.raises(EOFError, match="closed by this end"):
            chan.recv_bytes()
        os.write(w, struct.pack("!i", -2) + struct.pack("!IQ", 1, 8))
        with pytest.raises(OSError, match="bad message header"):
            chan.recv_bytes()
    finally:
        chan.close()
        os.close(w)


def test_unix_clients_use_pipes_and_hostile_frames_on_them_are_harmless():
    """A Unix-socket client moves to pipes after HELLO; junk sent down the pipe (a bad header, a corrupt
    pickle, the server's own wake-up header) costs only that connection; connect/close cycles leave
    no thread or descriptor behind (the server wakes a piped reader when its client hangs up); and the
    server stops while piped clients are connected."""
    ctx = gilfree.get_context("fork")
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_serve_in_child, args=(SyncManager, None, KEY, {}, w))
    p.start()
    w.close()
    address = r.recv()
    m = SyncManager(address, KEY)
    m.connect()
    try:
        d = m.dict()
        d["a"] = 1
        assert m._link()._chans[threading.get_ident()].piped
        for junk in (struct.pack("!i", -5), struct.pack("!i", 5) + b"\x80\x05garb", managers._WAKE,
                     struct.pack("!i", -2) + struct.pack("!IQ", 1, 8)):
            link = managers._Link(m.address, KEY, None)
            chan = link.channel()
            assert chan.piped
            chan.write_all(junk)
            if junk.endswith(b"garb"):  # a frame whose pickle is corrupt is answered; a bad header drops the link
                assert managers.reduction.loads(chan.recv_bytes())[0] == managers.R_REMOTE
            link.close()
        assert d["a"] == 1

        def cycles(n):
            for _ in range(n):
                link = managers._Link(m.address, KEY, None)
                link.call((managers.OP_SERVICE, "dummy", ()))
                link.close()

        cycles(20)
        time.sleep(0.3)  # settled: the server has started its thread for the next connection (SPARE_AFTER)
        assert _until(lambda: _fds_and_threads(p.pid) == _fds_and_threads(p.pid))
        before = _fds_and_threads(p.pid)
        cycles(200)
        assert _until(lambda: _fds_and_threads(p.pid) <= before), (before, _fds_and_threads(p.pid))
        assert m.dict(ok=1)["ok"] == 1
        # a client that dies: its references go (its pipe shows no EOF; the server is told by the socket)
        n = m._number_of_objects()
        c = ctx.Process(target=_child_makes_objects_and_dies, args=(m.address, KEY))
        c.start()
        c.join(WAIT)
        assert _until(lambda: m._number_of_objects() == n)
        # the server stops with piped clients connected (each thread woken): serve_forever returns
        m._link().call((managers.OP_SERVICE, "shutdown", ()))
        p.join(WAIT)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()
            p.join()
        m.shutdown()


def _make_certs(tmp: Path) -> dict:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make test certificates")

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=gilfree test CA")
    (tmp / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    # evil.example: a certificate the same CA signed for another machine (what an attacker may hold)
    (tmp / "evil.cnf").write_text("subjectAltName=DNS:evil.example\n")
    for name, ext in (("server", "ext.cnf"), ("client", "ext.cnf"), ("evil", "evil.cnf")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", ext)
    return {n: str(tmp / n) for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key",
                                      "evil.pem", "evil.key")}


def test_tls_with_client_certificates(tmp_path):
    c = _make_certs(tmp_path)
    server_tls = TLSConfig(c["server.pem"], c["server.key"], cafile=c["ca.pem"], server_hostname="localhost")
    ctx = gilfree.get_context("fork")
    with SyncManager(("127.0.0.1", 0), KEY, ctx=ctx, tls=server_tls) as m:
        # the manager itself is a client of its server: it verifies the server, presents the same cert
        d = m.dict(a=1)
        assert d["a"] == 1
        with running(ctx, _child_appends, m.list(), 2) as p:
            p.join(WAIT)
        assert p.exitcode == 0
        good = SyncManager(m.address, KEY, tls=TLSConfig(c["client.pem"], c["client.key"], c["ca.pem"], "localhost"))
        good.connect()
        assert good.dict(b=2)["b"] == 2
        no_cert = SyncManager(m.address, KEY, tls=TLSConfig(cafile=c["ca.pem"], server_hostname="localhost"))
        with pytest.raises((OSError, EOFError, gilfree.AuthenticationError)):
            no_cert.connect()
        plain = SyncManager(m.address, KEY)
        with pytest.raises((OSError, EOFError, gilfree.AuthenticationError)):
            plain.connect()
        untrusting = SyncManager(m.address, KEY, tls=TLSConfig(c["client.pem"], c["client.key"], server_hostname="localhost"))
        with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
            untrusting.connect()
        assert d["a"] == 1
        good.shutdown()


def test_tls_config_check_hostname_travels():
    tls = TLSConfig("c.pem", "k.pem", "ca.pem", check_hostname=False)
    assert repr(tls) == "TLSConfig(certfile='c.pem', keyfile='k.pem', cafile='ca.pem', check_hostname=False)"
    copy = pickle.loads(pickle.dumps(tls))
    assert copy == tls and hash(copy) == hash(tls) and copy.check_hostname is False
    assert TLSConfig("c.pem") != TLSConfig("c.pem", check_hostname=False)
    assert TLSConfig().check_hostname is True
    assert TLSConfig().hostname_for(("127.0.0.1", 5)) == "127.0.0.1"
    assert TLSConfig(server_hostname="db.example").hostname_for(("10.0.0.1", 5)) == "db.example"


def test_tls_checks_the_hostname_by_default(tmp_path):
    # the server's certificate names only evil.example: signed by the right CA, made for another machine
    c = _make_certs(tmp_path)
    server_tls = TLSConfig(c["evil.pem"], c["evil.key"], cafile=c["ca.pem"], server_hostname="evil.example")
    with SyncManager(("127.0.0.1", 0), KEY, ctx=gilfree.get_context("fork"), tls=server_tls) as m:
        port = m.address[1]
        for host in ("127.0.0.1", "localhost"):
            client = SyncManager((host, port), KEY, tls=TLSConfig(c["client.pem"], c["client.key"], c["ca.pem"]))
            with pytest.raises(ssl.SSLCertVerificationError, match=f"does not name '{host}'.*check_hostname=False"):
                client.connect()
        # the name the certificate holds, given explicitly: accepted
        named = SyncManager(m.address, KEY, tls=TLSConfig(c["client.pem"], c["client.key"], c["ca.pem"], "evil.example"))
        named.connect()
        assert named.dict(a=1)["a"] == 1
        # the explicit opt-out: any certificate the CA signed
        unchecked = SyncManager(m.address, KEY, tls=TLSConfig(c["client.pem"], c["client.key"], c["ca.pem"],
                                                              check_hostname=False))
        unchecked.connect()
        assert unchecked.list([2])[0] == 2
        named.shutdown()
        unchecked.shutdown()


class _TLSRelay:
    """A man in the middle: accepts TLS with the evil.example certificate, opens its own TLS connection
    (with a client certificate the CA signed) to ``target``, and pipes the decrypted bytes both ways."""

    def __init__(self, target, certs):
        self.target = target
        self.downstream = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.downstream.load_cert_chain(certs["evil.pem"], certs["evil.key"])
        self.upstream = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.upstream.load_verify_locations(certs["ca.pem"])
        self.upstream.load_cert_chain(certs["client.pem"], certs["client.key"])
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.address = self.listener.getsockname()
        self.stop = threading.Event()
        self.relayed = 0  # connections piped both ways
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._pipe, args=(sock,), daemon=True)
            self.threads.append(t)
            t.start()

    def _pipe(self, sock):
        down = up = None
        try:
            sock.settimeout(WAIT)
            down = self.downstream.wrap_socket(sock, server_side=True)
            up = self.upstream.wrap_socket(socket.create_connection(self.target, timeout=WAIT), server_hostname="localhost")
            down.setblocking(False)
            up.setblocking(False)
            self.relayed += 1
            other = {down: up, up: down}
            while not self.stop.is_set():
                ready, _, _ = select.select([down, up], [], [], 0.1)
                for src in set(ready) | {s for s in (down, up) if s.pending()}:
                    try:
                        data = src.recv(65536)
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        continue
                    if not data:
                        return
                    self._send(other[src], data)
        except (OSError, ValueError):
            return
        finally:
            for s in (down, up, sock):
                if s is not None:
                    s.close()

    def _send(self, dst, data):
        view = memoryview(data)
        while view:
            try:
                view = view[dst.send(view):]
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                select.select([dst], [dst], [], 0.1)

    def close(self):
        self.stop.set()
        self.listener.close()
        for t in self.threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in self.threads)


def _relayed_client(relay, c):
    # check_hostname=False: the only setting in which a certificate for evil.example is accepted
    return SyncManager(relay.address, KEY, tls=TLSConfig(c["client.pem"], c["client.key"], c["ca.pem"], check_hostname=False))


def test_tls_authentication_is_bound_to_the_channel(tmp_path):
    c = _make_certs(tmp_path)
    ctx = gilfree.get_context("fork")
    server_tls = TLSConfig(c["server.pem"], c["server.key"], cafile=c["ca.pem"])  # client certificates required
    # control: with bindings left out on both ends (the server forked while patched), the relay passes
    # the handshake and then reads and writes every pickle -- so the relay below is a working one
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(connection, "channel_binding", lambda sock, certfile=None: b"")
        with SyncManager(("127.0.0.1", 0), KEY, ctx=ctx, tls=server_tls) as unbound:
            relay = _TLSRelay(unbound.address, c)
            try:
                victim = _relayed_client(relay, c)
                victim.connect()
                assert victim.dict(a=1)["a"] == 1
                assert relay.relayed == 1
            finally:
                managers._forget_link(relay.address, KEY)
                relay.close()
    with SyncManager(("127.0.0.1", 0), KEY, ctx=ctx, tls=server_tls) as m:
        d = m.dict(a=1)
        relay = _TLSRelay(m.address, c)
        try:
            victim = _relayed_client(relay, c)
            with pytest.raises(gilfree.AuthenticationError, match="did not match this TLS connection.*TLS-terminating proxy"):
                victim.connect()
            assert relay.relayed == 1  # the relay did connect to the server: the handshake, not TLS, failed
        finally:
            managers._forget_link(relay.address, KEY)
            relay.close()
        # the server survives, and serves a good client (and the manager's own proxies) afterwards
        good = SyncManager(m.address, KEY, tls=TLSConfig(c["client.pem"], c["client.key"], c["ca.pem"]))
        good.connect()
        assert good.dict(b=2)["b"] == 2
        assert d["a"] == 1
        good.shutdown()


def _handshake_with_bindings(server_binding, client_binding):
    """The manager's handshake over a pipe with these bindings: what each end said ("welcomed" or its error)."""
    r, w = gilfree.Pipe()
    result = []

    def serve():
        try:
            connection.deliver_challenge(r, KEY, WAIT, binding=server_binding)
            result.append("welcomed")
        except gilfree.AuthenticationError as exc:
            result.append(str(exc))

    t = threading.Thread(target=serve)
    t.start()
    try:
        connection.answer_challenge(w, KEY, WAIT, binding=client_binding)
        client = "welcomed"
    except gilfree.AuthenticationError as exc:
        client = str(exc)
    finally:
        t.join(WAIT)
        r.close()
        w.close()
    assert not t.is_alive()
    return result[0], client


def test_channel_binding(tmp_path):
    c = _make_certs(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(c["server.pem"], c["server.key"])
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(c["ca.pem"])

    def tls_pair(version):
        a, b = socket.socketpair()
        a.settimeout(WAIT)
        b.settimeout(WAIT)
        server_ctx.maximum_version = version
        out = []
        t = threading.Thread(target=lambda: out.append(server_ctx.wrap_socket(a, server_side=True)))
        t.start()
        client = client_ctx.wrap_socket(b, server_hostname="localhost")
        t.join(WAIT)
        return out[0], client

    plain = socket.socket()
    assert connection.channel_binding(plain) == b""
    plain.close()
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        s1, c1 = tls_pair(version)
        s2, c2 = tls_pair(version)
        try:
            assert c1.version() == version.name.replace("v1_", "v1.")
            b1, b2 = connection.channel_binding(c1), connection.channel_binding(c2)
            # the same on both ends of one connection, different on another connection
            assert b1 == connection.channel_binding(s1, c["server.pem"])
            assert b2 == connection.channel_binding(s2, c["server.pem"])
            assert b1 != b2
            # ... and it names the server's certificate: another certificate gives another binding
            assert b1 != connection.channel_binding(s1, c["evil.pem"])
            with pytest.raises(ValueError, match="certfile"):
                connection.channel_binding(s1)
            # the handshake with bindings: equal ones pass, unequal ones fail on both ends
            assert _handshake_with_bindings(b1, b1) == ("welcomed", "welcomed")
            server, client = _handshake_with_bindings(b1, b2)
            assert "answered for another TLS connection" in server
            assert "did not match this TLS connection" in client
        finally:
            for s in (s1, c1, s2, c2):
                s.close()


def test_tls_refuses_unix_addresses(tmp_path):
    with pytest.raises(ValueError, match="TLS is for TCP addresses only"):
        SyncManager("/tmp/x.sock", KEY, tls=TLSConfig("c", "k"))


# -- SharedMemoryManager, Pool -------------------------------------------------------------------------------

def test_shared_memory_manager(ctx):
    names = []
    with managers.SharedMemoryManager(ctx=ctx) as smm:
        shm = smm.SharedMemory(64)
        shm.buf[:3] = b"abc"
        sl = smm.ShareableList([1, "two", 3.0])
        names = [shm.name, sl.shm.name]
        assert sorted(smm._service("list_segments")) == sorted(names)
        attached = gilfree.shared_memory.SharedMemory(shm.name)
        assert bytes(attached.buf[:3]) == b"abc"
        attached.close()
        assert list(gilfree.shared_memory.ShareableList(name=sl.shm.name)) == [1, "two", 3.0]
        shm.close()
        sl.shm.close()
    for name in names:
        assert not os.path.exists(f"/dev/shm/{name}")


def test_pool_through_the_manager():
    # SyncManager.Pool is registered as 'gilfree.pool:Pool', resolved in the server when first created
    with gilfree.get_context("fork").Manager() as m:
        with m.Pool(2) as pool:
            assert pool.map(abs, [-1, -2, 3]) == [1, 2, 3]
            res = pool.apply_async(abs, (-5,))
            assert res.get(timeout=WAIT) == 5
            assert sorted(pool.imap_unordered(abs, [-1, -2])) == [1, 2]


# -- a manager across network namespaces ---------------------------------------------------------------------

NETNS_SERVER = """
import queue, sys
from gilfree.cli import main
_d, _q = {}, queue.Queue()
def get_dict():
    return _d
def get_queue():
    return _q
sys.exit(main(["manager", "serve", "--address", "10.231.0.1:0", "--authkey-file", sys.argv[1],
               "--register", "shared_dict=__main__:get_dict", "--register", "queue_box=__main__:get_queue"]))
"""

NETNS_CLIENT = """
import os, sys, gilfree
from gilfree.cli import authkey_from_file
from gilfree.managers import SyncManager
SyncManager.register("shared_dict")
SyncManager.register("queue_box")
host, port, keyfile, role = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
key = authkey_from_file(keyfile)
m = SyncManager((host, port), key)
try:
    m.connect()
except gilfree.AuthenticationError as exc:
    print("refused:", exc)
    sys.exit(0)
if role == "writer":
    m.shared_dict().update(writer=os.getpid())
    m.queue_box().put(("from writer", os.getpid()))
    print("wrote")
else:
    item = m.queue_box().get(timeout=30)
    print("got", item[0], "and", sorted(m.shared_dict().keys()))
"""


def test_manager_across_network_namespaces(netns, tmp_path):
    server_ns, ns_a, ns_b = netns
    keyfile = tmp_path / "key"
    keyfile.write_bytes(KEY + b"\n")  # a text key: the newline is dropped (see gilfree.cli.authkey_from_file)
    keyfile.chmod(0o600)
    wrongfile = tmp_path / "wrong"
    wrongfile.write_bytes(b"wrong key\n")
    server_py = tmp_path / "server.py"
    server_py.write_text(NETNS_SERVER)
    client_py = tmp_path / "client.py"
    client_py.write_text(NETNS_CLIENT)
    env = dict(os.environ, PYTHONPATH=SRC)
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, sys.executable, str(server_py), str(keyfile)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stderr.readline()
        before = ""
        while line and "serving on" not in line:
            before += line
            line = server.stderr.readline()
        assert "serving on 10.231.0.1:" in line, line
        # no TLS on an address that is not loopback: a warning before the "serving on" line
        assert "NOT ENCRYPTED: listening on 10.231.0.1:" in before and "travels in clear" in before, before
        port = re.search(r"serving on 10\.231\.0\.1:(\d+)", line).group(1)

        def client(ns, key, role):
            return subprocess.run(["ip", "netns", "exec", ns, sys.executable, str(client_py), "10.231.0.1", port,
                                   str(key), role], capture_output=True, text=True, env=env, timeout=60)

        w = client(ns_a, keyfile, "writer")
        assert w.returncode == 0 and w.stdout.strip() == "wrote", w.stderr
        r = client(ns_b, keyfile, "reader")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "got from writer and ['writer']"
        bad = client(ns_b, wrongfile, "reader")
        assert bad.stdout.startswith("refused: digest"), (bad.stdout, bad.stderr)
        # the addresses exist only inside the namespaces
        assert subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout.count("10.231.0.") == 0
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            _, err = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            _, err = server.communicate()
    assert server.returncode == 0, err
    assert "refused" in err and "digest" in err
    assert "stopped (SIGTERM)" in err


def test_token_pickles():
    t = Token("dict", ("127.0.0.1", 5), "a")
    assert gilfree.reduction.loads(gilfree.reduction.dumps(t)) == t
