"""Process semantics under every start method, compared with the stdlib where they should match."""

from __future__ import annotations

import multiprocessing as std_mp
import os
import re
import signal
import sys
import time

import pytest
from _helpers import mask_pids, run_program, write_program

import gilfree


# Module-level targets: picklable by reference under every start method.
def noop() -> None:
    pass


def exit_with(code) -> None:
    sys.exit(code)


def raise_value_error() -> None:
    raise ValueError("boom in child")


def sleep_for(seconds: float) -> None:
    time.sleep(seconds)


def report(conn, *args, **kwargs) -> None:
    p = gilfree.current_process()
    parent = gilfree.parent_process()
    conn.send({
        "args": args,
        "kwargs": kwargs,
        "name": p.name,
        "pid": os.getpid(),
        "daemon": p.daemon,
        "authkey": bytes(p.authkey),
        "parent_pid": parent.pid if parent else None,
        "parent_name": parent.name if parent else None,
        "parent_alive": parent.is_alive() if parent else None,
        "start_method": gilfree.get_start_method(),
    })
    conn.close()


def start_grandchild(conn) -> None:
    child = gilfree.Process(target=report, args=(conn, "grand"))
    child.start()
    child.join()


def try_child_of_daemon(conn) -> None:
    try:
        gilfree.Process(target=noop).start()
    except AssertionError as e:
        conn.send(str(e))


class Doubler(gilfree.Process):
    def __init__(self, conn, x):
        super().__init__()
        self.conn, self.x = conn, x

    def run(self):
        self.conn.send(self.x * 2)


def test_target_args_kwargs_and_identity(ctx):
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=report, args=(w, 1, "two"), kwargs={"three": 3}, name="worker-x")
    assert p.exitcode is None and p.pid is None
    p.start()
    w.close()
    got = r.recv()
    p.join(30)
    assert p.exitcode == 0
    assert got["args"] == (1, "two") and got["kwargs"] == {"three": 3}
    assert got["name"] == "worker-x"
    assert got["pid"] == p.pid == p.ident
    assert got["parent_pid"] == os.getpid()
    assert got["parent_name"] == "MainProcess"
    assert got["parent_alive"] is True
    assert got["authkey"] == bytes(gilfree.current_process().authkey)
    assert got["start_method"] == ctx.get_start_method()
    r.close()


@pytest.mark.parametrize("code, expected", [(0, 0), (3, 3), (None, 0), ("message", 1), (True, 1)])
def test_sys_exit_codes(ctx, code, expected):
    p = ctx.Process(target=exit_with, args=(code,))
    p.start()
    p.join(30)
    assert p.exitcode == expected


def test_exception_gives_exitcode_1(ctx):
    p = ctx.Process(target=raise_value_error)
    p.start()
    p.join(30)
    assert p.exitcode == 1


def test_terminate_and_kill_give_negative_signal(ctx):
    for action, sig in (("terminate", signal.SIGTERM), ("kill", signal.SIGKILL)):
        p = ctx.Process(target=sleep_for, args=(60,))
        p.start()
        assert p.is_alive()
        getattr(p, action)()
        p.join(30)
        assert p.exitcode == -sig
        assert not p.is_alive()
        assert f"exitcode=-{signal.Signals(sig).name}" in repr(p)


def test_join_timeout_sentinel_and_wait(ctx):
    p = ctx.Process(target=sleep_for, args=(0.5,))
    p.start()
    t0 = time.monotonic()
    p.join(0.05)
    assert p.is_alive() and p.exitcode is None
    assert time.monotonic() - t0 < 5
    assert gilfree.connection.wait([p.sentinel], timeout=30) == [p.sentinel]
    p.join()
    assert p.exitcode == 0


def test_state_errors_match_stdlib(ctx):
    std = std_mp.get_context(ctx.get_start_method())
    for lib in (ctx, std):
        p = lib.Process(target=sleep_for, args=(30,))
        with pytest.raises(ValueError):
            _ = p.sentinel
        with pytest.raises(AssertionError):
            p.join()
        p.start()
        with pytest.raises(AssertionError):
            p.start()
        with pytest.raises(AssertionError):
            p.daemon = True
        with pytest.raises(ValueError, match="still running"):
            p.close()
        p.kill()
        p.join(30)
        p.close()
        p.close()  # idempotent
        for attr in ("exitcode", "pid", "sentinel"):
            with pytest.raises(ValueError):
                getattr(p, attr)
        with pytest.raises(ValueError):
            p.is_alive()


def test_repr_matches_stdlib_shape(ctx):
    std = std_mp.get_context(ctx.get_start_method())
    reprs = []
    for lib in (ctx, std):
        p = lib.Process(target=noop, name="r", daemon=True)
        before = repr(p)
        p.start()
        p.join(30)
        reprs.append((before, mask_pids(repr(p))))
    (g_before, g_after), (s_before, s_after) = reprs
    assert g_before == s_before
    assert g_after == s_after
    assert re.fullmatch(r"<\w+ name='r' pid=<N> parent=<N> stopped exitcode=0 daemon>", g_after)


def test_default_names_match_stdlib(ctx):
    std = std_mp.get_context(ctx.get_start_method())
    g, s = ctx.Process(target=noop), std.Process(target=noop)
    assert re.sub(r"\d+", "N", g.name) == re.sub(r"\d+", "N", s.name)
    assert type(g).__name__ == type(s).__name__


def test_process_subclass(ctx):
    r, w = ctx.Pipe()
    cls = {"fork": gilfree.context.ForkProcess, "spawn": gilfree.context.SpawnProcess,
           "forkserver": gilfree.context.ForkServerProcess}[ctx.get_start_method()]

    class Sub(cls):  # a local class: pickled by value under spawn and forkserver
        def __init__(self, conn):
            super().__init__()
            self.conn = conn

        def run(self):
            self.conn.send(("sub", self.name))

    p = Sub(w)
    p.start()
    assert r.recv(), ("sub", p.name)
    p.join(30)
    assert p.exitcode == 0


def test_lambda_and_closure_targets(ctx):
    r, w = ctx.Pipe(duplex=False)
    factor = 7

    def closure(x):
        w.send(x * factor)

    procs = [ctx.Process(target=lambda: w.send("lambda")), ctx.Process(target=closure, args=(6,))]
    for p in procs:
        p.start()
        p.join(30)
        assert p.exitcode == 0
    assert {r.recv(), r.recv()} == {"lambda", 42}


def test_active_children_and_daemon(ctx):
    p = ctx.Process(target=sleep_for, args=(30,), daemon=True)
    assert p.daemon
    p.start()
    assert p in gilfree.active_children()
    p.terminate()
    p.join(30)
    assert p not in gilfree.active_children()


def test_daemon_cannot_have_children(ctx):
    r, w = ctx.Pipe()
    p = ctx.Process(target=try_child_of_daemon, args=(w,), daemon=True)
    p.start()
    assert "daemonic processes are not allowed to have children" in r.recv()
    p.join(30)


def test_nested_child_uses_parent_start_method(ctx):
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=start_grandchild, args=(w,))
    p.start()
    got = r.recv()
    p.join(30)
    assert p.exitcode == 0
    assert got["args"] == ("grand",)
    assert got["parent_pid"] == p.pid
    assert got["start_method"] == ctx.get_start_method()


def test_current_and_parent_process_in_main():
    assert gilfree.current_process().name == "MainProcess"
    assert gilfree.parent_process() is None
    assert gilfree.cpu_count() == os.cpu_count()


def test_unpicklable_argument_raises_in_parent():
    import threading

    ctx = gilfree.get_context("spawn")
    p = ctx.Process(target=noop, args=(threading.Lock(),))
    with pytest.raises(gilfree.PicklingError) as info:
        p.start()
    assert "_thread.lock" in str(info.value)
    assert "_args" in info.value.path
    assert gilfree.active_children() == []


def test_context_api():
    assert gilfree.get_all_start_methods()[0] == gilfree.get_start_method()
    assert set(gilfree.get_all_start_methods()) == {"fork", "spawn", "forkserver"}
    assert gilfree.get_context("spawn").Process is gilfree.context.SpawnProcess
    with pytest.raises(ValueError, match="cannot find context"):
        gilfree.get_context("teleport")
    with pytest.raises(ValueError):
        gilfree.get_context("spawn").set_start_method("fork")
    assert issubclass(gilfree.Process, gilfree.process.BaseProcess)


# ---------------------------------------------------------------------------------------------------
# Whole programs: stdout/stderr and exit status as a user sees them.

EXCEPTION_PROGRAM = """
def f():
    raise ValueError("boom in child")

if __name__ == "__main__":
    p = multiprocessing.Process(target=f)
    p.start()
    p.join()
    print("exitcode", p.exitcode)
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_child_traceback_matches_stdlib(tmp_path, method):
    outs = []
    for module in ("multiprocessing", "gilfree"):
        prog = write_program(tmp_path, EXCEPTION_PROGRAM, module, method, name=f"{module}_exc.py")
        res = run_program(prog)
        assert res.returncode == 0, res.stderr
        lines = [line for line in res.stderr.splitlines() if not line.startswith("  ")]
        outs.append((res.stdout, lines[0], lines[-1]))
    assert outs[0] == outs[1]
    assert outs[1][0] == "exitcode 1\n"
    assert outs[1][1] == "Process Process-1:"
    assert outs[1][2] == "ValueError: boom in child"


MAIN_FUNCS_PROGRAM = """
import sys

def square(x, conn):
    conn.send(x * x)

class Box:
    def __init__(self, v):
        self.v = v

def unbox(box, conn):
    conn.send(box.v)

if __name__ == "__main__":
    r, w = multiprocessing.Pipe()
    offset = 100
    targets = [
        (square, (3,)),
        (unbox, (Box("boxed"),)),
        (lambda conn: conn.send("lambda"), ()),
        ((lambda k: (lambda conn: conn.send(k + offset)))(5), ()),
    ]
    for fn, args in targets:
        p = multiprocessing.Process(target=fn, args=args + (w,))
        p.start()
        print(r.recv())
        p.join()
        assert p.exitcode == 0, p.exitcode
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_main_functions_lambdas_closures_as_targets(tmp_path, method):
    prog = write_program(tmp_path, MAIN_FUNCS_PROGRAM, "gilfree", method)
    res = run_program(prog)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["9", "boxed", "lambda", "105"]


def test_stdlib_cannot_send_lambda_under_spawn(tmp_path):
    """The pain gilfree removes: the same program fails with the stdlib."""
    prog = write_program(tmp_path, MAIN_FUNCS_PROGRAM, "multiprocessing", "spawn")
    res = run_program(prog)
    assert res.returncode != 0
    assert "pickle" in res.stderr.lower()


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_functions_of_python_c_main_travel_by_value(method):
    code = (
        "import gilfree as mp\n"
        f"mp.set_start_method({method!r}, force=True)\n"
        "def f(conn):\n    conn.send('from -c')\n"
        "r, w = mp.Pipe()\n"
        "p = mp.Process(target=f, args=(w,)); p.start(); print(r.recv()); p.join(); print(p.exitcode)\n"
    )
    res = run_program(["-c", code])
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["from", "-c", "0"]


def test_main_run_as_module(tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "app.py").write_text(
        "import gilfree as mp\n"
        "def f(conn):\n    conn.send(__name__)\n"
        "if __name__ == '__main__':\n"
        "    mp.set_start_method('spawn')\n"
        "    r, w = mp.Pipe()\n"
        "    p = mp.Process(target=f, args=(w,)); p.start(); print(r.recv()); p.join(); print(p.exitcode)\n"
    )
    res = run_program(["-m", "mypkg.app"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["__mp_main__", "0"]


UNGUARDED = """
def f():
    print("child ran")

p = multiprocessing.Process(target=f)
p.start()
p.join()
print("parent done")
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_missing_main_guard_gives_actionable_error(tmp_path, method):
    prog = write_program(tmp_path, UNGUARDED, "gilfree", method)
    res = run_program(prog)
    assert res.returncode == 1
    assert "bootstrapping phase" not in res.stderr
    assert 'if __name__ == "__main__":' in res.stderr
    line = prog.read_text().splitlines().index("p.start()") + 1
    assert f"line {line}" in res.stderr  # names the line that started the process
    assert "child ran" not in res.stdout


def test_missing_main_guard_is_fine_under_fork(tmp_path):
    prog = write_program(tmp_path, UNGUARDED, "gilfree", "fork")
    res = run_program(prog)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["child ran", "parent done"]


ALTERNATIVE_GUARD = """
import os

def f():
    print("child ran")

if multiprocessing.current_process().name == "MainProcess":
    p = multiprocessing.Process(target=f)
    p.start()
    p.join()
    print("parent done")
"""


def test_other_guards_are_accepted(tmp_path):
    prog = write_program(tmp_path, ALTERNATIVE_GUARD, "gilfree", "spawn")
    res = run_program(prog)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["child ran", "parent done"]


MAIN_RUN_ONCE = """
import {module} as multiprocessing
# a __main__.py (or ipython.py) is never run again in a child: unguarded starts are fine there
multiprocessing.set_start_method({method!r}, force=True)
with multiprocessing.Pool(2) as pool:
    print(sorted(pool.map(int, ["3", "1", "2"])))
"""


@pytest.mark.parametrize("module", ["gilfree", "multiprocessing"])
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
@pytest.mark.parametrize("layout", ["directory", "package", "ipython"])
def test_main_modules_that_children_never_run_need_no_guard(tmp_path, method, module, layout):
    """`python dir`, `python -m pkg` and an `ipython.py` launcher: the child does not run them again (as
    in the stdlib), so a start from unguarded code there is no fork bomb (before: refused with
    MainModuleNotGuardedError; CPython's test_multiprocessing_main_handling)."""
    source = MAIN_RUN_ONCE.format(module=module, method=method)
    if layout == "directory":
        (tmp_path / "app").mkdir()
        (tmp_path / "app" / "__main__.py").write_text(source)
        argv = [str(tmp_path / "app")]
    elif layout == "package":
        (tmp_path / "pkg").mkdir()
        (tmp_path / "pkg" / "__init__.py").write_text("")
        (tmp_path / "pkg" / "__main__.py").write_text(source)
        argv = ["-m", "pkg"]
    else:
        (tmp_path / "ipython.py").write_text(source)
        argv = [str(tmp_path / "ipython.py")]
    res = run_program(argv, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[0] == "[1, 2, 3]"


IPYTHON_FUNCTIONS = """
import gilfree as multiprocessing
# no guard: an ipython.py launcher is never run again in a child, so its functions travel by value

def triple(x):
    return 3 * x

multiprocessing.set_start_method({method!r}, force=True)
with multiprocessing.Pool(2) as pool:
    print(pool.map(triple, [1, 2, 3]))
with multiprocessing.ProcessPoolExecutor(2) as ex:
    print(list(ex.map(triple, [4, 5])))
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_functions_of_an_ipython_launcher_travel_by_value(tmp_path, method):
    """One rule (reduction.main_runs_in_children) for "the child runs the main module again" and "its
    functions travel by reference" (before: ipython.py was not run in the child, but its functions were
    pickled by reference, and the child could not find them).  The stdlib fails here (its worker cannot
    unpickle ``__main__.triple``), so this runs on gilfree alone."""
    (tmp_path / "ipython.py").write_text(IPYTHON_FUNCTIONS.format(method=method))
    res = run_program([str(tmp_path / "ipython.py")], cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["[3, 6, 9]", "[12, 15]"], (res.stdout, res.stderr)


ORPHAN_PROGRAM = """
import sys, time

def sleeper():
    time.sleep(60)

if __name__ == "__main__":
    p = multiprocessing.Process(target=sleeper, daemon=True)
    p.start()
    print(p.pid, flush=True)
    time.sleep(60)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_daemonic_children_die_with_a_killed_parent(tmp_path, method):
    import subprocess

    prog = write_program(tmp_path, ORPHAN_PROGRAM, "gilfree", method)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    parent = subprocess.Popen([sys.executable, str(prog)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        child_pid = int(parent.stdout.readline())
        helpers = list(gilfree.util.children_of({parent.pid}))
        assert child_pid in helpers or method == "forkserver"
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not all(_gone(pid) for pid in [child_pid, *helpers]):
            time.sleep(0.05)
        assert all(_gone(pid) for pid in [child_pid, *helpers]), "a child outlived its SIGKILLed parent"
    finally:
        parent.kill()
        parent.stdout.close()
        parent.wait()
