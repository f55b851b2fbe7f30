"""Shared memory blocks and lists with the stdlib API, owned by the process that creates them (layer L5).

:class:`SharedMemory` and :class:`ShareableList` behave as ``multiprocessing.shared_memory``'s (the
stdlib documentation is the spec), with one deliberate difference, the *ownership rule*:

- The process that creates a segment (``create=True``) owns it and is the one expected to call
  :meth:`SharedMemory.unlink`.  If it exits or is killed without doing so, the shared-memory tracker
  (:mod:`gilfree._tracker`) unlinks the segment and prints one line naming it and the owner's pid.
- A process that only attaches (``create=False``, or by unpickling) never unlinks the segment
  implicitly and never causes a warning, whatever it does and however it ends.  It may still call
  ``unlink()`` explicitly.
- ``track=False`` at creation: the segment is not registered; the program manages it alone.

So a segment does not outlive its creator unless the creator says so (``track=False``): a worker
that creates a block, hands the name to its parent and exits takes the block with it -- create it in
the process that will outlive the others, or with ``track=False``.

Names of segments this module generates start with ``gf_`` (after ``GILFREE_SHM_PREFIX``, if set:
see :data:`gilfree.util.SHM_PREFIX`).  The data layout of
:class:`ShareableList` is the stdlib's, so a list created here can be attached by
``multiprocessing.shared_memory.ShareableList`` and the other way round.  Differences from the stdlib's
list: a ``str`` item whose UTF-8 bytes do not fit the stdlib's slot (sized by characters) gets a
slot sized by its bytes (the stdlib truncates such text), a value that cannot be stored raises before anything is created or changed, and an
unsupported type raises a ``TypeError`` that is also a ``KeyError`` (what the stdlib raises).

Where this runs: in any process, on the calling thread.  Creating a tracked segment may start the
tracker once (a fresh interpreter, tens of milliseconds); otherwise nothing here blocks beyond a
system call.
"""

from __future__ import annotations

import _posixshmem
import mmap
import operator
import os
import struct
import types

from . import _tracker, util
from ._start import get_executable

# `typing` costs a child several ms to import; annotations are strings here anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Iterable, Iterator

__all__ = ["SharedMemory", "ShareableList"]

#: prefix of every segment name this module generates
NAME_PREFIX = "gf_"
_MODE = 0o600
#: the stdlib's names for the same facts, read by programs and tests written for it: segments are
#: POSIX shared memory, and generated paths (``_name``, with the leading slash) start with this
_USE_POSIX = True
_SHM_NAME_PREFIX = "/" + util.SHM_PREFIX + NAME_PREFIX


def _make_filename() -> str:
    """A new random path for ``shm_open`` (leading slash included, as ``SharedMemory._name``)."""
    # 3 + 16 characters: within the 30 that the most restrictive systems (macOS) allow
    return "/" + util.SHM_PREFIX + NAME_PREFIX + os.urandom(8).hex()


class SharedMemory:
    """A shared memory block: create a new one (``create=True``) or attach to an existing one by name.

    ``name`` is the block's name without a leading slash (generated, ``gf_...``, when ``None`` and
    ``create=True``); ``size`` is the size in bytes of a new block (ignored when attaching: the block
    has its own).  ``buf`` is a writable ``memoryview`` of the whole block.  Pickling sends the name:
    the receiver attaches, it does not own.  See the module docstring for who unlinks.
    """

    _mmap: mmap.mmap | None
    _buf: memoryview | None
    #: ``shm_open`` flags for attaching (the stdlib's attribute: a subclass may add ``os.O_CREAT``)
    _flags = os.O_RDWR

    def __init__(self, name: str | None = None, create: bool = False, size: int = 0, *, track: bool = True) -> None:
        # Set first, so that close() and __del__ work whatever fails below.
        self._mmap = None
        self._buf = None
        self._name = ""
        self._size = 0
        self._created = False
        self._track = False
        self._ident = _tracker.NO_IDENT  # the file our name pointed to when we created or attached
        if not size >= 0:
            raise ValueError("'size' must be a positive integer")
        if create:
            size = operator.index(size)
            if size == 0:
                raise ValueError("'size' must be a positive number different from zero")
            self._create(name, size, track)
        elif name is None:
            raise ValueError("'name' can only be None if create=True")
        else:
            self._attach(name)

    def _create(self, name: str | None, size: int, track: bool) -> None:
        flags = os.O_CREAT | os.O_EXCL | os.O_RDWR
        while True:
            path = "/" + name if name is not None else _make_filename()
            try:
                fd = _posixshmem.shm_open(path, flags, mode=_MODE)
            except FileExistsError:
                if name is not None:
                    raise
                continue  # a generated name that is taken: draw another
            break
        try:
            try:
                os.ftruncate(fd, size)
                self._mmap = mmap.mmap(fd, size)
                self._ident = _tracker.identity(fd)
            finally:
                os.close(fd)  # the mapping keeps what it needs
            self._name, self._size, self._created = path, size, True
            self._buf = memoryview(self._mmap)
            if track:
                _tracker.register(path, get_executable(), self._ident)
                self._track = True
        except BaseException:
            self.close()
            try:
                _posixshmem.shm_unlink(path)
            except OSError:
                pass
            raise

    def _attach(self, name: str) -> None:
        path = "/" + name
        fd = _posixshmem.shm_open(path, self._flags, mode=_MODE)
        try:
            st = os.fstat(fd)
            size = st.st_size
            self._mmap = mmap.mmap(fd, size)
            self._ident = (st.st_dev, st.st_ino)
        finally:
            os.close(fd)
        self._name, self._size = path, size
        self._buf = memoryview(self._mmap)

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, BufferError):  # views of buf still exist: they keep the mapping alive
            pass

    def __reduce__(self) -> tuple[Any, tuple[str, bool, int]]:
        return type(self), (self.name, False, self.size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, size={self.size})"

    @property
    def buf(self) -> memoryview | None:
        """A memoryview of the block's contents (None after :meth:`close`)."""
        return self._buf

    @property
    def name(self) -> str:
        """The name to attach to this block from another process."""
        return self._name[1:] if self._name.startswith("/") else self._name

    @property
    def size(self) -> int:
        """Size of the block in bytes."""
        return self._size

    def close(self) -> None:
        """Unmap the block from this process (it stays in the system until unlinked).

        Raises ``BufferError`` while views of :attr:`buf` (numpy arrays, slices) still exist.
        """
        if self._buf is not None:
            self._buf.release()
            self._buf = None
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None

    def unlink(self) -> None:
        """Remove the block from the system (once, in one process; existing mappings stay valid).

        Raises ``FileNotFoundError`` if it was already unlinked.  After this nobody owns it: the
        tracker will not report it, nor unlink the name when the creator ends -- also when this
        process only attached and has no connection to the tracker (then it does not tell it: the
        tracker unlinks a name only while it still points to the file its owner created, so a block
        created again under the same name by someone else is never removed for the first owner).
        """
        if not self._name:
            return
        try:
            _posixshmem.shm_unlink(self._name)
        finally:
            _tracker.unregister(self._name, self._ident)


# ---------------------------------------------------------------------------------------------------
# ShareableList

# The block holds, in this order (the stdlib's layout, native alignment):
#   n: q                        number of items
#   offsets: (n + 1) * q        start of each item in the data area, and the end of the last one
#   data area                   each item in its slot: 8 bytes, or a multiple of 8 for str/bytes
#   formats: n * 8s             the struct format of each item ("q", "d", "16s", ...)
#   kinds: n * b                how to turn the unpacked value back into an object (below)
_PLAIN, _STR, _BYTES, _NONE = 0, 1, 2, 3
_ENCODING = "utf8"
_ALIGN = 8
_MAX_FORMAT = 8  # a format is stored in 8 bytes: "9999992s" is the largest str/bytes slot
_BOOL_FORMAT = "xxxxxxx?"
_NONE_FORMAT = "xxxxxx?x"


class _UnsupportedItem(TypeError, KeyError):
    """A value ShareableList cannot store (a ``KeyError`` too: what the stdlib raises)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _encode_item(value: Any, where: str) -> tuple[str | None, int, Any]:
    """(struct format, or None for str/bytes; kind; the value to pack)."""
    if value is None:
        return _NONE_FORMAT, _NONE, False
    if isinstance(value, bool):
        return _BOOL_FORMAT, _PLAIN, value
    if isinstance(value, int):
        return "q", _PLAIN, int(value)
    if isinstance(value, float):
        return "d", _PLAIN, float(value)
    if isinstance(value, str):
        return None, _STR, value.encode(_ENCODING)
    if isinstance(value, bytes):
        return None, _BYTES, bytes(value)
    raise _UnsupportedItem(
        f"ShareableList cannot store {where}, a {type(value).__qualname__!r}: the supported types are "
        f"int, float, bool, str, bytes and None"
    )


def _slot_format(data: bytes, where: str, chars: int | None = None) -> str:
    """The slot of a str/bytes item: its length rounded up to the next multiple of 8 (plus 8 if it
    is one), as the stdlib sizes it -- for a str, the stdlib counts characters: that size is kept
    while the UTF-8 bytes fit in it (so a copy of a stdlib list has the same format), else the
    bytes' length decides (where the stdlib would truncate the text)."""
    size = _ALIGN * (len(data) // _ALIGN + 1)
    if chars is not None and len(data) <= _ALIGN * (chars // _ALIGN + 1):
        size = _ALIGN * (chars // _ALIGN + 1)
    fmt = f"{size}s"
    if len(fmt) > _MAX_FORMAT:
        raise ValueError(f"{where} is {len(data)} bytes long; a ShareableList item holds at most 9999991 bytes")
    return fmt


def _rebuild_list(cls: type[ShareableList], name: str) -> ShareableList:
    return cls(name=name)


class ShareableList:
    """A fixed-length list of int, float, bool, str, bytes and None values in a shared memory block.

    ``ShareableList(sequence)`` creates a block holding ``sequence`` (owned by this process, see
    :class:`SharedMemory`); ``ShareableList(name=...)`` attaches to an existing list.  Items can be
    read and replaced, not added or removed; a ``str``/``bytes`` item can be replaced by one no longer
    than its slot (its original length rounded up to the next multiple of 8, plus 8 if it was
    already one; a ``str``'s length in characters, or in UTF-8 bytes when those do not fit).  Trailing NUL bytes/characters of str and bytes items are not preserved, as in
    the stdlib.  ``shm`` is the underlying :class:`SharedMemory`.
    """

    def __class_getitem__(cls, item: Any) -> types.GenericAlias:  # ShareableList[int] in annotations
        return types.GenericAlias(cls, item)

    def __init__(self, sequence: Iterable[Any] | None = None, *, name: str | None = None) -> None:
        if name is None or sequence is not None:
            block = self._pack(() if sequence is None else sequence)
            self.shm = SharedMemory(name, create=True, size=len(block))
            assert self.shm.buf is not None
            self.shm.buf[: len(block)] = block
        else:
            self.shm = SharedMemory(name)
        buf = self._view()
        (self._n,) = struct.unpack_from("q", buf, 0)
        self._offsets = struct.unpack_from(f"{self._n + 1}q", buf, 8)
        self._data_start = 8 * (self._n + 2)
        self._formats_start = self._data_start + self._offsets[-1]
        self._kinds_start = self._formats_start + 8 * self._n

    @staticmethod
    def _pack(sequence: Iterable[Any]) -> bytearray:
        """The block's whole contents for ``sequence``; raises before anything is created."""
        formats: list[str] = []
        kinds: list[int] = []
        values: list[Any] = []
        for i, item in enumerate(sequence):
            fmt, kind, value = _encode_item(item, f"item {i}")
            chars = len(item) if kind == _STR else None
            formats.append(fmt if fmt is not None else _slot_format(value, f"item {i}", chars))
            kinds.append(kind)
            values.append(value)
        n = len(formats)
        offsets = [0]
        for fmt in formats:
            offsets.append(offsets[-1] + (int(fmt[:-1]) if fmt.endswith("s") else _ALIGN))
        data_start = 8 * (n + 2)
        formats_start = data_start + offsets[-1]
        kinds_start = formats_start + 8 * n
        block = bytearray(kinds_start + n)
        struct.pack_into(f"q{n + 1}q", block, 0, n, *offsets)
        for i, (fmt, value) in enumerate(zip(formats, values)):
            struct.pack_into(fmt, block, data_start + offsets[i], value)  # struct.error: out of range
        struct.pack_into("8s" * n, block, formats_start, *(f.encode("ascii") for f in formats))
        struct.pack_into(f"{n}b", block, kinds_start, *kinds)
        return block

    def _view(self) -> memoryview:
        buf = self.shm.buf
        if buf is None:
            raise ValueError("the ShareableList's shared memory block is closed")
        return buf

    def _position(self, position: Any, message: str) -> int:
        i = operator.index(position)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(message)
        return i

    def _get_packing_format(self, position: int) -> str:
        """The struct format of item ``position`` (the stdlib's method)."""
        i = self._position(position, "Requested position out of range.")
        return self._format(i, self._view())

    def _format(self, i: int, buf: memoryview) -> str:
        start = self._formats_start + 8 * i
        return bytes(buf[start : start + 8]).rstrip(b"\0").decode("ascii")

    def __getitem__(self, position: int) -> Any:
        i = self._position(position, "index out of range")
        buf = self._view()
        (value,) = struct.unpack_from(self._format(i, buf), buf, self._data_start + self._offsets[i])
        kind = buf[self._kinds_start + i]
        if kind == _STR:
            return value.rstrip(b"\0").decode(_ENCODING)
        if kind == _BYTES:
            return value.rstrip(b"\0")
        if kind == _NONE:
            return None
        return value

    def __setitem__(self, position: int, value: Any) -> None:
        i = self._position(position, "assignment index out of range")
        buf = self._view()
        fmt, kind, packed = _encode_item(value, "this value")
        if fmt is None:
            room = self._offsets[i + 1] - self._offsets[i]
            if len(packed) > room:
                raise ValueError("bytes/str item exceeds available storage")
            current = self._format(i, buf)
            fmt = current if current.endswith("s") else f"{room}s"
        data = struct.pack(fmt, packed)  # struct.error (an int out of range) before anything changes
        start = self._formats_start + 8 * i
        buf[start : start + 8] = fmt.encode("ascii").ljust(8, b"\0")
        buf[self._kinds_start + i] = kind
        offset = self._data_start + self._offsets[i]
        buf[offset : offset + len(data)] = data

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[Any]:
        for i in range(self._n):
            yield self[i]

    def __reduce__(self) -> tuple[Any, tuple[type[ShareableList], str]]:
        return _rebuild_list, (type(self), self.shm.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)}, name={self.shm.name!r})"

    @property
    def format(self) -> str:
        """The struct format of all the items, concatenated (as the stdlib reports it)."""
        buf = self._view()
        return "".join(self._format(i, buf) for i in range(self._n))

    def count(self, value: Any) -> int:
        """Number of items equal to ``value``."""
        return sum(1 for item in self if item == value)

    def index(self, value: Any) -> int:
        """Position of the first item equal to ``value``; ``ValueError`` if there is none."""
        for i, item in enumerate(self):
            if item == value:
                return i
        raise ValueError(f"{value!r} not in this container")
