"""Descriptors off a descriptor channel (gilfree.resource_sharer) and reduction's fd-passing API.

A Connection or socket pickled where no ``SCM_RIGHTS`` channel is (a one-way pipe, a queue, a plain
``pickle.dumps``) is held by the sender's resource sharer until one receiver takes it, or until
``SHARE_TTL`` passes.  ``reduction.send_handle``/``recv_handle``/``sendfds``/``recvfds`` speak the
stdlib's wire format; ``recvfds`` keeps no descriptor it did not ask for.  Where the stdlib behaves
the same, the same scenario runs on both.
"""

from __future__ import annotations

import array
import multiprocessing as std_mp
import multiprocessing.connection as std_conn
import multiprocessing.reduction as std_reduction
import os
import pickle
import socket
import threading
import time

import pytest

import gilfree
from gilfree import reduction, resource_sharer, util
from gilfree.connection import Connection, Pipe

T = 10.0


def open_fds() -> set[int]:
    listed = {int(x) for x in os.listdir("/proc/self/fd")}
    still = set()
    for fd in listed:
        try:
            os.fstat(fd)
        except OSError:
            continue
        still.add(fd)
    return still


def recv_within(conn, timeout: float = T):
    assert conn.poll(timeout), "nothing arrived"
    return conn.recv()


@pytest.fixture(autouse=True)
def _sharer_stopped():
    yield
    resource_sharer.stop(T)
    assert resource_sharer._sharer.table == {}


def closed_all(*objs):
    for o in objs:
        o.close()


# --------------------------------------------------------------------------------------------------
# within one process

@pytest.mark.parametrize("payload", ["one-way end", "duplex end", "in a list with a lambda", "socket"])
def test_one_way_pipe_carries_descriptors(payload):
    r, w = Pipe(duplex=False)
    r2, w2 = Pipe(duplex=False)
    a, b = Pipe()
    s1, s2 = socket.socketpair()
    try:
        obj = {"one-way end": w2, "duplex end": a, "socket": s1, "in a list with a lambda": [1, lambda: 2, w2]}[payload]
        w.send(obj)
        got = recv_within(r)
        if payload == "in a list with a lambda":
            assert got[0] == 1 and got[1]() == 2
            got = got[2]
        assert resource_sharer._sharer.table == {}, "the failed tier-1 attempt shared nothing that stays"
        if payload == "socket":
            got.sendall(b"via the sharer")
            assert s2.recv(100) == b"via the sharer"
        elif payload == "duplex end":
            got.send("x")
            assert recv_within(b) == "x"
        else:
            got.send_bytes(b"ok")
            assert r2.recv_bytes() == b"ok"
        assert got.fileno() != obj.fileno() if not isinstance(obj, list) else True
        got.close()
    finally:
        closed_all(r, w, r2, w2, a, b, s1, s2)


def test_plain_pickle_is_one_shot_and_unclaimed_ones_expire(monkeypatch):
    r, w = Pipe(duplex=False)
    try:
        data = pickle.dumps(w)
        again = pickle.loads(data)
        with pytest.raises(OSError, match="received already or expired"):
            pickle.loads(data)
        again.close()
        monkeypatch.setattr(resource_sharer, "SHARE_TTL", 0.3)
        before = open_fds()
        data = pickle.dumps(w)
        shared = {fd for fd, _ in resource_sharer._sharer.table.values()}
        assert len(shared) == 1 and shared <= open_fds() - before, "the sharer holds one duplicate"
        deadline = time.monotonic() + T
        while open_fds() & shared and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not open_fds() & shared, "an unclaimed descriptor outlived SHARE_TTL"
        with pytest.raises(OSError, match="received already or expired"):
            pickle.loads(data)
    finally:
        closed_all(r, w)


def test_pickles_made_outside_a_dump_keep_no_record():
    # the record of what a dump shared (to revoke it if the dump fails) exists only during the dump:
    # a queue's C fast path or a plain pickle.dumps must not grow it message after message
    r, w = Pipe(duplex=False)
    q = gilfree.Queue()
    try:
        for _ in range(3):
            q.put(w)
            pickle.loads(pickle.dumps(w)).close()
        for _ in range(3):
            q.get(timeout=T).close()
        assert reduction._chan.shared == [] and reduction._chan.depth == 0
        assert resource_sharer._sharer.table == {}
    finally:
        q.close()
        closed_all(r, w)


def _sharer_threads():
    return [t for t in threading.enumerate() if t.name == "gilfree-resource-sharer"]


def test_the_sharer_thread_ends_when_nothing_is_out_and_comes_back():
    r, w = Pipe(duplex=False)
    try:
        for round_ in range(2):
            data = pickle.dumps(w)
            assert len(_sharer_threads()) == 1
            pickle.loads(data).close()
            deadline = time.monotonic() + resource_sharer.IDLE_EXIT + T
            while _sharer_threads() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _sharer_threads(), f"round {round_}: the idle sharer thread stayed"
            assert resource_sharer._sharer.listener is None
    finally:
        closed_all(r, w)


# --------------------------------------------------------------------------------------------------
# between processes

def _child_uses(q, out):
    conn = q.get(timeout=T)
    sock = q.get(timeout=T)
    conn.send_bytes(b"through the conn")
    sock.sendall(b"through the socket")
    conn.close()
    sock.close()
    out.put("done")


@pytest.mark.parametrize("impl", ["stdlib", "gilfree"])
def test_queue_carries_connection_and_socket_to_a_child(method, impl):
    mp = (std_mp if impl == "stdlib" else gilfree).get_context(method)
    q, out = mp.Queue(), mp.Queue()
    r, w = mp.Pipe(duplex=False)
    s1, s2 = socket.socketpair()
    p = mp.Process(target=_child_uses, args=(q, out))
    p.start()
    try:
        q.put(w)
        q.put(s2)
        assert r.poll(T)
        assert r.recv_bytes() == b"through the conn"
        s1.settimeout(T)
        assert s1.recv(100) == b"through the socket"
        assert out.get(timeout=T) == "done"
    finally:
        p.join(T)
        closed_all(r, w, s1, s2)
        if impl == "stdlib":
            from multiprocessing import resource_sharer as std_rs

            std_rs.stop(T)
        q.close()
        out.close()
    assert p.exitcode == 0


def _put_and_return(q, out, w):
    q.put(w)
    out.put("put")


def test_sender_that_returns_at_once_still_delivers(ctx):
    # the child is exiting (or gone) when the parent reads: its sharer waits EXIT_LINGER for us
    q, out = ctx.Queue(), ctx.Queue()
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_put_and_return, args=(q, out, w))
    p.start()
    try:
        assert out.get(timeout=T) == "put"
        time.sleep(0.5)
        got = q.get(timeout=T)
        got.send_bytes(b"delivered")
        assert r.recv_bytes() == b"delivered"
        got.close()
        p.join(T)
        assert p.exitcode == 0
    finally:
        p.join(T)
        closed_all(r, w)
        q.close()
        out.close()


def _pickle_and_exit(conn, w):
    conn.send_bytes(pickle.dumps(w))  # the sharer holds w's duplicate; then this process ends


def test_sender_exited_first_is_a_clear_error(ctx):
    a, b = ctx.Pipe()
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_pickle_and_exit, args=(b, w))
    p.start()
    try:
        assert a.poll(T)
        data = a.recv_bytes()
        p.join(T)
        with pytest.raises(OSError, match=f"pid {p.pid}.*exited"):
            pickle.loads(data)
    finally:
        p.join(T)
        closed_all(a, b, r, w)


def _claim_twice(conn, data):
    real = pickle.loads(data)
    real.close()
    try:
        pickle.loads(data)
        conn.send("second load worked")
    except OSError as e:
        conn.send(f"second: {e}")


def _forged_key(conn, address, pid):
    fake = resource_sharer.SharedFd(address, os.urandom(16), pid)
    try:
        fake.detach()
        conn.send("forged key got a descriptor")
    except OSError as e:
        conn.send(f"forged: {e}")


def test_key_is_one_shot_and_a_forged_key_gets_nothing(ctx):
    a, b = ctx.Pipe()
    r, w = ctx.Pipe(duplex=False)
    try:
        data = pickle.dumps(w)
        shared = resource_sharer._sharer
        p = ctx.Process(target=_forged_key, args=(b, shared.address, os.getpid()))
        p.start()
        assert "forged: " in recv_within(a)
        p.join(T)
        assert len(shared.table) == 1, "the real entry is untouched by a forged request"
        p = ctx.Process(target=_claim_twice, args=(b, data))
        p.start()
        assert recv_within(a).startswith("second: ")
        p.join(T)
        assert shared.table == {}
    finally:
        closed_all(a, b, r, w)


def _claim_as_nobody(conn, data):
    os.setgid(65534)
    os.setuid(65534)
    try:
        pickle.loads(data)
        conn.send("another user got the descriptor")
    except OSError as e:
        conn.send(f"refused: {e}")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_user_with_the_right_key_gets_nothing():
    # an abstract socket has no file permissions: the sharer checks the peer's uid itself
    ctx = gilfree.get_context("fork")
    a, b = ctx.Pipe()
    r, w = ctx.Pipe(duplex=False)
    try:
        data = pickle.dumps(w)
        p = ctx.Process(target=_claim_as_nobody, args=(b, data))
        p.start()
        assert recv_within(a).startswith("refused: ")
        p.join(T)
        assert len(resource_sharer._sharer.table) == 1, "the entry is still there for its receiver"
        pickle.loads(data).close()
    finally:
        closed_all(a, b, r, w)


def test_forked_child_starts_with_an_empty_table():
    r, w = Pipe(duplex=False)
    a, b = Pipe()
    try:
        data = pickle.dumps(w)
        ((dup, _),) = resource_sharer._sharer.table.values()
        ctx = gilfree.get_context("fork")
        p = ctx.Process(target=_report_table, args=(b, dup))
        p.start()
        assert recv_within(a) == ({}, False)
        p.join(T)
        assert p.exitcode == 0
        pickle.loads(data).close()  # still the parent's to hand out
    finally:
        closed_all(r, w, a, b)


def _report_table(conn, dup):
    try:
        os.fstat(dup)
        held = True
    except OSError:
        held = False
    conn.send((resource_sharer._sharer.table, held))


# --------------------------------------------------------------------------------------------------
# send_handle / recv_handle / sendfds / recvfds (the stdlib's wire format)

def _write_through_handle(conn, impl, data):
    fd = (std_reduction if impl == "stdlib" else reduction).recv_handle(conn)
    os.write(fd, data)
    os.close(fd)


@pytest.mark.parametrize("impl", ["stdlib", "gilfree"])
def test_send_handle_to_a_child(method, impl, tmp_path):
    mp = (std_mp if impl == "stdlib" else gilfree).get_context(method)
    mod = std_reduction if impl == "stdlib" else reduction
    assert mod.HAVE_SEND_HANDLE
    conn, child_conn = mp.Pipe()
    p = mp.Process(target=_write_through_handle, args=(child_conn, impl, b"written by the child"))
    p.start()
    path = tmp_path / "f"
    with open(path, "wb") as f:
        mod.send_handle(conn, f.fileno(), p.pid)
        p.join(T)
    assert p.exitcode == 0
    assert path.read_bytes() == b"written by the child"
    conn.close()
    child_conn.close()


@pytest.mark.parametrize("sender", ["stdlib", "gilfree"])
def test_handles_interoperate_with_the_stdlib(sender):
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        (std_reduction if sender == "stdlib" else reduction).send_handle(a, w, 0)
        got = (reduction if sender == "stdlib" else std_reduction).recv_handle(b)
        os.write(got, b"x")
        os.close(got)
        assert os.read(r, 1) == b"x"
    finally:
        closed_all(a, b)
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("impl", ["stdlib", "gilfree"])
def test_recv_handle_without_a_descriptor_raises(impl):
    mod = std_reduction if impl == "stdlib" else reduction
    a, b = socket.socketpair()
    with a, b:
        a.send(b"\0")
        with pytest.raises(RuntimeError):
            mod.recv_handle(b)
        a.close()
        with pytest.raises(EOFError):
            mod.recvfds(b, 1)


def test_recvfds_keeps_no_descriptor_it_did_not_ask_for():
    a, b = socket.socketpair()
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(5)]
    try:
        before = open_fds()
        # more than asked for: the kernel drops what does not fit, we close what did
        a.sendmsg([b"\x05"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        with pytest.raises(RuntimeError):
            reduction.recvfds(b, 2)
        assert open_fds() == before
        # the right count with the wrong count byte: closed too
        a.sendmsg([b"\x07"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds[:2]))])
        with pytest.raises(RuntimeError):
            reduction.recvfds(b, 2)
        assert open_fds() == before
        with pytest.raises(ValueError):
            reduction.recvfds(b, 10**6)  # no unbounded ancillary buffer
        reduction.sendfds(a, fds[:3])
        got = reduction.recvfds(b, 3)
        assert len(got) == 3 and all(not os.get_inheritable(fd) for fd in got)
        for fd in got:
            os.close(fd)
    finally:
        closed_all(a, b)
        for fd in fds:
            os.close(fd)


# --------------------------------------------------------------------------------------------------
# abstract Unix sockets; a Connection over a descriptor not open yet

@pytest.mark.parametrize("impl", ["stdlib", "gilfree"])
def test_listener_on_an_abstract_socket(impl):
    conn_mod = std_conn if impl == "stdlib" else gilfree.connection
    util_mod = std_mp.util if impl == "stdlib" else util
    assert util_mod.abstract_sockets_supported
    name = "\0gilfree-test-" + os.urandom(4).hex()
    with conn_mod.Listener(name) as listener:
        assert listener.address == name.encode()
        with conn_mod.Client(listener.address) as client, listener.accept() as d:
            client.send(1729)
            assert d.recv() == 1729
    with pytest.raises(OSError):
        listener.accept()
    assert not os.path.exists(name[1:])


@pytest.mark.parametrize("impl", ["stdlib", "gilfree"])
def test_connection_over_a_descriptor_not_open(impl):
    cls = std_conn.Connection if impl == "stdlib" else Connection
    conn = cls(44977608)
    try:
        conn.poll()
    except (ValueError, OSError):
        pass
    finally:
        conn._handle = None
    with pytest.raises((ValueError, OSError)):
        cls(-1)
