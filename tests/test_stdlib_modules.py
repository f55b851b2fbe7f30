"""The stdlib modules and attributes that real code reaches through ``import gilfree as multiprocessing``:
``resource_tracker``, ``heap.BufferWrapper``, ``util.get_temp_dir``, ``connection``'s protocol constants,
``shared_memory``'s private hooks.  Where the behaviour should be the stdlib's, each test runs the same
scenario on both.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.dummy
import multiprocessing.heap
import multiprocessing.util
import os
import textwrap
import unittest.mock
from multiprocessing import shared_memory as std_shm

import pytest
from _helpers import run_program, write_program

import gilfree
import gilfree.connection
import gilfree.dummy
import gilfree.util
from gilfree import shared_memory as gf_shm

SHM = "/dev/shm"
IMPLS = {"stdlib": "multiprocessing", "gilfree": "gilfree"}
SHM_MODULES = {"stdlib": std_shm, "gilfree": gf_shm}


def _run(module: str, source: str):
    code = (f"import {module}.resource_tracker, {module}.shared_memory\nmultiprocessing = {module}\n"
            + textwrap.dedent(source))
    return run_program(["-c", code])


# ---------------------------------------------------------------------------------------------------
# resource_tracker


@pytest.mark.parametrize("impl", IMPLS)
def test_unregister_keeps_a_created_segment_after_exit(impl):
    # the common use: "this segment must outlive me", without the tracker removing it at exit
    res = _run(IMPLS[impl], """
        resource_tracker = multiprocessing.resource_tracker
        shm = multiprocessing.shared_memory.SharedMemory(create=True, size=16)
        shm.buf[0] = 7
        resource_tracker.unregister(shm._name, "shared_memory")
        print(shm.name)
        shm.close()
    """)
    assert res.returncode == 0, res.stderr
    name = res.stdout.strip()
    try:
        assert os.path.exists(os.path.join(SHM, name)), res.stderr
        assert "leaked" not in res.stderr and "unlinked segment" not in res.stderr
        seg = gf_shm.SharedMemory(name)
        assert seg.buf[0] == 7
        seg.close()
    finally:
        try:
            os.unlink(os.path.join(SHM, name))
        except FileNotFoundError:
            pass


@pytest.mark.parametrize("impl", IMPLS)
def test_register_removes_a_segment_made_elsewhere_when_the_process_ends(impl):
    res = _run(IMPLS[impl], """
        import _posixshmem, os
        resource_tracker = multiprocessing.resource_tracker
        name = "/gf_rtreg_%d" % os.getpid()
        os.close(_posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
        resource_tracker.register(name, "shared_memory")
        print(name)
    """)
    assert res.returncode == 0, res.stderr
    name = res.stdout.strip().lstrip("/")
    path = os.path.join(SHM, name)
    try:
        assert not os.path.exists(path)  # removed by the time the program has exited
        assert "leaked" in res.stderr if impl == "stdlib" else name in res.stderr  # and reported
    finally:
        if os.path.exists(path):
            os.unlink(path)


@pytest.mark.parametrize("impl", IMPLS)
def test_register_checks_type_and_name(impl):
    res = _run(IMPLS[impl], """
        resource_tracker = multiprocessing.resource_tracker
        try:
            resource_tracker.register("a" * 499, "shared_memory")
        except ValueError:
            print("ValueError")
        print(sorted(resource_tracker.__all__))
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["ValueError", "['ensure_running', 'register', 'unregister']"]


def test_tracker_pid_signals_and_restart():
    # SIGINT/SIGTERM (a Ctrl-C of the group), even during the tracker's start-up, do not stop it; a
    # killed tracker is replaced by ensure_running; a forked child reports the same tracker
    res = _run("gilfree", """
        import os, signal, time
        resource_tracker = multiprocessing.resource_tracker
        t = resource_tracker._resource_tracker
        assert t._pid is None
        resource_tracker.ensure_running()
        pid = t._pid
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        assert t._check_alive() and t._pid == pid
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            resource_tracker.ensure_running()
            os.write(w, b"%d %d" % (t._pid, t._check_alive()))
            os._exit(0)
        assert os.read(r, 100) == b"%d 1" % pid
        os.waitpid(child, 0)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert not t._check_alive()
        resource_tracker.ensure_running()
        assert t._check_alive() and t._pid not in (None, pid)
        assert os.fstat(resource_tracker.getfd())
        print("ok")
    """)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.parametrize("cleanup", [True, False])
def test_separate_tracker_exit_code(cleanup):
    # as 3.13's: a tracker of its own; exit code 1 when its client left something registered
    from gilfree.resource_tracker import ResourceTracker

    tracker = ResourceTracker()
    tracker.ensure_running()
    assert tracker._check_alive() and tracker._exitcode is None
    tracker.register("somename", "dummy")
    if cleanup:
        tracker.unregister("somename", "dummy")
    tracker._stop()
    assert tracker._exitcode == (0 if cleanup else 1)


# ---------------------------------------------------------------------------------------------------
# shared_memory's private hooks (patched and read by programs and tests written for the stdlib)


@pytest.mark.parametrize("impl", SHM_MODULES)
def test_make_filename_is_used_and_retried(impl):
    mod = SHM_MODULES[impl]
    assert mod._USE_POSIX is True
    names = [f"{mod._SHM_NAME_PREFIX}mkfn{os.getpid()}_{i}" for i in range(2)]
    with unittest.mock.patch(f"{mod.__name__}._make_filename") as make:
        make.side_effect = names
        a = mod.SharedMemory(create=True, size=1)
        make.side_effect = names  # the first is taken now: the next one is drawn
        b = mod.SharedMemory(create=True, size=1)
    try:
        assert (a._name, b._name) == (names[0], names[1])
        assert a.name == names[0].lstrip("/")
    finally:
        for s in (a, b):
            s.close()
            s.unlink()


@pytest.mark.parametrize("impl", SHM_MODULES)
def test_flags_of_a_subclass_are_used_to_attach(impl):
    mod = SHM_MODULES[impl]

    class OptionalAttach(mod.SharedMemory):  # type: ignore[name-defined, misc]
        _flags = os.O_CREAT | os.O_RDWR

    class ReadOnlyAttach(mod.SharedMemory):  # type: ignore[name-defined, misc]
        _flags = os.O_RDONLY

    shm = mod.SharedMemory(create=True, size=4096)
    try:
        other = OptionalAttach(shm.name)
        assert other.size == shm.size
        other.close()
        with pytest.raises(PermissionError):  # a read-only descriptor cannot be mapped for writing
            ReadOnlyAttach(shm.name)
        if mod is gf_shm:
            assert os.path.exists(os.path.join(SHM, shm.name))  # (the stdlib unlinks it here)
    finally:
        shm.close()
        try:
            shm.unlink()
        except FileNotFoundError:
            assert mod is std_shm


@pytest.mark.parametrize("impl", SHM_MODULES)
def test_shareable_list_packing_format(impl):
    sl = SHM_MODULES[impl].ShareableList(["howdy", 3, 2.5, None])
    try:
        formats = [sl._get_packing_format(i) for i in range(4)] + [sl._get_packing_format(-1)]
        sl[0] = "hi"
        assert sl._get_packing_format(0) == formats[0]
        with pytest.raises(IndexError):
            sl._get_packing_format(4)
    finally:
        sl.shm.close()
        sl.shm.unlink()
    assert formats == ["8s", "q", "d", "xxxxxx?x", "xxxxxx?x"]


@pytest.mark.parametrize("impl", SHM_MODULES)
def test_shareable_list_str_slots_sized_as_the_stdlib_when_the_bytes_fit(impl):
    # 'encodés': 7 characters, 8 bytes of UTF-8: the stdlib's 8-byte slot holds it exactly
    items = ["encodés", "ascii", "é" * 4]
    sl = SHM_MODULES[impl].ShareableList(items)
    try:
        copy = SHM_MODULES[impl].ShareableList(sl, name=f"gf_slcopy{os.getpid()}")
        try:
            assert list(sl) == list(copy) == items
            assert sl.format == copy.format == "8s8s8s"
        finally:
            copy.shm.close()
            copy.shm.unlink()
    finally:
        sl.shm.close()
        sl.shm.unlink()


# ---------------------------------------------------------------------------------------------------
# heap, util, connection


def _fill(buf, value):
    buf.create_memoryview()[:4] = bytes([value] * 4)


def test_buffer_wrapper_is_shared_with_a_child(ctx):
    buf = gilfree.heap.BufferWrapper(64)
    view = buf.create_memoryview()
    assert len(view) == 64 and buf.size == 64
    view[:5] = bytes(5)  # a block reused from a freed one is not zeroed (nor is the stdlib's)
    p = ctx.Process(target=_fill, args=(buf, 9))
    p.start()
    p.join()
    assert p.exitcode == 0
    assert bytes(view[:5]) == bytes([9, 9, 9, 9, 0])
    assert len(multiprocessing.heap.BufferWrapper(64).create_memoryview()) == len(view)


@pytest.mark.parametrize("mod", [multiprocessing, gilfree], ids=["stdlib", "gilfree"])
def test_util_temp_dir_and_abstract_sockets(mod):
    d = mod.util.get_temp_dir()
    assert os.path.isdir(d) and d == mod.util.get_temp_dir()
    assert mod.util.abstract_sockets_supported is True
    assert mod.util.is_abstract_socket_namespace("\0x") and not mod.util.is_abstract_socket_namespace("x")
    listener = mod.connection.Listener(family="AF_UNIX")
    try:
        assert os.path.dirname(listener.address) == d
    finally:
        listener.close()


@pytest.mark.parametrize("mod", [multiprocessing, gilfree], ids=["stdlib", "gilfree"])
def test_util_log_records_name_the_caller(mod):
    logger = mod.get_logger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(filename)s:%(funcName)s %(message)s"))
    old = logger.level
    logger.setLevel(mod.util.DEBUG)
    logger.addHandler(handler)
    try:
        mod.util.info("i")
        mod.util.debug("d")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    here = os.path.basename(__file__)
    lines = stream.getvalue().splitlines()
    if mod is multiprocessing and not lines[0].startswith(here):
        pytest.skip("this stdlib's util.info names its own file (fixed in 3.13)")
    assert lines == [f"{here}:test_util_log_records_name_the_caller i", f"{here}:test_util_log_records_name_the_caller d"]


@pytest.mark.parametrize("mod", [multiprocessing, gilfree], ids=["stdlib", "gilfree"])
def test_connection_protocol_names_and_windows_pipe_address(mod):
    c = mod.connection
    # public up to 3.11, private from 3.12 on (gilfree has both)
    for name, value in (("CHALLENGE", b"#CHALLENGE#"), ("WELCOME", b"#WELCOME#"), ("FAILURE", b"#FAILURE#")):
        assert getattr(c, name, None) or getattr(c, "_" + name) == value
    assert c.address_type(r"\\.\pipe\x") == "AF_PIPE"
    with pytest.raises(ValueError):
        c.Listener(r"\\.\test")
    with pytest.raises(ValueError):
        c.Client(r"\\.\test")


def test_gilfree_connection_has_the_311_public_names():
    c = gilfree.connection
    assert (c.CHALLENGE, c.WELCOME, c.FAILURE) == (c._CHALLENGE, c._WELCOME, c._FAILURE)
    assert c.MESSAGE_LENGTH >= 20 and c.CONNECTION_TIMEOUT == c.HANDSHAKE_TIMEOUT


# ---------------------------------------------------------------------------------------------------
# spawn, and every public module's __all__


@pytest.mark.parametrize("impl", IMPLS)
def test_spawn_module_imports_without_an_executable(impl):
    # as the stdlib's MiscTestCase: an embedded interpreter may have sys.executable None
    res = run_program(["-c", f"import sys; sys.executable = None; import {IMPLS[impl]}, {IMPLS[impl]}.spawn as s\n"
                             "print(s.get_executable(), s.WINEXE, sorted(s.get_preparation_data('x'))[:2])"])
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert res.stdout.strip() == "None False ['authkey', 'dir']"


def _report_spawn_setup(q, name):
    import gilfree.spawn

    q.put((gilfree.spawn.get_executable(), name))


def test_spawn_set_executable_is_what_children_run(tmp_path):
    import shutil
    import sys

    # a launcher that notes it ran, then becomes this interpreter (a symlink to a venv's python placed
    # elsewhere would start the venv's base interpreter, which cannot import gilfree's dependencies)
    exe = shutil.which(sys.executable) or sys.executable
    marker = tmp_path / "launched"
    link = str(tmp_path / "python-launcher")
    with open(link, "w") as f:
        f.write(f'#!/bin/sh\necho ran >> "{marker}"\nexec "{exe}" "$@"\n')
    os.chmod(link, 0o755)
    old = gilfree.spawn.get_executable()
    gilfree.spawn.set_executable(link)
    try:
        ctx = gilfree.get_context("spawn")
        q = ctx.SimpleQueue()
        p = ctx.Process(target=_report_spawn_setup, args=(q, "x"))
        p.start()
        p.join(60)
        assert p.exitcode == 0  # (a child that failed to start would leave q.get() waiting)
        got = q.get()
        data = gilfree.spawn.get_preparation_data("child-name")
    finally:
        gilfree.spawn.set_executable(old)
    assert "ran" in marker.read_text()  # the child (and any helper it needed) started through it
    assert got[1] == "x"
    assert data["name"] == "child-name" and data["sys_path"] == sys.path


def test_public_modules_have_all_and_its_names():
    # in a fresh interpreter: importing every module here would add them to gilfree's namespace
    res = run_program(["-c", textwrap.dedent("""
        import glob, importlib, os
        import gilfree
        folder = os.path.dirname(gilfree.__file__)
        names = ["gilfree"] + ["gilfree." + os.path.basename(f)[:-3] for f in glob.glob(os.path.join(folder, "*.py"))]
        for name in sorted(names):
            if name.rsplit(".", 1)[-1].startswith("_") and name != "gilfree":
                continue
            mod = importlib.import_module(name)
            assert hasattr(mod, "__all__"), name
            assert [n for n in mod.__all__ if not hasattr(mod, n)] == [], name
        for name in ("resource_tracker", "heap", "spawn"):
            assert name in gilfree.__all__
            assert importlib.import_module("gilfree." + name) is getattr(gilfree, name)
        print("ok")
    """)])
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# ---------------------------------------------------------------------------------------------------
# atexit in children, dummy.active_children


def _register_at_exit(path):
    import atexit

    def write():
        with open(path, "w") as f:
            f.write("deadbeef")

    atexit.register(write)



def test_children_run_their_own_atexit_handlers_only(ctx, tmp_path):
    # as 3.13's stdlib (gh-83856): what the child registers runs when it ends, under every start
    # method; what the parent registered before forking does not run in the child
    import atexit

    marker = tmp_path / "parent"

    def parent_handler():
        marker.write_text("ran in a child")

    atexit.register(parent_handler)
    try:
        out = tmp_path / "out.txt"
        p = ctx.Process(target=_register_at_exit, args=(str(out),))
        p.start()
        p.join()
        assert p.exitcode == 0
        assert out.read_text() == "deadbeef"
        assert not marker.exists()
    finally:
        atexit.unregister(parent_handler)


@pytest.mark.parametrize("mod", [multiprocessing.dummy, gilfree.dummy], ids=["stdlib", "gilfree"])
def test_dummy_active_children_from_any_thread(mod):
    import threading
    import time

    seen = {}

    def run():
        p = mod.Process(target=time.sleep, args=(0.3,))
        assert p not in mod.active_children()
        p.start()
        seen["during"] = p in mod.active_children()
        p.join()
        seen["after"] = p in mod.active_children()

    run()  # the thread that imported the module
    assert seen == {"during": True, "after": False}
    if mod is gilfree.dummy:  # the stdlib keeps the table on the importing thread only
        seen.clear()
        t = threading.Thread(target=run)
        t.start()
        t.join()
        assert seen == {"during": True, "after": False}


# ---------------------------------------------------------------------------------------------------
# forkserver


@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("impl", IMPLS)
def test_a_killed_fork_server_is_replaced(impl, sig, tmp_path):
    # multiprocessing.forkserver._forkserver: code reads its pid to watch or signal the server; a
    # server that died is started again by the next start, and a child it had forked still ends
    res = run_program(write_program(tmp_path, f"""
        import os, signal, time
        mp = multiprocessing
        from {IMPLS[impl]}.forkserver import _forkserver, ensure_running

        def work(evt, delay=0.0):
            time.sleep(delay)
            evt.set()

        if __name__ == "__main__":
            mp.set_start_method("forkserver")
            ensure_running()
            first = _forkserver._forkserver_pid
            evt = mp.Event()
            proc = mp.Process(target=work, args=(evt, 0.5))
            proc.start()
            os.kill(first, signal.{sig})
            time.sleep(1.0)
            evt2 = mp.Event()
            proc2 = mp.Process(target=work, args=(evt2,))
            proc2.start()
            proc2.join()
            proc.join()
            print(evt2.is_set(), proc2.exitcode, evt.is_set(), proc.exitcode in (0, 255),
                  _forkserver._forkserver_pid not in (None, first))
    """, module=IMPLS[impl]))
    assert res.returncode == 0, res.stderr
    # SIGKILL: a new server; SIGINT: the server ignores it (a Ctrl-C reaches the whole process group)
    replaced = "True" if sig == "SIGKILL" else "False"
    assert res.stdout.split() == ["True", "0", "True", "True", replaced], res.stdout + res.stderr
