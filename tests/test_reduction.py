"""Two-tier pickling, out-of-band buffers, and the errors for what cannot be pickled."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest

import gilfree
from gilfree import reduction


def plain(x):
    return x + 1


class Holder:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def roundtrip(obj):
    return reduction.loads(reduction.dumps(obj))


def test_tier1_by_reference_for_importable_functions():
    data = reduction.dumps(plain)
    assert b"cloudpickle" not in data
    assert roundtrip(plain) is plain


def test_tier2_by_value_for_lambdas_closures_and_local_classes():
    k = 10

    def closure(x):
        return x * k

    class Local:
        def value(self):
            return "local"

    decorated = (lambda f: (lambda *a: f(*a) + 1))(plain)
    assert roundtrip(lambda x: x + 3)(1) == 4
    assert roundtrip(closure)(2) == 20
    assert roundtrip(Local)().value() == "local"
    assert roundtrip(decorated)(1) == 3
    # the stdlib pickler alone cannot
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(lambda: 0)


def test_large_payloads_are_handed_over_not_copied():
    big = b"x" * (4 << 20)
    chunks, oob = reduction.dump_chunks({"payload": big})
    assert any(c is big for c in chunks), "the bytes object itself must reach the sink"
    arr = np.arange(1 << 20, dtype=np.float64)
    chunks, oob = reduction.dump_chunks(arr, oob_min=1 << 16)
    assert len(oob) == 1 and memoryview(oob[0]).nbytes == arr.nbytes
    back = reduction.loads(b"".join(bytes(c) for c in chunks), buffers=[bytearray(memoryview(b)) for b in oob])
    assert np.array_equal(back, arr) and back.flags.writeable


def test_small_buffers_stay_in_band():
    chunks, oob = reduction.dump_chunks(np.arange(10), oob_min=1 << 16)
    assert oob == []


def test_memoryview_pickles():
    view = memoryview(np.arange(12, dtype=np.int32).reshape(3, 4))
    back = roundtrip(view)
    assert back.format == view.format and back.shape == view.shape and back.tolist() == view.tolist()
    strided = memoryview(bytearray(range(10)))[::2]
    assert roundtrip(strided).tolist() == strided.tolist()


@pytest.mark.parametrize("value, path", [
    ({"a": [1, threading.Lock()]}, "obj['a'][1]"),
    ([0, (1, 2, {"k": threading.Lock()})], "obj[1][2]['k']"),
    (Holder(name="x", inner=Holder(lock=threading.Lock())), "obj.inner.lock"),
])
def test_unpicklable_error_names_type_and_path(value, path):
    with pytest.raises(gilfree.PicklingError) as info:
        reduction.dumps(value)
    err = info.value
    assert err.path == path
    assert err.culprit_type == "_thread.lock"
    assert path in str(err) and "_thread.lock" in str(err)
    assert isinstance(err, TypeError) and isinstance(err, pickle.PicklingError)


def test_unpicklable_closure_variable_is_named():
    lock = threading.Lock()

    def uses_lock():
        return lock

    with pytest.raises(gilfree.PicklingError) as info:
        reduction.dumps({"fn": uses_lock})
    assert info.value.path == "obj['fn'].<closure variable 'lock'>"


def test_register_custom_reducer():
    class Point:
        def __init__(self, x):
            self.x = x

    calls = []

    def reduce_point(p):
        calls.append(p.x)
        return Holder, ()

    reduction.ForkingPickler.register(Point, reduce_point)
    try:
        assert isinstance(roundtrip(Point(5)), Holder)
        assert calls == [5]
    finally:
        reduction._extra_reducers.pop(Point)
        reduction._table_copyreg_len = -1


def test_fds_outside_a_channel_go_through_the_resource_sharer():
    # no SCM_RIGHTS channel: the descriptor is held by this process's sharer for one receiver
    from gilfree import resource_sharer

    r, w = gilfree.Pipe(duplex=False)
    try:
        data = reduction.dumps(r)
        assert len(resource_sharer._sharer.table) == 1
        got = reduction.loads(data)
        assert got.fileno() != r.fileno() and resource_sharer._sharer.table == {}
        w.send_bytes(b"ok")
        assert got.recv_bytes() == b"ok"
        got.close()
    finally:
        r.close()
        w.close()
        resource_sharer.stop(10)


def test_authkey_is_not_picklable_outside_spawning():
    with pytest.raises(gilfree.PicklingError, match="security"):
        reduction.dumps(gilfree.current_process().authkey)
