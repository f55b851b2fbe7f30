"""CPython's own multiprocessing and concurrent.futures suites, run against gilfree (the gate).

Deselected by default (minutes, not seconds); CI runs them on 3.11 and 3.13:

    bash scripts/test -m cpython tests/test_cpython_suites.py

Each test runs ``tests/cpython/run_suites.py --gate tests/cpython/known.txt`` on a slice of the suites
this interpreter ships: it fails when a test that passes on the stdlib (run in the same harness, on
this machine) fails on gilfree twice and is not listed in ``tests/cpython/known.txt``, where every
entry is either a deliberate difference explained in docs/compat.md or marked ``open`` (not fixed
yet).  The runner's own output (table, groups, the gate's verdict) is printed as it goes
(``-s`` shows it live; on failure pytest shows it anyway).  ``GILFREE_CPYTHON_METHODS`` overrides
the start methods (the slice below is what CI runs in its time budget).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(HERE, "cpython", "run_suites.py")
KNOWN = os.path.join(HERE, "cpython", "known.txt")

pytestmark = pytest.mark.cpython


def _ships(suite: str) -> bool:
    import test

    d = os.path.dirname(test.__file__)
    return {"mp": os.path.exists(os.path.join(d, "_test_multiprocessing.py")),
            "cf": os.path.isdir(os.path.join(d, "test_concurrent_futures")),
            "main": os.path.exists(os.path.join(d, "test_multiprocessing_main_handling.py"))}[suite]


#: (suite, start methods) per interpreter: 3.11 and 3.13 split the matrix between them, so that
#: every suite and every start method is covered in CI once.
SLICES = {
    (3, 11): [("mp", "fork,spawn"), ("main", "fork,spawn,forkserver")],
    (3, 13): [("cf", "fork,spawn,forkserver"), ("mp", "forkserver"), ("main", "fork,spawn,forkserver")],
}
DEFAULT = [("mp", "fork"), ("cf", "fork"), ("main", "fork,spawn,forkserver")]


def _slices() -> list[tuple[str, str]]:
    return SLICES.get(sys.version_info[:2], DEFAULT)


@pytest.mark.timeout(3000)
@pytest.mark.parametrize("suite,methods", _slices(), ids=[f"{s}-{m}" for s, m in _slices()])
def test_cpython_suite(suite, methods, tmp_path):
    try:
        have = _ships(suite)
    except ImportError:
        have = False
    if not have:
        pytest.skip(f"this interpreter does not ship the {suite!r} suite (the 'test' package)")
    methods = os.environ.get("GILFREE_CPYTHON_METHODS", methods)
    src = os.path.join(os.path.dirname(HERE), "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, RUNNER, "--suites", suite, "--methods", methods, "--impl", "gilfree",
           "--gate", KNOWN, "--json", str(tmp_path / "results.json")]
    out = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                          stdin=subprocess.DEVNULL) as p:
        assert p.stdout is not None
        for line in p.stdout:
            out.append(line)
            sys.stdout.write(line)
        rc = p.wait()
    text = "".join(out)
    assert rc == 0, ("CPython's suite fails on gilfree where the stdlib passes; the gate's verdict:\n"
                     + text[text.find("\ngate:"):][-20000:])
