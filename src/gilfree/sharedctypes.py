"""ctypes objects in shared memory: ``Value``, ``Array``, ``RawValue``, ``RawArray`` (layer L5).

The stdlib's API and semantics (``multiprocessing.sharedctypes``).  The memory is a block of an
anonymous arena (:mod:`gilfree._shm`): nothing is created in ``/dev/shm``, so nothing can leak.
``Value``/``Array`` wrap the object with a lock (an :class:`~gilfree.synchronize.RLock` unless one
is given); if a process dies while holding it, the next process that waits gets
:class:`~gilfree.OwnerDiedError` saying the value may be half-updated, instead of hanging.

These objects reach another process by inheritance (``Process`` arguments), as in the stdlib.

Where this runs: in any process.  Reads and writes of a ``Value`` take its lock; a ``Raw*`` object
takes none.
"""

from __future__ import annotations

import ctypes

from . import _shm, reduction
from .synchronize import RLock

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["RawValue", "RawArray", "Value", "Array", "copy", "synchronized", "Synchronized",
           "SynchronizedArray", "SynchronizedString"]

typecode_to_type: dict[str, Any] = {
    "c": ctypes.c_char, "u": ctypes.c_wchar,
    "b": ctypes.c_byte, "B": ctypes.c_ubyte,
    "h": ctypes.c_short, "H": ctypes.c_ushort,
    "i": ctypes.c_int, "I": ctypes.c_uint,
    "l": ctypes.c_long, "L": ctypes.c_ulong,
    "q": ctypes.c_longlong, "Q": ctypes.c_ulonglong,
    "f": ctypes.c_float, "d": ctypes.c_double,
}


def _ctype(typecode_or_type: Any) -> Any:
    if isinstance(typecode_or_type, str):
        try:
            return typecode_to_type[typecode_or_type]
        except KeyError:
            raise TypeError(
                f"unknown typecode {typecode_or_type!r}: use one of {''.join(typecode_to_type)} or a ctypes type"
            ) from None
    return typecode_or_type


def _new_value(type_: Any) -> Any:
    size = ctypes.sizeof(type_)
    block = _shm.Block(size)
    return _rebuild_ctype(type_, block, None)


def _rebuild_ctype(type_: Any, block: _shm.Block, length: int | None) -> Any:
    if length is not None:
        type_ = type_ * length
    obj = type_.from_buffer(block.arena.buffer, block.offset)
    obj._gilfree_block = block  # the block (and its memory) lives as long as obj
    _install_reducer(type_)
    return obj


_registered: set[Any] = set()


def _reduce_ctype(obj: Any) -> tuple[Any, tuple[Any, ...]]:
    block = getattr(obj, "_gilfree_block", None)
    if block is None:  # an ordinary ctypes object, not one of ours
        return obj.__reduce_ex__(reduction.DEFAULT_PROTOCOL)
    reduction.assert_spawning(obj)
    if isinstance(obj, ctypes.Array):
        return _rebuild_ctype, (obj._type_, block, obj._length_)
    return _rebuild_ctype, (type(obj), block, None)


def _install_reducer(type_: Any) -> None:
    if type_ not in _registered:
        _registered.add(type_)
        reduction.register(type_, _reduce_ctype)


def RawValue(typecode_or_type: Any, *args: Any) -> Any:
    """A ctypes object in shared memory, initialised with ``args``; no lock."""
    type_ = _ctype(typecode_or_type)
    obj = _new_value(type_)
    ctypes.memset(ctypes.addressof(obj), 0, ctypes.sizeof(obj))
    obj.__init__(*args)
    return obj


def RawArray(typecode_or_type: Any, size_or_initializer: Any) -> Any:
    """A ctypes array in shared memory: ``size`` zeros, or a copy of a sequence; no lock."""
    type_ = _ctype(typecode_or_type)
    if isinstance(size_or_initializer, int):
        if size_or_initializer < 0:
            raise ValueError(f"array size {size_or_initializer} is negative")
        array_type = type_ * size_or_initializer
        obj = _new_value(array_type)
        ctypes.memset(ctypes.addressof(obj), 0, ctypes.sizeof(obj))
        return obj
    values = list(size_or_initializer)
    array_type = type_ * len(values)
    obj = _new_value(array_type)
    obj.__init__(*values)
    return obj


def _lock_for(lock: Any, purpose: str) -> Any:
    if lock in (True, None):
        lock = RLock()
        lock._purpose = purpose
        return lock
    if not hasattr(lock, "acquire"):
        raise AttributeError(f"{lock!r} has no method 'acquire'")
    return lock


def Value(typecode_or_type: Any, *args: Any, lock: Any = True, ctx: Any = None) -> Any:
    """A synchronized ctypes object in shared memory (``lock=False``: a raw one)."""
    obj = RawValue(typecode_or_type, *args)
    if lock is False:
        return obj
    lock = _lock_for(lock, f"lock of Value({typecode_or_type!r})")
    return synchronized(obj, lock, ctx=ctx)


def Array(typecode_or_type: Any, size_or_initializer: Any, *, lock: Any = True, ctx: Any = None) -> Any:
    """A synchronized ctypes array in shared memory (``lock=False``: a raw one)."""
    obj = RawArray(typecode_or_type, size_or_initializer)
    if lock is False:
        return obj
    lock = _lock_for(lock, f"lock of Array({typecode_or_type!r})")
    return synchronized(obj, lock, ctx=ctx)


def copy(obj: Any) -> Any:
    """A new shared ctypes object with the same contents."""
    new_obj = _new_value(type(obj))
    ctypes.pointer(new_obj)[0] = obj
    return new_obj


class AlreadySynchronizedError(TypeError, AssertionError):
    """``synchronized()`` was given a wrapper: a TypeError, and the stdlib's AssertionError."""


def synchronized(obj: Any, lock: Any = None, ctx: Any = None) -> Any:
    """Wrap a shared ctypes object with a lock (a new RLock if none is given)."""
    if isinstance(obj, SynchronizedBase):
        raise AlreadySynchronizedError("object already synchronized")
    lock = _lock_for(lock, f"lock of a shared {type(obj).__name__}")
    if isinstance(obj, ctypes._SimpleCData):
        return Synchronized(obj, lock)
    if isinstance(obj, ctypes.Array):
        if obj._type_ is ctypes.c_char:
            return SynchronizedString(obj, lock)
        return SynchronizedArray(obj, lock)
    return _synchronized_structure(obj, lock)


class SynchronizedBase:
    """A shared ctypes object and the lock that guards it."""

    def __init__(self, obj: Any, lock: Any = None, ctx: Any = None) -> None:
        self._obj = obj
        self._lock = lock if lock is not None else RLock()
        self.acquire = self._lock.acquire
        self.release = self._lock.release

    def __enter__(self) -> Any:
        return self._lock.__enter__()

    def __exit__(self, *args: Any) -> None:
        self._lock.__exit__(*args)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        reduction.assert_spawning(self)
        return synchronized, (self._obj, self._lock)

    def get_obj(self) -> Any:
        """The wrapped ctypes object (access it under the lock)."""
        return self._obj

    def get_lock(self) -> Any:
        """The lock that guards the object."""
        return self._lock

    def __repr__(self) -> str:
        return f"<{type(self).__name__} wrapper for {self._obj}>"


class Synchronized(SynchronizedBase):
    """A shared scalar: ``.value`` reads and writes it under the lock."""

    @property
    def value(self) -> Any:
        with self._lock:
            return self._obj.value

    @value.setter
    def value(self, value: Any) -> None:
        with self._lock:
            self._obj.value = value


class SynchronizedArray(SynchronizedBase):
    """A shared array: indexing and slicing under the lock."""

    def __len__(self) -> int:
        return len(self._obj)

    def __getitem__(self, i: Any) -> Any:
        with self._lock:
            return self._obj[i]

    def __setitem__(self, i: Any, value: Any) -> None:
        with self._lock:
            self._obj[i] = value

    def __getslice__(self, start: int, stop: int) -> Any:
        with self._lock:
            return self._obj[start:stop]

    def __setslice__(self, start: int, stop: int, values: Any) -> None:
        with self._lock:
            self._obj[start:stop] = values


class SynchronizedString(SynchronizedArray):
    """A shared ``c_char`` array: ``.value`` (up to the first NUL) and ``.raw`` under the lock."""

    @property
    def value(self) -> bytes:
        with self._lock:
            return self._obj.value

    @value.setter
    def value(self, value: bytes) -> None:
        with self._lock:
            self._obj.value = value

    @property
    def raw(self) -> bytes:
        with self._lock:
            return self._obj.raw

    @raw.setter
    def raw(self, value: bytes) -> None:
        with self._lock:
            self._obj.raw = value


_structure_wrappers: dict[type, type] = {}


def _synchronized_structure(obj: Any, lock: Any) -> SynchronizedBase:
    """A wrapper whose properties read and write each field of a Structure under the lock."""
    cls = type(obj)
    wrapper = _structure_wrappers.get(cls)
    if wrapper is None:
        def field(name: str) -> property:
            def get(self: SynchronizedBase) -> Any:
                with self._lock:
                    return getattr(self._obj, name)

            def set_(self: SynchronizedBase, value: Any) -> None:
                with self._lock:
                    setattr(self._obj, name, value)

            return property(get, set_)

        names = [f[0] for f in getattr(cls, "_fields_", [])]
        wrapper = type("Synchronized" + cls.__name__, (SynchronizedBase,), {n: field(n) for n in names})
        _structure_wrappers[cls] = wrapper
    return wrapper(obj, lock)

