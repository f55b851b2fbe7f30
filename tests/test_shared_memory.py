"""gilfree.shared_memory: the stdlib API (compared with ``multiprocessing.shared_memory``) and the ownership rule.

The ownership rule: the process that creates a segment owns it; if it ends without unlinking, the
tracker unlinks it and prints one line naming it and the owner's pid.  A process that only attached
never unlinks it implicitly and never causes a warning.  Scenarios that need the program's stderr run
as whole programs.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import struct
import time
from multiprocessing import resource_tracker
from multiprocessing import shared_memory as std_shm

import pytest
from _helpers import run_program, write_program

from gilfree import _tracker, util
from gilfree import shared_memory as gf_shm

SHM = "/dev/shm"
IMPLS = {"stdlib": std_shm, "gilfree": gf_shm}
LEAK_LINE = re.compile(r"gilfree: the shared-memory tracker unlinked segment '([\w.-]*gf_[0-9a-f]+)': its owner \(pid (\d+)\) ended without calling unlink\(\)")


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM, name))


def wait_gone(name: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while exists(name):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def outcome(fn):
    """(exception type, message) raised by ``fn()``, or ("ok", repr of the result)."""
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - the point is to record it
        return type(exc), str(exc)
    return "ok", repr(result)


# ---------------------------------------------------------------------------------------------------
# SharedMemory: the stdlib's API


@pytest.mark.parametrize("impl", IMPLS)
def test_create_write_attach(impl):
    mod = IMPLS[impl]
    shm = mod.SharedMemory(create=True, size=100)
    try:
        assert shm.name.startswith(util.SHM_PREFIX + "gf_" if impl == "gilfree" else "psm_")
        assert shm.size == 100 and len(shm.buf) == 100 and not shm.buf.readonly
        assert bytes(shm.buf) == b"\0" * 100
        assert repr(shm) == f"SharedMemory({shm.name!r}, size=100)"
        assert os.stat(os.path.join(SHM, shm.name)).st_size == 100
        shm.buf[:5] = b"hello"
        other = mod.SharedMemory(shm.name, size=7)  # the size of an existing block is its own
        assert other.name == shm.name and other.size == 100
        assert bytes(other.buf[:5]) == b"hello"
        other.buf[99] = 7
        assert shm.buf[99] == 7
        other.close()
        assert other.buf is None
    finally:
        shm.close()
        shm.unlink()
    assert not exists(shm.name)


@pytest.mark.parametrize("impl", IMPLS)
def test_named_create_and_existing_name(impl):
    mod = IMPLS[impl]
    name = f"gf_test_{impl}_{os.getpid()}"
    shm = mod.SharedMemory(name, create=True, size=10)
    try:
        assert shm.name == name and exists(name)
        with pytest.raises(FileExistsError):
            mod.SharedMemory(name, create=True, size=10)
    finally:
        shm.close()
        shm.unlink()
    with pytest.raises(FileNotFoundError):
        shm.unlink()


def test_generated_names_are_unique_gf_names():
    blocks = [gf_shm.SharedMemory(create=True, size=1) for _ in range(20)]
    try:
        names = {b.name for b in blocks}
        assert len(names) == 20
        assert all(re.fullmatch(re.escape(util.SHM_PREFIX) + r"gf_[0-9a-f]{16}", n) for n in names)
    finally:
        for b in blocks:
            b.close()
            b.unlink()


ERROR_CASES = {
    "create with size 0": lambda m: m.SharedMemory(create=True, size=0),
    "create with no size": lambda m: m.SharedMemory(create=True),
    "negative size": lambda m: m.SharedMemory(create=True, size=-1),
    "negative size when attaching": lambda m: m.SharedMemory("gf_whatever", size=-5),
    "no name and no create": lambda m: m.SharedMemory(),
    "attach to a missing name": lambda m: m.SharedMemory(f"gf_missing_{os.getpid()}"),
    "attach to a missing name, create=False": lambda m: m.SharedMemory(f"gf_missing_{os.getpid()}", create=False, size=10),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_match_stdlib(case):
    expected = outcome(lambda: ERROR_CASES[case](std_shm))
    got = outcome(lambda: ERROR_CASES[case](gf_shm))
    assert expected[0] in (ValueError, FileNotFoundError)
    assert got[0] is expected[0]
    if expected[0] is ValueError:
        assert got[1] == expected[1]


@pytest.mark.parametrize("impl", IMPLS)
def test_close_with_exported_view_and_unlink_twice(impl):
    mod = IMPLS[impl]
    shm = mod.SharedMemory(create=True, size=16)
    view = shm.buf[2:4]
    with pytest.raises(BufferError):
        shm.close()
    view.release()
    shm.close()
    shm.close()  # closing twice is fine
    assert shm.buf is None
    assert exists(shm.name)  # closing does not unlink
    shm.unlink()
    assert not exists(shm.name)
    with pytest.raises(FileNotFoundError):
        shm.unlink()


def test_pickle_attaches_the_same_block_without_owning():
    shm = gf_shm.SharedMemory(create=True, size=32)
    try:
        assert f"/{shm.name}" in _tracker._client.owned
        again = pickle.loads(pickle.dumps(shm))
        assert type(again) is gf_shm.SharedMemory
        assert (again.name, again.size) == (shm.name, shm.size)
        again.buf[0] = 9
        assert shm.buf[0] == 9
        assert shm.__reduce__() == (gf_shm.SharedMemory, (shm.name, False, 32))
        assert again._track is False and shm._track is True
        again.close()
    finally:
        shm.close()
        shm.unlink()
    assert f"/{shm.name}" not in _tracker._client.owned


def test_tracker_client_repr():
    shm = gf_shm.SharedMemory(create=True, size=8)
    try:
        text = repr(_tracker._client)
        assert f"pid={os.getpid()} connected" in text and "owned=" in text
        assert f"address={_tracker.address()!r}" in text
    finally:
        shm.close()
        shm.unlink()


def test_track_false_is_not_registered():
    shm = gf_shm.SharedMemory(create=True, size=8, track=False)
    try:
        assert f"/{shm.name}" not in _tracker._client.owned
    finally:
        shm.close()
        shm.unlink()


def test_numpy_array_on_buf():
    np = pytest.importorskip("numpy")
    shm = gf_shm.SharedMemory(create=True, size=8 * 10)
    try:
        a = np.ndarray((10,), dtype=np.int64, buffer=shm.buf)
        a[:] = np.arange(10)
        b = gf_shm.SharedMemory(shm.name)
        assert list(np.ndarray((10,), dtype=np.int64, buffer=b.buf)) == list(range(10))
        del a
        b.close()
    finally:
        shm.close()
        shm.unlink()


def test_package_does_not_import_multiprocessing():
    code = ("import sys, gilfree.shared_memory as s; b = s.SharedMemory(create=True, size=4); b.unlink(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'multiprocessing'))")
    res = run_program(["-c", code])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]" and res.stderr == ""


# ---------------------------------------------------------------------------------------------------
# ShareableList: the stdlib's API and layout

ITEMS = [1, -2**63, 2**63 - 1, 3.5, -0.0, True, False, "hi", "", "x" * 8, "y" * 17, b"bytes", b"", None, 0]


def _make_list(impl, items):
    return IMPLS[impl].ShareableList(items)


def _dispose(sl):
    sl.shm.close()
    sl.shm.unlink()


def _describe(sl):
    return {
        "items": list(sl),
        "types": [type(v) for v in sl],
        "len": len(sl),
        "format": sl.format,
        "size": sl.shm.size,
        "repr": repr(sl).replace(repr(sl.shm.name), "NAME"),
    }


@pytest.mark.parametrize("items", [ITEMS, [], ["a"], [None, None], [b"\x00ab"]], ids=["mixed", "empty", "one", "nones", "bytes"])
def test_shareable_list_matches_stdlib(items):
    std, gf = _make_list("stdlib", items), _make_list("gilfree", items)
    try:
        assert _describe(gf) == _describe(std)
        assert list(gf) == items
        assert gf.shm.name.startswith(util.SHM_PREFIX + "gf_")
    finally:
        _dispose(std)
        _dispose(gf)


def test_shareable_list_default_is_empty():
    std, gf = std_shm.ShareableList(), gf_shm.ShareableList()
    try:
        assert _describe(gf) == _describe(std)
        assert len(gf) == 0 and gf.shm.size == 16
    finally:
        _dispose(std)
        _dispose(gf)


def _assignments(sl):
    """Apply the same assignments and reads; return what happened at each step."""
    steps = [
        lambda: sl.__setitem__(0, 42),
        lambda: sl.__setitem__(0, "abc"),  # a str into an int slot: fits in 8 bytes
        lambda: sl.__setitem__(0, "123456789"),  # does not fit
        lambda: sl.__setitem__(7, "hello"),  # into the "hi" slot (8 bytes)
        lambda: sl.__setitem__(7, b"12345678"),
        lambda: sl.__setitem__(7, "123456789"),
        lambda: sl.__setitem__(10, "z" * 24),  # the 17-char slot has 24 bytes
        lambda: sl.__setitem__(10, "z" * 25),
        lambda: sl.__setitem__(3, None),
        lambda: sl.__setitem__(-1, 2.25),
        lambda: sl.__setitem__(5, 7),  # bool slot gets an int
        lambda: sl.__setitem__(13, True),  # None slot gets a bool
        lambda: sl.__setitem__(len(sl), 1),
        lambda: sl.__getitem__(len(sl)),
        lambda: sl.__getitem__(-1),
        lambda: sl.__getitem__(-len(sl)),
        lambda: sl.count(0),
        lambda: sl.count("z" * 24),
        lambda: sl.index("z" * 24),
        lambda: sl.index("not there"),
    ]
    return [outcome(step) for step in steps] + [list(sl), sl.format]


def test_shareable_list_assignment_matches_stdlib():
    std, gf = _make_list("stdlib", ITEMS), _make_list("gilfree", ITEMS)
    try:
        expected, got = _assignments(std), _assignments(gf)
        assert got == expected
        assert (IndexError, "assignment index out of range") in got
        assert (IndexError, "index out of range") in got
        assert (ValueError, "bytes/str item exceeds available storage") in got
        assert (ValueError, "'not there' not in this container") in got
    finally:
        _dispose(std)
        _dispose(gf)


@pytest.mark.parametrize("bad", [[1, [2]], [{"a": 1}], [object()], [1 + 2j]], ids=["list", "dict", "object", "complex"])
def test_shareable_list_unsupported_type(bad):
    with pytest.raises(KeyError):
        std_shm.ShareableList(bad)  # the stdlib raises KeyError, before creating anything
    before = set(os.listdir(SHM))
    with pytest.raises(TypeError, match="cannot store item .*the supported types are") as info:
        gf_shm.ShareableList(bad)
    assert isinstance(info.value, KeyError)  # code written for the stdlib still catches it
    assert set(os.listdir(SHM)) == before


def test_shareable_list_int_out_of_range():
    before = set(os.listdir(SHM))
    with pytest.raises(struct.error):
        gf_shm.ShareableList([1, 2**64])  # the stdlib creates the block first and leaks it
    assert set(os.listdir(SHM)) == before
    std, gf = _make_list("stdlib", [1, 2]), _make_list("gilfree", [1, 2])
    try:
        for sl in (std, gf):
            with pytest.raises(struct.error):
                sl[0] = 2**64
            with pytest.raises(KeyError):
                sl[1] = [1]
        assert list(gf) == [1, 2] and gf.format == "qq"  # nothing changed
    finally:
        _dispose(std)
        _dispose(gf)


def test_shareable_list_slices_and_non_integer_indexes_raise_type_error():
    sl = gf_shm.ShareableList([1, 2, 3])
    try:
        with pytest.raises(TypeError):
            sl[0:2]
        with pytest.raises(TypeError):
            sl["0"] = 1
    finally:
        _dispose(sl)


def test_shareable_list_utf8_strings():
    items = ["é" * 7, "日本語テキスト", "ok"]
    sl = gf_shm.ShareableList(items)
    try:
        assert list(sl) == items  # sized by UTF-8 length, not by characters
        assert sl.format == "16s24s8s"
        sl[2] = "ü" * 3  # 6 bytes fit the 8-byte slot
        assert sl[2] == "üüü"
        with pytest.raises(ValueError):
            sl[2] = "ü" * 5
    finally:
        _dispose(sl)


def test_shareable_list_attach_by_name_and_pickle():
    sl = gf_shm.ShareableList([1, "two", None])
    try:
        other = gf_shm.ShareableList(name=sl.shm.name)
        assert list(other) == [1, "two", None]
        other[0] = 10
        assert sl[0] == 10
        again = pickle.loads(pickle.dumps(sl))
        assert type(again) is gf_shm.ShareableList and again.shm.name == sl.shm.name
        assert list(again) == [10, "two", None]
        assert gf_shm.ShareableList[int] is not None  # usable in annotations, as the stdlib's
        other.shm.close()
        again.shm.close()
    finally:
        _dispose(sl)


def test_shareable_list_interoperates_with_stdlib():
    items = [7, 2.5, "text", b"raw", None, True]
    gf = gf_shm.ShareableList(items)
    try:
        std = std_shm.ShareableList(name=gf.shm.name)
        resource_tracker.unregister(std.shm._name, "shared_memory")  # the stdlib registers attachers
        assert list(std) == items and std.format == gf.format
        std[0] = "seven"
        assert gf[0] == "seven"
        std.shm.close()
    finally:
        _dispose(gf)
    std = std_shm.ShareableList(items)
    try:
        gf = gf_shm.ShareableList(name=std.shm.name)
        assert list(gf) == items
        gf[1] = 4.0
        assert std[1] == 4.0
        gf.shm.close()
    finally:
        _dispose(std)


# ---------------------------------------------------------------------------------------------------
# Across processes, in this process's tree (every start method)


def child_writes(name: str, data: bytes) -> None:
    shm = gf_shm.SharedMemory(name)
    shm.buf[: len(data)] = data
    shm.close()


def child_writes_received(conn) -> None:
    shm = conn.recv()
    shm.buf[:4] = b"pong"
    conn.send((shm.name, shm.size, shm._track, sorted(_tracker._client.owned)))
    conn.close()


def child_fills_list(sl) -> None:
    for i in range(len(sl)):
        sl[i] = sl[i] * 2


def child_creates_and_waits(conn) -> None:
    shm = gf_shm.SharedMemory(create=True, size=64)
    conn.send(shm.name)
    time.sleep(60)


def child_reports_tracker(conn) -> None:
    shm = gf_shm.SharedMemory(create=True, size=8)
    conn.send((_tracker.address(), _tracker.tracker_pid()))
    shm.close()
    shm.unlink()
    conn.close()


def test_child_attaches_by_name_and_writes(ctx):
    shm = gf_shm.SharedMemory(create=True, size=64)
    try:
        p = ctx.Process(target=child_writes, args=(shm.name, b"from the child"))
        p.start()
        p.join(30)
        assert p.exitcode == 0
        assert bytes(shm.buf[:14]) == b"from the child"
        assert exists(shm.name)  # the child only attached: it did not unlink
    finally:
        shm.close()
        shm.unlink()


def test_pickled_shared_memory_attaches_without_owning(ctx):
    shm = gf_shm.SharedMemory(create=True, size=16)
    parent, child = ctx.Pipe()
    try:
        p = ctx.Process(target=child_writes_received, args=(child,))
        p.start()
        parent.send(shm)
        name, size, tracked, owned = parent.recv()
        p.join(30)
        assert p.exitcode == 0
        assert (name, size, tracked, owned) == (shm.name, 16, False, [])
        assert bytes(shm.buf[:4]) == b"pong"
        assert exists(shm.name)
    finally:
        parent.close()
        child.close()
        shm.close()
        shm.unlink()


def test_shareable_list_passed_to_child(ctx):
    sl = gf_shm.ShareableList([1, 2.5, "ab"])
    try:
        p = ctx.Process(target=child_fills_list, args=(sl,))
        p.start()
        p.join(30)
        assert p.exitcode == 0
        assert list(sl) == [2, 5.0, "abab"]
    finally:
        _dispose(sl)


def test_child_uses_the_parents_tracker(ctx):
    shm = gf_shm.SharedMemory(create=True, size=8)  # this process now has a tracker
    parent, child = ctx.Pipe()
    try:
        p = ctx.Process(target=child_reports_tracker, args=(child,))
        p.start()
        address, own_tracker = parent.recv()
        p.join(30)
        assert p.exitcode == 0
        assert address == _tracker.address() and address is not None
        assert own_tracker is None  # the child connected to ours instead of starting one
    finally:
        parent.close()
        child.close()
        shm.close()
        shm.unlink()


def test_sigkilled_owner_segment_is_removed(ctx):
    parent, child = ctx.Pipe()
    p = ctx.Process(target=child_creates_and_waits, args=(child,))
    p.start()
    try:
        assert parent.poll(30)
        name = parent.recv()
        assert exists(name)
        other = gf_shm.SharedMemory(name)  # attached here: must not keep it alive
        p.kill()
        p.join(10)
        assert p.exitcode == -signal.SIGKILL
        assert wait_gone(name), f"{name} still in {SHM} 5 s after its owner was killed"
        assert other.size == 64
        other.buf[0] = 1  # the mapping stays valid after the unlink
        other.close()
    finally:
        p.kill()
        p.join(10)
        parent.close()
        child.close()


def test_tracker_ignores_sigint():
    shm = gf_shm.SharedMemory(create=True, size=8)
    try:
        pid = _tracker.tracker_pid()
        if pid is None:
            pytest.skip("this process's tracker was started by an ancestor")
        os.kill(pid, signal.SIGINT)
        time.sleep(0.2)
        assert _tracker.tracker_pid() == pid
        with open(f"/proc/{pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] != "Z"
    finally:
        shm.close()
        shm.unlink()


# ---------------------------------------------------------------------------------------------------
# Whole programs: stderr, exit, the tracker's life

PROGRAM_HEAD = """
import os, signal, sys, time
from gilfree import _tracker
from gilfree.shared_memory import SharedMemory, ShareableList

def exists(name):
    return os.path.exists("/dev/shm/" + name)
"""


def run(tmp_path, method, body, name="prog.py"):
    path = write_program(tmp_path, PROGRAM_HEAD + body, method=method, name=name)
    res = run_program(path, timeout=60)
    assert res.returncode == 0, res.stderr
    return res


def leak_lines(stderr: str) -> list[tuple[str, int]]:
    found = [(m.group(1), int(m.group(2))) for m in LEAK_LINE.finditer(stderr)]
    assert len(found) == len(stderr.splitlines()), stderr  # nothing else on stderr
    return found


def test_attacher_exits_without_unlinking_no_warning(tmp_path, method):
    res = run(tmp_path, method, """
def attach_and_leave(name):
    shm = SharedMemory(name)
    shm.buf[:2] = b"ok"
    # neither close() nor unlink(): only attached, so nothing happens at exit

def attach_and_crash(name):
    shm = SharedMemory(name)
    shm.buf[2] = 33
    os.kill(os.getpid(), signal.SIGKILL)

if __name__ == "__main__":
    shm = SharedMemory(create=True, size=10)
    for target in (attach_and_leave, attach_and_crash):
        p = multiprocessing.Process(target=target, args=(shm.name,))
        p.start()
        p.join()
    time.sleep(0.2)
    print(exists(shm.name), bytes(shm.buf[:3]))
    shm.close()
    shm.unlink()
    print(exists(shm.name))
""")
    assert res.stdout.split("\n")[:2] == ["True b'ok!'", "False"]
    assert res.stderr == ""


def test_owner_exits_without_unlinking_is_reported(tmp_path, method):
    res = run(tmp_path, method, """
def create_and_leave(conn):
    shm = SharedMemory(create=True, size=10)
    shm.buf[0] = 5
    conn.send((shm.name, os.getpid()))
    conn.recv()  # the parent attached

if __name__ == "__main__":
    parent, child = multiprocessing.Pipe()
    p = multiprocessing.Process(target=create_and_leave, args=(child,))
    p.start()
    name, pid = parent.recv()
    attached = SharedMemory(name)
    parent.send("attached")
    p.join()
    # the owner's exit waited for the tracker's clean-up: gone already
    print(name, pid, exists(name), attached.buf[0])
    attached.close()
""")
    name, pid, still_there, value = res.stdout.split()
    assert (still_there, value) == ("False", "5")
    assert leak_lines(res.stderr) == [(name, int(pid))]


@pytest.mark.parametrize("parent_has_tracker", [True, False], ids=["shared-tracker", "child-starts-tracker"])
def test_sigkilled_owner_is_reported(tmp_path, method, parent_has_tracker):
    res = run(tmp_path, method, f"""
def create_and_hang(conn):
    a = SharedMemory(create=True, size=10)
    b = ShareableList([1, 2, 3])
    conn.send((a.name, b.shm.name, os.getpid()))
    time.sleep(60)

if __name__ == "__main__":
    mine = SharedMemory(create=True, size=10) if {parent_has_tracker} else None
    parent, child = multiprocessing.Pipe()
    p = multiprocessing.Process(target=create_and_hang, args=(child,))
    p.start()
    a, b, pid = parent.recv()
    p.kill()
    p.join()
    deadline = time.monotonic() + 5
    while (exists(a) or exists(b)) and time.monotonic() < deadline:
        time.sleep(0.02)
    print(a, b, pid, exists(a), exists(b))
    if mine is not None:
        mine.close()
        mine.unlink()
""")
    a, b, pid, a_there, b_there = res.stdout.split()
    assert (a_there, b_there) == ("False", "False")
    assert sorted(leak_lines(res.stderr)) == sorted([(a, int(pid)), (b, int(pid))])


def test_unlink_by_an_unconnected_attacher_does_not_cost_the_next_owner_its_block(tmp_path, method):
    # issue 11 item 11: an attacher with no tracker connection unlinks the owner's block, a new owner
    # creates the same name, the first owner exits: the tracker must not remove the new owner's block
    res = run(tmp_path, method, """
def first_owner(conn, name):
    shm = SharedMemory(name, create=True, size=10)
    conn.send("created")
    conn.recv()  # the name now points to the second owner's block; exit without unlink()

def attacher(name):
    assert _tracker._client.sock is None  # only attaches: no connection to the tracker
    SharedMemory(name).unlink()

if __name__ == "__main__":
    name = "%s"
    parent, conn = multiprocessing.Pipe()
    p = multiprocessing.Process(target=first_owner, args=(conn, name))
    p.start()
    assert parent.recv() == "created"
    a = multiprocessing.Process(target=attacher, args=(name,))
    a.start()
    a.join()
    second = SharedMemory(name, create=True, size=20)  # the new owner: this process
    second.buf[0] = 7
    parent.send("go")
    p.join()  # its goodbye waited for the tracker's clean-up
    print(p.exitcode, a.exitcode, exists(name))
    second.close()
    second.unlink()
""" % (f"gf_t11_{os.getpid()}_{method}",))
    assert res.stdout.split() == ["0", "0", "True"], res.stdout
    assert res.stderr == ""  # nothing was unlinked on the first owner's behalf: it was not its block


def test_tracker_exits_after_its_last_client(tmp_path, method):
    res = run(tmp_path, method, """
def child(conn):
    shm = SharedMemory(create=True, size=10)
    conn.send((_tracker.address(), _tracker.tracker_pid()))
    shm.close()
    shm.unlink()

if __name__ == "__main__":
    shm = SharedMemory(create=True, size=10)
    parent, conn = multiprocessing.Pipe()
    p = multiprocessing.Process(target=child, args=(conn,))
    p.start()
    address, child_tracker = parent.recv()
    p.join()
    print(_tracker.tracker_pid(), address == _tracker.address(), child_tracker)
    shm.close()
    shm.unlink()
""")
    pid, same_address, child_tracker = res.stdout.split()
    assert (same_address, child_tracker) == ("True", "None")
    assert res.stderr == ""
    # the program reaped its tracker at exit: the pid is gone (not even a zombie)
    assert not os.path.exists(f"/proc/{pid}")


def test_owner_unlinks_normally_no_warning_no_leftover(tmp_path, method):
    res = run(tmp_path, method, """
def child(name):
    sl = ShareableList(name=name)
    sl[0] = "done"
    own = SharedMemory(create=True, size=100)
    own.close()
    own.unlink()

if __name__ == "__main__":
    sl = ShareableList(["todo", 1])
    p = multiprocessing.Process(target=child, args=(sl.shm.name,))
    p.start()
    p.join()
    print(sl[0], p.exitcode)
    sl.shm.close()
    sl.shm.unlink()
""")
    assert res.stdout.split() == ["done", "0"]
    assert res.stderr == ""


def test_tracker_is_restarted_if_killed(tmp_path):
    res = run(tmp_path, None, """
if __name__ == "__main__":
    a = SharedMemory(create=True, size=10)
    first = _tracker.tracker_pid()
    os.kill(first, signal.SIGKILL)
    os.waitpid(first, 0)
    b = SharedMemory(create=True, size=10)  # a new tracker takes over a and b
    second = _tracker.tracker_pid()
    print(a.name, b.name, os.getpid(), first != second and second is not None)
""")
    a, b, pid, restarted = res.stdout.split()
    assert restarted == "True"
    assert sorted(leak_lines(res.stderr)) == sorted([(a, int(pid)), (b, int(pid))])
    assert not exists(a) and not exists(b)


def test_track_false_is_left_to_the_program(tmp_path):
    res = run(tmp_path, None, """
if __name__ == "__main__":
    shm = SharedMemory(create=True, size=10, track=False)
    print(shm.name, _tracker.tracker_pid())
""")
    name, tracker = res.stdout.split()
    try:
        assert tracker == "None"  # no tracker was even started
        assert res.stderr == ""
        assert exists(name)
    finally:
        gf_shm.SharedMemory(name).unlink()


def test_program_killed_by_sigkill_leaves_nothing(tmp_path):
    # The whole program dies at once; its tracker (an orphan now) cleans up and exits.
    path = write_program(tmp_path, PROGRAM_HEAD + """
shm = SharedMemory(create=True, size=10)
print(shm.name, _tracker.tracker_pid(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
""")
    res = run_program(path, timeout=30)
    assert res.returncode == -signal.SIGKILL
    name, tracker = res.stdout.split()
    assert wait_gone(name)
    assert leak_lines(res.stderr)[0][0] == name
