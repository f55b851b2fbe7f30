"""Helpers for tests that run whole programs, under gilfree and under the stdlib."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def write_program(tmp_path: Path, source: str, module: str = "gilfree", method: str | None = None, name: str = "prog.py") -> Path:
    """Write ``source`` as a program that imports ``module`` as ``multiprocessing``.

    ``source`` uses the name ``multiprocessing``; a ``set_start_method`` line is added if ``method``.
    """
    head = f"import {module} as multiprocessing\n"
    if method:
        head += f"multiprocessing.set_start_method({method!r}, force=True)\n"
    path = tmp_path / name
    path.write_text(head + textwrap.dedent(source))
    return path


def run_program(path: Path | list[str], timeout: float = 60, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a program with this interpreter; return the completed process (text output)."""
    args = [sys.executable, str(path)] if isinstance(path, Path) else [sys.executable, *path]
    full_env = dict(os.environ)
    # block-buffered output, as a user running the program into a pipe or file gets: each process
    # writes what it printed in one piece, so two processes' lines never mix inside a line
    full_env.pop("PYTHONUNBUFFERED", None)
    full_env["PYTHONPATH"] = SRC + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=str(cwd or (path.parent if isinstance(path, Path) else os.getcwd())))


def mask_pids(text: str) -> str:
    return re.sub(r"\b\d{3,}\b", "<N>", text)


#: seconds a test waits for a child to end
WAIT = 30


@contextlib.contextmanager
def running(ctx, target, *args):
    """Start a process; on the way out kill it if it still runs, and join it."""
    p = ctx.Process(target=target, args=args)
    del args  # as after a plain start(), the child's arguments are referenced only by the caller
    p.start()
    try:
        yield p
    finally:
        if p.exitcode is None:
            p.kill()
        p.join(WAIT)
        assert p.exitcode is not None, "child did not end"
