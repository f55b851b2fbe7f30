"""The `gilfree` command: the tour runs every chapter for real and leaves nothing behind."""

from __future__ import annotations

import re
import sys

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
