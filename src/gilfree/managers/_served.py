"""What SyncManager serves (layer L6, in :mod:`gilfree.managers`): :class:`Namespace`, :class:`Value`,
:func:`Array`, the queue whose blocking calls give up when their client hangs up (:class:`_ServedQueue`),
and the reducers that send dict views as lists.  These objects live in the server process."""

from __future__ import annotations

import array
import queue
import time

from .. import reduction
from ._protocol import _ctx

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Iterable


# Dict views and arrays cross the wire as lists / arrays (as the stdlib's managers arrange).
def _rebuild_as_list(obj: Any) -> tuple[Any, tuple[Any, ...]]:
    return list, (list(obj),)


_VIEW_TYPES: tuple[type, ...] = (type({}.keys()), type({}.values()), type({}.items()))
for _view_type in _VIEW_TYPES:
    reduction.register(_view_type, _rebuild_as_list)
del _view_type




class Namespace:
    """A plain object whose attributes are shared (``manager.Namespace(a=1)``)."""

    def __init__(self, /, **kwds: Any) -> None:
        self.__dict__.update(kwds)

    def __repr__(self) -> str:
        items = sorted(f"{k}={v!r}" for k, v in self.__dict__.items() if not k.startswith("_"))
        return f"{type(self).__name__}({', '.join(items)})"


class Value:
    """A shared value with ``get``/``set``/``.value`` (``typecode`` is kept, not enforced)."""

    def __init__(self, typecode: Any, value: Any, lock: Any = True) -> None:
        self._typecode = typecode
        self._value = value

    def get(self) -> Any:
        return self._value

    def set(self, value: Any) -> None:
        self._value = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._typecode!r}, {self._value!r})"

    value = property(get, set)


def Array(typecode: str, sequence: Iterable[Any], lock: Any = True) -> array.array:
    """A shared ``array.array``."""
    return array.array(typecode, sequence)


class _CallerGone(Exception):
    """Raised in the server to abandon a blocking call whose client hung up."""


def _caller_gone() -> bool:
    state = _ctx.conn
    return state is not None and (state.dead or state.hup)


class _ServedQueue(queue.Queue):  # type: ignore[type-arg]
    """The server side of ``SyncManager.Queue``: a ``queue.Queue`` whose blocking ``get``/``put`` give up
    when the client that waits has died, so the item it would have taken stays in the queue (the
    stdlib's server would hand it to the dead client's thread, and it would be lost)."""

    _SLICE = 0.25

    def _sliced(self, op: Callable[[bool, float | None], Any], block: bool, timeout: float | None) -> Any:
        if not block or _ctx.conn is None:
            return op(block, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = self._SLICE if deadline is None else min(self._SLICE, deadline - time.monotonic())
            try:
                return op(True, max(wait, 0.0))
            except (queue.Empty, queue.Full):
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                if _caller_gone():
                    raise _CallerGone("the client that waited has hung up") from None

    # An item that is there (a put into a queue without a limit) is taken at once: no slices, no clock,
    # and a Condition is notified only if someone waits on it (Condition.notify costs more than the
    # rest of a put).  This was 40% of the server's time per put/get.
    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        with self.mutex:
            items = self.queue  # what _qsize/_get/_put of queue.Queue use, without their calls
            if items:
                item = items.popleft()
                if self.not_full._waiters:  # type: ignore[attr-defined]
                    self.not_full.notify()
                return item
        return self._sliced(super().get, block, timeout)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if self.maxsize > 0:
            return self._sliced(lambda b, t: super(_ServedQueue, self).put(item, b, t), block, timeout)
        with self.mutex:
            self.queue.append(item)
            self.unfinished_tasks += 1
            if self.not_empty._waiters:  # type: ignore[attr-defined]
                self.not_empty.notify()
        return None
