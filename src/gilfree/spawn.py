"""``multiprocessing.spawn``'s public helpers, over gilfree's launchers (layer L4).

What programs call: :func:`set_executable` / :func:`get_executable` (the interpreter spawned children
and the fork server run), :func:`freeze_support`, :func:`get_preparation_data` / :func:`prepare`
(make a fresh interpreter look like this process: name, paths, ``__main__``), :func:`import_main_path`.
The stdlib's launch protocol itself (``spawn_main``, ``_main``, ``get_command_line``: a command line
that unpickles a process object from a pipe) is not gilfree's -- its children start through
:mod:`gilfree._start` -- and is not offered.

Where this runs: any process, the calling thread.
"""

from __future__ import annotations

from . import process
from ._start import _common
from ._start._common import get_executable, set_executable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["freeze_support", "set_executable", "get_executable", "get_preparation_data", "prepare",
           "import_main_path", "is_forking"]

#: the stdlib's flags for frozen Windows executables and services: never on POSIX
WINEXE = False
WINSERVICE = False


def is_forking(argv: list[str]) -> bool:
    """Whether ``argv`` is the command line of a stdlib spawned child (never gilfree's)."""
    return len(argv) >= 2 and argv[1] == "--multiprocessing-fork"


def freeze_support() -> None:
    """Nothing to do on POSIX (frozen Windows executables need it with the stdlib)."""


def get_preparation_data(name: str) -> dict[str, Any]:
    """What a fresh interpreter needs, given to :func:`prepare`, to look like this process
    (``name`` becomes its process name)."""
    ctx = process.default_context
    method = ctx.get_start_method(allow_none=True) if ctx is not None else None
    return _common.preparation_data(name, method or "spawn")


def prepare(data: dict[str, Any]) -> None:
    """In a fresh interpreter: adopt the name, paths and logging in ``data``; import the parent's
    ``__main__`` as ``__mp_main__``."""
    _common.prepare(data)


def import_main_path(main_path: str) -> None:
    """Import the script ``main_path`` as ``__mp_main__`` (and ``__main__``), as a spawned child does."""
    _common._import_main_from_path(main_path)


