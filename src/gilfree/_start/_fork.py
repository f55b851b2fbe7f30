"""The fork start method (layer L4): the child is a copy of the parent made by ``os.fork()``.

Nothing is pickled: the child already holds the process object.  The child gets a lifeline (see
``_common``); the parent's sentinel is a pidfd.  The child ends with ``os._exit`` as in the stdlib,
so the parent's atexit handlers and buffered files are not run or flushed twice.
"""

from __future__ import annotations

import os

from .. import process
from . import _common


class ForkPopen(_common.ChildPopen):
    method = "fork"

    def _launch(self, process_obj: process.BaseProcess) -> None:
        r, w = _common.new_lifeline()
        # The lock makes sure no other thread's half-registered lifeline leaks into this child.
        with _common._lifeline_lock:
            pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                if process_obj.daemon:
                    _common.arm_lifeline(r)
                code = process_obj._bootstrap(parent_sentinel=r)
            finally:
                os._exit(code)
        os.close(r)
        self._track(pid, w)
