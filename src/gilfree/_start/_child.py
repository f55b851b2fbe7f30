"""The child side of spawn and forkserver (layer L4): from a start-up payload to a running process.

Where this runs: in a freshly spawned interpreter (:func:`main`) or in a child forked by the fork
server (:func:`run_child`), once, before any user code of the child.
"""

from __future__ import annotations

import sys

from .. import reduction, util
from .._errors import MainModuleNotGuardedError
from . import _common


def run_child(life_r: int, received_fds: list[int] | None = None) -> int:
    """Read the payload from ``life_r``, prepare, unpickle and bootstrap; return the exit code."""
    prep_bytes, obj_bytes, fds = _common.read_payload(life_r)
    if received_fds is not None:
        fds = received_fds
    prep = reduction.loads(prep_bytes)
    try:
        _common.prepare(prep)
    except MainModuleNotGuardedError as exc:
        sys.stderr.write(f"gilfree: {exc}\n")
        util._flush_std_streams()
        return 1
    claimed = {0}

    def resolve(token: int) -> int:
        claimed.add(token + 1)  # fds[0] is the lifeline
        return fds[token + 1]

    try:
        with reduction.fd_channel(resolve=resolve):
            process_obj = reduction.loads(obj_bytes)
    finally:
        util.close_fds(*(fd for i, fd in enumerate(fds) if i not in claimed))
    if process_obj.daemon:
        _common.arm_lifeline(life_r)
    return process_obj._bootstrap(parent_sentinel=life_r)


def main() -> None:
    """Entry point of a spawned child: ``python -c "...; main()" <lifeline fd>``."""
    fd = int(sys.argv[-1])
    code = run_child(fd)
    sys.exit(code)

