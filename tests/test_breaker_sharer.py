"""Attacks on the resource sharer's promises (issue 14): reentrancy, hostile peers, signals.

Each program runs in its own interpreter with a timeout: a deadlock or a killed process is a
failure, not a hung test run.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from _helpers import run_program, write_program

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets, SO_PEERCRED")


def run(tmp_path, source: str, timeout: float = 60) -> subprocess.CompletedProcess:
    path = write_program(tmp_path, source)
    try:
        return run_program(path, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # subprocess.run killed it
        pytest.fail(f"the program hung (killed after {timeout} s): {exc.stdout!r} {exc.stderr!r}")


def test_pickling_a_connection_from_a_finalizer_while_the_sharer_lock_is_held_does_not_deadlock(tmp_path):
    # A finalizer (here: a gc callback, which runs where __del__ and weakref callbacks of cyclic
    # garbage run) pickles a Connection while this thread is inside share(), holding the sharer's
    # lock.  The lock was a plain Lock: the nested share() waited for itself forever.
    r = run(tmp_path, """
        import gc, pickle
        from gilfree import resource_sharer
        if __name__ == "__main__":
            r, w = multiprocessing.Pipe(duplex=False)
            hits = []
            def held():
                lock = resource_sharer._sharer.lock
                return lock._is_owned() if hasattr(lock, "_is_owned") else lock.locked()
            def finalizer(phase, info):
                if phase == "start" and len(hits) < 5 and held():
                    hits.append(1)
                    pickle.loads(pickle.dumps(w)).close()  # shares, then takes it back (same process)
            gc.callbacks.append(finalizer)
            old = gc.get_threshold()
            gc.set_threshold(1)
            try:
                for i in range(300):
                    junk = [[] for _ in range(3)]
                    pickle.loads(pickle.dumps(r)).close()
            finally:
                gc.set_threshold(*old)
                gc.callbacks.remove(finalizer)
            assert hits, "the finalizer never ran inside the lock: the test proves nothing"
            assert resource_sharer._sharer.table == {}
            print("ok", len(hits))
    """, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


def test_pickling_a_connection_in_a_signal_handler_does_not_deadlock(tmp_path):
    r = run(tmp_path, """
        import pickle, signal
        from gilfree import resource_sharer
        if __name__ == "__main__":
            r, w = multiprocessing.Pipe(duplex=False)
            n, busy = [0], [False]
            def handler(signum, frame):
                if busy[0]:  # a signal that came while the last one was handled
                    return
                busy[0] = True
                try:
                    n[0] += 1
                    pickle.loads(pickle.dumps(w)).close()
                finally:
                    busy[0] = False
            signal.signal(signal.SIGALRM, handler)
            signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
            try:
                for i in range(3000):
                    pickle.loads(pickle.dumps(r)).close()
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0, 0)
            assert n[0] > 0
            print("ok", n[0])
    """, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


def test_silent_peers_on_the_sharer_socket_do_not_block_a_legitimate_claim(tmp_path):
    # The sharer answered one connection at a time, each given REQUEST_TIMEOUT (10 s) to send its
    # key: three connections that send nothing (any process of our uid can find the abstract socket
    # in /proc/net/unix) made a receiver behind them time out, and its descriptor was lost.
    r = run(tmp_path, """
        import os, pickle, socket, subprocess, sys, time
        from gilfree import resource_sharer
        if __name__ == "__main__":
            r, w = multiprocessing.Pipe(duplex=False)
            data = pickle.dumps(r)
            silent = []
            for i in range(3):
                s = socket.socket(socket.AF_UNIX)
                s.connect(resource_sharer._sharer.address)
                silent.append(s)
            silent[0].send(b"123")  # a trickle, too
            t = time.monotonic()
            out = subprocess.run([sys.executable, "-c",
                                  "import pickle, sys; c = pickle.loads(sys.stdin.buffer.read()); print(c.recv())"],
                                 input=data, capture_output=True, timeout=50)
            took = time.monotonic() - t
            for s in silent:
                s.close()
            print(out.returncode, out.stdout, out.stderr[-300:], round(took, 1))
    """.replace("print(c.recv())", "print('got', c.fileno() >= 0)"), timeout=90)
    assert r.returncode == 0, r.stderr
    rc, rest = r.stdout.split(" ", 1)
    assert rc == "0" and "got True" in rest, r.stdout
    assert float(r.stdout.split()[-1]) < 5.0, r.stdout


def test_a_receiver_that_hangs_up_does_not_kill_a_sender_with_default_sigpipe(tmp_path):
    # A program that restores SIGPIPE's default (as CLI tools that write to pipes do) must survive a
    # peer that sends a key and hangs up before the answer: the answer is sent with MSG_NOSIGNAL.
    r = run(tmp_path, """
        import os, pickle, signal, socket, time
        from gilfree import resource_sharer
        if __name__ == "__main__":
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            r, w = multiprocessing.Pipe(duplex=False)
            sf = resource_sharer.DupFd(r.fileno())
            for key in (os.urandom(16), sf.key):  # a wrong key (refusal), then the right one (the fd)
                s = socket.socket(socket.AF_UNIX)
                s.connect(sf.address)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\\x01\\0\\0\\0\\0\\0\\0\\0")
                s.send(key)
                s.close()
                time.sleep(0.3)
            print("alive")
    """, timeout=30)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout.strip() == "alive"


def test_a_child_forked_while_another_thread_shares_inherits_no_shared_descriptor(tmp_path):
    # share() made its duplicate before taking the lock, and revoke/_answer/expiry closed theirs
    # after dropping it: a fork from another thread in that window gave the child a duplicate that
    # after_fork_in_child could not know of (here: more than half of 300 children, each then holding
    # a stray write end of the pipe, so that its reader sees no EOF while the child lives).
    r = run(tmp_path, """
        import os, threading
        from gilfree import resource_sharer
        if __name__ == "__main__":
            r, w = multiprocessing.Pipe(duplex=False)
            ino = os.fstat(w.fileno()).st_ino
            stop = False
            def churn():
                while not stop:
                    resource_sharer.revoke([resource_sharer.DupFd(w.fileno())])
            t = threading.Thread(target=churn)
            t.start()
            leaks = 0
            try:
                for i in range(200):
                    pid = os.fork()
                    if pid == 0:
                        n = 0
                        for fd in map(int, os.listdir("/proc/self/fd")):
                            if fd not in (r.fileno(), w.fileno()):
                                try:
                                    n += os.fstat(fd).st_ino == ino
                                except OSError:
                                    pass
                        os._exit(min(n, 100))
                    _, status = os.waitpid(pid, 0)
                    leaks += os.waitstatus_to_exitcode(status) != 0
            finally:
                stop = True
                t.join()
            print(leaks)
    """, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0", f"{r.stdout.strip()} of 200 forked children inherited a shared duplicate"


@pytest.mark.xfail(strict=True, reason="a plain pickle.dumps that fails after a Connection in it was shared "
                   "cannot be told from one that succeeded (the SharedFd is dropped either way): the duplicate "
                   "stays in the table until SHARE_TTL (300 s), holding the pipe end open; only gilfree's own "
                   "dumps/dump_chunks revoke")
def test_a_failed_plain_pickle_revokes_what_it_shared(tmp_path):
    r = run(tmp_path, """
        import pickle, threading
        from gilfree import resource_sharer
        if __name__ == "__main__":
            r, w = multiprocessing.Pipe(duplex=False)
            try:
                pickle.dumps([w, threading.Lock()])  # w is shared, then the lock fails
            except TypeError:
                pass
            print(len(resource_sharer._sharer.table))
    """, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0", "the failed pickle's duplicate is still shared"


def test_a_finalizer_that_shares_while_stop_runs_does_not_break_the_sharer_for_good(tmp_path):
    # stop() took the thread, then (lock held) a finalizer pickled a Connection: the share started a
    # new thread, whose socket stop() then took and closed.  That thread ended without retiring, and
    # `_sharer.thread` stayed a dead thread: no later share in the process was ever served.
    r = run(tmp_path, """
        import gc, os, pickle, subprocess, sys, time
        from gilfree import resource_sharer
        def in_stop():
            f = sys._getframe(1)
            while f is not None:
                if f.f_code.co_name == "stop" and f.f_code.co_filename == resource_sharer.__file__:
                    return True
                f = f.f_back
            return False
        if __name__ == "__main__":
            r, w = multiprocessing.Pipe(duplex=False)
            keep, hits = [], []
            def finalizer(phase, info):
                sharer = resource_sharer._sharer
                if phase == "start" and not hits and sharer.thread is None and sharer.lock._is_owned() and in_stop():
                    hits.append(1)
                    keep.append(pickle.dumps(w))
            pickle.dumps(r)  # the sharer runs
            gc.callbacks.append(finalizer)
            old = gc.get_threshold()
            gc.set_threshold(1)
            try:
                junk = [[] for _ in range(10)]
                resource_sharer.stop(5)
            finally:
                gc.set_threshold(*old)
                gc.callbacks.remove(finalizer)
            assert hits, "the finalizer never ran inside stop(): the test proves nothing"
            time.sleep(0.3)
            data = pickle.dumps(r)  # a share after stop(): served as ever
            out = subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read()); print('got')"],
                                 input=data, capture_output=True, timeout=30)
            print(out.stdout.decode().strip(), out.stderr.decode()[-200:])
            resource_sharer.stop(5)
    """, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("got"), r.stdout
