"""``Pool(backend="ray")``: gilfree's pool API on a Ray cluster (layer L9).

::

    caller ── Pool.map / imap / apply_async ──> ClusterEngine (gilfree.backends): pending tasks
                                                   │ dispatcher thread, <= processes in flight
                                                   │  function: ray.put(pickled) once per call
                                                   ▼
              run_ray.options(max_calls, max_retries).remote(key, fid, [fn ref], [init ref],
                                                              kind, pickled args)
                                                   │           Ray raylets schedule it on any node
                                                   ▼
              Ray worker process: _task.execute ── initializer once per process, function
                                                   │ unpickled once per process, args unpickled
                                                   ▼ (writable numpy), outcome pickled
              ObjectRef.future() done ── Ray's callback thread ── event ──> dispatcher:
                                                   unpickle, task.job._done(...) ──> results, callbacks

The actors:

* **The caller and the dispatcher thread** are those of :mod:`gilfree.backends`: the pool code is
  the local pool's; the dispatcher launches remote calls and hands outcomes to the results.
* **The Ray driver** (this process, after ``ray.init``): one per process, shared by every Ray pool
  in it.  Without ``address`` the first Ray pool starts a private local Ray instance
  (``ray.init(address="local", num_cpus=processes)``: "local" never joins another Ray instance found
  on the machine through ``RAY_ADDRESS`` or ``/tmp/ray``) and the last one to close shuts it down;
  with ``address`` ("auto", "host:port" or "ray://host:port") the pools connect to that cluster and
  leave it running.  A ``ray.init()`` the program made itself is used as it is and never shut down.
* **Ray's callback thread** completes the ``ObjectRef.future()`` of each task; the done callback
  posts the outcome bytes to the dispatcher.
* **Ray workers** run :func:`gilfree.backends._task.run_ray`, one task at a time per process.

Known traps, and what this module does about them:

* *Cancelling.*  ``ray.cancel(ref)`` does not stop a task that has started unless ``force=True``,
  which kills the worker process running it.  ``terminate()`` uses ``force=True``: the work stops.
* *Read-only arrays.*  Ray hands numpy arguments out as read-only zero-copy views of its object
  store.  Arguments travel as bytes pickled by ``gilfree.reduction`` and are unpickled in the task,
  so they are private and writable, as with the local pool (results likewise, in the caller).
* *Authentication.*  Every node of a Ray cluster and every driver must use the same
  ``RAY_AUTH_MODE`` ("token" is the default for local clusters from Ray 2.59 on); with "token", each
  needs the cluster's token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``).
  A connection that fails is reported with that reminder and the mode this process uses.
* *maxtasksperchild* is Ray's ``max_calls`` on the remote function: a Ray worker process exits
  after running that many gilfree tasks (chunks, as on the local pool) and Ray starts a fresh one.
* *Retries.*  Ray re-runs a task whose worker died (``max_retries=3`` by default).  Here
  ``max_retries`` follows the pool's ``on_worker_death``: "fail" (the default) 0, "retry"
  ``retries``.  Exceptions raised by the function are never retried.
"""

from __future__ import annotations

import os
import threading

from . import Backend, _task, require

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

__all__ = ["RayBackend", "make_backend"]

# the process's Ray connection, shared by its Ray pools
_lock = threading.Lock()
_users = 0
_owned = False  # ray.init() was called by gilfree (and ray.shutdown() will be)
_address: str | None = None  # what gilfree connected to (None: a local instance it started)


def make_backend(address: str | None, maxtasksperchild: int | None) -> RayBackend:
    return RayBackend(address, maxtasksperchild)


def _auth_hint() -> str:
    mode = os.environ.get("RAY_AUTH_MODE", "unset")
    token = "set" if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") else "not set"
    return (f"every node and driver of a Ray cluster must use the same RAY_AUTH_MODE (here: {mode}) and, "
            f"with token authentication, the cluster's token (RAY_AUTH_TOKEN here: {token}; else "
            f"~/.ray/auth_token is used)")


class RayBackend(Backend):
    """Ray under a :class:`~gilfree.backends.ClusterEngine` (see the module docstring)."""

    name = "ray"

    def __init__(self, address: str | None, maxtasksperchild: int | None) -> None:
        self.ray = require("ray", "ray")
        self.address = address
        self.owns_cluster = False
        self._maxtasks = maxtasksperchild
        self._remote: Any = None
        self._variants: dict[int, Any] = {}
        self._connected = False

    def describe(self) -> str:
        return f"ray {'local instance' if self.address is None else self.address}"

    def __repr__(self) -> str:
        return f"<RayBackend {self.describe()} connected={self._connected}>"

    # -- caller's thread ----------------------------------------------------------------------
    def connect(self, processes: int | None) -> int:
        global _users, _owned, _address
        ray = self.ray
        with _lock:
            if ray.is_initialized():
                if _owned and _address != self.address:
                    raise ValueError(
                        f"this process is connected to Ray {'(a local instance)' if _address is None else _address} "
                        f"for another Ray pool; a process has one Ray connection, so address={self.address!r} "
                        f"cannot be used until that pool is closed"
                    )
            else:
                options: dict[str, Any] = {"include_dashboard": False, "configure_logging": False}
                if self.address is None:
                    options.update(address="local", num_cpus=processes or _local_cpus())
                else:
                    options["address"] = self.address
                    host = self.address.rpartition(":")[0]
                    if host.startswith("127.") and host != "127.0.0.1":
                        # Ray replaces 127.0.0.1 by the machine's network address, and finds the
                        # node of a driver by its address: a node started with --node-ip-address=127.0.0.x
                        # (traffic kept on loopback) is this driver's node
                        options["_node_ip_address"] = host
                try:
                    ray.init(**options)
                except Exception as exc:
                    where = "start a local Ray instance" if self.address is None else f"connect to {self.address!r}"
                    raise ConnectionError(f"gilfree could not {where}: {exc}; {_auth_hint()}") from exc
                _owned, _address = True, self.address
            _users += 1
            self.owns_cluster = _owned and _address is None
            self._connected = True
        try:
            if processes is None:
                processes = max(1, int(ray.cluster_resources().get("CPU", 1)))
            # max_calls is a property of the remote function (Ray refuses it in .options())
            self._remote = ray.remote(_task.run_ray) if self._maxtasks is None else \
                ray.remote(max_calls=self._maxtasks)(_task.run_ray)
        except BaseException:
            self.disconnect()
            raise
        return processes

    # -- dispatcher thread ---------------------------------------------------------------------
    def put_function(self, pickled: bytes) -> Any:
        return self.ray.put(pickled)

    def launch(self, key: str, fid: int, function: Any, init: Any, kind: int, payload: bytes, retries: int,
               done: Callable[[Any, bool, Any], None]) -> Any:
        remote = self._variants.get(retries)
        if remote is None:
            remote = self._variants[retries] = self._remote.options(num_cpus=1, max_retries=retries,
                                                                    retry_exceptions=False)
        # the refs are boxed in lists: Ray resolves top-level ObjectRef arguments before every call,
        # while a worker needs the function only once (it keeps it unpickled)
        ref = remote.remote(key, fid, [function], None if init is None else [init], kind, payload)

        def finished(future: Any) -> None:
            try:
                data = future.result()
            except BaseException as exc:  # the task never ran to its end: worker crash, cancel
                done(ref, False, exc)
            else:
                done(ref, True, data)

        ref.future().add_done_callback(finished)
        return ref

    def cancel(self, handles: list[Any]) -> None:
        for ref in handles:
            try:
                self.ray.cancel(ref, force=True)  # without force a running task goes on
            except Exception:  # finished meanwhile
                pass

    def disconnect(self) -> None:
        global _users, _owned, _address
        if not self._connected:
            return
        self._connected = False
        self._remote = None
        self._variants.clear()
        with _lock:
            _users -= 1
            if _users == 0 and _owned:
                _owned, _address = False, None
                try:
                    self.ray.shutdown()
                except Exception:  # pragma: no cover - nothing more to do
                    pass


def _local_cpus() -> int:
    from ..pool import _default_workers

    return _default_workers()
