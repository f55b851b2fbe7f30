"""Run CPython's own multiprocessing / concurrent.futures suites against gilfree and the stdlib.

    PYTHONPATH=src .venv/bin/python    tests/cpython/run_suites.py --suites mp,main --methods fork
    PYTHONPATH=src .venv313/bin/python tests/cpython/run_suites.py --suites cf --methods fork,spawn \\
        --json cf.json --classes 'Deadlock'          # a regex on class names

Suites (read from the running interpreter's ``test`` package at run time, never stored here):

* ``mp``: ``test/_test_multiprocessing.py``, every class (``WithProcesses*``, ``WithThreads*``,
  ``WithManager*`` and the plain TestCases), built per start method the way CPython's
  ``test_multiprocessing_<method>`` packages build them (``install_tests_in_module_dict``).
* ``cf``: the ``test/test_concurrent_futures/`` package (3.13), its process-pool classes
  (``ProcessPool<Method>*`` and ``FailingInitializerResourcesTest``).  In the gilfree copy
  ``futures.ProcessPoolExecutor`` and the executor imported by the suite's subprocess scripts are
  ``gilfree.ProcessPoolExecutor``, and ``multiprocessing`` (``util.py``'s ``get_context``, which
  every executor mixin uses) is ``gilfree``.  The suite's imports of ``concurrent.futures``'s
  exception classes (``BrokenProcessPool``, ``BrokenExecutor``) are left alone: code written for
  the stdlib catches those.  Its reads of the stdlib executor's internals (``_RemoteTraceback``,
  ``_ExecutorManagerThread``, ``_ThreadWakeup``) are left alone too and show up as failures.
* ``main``: ``test/test_multiprocessing_main_handling.py`` (its scripts, run in fresh
  interpreters, import gilfree in the gilfree copy).

Each suite is copied twice, under its own file names, into ``<tmp>/stdlib`` (verbatim: the
baseline) and ``<tmp>/gilfree`` (``multiprocessing`` rewritten to ``gilfree``, line numbers kept),
so a test has the same id for both; each class runs in its own subprocess through
``run_sync_suite.run_resumable``: a faulthandler watchdog per test (``--per-test``) dumps the stacks
and ends the process, the class resumes from the next test, so a hang costs one test.

Harness stand-ins, all listed in the output:

* gilfree copy: ``run_sync_suite.HARNESS`` (``process._dangling``, ``process._cleanup``,
  ``util._cleanup_tests``, ... -- each installed only if gilfree lacks the name; see there).
* both copies: ``test.support.script_helper.run_python_until_end`` passes ``PYTHONPATH`` on to the
  interpreters the suites start (and so does not add ``-I``/``-E``); and ``_test_multiprocessing``'s
  two ``[sys.executable, '-E', ...]`` children (``test_flags``,
  ``test_shared_memory_cleaned_after_process_termination``) lose the ``-E``.  The package under test is found
  through ``PYTHONPATH`` (not installed), and a child that ignores it would import another gilfree
  (or none).  Nothing about the tests' assertions changes.
* gilfree copy: the text of a stdlib message a test matches (``KEPT_MESSAGES``: the unclosed-pool
  ``ResourceWarning``) is not rewritten: code that imports gilfree as ``multiprocessing`` matches
  the stdlib's words, so gilfree says them.

Output: a table (per suite and start method: stdlib passes, gilfree passes, failures, errors,
timeouts, crashes), the gilfree tests that do not pass where the stdlib passes -- a skip counts
(a stand-in that switches a feature off skips its tests: a missing feature) -- grouped by the first line of their error, and everything in ``--json`` (``--report`` prints it
again).  Exit status 0 whatever the results.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_sync_suite as rss  # noqa: E402  (sibling script, shares the harness and the runner)

IMPLS = ["stdlib", "gilfree"]
METHODS = ["fork", "spawn", "forkserver"]

COMMON = r'''
"""Harness for both copies: interpreters started by the suites find the package under test."""
import os

DONE = []


def install():
    if DONE:
        return
    DONE.append(True)
    from test.support import script_helper

    orig = script_helper.run_python_until_end

    def run_python_until_end(*args, **env_vars):
        path = os.environ.get("PYTHONPATH")
        if path and "PYTHONPATH" not in env_vars:
            env_vars["PYTHONPATH"] = path
            env_vars["__isolated"] = False  # -I would ignore PYTHONPATH
        return orig(*args, **env_vars)

    script_helper.run_python_until_end = run_python_until_end
'''
COMMON_PRELUDE = "import _suite_common; _suite_common.install()"
GILFREE_PRELUDE = COMMON_PRELUDE + "; import _gilfree_harness; _gilfree_harness.install()"


def test_dir() -> str:
    import test

    return os.path.dirname(test.__file__)


def available_suites() -> list[str]:
    d = test_dir()
    out = []
    if os.path.exists(os.path.join(d, "_test_multiprocessing.py")):
        out.append("mp")
    if os.path.isdir(os.path.join(d, "test_concurrent_futures")):
        out.append("cf")
    if os.path.exists(os.path.join(d, "test_multiprocessing_main_handling.py")):
        out.append("main")
    return out


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


#: Text of the stdlib's own messages that the suites match, which a program that imports gilfree as
#: ``multiprocessing`` still matches unchanged: the rewrite must not turn it into ``gilfree``.
KEPT_MESSAGES = ("unclosed running multiprocessing pool",)


def rewrite_mp(src: str, impl: str) -> str:
    # children started with -E would not see PYTHONPATH (both copies)
    src = re.sub(r"(\[sys\.executable,\s*)'-E',\s*", r"\1", src)
    if impl == "gilfree":
        src = rss.rewrite_to_gilfree(src)
        for text in KEPT_MESSAGES:
            src = src.replace(rss.rewrite_to_gilfree(text), text)
        return rss.with_prelude(src, GILFREE_PRELUDE)
    return rss.with_prelude(src, COMMON_PRELUDE)


def rewrite_cf(src: str, impl: str) -> str:
    if impl == "stdlib":
        return rss.with_prelude(src, COMMON_PRELUDE)
    src = rss.rewrite_to_gilfree(src)  # util.py: import/get_context; the scripts' imports
    src = re.sub(r"\bfutures\.ProcessPoolExecutor\b", "gilfree.ProcessPoolExecutor", src)
    # the scripts test_shutdown runs in a fresh interpreter ({executor_type} is the class's name)
    src = src.replace("from concurrent.futures import {executor_type}", "from gilfree import {executor_type}")
    if src.startswith("import gilfree\n"):  # util.py's rewritten first line
        return rss.with_prelude(src, GILFREE_PRELUDE)
    return rss.with_prelude(src, GILFREE_PRELUDE + "; import gilfree")


def build_tree(tmp: str, suites: list[str], methods: list[str]) -> None:
    """One directory per implementation, ``tmp/<impl>``, holding that implementation's copies under
    the suites' own names (so test ids match, and ``_test_multiprocessing.py`` is the file name its
    tests look for in tracebacks); the child processes get that directory on ``PYTHONPATH``."""
    d = test_dir()
    for impl in IMPLS:
        root = os.path.join(tmp, impl)
        os.makedirs(root)
        _write(os.path.join(root, "_suite_common.py"), COMMON)
        if impl == "gilfree":
            _write(os.path.join(root, "_gilfree_harness.py"), rss.HARNESS)
        if "mp" in suites:
            _write(os.path.join(root, "_test_multiprocessing.py"),
                   rewrite_mp(_read(os.path.join(d, "_test_multiprocessing.py")), impl))
            # scripts the suite runs from its own directory (TestNoForkBomb, test_preload_resources)
            for name in sorted(os.listdir(d)):
                if name.startswith("mp_") and name.endswith(".py"):
                    src = _read(os.path.join(d, name))
                    _write(os.path.join(root, name), rss.rewrite_to_gilfree(src) if impl == "gilfree" else src)
            for m in methods:
                _write(os.path.join(root, f"test_multiprocessing_{m}.py"),
                       "import _test_multiprocessing as _base\n"
                       f"_base.install_tests_in_module_dict(globals(), {m!r})\n")
        if "cf" in suites:
            pkg = os.path.join(root, "test_concurrent_futures")
            os.makedirs(pkg)
            src_pkg = os.path.join(d, "test_concurrent_futures")
            for name in sorted(os.listdir(src_pkg)):
                if name.endswith(".py"):
                    _write(os.path.join(pkg, name), rewrite_cf(_read(os.path.join(src_pkg, name)), impl))
        if "main" in suites:
            src = _read(os.path.join(d, "test_multiprocessing_main_handling.py"))
            if impl == "gilfree":
                src = rss.with_prelude(rss.rewrite_to_gilfree(src), GILFREE_PRELUDE)
            else:
                src = rss.with_prelude(src, COMMON_PRELUDE)
            _write(os.path.join(root, "test_multiprocessing_main_handling.py"), src)


# ---------------------------------------------------------------------------------------------
# child


def _classes(mod) -> list[tuple[str, int]]:
    import unittest

    out = []
    for name, obj in sorted(vars(mod).items()):
        if (isinstance(obj, type) and issubclass(obj, unittest.TestCase)
                and getattr(obj, "__module__", None) == mod.__name__):
            n = len(unittest.TestLoader().getTestCaseNames(obj))
            if n:
                out.append((name, n))
    return out


def child_list(tmp: str, modnames: list[str], out: str) -> None:
    """Write {module: [[class, ntests], ...]} (or {module: "import error ..."})."""
    import importlib
    import traceback

    sys.path.insert(0, tmp)
    res: dict = {}
    for modname in modnames:
        try:
            res[modname] = _classes(importlib.import_module(modname))
        except BaseException:
            res[modname] = "import error\n" + traceback.format_exc()[-3000:]
    _write(out, json.dumps(res))


def child_run(tmp: str, modname: str, cls_name: str, out: str, only: list[str], per_test: float) -> None:
    import importlib
    import traceback
    import unittest

    sys.path.insert(0, tmp)
    fh = open(out, "a", buffering=1, encoding="utf-8")

    def emit(**kw):
        fh.write(json.dumps(kw) + "\n")
        fh.flush()

    try:
        mod = importlib.import_module(modname)
    except BaseException:
        emit(event="import_error", tb=traceback.format_exc())
        return
    if "_gilfree_harness" in sys.modules:
        emit(event="standins", names=sys.modules["_gilfree_harness"].STANDINS)
        import gilfree

        emit(event="standins", names=[f"gilfree from {os.path.dirname(gilfree.__file__)}"])
    emit(event="standins", names=["script_helper passes PYTHONPATH on"])
    cls = getattr(mod, cls_name, None)
    if cls is None:
        emit(event="no_class")
        return
    names = unittest.TestLoader().getTestCaseNames(cls)
    if only:
        names = [n for n in names if n in only]
    emit(event="tests", names=names)
    rss.run_tests(cls, names, emit, per_test)


# ---------------------------------------------------------------------------------------------
# parent


def plan(suite: str, methods: list[str]) -> list[tuple[str, str, str]]:
    """(method label, module, class-filter kind) per module to list."""
    if suite == "mp":
        return [(m, f"test_multiprocessing_{m}", "all") for m in methods]
    if suite == "main":
        return [("-", "test_multiprocessing_main_handling", "main")]
    d = os.path.join(test_dir(), "test_concurrent_futures")
    mods = sorted(n[:-3] for n in os.listdir(d) if n.startswith("test_") and n.endswith(".py"))
    return [("-", f"test_concurrent_futures.{m}", "cf") for m in mods]


def cf_method(cls_name: str) -> str | None:
    """The start method of a process-pool class of test_concurrent_futures, '-' for one that does
    not depend on it, None for a class that is not about process pools."""
    for m, label in (("Forkserver", "forkserver"), ("Fork", "fork"), ("Spawn", "spawn")):
        if cls_name.startswith("ProcessPool" + m):
            return label
    if cls_name == "FailingInitializerResourcesTest":
        return "-"
    return None


def main_method(cls_name: str) -> str | None:
    for m, label in (("ForkServer", "forkserver"), ("Fork", "fork"), ("Spawn", "spawn")):
        if cls_name.startswith(m):
            return label
    return None


def first_error_line(detail: str) -> str:
    """The first line of the (last, outermost) exception in a traceback text, normalised a bit."""
    lines = detail.rstrip().splitlines()
    cand = None
    for i, line in enumerate(lines):
        if (line and not line[0].isspace() and not line.startswith(("Traceback", "During handling",
                                                                   "The above exception", "---"))
                and re.match(r"^[A-Za-z_][\w.]*(: |$)", line)):
            cand = i
    if cand is None:
        return (lines[-1] if lines else "").strip()[:160]
    line = lines[cand]
    line = re.sub(r"0x[0-9a-fA-F]+", "0x..", line)
    line = re.sub(r"/tmp/[\w./-]+", "/tmp/...", line)
    line = re.sub(r"\b\d{4,}\b", "N", line)  # ids, pids, thread idents
    line = re.sub(r"\b(pid|task|code) \d+", r"\1 N", line)
    return line[:160]


def hang_line(detail: str) -> str:
    """For a HANG/CRASH: where the main thread was (the last gilfree/test frame of the dump)."""
    frames = re.findall(r'File "([^"]+)", line (\d+) in (\w+)', detail)
    for path, _line, func in frames:
        if "/gilfree/" in path:
            return f"{detail.split(':', 1)[0].split()[0]} in {os.path.basename(path)}:{func}"
    if frames:
        path, line, func = frames[0]
        return f"in {os.path.basename(path)}:{func}"
    return detail.splitlines()[0][:120] if detail else ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child-list", nargs=2, metavar=("TMP", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--child-run", nargs=4, metavar=("TMP", "MODULE", "CLASS", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--mods", default="", help=argparse.SUPPRESS)
    ap.add_argument("--only", default="", help=argparse.SUPPRESS)
    ap.add_argument("--suites", default=None, help="mp,cf,main (default: those this interpreter ships)")
    ap.add_argument("--impl", default=",".join(IMPLS))
    ap.add_argument("--methods", default="fork", help="fork,spawn,forkserver")
    ap.add_argument("--classes", default="", help="regex: run only classes whose name matches")
    ap.add_argument("--per-test", type=float, default=60.0, help="watchdog per test, seconds")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    ap.add_argument("--gate", default=None, metavar="KNOWN",
                    help="exit 1 when a test the stdlib passes fails on gilfree (twice) and is not listed in KNOWN")
    ap.add_argument("--report", nargs="+", metavar="JSON", help="print the report of earlier --json files, run nothing")
    args = ap.parse_args()
    if args.report:
        results = {}
        for path in args.report:
            with open(path) as f:
                results.update(json.load(f)["results"])
        report(results, IMPLS)
        return
    if args.child_list:
        child_list(args.child_list[0], args.mods.split(","), args.child_list[1])
        return
    if args.child_run:
        tmp, modname, cls_name, out = args.child_run
        child_run(tmp, modname, cls_name, out, [n for n in args.only.split(",") if n], args.per_test)
        return

    import subprocess

    # the classes run with a temp dir as their working directory: a relative PYTHONPATH entry
    # (``PYTHONPATH=src``) would miss there and an installed gilfree (another worktree's) be tested
    if os.environ.get("PYTHONPATH"):
        os.environ["PYTHONPATH"] = os.pathsep.join(
            os.path.abspath(p) if p else p for p in os.environ["PYTHONPATH"].split(os.pathsep)
        )
    t_start = time.monotonic()
    known = load_known(args.gate) if args.gate else None  # a malformed list fails before the run
    suites = args.suites.split(",") if args.suites else available_suites()
    impls = args.impl.split(",")
    methods = args.methods.split(",")
    tmp = tempfile.mkdtemp(prefix="cpy-suites-")
    logdir = os.path.join(tmp, "logs")
    os.makedirs(logdir)
    build_tree(tmp, suites, methods)
    print(f"python {sys.version.split()[0]}; suites from {test_dir()}\ntemp: {tmp}\n"
          f"watchdog {args.per_test:g}s per test", flush=True)

    # jobs: (suite, method, impl, module, class)
    jobs = []
    for suite in suites:
        for impl in impls:
            mods = plan(suite, methods)
            out = os.path.join(logdir, f"list-{suite}-{impl}.json")
            root = os.path.join(tmp, impl)
            env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
            subprocess.run([sys.executable, os.path.abspath(__file__), "--child-list", root, out,
                            "--mods", ",".join(m for _, m, _ in mods)], cwd=root, env=env, timeout=600,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with open(out) as f:
                listing = json.load(f)
            for label, modname, kind in mods:
                classes = listing.get(modname, "import error (no listing)")
                if isinstance(classes, str):
                    print(f"!! {modname}: {classes}", flush=True)
                    jobs.append((suite, label, impl, modname, "<import>"))
                    continue
                for cls_name, _n in classes:
                    if args.classes and not re.search(args.classes, cls_name):
                        continue
                    method = label
                    if kind == "cf":
                        method = cf_method(cls_name)
                        if method is None or (method != "-" and method not in methods):
                            continue
                    elif kind == "main":
                        method = main_method(cls_name)
                        if method not in methods:
                            continue
                    jobs.append((suite, method, impl, modname, cls_name))
    print(f"{len(jobs)} class runs, one at a time", flush=True)
    results = run_jobs(jobs, tmp, logdir, args.per_test)

    report(results, impls)
    status = 0
    if known is not None:
        status = gate(results, known, tmp, logdir, args.per_test)
    notes = sorted({n for v in results.values() for n in v["notes"]})
    if notes:
        print("\nNotes (stand-ins, subprocesses):")
        for n in notes:
            print("  " + n[:300])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"python": sys.version, "suites": suites, "methods": methods, "per_test": args.per_test,
                       "results": results}, f, indent=1)
    print(f"total {time.monotonic() - t_start:.0f}s")
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(status)


def run_jobs(jobs: list[tuple[str, str, str, str, str]], tmp: str, logdir: str, per_test: float,
             only: dict[tuple[str, str, str, str, str], list[str]] | None = None, tag: str = "") -> dict[str, dict]:
    """Run each (suite, method, impl, module, class) in its own subprocess (``only``: just these
    tests of a job); results keyed "suite|method|impl|module|class"."""
    results: dict[str, dict] = {}
    for job in jobs:
        suite, method, impl, modname, cls_name = job
        key = "|".join(job)
        if cls_name == "<import>":
            results[key] = {"results": {"<import>": {"status": "ERROR", "detail": "module import failed"}},
                            "order": [], "notes": []}
            continue
        t = time.monotonic()
        root = os.path.join(tmp, impl)

        def cmd_for(out, only_now, modname=modname, cls_name=cls_name, root=root):
            return [sys.executable, os.path.abspath(__file__), "--child-run", root, modname, cls_name, out,
                    "--per-test", str(per_test), "--only", ",".join(only_now)]

        res, order, notes = rss.run_resumable(cmd_for, root, f"{tag}{suite}-{impl}-{method}-{cls_name}",
                                              per_test, logdir, only=(only or {}).get(job))
        if "import_error" in res:
            res = {"<import>": {"status": "ERROR", "detail": res["import_error"]}}
        results[key] = {"results": res, "order": order, "notes": notes}
        counts = count(res)
        print(f"  {tag}{suite:4} {method:10} {impl:8} {cls_name:48} {time.monotonic() - t:6.1f}s  "
              f"{counts.get('pass', 0)} pass" + "".join(f", {v} {k}" for k, v in sorted(counts.items())
                                                         if k != "pass"), flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# the gate (CI): a test the stdlib passes and gilfree does not fails the run unless it is listed


def load_known(path: str) -> list[tuple[str, str, str]]:
    """``known.txt``: one entry per line, ``suite/method/test-id  kind  reason`` (fnmatch patterns
    in each of the three parts); kind is ``compat:<slug>`` (a deliberate difference, explained under
    that heading of docs/compat.md, checked here) or ``open`` (not fixed yet)."""
    compat = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "compat.md")
    slugs = set()
    if os.path.exists(compat):
        slugs = {_slug(h) for h in re.findall(r"^#+ (.+?)\s*$", _read(compat), re.M)}
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip() if line.lstrip().startswith("#") else line.strip()
            if not line:
                continue
            parts = line.split(None, 2)
            if len(parts) < 3 or parts[0].count("/") < 2:
                raise SystemExit(f"{path}:{n}: expected 'suite/method/test-id  kind  reason', got {line!r}")
            kind = parts[1]
            if kind.startswith("compat:"):
                if kind[7:] not in slugs:
                    raise SystemExit(f"{path}:{n}: {kind}: docs/compat.md has no heading whose anchor is {kind[7:]!r}")
            elif kind != "open":
                raise SystemExit(f"{path}:{n}: kind must be compat:<slug> or open, got {kind!r}")
            out.append((parts[0], kind, parts[2]))
    return out


def _slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading (lower case, punctuation dropped, spaces to -)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _listed(known: list[tuple[str, str, str]], suite: str, method: str, test: str) -> tuple[str, str] | None:
    """(pattern, kind) of the first entry of ``known`` that matches, or None."""
    import fnmatch

    for pattern, kind, _reason in known:
        ps, pm, pt = pattern.split("/", 2)
        if fnmatch.fnmatchcase(suite, ps) and fnmatch.fnmatchcase(method, pm) and fnmatch.fnmatchcase(test, pt):
            return pattern, kind
    return None


def _test_id(suite: str, modname: str, cls_name: str, test: str) -> str:
    prefix = f"{modname.split('.')[-1]}." if suite == "cf" else ""
    return f"{prefix}{cls_name}.{test}"


def gate(results: dict[str, dict], known: list[tuple[str, str, str]], tmp: str, logdir: str,
         per_test: float) -> int:
    """Every gilfree test that did not pass and is not listed in ``known`` is run again, on gilfree
    and on the stdlib (unless this run already has the stdlib's result): it fails the gate when the
    stdlib passes it and gilfree fails it twice.  Passing on the second try is reported as flaky."""
    std: dict[tuple[str, str, str, str, str], dict] = {}
    for key, v in results.items():
        suite, method, impl, modname, cls_name = key.split("|")
        if impl == "stdlib":
            for test, r in v["results"].items():
                std[(suite, method, modname, cls_name, test)] = r
    suspects: dict[tuple[str, str, str, str, str], list[str]] = {}
    known_seen: dict[str, int] = {}
    matched: dict[str, list[str]] = {}  # entry -> the statuses of the tests it matched
    for key, v in results.items():
        suite, method, impl, modname, cls_name = key.split("|")
        if impl != "gilfree":
            continue
        for test, r in v["results"].items():
            tid = _test_id(suite, modname, cls_name, test)
            hit = _listed(known, suite, method, tid)
            if hit:
                matched.setdefault(hit[0], []).append(r["status"])
            if r["status"] == "pass":
                continue
            if hit:
                kind = hit[1].split(":")[0]
                known_seen[kind] = known_seen.get(kind, 0) + 1
                continue
            s = std.get((suite, method, modname, cls_name, test))
            if s is not None and s["status"] != "pass":
                continue  # the stdlib does not pass it here either
            suspects.setdefault((suite, method, "gilfree", modname, cls_name), []).append(test)
    print(f"\ngate: listed and not passing: {known_seen or 'none'}; unlisted: "
          f"{sum(map(len, suspects.values()))} tests to run again")
    # an entry whose tests all passed in this run (a pattern may also match tests that pass: the
    # same test under a start method where it works)
    stale = [p for p, statuses in matched.items() if all(st == "pass" for st in statuses)]
    if stale:
        print(f"gate: {len(stale)} entries of the list match only tests that pass now (remove them):")
        for p in sorted(stale):
            print("    " + p)
    if not suspects:
        return 0
    again = run_jobs(list(suspects), tmp, logdir, per_test, suspects, tag="again-")
    need_std = {}
    for job, tests in suspects.items():
        suite, method, _impl, modname, cls_name = job
        missing = [t for t in tests if (suite, method, modname, cls_name, t) not in std]
        if missing:
            need_std[(suite, method, "stdlib", modname, cls_name)] = missing
    std_again = run_jobs(list(need_std), tmp, logdir, per_test, need_std, tag="stdlib-") if need_std else {}
    for key, v in std_again.items():
        suite, method, _impl, modname, cls_name = key.split("|")
        for test, r in v["results"].items():
            std[(suite, method, modname, cls_name, test)] = r
    bad = []
    for job, tests in suspects.items():
        suite, method, _impl, modname, cls_name = job
        second = again.get("|".join(job), {"results": {}})["results"]
        for test in tests:
            tid = f"{suite}/{method}/{_test_id(suite, modname, cls_name, test)}"
            s = std.get((suite, method, modname, cls_name, test), {"status": "missing"})
            g = second.get(test, {"status": "missing", "detail": ""})
            first = results["|".join(job)]["results"][test]
            if s["status"] != "pass":
                print(f"gate: {tid}: the stdlib does not pass it here either ({s['status']})")
            elif g["status"] == "pass":
                print(f"gate: {tid}: FLAKY on gilfree ({first['status']}, then pass): "
                      f"{first_error_line(first['detail'])}")
            else:
                bad.append((tid, g))
    for tid, g in bad:
        print(f"\ngate: REGRESSION {tid}: {g['status']}\n" + "\n".join(
            "    " + line for line in g.get("detail", "").rstrip().splitlines()[-25:]))
    print(f"\ngate: {len(bad)} unlisted tests pass on the stdlib and fail on gilfree twice"
          + (" -- fix them, or list them in tests/cpython/known.txt (compat: with a docs/compat.md entry)"
             if bad else ""))
    return 1 if bad else 0


def count(res: dict) -> dict[str, int]:
    c: dict[str, int] = {}
    for r in res.values():
        c[r["status"]] = c.get(r["status"], 0) + 1
    return c


def report(results: dict, impls: list[str]) -> None:
    # per (suite, method, impl): statuses by test id "Class.test"
    by: dict[tuple[str, str, str], dict[str, dict]] = {}
    for key, v in results.items():
        suite, method, impl, modname, cls_name = key.split("|")
        d = by.setdefault((suite, method, impl), {})
        for test, r in v["results"].items():
            prefix = f"{modname.split('.')[-1]}." if suite == "cf" else ""
            d[f"{prefix}{cls_name}.{test}"] = r  # the same id for both implementations
    cells = sorted({(s, m) for s, m, _ in by})
    print("\n| suite | method | stdlib pass | gilfree pass | gilfree FAIL | ERROR | HANG | CRASH | skip "
          "| stdlib-pass, gilfree-not (skips too) |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    regressions: list[tuple[str, str, str, dict]] = []
    for s, m in cells:
        std = by.get((s, m, "stdlib"), {})
        gil = by.get((s, m, "gilfree"), {})

        std_pass = {t for t, r in std.items() if r["status"] == "pass"}
        c = count(gil)
        # a test the stdlib passes and gilfree skips counts: the skip says a feature is missing
        reg = [t for t, r in gil.items() if (t in std_pass and r["status"] != "pass")
               or (not std and r["status"] not in ("pass", "skip"))]
        for t in reg:
            regressions.append((s, m, t, gil[t]))
        print(f"| {s} | {m} | {len(std_pass) if std else '-'} | {c.get('pass', 0) if gil else '-'} | "
              f"{c.get('FAIL', 0)} | {c.get('ERROR', 0)} | {c.get('HANG', 0)} | {c.get('CRASH', 0)} | "
              f"{c.get('skip', 0)} | {len(reg) if std and gil else '-'} |")
    # also: stdlib non-passes (the baseline's own failures in this harness)
    std_bad = [(s, m, t, r) for (s, m, i), d in by.items() if i == "stdlib" for t, r in d.items()
               if r["status"] not in ("pass", "skip")]
    if std_bad:
        print(f"\nstdlib baseline not passing ({len(std_bad)}):")
        for s, m, t, r in sorted(std_bad, key=lambda x: x[:3]):
            print(f"  {s} {m} {t}: {r['status']}: {first_error_line(r['detail'])}")
    if "gilfree" not in impls:
        return
    groups: dict[str, list[str]] = {}
    for s, m, t, r in regressions:
        if r["status"] in ("HANG", "CRASH"):
            g = f"{r['status']}: {hang_line(r['detail'])}"
        elif r["status"] == "skip":
            g = f"skip: {r['detail'][:160]}"
        else:
            g = f"{r['status']}: {first_error_line(r['detail'])}"
        groups.setdefault(g, []).append(f"{s}/{m} {t}")
    print(f"\ngilfree, not passing where the stdlib passes: {len(regressions)} tests in {len(groups)} groups "
          "(by the first line of the error)")
    for g, tests in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        print(f"\n[{len(tests)}] {g}")
        for t in sorted(tests):
            print(f"    {t}")


if __name__ == "__main__":
    main()
