"""TCP keepalive: a manager peer (or a Listener/Client peer) that vanishes without FIN or RST is noticed
(issue 13, item 5).

The network tests put a server and a client in two network namespaces joined by a veth pair, then cut
the pair: nothing either kernel sends reaches the other, as when a machine loses power or its network.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
from _helpers import SRC

from gilfree import connection
from gilfree.managers import SyncManager

KEY = b"test-keepalive-key"
#: timers for the tests: idle 1 s, a probe every 1 s, 2 probes, user timeout 3 s -> given up after 3 s
SHORT = (1, 1, 2, 3)
#: how long a test waits for the server to give a vanished client up (the bound is 3 s)
BOUND = 10.0


def _opts(sock):
    """SO_KEEPALIVE, TCP_NODELAY, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT, TCP_USER_TIMEOUT of ``sock``."""
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            *(sock.getsockopt(socket.IPPROTO_TCP, opt) for opt in (socket.TCP_NODELAY, socket.TCP_KEEPIDLE,
                                                                   socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT,
                                                                   socket.TCP_USER_TIMEOUT)))


# -- the settings ------------------------------------------------------------------------------------------

def test_keepalive_timers():
    t = connection._keepalive_timers
    assert t(25) == (10, 5, 3, 25.0) and connection._keepalive_bound(t(25)) == 25
    assert t((1, 1, 2, 3)) == t("1,1,2,3") == t(t((1, 1, 2, 3))) == (1, 1, 2, 3.0)
    assert t((10, 5, 3)) == (10, 5, 3, 25.0)
    for off in (None, False, 0, "off", "0", ""):
        assert t(off) is None
    with pytest.raises(ValueError):
        t((1, 2))
    # a user timeout longer than the probes: Linux gives up at the first probe due after it
    assert connection._keepalive_bound(t((10, 5, 3, 12))) == 15
    assert connection.KEEPALIVE == (10, 5, 3, 25.0)  # the default: a vanished peer is noticed within 25 s


def test_keepalive_environment_variable():
    code = "from gilfree import connection; print(connection.KEEPALIVE)"
    out = {}
    for value in ("off", "5", "2,1,4,6"):
        env = dict(os.environ, PYTHONPATH=SRC, GILFREE_TCP_KEEPALIVE=value)
        out[value] = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                    check=True).stdout.strip()
    assert out == {"off": "None", "5": "(2, 1, 3, 5.0)", "2,1,4,6": "(2, 1, 4, 6.0)"}


def test_listener_and_client_set_keepalive(monkeypatch):
    monkeypatch.setattr(connection, "KEEPALIVE", (3, 2, 5, 13.0))
    with connection.Listener(("127.0.0.1", 0), authkey=KEY) as listener:
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("conn", listener.accept()))
        t.start()
        client = connection.Client(listener.address, authkey=KEY)
        t.join()
        server = box["conn"]
        for conn in (client, server):
            s = socket.socket(fileno=conn.fileno())
            try:
                assert _opts(s) == (1, 1, 3, 2, 5, 13000)
            finally:
                s.detach()
        client.close()
        server.close()
    # Unix sockets are left alone
    with connection.Listener(None, "AF_UNIX") as listener:
        client = connection.Client(listener.address)
        server = listener.accept()
        s = socket.socket(fileno=client.fileno())
        try:
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        finally:
            s.detach()
        client.close()
        server.close()


@pytest.mark.parametrize("keepalive", [(2, 1, 4, 7), None])
def test_manager_sockets_set_keepalive(monkeypatch, keepalive):
    """Both ends of a manager's TCP connection: the server's accepted socket has the server's timers
    (None: the kernel's defaults, no keepalive), the client's the process's (connection.KEEPALIVE)."""
    monkeypatch.setattr(connection, "KEEPALIVE", (3, 2, 5, 13.0))
    m = SyncManager(("127.0.0.1", 0), KEY, keepalive=keepalive)
    server = m.get_server()
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        c = SyncManager(server.address, KEY)
        c.connect()
        d = c.dict(a=1)
        assert d["a"] == 1
        (ours,) = [chan.sock for chan in c._link()._all]
        assert _opts(ours) == (1, 1, 3, 2, 5, 13000)
        with server._lock:
            (theirs,) = list(server._conns)
        if keepalive is None:
            assert _opts(theirs)[:2] == (0, 1)
        else:
            assert _opts(theirs) == (1, 1, 2, 1, 4, 7000)
        del d
    finally:
        server.stop()
        t.join(10)
    assert not t.is_alive()


# -- across network namespaces: a peer that vanishes ----------------------------------------------------------

def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def veth():
    """Two network namespaces, server (10.232.0.1, device ``dev[0]``) and client (10.232.0.2, ``dev[1]``),
    joined by one veth pair: yields ``(server ns, client ns, (server dev, client dev))``."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    tag = f"gk{os.getpid() % 100000}"
    names, devs = [f"{tag}s", f"{tag}c"], [f"{tag}vs", f"{tag}vc"]
    try:
        probe = _ip("netns", "add", names[0], check=False)
        if probe.returncode != 0:
            pytest.skip(f"cannot create network namespaces here: {probe.stderr.strip()}")
        _ip("netns", "add", names[1])
        _ip("link", "add", devs[0], "type", "veth", "peer", "name", devs[1])
        for i, (ns, dev) in enumerate(zip(names, devs), start=1):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"10.232.0.{i}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield names[0], names[1], devs
    finally:
        for ns in names:
            _ip("netns", "del", ns, check=False)


#: The server: a SyncManager server with the keepalive given in argv[1] (JSON), logging to stderr;
#: each line on stdin is answered with its stats on stdout (the control loop makes no thread, no fd).
SERVER = """
import json, logging, sys, threading
from gilfree.managers import SyncManager
logging.basicConfig(level=logging.INFO, format="%(message)s")
ka = json.loads(sys.argv[1])
server = SyncManager(("10.232.0.1", 0), b"test-keepalive-key",
                     keepalive=tuple(ka) if ka else None).get_server(logger=logging.getLogger("srv"))
threading.Thread(target=server.serve_forever, daemon=True).start()
print(server.address[1], flush=True)
for line in sys.stdin:
    with server._lock:
        stats = dict(objects=len(server._objects), clients=len(server._clients), **server.stats,
                     names=sorted(t.name for t in threading.enumerate()))
    print(json.dumps(stats), flush=True)
"""

#: A client holding 5 objects, one of its threads blocked in Queue.get (a call running in the server);
#: with "leave", it creates them and exits.
CLIENT = """
import sys, threading, time
from gilfree.managers import SyncManager
m = SyncManager(("10.232.0.1", int(sys.argv[1])), b"test-keepalive-key")
m.connect()
held = [m.dict(a=1), m.list([1, 2]), m.Value("i", 3), m.Event(), m.Queue()]
if sys.argv[2] == "hold":
    threading.Thread(target=held[4].get, daemon=True).start()
    time.sleep(0.5)
    print("holding", flush=True)
    time.sleep(3600)
"""

#: A client whose call blocks (Queue.get) while the server's link goes down: prints how the call ended.
WAITER = """
import sys, time
from gilfree.managers import SyncManager
m = SyncManager(("10.232.0.1", int(sys.argv[1])), b"test-keepalive-key")
m.connect()
q = m.Queue()
print("calling", flush=True)
t0 = time.monotonic()
try:
    q.get()
    print("returned")
except Exception as exc:
    print(f"{time.monotonic() - t0:.2f} {type(exc).__name__}: {exc}", flush=True)
"""


class _ServerProc:
    def __init__(self, ns, tmp_path, keepalive):
        script = tmp_path / "server.py"
        script.write_text(SERVER)
        self.errfile = tmp_path / "server.err"
        with open(self.errfile, "w") as err:
            self.proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(script), json.dumps(keepalive)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                         env=dict(os.environ, PYTHONPATH=SRC))
        self.port = int(self.proc.stdout.readline())
        self.pid = self.proc.pid  # `ip netns exec` execs the program: this is the server's pid

    def stats(self):
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        stats = json.loads(self.proc.stdout.readline())
        with open(f"/proc/{self.pid}/status") as f:
            stats["threads"] = int(next(line for line in f if line.startswith("Threads:")).split()[1])
        stats["fds"] = len(os.listdir(f"/proc/{self.pid}/fd"))
        return stats

    def wait_for(self, pred, timeout):
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if pred(stats) or time.monotonic() > deadline:
                return stats
            time.sleep(0.1)

    def log(self):
        return self.errfile.read_text()

    def close(self):
        self.proc.kill()
        self.proc.communicate()


def _client(ns, tmp_path, source, port, *args, env=None):
    script = tmp_path / "client.py"
    script.write_text(source)
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(script), str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=SRC, **(env or {})))


def _vanish(veth, tmp_path, keepalive, wait):
    """A client holds 5 objects (one call blocked in the server), then its link goes down and it is
    killed; return (baseline, stats while held, stats after waiting up to ``wait`` s, seconds, log)."""
    server_ns, client_ns, (_, client_dev) = veth
    server = _ServerProc(server_ns, tmp_path, keepalive)
    try:
        # a first client comes and goes: the server's lasting threads exist from now on
        first = _client(client_ns, tmp_path, CLIENT, server.port, "leave")
        assert first.wait(30) == 0, first.communicate()
        base = server.wait_for(lambda s: s["clients"] == 0 and s["objects"] == 0, 10)
        assert base["clients"] == 0 and base["objects"] == 0, base
        time.sleep(0.2)
        base = server.stats()
        client = _client(client_ns, tmp_path, CLIENT, server.port, "hold")
        try:
            assert client.stdout.readline().strip() == "holding", client.communicate()
            # (the server starts a thread for the next connection once it is idle: wait for it)
            held = server.wait_for(lambda s: s["threads"] == base["threads"] + 2, 5)
            # no FIN, no RST: the client's link goes down first, then the client is killed
            _ip("-n", client_ns, "link", "set", client_dev, "down")
            client.kill()
            client.communicate()
            t0 = time.monotonic()
            after = server.wait_for(lambda s: s["objects"] == 0 and s["threads"] == base["threads"]
                                    and s["fds"] == base["fds"], wait)
            elapsed = time.monotonic() - t0
        finally:
            if client.poll() is None:
                client.kill()
                client.communicate()
        return base, held, after, elapsed, server.log()
    finally:
        server.close()


def test_vanished_client_objects_are_released(veth, tmp_path):
    base, held, after, elapsed, log = _vanish(veth, tmp_path, SHORT, BOUND)
    assert held["objects"] == 5 and held["clients"] == 1, held
    assert held["threads"] == base["threads"] + 2, (base["names"], held["names"])  # two connections: main thread, getter
    assert after["objects"] == 0 and after["clients"] == 0, (after, log)
    assert (after["threads"], after["fds"]) == (base["threads"], base["fds"]), (base, after)
    assert elapsed < BOUND, elapsed
    # both connections were given up by keepalive: the idle one by its thread, the busy one (Queue.get
    # running for it) by the hang-up watcher
    assert log.count("stopped answering (no answer to TCP keepalive for 3 s") == 2, log
    assert "while a call was running for it" in log, log
    assert "dropped its 5 references (5 objects released)" in log, log


def test_without_keepalive_a_vanished_client_is_held(veth, tmp_path):
    """The scenario above really sends nothing: without keepalive the server holds the client for good."""
    base, held, after, elapsed, log = _vanish(veth, tmp_path, None, 6.0)
    assert held["objects"] == 5
    assert after["objects"] == 5 and after["clients"] == 1, (after, log)
    assert after["threads"] == base["threads"] + 2


def test_call_to_vanished_server_raises(veth, tmp_path):
    """The server's link goes down while a call of the client blocks there: the call raises within
    the client's keepalive bound (GILFREE_TCP_KEEPALIVE), saying the manager stopped answering."""
    server_ns, client_ns, (server_dev, _) = veth
    server = _ServerProc(server_ns, tmp_path, SHORT)
    try:
        client = _client(client_ns, tmp_path, WAITER, server.port, env={"GILFREE_TCP_KEEPALIVE": "1,1,2,3"})
        try:
            assert client.stdout.readline().strip() == "calling", client.communicate()
            server.wait_for(lambda s: s["objects"] == 1, 10)
            time.sleep(0.5)  # the get is running in the server
            _ip("-n", server_ns, "link", "set", server_dev, "down")
            out, err = client.communicate(timeout=BOUND + 20)
        finally:
            if client.poll() is None:
                client.kill()
                client.communicate()
    finally:
        server.close()
    seconds, _, message = out.strip().partition(" ")
    assert float(seconds) < BOUND, (out, err)
    assert message.startswith(("TimeoutError: ", "OSError: ")), (out, err)
    assert "stopped answering for 3 s (TCP keepalive)" in message, (out, err)
    assert client.returncode == 0, err
