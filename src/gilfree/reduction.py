"""Pickling in two tiers, with out-of-band buffers and file-descriptor transfer (layer L1).

Tier 1 is the stdlib's C pickler (protocol 5) with this package's dispatch table: it pickles
functions and classes *by reference* (module + qualified name), which is fast and is what the
stdlib does.  When tier 1 fails -- a lambda, a closure, a class defined in a function, a function of
an interactive ``__main__`` -- the same object is pickled again by tier 2, cloudpickle, which pickles
what cannot be found by reference *by value* and everything else by reference.  An object that
neither tier can pickle raises :class:`~gilfree.PicklingError` in the caller, naming the culprit's
type and where it sits inside the sent value (``obj['jobs'][3].lock``).

Large buffers (``bytes``/``bytearray`` payloads, ``numpy`` arrays, :class:`pickle.PickleBuffer`)
are never copied into the pickle stream: the pickler hands them to the sink as they are
(:func:`dump_chunks`) and the connection writes them straight from the object's memory.  Buffers of
at least ``oob_min`` bytes are taken out of band, so the receiver reads them directly into their
final place.

File descriptors inside pickled objects (a ``Connection`` passed to a child, a socket) go through a
*channel* that the sender sets for the duration of one dump: a launcher that starts a child
registers the fds it must pass to the child; a connection over a Unix socket attaches them to the
message (``SCM_RIGHTS``).  The pickle holds only a token; the receiver's channel turns the token
back into a descriptor it owns.

Where this runs: in every process, on the thread that sends or receives.  Nothing here blocks.
"""

from __future__ import annotations

import _pickle as pickle  # the C pickler itself: `pickle.py` would also import `re` (start-up imports, design.md)
import copyreg
import io
import os
import sys
import threading

from ._errors import PicklingError

# `typing` costs a spawned child several ms to import; annotations are strings here anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Iterator

__all__ = [
    "ForkingPickler",
    "DupFd",
    "dump",
    "dumps",
    "loads",
    "dump_chunks",
    "register",
    "assert_spawning",
    "fd_channel",
    "sendfds",
    "recvfds",
    "send_handle",
    "recv_handle",
    "HAVE_SEND_HANDLE",
]

HIGHEST_PROTOCOL = 5
DEFAULT_PROTOCOL = 5

# Exceptions with which the stdlib pickler says "I cannot pickle this by reference".  Tier 2 is
# tried after any of them; a RecursionError or MemoryError is not retried.
_TIER1_FAILURES = (pickle.PicklingError, TypeError, AttributeError, ValueError)

# --------------------------------------------------------------------------------------------------
# The dispatch table: copyreg's, plus the reducers this package (and users, via register()) add.
# The C pickler looks a plain dict up in C, so the table is kept as one flat dict, rebuilt when
# register() is called or copyreg's own table changes size.

_extra_reducers: dict[type, Callable[[Any], Any]] = {}
_table: dict[type, Callable[[Any], Any]] = {}
_table_copyreg_len = -1


def _dispatch_table() -> dict[type, Callable[[Any], Any]]:
    global _table, _table_copyreg_len
    if not _socket_registered and "socket" in sys.modules:
        _register_socket_reducer()
    if _table_copyreg_len != len(copyreg.dispatch_table):
        table = dict(copyreg.dispatch_table)
        table.update(_extra_reducers)
        _table, _table_copyreg_len = table, len(copyreg.dispatch_table)
    return _table


# Sockets pickle through the fd channel.  The reducer is registered once the program has imported
# `socket` (a spawned child must not import it just for this).
_socket_registered = False


def _rebuild_socket(df: Any, family: int, type_: int, proto: int) -> Any:
    import socket

    return socket.socket(family, type_, proto, fileno=df.detach())


def _reduce_socket(s: Any) -> tuple[Any, tuple[Any, ...]]:
    return _rebuild_socket, (DupFd(s.fileno()), s.family, s.type, s.proto)


def _register_socket_reducer() -> None:
    global _socket_registered
    _socket_registered = True
    register(sys.modules["socket"].socket, _reduce_socket)


def register(type_: type, reduce: Callable[[Any], Any]) -> None:
    """Use ``reduce(obj)`` to pickle instances of ``type_`` in everything this package sends."""
    global _table_copyreg_len
    _extra_reducers[type_] = reduce
    _table_copyreg_len = -1


class _Sink:
    """The file a pickler writes to: keeps the chunks it is given, copying none."""

    __slots__ = ("chunks",)

    def __init__(self) -> None:
        self.chunks: list[Any] = []

    def write(self, chunk: Any) -> None:
        self.chunks.append(chunk)


class _Tier1(pickle.Pickler):
    """The stdlib's C pickler with this package's dispatch table (by reference, fast)."""

    def __init__(self, file: Any, protocol: int, buffer_callback: Callable[[Any], Any] | None) -> None:
        super().__init__(file, protocol, buffer_callback=buffer_callback)
        self.dispatch_table = _dispatch_table()


_tier2_class: type | None = None


def _tier2() -> type:
    """The cloudpickle-based pickler (tier 2), built on first use.

    cloudpickle is imported here rather than at the top on purpose: importing it costs a child
    process about 20 ms of start-up, and most programs never need it (docs/design.md).
    """
    global _tier2_class
    if _tier2_class is None:
        import cloudpickle

        base = cloudpickle.Pickler

        class _Tier2(base):  # type: ignore[misc, valid-type]
            def __init__(self, file: Any, protocol: int, buffer_callback: Any) -> None:
                # set before the base initialiser: cloudpickle's class attribute would otherwise
                # shadow the C pickler's table and our reducers would be ignored
                table = dict(base.dispatch_table)
                table.update(_dispatch_table())
                self.dispatch_table = table
                super().__init__(file, protocol=protocol, buffer_callback=buffer_callback)

        _tier2_class = _Tier2
    return _tier2_class


_main_checked: tuple[int, bool] = (0, False)
# A reference to ``__main__`` is a string in one of the pickler's own frames, which are under
# 64 KiB plus one item (< 64 KiB); larger chunks are payloads handed through as they are (a user's
# bytes), never scanned: scanning each 1 MB message cost a third of the pipe's throughput.
_FRAME_SCAN_LIMIT = 2 * 65536


def _main_is_reimportable() -> bool:
    """Whether a spawned child can import ``__main__`` again (from its file or module name).

    When it cannot (an interactive session, ``python -c``, a notebook, the ``__main__`` of a package
    run with ``-m``), functions and classes of ``__main__`` must travel by value.  Cached per
    ``__main__`` module object: this is asked for every message sent.
    """
    global _main_checked
    main = sys.modules.get("__main__")
    if main is None:
        return False
    if _main_checked[0] == id(main):
        return _main_checked[1]
    answer = main_runs_in_children(main)
    _main_checked = (id(main), answer)
    return answer


def main_runs_in_children(main: Any) -> bool:
    """Whether a spawned child runs (imports) the main module ``main`` again, as the stdlib decides --
    the one rule for what travels by reference and what the start methods send the child.

    Not a package's or a directory's ``__main__`` (``python -m pkg``, ``python dir``), not the IPython
    launcher (``ipython.py``), not a main module without a file that exists (the REPL, ``-c``, a
    notebook): their functions and classes travel by value, and starting processes from their
    unguarded code is no fork bomb."""
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None) if spec is not None else None
    if name:
        return name != "__main__" and not name.endswith(".__main__")
    path = main_file(main)
    if path is None:
        return False
    return os.path.splitext(os.path.basename(path))[0] != "ipython" and os.path.exists(path)


_main_file: tuple[Any, str] | None = None


def main_file(main: Any) -> str | None:
    """The main module's file, also once the interpreter has deleted ``__main__.__file__`` -- which it
    does when the script's last line has run, before the exit hooks (where an executor still starts
    workers for the futures pending): remembered whenever it is seen, and at gilfree's import."""
    global _main_file
    path = getattr(main, "__file__", None)
    if isinstance(path, str) and path:
        if _main_file is None or _main_file[0] is not main:
            _main_file = (main, path)
        return path
    if _main_file is not None and _main_file[0] is main:
        return _main_file[1]
    return None


main_file(sys.modules.get("__main__"))


def _in_band(buf: pickle.PickleBuffer, oob_min: int | None, oob: list[Any]) -> bool:
    """The pickler's buffer callback: True keeps ``buf`` in the stream; else it is appended to ``oob``."""
    if oob_min is None:
        return True
    view = memoryview(buf)
    if view.nbytes < oob_min or not view.contiguous:
        return True
    oob.append(buf)
    return False


def _dump_with(cls: type, obj: Any, protocol: int, oob_min: int | None) -> tuple[list[Any], list[Any]]:
    sink = _Sink()
    oob: list[Any] = []
    callback = None
    if oob_min is not None:
        def callback(buf: pickle.PickleBuffer) -> bool:
            return _in_band(buf, oob_min, oob)

    cls(sink, protocol, callback).dump(obj)
    return sink.chunks, oob


class _CachedPickler(threading.local):
    """One reusable tier-1 pickler per thread: building a pickler costs more than pickling a small
    message.  ``busy`` guards against re-entrant use (a reducer that pickles something itself)."""

    def __init__(self) -> None:
        self.busy = False
        self.pickler: _Tier1 | None = None
        self.table: dict[type, Any] | None = None
        self.sink = _Sink()
        self.oob: list[Any] = []
        self.oob_min: int | None = None

    def build(self, table: dict[type, Any]) -> _Tier1:
        def callback(buf: pickle.PickleBuffer) -> bool:
            return _in_band(buf, self.oob_min, self.oob)

        self.pickler = _Tier1(self.sink, DEFAULT_PROTOCOL, callback)
        self.table = table
        return self.pickler


_cached = _CachedPickler()


def _tier1_dump(obj: Any, protocol: int, oob_min: int | None) -> tuple[list[Any], list[Any]]:
    c = _cached
    if c.busy or protocol != DEFAULT_PROTOCOL:
        return _dump_with(_Tier1, obj, protocol, oob_min)
    table = _dispatch_table()
    pickler = c.pickler if c.table is table and c.pickler is not None else c.build(table)
    c.busy = True
    c.oob_min = oob_min
    try:
        pickler.dump(obj)
    except BaseException:
        c.pickler = None  # its state after a failed dump is not worth trusting
        raise
    finally:
        c.busy = False
        chunks, oob = c.sink.chunks, c.oob
        c.sink.chunks, c.oob = [], []
        if c.pickler is not None:
            pickler.clear_memo()
    return chunks, oob


class _TooBig(Exception):
    """A large out-of-band buffer: the message takes the full path (:func:`dump_chunks`)."""


#: The lean path keeps buffers below this in the pickle; a larger one sends the message the full way.
_LEAN_BUFFER_MAX = 64 * 1024


def _lean_callback(buf: pickle.PickleBuffer) -> bool:
    if memoryview(buf).nbytes >= _LEAN_BUFFER_MAX:
        raise _TooBig
    return True


class _LeanState:
    """A thread's tier-1 pickler writing into a reused ``BytesIO`` (see :func:`dumps_small`)."""

    __slots__ = ("busy", "table", "pickler", "file")

    def __init__(self) -> None:
        self.busy = False
        self.table: dict[type, Any] | None = None
        self.pickler: _Tier1 | None = None
        self.file = io.BytesIO()


# one _LeanState per thread; reached with a single thread-local lookup per message (each
# attribute of a threading.local costs a dict lookup of its own)
_lean = threading.local()


def dumps_small(obj: Any) -> bytes | None:
    """The pickle of an ordinary message, fast; ``None`` if it needs :func:`dump_chunks`.

    About 1 us for a small tuple (the full path costs ~3 us: it keeps large payloads as separate
    chunks, collects descriptors, retries with cloudpickle and explains failures).  ``None`` when
    anything is unusual: tier 1 fails, a descriptor or a buffer of 64 KiB or more is met, or
    ``__main__`` cannot be imported by the receiver and is mentioned.  A large ``bytes`` object nested
    in the message is copied once more than on the full path.
    """
    try:
        st = _lean.state
    except AttributeError:
        st = _lean.state = _LeanState()
    if st.busy or _chan.sending:  # descriptors are collected by the full path only
        return None
    table = _dispatch_table()
    pickler = st.pickler
    if st.table is not table or pickler is None:
        pickler = st.pickler = _Tier1(st.file, DEFAULT_PROTOCOL, _lean_callback)
        st.table = table
    file = st.file
    st.busy = True
    data: bytes | None
    try:
        pickler.dump(obj)
        data = file.getvalue()
        pickler.clear_memo()
    except BaseException as exc:  # the full path decides, and explains
        data = None
        st.pickler = None  # its memo may hold half of this dump: never reused
        if not isinstance(exc, Exception):
            raise  # SystemExit or KeyboardInterrupt from a __reduce__: the caller's to handle
    finally:
        st.busy = False
        file.seek(0)
        file.truncate()
    # the cached answer first; `find`, not `in`: `bytes in bytes` first tries the operand as an int
    if data is not None and not _main_is_reimportable() and data.find(b"__main__") != -1:
        return None
    return data


def dump_chunks(obj: Any, oob_min: int | None = None, protocol: int = DEFAULT_PROTOCOL) -> tuple[list[Any], list[Any]]:
    """Pickle ``obj`` into a list of chunks (no copy of large payloads) and out-of-band buffers.

    Buffers of ``oob_min`` bytes or more are returned separately (``None``: none are).  Tier 1 is
    tried first; tier 2 (by value) only if it fails.  Raises :class:`PicklingError` naming the
    unpicklable part.
    """
    chan = _chan
    mark, smark = len(chan.sent), len(chan.shared)
    chan.depth += 1
    try:
        return _dump_chunks(chan, obj, oob_min, protocol, mark, smark)
    finally:
        chan.depth -= 1
        if not chan.depth:
            chan.shared.clear()  # the outermost dump is over: what it shared is the receiver's now


def _dump_chunks(chan: _FdChannel, obj: Any, oob_min: int | None, protocol: int, mark: int, smark: int) -> tuple[list[Any], list[Any]]:
    try:
        chunks, oob = _tier1_dump(obj, protocol, oob_min)
        if not _main_is_reimportable() and any(
            b"__main__" in c for c in chunks if type(c) is bytes and len(c) < _FRAME_SCAN_LIMIT
        ):
            raise pickle.PicklingError("__main__ cannot be imported by the receiver")
    except _TIER1_FAILURES as first:
        chan.rollback(mark)
        chan.revoke(smark)
        try:
            chunks, oob = _dump_with(_tier2(), obj, protocol, oob_min)
        except RecursionError:
            chan.revoke(smark)
            raise
        except BaseException as second:
            chan.rollback(mark)
            chan.revoke(smark)
            if not isinstance(second, Exception):
                raise
            raise _explain(obj, second) from first
    except BaseException:
        chan.revoke(smark)
        raise
    return chunks, oob


def dumps(obj: Any, protocol: int | None = None) -> bytes:
    """Pickle ``obj`` to ``bytes`` (both tiers, all buffers in band)."""
    chunks, _ = dump_chunks(obj, None, protocol or DEFAULT_PROTOCOL)
    if len(chunks) == 1 and type(chunks[0]) is bytes:
        return chunks[0]
    return b"".join(memoryview(c).cast("B") if type(c) is not bytes else c for c in chunks)


def dump(obj: Any, file: io.RawIOBase | Any, protocol: int | None = None) -> None:
    """Pickle ``obj`` into an open binary file (as ``multiprocessing.reduction.dump``)."""
    file.write(dumps(obj, protocol))


loads = pickle.loads


class ForkingPickler:
    """Compatibility face of this module for code written against ``multiprocessing.reduction``."""

    @classmethod
    def register(cls, type_: type, reduce: Callable[[Any], Any]) -> None:
        register(type_, reduce)

    @classmethod
    def dumps(cls, obj: Any, protocol: int | None = None) -> memoryview:
        return memoryview(dumps(obj, protocol))

    loads = staticmethod(pickle.loads)


# --------------------------------------------------------------------------------------------------
# Explaining what cannot be pickled: walk into the value to find the smallest part that fails.

_MAX_ITEMS = 10_000
_MAX_DEPTH = 40


def _picklable(obj: Any) -> bool:
    chan = _chan
    smark = len(chan.shared)
    chan.depth += 1
    try:
        _dump_with(_tier2(), obj, DEFAULT_PROTOCOL, None)
    except RecursionError:
        return False
    except Exception:
        return False
    finally:
        chan.revoke(smark)  # a trial: nothing it shared is going anywhere
        chan.depth -= 1
    return True


def _parts(obj: Any) -> Iterator[tuple[str, Any]]:
    """The parts a pickler would descend into, each with a label that extends a path."""
    if isinstance(obj, dict):
        for i, (k, v) in enumerate(obj.items()):
            if i >= _MAX_ITEMS:
                return
            yield f".keys()[{i}]", k
            yield f"[{k!r}]", v
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj[:_MAX_ITEMS]):
            yield f"[{i}]", v
    elif isinstance(obj, (set, frozenset)):
        for i, v in enumerate(obj):
            if i >= _MAX_ITEMS:
                return
            yield f" item {v!r}", v
    elif callable(obj) and hasattr(obj, "__code__"):
        closure = getattr(obj, "__closure__", None) or ()
        for name, cell in zip(obj.__code__.co_freevars, closure):
            try:
                yield f".<closure variable {name!r}>", cell.cell_contents
            except ValueError:
                continue
        glb = getattr(obj, "__globals__", {})
        for name in obj.__code__.co_names:
            if name in glb:
                yield f".<global {name!r}>", glb[name]
    else:
        try:
            reduced = obj.__reduce_ex__(DEFAULT_PROTOCOL)
        except Exception:
            return
        if not isinstance(reduced, tuple):
            return
        args = reduced[1] if len(reduced) > 1 else ()
        state = reduced[2] if len(reduced) > 2 else None
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            for k, v in list(state.items())[:_MAX_ITEMS]:
                yield f".{k}" if isinstance(k, str) and k.isidentifier() else f".__dict__[{k!r}]", v
        elif state is not None:
            yield ".__getstate__()", state
        if isinstance(args, tuple):
            for i, v in enumerate(args):
                if isinstance(v, type):
                    continue
                yield f".__reduce__()[1][{i}]", v


def _locate(obj: Any) -> tuple[str, Any]:
    path, current = "obj", obj
    seen: set[int] = set()
    for _ in range(_MAX_DEPTH):
        seen.add(id(current))
        for label, part in _parts(current):
            if id(part) in seen or part is None:
                continue
            if not _picklable(part):
                path, current = path + label, part
                break
        else:
            return path, current
    return path, current


def _explain(obj: Any, error: BaseException) -> PicklingError:
    try:
        path, culprit = _locate(obj)
    except Exception:  # the explanation must never hide the error itself
        path, culprit = "obj", obj
    kind = type(culprit)
    kind_name = f"{kind.__module__}.{kind.__qualname__}" if kind.__module__ != "builtins" else kind.__qualname__
    where = "the object itself" if path == "obj" else path
    message = (
        f"cannot pickle {kind_name!r} object at {where} (sent value of type {type(obj).__qualname__!r}): "
        f"{error}. Objects such as locks, open files, sockets and generators cannot be sent to "
        f"another process; send the data they hold, or create them in the receiving process."
    )
    return PicklingError(message, path=path, culprit_type=kind_name)


# --------------------------------------------------------------------------------------------------
# Out-of-band helpers for memoryview, which the stdlib cannot pickle at all.

def _rebuild_memoryview(buf: Any, fmt: str, shape: tuple[int, ...], readonly: bool) -> memoryview:
    view = memoryview(buf)
    if readonly and not view.readonly:
        view = view.toreadonly()
    if view.format != fmt or view.shape != shape:
        view = view.cast("B").cast(fmt, shape)  # type: ignore[call-overload]
    return view


def _reduce_memoryview(view: memoryview) -> tuple[Any, tuple[Any, ...]]:
    if view.c_contiguous:
        payload: Any = pickle.PickleBuffer(view)
    else:
        payload = view.tobytes() if view.readonly else bytearray(view.tobytes())
    return _rebuild_memoryview, (payload, view.format, view.shape, view.readonly)


register(memoryview, _reduce_memoryview)


# --------------------------------------------------------------------------------------------------
# File descriptors inside pickles.

class _FdChannel(threading.local):
    """Per-thread state: where fds met while pickling go, and where fds met while unpickling come from.

    While sending, ``DupFd(fd)`` appends ``fd`` to ``sent`` and stores its index there as the token;
    the sender passes ``sent`` along with the pickle.  While receiving, ``resolve(token)`` turns a
    token back into an fd that the caller then owns.
    """

    def __init__(self) -> None:
        self.sending = False
        self.resolve: Callable[[int], int] | None = None
        self.sent: list[int] = []
        self.spawning: object | None = None
        #: descriptors handed to the resource sharer by the dump under way (revoked if it fails);
        #: kept only inside :func:`dump_chunks` (``depth`` > 0): a plain pickle's are the receiver's
        self.shared: list[Any] = []
        self.depth = 0

    def rollback(self, mark: int) -> None:
        del self.sent[mark:]

    def revoke(self, mark: int) -> None:
        """Take back what a failed dump gave the resource sharer (the retry shares again)."""
        shared = self.shared[mark:]
        del self.shared[mark:]
        if shared:
            from . import resource_sharer

            resource_sharer.revoke(shared)


_chan = _FdChannel()


class fd_channel:
    """Context manager that routes the fds of objects pickled (or unpickled) inside it.

    ``fd_channel(sending=True)``: while pickling, fds are collected in :attr:`sent` (in order; a
    pickle refers to them by index).  ``fd_channel(resolve=g)``: while unpickling, index ``i``
    becomes ``g(i)``.  ``spawning`` marks a dump made to start a child: objects that may only be
    inherited (locks, authkeys) check it with :func:`assert_spawning`.
    """

    def __init__(
        self,
        sending: bool = False,
        resolve: Callable[[int], int] | None = None,
        spawning: object | None = None,
    ) -> None:
        self._new = (sending, resolve, spawning)
        self._old: tuple[Any, ...] = ()
        self.sent: list[int] = []

    def __enter__(self) -> fd_channel:
        c = _chan
        self._old = (c.sending, c.resolve, c.spawning, c.sent)
        c.sending, c.resolve, c.spawning = self._new
        c.sent = self.sent
        return self

    def __exit__(self, *exc: object) -> None:
        c = _chan
        c.sending, c.resolve, c.spawning, c.sent = self._old


def spawning_popen() -> object | None:
    """The launcher on whose behalf this thread is pickling a child's start-up data, if any."""
    return _chan.spawning


def assert_spawning(obj: object) -> None:
    """Raise unless ``obj`` is being pickled to start a child (it can only be inherited)."""
    if _chan.spawning is None:
        raise RuntimeError(
            f"{type(obj).__name__} objects should only be shared between processes through "
            f"inheritance: pass it as an argument to Process(...) (or a Pool initializer), not "
            f"through a pipe or queue"
        )


class _DupFd:
    """What a pickled fd becomes: a token resolved by the receiver's channel."""

    __slots__ = ("token",)

    def __init__(self, token: int) -> None:
        self.token = token

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return _DupFd, (self.token,)

    def detach(self) -> int:
        """Return the fd this token stands for; the caller owns it."""
        resolve = _chan.resolve
        if resolve is None:
            raise RuntimeError(
                "a pickled file descriptor was unpickled outside the channel that carried it; "
                "descriptors can only arrive as Process arguments or over a Unix-socket Connection"
            )
        return resolve(self.token)


def DupFd(fd: int) -> Any:
    """Pickle-able stand-in for ``fd`` that the receiving process turns into its own copy.

    Inside a channel that carries descriptors (a child's start-up data, a Unix-socket Connection) it
    is a token for the descriptor that rides with the message.  Anywhere else (a one-way pipe, a
    queue, ``pickle.dumps``) the descriptor is handed to this process's resource sharer
    (:mod:`gilfree.resource_sharer`), which gives it to the one process that unpickles it, or
    closes it after ``resource_sharer.SHARE_TTL`` seconds.
    """
    if not _chan.sending:
        st = getattr(_lean, "state", None)
        if st is not None and st.busy:
            # the fast path of a message (dumps_small) is never where a descriptor is shared: the
            # full path decides whether the message's channel carries it
            raise _TooBig
        from . import resource_sharer

        shared = resource_sharer.DupFd(fd)
        if _chan.depth:
            _chan.shared.append(shared)
        return shared
    _chan.sent.append(fd)
    return _DupFd(len(_chan.sent) - 1)


# --------------------------------------------------------------------------------------------------
# Descriptors over a Unix socket, as multiprocessing.reduction's sendfds/recvfds/send_handle/recv_handle.
# The wire format is the stdlib's (one byte, the count modulo 256, with the descriptors in SCM_RIGHTS),
# so either end may be the stdlib.

#: Descriptors can be passed between processes (``SCM_RIGHTS``).
HAVE_SEND_HANDLE = sys.platform != "win32" and hasattr(__import__("_socket"), "CMSG_LEN")
#: Most descriptors :func:`recvfds` accepts in one call.
MAX_RECV_FDS = 253


def sendfds(sock: Any, fds: Any) -> None:
    """Send the descriptors ``fds`` over the Unix socket ``sock`` (one byte of data carries them)."""
    import _socket
    import array

    arr = array.array("i", fds)
    if not 0 < len(arr) <= MAX_RECV_FDS:
        raise ValueError(f"sendfds sends 1 to {MAX_RECV_FDS} descriptors, not {len(arr)}")
    sock.sendmsg([bytes([len(arr) % 256])], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, arr)])


def recvfds(sock: Any, size: int) -> list[int]:
    """Receive exactly ``size`` descriptors sent with :func:`sendfds`; the caller owns them.

    Bounded: room is made for ``size`` descriptors only (the kernel drops any more a peer sends),
    and every descriptor that came is closed before raising when the message is not exactly what
    was asked for.  ``EOFError`` if the peer closed; ``RuntimeError`` if data came without the
    descriptors (or with a different number).
    """
    import _socket

    from .util import fds_from_ancillary

    size = int(size)
    if not 0 < size <= MAX_RECV_FDS:
        raise ValueError(f"recvfds receives 1 to {MAX_RECV_FDS} descriptors, not {size}")
    data, anc, flags, _ = sock.recvmsg(1, _socket.CMSG_SPACE(size * 4), getattr(_socket, "MSG_CMSG_CLOEXEC", 0))
    fds = fds_from_ancillary(anc)
    if not data and not fds:
        raise EOFError("the peer closed the connection before sending descriptors")
    if len(fds) != size or data[0] != size % 256 or flags & _socket.MSG_CTRUNC:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        raise RuntimeError(
            f"expected {size} descriptor(s) with one byte {size % 256}; got {len(fds)} with {bytes(data)!r}"
            + (" (more were sent than asked for; all were closed)" if flags & _socket.MSG_CTRUNC else "")
        )
    return fds


def _unix_socket_of(conn: Any) -> tuple[Any, bool]:
    """A socket object for ``conn`` (a Connection, a socket or a descriptor) and whether to detach it after."""
    import _socket

    sock = getattr(conn, "_sock", None)
    if sock is not None:
        return sock, False
    if isinstance(conn, _socket.socket):
        return conn, False
    fd = conn if isinstance(conn, int) else conn.fileno()
    s = _socket.socket(fileno=fd)
    if s.gettimeout() is not None:
        s.settimeout(None)
    return s, True


def send_handle(conn: Any, handle: int, destination_pid: int | None = None) -> None:
    """Send the descriptor ``handle`` over the Unix-socket connection ``conn`` (``destination_pid``
    is for Windows; unused here).  The peer takes it with :func:`recv_handle`."""
    sock, detach = _unix_socket_of(conn)
    try:
        sendfds(sock, [handle])
    finally:
        if detach:
            sock.detach()


def recv_handle(conn: Any) -> int:
    """Receive a descriptor sent with :func:`send_handle` over ``conn``; the caller owns it."""
    sock, detach = _unix_socket_of(conn)
    try:
        return recvfds(sock, 1)[0]
    finally:
        if detach:
            sock.detach()
