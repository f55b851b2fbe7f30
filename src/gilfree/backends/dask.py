"""``Pool(backend="dask")``: gilfree's pool API on a Dask distributed cluster (layer L9).

::

    caller ── Pool.map / imap / apply_async ──> ClusterEngine (gilfree.backends): pending tasks
                                                   │ dispatcher thread, <= processes in flight
                                                   │  function: client.scatter(pickled, broadcast=True) once per call
                                                   ▼
              client.submit(run_dask, key, fid, fn future, init future, kind, pickled args,
                            pure=False)  ──> scheduler ──> a worker (any machine)
                                                   ▼
              Dask worker thread: _task.execute ── initializer once per process, function
                                                   │ unpickled once per process, args unpickled
                                                   ▼ (writable numpy), outcome pickled
              future done ── the client's callback thread: future.result() ── event ──> dispatcher:
                                                   unpickle, task.job._done(...) ──> results, callbacks

The actors:

* **The caller and the dispatcher thread** are those of :mod:`gilfree.backends`.
* **The Dask client** (one per pool, with its event-loop thread): without ``address`` the pool starts
  a ``distributed.LocalCluster`` of ``processes`` worker processes with one thread each (on loopback,
  its HTTP server on a free port) and closes it with the pool; with ``address`` ("tcp://host:8786", or a scheduler
  file's address) it connects a client and leaves the cluster running.
* **The client's callback thread** runs each future's done callback: it fetches the outcome bytes
  (``future.result()``, a round trip to the worker holding them) and posts them to the dispatcher.
* **Dask workers** run :func:`gilfree.backends._task.run_dask` in their threads.

Known traps, and what this module does about them:

* *Deduplication.*  Dask gives a task a key hashed from its function and arguments and runs equal
  keys once; ``pure=False`` gives every task its own key, so ``apply_async(random.random)`` twice is
  two calls, as on the local pool.
* *Per-task overhead.*  A Dask task costs about a millisecond or two of scheduler time: the pool's
  chunking (``map``'s chunks, ``imap``'s automatic chunk sizes, from the seconds each task reports)
  sends many items per task.
* *Cancelling.*  ``client.cancel(force=True)`` forgets the tasks, but a worker thread that is
  already running one cannot be stopped: it runs to its end and its result is dropped.  A pool that
  started its own cluster (no ``address``) closes it on ``terminate()``, which kills the workers; on
  an existing cluster, a task that has started finishes in the background.
* *maxtasksperchild.*  Dask has no per-process task quota (its workers run tasks in threads and are
  recycled only by ``dask worker --lifetime`` or a memory limit): the argument is accepted and not
  enforced; a ``RuntimeWarning`` says so when the pool starts.
* *Retries.*  The scheduler itself re-runs a task whose worker died (``distributed.scheduler.
  allowed-failures``, 3 by default, then ``KilledWorker``); ``on_worker_death`` and ``retries`` of the
  pool do not change that.
"""

from __future__ import annotations

import warnings

from . import Backend, _task, require

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

__all__ = ["DaskBackend", "make_backend"]


def make_backend(address: str | None, maxtasksperchild: int | None) -> DaskBackend:
    return DaskBackend(address, maxtasksperchild)


class DaskBackend(Backend):
    """Dask distributed under a :class:`~gilfree.backends.ClusterEngine` (see the module docstring)."""

    name = "dask"

    def __init__(self, address: str | None, maxtasksperchild: int | None) -> None:
        self.distributed = require("distributed", "dask")
        self.address = address
        self.owns_cluster = address is None
        self.cluster: Any = None
        self.client: Any = None
        if maxtasksperchild is not None:
            warnings.warn(
                f"maxtasksperchild={maxtasksperchild} is not enforced with backend='dask': Dask workers run "
                f"tasks in threads and have no per-process task quota (recycle them with `dask worker "
                f"--lifetime` or a memory limit)", RuntimeWarning, stacklevel=5)

    def describe(self) -> str:
        if self.client is not None and self.client.scheduler is not None:
            where = self.client.scheduler.address
        else:
            where = self.address or "local cluster"
        return f"dask {where}{' (local cluster)' if self.owns_cluster else ''}"

    def __repr__(self) -> str:
        return f"<DaskBackend {self.describe()}>"

    # -- caller's thread ----------------------------------------------------------------------
    def connect(self, processes: int | None) -> int:
        distributed = self.distributed
        try:
            if self.address is None:
                from ..pool import _default_workers

                processes = processes or _default_workers()
                self.cluster = distributed.LocalCluster(
                    n_workers=processes, threads_per_worker=1, processes=True, host="127.0.0.1",
                    # the scheduler's HTTP server (metrics) on a free loopback port: no clash with another
                    # cluster on 8787; silence_logs=logging.ERROR: no start-up chatter
                    dashboard_address="127.0.0.1:0", silence_logs=40,
                )
                self.client = distributed.Client(self.cluster, set_as_default=False)
            else:
                self.client = distributed.Client(self.address, set_as_default=False)
        except Exception as exc:
            self.disconnect()
            where = "start a local Dask cluster" if self.address is None else f"connect to {self.address!r}"
            raise ConnectionError(f"gilfree could not {where}: {exc}") from exc
        if processes is None:
            try:
                processes = max(1, sum(self.client.nthreads().values()))
            except BaseException:
                self.disconnect()
                raise
        return processes

    # -- dispatcher thread ---------------------------------------------------------------------
    def put_function(self, pickled: bytes) -> Any:
        # broadcast: with the data on one worker only, the scheduler would send every task there
        # (data locality) and leave the others idle until work stealing kicks in.  hash=False: two
        # calls with equal pickles still get their own data (released separately).
        return self.client.scatter(pickled, hash=False, broadcast=True)

    def launch(self, key: str, fid: int, function: Any, init: Any, kind: int, payload: bytes, retries: int,
               done: Callable[[Any, bool, Any], None]) -> Any:
        future = self.client.submit(_task.run_dask, key, fid, function, init, kind, payload, pure=False)

        def finished(future: Any) -> None:
            try:
                data = future.result()
            except BaseException as exc:  # a lost worker (KilledWorker), a cancellation
                done(future, False, exc)
            else:
                done(future, True, data)

        future.add_done_callback(finished)
        return future

    def cancel(self, handles: list[Any]) -> None:
        self.client.cancel(handles, force=True)

    def disconnect(self) -> None:
        client, cluster = self.client, self.cluster
        if client is not None:
            try:
                client.close()
            except Exception:  # pragma: no cover - the scheduler is gone already
                pass
        if cluster is not None:
            try:
                cluster.close()
            except Exception:  # pragma: no cover
                pass
        self.cluster = None
