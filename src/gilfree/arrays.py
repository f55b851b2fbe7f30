"""numpy arrays in shared memory that travel as handles, never as copies (layer L5).

::

    owner process                                 any other process (child, pool worker, queue reader)
    -------------                                 ------------------------------------------------------
    a = shared_array((1000, 1000))                handle = (segment name, dtype, shape, strides, offset)
      └─ SharedMemory(create=True) "gf_..."  ───>   attach once per process (cached), wrap as ndarray
    a[...] = ...      <─── the same physical pages ───>   b[...] = ...   (writes visible both ways)

:func:`shared_array` returns a :class:`SharedArray`, a real ``numpy.ndarray`` subclass.  Pickling it
(or any view or slice of it) -- as a ``Process`` argument, through a ``Pipe``, later a ``Queue`` or a
``Pool`` -- sends a handle of a few dozen bytes; the receiver maps the same memory.  Lifetime follows
the ownership rule of :mod:`gilfree.shared_memory`: the creating process owns the segment, and
unlinks it when its last array over that segment is collected, or at exit after its children have
been joined; a receiver only maps and unmaps.  Keep the owner's array alive until receivers have
attached: a handle that arrives after the owner let go fails with a clear ``FileNotFoundError``.

numpy is an optional dependency (``pip install 'gilfree[numpy]'``); this module is imported only when
``gilfree.shared_array`` is first used.

Where this runs: in any process.  Creating or first attaching maps memory (a system call or two);
nothing blocks.
"""

from __future__ import annotations

import os
import weakref

try:
    import numpy as np
except ImportError as exc:  # pragma: no cover - numpy is installed wherever the tests run
    raise ImportError("gilfree.shared_array needs numpy: pip install 'gilfree[numpy]'") from exc

import _posixshmem

from . import _tracker, util
from .shared_memory import SharedMemory

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["SharedArray", "shared_array", "as_shared"]

#: Finalizer priority of the owner's unlink at exit: after children are joined (priority >= 0 runs
#: before the joins, see process._exit_function).
_UNLINK_AT_EXIT_PRIORITY = -10


class _Segment:
    """A mapped shared-memory segment and its base address; the owner's unlinks when collected."""

    def __init__(self, shm: SharedMemory, owner: bool) -> None:
        self.shm = shm
        self.name = shm.name
        self.size = shm.size
        assert shm.buf is not None
        self.base = np.frombuffer(shm.buf, dtype=np.uint8)
        self.address = self.base.__array_interface__["data"][0]
        if owner:
            util.Finalize(self, _unlink_owned, (shm._name,), exitpriority=_UNLINK_AT_EXIT_PRIORITY)

    def __repr__(self) -> str:
        return f"<_Segment {self.name} size={self.size}>"


def _unlink_owned(path: str) -> None:
    try:
        _posixshmem.shm_unlink(path)
    except FileNotFoundError:
        pass
    finally:
        _tracker.unregister(path)


# Attachments of this process, by name: a segment received a thousand times is mapped once.
_attached: weakref.WeakValueDictionary[str, _Segment] = weakref.WeakValueDictionary()
_attached_pid = os.getpid()


def _attach(name: str) -> _Segment:
    global _attached, _attached_pid
    if _attached_pid != os.getpid():  # a forked child maps what it inherited, but starts its own cache
        _attached, _attached_pid = weakref.WeakValueDictionary(), os.getpid()
    segment = _attached.get(name)
    if segment is None:
        try:
            shm = SharedMemory(name)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"shared array segment {name!r} no longer exists: its owner released it (or exited) before "
                f"this process attached; keep the owner's array alive until the receivers have it"
            ) from None
        segment = _attached[name] = _Segment(shm, owner=False)
    return segment


class SharedArray(np.ndarray):
    """A numpy array backed by shared memory; pickles as a handle to the same memory."""

    _gf_segment: _Segment | None

    def __array_finalize__(self, obj: Any) -> None:
        # a view shares its base's segment; a new result (a + 1, a.copy()) is ordinary memory
        segment = getattr(obj, "_gf_segment", None)
        self._gf_segment = segment if segment is not None and _within(self, segment) else None

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        segment = self._gf_segment
        if segment is None or segment.shm.buf is None or not _within(self, segment):
            return np.asarray(self).copy().__reduce__()  # not (or no longer) in shared memory: a copy
        offset = self.__array_interface__["data"][0] - segment.address
        return _rebuild, (segment.name, self.dtype, self.shape, self.strides, offset, bool(self.flags.writeable))

    def __repr__(self) -> str:
        return super().__repr__().replace("SharedArray(", "shared_array(", 1)


def _within(arr: np.ndarray, segment: _Segment) -> bool:
    """Whether every byte ``arr`` can address lies inside ``segment``."""
    start = arr.__array_interface__["data"][0]
    low = high = start
    for n, stride in zip(arr.shape, arr.strides):
        if n == 0:
            return start >= segment.address and start <= segment.address + segment.size
        span = (n - 1) * stride
        if span < 0:
            low += span
        else:
            high += span
    high += arr.itemsize
    return segment.address <= low and high <= segment.address + segment.size


def _rebuild(name: str, dtype: Any, shape: tuple[int, ...], strides: tuple[int, ...], offset: int,
             writeable: bool) -> SharedArray:
    segment = _attach(name)
    arr = np.ndarray(shape, dtype=dtype, buffer=segment.base, offset=offset, strides=strides).view(SharedArray)
    arr._gf_segment = segment
    if not writeable:
        arr.flags.writeable = False
    return arr


def shared_array(shape: int | tuple[int, ...], dtype: Any = float, *, fill: Any = None, order: Any = "C") -> SharedArray:
    """A new numpy array in shared memory (zeros, or ``fill``), owned by this process.

    Send it anywhere -- a child, a pipe, a queue, a pool task -- and the receiver sees the same
    memory: no copy is made, writes are visible on both sides.
    """
    dtype = np.dtype(dtype)
    shape_t = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = int(np.prod(shape_t, dtype=np.int64)) * dtype.itemsize
    shm = SharedMemory(create=True, size=max(nbytes, 1))
    segment = _Segment(shm, owner=True)
    arr = np.ndarray(shape_t, dtype=dtype, buffer=segment.base, order=order).view(SharedArray)
    arr._gf_segment = segment
    if fill is not None:
        arr.fill(fill)
    return arr


def as_shared(array: Any) -> SharedArray:
    """A copy of ``array`` in shared memory (same shape and dtype), owned by this process."""
    src = np.asarray(array)
    arr = shared_array(src.shape, src.dtype, order="F" if src.flags.f_contiguous and not src.flags.c_contiguous else "C")
    arr[...] = src
    return arr
