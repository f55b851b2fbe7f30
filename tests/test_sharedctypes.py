"""Shared ctypes objects: ``Value``, ``Array``, ``RawValue``, ``RawArray``, ``synchronized``, ``copy``.

Compared with the stdlib's ``multiprocessing.sharedctypes`` in the same test where they should
match (values, reprs, errors); writes seen across processes under every start method; and the heap
underneath (:mod:`gilfree._shm`): thousands of objects in a few fds, memory reused once collected,
never while a child may still use it, and nothing in ``/dev/shm``.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing as std_mp
import os
import re
import threading

import pytest
from _helpers import running

import gilfree
from gilfree import _shm, sharedctypes

WAIT = 20.0
LIBS = [gilfree, std_mp]
SHM = "/dev/shm"

SAMPLES = [("c", b"x"), ("u", "y"), ("b", -3), ("B", 250), ("h", -300), ("H", 60000), ("i", -5), ("I", 5),
           ("l", -7), ("L", 7), ("q", -(2**40)), ("Q", 2**40), ("f", 1.5), ("d", 2.25)]


class Point(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_double)]




def run_child(ctx, target, *args):
    with running(ctx, target, *args) as p:
        p.join(WAIT)
    assert p.exitcode == 0


def mask(text: str) -> str:
    """A repr without addresses and without the module the ctypes array type was made in."""
    text = re.sub(r"0x[0-9a-f]+", "ADDR", text)
    return re.sub(r"<[\w.]+\.(\w+) object", r"<\1 object", text)


def outcome(fn, *args, **kwargs):
    """``fn``'s value, or the name of the exception it raised."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        return type(e).__name__


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def where(obj):
    """(arena, offset) of a shared ctypes object of ours (or of a wrapper's object)."""
    if isinstance(obj, sharedctypes.SynchronizedBase):
        obj = obj.get_obj()
    block = obj._gilfree_block
    return block.arena.ident, block.offset


def is_free_or_taken_by(place, obj):
    """Whether the block at ``place`` (arena, offset) was just given to ``obj`` or is in the free list."""
    ident, offset = place
    if where(obj) == place:
        return True
    return any(start <= offset < start + size for start, size in _shm.heap._free[ident])


# -- child targets --------------------------------------------------------------------------------

def check_and_write(objs, conn):
    value, dbl, arr, raw, raw_arr, text, point, points = objs
    seen = (value.value, dbl.value, arr[:], raw.value, raw_arr[:], text.value, (point.x, point.y),
            [(p.x, p.y) for p in points])
    value.value = -value.value
    dbl.value *= 2
    arr[1:3] = [70, 80]
    raw.value = 123
    raw_arr[0] = 9.5
    text.value = b"from child"
    point.x, point.y = 11, 0.25
    points[1].x = 33
    conn.send(seen)


def fill_with_numpy(raw, n):
    import numpy as np

    view = np.frombuffer(raw, dtype=np.float64)
    assert view.shape == (n,)
    view[:] = np.arange(n) * 0.5


def count_fds(values, conn):
    conn.send((fd_count(), sum(v.value for v in values)))


def hold_value(value, conn):
    with value.get_lock():
        conn.send(where(value))
        assert conn.poll(WAIT) and conn.recv() == "write"
        value.value = 99
    conn.send("written")
    assert conn.poll(WAIT)


# == Values and arrays compared with the stdlib ====================================================

def test_typecodes_match_stdlib():
    for tc, sample in SAMPLES:
        got = []
        for lib in LIBS:
            v, raw = lib.Value(tc, sample), lib.RawValue(tc, sample)
            zero = lib.Value(tc)
            got.append((repr(v), v.value, repr(raw), raw.value, repr(zero), type(v.get_obj()).__name__))
        assert got[0] == got[1], tc
        assert got[0][1] == sample


def test_arrays_of_each_typecode_match_stdlib():
    for tc, sample in SAMPLES:
        got = []
        for lib in LIBS:
            a, raw = lib.Array(tc, [sample] * 3), lib.RawArray(tc, 2)
            got.append((a[:], len(a), raw[:], type(a).__name__, type(a.get_obj()._type_).__name__))
        assert got[0] == got[1], tc


def test_ctypes_types_match_stdlib():
    got = []
    for lib in LIBS:
        v = lib.Value(ctypes.c_double, 2.5)
        a = lib.Array(ctypes.c_short, [1, -2, 3])
        raw = lib.RawArray(ctypes.c_ubyte, 4)
        rv = lib.RawValue(ctypes.c_longlong, 2**50)
        got.append((repr(v), a[:], raw[:], repr(rv), type(raw).__name__))
    assert got[0] == got[1] == (
        "<Synchronized wrapper for c_double(2.5)>", [1, -2, 3], [0, 0, 0, 0], repr(ctypes.c_longlong(2**50)),
        "c_ubyte_Array_4",
    )


BAD_CALLS = [
    ("Value", ("x",)), ("Value", ("ii",)), ("Value", (5,)), ("Value", ("i", "text")), ("Value", ("d", "1.0")),
    ("Value", ("i", 1, 2)), ("Array", ("x", 3)), ("Array", ("i", -1)), ("Array", ("i", "abc")),
    ("Array", ("i", [1, "a"])), ("Array", ("c", ["ab"])), ("RawValue", ("?",)), ("RawArray", ("z", 2)),
    ("RawArray", ("i", 2.5)),
]


@pytest.mark.parametrize("name, args", BAD_CALLS)
def test_bad_arguments_raise_what_the_stdlib_raises(name, args):
    results = [outcome(getattr(lib, name), *args) for lib in LIBS]
    assert results[0] == results[1]
    assert isinstance(results[0], str) and results[0].endswith("Error")


def test_unknown_typecode_message_lists_the_typecodes():
    with pytest.raises(TypeError, match="unknown typecode 'x'.*cubBhHiIlLqQfd"):
        gilfree.Value("x")


def array_story(lib):
    a = lib.Array("i", [1, 2, 3, 4, 5])
    out = [a[0], a[-1], a[1:3], a[::2], a[::-1], a[:], len(a), list(a)]
    a[1:3] = [7, 8]
    a[-1] = 50
    out.append(a[:])
    a[:] = [0] * 5
    out.append(a[:])
    a[::2] = [1, 1, 1]
    out.append(a[:])
    out += [outcome(a.__getitem__, 5), outcome(a.__setitem__, slice(0, 2), [1]),
            outcome(a.__setitem__, 0, "x"), outcome(a.__setitem__, 9, 1)]
    d = lib.Array("d", 3)
    d[1] = 2.5
    out.append(d[:])
    empty = lib.RawArray("i", 0)
    out += [len(empty), empty[:]]
    return out


def test_array_indexing_and_slicing_match_stdlib():
    assert array_story(gilfree) == array_story(std_mp) == [
        1, 5, [2, 3], [1, 3, 5], [5, 4, 3, 2, 1], [1, 2, 3, 4, 5], 5, [1, 2, 3, 4, 5], [1, 7, 8, 4, 50],
        [0, 0, 0, 0, 0], [1, 0, 1, 0, 1], "IndexError", "ValueError", "TypeError", "IndexError",
        [0.0, 2.5, 0.0], 0, [],
    ]


def string_story(lib):
    s = lib.Array("c", b"hello")
    out = [type(s).__name__, s.value, s.raw, s[:], s[0], s[1:3], len(s)]
    s.value = b"hi"
    out += [s.value, s.raw]
    s.raw = b"HELLO"
    out += [s.value, s.raw]
    s[0] = b"J"
    out.append(s.value)
    out += [outcome(setattr, s, "value", b"too long!"), outcome(setattr, s, "raw", b"0123456789")]
    z = lib.Array("c", 8)
    out += [z.value, z.raw]
    raw = lib.RawArray("c", b"abc")
    out += [type(raw).__name__, raw.value, raw.raw]
    wide = lib.Array("u", "wide")
    out += [type(wide).__name__, wide[:]]
    return out


def test_char_arrays_value_and_raw_match_stdlib():
    assert string_story(gilfree) == string_story(std_mp) == [
        "SynchronizedString", b"hello", b"hello", b"hello", b"h", b"el", 5, b"hi", b"hi\x00lo", b"HELLO",
        b"HELLO", b"JELLO", "ValueError", "ValueError", b"", b"\x00" * 8, "c_char_Array_3", b"abc", b"abc",
        "SynchronizedArray", "wide",
    ]


def test_reprs_match_stdlib():
    got = []
    for lib in LIBS:
        got.append([
            repr(lib.Value("i", 5)), repr(lib.Value("d", 0.5)), repr(lib.Value("c", b"z")),
            repr(lib.RawValue("i", 7)), mask(repr(lib.Array("i", 3))), mask(repr(lib.Array("c", b"ab"))),
            mask(repr(lib.RawArray("i", 2))), mask(repr(lib.Value(Point, 1, 2.0))),
        ])
    assert got[0] == got[1]
    assert got[0][:4] == ["<Synchronized wrapper for c_int(5)>", "<Synchronized wrapper for c_double(0.5)>",
                          "<Synchronized wrapper for c_char(b'z')>", "c_int(7)"]
    assert got[0][4] == "<SynchronizedArray wrapper for <c_int_Array_3 object at ADDR>>"
    assert got[0][7] == "<SynchronizedPoint wrapper for <Point object at ADDR>>"


def lock_story(lib):
    out = []
    v = lib.Value("i", 1)
    out += [type(v.get_lock()).__name__, type(v.get_obj()).__name__, v.get_obj().value]
    with v as entered:
        out += [entered, v.get_lock()._semlock._is_mine() if lib is std_mp else v.get_lock()._is_mine()]
        v.value += 1  # the lock is recursive: .value re-enters it
    v.acquire()
    v.release()
    raw = lib.Value("i", 3, lock=False)
    out += [type(raw).__name__, raw.value, isinstance(raw, ctypes.c_int)]
    raw_arr = lib.Array("i", 2, lock=False)
    out += [type(raw_arr).__name__]
    given = lib.Lock()
    with_lock = lib.Value("i", 4, lock=given)
    out += [with_lock.get_lock() is given, with_lock.value]
    given.acquire()
    out.append(with_lock.get_lock().acquire(False))
    given.release()
    for default in (True, None):
        out.append(type(lib.Array("i", 1, lock=default).get_lock()).__name__)
    out.append(outcome(lib.Value, "i", lock="not a lock"))
    out.append(v.value)
    return out


def test_locks_of_values_match_stdlib():
    assert lock_story(gilfree) == lock_story(std_mp) == [
        "RLock", "c_int", 1, True, True, "c_int", 3, True, "c_int_Array_2", True, 4, False, "RLock", "RLock",
        "AttributeError", 2,
    ]
    assert isinstance(gilfree.Value("i").get_lock(), gilfree.synchronize.RLock)


def synchronized_story(lib):
    sc = lib.sharedctypes
    out = []
    raw = lib.RawValue("i", 6)
    wrapped = sc.synchronized(raw)
    out += [type(wrapped).__name__, wrapped.value, type(wrapped.get_lock()).__name__]
    wrapped.value = 8
    out.append(raw.value)  # the same memory
    lock = lib.RLock()
    out.append(sc.synchronized(lib.RawArray("i", 2), lock).get_lock() is lock)
    out.append(type(sc.synchronized(lib.RawArray("c", 2))).__name__)
    out.append(type(sc.synchronized(lib.RawArray("d", 2))).__name__)
    try:
        sc.synchronized(wrapped)
        out.append("no error")
    except AssertionError as e:
        out.append(str(e))
    copied = sc.copy(raw)
    out += [repr(copied), ctypes.addressof(copied) != ctypes.addressof(raw)]
    copied.value = 1
    out.append(raw.value)
    arr = lib.RawArray("d", [1.0, 2.0])
    arr_copy = sc.copy(arr)
    arr_copy[0] = 5.0
    out += [arr[:], arr_copy[:]]
    point = lib.RawValue(Point, 3, 4.5)
    point_copy = sc.copy(point)
    point_copy.x = 30
    out += [(point.x, point.y), (point_copy.x, point_copy.y)]
    return out


def test_synchronized_and_copy_match_stdlib():
    assert synchronized_story(gilfree) == synchronized_story(std_mp) == [
        "Synchronized", 6, "RLock", 8, True, "SynchronizedString", "SynchronizedArray", "object already synchronized",
        "c_int(8)", True, 8, [1.0, 2.0], [5.0, 2.0], (3, 4.5), (30, 4.5),
    ]
    with pytest.raises(TypeError):  # ours is a TypeError too
        sharedctypes.synchronized(gilfree.Value("i"))


def structure_story(lib):
    v = lib.Value(Point, 1, 2.5)
    out = [type(v).__name__, v.x, v.y]
    v.x, v.y = 10, -1.0
    out += [v.x, v.y, v.get_obj().x]
    raw = lib.RawValue(Point, 7)
    out += [raw.x, raw.y]
    arr = lib.Array(Point, [(1, 1.0), (2, 2.0)])
    arr[1] = Point(5, 5.5)
    out += [type(arr).__name__, [(p.x, p.y) for p in arr[:]]]
    return out


def test_structures_match_stdlib():
    assert structure_story(gilfree) == structure_story(std_mp) == [
        "SynchronizedPoint", 1, 2.5, 10, -1.0, 10, 7, 0.0, "SynchronizedArray", [(1, 1.0), (5, 5.5)],
    ]


@pytest.mark.parametrize("kind", ["RawValue", "RawArray", "Value", "Array"])
def test_sending_through_a_pipe_is_refused_like_stdlib(kind):
    for lib in LIBS:
        obj = getattr(lib, kind)("i", 3)
        a, b = lib.Pipe()
        try:
            with pytest.raises(RuntimeError, match="only be shared between processes through inheritance"):
                a.send(obj)
        finally:
            a.close()
            b.close()


# == Across processes ==============================================================================

def test_writes_are_seen_both_ways(ctx):
    value, dbl, arr = ctx.Value("i", 42), ctx.Value("d", 1.25), ctx.Array("i", [1, 2, 3, 4])
    raw, raw_arr, text = ctx.RawValue("l", 5), ctx.RawArray("d", 3), ctx.Array("c", b"from parent")
    point, points = ctx.Value(Point, 1, 0.5), ctx.Array(Point, [(1, 1.0), (2, 2.0)])
    raw_arr[:] = [0.5, 1.5, 2.5]
    r, w = ctx.Pipe(duplex=False)
    with running(ctx, check_and_write, (value, dbl, arr, raw, raw_arr, text, point, points), w) as p:
        assert r.poll(WAIT)
        seen = r.recv()
        p.join(WAIT)
    assert p.exitcode == 0
    assert seen == (42, 1.25, [1, 2, 3, 4], 5, [0.5, 1.5, 2.5], b"from parent", (1, 0.5), [(1, 1.0), (2, 2.0)])
    assert (value.value, dbl.value, arr[:], raw.value) == (-42, 2.5, [1, 70, 80, 4], 123)
    assert raw_arr[:] == [9.5, 1.5, 2.5]
    assert text.value == b"from child"
    assert (point.x, point.y) == (11, 0.25)
    assert [(q.x, q.y) for q in points] == [(1, 1.0), (33, 2.0)]


def test_numpy_views_share_the_memory(ctx):
    np = pytest.importorskip("numpy")
    n = 10_000
    raw = ctx.RawArray("d", n)
    run_child(ctx, fill_with_numpy, raw, n)
    view = np.frombuffer(raw, dtype=np.float64)
    assert np.array_equal(view, np.arange(n) * 0.5)
    wrapped = ctx.Array("d", 4)
    np.frombuffer(wrapped.get_obj(), dtype=np.float64)[:] = 3.0
    assert wrapped[:] == [3.0] * 4


def test_many_values_use_few_fds():
    before, arenas = fd_count(), len(_shm.heap._arenas)
    values = [gilfree.Value("i", i) for i in range(5000)]
    assert fd_count() - before <= 3
    assert len(_shm.heap._arenas) - arenas <= 3
    assert len({where(v) for v in values}) == 5000
    for v in values[::7]:
        v.value += 1_000_000
    assert [v.value for v in values] == [i + 1_000_000 if i % 7 == 0 else i for i in range(5000)]
    locks = {(v.get_lock()._block.arena.ident, v.get_lock()._block.offset) for v in values}
    assert len(locks) == 5000 and not locks & {where(v) for v in values}


def test_a_spawned_child_maps_each_arena_once():
    ctx = gilfree.get_context("spawn")
    values = [ctx.Value("i", 1) for _ in range(300)]
    r, w = ctx.Pipe(duplex=False)
    with running(ctx, count_fds, values, w) as p:
        assert r.poll(WAIT)
        fds, total = r.recv()
        p.join(WAIT)
    assert total == 300
    assert fds < 30, f"the child holds {fds} fds"


def test_memory_of_collected_objects_is_reused():
    gc.collect()
    arenas = len(_shm.heap._arenas)
    for round_ in range(20):  # 20 rounds of ~0.5 MB: without reuse, 10 new 1 MiB arenas
        batch = [gilfree.Array("d", 64) for _ in range(500)]
        batch[-1][0] = round_
        del batch
        gc.collect()
    assert len(_shm.heap._arenas) - arenas <= 2


def test_nothing_is_created_in_dev_shm(ctx):
    before = set(os.listdir(SHM))
    objs = (ctx.Value("i", 1), ctx.Array("d", 1000), ctx.RawArray("c", 1 << 21), ctx.Lock(), ctx.Event())
    r, w = ctx.Pipe(duplex=False)
    with running(ctx, count_fds, [objs[0]], w) as p:
        assert r.poll(WAIT) and r.recv()[1] == 1
        during = set(os.listdir(SHM))
        p.join(WAIT)
    assert during == before
    assert set(os.listdir(SHM)) == before
    names = {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
             if os.path.exists(f"/proc/self/fd/{fd}")}
    arenas = {objs[0].get_obj()._gilfree_block.arena.fd, objs[2]._gilfree_block.arena.fd}
    for fd in arenas:
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:gilfree-arena")
    # (the stdlib's heap keeps deleted /dev/shm/pym-* files open: earlier tests made stdlib Values)
    assert not [name for name in names if name.startswith(SHM) and not name.startswith(SHM + "/pym-")]


def test_a_value_given_to_a_child_and_dropped_here_keeps_its_memory(ctx):
    """``start()`` forgets its arguments; the child's value must not share memory with new ones."""
    here, there = ctx.Pipe()
    with running(ctx, hold_value, ctx.Value("i", 1), there) as p:
        assert here.poll(WAIT)
        child_value = here.recv()
        gc.collect()
        fresh = [ctx.Value("i", 7) for _ in range(100)]
        blocks = [v.get_obj()._gilfree_block for v in fresh] + [v.get_lock()._block for v in fresh]
        ident, offset = child_value
        assert not [b for b in blocks if b.arena.ident == ident and b.offset <= offset < b.offset + b.size]
        assert not is_free_or_taken_by(child_value, fresh[-1]), "the child's value is in the free list"
        here.send("write")
        assert here.poll(WAIT) and here.recv() == "written"
        here.send("exit")
        p.join(WAIT)
    assert p.exitcode == 0
    assert [v.value for v in fresh] == [7] * 100, "the child wrote into a value of ours"
    assert is_free_or_taken_by(child_value, ctx.Value("i", 0))  # the child is joined: free again


def test_a_long_lived_child_does_not_hold_back_memory_made_after_it_started():
    ctx = gilfree.get_context("fork")
    r, w = ctx.Pipe(duplex=False)
    with running(ctx, wait_for_word, r) as long_lived:
        for i in range(30):
            v = ctx.Value("i", i)
            run_child(ctx, add_one, v)
            assert v.value == i + 1
            del v
            gc.collect()
        assert len(_shm.heap._deferred) <= 4, "blocks the long-lived child cannot have wait for it"
        w.send("stop")
        long_lived.join(WAIT)
    assert long_lived.exitcode == 0
    gilfree.Value("i")  # a malloc looks at the deferred blocks again: no child left to wait for
    assert _shm.heap._deferred == []


def wait_for_word(conn):
    assert conn.poll(WAIT) and conn.recv() == "stop"


def add_one(v):
    v.value += 1


# == The heap =======================================================================================

def test_heap_first_fit_and_merging():
    heap = _shm.Heap()
    a = heap.malloc(10)
    b = heap.malloc(100)
    c = heap.malloc(64)
    assert [x[1:3] for x in (a, b, c)] == [(0, 64), (64, 128), (192, 64)]
    assert a[0] is b[0] is c[0]
    heap.free(*b[:3])
    assert heap.malloc(128)[1] == 64  # the hole is reused first
    heap.free(b[0], 64, 128)
    heap.free(*a[:3])
    heap.free(*c[:3])
    assert heap._free[a[0].ident] == [(0, _shm.ARENA_SIZE)]  # all merged back into one block
    big = heap.malloc(_shm.ARENA_SIZE + 1)
    assert big[0] is not a[0] and big[1] == 0 and big[0].size >= _shm.ARENA_SIZE + 1
    with pytest.raises(ValueError):
        heap.malloc(-1)


def test_heap_free_while_its_lock_is_held_does_not_deadlock():
    """A collection inside ``malloc`` (the heap lock held by this thread) may free a block."""
    heap = _shm.Heap()
    arena, offset, size, _ = heap.malloc(64)
    heap.malloc(64)
    done = threading.Event()

    def free_under_lock():
        with heap._lock:
            heap.free(arena, offset, size)
        done.set()

    t = threading.Thread(target=free_under_lock, daemon=True)
    t.start()
    t.join(WAIT)
    assert done.is_set(), "free() waited for a lock its own thread holds"
    assert heap.malloc(64)[1] == offset  # the postponed free was done by the next malloc


def test_a_forked_child_allocates_from_arenas_of_its_own():
    ctx = gilfree.get_context("fork")
    v = ctx.Value("i", 5)
    r, w = ctx.Pipe(duplex=False)
    run_child(ctx, allocate_in_child, v, w)
    assert r.poll(WAIT)
    assert r.recv() == (False, 50)
    assert v.value == 5
    assert _shm.heap._pid == os.getpid()


def allocate_in_child(v, conn):
    fresh = [gilfree.Value("i", -1) for _ in range(50)]
    shares = any(where(x)[0] == where(v)[0] for x in fresh)
    del fresh
    gc.collect()
    conn.send((shares, len([gilfree.Value("i") for _ in range(50)])))
