"""Thread-to-thread connections for :mod:`gilfree.dummy` (``multiprocessing.dummy.connection``)."""

from __future__ import annotations

from queue import Queue

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Client", "Listener", "Pipe", "Connection"]

families = [None]
_listeners: dict[Any, Listener] = {}


class Connection:
    """One end of a pair of queues; objects pass as they are, unpickled."""

    def __init__(self, inbox: Queue[Any], outbox: Queue[Any]) -> None:
        self._in = inbox
        self._out = outbox
        self.send = self.send_bytes = outbox.put
        self.recv = self.recv_bytes = inbox.get

    def poll(self, timeout: float | None = 0.0) -> bool:
        if self._in.qsize() > 0:
            return True
        if timeout is not None and timeout <= 0.0:
            return False
        with self._in.not_empty:
            self._in.not_empty.wait(timeout)
        return self._in.qsize() > 0

    def close(self) -> None:
        pass

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def Pipe(duplex: bool = True) -> tuple[Connection, Connection]:
    a: Queue[Any] = Queue()
    b: Queue[Any] = Queue()
    return Connection(a, b), Connection(b, a)


class Listener:
    """Accepts connections made with :func:`Client` to the same address, in this process."""

    def __init__(self, address: Any = None, family: Any = None, backlog: int = 1) -> None:
        self._backlog: Queue[Any] = Queue(backlog)
        self.address = address if address is not None else id(self)
        _listeners[self.address] = self

    def accept(self) -> Connection:
        if self._backlog is None:
            raise OSError("listener is closed")
        return Connection(*self._backlog.get())

    def close(self) -> None:
        _listeners.pop(self.address, None)

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def Client(address: Any) -> Connection:
    listener = _listeners.get(address)
    if listener is None:
        raise ConnectionRefusedError(f"no gilfree.dummy Listener at {address!r}")
    a: Queue[Any] = Queue()
    b: Queue[Any] = Queue()
    listener._backlog.put((a, b))
    return Connection(b, a)
