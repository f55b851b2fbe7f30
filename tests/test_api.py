"""The public surface: what `import gilfree as multiprocessing` offers, written out and typed."""

from __future__ import annotations

import multiprocessing as std_mp
import sys
import types
from pathlib import Path

import gilfree

# names of the stdlib's top-level API that exist in gilfree today (later issues extend this list)
IMPLEMENTED = [
    "Process", "current_process", "parent_process", "active_children", "cpu_count", "get_context",
    "set_start_method", "get_start_method", "get_all_start_methods", "set_executable",
    "set_forkserver_preload", "freeze_support", "get_logger", "log_to_stderr",
    "allow_connection_pickling", "Pipe", "ProcessError", "BufferTooShort", "TimeoutError",
    "AuthenticationError", "SUBDEBUG", "SUBWARNING", "Lock", "RLock", "Semaphore", "BoundedSemaphore",
    "Condition", "Event", "Barrier", "Value", "Array", "RawValue", "RawArray", "Queue", "SimpleQueue",
    "JoinableQueue", "Manager", "Pool",
]


def test_stdlib_names_exist():
    for name in IMPLEMENTED:
        assert hasattr(std_mp, name), name
        assert hasattr(gilfree, name), name


def test_all_is_complete_and_resolvable():
    for name in gilfree.__all__:
        assert hasattr(gilfree, name), name
    # a submodule becomes an attribute of the package once anything imports it (gilfree.backends
    # after a backend test ran): what the tests before imported must not decide this test
    public = {n for n, v in vars(gilfree).items() if not n.startswith("_")
              and not (isinstance(v, types.ModuleType) and v.__name__ == f"gilfree.{n}")} - {"annotations", "Any"}
    assert public <= set(gilfree.__all__), public - set(gilfree.__all__)


def test_process_is_a_real_class():
    assert isinstance(gilfree.Process, type)

    class Mine(gilfree.Process):
        pass

    assert issubclass(Mine, gilfree.process.BaseProcess)


def test_exceptions_hierarchy():
    for name in ("BufferTooShort", "TimeoutError", "AuthenticationError"):
        assert issubclass(getattr(gilfree, name), gilfree.ProcessError)
    assert issubclass(gilfree.PicklingError, TypeError)
    assert gilfree.AuthenticationError.__module__ == "gilfree"


def test_py_typed_ships():
    assert (Path(gilfree.__file__).parent / "py.typed").exists()


def test_import_does_not_load_heavy_modules():
    import subprocess

    code = "import gilfree, sys; print(' '.join(sorted(m for m in ('cloudpickle', 'logging', 'multiprocessing') if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
