"""Anonymous shared memory: arenas and a small heap for ``Value``, ``Array`` and locks (layer L1).

An *arena* is a ``memfd_create`` file mapped ``MAP_SHARED``: it has no name, so nothing can leak
into ``/dev/shm`` -- the kernel frees it when the last process that maps it (or holds its fd)
exits.  A forked child inherits the mapping; a spawned or forkserver child receives the fd through
the fd channel of :mod:`gilfree.reduction` (only while the child is being started: these objects are
shared by inheritance, as in the stdlib) and maps it again.

The heap hands out blocks from arenas (first fit over a sorted free list, neighbours merged on free,
blocks aligned to 64 bytes so two locks never share a cache line).  A block is freed when the
:class:`Block` that owns it is collected in the process that allocated it; a forked child starts
with an empty heap of its own, so parent and child never allocate from one free list.

Where this runs: in any process; allocation takes a thread lock, nothing blocks for long.
"""

from __future__ import annotations

import bisect
import mmap
import os
import threading

from . import reduction, util

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Arena", "Block", "heap"]

ALIGN = 64
ARENA_SIZE = 1 << 20
_PAGE = mmap.PAGESIZE


def _memfd(size: int) -> int:
    try:
        fd = os.memfd_create("gilfree-arena", os.MFD_CLOEXEC)
    except (AttributeError, OSError):  # not Linux: an unlinked temporary file does the same
        import tempfile

        fd, path = tempfile.mkstemp(prefix="gilfree-arena-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.unlink(path)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Arena:
    """A shared, anonymous, fixed-size mapping (and the fd that names it for children)."""

    def __init__(self, size: int, fd: int | None = None, ident: bytes | None = None) -> None:
        self.size = size
        self.fd = _memfd(size) if fd is None else fd
        self.ident = ident or os.urandom(8)
        self.buffer = mmap.mmap(self.fd, size)
        util.Finalize(self, util.close_fds, (self.fd,))

    def __repr__(self) -> str:
        return f"<Arena {self.ident.hex()} size={self.size} fd={self.fd}>"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        reduction.assert_spawning(self)
        return _rebuild_arena, (reduction.DupFd(self.fd), self.size, self.ident)


_attached: dict[bytes, Arena] = {}


def _rebuild_arena(df: Any, size: int, ident: bytes) -> Arena:
    fd = df.detach()
    arena = _attached.get(ident)
    if arena is not None:  # a second object in the same arena: one mapping is enough
        util.close_fds(fd)
        return arena
    arena = Arena(size, fd, ident)
    _attached[ident] = arena
    return arena


class Heap:
    """First-fit allocator over arenas; one per process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._arenas: list[Arena] = []
        self._free: dict[bytes, list[tuple[int, int]]] = {}  # arena ident -> sorted (start, size)

    def _reset_if_forked(self) -> None:
        if self._pid != os.getpid():
            self.__init__()  # type: ignore[misc]

    def malloc(self, size: int) -> tuple[Arena, int, int]:
        """A block of at least ``size`` bytes: (arena, offset, rounded size)."""
        if size < 0:
            raise ValueError(f"size {size} is negative")
        self._reset_if_forked()
        size = max(ALIGN, (size + ALIGN - 1) // ALIGN * ALIGN)
        with self._lock:
            for arena in self._arenas:
                free = self._free[arena.ident]
                for i, (start, length) in enumerate(free):
                    if length >= size:
                        if length == size:
                            del free[i]
                        else:
                            free[i] = (start + size, length - size)
                        return arena, start, size
            arena_size = max(ARENA_SIZE, (size + _PAGE - 1) // _PAGE * _PAGE)
            arena = Arena(arena_size)
            self._arenas.append(arena)
            self._free[arena.ident] = [(size, arena_size - size)] if arena_size > size else []
            return arena, 0, size

    def free(self, arena: Arena, start: int, size: int) -> None:
        """Give a block back (only in the process that allocated it)."""
        if self._pid != os.getpid():
            return
        with self._lock:
            free = self._free.get(arena.ident)
            if free is None:
                return
            i = bisect.bisect(free, (start, size))
            # merge with the next and the previous free blocks
            if i < len(free) and start + size == free[i][0]:
                size += free[i][1]
                del free[i]
            if i > 0 and free[i - 1][0] + free[i - 1][1] == start:
                start, size = free[i - 1][0], free[i - 1][1] + size
                del free[i - 1]
                i -= 1
            free.insert(i, (start, size))


heap = Heap()


class Block:
    """A block of shared memory, freed when collected in the process that allocated it."""

    def __init__(self, size: int) -> None:
        self.arena, self.offset, self.size = heap.malloc(size)
        self.requested = size
        util.Finalize(self, heap.free, (self.arena, self.offset, self.size))

    def memoryview(self) -> memoryview:
        """A writable view of exactly the requested bytes."""
        return memoryview(self.arena.buffer)[self.offset : self.offset + self.requested]

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _rebuild_block, (self.arena, self.offset, self.size, self.requested)

    def __repr__(self) -> str:
        return f"<Block arena={self.arena.ident.hex()} offset={self.offset} size={self.requested}>"


def _rebuild_block(arena: Arena, offset: int, size: int, requested: int) -> Block:
    block = Block.__new__(Block)
    block.arena, block.offset, block.size, block.requested = arena, offset, size, requested
    return block
