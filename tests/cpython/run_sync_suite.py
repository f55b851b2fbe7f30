"""Run CPython's own multiprocessing tests for the synchronization primitives against gilfree.

    .venv/bin/python tests/cpython/run_sync_suite.py            # everything (stdlib baseline too)
    .venv/bin/python tests/cpython/run_sync_suite.py --impl gilfree --methods spawn --types processes \\
        --classes Condition --jobs 1

What it does: copies the interpreter's ``test/_test_multiprocessing.py`` into a temp dir twice --
verbatim (``mp_suite_stdlib``, the baseline) and with every ``multiprocessing`` name rewritten to
``gilfree`` (``mp_suite_gilfree``) -- and for each implementation x start method x test type writes
a small module that calls the suite's own ``install_tests_in_module_dict`` (as CPython's
``test_multiprocessing_<method>`` packages do), so ``WithProcessesTestLock`` etc. exist there and
a spawned child finds them by name.  Each selected class runs in its own subprocess; every test is
guarded by ``faulthandler.dump_traceback_later(..., exit=True)``, and a class whose subprocess dies
or hangs is resumed from the next test, so one hang costs one test.

Where gilfree lacks a private piece of the stdlib that the suite's fixtures touch, the gilfree copy
gets a stand-in (listed in the report, see ``HARNESS`` below): ``process._dangling`` (an empty
WeakSet, so the dangling-process warnings never fire) and ``util._cleanup_tests`` (no-op).
gilfree's source is not touched.

Exit status 0 whatever the results (this is a report, not a gate); results also go to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

BASES = ["_TestLock", "_TestSemaphore", "_TestCondition", "_TestEvent", "_TestBarrier", "_TestValue", "_TestArray"]
METHODS = ["fork", "spawn", "forkserver"]
TYPES = ["processes", "threads", "manager"]
IMPLS = ["stdlib", "gilfree", "gilfree_adapted"]
# gilfree_adapted: the gilfree copy with the one private-attribute check the suite makes on a
# Condition (check_invariant reads the stdlib's _sleeping_count/_woken_count/_wait_semaphore)
# translated to gilfree's own bookkeeping, so the rest of those tests runs.  Only Condition.
ADAPTED_CLASSES = ("Condition",)

HARNESS = r'''
"""Stand-ins for stdlib-private bookkeeping that _test_multiprocessing's fixtures touch (gilfree copy)."""
import weakref
import gilfree, gilfree.process, gilfree.util, gilfree.reduction

STANDINS = []


def install():
    if STANDINS:
        return
    if not hasattr(gilfree.process, "_dangling"):
        gilfree.process._dangling = weakref.WeakSet()
        STANDINS.append("process._dangling")
    if not hasattr(gilfree.process, "_cleanup"):
        gilfree.process._cleanup = lambda: None
        STANDINS.append("process._cleanup")
    if not hasattr(gilfree.util, "_cleanup_tests"):
        gilfree.util._cleanup_tests = lambda: None
        STANDINS.append("util._cleanup_tests")
    if STANDINS == []:
        STANDINS.append("(none)")
'''

PRELUDE = "import _gilfree_harness; _gilfree_harness.install()  # run_sync_suite.py\n"


def with_prelude(src: str, stmt: str) -> str:
    """``stmt`` run first, on the file's first line when it can share it (line numbers kept)."""
    first, nl, rest = src.partition("\n")
    stripped = first.strip()
    if not stripped or stripped.startswith("#"):
        return f"{stmt}  {first}{nl}{rest}"
    candidate = f"{stmt}; {first}{nl}{rest}"
    if not stripped.startswith("from __future__"):
        try:
            compile(candidate, "<prelude>", "exec")
            return candidate
        except SyntaxError:
            pass
    return f"{stmt}\n{src}"  # one line more: tracebacks are off by one


def rewrite_to_gilfree(src: str) -> str:
    """Every ``multiprocessing`` word becomes ``gilfree``.

    ``_multiprocessing`` (the C module the suites' skip checks import) and ``test_multiprocessing_*``
    are one word with their underscore and stay as they are.
    """
    return re.sub(r"\bmultiprocessing\b", "gilfree", src)

# The stdlib's invariant "no sleeper left, no notification left unconsumed" (sleeping - woken == 0,
# _wait_semaphore == 0), asked of gilfree's slot table: no slot in use (neither waiting nor notified
# but not yet woken) and no overflow sleeper.
ADAPTER = """

# --- run_sync_suite.py: gilfree_adapted ---
def _gilfree_check_invariant(self, cond):
    if self.TYPE == 'processes':
        self.assertEqual(cond._cv._sleepers(), [])
        self.assertEqual(cond._cv._waiting(), 0)
_TestCondition.check_invariant = _gilfree_check_invariant
"""

REMOTE = """import mp_suite_{impl} as _base
_base.install_tests_in_module_dict(globals(), {method!r}, only_type={type!r})
"""
# a plain TestCase of the suite (not built by install_tests_in_module_dict) that drives the
# manager's proxies of the primitives from a child process; subclassed in the manager module so it
# gets that module's setUpModule (the start method) and a child finds its classmethods there
REMOTE_MANAGER_EXTRA = """
class TestSyncManagerTypes(_base.TestSyncManagerTypes):
    pass
"""
# the tests of TestSyncManagerTypes that are about the synchronization primitives
EXTRA_ONLY = {"TestSyncManagerTypes": ["test_event", "test_lock", "test_rlock", "test_semaphore",
                                       "test_bounded_semaphore", "test_condition", "test_barrier"]}


def suite_source() -> str:
    import test

    return os.path.join(os.path.dirname(test.__file__), "_test_multiprocessing.py")


def build_tree(tmp: str, check_timings: bool = False) -> None:
    with open(suite_source(), encoding="utf-8") as f:
        src = f.read()
    if check_timings:
        # the suite's own switch (off upstream): longer timeouts, and assertTimingAlmostEqual
        # really compares how long acquire/wait took
        src, n = re.subn(r"^CHECK_TIMINGS = False", "CHECK_TIMINGS = True", src, flags=re.M)
        assert n == 1, "CHECK_TIMINGS switch not found"
    with open(os.path.join(tmp, "mp_suite_stdlib.py"), "w", encoding="utf-8") as f:
        f.write(src)
    # every `multiprocessing` word (imports, attribute chains, ctx names)
    rewritten = with_prelude(rewrite_to_gilfree(src), PRELUDE.rstrip("\n"))
    with open(os.path.join(tmp, "mp_suite_gilfree.py"), "w", encoding="utf-8") as f:
        f.write(rewritten)
    with open(os.path.join(tmp, "mp_suite_gilfree_adapted.py"), "w", encoding="utf-8") as f:
        f.write(rewritten + ADAPTER)
    with open(os.path.join(tmp, "_gilfree_harness.py"), "w", encoding="utf-8") as f:
        f.write(HARNESS)
    for impl in IMPLS:
        for method in METHODS:
            for type_ in TYPES:
                with open(os.path.join(tmp, f"sync_{impl}_{method}_{type_}.py"), "w", encoding="utf-8") as f:
                    f.write(REMOTE.format(impl=impl, method=method, type=type_))
                    if type_ == "manager":
                        f.write(REMOTE_MANAGER_EXTRA)


# ---------------------------------------------------------------------------------------------
# child: run one class (optionally a subset of its tests), one JSON line per event


def child_main(tmp: str, impl: str, method: str, type_: str, cls_name: str, out: str, only: list[str],
               per_test: float) -> None:
    import traceback
    import unittest

    sys.path.insert(0, tmp)
    modname = f"sync_{impl}_{method}_{type_}"
    fh = open(out, "a", buffering=1, encoding="utf-8")

    def emit(**kw):
        fh.write(json.dumps(kw) + "\n")
        fh.flush()

    try:
        mod = __import__(modname)
    except BaseException:
        emit(event="import_error", tb=traceback.format_exc())
        return
    if impl.startswith("gilfree"):
        import _gilfree_harness

        emit(event="standins", names=_gilfree_harness.STANDINS)
    cls = getattr(mod, cls_name, None)
    if cls is None:
        emit(event="no_class")
        return
    # sanity: which implementation the class's primitives come from
    lock = cls.__dict__.get("Lock") or getattr(cls, "Lock", None)
    emit(event="standins", names=[f"{impl}: {cls_name}.Lock is from {getattr(lock, '__module__', None) or type(lock).__name__}"])
    names = unittest.TestLoader().getTestCaseNames(cls)
    if cls_name in EXTRA_ONLY:
        names = [n for n in names if n in EXTRA_ONLY[cls_name]]
    if only:
        names = [n for n in names if n in only]
    emit(event="tests", names=names)

    run_tests(cls, names, emit, per_test)


def run_tests(cls, names: list[str], emit, per_test: float) -> None:
    """Run ``names`` of TestCase ``cls``, one JSON event per start/outcome, each test under a
    faulthandler watchdog that dumps the stacks and exits the process after ``per_test`` s."""
    import faulthandler
    import traceback
    import unittest

    def short(err):
        return "".join(traceback.format_exception(*err))[-3000:]

    class Result(unittest.TestResult):
        def startTest(self, test):
            super().startTest(test)
            emit(event="start", test=getattr(test, "_testMethodName", str(test)), t=time.monotonic())
            faulthandler.dump_traceback_later(per_test, exit=True)

        def stopTest(self, test):
            faulthandler.cancel_dump_traceback_later()
            super().stopTest(test)

        def _done(self, test, status, detail=""):
            name = getattr(test, "_testMethodName", None) or str(test)
            emit(event="done", test=name, status=status, detail=detail, t=time.monotonic())

        def addSuccess(self, test):
            super().addSuccess(test)
            self._done(test, "pass")

        def addFailure(self, test, err):
            super().addFailure(test, err)
            self._done(test, "FAIL", short(err))

        def addError(self, test, err):
            super().addError(test, err)
            self._done(test, "ERROR", short(err))

        def addSkip(self, test, reason):
            super().addSkip(test, reason)
            self._done(test, "skip", reason)

        def addExpectedFailure(self, test, err):
            super().addExpectedFailure(test, err)
            self._done(test, "xfail")

        def addUnexpectedSuccess(self, test):
            super().addUnexpectedSuccess(test)
            self._done(test, "UNEXPECTED-SUCCESS")

        def addSubTest(self, test, subtest, err):
            super().addSubTest(test, subtest, err)
            if err is not None:
                # recorded under its test's name (a _SubTest's own _testMethodName is "runTest")
                self._done(test, "FAIL" if issubclass(err[0], test.failureException) else "ERROR",
                           f"subtest {subtest._subDescription()}:\n{short(err)}")

    suite = unittest.TestSuite(cls(n) for n in names)
    faulthandler.enable()
    # module and class fixtures (setUpModule: set_start_method; setUpClass: the manager) also get a
    # watchdog: a hang there is reported like a hang in a test
    faulthandler.dump_traceback_later(per_test * 2, exit=True)
    suite.run(Result())
    faulthandler.cancel_dump_traceback_later()
    emit(event="end")


# ---------------------------------------------------------------------------------------------
# parent


def run_job(tmp, impl, method, type_, cls_name, per_test, logdir):
    """Run one class to the end, resuming after a test that killed or hung its subprocess."""
    def cmd_for(out, only):
        return [sys.executable, os.path.abspath(__file__), "--child", tmp, impl, method, type_, cls_name, out,
                "--per-test", str(per_test), "--only", ",".join(only)]
    return run_resumable(cmd_for, tmp, f"{impl}-{method}-{type_}-{cls_name}", per_test, logdir)


def run_resumable(cmd_for, tmp, tag, per_test, logdir, attempts=60, only=None):
    """Run the child ``cmd_for(out, only)`` until its class has ended, resuming after a test that
    killed or hung the subprocess (that test is recorded as HANG or CRASH).  ``only``: run just
    these tests of the class.  Returns (results by test, test order, notes)."""
    results: dict[str, dict] = {}
    order: list[str] = []
    only = list(only or [])
    notes: list[str] = []
    for attempt in range(attempts):
        out = os.path.join(logdir, f"{tag}-{attempt}.jsonl")
        err = out[:-6] + ".stderr"
        env = dict(os.environ, PYTHONPATH=tmp + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   PYTHONFAULTHANDLER="1")
        cmd = cmd_for(out, only)
        with open(err, "w") as ef:
            p = subprocess.Popen(cmd, stdout=ef, stderr=subprocess.STDOUT, cwd=tmp, env=env, start_new_session=True)
            try:
                rc = p.wait(timeout=per_test * (len(only) or 20) + 60)
            except subprocess.TimeoutExpired:
                rc = "timeout"
            # whatever the tests left behind in the session we started (daemon children of a test
            # that was killed by its watchdog); first a moment for helpers that are on their way
            # out anyway (the stdlib's resource tracker unlinks leaked semaphores as it exits)
            for _ in range(30):
                try:
                    os.killpg(p.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if rc == "timeout":
                p.wait()
        events = []
        if os.path.exists(out):
            with open(out, encoding="utf-8") as f:
                events = [json.loads(line) for line in f if line.strip()]
        names = next((e["names"] for e in events if e["event"] == "tests"), None)
        for e in events:
            if e["event"] == "standins":
                notes.append("stand-ins: " + ", ".join(e["names"]))
            if e["event"] == "import_error":
                return {"import_error": e["tb"][-3000:]}, order, notes
            if e["event"] == "no_class":
                return {}, order, ["no such class"]
        if names is None:
            with open(err, errors="replace") as ef:
                return {"import_error": ef.read()[-3000:]}, order, notes
        if not order:
            order = list(names)
        started = None
        for e in events:
            if e["event"] == "start":
                started = e["test"]
                t0 = e["t"]
            elif e["event"] == "done":
                rec = {"status": e["status"], "detail": e["detail"]}
                if started == e["test"]:
                    rec["secs"] = round(e["t"] - t0, 2)
                # keep the first non-pass status of a test (a subtest failure, then the test's own)
                if e["test"] not in results or results[e["test"]]["status"] in ("pass",):
                    results[e["test"]] = rec
                elif e["test"] in results and rec["status"] not in ("pass",):
                    results[e["test"]]["detail"] += "\n---\n" + rec["detail"]
                if started == e["test"]:
                    started = None
            # a done for a fixture (setUpClass ...) names no test of ours: recorded under its name
        ended = any(e["event"] == "end" for e in events)
        if ended:
            break
        with open(err, errors="replace") as ef:
            tail = ef.read()[-4000:]
        victim = started or next((n for n in order if n not in results), None)
        if victim is None:
            notes.append(f"subprocess died after the last test (rc={rc}): {tail[-800:]}")
            break
        results[victim] = {"status": "HANG" if "Timeout" in tail or rc == "timeout" else "CRASH",
                           "detail": f"subprocess rc={rc}; last output:\n{tail}"}
        only = [n for n in order if n not in results]
        if not only:
            break
    return results, order, notes


def shm_holders(names: list[str]) -> dict[str, list[str]]:
    """For each /dev/shm entry, the live processes that map it ("pid cmdline")."""
    out: dict[str, list[str]] = {n: [] for n in names}
    if not names:
        return out
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:80]
        except OSError:
            continue
        for n in names:
            if "/dev/shm/" + n in maps:
                out[n].append(f"{pid} {cmd}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=6, metavar=("TMP", "IMPL", "METHOD", "TYPE", "CLASS", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--only", default="")
    ap.add_argument("--per-test", type=float, default=30.0, help="watchdog per test, seconds")
    ap.add_argument("--impl", default=",".join(IMPLS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--types", default="processes,threads,manager")
    ap.add_argument("--classes", default=",".join(b[5:] for b in BASES), help="Lock,Semaphore,...")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    ap.add_argument("--check-timings", action="store_true",
                    help="turn on the suite's CHECK_TIMINGS (timeouts measured, not just results)")
    args, rest = ap.parse_known_args()
    if args.child:
        tmp, impl, method, type_, cls_name, out = args.child[:6]
        only = [n for n in args.only.split(",") if n]
        child_main(tmp, impl, method, type_, cls_name, out, only, args.per_test)
        return

    t_start = time.monotonic()
    shm_before = set(os.listdir("/dev/shm"))
    tmp = tempfile.mkdtemp(prefix="cpy-sync-")
    logdir = os.path.join(tmp, "logs")
    os.makedirs(logdir)
    build_tree(tmp, args.check_timings)
    impls = args.impl.split(",")
    methods = args.methods.split(",")
    types_ = args.types.split(",")
    classes = args.classes.split(",")
    jobs = []
    for impl in impls:
        for type_ in types_:
            # the threads variant does not depend on the start method: run it once, under fork
            for method in (methods[:1] if type_ == "threads" else methods):
                for c in classes:
                    base = "_Test" + c
                    if type_ != "processes" and base in ("_TestValue", "_TestArray"):
                        continue  # ALLOWED_TYPES = ('processes',)
                    if impl == "gilfree_adapted" and (type_ != "processes" or c not in ADAPTED_CLASSES):
                        continue
                    jobs.append((impl, method, type_, "With" + type_.capitalize() + "Test" + c))
                if type_ == "manager" and impl != "gilfree_adapted":
                    jobs.append((impl, method, type_, "TestSyncManagerTypes"))
    print(f"suite: {suite_source()}\ntemp: {tmp}\n{len(jobs)} class runs, {args.jobs} at a time, "
          f"watchdog {args.per_test:g}s per test", flush=True)

    all_results = {}

    def work(job):
        impl, method, type_, cls_name = job
        t = time.monotonic()
        res = run_job(tmp, impl, method, type_, cls_name, args.per_test, logdir)
        print(f"  {impl:8} {method:10} {cls_name:32} {time.monotonic() - t:6.1f}s", flush=True)
        return job, res

    with ThreadPoolExecutor(args.jobs) as ex:
        for job, res in ex.map(work, jobs):
            all_results["|".join(job)] = res

    # table
    print()
    print("| class | start method | stdlib | gilfree | gilfree, invariant adapted |")
    print("|---|---|---|---|---|")

    def cell(key):
        if key not in all_results:
            return "-"
        res, order, _ = all_results[key]
        if "import_error" in res:
            return "IMPORT ERROR"
        counts: dict[str, int] = {}
        for r in res.values():
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        bits = [f"{counts.pop('pass', 0)} pass"]
        bits += [f"{v} {k}" for k, v in sorted(counts.items())]
        return ", ".join(bits)

    seen = []
    for _impl, method, type_, cls_name in jobs:
        if (method, cls_name) in seen:
            continue
        seen.append((method, cls_name))
        print(f"| {cls_name} | {method if type_ != 'threads' else '(any)'} | "
              f"{cell('|'.join(('stdlib', method, type_, cls_name)))} | "
              f"{cell('|'.join(('gilfree', method, type_, cls_name)))} | "
              f"{cell('|'.join(('gilfree_adapted', method, type_, cls_name)))} |")

    print("\nNot passed:")
    for key, (res, _order, _notes) in all_results.items():
        if "import_error" in res:
            print(f"\n## {key}: import error\n{res['import_error']}")
            continue
        for name, r in res.items():
            if r["status"] not in ("pass", "skip"):
                print(f"\n## {key} :: {name}: {r['status']}\n{r['detail'].rstrip()[-1500:]}")
    skips = sorted({(k.split('|')[3], n, r['detail']) for k, (res, _, _) in all_results.items()
                    if "import_error" not in res for n, r in res.items() if r["status"] == "skip"})
    if skips:
        print("\nSkipped:")
        for c, n, why in skips:
            print(f"  {c}.{n}: {why}")
    notes = sorted({n for _, (_, _, ns) in all_results.items() for n in ns})
    if notes:
        print("\nNotes:")
        for n in notes:
            print("  " + n)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: {"results": v[0], "order": v[1], "notes": v[2]} for k, v in all_results.items()}, f, indent=1)
    shm_after = set(os.listdir("/dev/shm"))
    new = sorted(shm_after - shm_before)
    print(f"\n/dev/shm: {len(new)} new entries (machine-wide: other programs' too)")
    for name, holders in shm_holders(new).items():
        print(f"  {name}: " + ("; ".join(holders) if holders else "ORPHANED (mapped by no process)"))
    print(f"total {time.monotonic() - t_start:.0f}s")
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
