"""Who owns which shared-memory segment, and the process that cleans up after dead owners (layer L1).

::

    client: any process that creates tracked segments        tracker (spawned on first need)
    --------------------------------------------------        -------
    register(name), first time in this process:               serve(): poll(listener, clients,
      an inherited address answers: connect ──────────────────> │        pidfds of queue users)
                            <───────────────── b"W" welcome ─── │ accept; same uid? (SO_PEERCRED);
      none does: bind an abstract socket, connect to it            │ remember the client's pid
        (pending), posix_spawn with the listener fd ────────────> │ starts, accepts the starter
    register(name, ident)  b"O" "I own this segment" ─────────> │ owned[client][name] = ident
                           (b"o": the same, unlinked quietly)
    unregister(name, ident) b"U" "it has been unlinked" ──────> │ removed from every client (same
                                                                 │ ident, or one of them unknown)
    give(name)             b"G" "handed over (to a queue)" ───> │ removed from this client only
    register_queue(prefix, ident) b"Q" "my queue's segments" ─> │ queues[client][prefix] = ident
    forget_queue(prefix)   b"D" "I swept them myself" ────────> │ forgotten
    (resource_tracker)     b"N" "remember, never unlink" ─────> │ owned, counted, not unlinked
    (resource_tracker)     b"P" "your pid?" ──────────────────> │ <── b"P" + pid, at once
    at exit          b"B"        "bye" ───────────────────────> │ shm_unlink what the client still
                     <─────────── b"B" + number of clients left │ owns (if the name still points to
                                                                 │ that ident), one stderr line each;
                                                                 │ its queues become orphaned
    crash / SIGKILL: the kernel closes the connection ────────> │ EOF: same clean-up as "bye"
                                                                 │ orphaned queue: unlink prefix* once
                                                                 │ no process maps or holds its
                                                                 │ header's arena (ident), pidfds
                                                                 │ of those that do are watched
                                                                 │ no client and no orphan left: exit
                                                                 │ (status 1 if a client left owning
                                                                 │ something, as the stdlib's)

    Every request is ``!cHQQ`` (op, name length, st_dev, st_ino; 0, 0 when unknown) + the name.

    fork child:  closes the inherited connection at once, owns nothing; connects on its first create
    spawn / forkserver child:  gets the address in the preparation data (``_start._common``)

*Client side* (:func:`register`, :func:`unregister`, :func:`address`, :func:`set_address`,
:func:`tracker_pid`): each process has its own connection, opened lazily by its first tracked create
and closed by a "bye" at exit (a :class:`~gilfree.util.Finalize` that runs after the children are
joined).  The connection *is* the owner's lifeline: when it closes without the owner having unlinked
its segments, the owner is gone and the tracker unlinks them.  A process that only attaches never
connects, so it can never cause a clean-up or a warning.  The process that starts the tracker does
not wait for it: its requests queue up on the pending connection while the interpreter starts.  A
process that connects to an existing tracker waits for the welcome, so that a tracker that is just
exiting (its last client left) is noticed and replaced.  If the tracker has gone, the next create
starts a new one and registers again everything this process still owns.  The process that spawned
the tracker reaps it: the "bye" reply says whether it was the last client, and then it waits
(bounded) for the tracker to end, so a program's leaked segments are gone when it has exited.

*Identities* (issue 11): a name can be unlinked by anyone and created again by someone else; the
tracker unlinks a dead owner's name only while ``/dev/shm/<name>`` is still the file (st_dev, st_ino)
the owner registered.  A name registered without one (before it exists, so that no death falls
between creating and registering) is unlinked by name: only random names are registered that way.

*Queues*: a queue's segments (spill, pool, big messages) all start with the queue's prefix, which its
creator registers with the identity of the arena holding the queue's header.  When the creator has
gone without sweeping them, they are unlinked once no process maps that arena or holds its fd (the
queue's last user is gone).  A big message's segment is, until it is published, owned by its producer
like any segment (``register`` before creation, ``give`` just before the commit).

*Tracker* (:func:`serve`): a ``python -S -c`` started with ``posix_spawn``, like the fork server.  It
does not run the package's ``__init__`` (which imports the whole API): the command line registers a
bare ``gilfree`` package module and imports only this module and ``util``.  It ignores SIGINT and
SIGTERM (Ctrl-C or a group kill must not take it down before the clients it cleans up after) and
exits once its last client has disconnected and no orphaned queue is left to watch.  Unlike the fork server it needs no lifeline pipe to
its parent: the clients' connections are its lifelines, and it keeps serving the descendants after
the process that started it has exited.  stdin and stdout go to ``/dev/null``; stderr is the
starting process's, where leak lines belong.

The stdlib's resource tracker keys segments by name for a whole process tree and cleans up only when
the tree has exited; before 3.13 attaching registered a segment too, so an unrelated process that
attached and exited destroyed it for everybody and warned of a leak.  Here a segment belongs to the
connection of the process that created it, and is removed as soon as that process is gone.

Where this runs: the client functions in any process, on the calling thread; they block only for one
``send`` (plus, once per process, a connect that waits for the welcome, and at exit the "bye" round
trip and the bounded reap).  :func:`serve` runs in the tracker, single-threaded, blocking in ``poll``.
"""

from __future__ import annotations

import _posixshmem
import os
import select
import signal
import socket
import struct
import sys
import time

from . import util

# `typing` costs a child several ms to import; annotations are strings here anyway.
__all__ = [
    "register", "unregister", "give", "register_queue", "forget_queue", "identity", "goodbye", "address",
    "set_address", "tracker_pid", "serve",
]

#: The tracker's command line (``python -S -c TRACKER_CODE <package dir> <listener fd>``): a bare
#: package module instead of ``gilfree/__init__.py``, so only this module and ``util`` are imported.
TRACKER_CODE = (
    "import sys; m = type(sys)('gilfree'); m.__path__ = [sys.argv[1]]; sys.modules['gilfree'] = m; "
    "from gilfree._tracker import serve; serve()"
)
WELCOME = b"W"
OWN, OWN_QUIET, UNLINKED, GIVEN, QUEUE, QUEUE_DONE, BYE = b"O", b"o", b"U", b"G", b"Q", b"D", b"B"
#: "remember this name, never unlink it": the stdlib's "noop" resources (``gilfree.resource_tracker``),
#: counted as leaked when their owner goes without unregistering them, like the others
NOTE = b"N"
#: "what is your pid?" (``gilfree.resource_tracker``'s ``_pid``): answered at once with _PID_REPLY.
#: A client's SO_PEERCRED cannot tell: it names whoever called listen() when the client connected,
#: which is the tracker's starter for a client that connects while the tracker is starting.
PID = b"P"
_PID_REPLY = struct.Struct("!cI")
_NAMED = struct.Struct("!cHQQ")  # op, length of the name that follows, st_dev, st_ino (0, 0: unknown)
#: (st_dev, st_ino) of a segment or arena: what a name must still point to for the tracker to unlink it
Ident = tuple  # (int, int); (0, 0) when unknown
NO_IDENT = (0, 0)
SHM_DIR = "/dev/shm"  # where Linux keeps shm_open's names
_BYE_REPLY = struct.Struct("!cI")  # b"B", clients still connected after this one
_WELCOME_TIMEOUT = 30.0  # a loaded machine may take long to start an interpreter
_BYE_TIMEOUT = 10.0  # may include the start of the tracker
_REAP_TIMEOUT = 5.0
_BYE_PRIORITY = -1000  # after the children are joined and every other finalizer has run


def _named(op: bytes, name: str, ident: Ident = NO_IDENT) -> bytes:
    data = os.fsencode(name)
    return _NAMED.pack(op, len(data), *ident) + data


def identity(fd: int) -> Ident:
    """(st_dev, st_ino) of an open segment or arena: which file a name pointed to when it was opened."""
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    return util.recv_exact(sock, n, "the shared-memory tracker")


# ---------------------------------------------------------------------------------------------------
# Client side

class _Client:
    """This process's view of the tracker: the address, our connection, what we own.

    ``lock`` guards every field; the short sends happen under it because the connection is one
    byte stream shared by all threads.  Forgetting a name runs in finalizers (a queue's sweep, an
    array's unlink), maybe inside a collection on the thread that holds ``lock``: it never waits,
    it is handed to the holder (:class:`util.HandoffLock`).
    """

    def __init__(self) -> None:
        self.lock = util.HandoffLock()
        # in a spawned or forkserver child: the parent's tracker (see _start.prepare)
        self.address: str | None = util.inherited.get("shm_tracker")
        self.sock: socket.socket | None = None
        self.owned: dict[str, Ident] = {}  # name -> identity (NO_IDENT: registered before creation)
        self.queues: dict[str, Ident] = {}  # queue segment prefix -> identity of the queue's header arena
        self.quiet: set[str] = set()  # owned names removed without a stderr line (gilfree's own)
        self.notes: set[str] = set()  # owned names that are not segments: never unlinked (NOTE)
        self.exitcode: int | None = None  # of the tracker this process started, once reaped
        self.peer: int | None = None  # pid of the tracker we dialed, once asked (peer_pid)
        self.spawned_pid: int | None = None  # the tracker this process started, until reaped
        self.finalizer: util.Finalize | None = None
        self.in_setup: set[socket.socket] = set()  # sockets a forked child must not keep

    def __repr__(self) -> str:
        state = "connected" if self.sock is not None else "not connected"
        return (f"<tracker client pid={os.getpid()} {state} address={self.address!r} "
                f"owned={len(self.owned)} spawned_tracker={self.spawned_pid}>")

    # -- connection ------------------------------------------------------------------------------
    def _new_socket(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.in_setup.add(s)
        return s

    def _discard(self, s: socket.socket) -> None:
        self.in_setup.discard(s)
        s.close()

    def _dial(self, address: str) -> socket.socket:
        s = self._new_socket()
        try:
            s.settimeout(_WELCOME_TIMEOUT)
            s.connect(address)
            if _recv_exact(s, 1) != WELCOME:
                raise ConnectionError("unexpected greeting from the shared-memory tracker")
            s.settimeout(None)
        except BaseException:
            self._discard(s)
            raise
        self.in_setup.discard(s)
        return s

    def _start(self, executable: str | None) -> socket.socket:
        """Spawn a tracker and return our connection to it (we are its first client)."""
        self._reap(1.0)  # one we started before: its address did not answer, so it is exiting or dead
        address = f"\0gilfree-shm-tracker-{os.getpid()}-{os.urandom(6).hex()}"
        listener = self._new_socket()
        conn = self._new_socket()
        try:
            listener.bind(address)
            listener.listen(64)
            conn.connect(address)  # waits in the backlog until the tracker accepts it
            pid = _spawn(executable or sys.executable, listener.fileno())
        except BaseException:
            self._discard(conn)
            raise
        finally:
            # Once the tracker holds the only copy, its death resets our pending connection.
            self._discard(listener)
        self.spawned_pid = pid
        # No wait for the welcome: our requests queue up on the pending connection while the
        # tracker starts (tens of ms).  Had it failed to start, the connection is reset and the
        # next request starts another one.
        self.in_setup.discard(conn)
        self.address = address
        return conn

    def _connect(self, executable: str | None) -> None:
        sock = None
        if self.address is not None:
            try:
                sock = self._dial(self.address)
            except OSError:
                sock = None  # that tracker is gone: its last client left, or it was killed
        if sock is None:
            sock = self._start(executable)
        self.sock = sock
        if self.finalizer is None or not self.finalizer.still_active():
            self.finalizer = util.Finalize(None, self.goodbye, exitpriority=_BYE_PRIORITY)
        # everything we own, on a new connection (after a tracker restart too)
        msgs = [_named(self._own_op(n), n, i) for n, i in sorted(self.owned.items())]
        msgs += [_named(QUEUE, p, i) for p, i in sorted(self.queues.items())]
        if msgs:
            sock.sendall(b"".join(msgs), socket.MSG_NOSIGNAL)

    def _own_op(self, name: str) -> bytes:
        return NOTE if name in self.notes else OWN_QUIET if name in self.quiet else OWN

    def _drop(self) -> None:
        self.peer = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # -- requests --------------------------------------------------------------------------------
    def _send_owning(self, table: dict[str, Ident], op: bytes, name: str, ident: Ident,
                     executable: str | None) -> None:
        """Record ``name`` in ``table`` and tell the tracker (connecting, or starting it, if needed)."""
        with self.lock:
            table[name] = ident
            try:
                for attempt in (1, 2):
                    try:
                        if self.sock is None:
                            self._connect(executable)  # sends all of the tables, name included
                        else:
                            self.sock.sendall(_named(op, name, ident), socket.MSG_NOSIGNAL)
                        return
                    except OSError:
                        self._drop()
                        if attempt == 2:
                            raise
            except BaseException:
                table.pop(name, None)
                raise

    def register(self, name: str, ident: Ident, executable: str | None, quiet: bool, note: bool = False) -> None:
        with self.lock:
            self.quiet.discard(name)
            self.notes.discard(name)
            if note:
                self.notes.add(name)
            elif quiet:
                self.quiet.add(name)
        try:
            self._send_owning(self.owned, self._own_op(name), name, ident, executable)
        except BaseException:
            with self.lock:
                self.quiet.discard(name)
                self.notes.discard(name)
            raise

    # -- what gilfree.resource_tracker asks ------------------------------------------------------
    def ensure_connected(self, executable: str | None) -> None:
        """Connect now (starting the tracker if none answers); again if the tracker has died."""
        with self.lock:
            if self.sock is not None and not self._alive_locked():
                self._drop()
            if self.sock is None:
                self._connect(executable)

    def _alive_locked(self) -> bool:
        if self.sock is None:
            return False
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0))
        return not poller.poll(0)  # the tracker closes our connection only when it dies

    def alive(self) -> bool:
        """Whether this process is connected to a tracker that is running."""
        with self.lock:
            return self._alive_locked()

    def peer_pid(self) -> int | None:
        """Pid of the tracker this process is connected to (None when not connected)."""
        with self.lock:
            if self.sock is None:
                return None
            if self.spawned_pid is not None:
                return self.spawned_pid  # ours: it may not have accepted the connection yet
            if self.peer is None:
                try:  # we dialed: the welcome has been read, the answer is the next thing to come
                    self.sock.settimeout(_WELCOME_TIMEOUT)
                    self.sock.sendall(_named(PID, ""), socket.MSG_NOSIGNAL)
                    op, pid = _PID_REPLY.unpack(_recv_exact(self.sock, _PID_REPLY.size))
                    self.sock.settimeout(None)
                except (OSError, struct.error):
                    self._drop()
                    return None
                self.peer = pid if op == PID else None
            return self.peer

    def register_queue(self, prefix: str, ident: Ident, executable: str | None) -> None:
        self._send_owning(self.queues, QUEUE, prefix, ident, executable)

    def _send_forget(self, table: dict[str, Ident], op: bytes, name: str, ident: Ident) -> None:
        """Forget ``name`` and tell the tracker; never waits for the lock (see the class)."""
        self.lock.run_or_hand_off(self._forget_locked, table, op, name, ident)

    def _forget_locked(self, table: dict[str, Ident], op: bytes, name: str, ident: Ident) -> None:
        table.pop(name, None)
        self.quiet.discard(name)
        self.notes.discard(name)
        if self.sock is None:
            return  # never connect only to say this; an owner is always connected
        try:
            self.sock.sendall(_named(op, name, ident), socket.MSG_NOSIGNAL)
        except OSError:
            self._drop()

    def goodbye(self) -> None:
        with self.lock:
            sock, self.sock = self.sock, None
            self.owned.clear()  # what is left is the tracker's to remove now
            self.queues.clear()
            self.quiet.clear()
            self.notes.clear()
            if sock is None:
                return
            remaining: int | None = None
            try:
                sock.settimeout(_BYE_TIMEOUT)
                sock.sendall(BYE, socket.MSG_NOSIGNAL)
                first = _recv_exact(sock, 1)
                if first == WELCOME:  # the tracker we started: its welcome was never read
                    first = _recv_exact(sock, 1)
                _, remaining = _BYE_REPLY.unpack(first + _recv_exact(sock, _BYE_REPLY.size - 1))
            except (OSError, struct.error):
                pass
            finally:
                sock.close()
            if remaining == 0:
                self._reap(_REAP_TIMEOUT)

    def _reap(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the tracker we spawned to exit, and reap it."""
        pid = self.spawned_pid
        if pid is None:
            return
        status = _wait_status(pid, timeout)
        if status is not None:
            self.spawned_pid = None
            self.exitcode = status

    def after_fork_in_child(self) -> None:
        # The parent's connection, and any socket a thread of the parent was setting up, are not
        # ours: a child holding them open would hide the parent's death from the tracker.
        self.lock = util.HandoffLock()
        for s in [*self.in_setup, *([self.sock] if self.sock is not None else [])]:
            try:
                os.close(s.detach())
            except OSError:
                pass
        self.in_setup = set()
        self.sock = None
        self.owned = {}
        self.queues = {}  # the parent's queues stay the parent's (the tracker sees who maps them)
        self.quiet = set()
        self.notes = set()
        self.spawned_pid = None
        self.exitcode = None
        self.peer = None
        self.finalizer = None


def _spawn(executable: str, listener_fd: int) -> int:
    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    argv = [executable, "-S", "-c", TRACKER_CODE, pkg_dir, str(listener_fd)]
    actions = [(os.POSIX_SPAWN_DUP2, listener_fd, listener_fd)]
    # SIGINT and SIGTERM blocked from the start: a Ctrl-C during the tracker's start-up (before
    # serve() ignores them) must not kill it
    return os.posix_spawn(executable, argv, os.environ, file_actions=actions,
                          setsigmask=(signal.SIGINT, signal.SIGTERM))


def _wait_pid(pid: int, timeout: float) -> bool:
    """Reap child ``pid`` if it exits within ``timeout`` s; True if it is gone."""
    return _wait_status(pid, timeout) is not None


def _wait_status(pid: int, timeout: float) -> int | None:
    """Reap child ``pid`` if it exits within ``timeout`` s: its exit code (-signal if killed; -256
    when someone else reaped it), or None while it runs."""
    try:
        fd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        fd = None
    except (AttributeError, OSError):
        fd = -1
    try:
        if fd is not None and fd >= 0:
            poller = select.poll()  # not select.select: a program may hold more than 1,024 descriptors
            poller.register(fd, select.POLLIN)
            poller.poll(max(0, int(timeout * 1000)))
        elif fd == -1:  # no pidfd: poll
            deadline = time.monotonic() + timeout
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done or time.monotonic() >= deadline:
                    return os.waitstatus_to_exitcode(status) if done else None
                time.sleep(0.01)
        done, status = os.waitpid(pid, os.WNOHANG)
        return os.waitstatus_to_exitcode(status) if done else None
    except ChildProcessError:
        return -256  # reaped by someone else, or not our child
    finally:
        if fd is not None and fd >= 0:
            os.close(fd)


_client = _Client()
os.register_at_fork(after_in_child=lambda: _client.after_fork_in_child())


def register(name: str, executable: str | None = None, ident: Ident = NO_IDENT, *, quiet: bool = False) -> None:
    """This process owns segment ``name`` (the path given to ``shm_open``) and must unlink it.

    ``ident`` is the segment's :func:`identity`: the tracker unlinks ``name`` only while it still
    points to that file (another owner may have re-created the name after someone unlinked ours).
    Without it (registering *before* creating, so that no death can come between the two) the
    tracker unlinks by name: use it only for names nobody else can choose (random ones).
    ``quiet``: removed after a death without the stderr line (segments of gilfree's own, such as a
    queue's big message, whose loss the death of their process already tells).
    Connects to the tracker on first use, starting it with ``executable`` (default
    ``sys.executable``) if there is none.  Blocks for one send; raises ``OSError`` if no tracker
    can be reached or started.
    """
    _client.register(name, ident, executable, quiet)


def unregister(name: str, ident: Ident = NO_IDENT) -> None:
    """Segment ``name`` (the file ``ident``, if known) has been unlinked, by its owner or anyone else.

    Nobody owns it any more: the tracker forgets it for every client (those that registered it with
    another identity keep theirs: a name re-created since).  Sends only if this process is connected.
    """
    _client._send_forget(_client.owned, UNLINKED, name, ident)


def give(name: str) -> None:
    """This process no longer owns segment ``name`` (it is handed over, e.g. published in a queue).

    The tracker forgets it for this process only, and will not unlink it when this process ends.
    """
    _client._send_forget(_client.owned, GIVEN, name, NO_IDENT)


def register_queue(prefix: str, ident: Ident, executable: str | None = None) -> None:
    """Segments whose names start with ``prefix`` belong to a queue whose header lives in the file ``ident``.

    Once this process has gone (exit or death) and no process maps that file any more (the queue's
    last user is gone), the tracker unlinks every segment named ``prefix...``.  One send per queue.
    """
    _client.register_queue(prefix, ident, executable)


def forget_queue(prefix: str) -> None:
    """The queue's creator has removed its segments itself: the tracker need not watch its users."""
    _client._send_forget(_client.queues, QUEUE_DONE, prefix, NO_IDENT)


def goodbye() -> None:
    """Leave the tracker now: it unlinks (and reports) what this process still owns.

    Runs at exit; if this process started the tracker and was its last client, waits up to
    a few seconds for it to exit and reaps it.
    """
    _client.goodbye()


def address() -> str | None:
    """The tracker address this process uses and passes to its children (None: no tracker yet)."""
    return _client.address


def set_address(addr: str | None) -> None:
    """In a spawned or forkserver child: use the parent's tracker (called by ``_start.prepare``)."""
    with _client.lock:
        if _client.sock is None:
            _client.address = addr


def tracker_pid() -> int | None:
    """Pid of the tracker this process started, while it runs (None if it did not start one)."""
    with _client.lock:
        pid = _client.spawned_pid
        if pid is not None and _wait_pid(pid, 0):
            _client.spawned_pid = pid = None
        return pid


# ---------------------------------------------------------------------------------------------------
# The tracker process

class _Peer:
    __slots__ = ("sock", "pid", "owned", "quiet", "notes", "queues", "pending")

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid
        self.owned: dict[str, Ident] = {}
        self.quiet: set[str] = set()
        self.notes: set[str] = set()
        self.queues: dict[str, Ident] = {}
        self.pending = bytearray()


def _report(name: str, pid: int) -> None:
    shown = name[1:] if name.startswith("/") else name
    who = f"pid {pid}" if pid > 0 else "pid unknown"
    line = (f"gilfree: the shared-memory tracker unlinked segment {shown!r}: its owner ({who}) ended "
            f"without calling unlink()\n")
    try:
        os.write(2, line.encode("utf-8", "replace"))
    except OSError:
        pass


def _still_ours(name: str, ident: Ident) -> bool:
    """Whether ``name`` still points to the file ``ident`` (True if that cannot be known)."""
    if ident == NO_IDENT:
        return True
    try:
        st = os.stat(SHM_DIR + "/" + name.lstrip("/"))
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /dev/shm (not Linux): by name, as before
    return (st.st_dev, st.st_ino) == tuple(ident)


def _unlink_all(owned: dict[str, Ident], pid: int, quiet: set[str]) -> None:
    for name in sorted(owned):
        # Someone may have unlinked the owner's segment and a new owner created the same name since:
        # that file is not this owner's.  (Between this look and the unlink a third party could
        # replace it again; that takes an unlink and a create in those microseconds.)
        if not _still_ours(name, owned[name]):
            continue
        try:
            _posixshmem.shm_unlink(name)
        except OSError:
            continue  # already unlinked by someone else: nothing leaked
        if name not in quiet:
            _report(name, pid)


def _sweep(prefix: str) -> int:
    """Unlink every segment whose name starts with ``prefix`` (no leading slash); how many."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    n = 0
    for name in names:
        if name.startswith(prefix):
            try:
                _posixshmem.shm_unlink("/" + name)
                n += 1
            except OSError:
                pass
    return n


def _mappers(idents: set[Ident], skip: frozenset[int] | set[int]) -> dict[Ident, set[int]]:
    """For each file in ``idents``: the pids (not in ``skip``) that map it or hold it open.

    A queue is in use as long as a process maps its header's arena (``/proc/<pid>/maps``; a forked
    child from the fork on) or holds its fd (``/proc/<pid>/fd``; a spawned child from its start,
    before it unpickles the queue and maps it).  Costs a read of every process's maps and a stat
    of each of its fds: done only when a queue's creator has gone, and again when one of the
    remaining users exits.
    """
    wanted = {}
    for dev, ino in idents:
        wanted[b" %d " % ino] = ((b"%02x:%02x" % (os.major(dev), os.minor(dev))), (dev, ino))
    found: dict[Ident, set[int]] = {i: set() for i in idents}
    if not wanted:
        return found
    me = os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        if pid == me or pid in skip:
            continue
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                data = f.read()
        except OSError:
            continue  # gone, or not ours
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            fds = []
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in found:
                found[(st.st_dev, st.st_ino)].add(pid)
        for key, (dev_text, ident) in wanted.items():
            start = 0
            while True:
                i = data.find(key, start)
                if i < 0:
                    break
                line_start = data.rfind(b"\n", 0, i) + 1
                fields = data[line_start : data.find(b"\n", i) if data.find(b"\n", i) >= 0 else None].split()
                if len(fields) >= 5 and fields[3] == dev_text and fields[4] == key.strip():
                    found[ident].add(pid)
                    break
                start = i + 1
    return found


def _quiet_stdio() -> None:
    try:
        null = os.open(os.devnull, os.O_RDWR)
    except OSError:
        return
    for fd in (0, 1):
        try:
            os.dup2(null, fd)
        except OSError:
            pass
    if null > 2:
        os.close(null)
    try:
        os.chdir("/")  # do not keep the program's working directory busy
    except OSError:
        pass


class _Server:
    """The tracker's state: the listener and one :class:`_Peer` per connected client."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.peers: dict[int, _Peer] = {}
        self.poller = select.poll()
        self.poller.register(listener.fileno(), select.POLLIN)
        self.uid = os.getuid()
        # queues whose creator has gone while other processes still use them: prefix -> arena identity
        self.orphaned: dict[str, Ident] = {}
        self.pidfds: dict[int, int] = {}  # pidfd -> pid of a process that maps an orphaned queue
        self.watched: dict[int, int] = {}  # pid -> its pidfd
        self.poll_orphans = False  # no pidfds: look again every second
        self.leaked = False  # a client went without unregistering something: the exit status is 1

    def accept_all(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError:
                return  # out of fds, say: the clients retry
            try:
                cred = conn.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_PEERCRED", 17), 12)
                pid, uid, _gid = struct.unpack("3i", cred)
            except OSError:
                pid, uid = 0, self.uid
            if uid != self.uid:  # only our own user may make us unlink anything
                conn.close()
                continue
            try:
                conn.sendall(WELCOME)
            except OSError:
                pass  # it died already; what it sent is still to be read, then its EOF
            self.peers[conn.fileno()] = _Peer(conn, pid)
            self.poller.register(conn.fileno(), select.POLLIN)

    def drop(self, peer: _Peer, reply: bool) -> None:
        """The client left (``reply``: it said bye and waits for the count of those left)."""
        fd = peer.sock.fileno()
        self.poller.unregister(fd)
        del self.peers[fd]
        if peer.owned:
            self.leaked = True
        for name in peer.notes:
            peer.owned.pop(name, None)
        _unlink_all(peer.owned, peer.pid, peer.quiet)
        if reply:
            try:
                peer.sock.sendall(_BYE_REPLY.pack(BYE, len(self.peers)))
            except OSError:
                pass
        peer.sock.close()
        if peer.queues:  # after the reply: the departing process need not wait for this
            self.orphaned.update(peer.queues)
            self.check_orphans(skip={peer.pid})

    def check_orphans(self, skip: frozenset[int] | set[int] = frozenset()) -> None:
        """Sweep the orphaned queues nobody maps any more; watch the processes that still map one."""
        users = _mappers(set(self.orphaned.values()), skip)
        for prefix, ident in list(self.orphaned.items()):
            if not users.get(ident):
                del self.orphaned[prefix]
                _sweep(prefix)
        still = set().union(*users.values()) if users else set()
        for pid in still - set(self.watched):
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                self.poll_orphans = True  # it ended between the two looks: look again soon
                continue
            except (AttributeError, OSError):
                self.poll_orphans = True
                continue
            self.watched[pid] = pidfd
            self.pidfds[pidfd] = pid
            self.poller.register(pidfd, select.POLLIN)
        if not self.orphaned:
            self.poll_orphans = False
            for pidfd in list(self.pidfds):
                self.unwatch(pidfd)

    def unwatch(self, pidfd: int) -> None:
        pid = self.pidfds.pop(pidfd)
        self.watched.pop(pid, None)
        self.poller.unregister(pidfd)
        os.close(pidfd)

    def read(self, peer: _Peer) -> None:
        try:
            data = peer.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.drop(peer, reply=False)
            return
        buf = peer.pending
        buf += data
        pos = 0
        while pos < len(buf):
            op = buf[pos : pos + 1]
            if op == BYE:
                self.drop(peer, reply=True)
                return
            if op not in (OWN, OWN_QUIET, NOTE, UNLINKED, GIVEN, QUEUE, QUEUE_DONE, PID):
                self.drop(peer, reply=False)  # not our client library: treat as gone
                return
            if len(buf) - pos < _NAMED.size:
                break
            _, n, dev, ino = _NAMED.unpack_from(buf, pos)
            end = pos + _NAMED.size + n
            if len(buf) < end:
                break
            name = os.fsdecode(bytes(buf[pos + _NAMED.size : end]))
            ident = (dev, ino)
            pos = end
            if op == OWN or op == OWN_QUIET or op == NOTE:
                peer.owned[name] = ident
                peer.quiet.discard(name)
                peer.notes.discard(name)
                if op == OWN_QUIET:
                    peer.quiet.add(name)
                elif op == NOTE:
                    peer.notes.add(name)
            elif op == UNLINKED:  # whoever unlinked it: that file is nobody's any more
                for other in self.peers.values():
                    mine = other.owned.get(name)
                    if mine is not None and (mine == ident or NO_IDENT in (mine, ident)):
                        del other.owned[name]
                        other.quiet.discard(name)
                        other.notes.discard(name)
            elif op == PID:
                try:
                    peer.sock.sendall(_PID_REPLY.pack(PID, os.getpid()))
                except OSError:
                    pass  # it has gone: its EOF comes next
            elif op == GIVEN:
                peer.owned.pop(name, None)
                peer.quiet.discard(name)
                peer.notes.discard(name)
            elif op == QUEUE:
                peer.queues[name] = ident
            else:  # QUEUE_DONE
                peer.queues.pop(name, None)
        del buf[:pos]

    def run(self) -> None:
        lfd = self.listener.fileno()
        self.accept_all()
        while self.peers or self.orphaned:
            exited = False
            for fd, _ in self.poller.poll(1000 if self.poll_orphans else None):
                if fd == lfd:
                    self.accept_all()
                elif fd in self.pidfds:
                    self.unwatch(fd)
                    exited = True
                else:
                    peer = self.peers.get(fd)
                    if peer is not None:
                        self.read(peer)
            if self.orphaned and (exited or self.poll_orphans):
                self.poll_orphans = False
                self.check_orphans()
            if not self.peers:
                self.accept_all()  # someone who connected just now keeps us alive
        self.listener.close()  # a client still in the backlog is reset and starts a new tracker


def serve() -> None:
    """Main loop of the tracker: ``python -S -c TRACKER_CODE <package dir> <listener fd>``."""
    listener_fd = int(sys.argv[-1])
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM))  # blocked by _spawn
    _quiet_stdio()
    listener = socket.socket(fileno=listener_fd)
    listener.setblocking(False)
    server = _Server(listener)
    server.run()
    # as the stdlib's tracker: 1 when some client ended without unregistering what it owned
    sys.exit(1 if server.leaked else 0)
