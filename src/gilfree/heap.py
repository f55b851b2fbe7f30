"""``multiprocessing.heap.BufferWrapper``: a block of shared memory a child can use (layer L5).

``BufferWrapper(size)`` allocates ``size`` bytes in gilfree's anonymous shared arenas (:mod:`gilfree._shm`,
the memory ``Value``/``Array`` use: nothing is left in ``/dev/shm`` whatever happens);
``create_memoryview()`` returns a writable view of them.  Pickled to a child (as a ``Process``
argument), it is the same memory there.  The block is freed when the wrapper is collected in the
process that made it, and no child still uses it.

The stdlib's allocator behind it (``BufferWrapper._heap``: its arenas, free lists and lock) is
private and not reproduced: gilfree's is :class:`gilfree._shm.Heap`.

Where this runs: any process, the calling thread; allocating may create an arena (one ``memfd``).
"""

from __future__ import annotations

from . import _shm

__all__ = ["BufferWrapper"]


class BufferWrapper:
    """``size`` bytes of shared memory (``multiprocessing.heap.BufferWrapper``)."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"Size {size} out of range")
        self._block = _shm.Block(size)

    @property
    def size(self) -> int:
        return self._block.requested

    def create_memoryview(self) -> memoryview:
        """A writable view of the whole block."""
        return self._block.memoryview()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} size={self.size}>"
