"""The spawn start method (layer L4): the child is a fresh interpreter.

    parent                                          child (python -c "...main()" <fd>)
    ------                                          -----
    preparation data (with the main     ──lifeline pipe──>  read payload, adopt sys.path/cwd/name,
    script compiled once) + pickled process
    (fds inside the process object are                      run __main__ as __mp_main__ (its
     passed with posix_spawn, same numbers)                 guarded block does not run), unpickle
                                                            the process, bootstrap, sys.exit(code)
    sentinel = pidfd(child)         <──exit──

``posix_spawn`` (vfork + exec in the C library) starts the interpreter without copying the parent's
page tables.  The child imports only what it needs: ``gilfree`` resolves its heavy modules
(locks, shared ctypes, queues, numpy arrays), ``cloudpickle``, ``logging`` and ``socket.py`` on first
use (docs/design.md, "start-up imports"), and runs the main script from the code object the parent
compiled once instead of compiling it again.
"""

from __future__ import annotations

import os

from .. import process
from . import _common

CHILD_CODE = "from gilfree._start._child import main; main()"


class SpawnPopen(_common.ChildPopen):
    method = "spawn"

    def _launch(self, process_obj: process.BaseProcess) -> None:
        _common.check_main_guard(self.method)
        prep = _common.preparation_data(process_obj._name, self.method)
        r, w = _common.new_lifeline()
        fds = [r]
        try:
            payload = _common.dump_payload(prep, process_obj, self, fds)
            pid = _common.spawn_interpreter(CHILD_CODE, [str(r)], fds)
        except BaseException:
            os.close(r)
            _common.release_lifeline(w)
            raise
        os.close(r)
        self._track(pid, w)
        _common.write_payload(w, payload)
