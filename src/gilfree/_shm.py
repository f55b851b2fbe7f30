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

A block a child may still be using is not reused while that child runs: ``Process(target=f,
args=(Lock(),)).start()`` drops the parent's last reference to the lock at once (``start`` forgets its
arguments), and reusing its memory for the parent's next lock would re-initialise a lock the child
holds.  (The stdlib's named semaphores are kept alive by the kernel instead.)  A block is *exposed*
if it was pickled for a child or existed when this process last forked.  An exposed block that is
freed waits in ``_deferred`` until the children that may have it have all been joined: the started,
unjoined children of :mod:`gilfree.process` first seen after the block was allocated, up to the
first look after it was freed (a child whose ``start`` is still running -- which may be what
dropped the block -- is not among the started children yet).  A child seen before the block was
allocated cannot have it, so a long-lived worker does not hold back blocks made after it started.

A block can be freed by a garbage collection that runs while this thread is inside ``malloc`` (the
heap lock held): such frees wait in ``_pending`` instead of deadlocking, and are done by the next
``malloc`` or ``free``.

Where this runs: in any process; allocation takes a thread lock, nothing blocks for long.
"""

from __future__ import annotations

import bisect
import mmap
import os
import sys
import threading
import weakref

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
        self._seq = 0  # blocks allocated so far: each block's number
        self._fork_mark = 0  # blocks numbered below this existed when this process last forked
        self._pending: list[tuple[Arena, int, int, list[Any] | None]] = []  # frees that found the lock taken
        # (lo, hi, arena, start, size): waits while a child first seen at a look numbered lo < n <= hi runs
        self._deferred: list[tuple[int, int, Arena, int, int]] = []
        self._deferred_seen: tuple[Any, ...] | None = None  # the children's numbers at the last search
        self._epoch = 0  # how many looks at the children found new ones
        self._child_epochs: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    def _reset_if_forked(self) -> None:
        if self._pid != os.getpid():
            self.__init__()  # type: ignore[misc]

    def _before_fork(self) -> None:
        self._fork_mark = self._seq

    def malloc(self, size: int) -> tuple[Arena, int, int, list[Any]]:
        """A block of at least ``size`` bytes: (arena, offset, rounded size, ticket).

        The ticket, ``[number, pickled, epoch]``, goes to :meth:`free` with the block.
        """
        if size < 0:
            raise ValueError(f"size {size} is negative")
        self._reset_if_forked()
        size = max(ALIGN, (size + ALIGN - 1) // ALIGN * ALIGN)
        with self._lock:
            self._do_pending()
            if self._deferred:
                self._release_deferred()
            ticket = [self._seq, False, self._epoch]
            self._seq += 1
            for arena in self._arenas:
                free = self._free[arena.ident]
                for i, (start, length) in enumerate(free):
                    if length >= size:
                        if length == size:
                            del free[i]
                        else:
                            free[i] = (start + size, length - size)
                        return arena, start, size, ticket
            arena_size = max(ARENA_SIZE, (size + _PAGE - 1) // _PAGE * _PAGE)
            arena = Arena(arena_size)
            self._arenas.append(arena)
            self._free[arena.ident] = [(size, arena_size - size)] if arena_size > size else []
            return arena, 0, size, ticket

    def free(self, arena: Arena, start: int, size: int, ticket: list[Any] | None = None) -> None:
        """Give a block back (only in the process that allocated it).

        ``ticket`` is the one :meth:`malloc` gave; without one the block is reused at once.
        """
        if self._pid != os.getpid():
            return
        # A collection inside malloc (this thread holds the lock) may get here: do not wait for it.
        if not self._lock.acquire(False):
            self._pending.append((arena, start, size, ticket))
            return
        try:
            self._do_pending()
            self._free_block(arena, start, size, ticket)
        finally:
            self._lock.release()

    def _do_pending(self) -> None:
        while self._pending:
            self._free_block(*self._pending.pop())

    def _free_block(self, arena: Arena, start: int, size: int, ticket: list[Any] | None) -> None:
        if ticket is not None and (ticket[1] or ticket[0] < self._fork_mark):
            # exposed: wait for the children seen now, and for those seen at the next look (a
            # child whose start() is still running -- which may be what dropped this block -- is
            # not among the started children yet)
            self._look_at_children()
            self._deferred.append((ticket[2], self._epoch + 1, arena, start, size))
            self._deferred_seen = None  # search again at the next malloc
            return
        self._insert_free(arena, start, size)

    def _look_at_children(self) -> None:
        """Forget the children that were joined; number the ones not seen before."""
        proc = sys.modules.get(__package__ + ".process")
        children = set(getattr(proc, "_children", ()))
        epochs = self._child_epochs
        for p in list(epochs):
            if p not in children:  # joined (or found finished): it uses nothing any more
                del epochs[p]
        new = [p for p in children if p not in epochs]
        if new:
            self._epoch += 1
            for p in new:
                epochs[p] = self._epoch

    def _release_deferred(self) -> None:
        self._look_at_children()
        seen = tuple(sorted(self._child_epochs.values()))
        if seen == self._deferred_seen:
            return  # no child finished and nothing new waits: nothing can be freed
        self._deferred_seen = seen
        keep = []
        for entry in self._deferred:
            lo, hi = entry[0], entry[1]
            if any(lo < n <= hi for n in seen):
                keep.append(entry)
            else:
                self._insert_free(*entry[2:])
        self._deferred = keep

    def _insert_free(self, arena: Arena, start: int, size: int) -> None:
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
os.register_at_fork(before=lambda: heap._before_fork())


class Block:
    """A block of shared memory, freed when collected in the process that allocated it.

    Its bytes are not cleared: a reused block holds what its previous owner wrote.
    """

    _ticket: list[Any] | None = None  # [number, pickled, epoch] in the allocating process

    def __init__(self, size: int) -> None:
        self.arena, self.offset, self.size, self._ticket = heap.malloc(size)
        self.requested = size
        util.Finalize(self, heap.free, (self.arena, self.offset, self.size, self._ticket))

    def memoryview(self) -> memoryview:
        """A writable view of exactly the requested bytes."""
        return memoryview(self.arena.buffer)[self.offset : self.offset + self.requested]

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        if self._ticket is not None:
            self._ticket[1] = True  # a child may use it from now on
        return _rebuild_block, (self.arena, self.offset, self.size, self.requested)

    def __repr__(self) -> str:
        return f"<Block arena={self.arena.ident.hex()} offset={self.offset} size={self.requested}>"


def _rebuild_block(arena: Arena, offset: int, size: int, requested: int) -> Block:
    block = Block.__new__(Block)
    block.arena, block.offset, block.size, block.requested = arena, offset, size, requested
    return block
