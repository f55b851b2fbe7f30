"""numpy arrays in shared memory: no copies, writes visible both ways, owned by their creator."""

from __future__ import annotations

import gc
import os
import pickle

import numpy as np
import pytest
from _helpers import run_program, write_program

import gilfree
from gilfree import reduction, util


def add_one(arr, conn):
    arr += 1
    conn.send((arr.shape, float(arr.sum()), type(arr).__name__))
    conn.close()


def segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(util.SHM_PREFIX + "gf_")}


def test_shared_array_basics():
    a = gilfree.shared_array((3, 4), dtype=np.int32, fill=7)
    assert isinstance(a, np.ndarray) and isinstance(a, gilfree.SharedArray)
    assert a.shape == (3, 4) and a.dtype == np.int32 and (a == 7).all()
    z = gilfree.shared_array(5)
    assert z.dtype == np.float64 and (z == 0).all()
    f = gilfree.as_shared(np.arange(6.0).reshape(2, 3))
    assert (f == np.arange(6.0).reshape(2, 3)).all() and isinstance(f, gilfree.SharedArray)
    assert "shared_array(" in repr(f)


def test_pickles_as_a_small_handle_and_maps_the_same_memory():
    a = gilfree.shared_array(1_000_000)
    data = reduction.dumps(a)
    assert len(data) < 1000, "a handle, not 8 MB of data"
    b = reduction.loads(data)
    b[123] = 4.5
    assert a[123] == 4.5
    view = reduction.loads(reduction.dumps(a[10:20:3]))
    view[:] = -1
    assert (a[10:20:3] == -1).all() and a[11] == 0


def test_results_not_in_shared_memory_travel_as_copies():
    a = gilfree.shared_array(10, fill=1.0)
    c = a + 1
    back = pickle.loads(reduction.dumps(c))
    assert (back == 2).all()
    back[0] = 99
    assert a[0] == 1 and c[0] == 2


def test_read_only_views_stay_read_only():
    a = gilfree.shared_array(4)
    v = a[:2]
    v.flags.writeable = False
    back = reduction.loads(reduction.dumps(v))
    assert not back.flags.writeable


def test_child_writes_are_visible(ctx):
    a = gilfree.shared_array((4, 100), fill=1.0)
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=add_one, args=(a[1:3], w))
    p.start()
    w.close()
    shape, total, kind = r.recv()
    p.join(30)
    assert p.exitcode == 0
    assert shape == (2, 100) and total == 400.0 and kind == "SharedArray"
    assert a[0].sum() == 100 and a[1:3].sum() == 400 and a[3].sum() == 100
    r.close()


def test_sent_through_a_pipe_to_a_running_child(ctx):
    a = gilfree.shared_array(50, fill=2.0)
    ours, theirs = ctx.Pipe()
    p = ctx.Process(target=_echo_sum, args=(theirs,))
    p.start()
    theirs.close()
    ours.send(a)
    assert ours.recv() == 100.0
    a[:] = 3.0
    ours.send(a)
    assert ours.recv() == 150.0  # the child sees the new values: the same memory
    ours.send(None)
    p.join(30)
    ours.close()
    assert p.exitcode == 0


def _echo_sum(conn):
    while True:
        arr = conn.recv()
        if arr is None:
            return
        conn.send(float(arr.sum()))


def test_owner_releases_the_segment_when_the_array_goes():
    before = segments()
    a = gilfree.shared_array(1000)
    name = a._gf_segment.name
    assert name in segments() - before
    data = reduction.dumps(a[5:])
    del a
    gc.collect()
    assert name not in segments()
    with pytest.raises(FileNotFoundError, match="owner released it"):
        reduction.loads(data)


PROGRAM = """
import os, sys
import numpy as np

def attach_and_write(arr):
    arr[0] = 42

if __name__ == "__main__":
    a = multiprocessing.shared_array(10)
    p = multiprocessing.Process(target=attach_and_write, args=(a,))
    p.start(); p.join()
    print(a[0], a._gf_segment.name)
    # exits with the array alive: the owner's exit unlinks it, silently
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_owner_exit_cleans_up_without_warnings(tmp_path, method):
    prog = write_program(tmp_path, PROGRAM, "gilfree", method)
    res = run_program(prog)
    assert res.returncode == 0, res.stderr
    value, name = res.stdout.split()
    assert float(value) == 42.0
    assert res.stderr == ""
    assert name not in segments()
