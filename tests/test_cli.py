"""The `gilfree` command: the tour runs every chapter for real and leaves nothing behind."""

from __future__ import annotations

import re
import sys
import time

import pytest
from _helpers import run_program


def test_tour_chapters_run():
    res = run_program(["-m", "gilfree", "tour", "--chapter", "processes", "--chapter", "lambdas",
                       "--chapter", "pipes", "--chapter", "listener", "--chapter", "shared", "--chapter", "queues"], timeout=180)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for method in ("fork", "spawn", "forkserver"):
        assert f"{method}:" in out
    assert "computed 12*12 = 144" in out
    assert "a lambda ran in a spawned child:   result 45" in out
    assert "a closure ran in a spawned child:  result 1007" in out
    assert "PicklingError at obj['jobs'][2]: _thread.lock" in out
    assert "wrong key, listener:" in out and "refused: AuthenticationError" in out
    assert "right key again, client:" in out and "received 'hello, right key again'" in out
    assert "Final balance =                    100" in out
    assert "row sums written by two children: [1000000.0, 2000000.0]" in out
    assert "on_owner_death='raise': OwnerDiedError: holder pid" in out
    assert "on_owner_death='takeover': took it over from pid" in out
    assert "Queue elements:                    [1, 4, 9, 16]" in out
    assert "child saw shape (12500000,), last value 12499999" in out
    m = re.search(r"one consumer killed: (\d+) delivered, (\d+) distinct, (\d+) lost", out)
    assert m and m.group(1) == m.group(2) and int(m.group(3)) <= 1
    assert "Children still running: 0." in out
    assert "Traceback" not in res.stderr


def test_help():
    res = run_program(["-m", "gilfree", "--help"])
    assert res.returncode == 0 and "tour" in res.stdout
    assert sys.executable


def test_tour_manager_chapter():
    res = run_program(["-m", "gilfree", "tour", "--chapter", "manager"], timeout=120)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "New record added!" in out and "Name: Jeff  Score: 8" in out
    assert "a second process with the authkey: connected, wrote its pid; the board now holds ['owner', 'visitor']" in out
    assert "a second process with a wrong key: refused: AuthenticationError(digest sent was rejected" in out
    assert "Children still running: 0." in out


def test_manager_serve_logs_and_stops_on_sigterm(tmp_path):
    import os
    import subprocess

    from _helpers import SRC

    key = tmp_path / "key"
    key.write_bytes(b"a secret of 16+ bytes\n")  # a text key: the newline is not part of it
    key.chmod(0o600)
    env = dict(os.environ, PYTHONPATH=SRC)
    server = subprocess.Popen([sys.executable, "-m", "gilfree", "manager", "serve", "--address", "127.0.0.1:0",
                               "--authkey-file", str(key), "--register", "od=collections:OrderedDict"],
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stderr.readline()
        port = int(re.search(r"serving on 127\.0\.0\.1:(\d+)", line).group(1))
        assert "od" in line
        client = (
            "import gilfree; from gilfree.managers import SyncManager\n"
            "SyncManager.register('od')\n"
            f"m = SyncManager(('127.0.0.1', {port}), b'a secret of 16+ bytes'); m.connect(); d = m.od(); d.update(a=1)\n"
            "print(list(d.keys()))\n"
            f"try:\n    SyncManager(('127.0.0.1', {port}), b'nope').connect()\n"
            "except gilfree.AuthenticationError as e:\n    print('refused')\n"
        )
        res = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, env=env, timeout=60)
        assert res.stdout.split() == ["['a']", "refused"], res.stderr
    finally:
        err = _stop_server(server)
    assert server.returncode == 0
    assert "accepted 127.0.0.1:" in err
    assert "refused 127.0.0.1:" in err and "digest received was wrong" in err
    assert "stopped (SIGTERM)" in err
    assert "NOT ENCRYPTED" not in err  # loopback


def test_authkey_file_rule(tmp_path):
    # the file's exact bytes; one trailing newline is dropped only after a printable text key
    from gilfree.cli import authkey_from_file

    f = tmp_path / "key"
    for content, key in [
        (b"secret\n", b"secret"), (b"secret\r\n", b"secret"), (b"secret", b"secret"),
        (b"secret\n\n", b"secret\n\n"), (b" two spaces \n", b" two spaces "), (b"caf\xc3\xa9\n", b"caf\xc3\xa9"),
        (b"\x00\xff binary\n", b"\x00\xff binary\n"), (b"\x8a\x01\x02 \n", b"\x8a\x01\x02 \n"),
        (b"tab\tkey\n", b"tab\tkey\n"), (b"random ends in space ", b"random ends in space "), (b"\n", b""),
    ]:
        f.write_bytes(content)
        assert authkey_from_file(f) == key, content


def _stop_server(server) -> str:
    """SIGTERM a `gilfree manager serve`; its stderr.  One that does not stop within 30 s dumps its threads'
    stacks (SIGUSR1: faulthandler) into the failure, so a hang says where it is, and is killed."""
    import signal
    import subprocess

    server.send_signal(signal.SIGTERM)
    try:
        return server.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired:
        server.send_signal(signal.SIGUSR1)
        time.sleep(1)
        server.kill()
        _, err = server.communicate()
        pytest.fail(f"manager serve did not stop within 30 s of SIGTERM; its stderr (thread stacks last):\n{err[-6000:]}")


def _serve(tmp_path, key_bytes, mode=0o600, address="127.0.0.1:0"):
    import os
    import subprocess

    from _helpers import SRC

    key = tmp_path / "key"
    key.write_bytes(key_bytes)
    key.chmod(mode)
    env = dict(os.environ, PYTHONPATH=SRC)
    return key, subprocess.Popen([sys.executable, "-m", "gilfree", "manager", "serve", "--address", address,
                                  "--authkey-file", str(key)], stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("key_bytes, mode, expected", [
    (b"a long enough text key\n", 0o644, "make it private with `chmod 600 {key}`"),
    (b"a long enough text key\n", 0o640, "make it private with `chmod 600 {key}`"),
    (b"short key\n", 0o600, "only 9 bytes; use at least 16 bytes: make a good key with `head -c 32 /dev/urandom > {key}"),
    (b"\n", 0o600, "is empty; use at least 16 bytes"),
])
def test_manager_serve_refuses_weak_key_files(tmp_path, key_bytes, mode, expected):
    key, server = _serve(tmp_path, key_bytes, mode)
    try:
        _, err = server.communicate(timeout=30)
    finally:
        if server.poll() is None:  # it served (before the fix)
            server.kill()
            server.communicate()
    assert server.returncode == 2, err
    assert expected.format(key=key) in err, err


def test_manager_serve_binary_key_and_warning_without_tls(tmp_path):
    # a random key whose last bytes are whitespace is used exactly as it is (it was stripped: clients
    # holding the file's bytes were refused); serving on every interface without TLS warns on stderr

    from gilfree import AuthenticationError
    from gilfree.managers import SyncManager

    key_bytes = b"\x9f\x00" + bytes(range(200, 226)) + b" \t\r\n"
    _, server = _serve(tmp_path, key_bytes, address="0.0.0.0:0")
    try:
        lines = [server.stderr.readline()]
        while lines[-1] and "serving on" not in lines[-1]:
            lines.append(server.stderr.readline())
        port = int(re.search(r"serving on 0\.0\.0\.0:(\d+)", lines[-1]).group(1))
        warning = "".join(lines[:-1])
        assert "NOT ENCRYPTED: listening on 0.0.0.0:" in warning and "without TLS" in warning, warning
        assert "travels in clear" in warning and "--tls-cert/--tls-key" in warning, warning
        m = SyncManager(("127.0.0.1", port), key_bytes)
        m.connect()
        assert m.dict(a=1)["a"] == 1
        with pytest.raises(AuthenticationError):
            SyncManager(("127.0.0.1", port), key_bytes.strip()).connect()
    finally:
        err = _stop_server(server)
    assert server.returncode == 0, err


def test_tour_pool_chapter():
    res = run_program(["-m", "gilfree", "tour", "--chapter", "pool"], timeout=180)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert sorted(re.findall(r"Worker process id for (\d): \d+", out)) == ["1", "2", "3", "4", "5"]
    assert "result:                            [1, 4, 9, 16, 25]" in out
    assert "sum of the results:                5997000" in out
    assert "tasks that succeeded:              19 of 20" in out
    assert re.search(r"the lost task: +worker pid \d+ was killed by SIGKILL while running task \d+ \(_pool_die_on\)", out)
    assert "the pool goes on:                  [1, 2, 3]" in out
    assert "2000/2000" in res.stderr  # the progress bar
    assert "Children still running: 0." in out
    assert "Traceback" not in res.stderr


def test_tour_cluster_chapter():
    pytest.importorskip("distributed")
    res = run_program(["-m", "gilfree", "tour", "--chapter", "cluster"], timeout=100,
                      env={"GILFREE_TOUR_SKIP_RAY": "1"})  # Ray takes long to start: test_backends covers it
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "sum of squares of 0..999:          332833500" in out
    assert "worker processes used:             2" in out
    assert "a remote error:                    ValueError: invalid literal" in out
    assert "Children still running: 0." in out
    assert "Traceback" not in res.stderr
