"""The fork start method (layer L4): the child is a copy of the parent made by ``os.fork()``.

Nothing is pickled: the child already holds the process object.  The child gets a lifeline (see
``_common``); the parent's sentinel is a pidfd.  The child ends with ``os._exit`` as in the stdlib,
so the parent's atexit handlers and buffered files are not run or flushed twice; the handlers the
child registers itself do run (as in the stdlib from 3.13): the inherited ones are dropped at the
fork, and the child's are run before ``os._exit``.
"""

from __future__ import annotations

import atexit
import os

from .. import process
from . import _common


class ForkPopen(_common.ChildPopen):
    method = "fork"

    def _launch(self, process_obj: process.BaseProcess) -> None:
        r, w = _common.new_lifeline()
        # The guard makes sure no other thread's half-registered lifeline leaks into this child.  The
        # at-fork handlers run under it (a collection there may release a dead child's lifeline: the
        # guard hands that to us instead of waiting for itself); only the parent releases it, the
        # child's was made fresh by the at-fork hook.
        guard = _common._lifeline_guard
        guard.acquire()
        try:
            pid = os.fork()
        except BaseException:
            guard.release()
            os.close(r)
            _common.release_lifeline(w)
            raise
        if pid == 0:  # child
            code = 1
            try:
                _common.own_atexit()
                if process_obj.daemon:
                    _common.arm_lifeline(r)
                code = process_obj._bootstrap(parent_sentinel=r)
            finally:
                atexit._run_exitfuncs()
                os._exit(code)
        guard.release()
        os.close(r)
        self._track(pid, w)
