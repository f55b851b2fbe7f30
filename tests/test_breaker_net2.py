"""Second breaker round against the gate, the manager server and Listener (issue 13's promises).

Each test is a defect found by attacking them (each one fails on the code it was written against);
the docstrings tell the defect as found.  Every test bounds itself (pytest-timeout, socket timeouts,
daemon threads joined with a timeout) and stops every process and closes every socket it opens.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
from _helpers import SRC
from test_manager_hostile import KEY

from gilfree import managers


def _env():
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))


TLS_SERVER = r"""
import signal, sys, threading
from gilfree import managers
certfile, keyfile, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
m = managers.SyncManager(("127.0.0.1", 0), %r, tls=managers.TLSConfig(certfile, keyfile))
server = m.get_server(handshake_timeout=timeout)
server.grow_fd_limit = True
signal.signal(signal.SIGTERM, lambda *a: server.stop())
print(repr(server.address), flush=True)
server.serve_forever()
print("stats", server.stats, server._gate.stats, flush=True)
""" % (KEY,)


class _TLSServed:
    """A TLS manager server in a process of its own."""

    def __init__(self, certs, timeout=10.0):
        self.proc = subprocess.Popen([sys.executable, "-c", TLS_SERVER, certs["server.pem"], certs["server.key"],
                                      str(timeout)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=_env())
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read()
        self.address = eval(line)
        self.pid = self.proc.pid
        self.output = None

    def rss_kib(self):
        with open(f"/proc/{self.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))

    def cpu_seconds(self):
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        if self.output is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.output = self.proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.output = self.proc.communicate()
        return self.output


@pytest.fixture
def certs(tmp_path):
    from test_managers import _make_certs

    return _make_certs(tmp_path)


def _client_hello() -> bytes:
    """A real TLS ClientHello, made once: an attacker replays it on every connection and does no crypto."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


# ---------------------------------------------------------------------------------------------------
# 1. The hang-up watcher thread outlives its server: stop() never wakes it.

@pytest.mark.timeout(40)
def test_a_stopped_server_leaves_no_watcher_thread():
    """Server._watch_loop blocks in self._epoll.poll() with no timeout and nothing that stop() writes to;
    _close_all() closes the epoll object, but closing an epoll descriptor does not wake a thread that
    waits in epoll_wait on it.  Once a client has connected and left (the watcher was started and is
    back in poll with nothing registered), stop() + serve_forever() returning leave the
    "gilfree-manager-watch" thread blocked for the life of the process, holding the Server (its
    object table, registry) and the kernel's epoll object: one leaked thread per server stopped in a
    long-lived process (a test suite, a program that runs get_server().serve_forever() in a thread)."""
    m = managers.SyncManager(("127.0.0.1", 0), KEY)
    server = m.get_server(handshake_timeout=3.0)
    runner = threading.Thread(target=server.serve_forever, daemon=True)
    runner.start()
    try:
        link = managers._Link(server.address, KEY, None)
        try:
            link.call((managers.OP_SERVICE, "dummy", ()))
        finally:
            link.close()
        time.sleep(0.3)  # its connection thread has ended: the watcher waits with nothing to watch
    finally:
        server.stop()
        runner.join(10)
    assert not runner.is_alive()

    def threads_of_server():
        return [t.name for t in threading.enumerate()
                if getattr(getattr(t, "_target", None), "__self__", None) is server]

    deadline = time.monotonic() + 3.0
    while threads_of_server() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threads_of_server() == [], "threads of a stopped server still running 3 s after serve_forever returned"


# ---------------------------------------------------------------------------------------------------
# 2. Unauthenticated TLS peers: 11 bytes each make the server allocate ~150 KiB each.

BIG_HELLO = r"""
import socket, struct, sys, time
address = eval(sys.argv[1]); count = int(sys.argv[2]); claim = int(sys.argv[3])
# a TLS record holding only the start of a ClientHello that claims `claim` bytes
body = bytes([1]) + claim.to_bytes(3, "big") + b"\x03\x03"
record = b"\x16\x03\x01" + struct.pack("!H", len(body)) + body
socks = []
for _ in range(count):
    s = socket.create_connection(address, timeout=5)
    s.sendall(record)
    socks.append(s)
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.timeout(60)
def test_unauthenticated_tls_peers_cannot_make_the_server_allocate_their_claims(certs):
    """The gate promises a few hundred bytes per unauthenticated peer and nothing allocated beyond
    256-byte plain frames; with TLS, Gate._advance (src/gilfree/_gate.py, the _TLS_PEEK step) checks
    only that the first byte is 0x16 and then hands every byte to OpenSSL's do_handshake().  OpenSSL
    grows its handshake buffer to the length a handshake message *claims* as soon as it has the
    4-byte header (up to 128 KiB for a ClientHello), and zeroes it.  One 11-byte record (a record header
    and a ClientHello header claiming 131,000 bytes) costs the server ~150 KiB resident; 400 peers ~60 MB,
    a full table (MAX_HANDSHAKES = 1024) ~160 MB, and glibc keeps most of it after they are gone.
    (A TLS peer that claims little still costs ~40 KiB: OpenSSL's SSL object and record buffers.)"""
    count = 400
    server = _TLSServed(certs, timeout=20.0)
    attacker = None
    try:
        before = server.rss_kib()
        attacker = subprocess.Popen([sys.executable, "-c", BIG_HELLO, repr(server.address), str(count), "131000"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert attacker.stdout.readline().strip() == "ready", attacker.stderr.read()
        time.sleep(2.0)  # the server has read every record
        grown = server.rss_kib() - before
    finally:
        if attacker is not None:
            attacker.kill()
            attacker.communicate()
        server.stop()
    per_peer = grown / count
    assert per_peer < 64, (f"{count} unauthenticated TLS peers that sent 11 bytes each grew the server by "
                           f"{grown / 1024:.0f} MiB ({per_peer:.0f} KiB each)")


# ---------------------------------------------------------------------------------------------------
# 3. A replayed-ClientHello flood from one machine keeps legitimate TLS clients out for seconds.

TLS_FLOOD = r"""
import collections, select, socket, struct, sys, time
address = eval(sys.argv[1]); keep = int(sys.argv[2]); seconds = float(sys.argv[3])
hello = bytes.fromhex(sys.argv[4])
linger = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT, no limit on the rate
live = collections.deque()
print("ready", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    batch = []
    for _ in range(100):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        s.setblocking(False)
        try:
            s.connect(address)
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            continue
        batch.append(s)
    _, writable, _ = select.select([], batch, [], 0.5)
    for s in batch:
        if s in writable:
            try:
                s.send(hello)
            except OSError:
                pass
        live.append(s)
    while len(live) > keep:
        live.popleft().close()
"""


@pytest.mark.timeout(60)
def test_a_tls_handshake_flood_does_not_delay_a_client_beyond_a_second(certs):
    """The attacker replays one recorded 517-byte ClientHello on fresh connections (no crypto on its
    side, closed with RST); for each, the server's gate thread runs a full server handshake in
    do_handshake(): key share and an RSA-2048 signature, ~0.5 ms of CPU each.  All of it runs in the one
    gate thread, ahead of accept(): Gate.step() first advances every ready peer (each one a handshake)
    and then accepts at most _ACCEPT_BATCH = 64 connections, and the listening socket's backlog is 128
    (Server.__init__: sock.listen(128)).  A few hundred hellos a second fill the backlog, the kernel
    drops the legitimate client's SYN, and the client's connect() waits for the SYN retransmission:
    1 s, then 3 s.  Measured: legitimate clients needing 1.09 s and 2.1 s while the attacker sent
    ~300 hellos/s; the group rule does not help (CPU, not the table, is what runs out)."""
    server = _TLSServed(certs, timeout=5.0)
    tls = managers.TLSConfig(cafile=certs["ca.pem"], server_hostname="localhost")
    attacker = None
    times = []
    try:
        attacker = subprocess.Popen([sys.executable, "-c", TLS_FLOOD, repr(server.address), "600", "25",
                                     _client_hello().hex()], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
        assert attacker.stdout.readline().strip() == "ready", attacker.stderr.read()
        time.sleep(2.0)
        cpu0, t0 = server.cpu_seconds(), time.monotonic()
        connects = []
        for _ in range(20):
            start = time.monotonic()
            socket.create_connection(server.address).close()  # a dropped SYN shows here: 1 s, then 3 s
            connects.append(round(time.monotonic() - start, 3))
            start = time.monotonic()
            link = managers._Link(server.address, KEY, tls)
            try:
                link.call((managers.OP_SERVICE, "dummy", ()))
            finally:
                link.close()
            times.append(round(time.monotonic() - start, 3))
            time.sleep(0.2)
        load = (server.cpu_seconds() - cpu0) / (time.monotonic() - t0)
    finally:
        if attacker is not None:
            attacker.kill()
            attacker.communicate()
        server.stop()
    # the listen queue never overflows (the gate accepts first, from a SOMAXCONN queue), and a client's
    # handshake waits its turn behind the attacker's in one thread: a CPU bound, so the time is a median
    # (on a machine whose other core is busy, single handshakes took up to 1.3 s at 41% of a core)
    # (one connect in 60 was seen to wait 1 s all the same: on loopback, under this churn of 4-tuples, a
    # SYN may meet the TIME_WAIT of an earlier connection on the same ports and be answered with an ACK)
    slow = [c for c in connects if c >= 0.9]
    assert len(slow) <= 2, f"connects waited for a SYN retransmission under a ClientHello flood: {connects}"
    assert sorted(times)[len(times) // 2] < 1.0, \
        f"legitimate TLS clients under a ClientHello flood: {times} (server CPU {load:.0%} of a core)"


@pytest.mark.timeout(30)
def test_close_ends_every_waiting_accept_with_listener_closed():
    """Listener.accept() checks `self._socket is None` before it takes _accept_lock, not after.  With two
    threads waiting in accept() and close() from a third, the thread that drove the gate raises
    OSError("listener is closed") and, in its finally, sets self._gate = None; the thread that waited
    for the lock then finds no gate and builds a new one on self._socket, which is None now:
    AttributeError("'NoneType' object has no attribute 'family'") from _gate.Gate.__init__
    (connection.py, Listener.accept: `gate = self._gate = _gate.Gate(self._socket, ...)`).  A server
    loop that stops on OSError (the usual `except OSError: break` once the listener is closed) dies
    with a traceback instead."""
    from gilfree.connection import Listener

    listener = Listener(("127.0.0.1", 0), authkey=KEY)
    errors = []

    def acceptor():
        try:
            listener.accept().close()
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    threads = [threading.Thread(target=acceptor, daemon=True) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.3)
    finally:
        listener.close()
        for t in threads:
            t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert len(errors) == 2 and all(isinstance(e, OSError) and "closed" in str(e) for e in errors), errors


# ---------------------------------------------------------------------------------------------------
# 6. select.select() on sockets: a process with more than 1,024 descriptors cannot use a manager.

MANY_FDS_CLIENT = r"""
import os, resource
from gilfree import managers
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
m = managers.SyncManager(("127.0.0.1", 0), %r)
m.start()
held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # a busy program: sockets, files
try:
    d = m.dict(a=1)
    print("served", d["a"], flush=True)
except Exception as exc:
    print("failed", type(exc).__name__, exc, flush=True)
finally:
    for fd in held:
        os.close(fd)
    m.shutdown()
""" % (KEY,)


@pytest.mark.timeout(60)
def test_a_client_with_more_than_1024_descriptors_can_use_a_manager():
    """_Link._connect (src/gilfree/managers/_client.py:164) waits for the server's challenge with
    select.select([sock], [], [], PROBE_AFTER) (the "are you TLS?" probe): select() cannot take a
    descriptor >= FD_SETSIZE (1024), so in any process that holds more than ~1,024 descriptors (a
    server, a crawler with a raised ulimit) every connection to a manager fails with
    ValueError("filedescriptor out of range in select()") -- the manager cannot be used at all."""
    out = subprocess.run([sys.executable, "-c", MANY_FDS_CLIENT], capture_output=True, text=True, timeout=50,
                         env=_env())
    assert "served 1" in out.stdout, (out.stdout, out.stderr[-1500:])


HIGH_FD_LISTENER = r"""
import os, resource, sys, threading, time
from gilfree import connection
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
listener = connection.Listener(("127.0.0.1", 0), authkey=%r, backlog=8)  # its descriptor is > 1024
result = []
def accept():
    try:
        result.append(listener.accept())
    except BaseException as exc:
        result.append(exc)
t = threading.Thread(target=accept, daemon=True)
t.start()
time.sleep(0.3)  # the gate is in place: now no descriptor is left
top = max(int(name) for name in os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
while True:
    try:
        held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        break
print(repr(listener.address), flush=True)
t.join(4)
print("accept", repr(result[0]) if result else "still waiting", flush=True)
""" % (KEY,)


@pytest.mark.timeout(60)
def test_emfile_with_a_listening_descriptor_above_1024_turns_the_newcomer_away():
    """Gate._out_of_descriptors (src/gilfree/_gate.py:277) asks select.select([self._listen_fd], ...)
    whether someone waits: with the listening socket at a descriptor >= 1024 (a Listener or an in-process
    Server made in a program with many descriptors open, the soft limit raised) that raises
    ValueError("filedescriptor out of range in select()") out of Gate.step: Listener.accept() raises it
    (the newcomer gets a reset instead of "the server is out of file descriptors"), and a manager's
    accept thread logs "accepting connections failed" every 50 ms while the connection stays queued."""
    from gilfree.connection import Client

    proc = subprocess.Popen([sys.executable, "-c", HIGH_FD_LISTENER], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        address = eval(line)
        with pytest.raises(Exception) as info:
            Client(address, authkey=KEY).close()
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "out of file descriptors" in str(info.value), repr(info.value)
    assert "accept still waiting" in out, (out, err[-1500:])
