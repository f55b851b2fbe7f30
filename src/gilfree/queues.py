"""Queues between processes: a ring buffer in shared memory, no feeder thread (layer L5).

::

    producers (any process/thread)             shared memory                         consumers
    ------------------------------             -------------                         ---------
    put(obj): pickle here (raises here)   +------------------------------------+
      small: lock, write record at tail,  | header (Block, inherited)          |  get(): lock; record at
        tail += len  (the commit), wake   |  head tail count wseg rcur rbase   |   head: copy out,
      (each operation: snapshot, TX=1,    |  next_seq maxsize unfinished ...   |   head += len (commit),
        changes, TX=0; rolled back by the |  TX: operation in progress + the   |   (the same TX around
        next holder if left half-done)    |   snapshot to roll it back from    |   it), wake; unpickle
      ring full (unbounded queue):        |                                    |   after the lock is
        records go to a spill segment     |  futex words: not-empty/not-full/  |   released
        "gfq<id>_<n>", reached through a  |   all-done (sequence+sleeper flag) |
        LINK record in the ring           |  pool: 16 slot states (free,       |  LINK: follow the chain
      big (> cap/8), no out-of-band       |   queued, pid+writing, pid+reading)|   of spill segments, then
        buffer, <= 2 MiB: claim a pool    | ring (cap bytes, circular):        |   back to the ring
        slot (lock), write the pickle to  |  [len|kind|payload...][len|kind..  |  POOL: mark the slot
        segment "gfq<id>_p<slot>" (no     +------------------------------------+   pid+reading (lock),
        lock), publish a POOL record           |LINK(n)      |POOL(slot,len)  |BIG   unpickle from its
      other big: written to its own            v             v                v      segment, free it
        segment "gfq<id>_b<rand>" outside  spill segment n:  pool segment:   big segment: pickle +
        the lock; a BIG record carries     [used|sealed|     the pickle      buffers (mapped, used,
        its name                            records..        (kept mapped,   unlinked by the
                                            LINK(n+1)?]       reused)         consumer)

Every record is ``[u32 payload length][u32 kind][payload, padded to 8]``; kinds are a pickled message
(MSG), the name of a big message's segment (BIG), the number of the next spill segment (LINK) and a
pool slot with the pickle's length (POOL).

*Producer* (any process or thread that calls ``put``): pickles the object in the caller, so an
unpicklable object raises there and nothing is published; takes the queue lock; appends the record;
publishes it with one 8-byte store (``tail``, or ``used`` of the spill segment being written);
updates the message count; wakes sleepers only if one announced itself.  Nothing stays behind in the
process: a child that put data and returns can be joined at once, and the data is in shared memory.
For a plain object (tuple, int, str...) ``put`` is a method of the C base class
``_cqueue.Core`` that pickles, takes the lock if it is free or frees up within a few polls (through
:mod:`gilfree._csync`'s C API) and appends, with no Python frame; ``get`` likewise.  ``put_many``
pickles the batch with one Pickler and appends it with one call.

*Consumer* (any caller of ``get``): takes the lock, copies the record out, consumes it with one
8-byte store (``head``, or the read cursor ``rcur`` in a spill segment), releases the lock and
unpickles.  It unlinks spill and big segments it has finished.

*Big messages* travel outside the ring, in one copy each way.  Those without out-of-band buffers
(bytes, str, most objects) use the queue's pool of up to 16 segments, kept mapped and reused, so a
message costs no segment creation, page faults or unmapping: the producer claims a free slot under
the lock (state ``pid|writing``), writes the pickle with no lock held, and under the lock marks it
``queued`` then commits the POOL record; the consumer commits its take, marks the slot
``pid|reading``, releases the lock, unpickles straight from the segment and frees the slot with one
store.  Out-of-band buffers (numpy arrays...) stay zero-copy in their own segment, which the
unpickled object keeps alive; so do big messages larger than 2 MiB, and those that find every slot
taken (after waiting up to 2 ms if a consumer is reading one, which it frees in a moment).

*Crash safety.*  The lock is a robust :class:`~gilfree.synchronize.Lock` in takeover mode: if its
holder dies, the next process that waits for it takes it over.  Each operation (a put, a get, a
``put_many`` or a ``get_many``, with the lock held) is a transaction: it writes a snapshot of what it
may change into the header (tail, open spill segment and its ``used``/``sealed``, count, unfinished
count, next segment number; or head, read cursor, chain base, count), marks itself in progress
(``_TX``, one store), makes its changes -- each record still published by one store, as above -- and
ends with ``_TX = 0``, the commit.  The next holder that finds ``_TX`` set (the dead holder's
taker-over, or anyone after an interrupted holder) runs :meth:`_QueueBase._repair`: it rolls the
operation back from the snapshot (assignments only: a death in the middle of a repair is repaired by
the next holder), then walks the records to recount them and to set the pool slots right.  So a put
is all or nothing (a batch too), and a process killed at any instruction loses at most what it had
taken and not yet returned; nothing is torn or duplicated.  Pool slots keep this: a slot is marked
``queued`` *before* its record is committed and ``reading`` *after* its record is consumed; the walk
marks queued every slot a queued record names and frees the queued ones no record names; a death
while writing or reading a slot leaves the dead pid in it, and a producer that finds no free slot
takes such a slot back.  Every step is a named crash point (:mod:`gilfree._crash`); the states and
how each is repaired are tabled in docs/design.md.

*Segments* (see :mod:`gilfree._tracker`): every name starts with the queue's prefix
(``GILFREE_SHM_PREFIX`` + ``gfq<id>_``), which the creator registers with the tracker; the creator
removes them when it lets go of the queue or at its exit, and if it dies, the tracker does once no
process maps the queue's header any more (the last user is gone).  A big message's segment is
registered as its producer's *before* it is created, and handed over to the queue (``give``, a
one-way send) under the lock just before its record is committed: a producer killed before that
leaves nothing (the tracker unlinks it), one killed after it leaves a message the consumers still
get.  A spill segment orphaned by a death under the lock (created, not yet linked; left by its
reader, not yet unlinked) is unlinked by the repair.  What remains until the queue's last user has
gone: a big segment whose consumer died between committing its take and unlinking it, or whose
producer died between the hand-over and the commit (a few instructions each).

*Nothing read from shared memory is trusted*: positions, lengths, kinds, segment numbers and slots
are checked before use; what cannot be read is skipped and reported as :class:`CorruptQueueError`
naming the queue.

*Waiting.*  Each condition (not empty, not full, all tasks done) is a 32-bit sequence number bumped
under the lock by whoever may have changed it, plus a flag a sleeper sets before it sleeps on the
sequence (``FUTEX_WAIT`` in :mod:`gilfree._cqueue`): a waker makes the wake-up system call only if the
flag was set.  A sleeper reads the sequence under the lock, so no wake-up is lost.  Without the C
extension (or with ``GILFREE_PURE_QUEUE=1``) sleepers poll the sequence with a growing sleep
(50 µs to 5 ms); that path is kept for tests and machines without a compiler.

The design follows the classic single-lock bounded buffer with sequence-number futexes (as in
faster-fifo's and Boost.Interprocess's message queues); what differs: no fixed capacity in bytes
(spill segments), records published by a single store so that death at any point is recoverable,
large messages out of the ring (in reused segments), and a robust lock instead of a pthread mutex.

Like the stdlib's, queues reach other processes only by inheritance (``Process`` arguments).

Where this runs: in any process and thread.  ``put`` blocks only on a full bounded queue, ``get`` on
an empty one, both up to their timeout; the lock is held only for copying bytes.
"""

from __future__ import annotations

import _posixshmem
import mmap
import os
import struct
import sys
import threading
import time
from queue import Empty, Full

from . import _crash, _shm, _tracker, process, reduction, synchronize, util
from ._start import get_executable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Iterable

def _load_cqueue() -> Any:
    if os.environ.get("GILFREE_PURE_QUEUE"):
        return None
    try:
        from . import _cqueue as module
    except ImportError:  # pragma: no cover - built without a C compiler
        return None
    return module


#: The C hot path, or None: the pure-Python path (no compiler, or GILFREE_PURE_QUEUE=1).
_cqueue: Any = _load_cqueue()
_MISS = _cqueue.MISS if _cqueue is not None else object()

__all__ = ["Queue", "SimpleQueue", "JoinableQueue", "Empty", "Full", "CorruptQueueError"]


class _Unreadable(Exception):
    """A record or position read from shared memory that no gilfree process writes (internal)."""

    def __init__(self, what: str, seq: int) -> None:
        super().__init__(what)
        self.seq = seq  # the spill segment where it was found, or 0: the ring


class CorruptQueueError(RuntimeError):
    """The queue's shared memory holds what no gilfree process writes (overwritten by a stray write).

    Raised by the operation that found it, after the queue dropped what it cannot read (named in the
    message); the queue keeps working for the records that are intact.
    """

#: Default ring size in bytes (a power of two); ``Queue(ring_size=...)`` changes it.
RING_SIZE = 1 << 20
#: Out-of-band buffers (numpy arrays, PickleBuffer) at least this large always travel in their own segment.
OOB_MIN = 1 << 20
#: How long a non-blocking put/get waits for the queue lock (seconds).
NOWAIT_LOCK_TIMEOUT = 0.005
#: Longest single sleep of a waiter before it looks at the queue again (seconds).
WAIT_SLICE = 0.5
#: Size of a spill segment (records that do not fit in a full ring of an unbounded queue).
SPILL_SIZE = 4 << 20
#: Big messages up to this size without out-of-band buffers go through the queue's pool of reused
#: segments (at most 16 of them, so the pool keeps at most 16 x this much shared memory).
POOL_MAX = 2 << 20
#: How long a big put waits for a pool slot that a consumer is reading before it takes a one-off segment.
POOL_WAIT = 0.002

# header words (u64)
_MAGIC, _CAP, _HEAD, _TAIL, _COUNT, _WSEG, _RCUR, _RBASE, _NEXT_SEQ, _MAXSIZE, _UNFINISHED, _QID, _FLAGS = range(13)
_F_JOINABLE = 1
# futex words (u32 index into the same header): sequence, sleeper flag
_NE, _NF, _DONE = 26, 28, 30  # bytes 104-127: after the u64 words 0-12
# the big-message segment pool: one u64 state word per slot (u64 words 16-31, bytes 128-255)
_POOL0, _NPOOL = 16, 16
_P_FREE, _P_QUEUED = 0, 1  # other states: pid << 8 | _P_WRITING or _P_READING
_P_WRITING, _P_READING = 2, 3
# the operation in progress (u64 words 32-42): its kind and a snapshot of what it may change, so that a
# holder that dies (or is interrupted) half-way is rolled back as a whole by the next holder
(_TX, _TX_TAIL, _TX_WSEG, _TX_WUSED, _TX_WSEALED, _TX_COUNT, _TX_UNF, _TX_NEXT, _TX_HEAD, _TX_RCUR,
 _TX_RBASE) = range(32, 43)
_TX_PUT, _TX_GET, _TX_REPAIRING = 1, 2, 0x100
_HDR = 384
_MAGIC_VALUE = 0x6766517565756533  # "gfQueue3"
# record kinds
_MSG, _BIG, _LINK, _POOL = 1, 2, 3, 4
_LINK_LEN = 16
_REC = struct.Struct("<II")
# spill segment header (u64 words): bytes used (records end here), sealed (1: nothing more comes)
_S_USED, _S_SEALED = 0, 1
_S_HDR = 64

_SHM_DIR = "/dev/shm"


_U64 = (1 << 64) - 1


def _listdir_shm() -> list[str]:
    try:
        return os.listdir(_SHM_DIR)
    except OSError:
        return []


def _pad(n: int) -> int:
    return (n + 7) & ~7


def _shm_create(name: str, size: int) -> mmap.mmap:
    fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    except BaseException:
        _shm_unlink(name)
        raise
    finally:
        os.close(fd)


def _shm_attach(name: str) -> mmap.mmap:
    fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _shm_unlink(name: str) -> None:
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass


_pickle_dumps = reduction.pickle.dumps
_pickle_loads = reduction.pickle.loads
_PLAIN = frozenset({int, float, str, tuple, bool, type(None), complex})
_fast_table_len = -1
_fast_ok = False
_main_seen: tuple[Any, bool] = (None, False)


def _fast_dumps(obj: Any, limit: int, scan_main: bool = True) -> bytes | None:
    """``obj`` pickled by the C pickler alone, or None where :func:`reduction.dump_chunks` must do it.

    That is: when it fails (tier 2 and the error explanation are there), when a reducer registered with
    :func:`reduction.register` could change the result, when ``__main__`` is mentioned and cannot be
    imported by a receiver, and for large buffers (which travel out of band).  The C pickler uses
    copyreg's table as the package's pickler does; several times cheaper than a Pickler per message.
    """
    if len(reduction._extra_reducers) != _fast_table_len:
        _fast_dumps_ok()
    if not _fast_ok:
        return None
    t = type(obj)
    if t not in _PLAIN:
        if t is bytes or t is bytearray:
            if len(obj) > limit:
                return None
        elif getattr(obj, "nbytes", 0) >= min(limit, OOB_MIN):  # numpy arrays, memoryviews
            return None
    try:
        data = _pickle_dumps(obj, 5)
    except Exception:
        return None
    if len(data) > limit:
        return None
    if scan_main and data.find(b"__main__") >= 0 and _main_unimportable():  # find: `in` tries int() first
        return None
    return data


class _Sink:
    """Where a batch's Pickler writes: each pickle arrives as one chunk (or a few, for a large one)."""

    __slots__ = ("chunks", "write")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.write = self.chunks.append


_Pickler = reduction.pickle.Pickler


def _fast_dumps_ok() -> bool:
    """Whether the C pickler alone pickles as :func:`reduction.dump_chunks` would (no reducer in the way)."""
    global _fast_table_len, _fast_ok
    extra = reduction._extra_reducers
    if len(extra) != _fast_table_len:  # only types that plain pickling refuses anyway
        _fast_table_len = len(extra)
        _fast_ok = all(t is memoryview or t.__name__ == "socket" for t in extra)
        if _cqueue is not None:  # what _cqueue.put() may pickle by itself
            _cqueue.set_fast(_pickle_dumps, extra, _fast_table_len if _fast_ok else -1)
    return _fast_ok


def _main_unimportable() -> bool:
    """Whether a receiver could not import ``__main__`` (a pickle that mentions it needs tier 2)."""
    global _main_seen
    main = sys.modules.get("__main__")
    if main is not _main_seen[0]:
        _main_seen = (main, reduction._main_is_reimportable())
    return not _main_seen[1]


def _shm_create_owned(name: str, size: int) -> mmap.mmap:
    """:func:`_shm_create`, the segment registered first as this process's (see the module's *Segments*).

    Registered before it exists, so no death can leave it unowned; hand it over with
    :func:`_tracker.give` just before the record that names it is committed.
    """
    _tracker.register("/" + name, get_executable(), quiet=True)
    try:
        return _shm_create(name, size)
    except BaseException:
        _tracker.unregister("/" + name)
        raise


def _shm_unlink_owned(name: str) -> None:
    """Unlink a segment this process created and still owns (never published)."""
    _shm_unlink(name)
    _tracker.unregister("/" + name)


def _sweep(prefix: str) -> None:
    """Unlink every segment left with this queue's prefix (orphans of killed processes, unread data)."""
    try:
        names = os.listdir(_SHM_DIR)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix):
            _shm_unlink(name)
    _tracker.forget_queue(prefix)  # nothing left for the tracker to sweep after us


def _sweep_spill_orphans(prefix: str, chained: set[int]) -> None:
    """Unlink the spill segments of this queue that no chain reaches (lock held, after a death).

    Spill segments are created and dropped only under the lock, so under the lock every one that
    exists is on a chain, unless its creator died before linking it or a reader died after leaving
    it and before unlinking it.
    """
    try:
        names = os.listdir(_SHM_DIR)
    except OSError:
        return
    for name in names:
        seq = name[len(prefix):]
        if name.startswith(prefix) and seq.isdigit() and int(seq) not in chained:
            _shm_unlink(name)


def _sweep_when_safe(prefix: str) -> None:
    # Children may still use the queue when the creator drops it: then wait for the creator's exit
    # (after its children are joined: priority below 0, see process._exit_function).
    if process.active_children():
        util.Finalize(None, _sweep, (prefix,), exitpriority=-10)
    else:
        _sweep(prefix)


#: Where get_many's unpickling put an item that failed.
_FAILED = object()

#: The C base of the queues (put and get in one call in the common case), or object.
_Core: Any = _cqueue.Core if _cqueue is not None else object


class _QueueBase(_Core):  # type: ignore[misc, valid-type]
    """The shared machinery of :class:`Queue`, :class:`JoinableQueue` and :class:`SimpleQueue`."""

    _joinable = False

    def __init__(self, maxsize: int = 0, *, ctx: Any = None, ring_size: int = RING_SIZE) -> None:
        if maxsize <= 0:
            maxsize = 0
        cap = 1 << max(12, (int(ring_size) - 1).bit_length())
        if cap > 1 << 31:
            raise ValueError(f"ring_size {ring_size} is larger than 2 GiB")
        block = _shm.Block(_HDR + cap)
        lock = synchronize.Lock(on_owner_death="repair")  # takeover + _repair(), without a warning
        qid = int.from_bytes(os.urandom(4), "little")
        header = block.memoryview()[:_HDR]
        header[:] = bytes(_HDR)
        words = header.cast("Q")
        words[_CAP] = cap
        words[_NEXT_SEQ] = 1
        words[_MAXSIZE] = maxsize
        words[_QID] = qid
        words[_FLAGS] = _F_JOINABLE if self._joinable else 0
        words[_MAGIC] = _MAGIC_VALUE
        self._setup(block, lock)
        # The tracker removes the queue's segments once this process has gone and no process maps
        # the header any more (a SIGKILLed creator too); normally the finalizer does it first.
        _tracker.register_queue(self._prefix, _tracker.identity(block.arena.fd), get_executable())
        util.Finalize(self, _sweep_when_safe, (self._prefix,), exitpriority=-10)

    def _setup(self, block: _shm.Block, lock: Any) -> None:
        self._block = block
        self._lock = lock
        view = block.memoryview()
        self._h = view[:_HDR].cast("Q")
        self._w = view[:_HDR].cast("I")
        if self._h[_MAGIC] != _MAGIC_VALUE:
            raise ValueError("no queue header in this block (overwritten?)")
        self._cap = self._h[_CAP]
        self._mask = self._cap - 1
        self._ring = view[_HDR : _HDR + self._cap]
        self._maxsize = self._h[_MAXSIZE]
        self._big_limit = self._cap // 8
        self._prefix = f"{util.SHM_PREFIX}gfq{self._h[_QID]:08x}_"
        self._segs: dict[int, mmap.mmap] = {}  # spill segments mapped by this process
        # (seq, segment) of the spill segment last written / read here, for the C hot path
        self._wc: tuple[int, mmap.mmap] | None = None
        self._rc: tuple[int, mmap.mmap] | None = None
        self._pool: dict[int, mmap.mmap] = {}  # pool segments mapped by this process
        self._closed = False
        self._deferred: list[BaseException] | None = None  # get_many: errors of items that failed to unpickle
        self._tlock = threading.Lock()  # the pure-Python wait path sleeps; nothing else needs it
        self._buf = block.arena.buffer
        self._base = block.offset
        self._fast = _cqueue is not None
        if self._fast:
            self._core_init(self._buf, self._base, lock)

    def __getstate__(self) -> Any:
        reduction.assert_spawning(self)
        return (self._block, self._lock)

    def __setstate__(self, state: Any) -> None:
        self._setup(*state)

    def __class_getitem__(cls, item: Any) -> Any:
        import types

        return types.GenericAlias(cls, item)

    def __repr__(self) -> str:
        try:
            size: Any = self._h[_COUNT]
        except Exception:
            size = "unknown"
        maxsize = f"maxsize={self._maxsize}, " if self._maxsize else ""
        closed = ", closed" if self._closed else ""
        return f"<{type(self).__name__}({maxsize}qsize={size}, ring={self._cap}){closed}>"

    # -- locking and waiting ---------------------------------------------------------------------
    def _acquire(self, block: bool, deadline: float | None) -> bool:
        """Take the queue lock; first repair what a holder that died or was interrupted left half-done.

        Call it inside a ``try`` whose handler calls :meth:`_unlock_if_mine` (or an abort that does):
        an exception raised by a signal handler may come between the lock being taken and this method
        returning, and then only that handler can see that the lock is held.
        """
        lock = self._lock
        if not lock.acquire(False):
            if not block:
                # the lock is held for microseconds (copying bytes): a non-blocking call waits that long,
                # so that get_nowait() on a non-empty queue does not fail because another process is
                # in the middle of its own get (the stdlib's does: its lock is held across a read)
                timeout: float | None = NOWAIT_LOCK_TIMEOUT
            else:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not lock.acquire(True, timeout):
                return False
            if lock._recovered_from:  # the holder died, maybe half-way through an operation
                self._repair()
                return True
        if self._h[_TX]:  # an operation left half-done (its holder interrupted, or died while repairing)
            self._repair()  # (an overwritten magic or size: tx_begin reports it, the C path leaves it here)
        return True

    def _unlock_if_mine(self) -> None:
        """After an exception, with the lock maybe held by this thread: release it.

        An operation left half-done (``_TX`` set) is rolled back by the next holder.
        """
        lock = self._lock
        if lock._is_mine():
            lock.release()

    def _wake(self, idx: int) -> None:
        """Bump condition ``idx``'s sequence (lock held) and wake its sleepers, if any sleep."""
        if _cqueue is not None:
            _cqueue.wake(self._buf, self._base + 4 * idx)
        else:
            w = self._w
            w[idx] = (w[idx] + 1) & 0xFFFFFFFF

    def _sleep(self, idx: int, seen: int, deadline: float | None) -> bool:
        """Wait (lock not held) until condition ``idx``'s sequence differs from ``seen``; False on timeout."""
        if deadline is None:
            timeout = -1.0
        else:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return False
        if _cqueue is not None:
            # in slices: a waker killed between bumping the sequence and the wake-up call must not
            # leave us asleep for good (the caller re-checks the queue after every return)
            _cqueue.wait(self._buf, self._base + 4 * idx, seen, WAIT_SLICE if timeout < 0 else min(timeout, WAIT_SLICE))
            return True
        delay = 50e-6
        w = self._w
        while w[idx] == seen:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                delay = min(delay, left)
            time.sleep(delay)
            delay = min(delay * 2, 0.005)
        return True

    # -- segments -------------------------------------------------------------------------------
    def _seg(self, seq: int) -> mmap.mmap:
        """Spill segment ``seq``, mapped here (kept); _Unreadable if no such segment can exist or it is gone."""
        seg = self._segs.get(seq)
        if seg is None:
            if not 0 < seq < min(self._h[_NEXT_SEQ], 1 << 32):
                raise _Unreadable(f"a record names spill segment {seq}, but only 1 to {self._h[_NEXT_SEQ] - 1} "
                                  "were created", seq)
            try:
                seg = _shm_attach(f"{self._prefix}{seq}")
            except FileNotFoundError:
                raise _Unreadable(f"spill segment {self._prefix}{seq} is named by a record but is gone", seq) from None
            if len(seg) < _S_HDR + _LINK_LEN:
                seg.close()
                raise _Unreadable(f"spill segment {self._prefix}{seq} is {len(seg)} bytes long", seq)
            self._segs[seq] = seg
        return seg

    def _forget_segs(self, below: int) -> None:
        for seq in [s for s in self._segs if s < below]:
            del self._segs[seq]
        if self._wc is not None and self._wc[0] < below:
            self._wc = None

    def _corrupt(self, what: str) -> CorruptQueueError:
        return CorruptQueueError(
            f"queue {self._prefix[3:-1]} (/dev/shm/{self._prefix}*): {what}; its shared memory was "
            "overwritten by something other than gilfree"
        )

    # -- records --------------------------------------------------------------------------------
    def _ring_write(self, pos: int, kind: int, data: Any) -> None:
        ring, mask = self._ring, self._mask
        off = pos & mask
        n = len(data)
        _REC.pack_into(ring, off, n, kind)
        start = (off + 8) & mask
        first = self._cap - start
        if n <= first:
            ring[start : start + n] = data
        else:
            view = memoryview(data)
            ring[start:] = view[:first]
            ring[: n - first] = view[first:]

    def _ring_read(self, pos: int) -> tuple[int, int]:
        """(payload length, kind) of the record at ring position ``pos``."""
        return _REC.unpack_from(self._ring, pos & self._mask)

    def _ring_payload(self, pos: int, n: int) -> bytes:
        ring, mask = self._ring, self._mask
        start = (pos + 8) & mask
        first = self._cap - start
        if n <= first:
            return ring[start : start + n].tobytes()
        return ring[start:].tobytes() + ring[: n - first].tobytes()

    def _record_ok(self, n: int, kind: int, room: int) -> bool:
        """Whether a record header read from shared memory is one gilfree writes, within ``room`` bytes."""
        if 8 + _pad(n) > room:
            return False
        if kind == _MSG:
            return True
        if kind == _LINK:
            return n == 8
        if kind == _POOL:
            return n == 16
        return kind == _BIG and 0 < n <= 64

    def _tx_put_begin(self) -> None:
        """Record what a put may change (lock held), then mark it in progress (one store)."""
        h = self._h
        wseg = h[_WSEG]
        used = sealed = 0
        if wseg:
            seg = self._seg(wseg)
            used, sealed = struct.unpack_from("<QQ", seg, 0)
        h[_TX_TAIL] = h[_TAIL]
        h[_TX_WSEG] = wseg
        h[_TX_WUSED] = used
        h[_TX_WSEALED] = sealed
        h[_TX_COUNT] = h[_COUNT]
        h[_TX_UNF] = h[_UNFINISHED]
        h[_TX_NEXT] = h[_NEXT_SEQ]
        h[_TX] = _TX_PUT
        if _crash.on:
            _crash.hit("queue.put.tx_begun")

    def _tx_get_begin(self) -> None:
        h = self._h
        h[_TX_HEAD] = h[_HEAD]
        h[_TX_RCUR] = h[_RCUR]
        h[_TX_RBASE] = h[_RBASE]
        h[_TX_COUNT] = h[_COUNT]
        h[_TX] = _TX_GET
        if _crash.on:
            _crash.hit("queue.get.tx_begun")

    def _rollback(self) -> None:
        """Undo the operation in progress (lock held) from its snapshot: assignments only (idempotent)."""
        h = self._h
        op = h[_TX] & 0xFF
        if op == _TX_PUT:
            wseg = h[_TX_WSEG]
            if wseg:
                try:
                    struct.pack_into("<QQ", self._seg(wseg), 0, h[_TX_WUSED], h[_TX_WSEALED])
                except _Unreadable:
                    wseg = 0
            h[_TAIL] = h[_TX_TAIL]
            h[_WSEG] = wseg
            h[_COUNT] = h[_TX_COUNT]
            h[_UNFINISHED] = h[_TX_UNF]
            first, end = h[_TX_NEXT], h[_NEXT_SEQ]
            for seq in range(max(first, end - 64), end):  # the spill segments it created (one or two)
                self._segs.pop(seq, None)
                _shm_unlink(f"{self._prefix}{seq}")
            self._wc = None
        elif op == _TX_GET:
            h[_HEAD] = h[_TX_HEAD]
            h[_RCUR] = h[_TX_RCUR]
            h[_RBASE] = h[_TX_RBASE]
            h[_COUNT] = h[_TX_COUNT]
            self._rc = None

    def _append(self, kind: int, data: Any) -> None:
        """Append one record and publish it (lock held, put in progress); count it."""
        h = self._h
        size = 8 + _pad(len(data))
        wseg = h[_WSEG]
        if wseg and self._segs_sealed(wseg):
            h[_WSEG] = wseg = 0
        tail = h[_TAIL]
        queued = tail - h[_HEAD]
        if not 0 <= queued <= self._cap or (tail | h[_HEAD]) & 7 or tail >= 1 << 63:
            raise _Unreadable(f"head {h[_HEAD]} and tail {tail} are {queued} bytes apart in a ring of {self._cap}", 0)
        if wseg and queued + size + _LINK_LEN <= self._cap // 2:
            # the ring has drained: close the spill chain, later records go to the ring after it
            seg = self._seg(wseg)
            struct.pack_into("<Q", seg, 8 * _S_SEALED, 1)
            if _crash.on:
                _crash.hit("queue.spill.sealed")
            h[_WSEG] = wseg = 0
        if not wseg:
            if queued + size + _LINK_LEN <= self._cap:
                self._ring_write(tail, kind, data)
                if _crash.on:
                    _crash.hit("queue.put.written")
                h[_TAIL] = tail + size  # commit
                if _crash.on:
                    _crash.hit("queue.put.published")
            else:  # ring full: start a spill chain, reached through a LINK in the ring
                seq = self._new_spill(kind, data, size)
                self._ring_write(tail, _LINK, struct.pack("<Q", seq))
                h[_TAIL] = tail + _LINK_LEN  # commit
                if _crash.on:
                    _crash.hit("queue.spill.linked")
                h[_WSEG] = seq
        else:
            seg = self._seg(wseg)
            self._wc = (wseg, seg)
            used = struct.unpack_from("<Q", seg, 0)[0]
            if not _S_HDR <= used <= len(seg) or used & 7:
                raise _Unreadable(f"spill segment {self._prefix}{wseg} says {used} bytes are used of {len(seg)}", wseg)
            if used + size + _LINK_LEN <= len(seg):
                _REC.pack_into(seg, used, len(data), kind)
                seg[used + 8 : used + 8 + len(data)] = data
                if _crash.on:
                    _crash.hit("queue.spill.written")
                struct.pack_into("<Q", seg, 0, used + size)  # commit
                if _crash.on:
                    _crash.hit("queue.spill.published")
            else:  # this segment is full: continue in a new one
                seq = self._new_spill(kind, data, size)
                _REC.pack_into(seg, used, 8, _LINK)
                struct.pack_into("<Q", seg, used + 8, seq)
                struct.pack_into("<Q", seg, 0, used + _LINK_LEN)  # commit
                if _crash.on:
                    _crash.hit("queue.spill.linked")
                struct.pack_into("<Q", seg, 8 * _S_SEALED, 1)
                if _crash.on:
                    _crash.hit("queue.spill.sealed")
                h[_WSEG] = seq
        h[_COUNT] = (h[_COUNT] + 1) & _U64  # (an overwritten count must not make put fail)
        if self._joinable:
            h[_UNFINISHED] = (h[_UNFINISHED] + 1) & _U64
        if _crash.on:
            _crash.hit("queue.put.counted")

    def _segs_sealed(self, seq: int) -> bool:
        return struct.unpack_from("<Q", self._seg(seq), 8 * _S_SEALED)[0] != 0

    def _new_spill(self, kind: int, data: Any, size: int) -> int:
        h = self._h
        seq = h[_NEXT_SEQ]
        if not 0 < seq < 1 << 31:  # overwritten: continue after the highest segment there is
            seq = 1 + max((int(n[len(self._prefix):]) for n in _listdir_shm() if n.startswith(self._prefix)
                           and n[len(self._prefix):].isdigit()), default=0)
        length = max(SPILL_SIZE, _S_HDR + size + _LINK_LEN)
        for _ in range(1000):
            h[_NEXT_SEQ] = seq + 1
            try:
                seg = _shm_create(f"{self._prefix}{seq}", length)
                break
            except FileExistsError:  # overwritten: the number was given out already
                seq += 1
        else:
            raise _Unreadable(f"spill segments {self._prefix}{seq - 1000} to {seq - 1} all exist", 0)
        _REC.pack_into(seg, _S_HDR, len(data), kind)
        seg[_S_HDR + 8 : _S_HDR + 8 + len(data)] = data
        struct.pack_into("<QQ", seg, 0, _S_HDR + size, 0)
        self._forget_segs(h[_WSEG])
        self._segs[seq] = seg
        self._wc = (seq, seg)
        if _crash.on:
            _crash.hit("queue.spill.created")
        return seq

    def _take(self, drops: list[int]) -> tuple[int, bytes] | None:
        """Consume the first record (lock held, get in progress): (kind, payload), or None if empty.

        Spill segments that reading left behind are added to ``drops`` (unlinked once the get is over:
        a rollback may need them).
        """
        rec = self._take_record(drops)
        if rec is not None and rec[0] == _POOL:
            # after the commit: a death in between leaks the slot, never lets it be reused too early
            if _crash.on:
                _crash.hit("queue.pool.taken")
            slot = struct.unpack_from("<Q", rec[1])[0]
            if slot < _NPOOL:  # else _decode reports it
                self._h[_POOL0 + slot] = (os.getpid() << 8) | _P_READING
            if _crash.on:
                _crash.hit("queue.pool.reading")
        return rec

    def _take_record(self, drops: list[int]) -> tuple[int, bytes] | None:
        h = self._h
        while True:
            rcur = h[_RCUR]
            if rcur:
                seq, rpos = rcur >> 32, rcur & 0xFFFFFFFF
                seg = self._seg(seq)
                self._rc = (seq, seg)
                used, sealed = struct.unpack_from("<QQ", seg, 0)
                if not _S_HDR <= rpos <= used <= len(seg) or (rpos | used) & 7:
                    raise _Unreadable(f"spill segment {self._prefix}{seq} is read at {rpos} of {used} bytes "
                                      f"used ({len(seg)} long)", seq)
                if rpos < used:
                    n, kind = _REC.unpack_from(seg, rpos)
                    if not self._record_ok(n, kind, used - rpos):
                        raise _Unreadable(f"the record at {rpos} of spill segment {self._prefix}{seq} says "
                                          f"kind {kind}, length {n}, with {used - rpos} bytes left", seq)
                    if kind == _LINK:
                        nxt = struct.unpack_from("<Q", seg, rpos + 8)[0]
                        if not seq < nxt < min(h[_NEXT_SEQ], 1 << 32):  # a chain only goes to newer segments
                            raise _Unreadable(f"spill segment {self._prefix}{seq} links to segment {nxt}", seq)
                        h[_RCUR] = (nxt << 32) | _S_HDR  # commit
                        if _crash.on:
                            _crash.hit("queue.get.link_followed")
                        drops.append(seq)
                        continue
                    payload = seg[rpos + 8 : rpos + 8 + n]
                    h[_RCUR] = rcur + 8 + _pad(n)  # commit
                    if _crash.on:
                        _crash.hit("queue.get.consumed")
                    h[_COUNT] = max(h[_COUNT] - 1, 0)
                    if _crash.on:
                        _crash.hit("queue.get.counted")
                    return kind, payload
                if not sealed:
                    return None
                # end of the chain: back to the ring, after the LINK that led here (idempotent)
                h[_HEAD] = h[_RBASE] + _LINK_LEN
                h[_RCUR] = 0
                if _crash.on:
                    _crash.hit("queue.get.chain_left")
                drops.append(seq)
                continue
            head, tail = h[_HEAD], h[_TAIL]
            if head == tail:
                return None
            queued = tail - head
            if not 0 < queued <= self._cap or (head | tail) & 7:
                raise _Unreadable(f"head {head} and tail {tail} are {queued} bytes apart in a ring of {self._cap}", 0)
            n, kind = self._ring_read(head)
            if not self._record_ok(n, kind, queued):
                raise _Unreadable(f"the record at ring position {head} says kind {kind}, length {n}, with "
                                  f"{queued} bytes queued", 0)
            if kind == _LINK:
                seq = struct.unpack_from("<Q", self._ring_payload(head, 8))[0]
                if not 0 < seq < min(h[_NEXT_SEQ], 1 << 32):
                    raise _Unreadable(f"the ring links to spill segment {seq} (last created: {h[_NEXT_SEQ] - 1})", 0)
                h[_RBASE] = head
                h[_RCUR] = (seq << 32) | _S_HDR
                if _crash.on:
                    _crash.hit("queue.get.link_followed")
                continue
            payload = self._ring_payload(head, n)
            h[_HEAD] = head + 8 + _pad(n)  # commit
            if _crash.on:
                _crash.hit("queue.get.consumed")
            h[_COUNT] = max(h[_COUNT] - 1, 0)
            if _crash.on:
                _crash.hit("queue.get.counted")
            return kind, payload

    def _drop_ring(self) -> None:
        """Give up every queued record (lock held, unreadable ring): consumers start over at the tail."""
        h = self._h
        h[_HEAD] = h[_TAIL] = 0  # (not the tail: it may be unaligned, or near 2**64)
        h[_RCUR] = 0
        h[_WSEG] = 0
        self._rc = self._wc = None
        self._walk()

    def _recover(self, err: _Unreadable) -> CorruptQueueError:
        """Skip what ``err`` found unreadable (lock held, no operation in progress); the error to raise."""
        h = self._h
        h[_TX] = _TX_REPAIRING  # a death in here: the next holder walks the records again
        seq = err.seq
        base = h[_RBASE]
        if seq and not base & 7 and 0 <= h[_TAIL] - (base + _LINK_LEN) <= self._cap and 0 <= base - h[_HEAD] <= self._cap:
            # a spill chain: leave it (its records are lost), go on with the ring after its LINK
            h[_HEAD] = base + _LINK_LEN
            h[_RCUR] = 0
            self._segs.pop(seq, None)
            self._rc = None
            _shm_unlink(f"{self._prefix}{seq}")
            self._walk()
            lost = "the rest of that spill chain was dropped"
        else:
            self._drop_ring()
            lost = "the queued messages were dropped"
        h[_TX] = 0
        return self._corrupt(f"{err.args[0]}; {lost}")

    def _recover_put(self, err: _Unreadable) -> CorruptQueueError:
        """A producer found ``err`` (lock held, its put rolled back): stop appending there; the error."""
        h = self._h
        if not err.seq:
            return self._recover(err)
        seg = self._segs.get(err.seq)
        if seg is not None:
            struct.pack_into("<Q", seg, 8 * _S_SEALED, 1)  # its reader goes back to the ring
        h[_WSEG] = 0
        return self._corrupt(f"{err.args[0]}; later messages go to the ring")

    def _repair(self) -> None:
        """Make the queue whole after a holder died or was interrupted half-way (lock held).

        Rolls back the operation in progress (from the snapshot it recorded), then recounts the
        messages, finds the spill segment producers should append to, seals a spill chain that records
        in the ring follow, and puts the pool slots right: those that queued records name are queued,
        those marked queued that no record names are free.  Idempotent: a death in the middle of it
        leaves ``_TX`` set, and the next holder repairs again.
        """
        h = self._h
        if h[_CAP] != self._cap or h[_MAGIC] != _MAGIC_VALUE:
            h[_CAP], h[_MAGIC] = self._cap, _MAGIC_VALUE
        h[_TX] = h[_TX] | _TX_REPAIRING
        if _crash.on:
            _crash.hit("queue.repair.begun")
        self._rollback()
        h[_TX] = _TX_REPAIRING
        if _crash.on:
            _crash.hit("queue.repair.rolled_back")
        count = self._walk()
        if _crash.on:
            _crash.hit("queue.repair.counted")
        h[_TX] = 0
        util.debug(f"queue {self._prefix[3:-1]}: repaired after a holder died ({count} messages)")

    def _walk(self) -> int:
        """Recompute the derived state from the records (lock held); the number of messages.

        Stops at a record it cannot read (the consumer that reaches it reports it and skips it).
        """
        h = self._h
        count = 0
        pooled: set[int] = set()  # the pool slots that queued records name

        chained: set[int] = set()  # the spill segments on a chain

        def walk_chain(seq: int, pos: int) -> tuple[int, int]:
            """Count the chain's records from (seq, pos): (count, last segment's seq)."""
            n_msgs = 0
            for _ in range(1 << 20):  # bounded: a corrupted chain may loop
                try:
                    seg = self._seg(seq)
                except _Unreadable:
                    return n_msgs, 0
                chained.add(seq)
                used = struct.unpack_from("<Q", seg, 0)[0]
                if not _S_HDR <= pos <= used <= len(seg) or (pos | used) & 7:
                    return n_msgs, 0
                nxt = 0
                while pos < used:
                    n, kind = _REC.unpack_from(seg, pos)
                    if not self._record_ok(n, kind, used - pos):
                        return n_msgs, 0
                    if kind == _LINK:
                        nxt = struct.unpack_from("<Q", seg, pos + 8)[0]
                        if nxt <= seq:  # a chain only goes to newer segments: never loops
                            return n_msgs, 0
                        break
                    if kind == _POOL:
                        pooled.add(struct.unpack_from("<Q", seg, pos + 8)[0])
                    n_msgs += 1
                    pos += 8 + _pad(n)
                if not nxt:
                    return n_msgs, seq
                struct.pack_into("<Q", seg, 8 * _S_SEALED, 1)  # a LINK ends its segment
                seq, pos = nxt, _S_HDR
            return n_msgs, 0

        open_chain = 0  # the chain whose LINK is the ring's last record
        rcur = h[_RCUR]
        tail = h[_TAIL]
        if rcur:
            c, open_chain = walk_chain(rcur >> 32, rcur & 0xFFFFFFFF)
            count += c
            pos = h[_RBASE] + _LINK_LEN
        else:
            pos = h[_HEAD]
        if not 0 <= tail - pos <= self._cap or (tail | pos) & 7:
            pos = tail  # unreadable: the consumer that comes here reports it
        while pos < tail:
            if open_chain:  # a record follows the chain: it is closed
                struct.pack_into("<Q", self._seg(open_chain), 8 * _S_SEALED, 1)
                open_chain = 0
            n, kind = self._ring_read(pos)
            if not self._record_ok(n, kind, tail - pos):
                break
            if kind == _LINK:
                seq = struct.unpack_from("<Q", self._ring_payload(pos, 8))[0]
                c, open_chain = walk_chain(seq, _S_HDR)
                count += c
            else:
                if kind == _POOL:
                    pooled.add(struct.unpack_from("<Q", self._ring_payload(pos, 8))[0])
                count += 1
            pos += 8 + _pad(n)
        h[_WSEG] = open_chain if open_chain and not self._segs_sealed(open_chain) else 0
        h[_COUNT] = count
        for slot in range(_NPOOL):
            if slot in pooled:
                h[_POOL0 + slot] = _P_QUEUED  # also one a dead consumer had marked as being read
            elif h[_POOL0 + slot] == _P_QUEUED:
                h[_POOL0 + slot] = _P_FREE
        _sweep_spill_orphans(self._prefix, chained)
        util.debug(f"queue {self._h[_QID]:08x}: repaired after a holder died ({count} messages)")
        return count

    # -- pickling -------------------------------------------------------------------------------
    def _encode(self, obj: Any) -> tuple[int, Any]:
        """(kind, record payload) for ``obj``; a big message is written to its own segment here."""
        data = _fast_dumps(obj, self._big_limit)
        if data is not None:
            return _MSG, data
        return self._encode_slow(obj)

    def _encode_slow(self, obj: Any) -> tuple[int, Any]:
        """:meth:`_encode` by the package's pickler: reducers, tier 2, out-of-band buffers, big messages."""
        chunks, oob = reduction.dump_chunks(obj, OOB_MIN)
        if not oob:
            if len(chunks) == 1:
                data = chunks[0]
                if len(data) <= self._big_limit:
                    return _MSG, data
            total = sum(memoryview(c).nbytes for c in chunks)
            if total <= self._big_limit:
                return _MSG, b"".join(chunks)
            if total <= POOL_MAX:
                payload = self._write_pool(chunks, total)
                if payload is not None:
                    return _POOL, payload
        return _BIG, self._write_big(chunks, oob)

    # -- the pool of big-message segments --------------------------------------------------------
    def _write_pool(self, chunks: list[Any], total: int) -> bytes | None:
        """Claim a pool slot, write the pickle there (lock not held): the POOL record's payload, or None."""
        slot = self._pool_claim()
        if slot is None:
            return None
        try:
            seg = self._pool_map(slot, total, grow=True)
            pos = 0
            for c in chunks:
                v = memoryview(c).cast("B")
                seg[pos : pos + v.nbytes] = v
                pos += v.nbytes
            if _crash.on:
                _crash.hit("queue.pool.written")
        except BaseException:
            self._pool_release(slot)
            raise
        return struct.pack("<QQ", slot, total)

    def _pool_claim(self) -> int | None:
        """A free pool slot, marked as being written by this process; None if all are taken.

        When none is free but a consumer is reading one (it frees it in a moment), waits for up to
        POOL_WAIT: cheaper than a one-off segment.  When all are queued, nobody is reading: no wait.
        """
        h, me = self._h, os.getpid() << 8
        deadline = 0.0
        while True:
            reading = False
            claimed = -1
            try:
                self._acquire(True, None)
                slot = self._pool_find(me)
                if slot >= 0:
                    claimed = slot
                    h[_POOL0 + slot] = me | _P_WRITING
                    if _crash.on:
                        _crash.hit("queue.pool.claimed")
                    self._lock.release()
                    return slot
                reading = slot == -2
                self._lock.release()
            except BaseException:
                if claimed >= 0 and h[_POOL0 + claimed] == me | _P_WRITING:
                    h[_POOL0 + claimed] = _P_FREE
                self._unlock_if_mine()
                raise
            now = time.monotonic()
            if not deadline:
                deadline = now + POOL_WAIT
            if not reading or now > deadline:
                return None
            while now < deadline and _P_FREE not in h[_POOL0 : _POOL0 + _NPOOL]:
                time.sleep(20e-6)
                now = time.monotonic()

    def _pool_find(self, me: int) -> int:
        """A slot to claim (lock held); -2: none, but a live consumer is reading one; -1: none."""
        h = self._h
        for slot in range(_NPOOL):
            if h[_POOL0 + slot] == _P_FREE:
                return slot
        reading = False
        for slot in range(_NPOOL):  # a process died writing or reading a slot: take it back
            state = h[_POOL0 + slot]
            if state == _P_QUEUED:
                continue
            pid, what = state >> 8, state & 0xFF
            if what not in (_P_WRITING, _P_READING) or not 0 < pid < 1 << 31 or not synchronize._pid_alive(pid):
                return slot  # its holder is dead, or the word is not one gilfree writes
            reading = reading or what == _P_READING
        return -2 if reading else -1

    def _pool_publish(self, payload: Any) -> None:
        """A slot's message is about to be committed (lock held): from now on the record owns it."""
        self._h[_POOL0 + struct.unpack_from("<Q", payload)[0]] = _P_QUEUED
        if _crash.on:
            _crash.hit("queue.pool.queued")

    def _pool_release(self, slot: int) -> None:
        """The slot's owner (its writer or reader) is done with it: one store, no lock needed."""
        if 0 <= slot < _NPOOL:
            self._h[_POOL0 + slot] = _P_FREE

    def _pool_map(self, slot: int, size: int, grow: bool = False) -> mmap.mmap:
        """Pool segment ``slot`` mapped here, at least ``size`` bytes long (the writer grows it)."""
        seg = self._pool.get(slot)
        if seg is not None and len(seg) >= size:
            return seg
        name = f"{self._prefix}p{slot}"
        try:
            fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_RDWR if grow else os.O_RDWR, mode=0o600)
        except FileNotFoundError:
            raise self._corrupt(f"a message names pool slot {slot}, whose segment {name} does not exist; "
                                "the message was dropped") from None
        try:
            length = os.fstat(fd).st_size
            if length < size and grow:
                length = (size + (1 << 18) - 1) & ~((1 << 18) - 1)
                os.ftruncate(fd, length)
            new = mmap.mmap(fd, length) if length >= max(size, 1) else None
        finally:
            os.close(fd)
        if new is None:
            raise self._corrupt(f"pool segment {name} is {length} bytes long, shorter than its message of {size}; "
                                "the message was dropped")
        old = self._pool.pop(slot, None)
        if old is not None:
            try:
                old.close()
            except BufferError:
                pass
        self._pool[slot] = new
        return new

    def _write_big(self, chunks: list[Any], oob: list[Any]) -> bytes:
        views = [memoryview(c).cast("B") for c in chunks]
        bufs = [memoryview(b).cast("B") for b in oob]
        pickled = sum(v.nbytes for v in views)
        head = struct.pack(f"<{2 + len(bufs)}Q", len(bufs), pickled, *(b.nbytes for b in bufs))
        pos = (len(head) + 63) & ~63
        size = pos + pickled
        offsets = []
        for b in bufs:
            size = (size + 63) & ~63
            offsets.append(size)
            size += b.nbytes
        name = f"{self._prefix}b{os.urandom(8).hex()}"
        seg = _shm_create_owned(name, max(size, 1))
        try:
            seg[: len(head)] = head
            for v in views:
                seg[pos : pos + v.nbytes] = v
                pos += v.nbytes
            for off, b in zip(offsets, bufs):
                seg[off : off + b.nbytes] = b
            if _crash.on:
                _crash.hit("queue.big.created")
        except BaseException:
            seg.close()
            _shm_unlink_owned(name)
            raise
        seg.close()
        return name.encode("ascii")

    def _decode(self, kind: int, payload: Any) -> Any:
        if kind == _MSG:
            return _pickle_loads(payload)
        if kind == _POOL:
            slot, n = struct.unpack("<QQ", payload)
            if not 0 <= slot < _NPOOL:
                raise self._corrupt(f"a message names pool slot {slot} (there are {_NPOOL}); it was dropped")
            try:
                if n > POOL_MAX:
                    raise self._corrupt(f"a message in pool slot {slot} is {n} bytes long (at most {POOL_MAX}); "
                                        "it was dropped")
                view = memoryview(self._pool_map(slot, n))[:n]
                try:
                    return reduction.loads(view)  # no out-of-band buffer: nothing keeps the slot
                finally:
                    view.release()
                    if _crash.on:
                        _crash.hit("queue.pool.read")
            finally:
                self._pool_release(slot)
        seg = self._big_attach(payload)
        view = memoryview(seg)
        data, buffers = self._big_parts(seg, view)
        obj = reduction.loads(data, buffers=buffers)
        del data, buffers, view
        try:
            seg.close()  # nothing of it is used (no out-of-band buffer kept): unmap now
        except BufferError:
            pass  # arrays use it: it is unmapped when they are collected
        return obj

    def _big_attach(self, payload: Any) -> mmap.mmap:
        """The big message's own segment, mapped and unlinked (the mapping stays valid)."""
        name = bytes(payload).decode("ascii", "replace")
        suffix = name[len(self._prefix) + 1 :]
        if not (name.startswith(self._prefix + "b") and len(suffix) == 16 and all(c in "0123456789abcdef" for c in suffix)):
            raise self._corrupt(f"a message names segment {name!r}, which is not one of this queue's; it was dropped")
        try:
            seg = _shm_attach(name)
        except FileNotFoundError:
            raise self._corrupt(f"the segment {name} of a message is gone; the message was dropped") from None
        try:
            if _crash.on:
                _crash.hit("queue.big.attached")
        finally:
            _shm_unlink(name)  # nobody else will look for this name (the mapping stays valid)
        if _crash.on:
            _crash.hit("queue.big.unlinked")
        return seg

    def _big_parts(self, seg: mmap.mmap, view: memoryview) -> tuple[memoryview, list[memoryview]]:
        """The pickle and the out-of-band buffers in a big message's segment, bounds checked."""
        size = len(seg)
        n_bufs, pickled = struct.unpack_from("<QQ", seg, 0) if size >= 16 else (1 << 62, 0)
        pos = (16 + 8 * n_bufs + 63) & ~63
        if pos + pickled > size:
            raise self._corrupt(f"a message's segment of {size} bytes says it holds {n_bufs} buffers and a "
                                f"pickle of {pickled} bytes; the message was dropped")
        lengths = struct.unpack_from(f"<{n_bufs}Q", seg, 16)
        data = view[pos : pos + pickled]
        pos += pickled
        buffers = []
        for n in lengths:
            pos = (pos + 63) & ~63
            if pos + n > size:
                raise self._corrupt(f"a message's segment of {size} bytes has a buffer of {n} bytes at {pos}; "
                                    "the message was dropped")
            buffers.append(view[pos : pos + n])
            pos += n
        return data, buffers

    # -- the API --------------------------------------------------------------------------------
    def _check_closed(self) -> None:
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")

    if _cqueue is None:  # with the C extension, put and get are _cqueue.Core's (same docstrings)

        def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
            """Put ``obj`` in the queue, waiting (if ``block``, up to ``timeout``) while a bounded queue is full.

            ``obj`` is pickled here: an object that cannot be pickled raises ``gilfree.PicklingError`` in
            the caller and nothing is queued.  Raises ``queue.Full`` if no room was found in time.
            """
            self._put_py(obj, block, timeout)

        def get(self, block: bool = True, timeout: float | None = None) -> Any:
            """Remove and return the oldest item, waiting (if ``block``, up to ``timeout``) while the queue is empty.

            Raises ``queue.Empty`` if nothing came in time.
            """
            return self._get_py(block, timeout)

    def _put_py(self, obj: Any, block: bool = True, timeout: float | None = None, _pickled: Any = _MISS) -> None:
        """put() but its common case (``Core.put``: plain objects, free lock, room in the ring).

        ``_pickled``: what that common case left: MISS (nothing), None (needs the package's pickler) or
        the pickle, not queued (the lock was busy, the ring full, or it mentions ``__main__``).
        """
        if self._closed:
            self._check_closed()
        try:
            if _pickled is _MISS:  # not a plain object (or reducers changed): the checks of _fast_dumps
                data = _fast_dumps(obj, self._big_limit)
            elif _pickled is None:
                data = None
            else:
                data = _pickled if _pickled.find(b"__main__") < 0 or not _main_unimportable() else None
            records = [(_MSG, data) if data is not None else self._encode_slow(obj)]
        except Exception as e:
            # the stdlib's hook for an object its feeder thread could not pickle: a subclass that
            # overrides it decides (here, in the caller); otherwise the error is the caller's
            if type(self)._on_queue_feeder_error is _QueueBase._on_queue_feeder_error:
                raise
            # the hook gets what pickling raised, as the stdlib's feeder passes it (gilfree's
            # PicklingError says where in the object; its cause is the original)
            cause = e.__cause__
            self._on_queue_feeder_error(cause if isinstance(e, reduction.PicklingError)
                                        and isinstance(cause, Exception) else e, obj)
            return
        try:
            self._put_records(records, block, timeout)
        except BaseException:
            self._discard(records)
            raise

    @staticmethod
    def _on_queue_feeder_error(e: BaseException, obj: Any) -> None:
        """The stdlib's hook for an object that could not be pickled.  gilfree pickles in ``put``
        and raises there; a subclass that overrides this hook gets the call instead (in the caller,
        with the exception and the object) and ``put`` returns, nothing queued."""
        raise e

    def put_many(self, items: Iterable[Any], block: bool = True, timeout: float | None = None) -> None:
        """Put every item of ``items``, in order, with one round of locking: all of them or none.

        All items are pickled before any is queued.  A bounded queue must have room for all of them
        (``ValueError`` if there are more items than ``maxsize``).  All or none also when this process
        dies or is interrupted half-way: the batch is one operation, which the next holder of the queue
        lock rolls back if it was not finished.
        """
        self._check_closed()
        records: list[Any] = []
        try:
            records = self._encode_many(items)
            if self._maxsize and len(records) > self._maxsize:
                raise ValueError(f"put_many of {len(records)} items into a queue of maxsize {self._maxsize}")
            if records:
                self._put_records(records, block, timeout)
        except BaseException:
            self._discard(records)
            raise

    def _encode_many(self, items: Iterable[Any]) -> list[Any]:
        """The records of ``items``: a list of pickled messages (bytes, kind MSG) or (kind, payload)."""
        items = items if type(items) is list else list(items)
        if not _fast_dumps_ok():
            return [self._encode_slow(obj) for obj in items]
        if self._fast:
            sink = _Sink()
            pickler = _Pickler(sink, 5)
            datas, main, missing = _cqueue.dumps_batch(
                items, pickler.dump, pickler.clear_memo, sink.chunks, self._big_limit
            )
        else:
            datas = [_fast_dumps(obj, self._big_limit, False) for obj in items]
            main, missing = True, None in datas
        if main and _main_unimportable():
            datas = [d if d is None or d.find(b"__main__") < 0 else None for d in datas]
            missing = None in datas
        if missing:  # failed (the slow path explains, or pickles by value), or big
            return [d if d is not None else self._encode_slow(obj) for d, obj in zip(datas, items)]
        return datas

    def _discard(self, records: list[Any]) -> None:
        """Give back what records that will not be queued hold outside the ring (segments, pool slots)."""
        for rec in records:
            if type(rec) is tuple:
                kind, data = rec
                if kind == _BIG:
                    _shm_unlink_owned(bytes(data).decode("ascii"))
                elif kind == _POOL:
                    self._pool_release(struct.unpack("<QQ", data)[0])

    def _put_records(self, records: list[Any], block: bool, timeout: float | None) -> None:
        """Append ``records`` as one operation: all of them or, after an exception or a death, none.

        On success ``records`` is emptied (the queue owns what they hold); after an exception it holds
        what the caller must give back (:meth:`_discard`).
        """
        deadline = None
        if block and timeout is not None:
            if timeout <= 0:  # as the stdlib: a negative timeout waits no more than 0
                block = False
            else:
                deadline = time.monotonic() + timeout
        h = self._h
        n = len(records)
        while True:
            stage = 0  # 1: the operation was begun, 2: committed (no bytecode that checks signals between)
            try:
                if not self._acquire(block, deadline):
                    raise Full
                if _crash.on:
                    _crash.hit("queue.put.locked")
                if not self._maxsize or h[_COUNT] + n <= self._maxsize:
                    stage = 1
                    r = _cqueue.tx_begin(self._buf, self._base, _TX_PUT, self._wc, self._cap) if self._fast else 0
                    if r != 1:
                        if r == 2:  # magic or size overwritten
                            self._repair()
                        self._tx_put_begin()
                    slow, i = 0, 0
                    while i < n:  # the C path counts and wakes for its own records
                        if self._fast:
                            i = _cqueue.put_batch(self._buf, self._base, records, i, self._wc)
                            if i == n:
                                break
                        rec = records[i]
                        kind, data = (_MSG, rec) if type(rec) is bytes else rec
                        if kind == _POOL:
                            self._pool_publish(data)
                        elif kind == _BIG:  # from now on the queue owns it, not this process
                            _tracker.give("/" + bytes(data).decode("ascii"))
                        self._append(kind, data)
                        slow += 1
                        i += 1
                        if _crash.on and i < n:
                            _crash.hit("queue.put_many.partial")
                    h[_TX] = 0  # the commit of the whole operation
                    stage = 2
                    if _crash.on:
                        _crash.hit("queue.put.committed")
                    if slow:
                        self._wake(_NE)
                    self._lock.release()
                    records.clear()
                    return
                seen = self._w[_NF]
                self._lock.release()
            except BaseException as e:
                err = self._abort_put(records, stage, e if isinstance(e, _Unreadable) else None)
                if err is not None:
                    raise err from None
                raise
            if not block or not self._sleep(_NF, seen, deadline):
                raise Full

    def _abort_put(self, records: list[Any], stage: int, err: _Unreadable | None) -> CorruptQueueError | None:
        """After an exception in :meth:`_put_records` at ``stage``: roll back (unless committed), unlock."""
        lock = self._lock
        out = None
        if lock._is_mine():
            h = self._h
            try:
                if stage == 1 and h[_TX] == _TX_PUT:
                    self._rollback()
                    writing = (os.getpid() << 8) | _P_WRITING
                    for rec in records:  # their slots are still ours: the caller gives them back
                        if type(rec) is tuple and rec[0] == _POOL:
                            slot = struct.unpack_from("<Q", rec[1])[0]
                            if h[_POOL0 + slot] == _P_QUEUED:
                                h[_POOL0 + slot] = writing
                    h[_TX] = 0
                if err is not None:
                    out = self._recover_put(err)
            finally:
                lock.release()
        elif err is not None:
            out = self._corrupt(str(err))
        if stage == 2:
            records.clear()  # queued: nothing to give back
        return out

    def _get_py(self, block: bool = True, timeout: float | None = None) -> Any:
        """get() but its common case (``Core.get``: a small message at the head, the lock free)."""
        if self._closed:
            self._check_closed()
        if self._deferred:
            raise self._pop_deferred()
        rec = self._get_records(1, block, timeout)[0]
        return _pickle_loads(rec) if type(rec) is bytes else self._decode(rec[0], rec[1])

    def get_many(self, max_items: int = 1000, timeout: float | None = None, *, block: bool = True) -> list[Any]:
        """Remove and return up to ``max_items`` items (at least one) with one round of locking.

        Waits like :meth:`get` for the first item; raises ``queue.Empty`` if none came in time.  An item
        that fails to unpickle costs only itself, as with :meth:`get`: the others are returned (in
        order), and its error is raised by the next ``get`` or ``get_many`` of this queue object in this
        process (at once, if no item of the batch unpickled).
        """
        self._check_closed()
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        if self._deferred:
            raise self._pop_deferred()
        records = self._get_records(max_items, block, timeout)
        loads, decode = _pickle_loads, self._decode_record
        failed: list[BaseException] = []
        try:
            if self._fast:
                items = _cqueue.loads_all(records, loads, decode, failed, _FAILED)
            else:
                items = []
                for r in records:
                    try:
                        items.append(loads(r) if type(r) is bytes else decode(r))
                    except Exception as e:
                        items.append(_FAILED)
                        failed.append(e)
        except BaseException:  # interrupted: the batch is lost, give back what its records hold
            for r in records:
                if type(r) is list and r[2]:
                    self._abandon(r[0], r[1])
            raise
        if failed:
            items = [x for x in items if x is not _FAILED]
            self._deferred = (self._deferred or []) + failed
            if not items:
                raise self._pop_deferred()
        return items  # type: ignore[no-any-return]

    def _pop_deferred(self) -> BaseException:
        errors = self._deferred
        assert errors is not None
        exc = errors.pop(0)
        if not errors:
            self._deferred = None
        return exc  # type: ignore[no-any-return]

    def _decode_record(self, record: list[Any]) -> Any:
        record[2] = False  # [kind, payload, pending]: _decode gives back what it holds, whatever happens
        return self._decode(record[0], record[1])

    def _abandon(self, kind: int, payload: Any) -> None:
        """Give back what a consumed record that will not be decoded holds (its segment or pool slot)."""
        try:
            if kind == _BIG:
                self._big_attach(payload).close()
            elif kind == _POOL:
                self._pool_release(struct.unpack_from("<Q", payload)[0])
        except CorruptQueueError:
            pass

    def _get_records(self, max_items: int, block: bool, timeout: float | None) -> list[Any]:
        """Consume up to ``max_items`` records: pickled messages (bytes) or [kind, payload, True] lists."""
        deadline = None
        if block and timeout is not None:
            if timeout <= 0:  # as the stdlib: a negative timeout waits no more than 0
                block = False
            else:
                deadline = time.monotonic() + timeout
        h = self._h
        while True:
            out: list[Any] = []
            drops: list[int] = []
            stage = 0  # 1: the operation was begun, 2: committed
            try:
                if not self._acquire(block, deadline):
                    raise Empty
                if _crash.on:
                    _crash.hit("queue.get.locked")
                stage = 1
                r = _cqueue.tx_begin(self._buf, self._base, _TX_GET, None, self._cap) if self._fast else 0
                if r != 1:
                    if r == 2:  # magic or size overwritten
                        self._repair()
                    self._tx_get_begin()
                fast, take = self._fast, self._take
                while True:  # the C path takes small messages; the Python path the rest, one at a time
                    if fast:
                        out += _cqueue.take_small(self._buf, self._base, max_items - len(out), self._rc)
                    if len(out) >= max_items:
                        break
                    try:
                        rec = take(drops)
                    except _Unreadable:
                        if out:  # those before it are good: the next call reports it
                            break
                        raise
                    if rec is None:
                        break
                    out.append(rec[1] if rec[0] == _MSG else [rec[0], rec[1], True])
                    if _crash.on and len(out) < max_items:
                        _crash.hit("queue.get_many.partial")
                h[_TX] = 0  # the commit of the whole operation
                stage = 2
                if _crash.on:
                    _crash.hit("queue.get.committed")
                if out and self._maxsize:
                    self._wake(_NF)
                seen = self._w[_NE]
                self._lock.release()
            except BaseException as e:
                err = self._abort_get(out, drops, stage, e if isinstance(e, _Unreadable) else None)
                if err is not None:
                    raise err from None
                raise
            try:
                for seq in drops:  # spill segments read to the end: nobody needs them (the get is committed)
                    self._drop_seg(seq)
                    if _crash.on:
                        _crash.hit("queue.spill.unlinked")
                if out:
                    if _crash.on:
                        _crash.hit("queue.get.unlocked")
                    return out
            except BaseException:  # taken, and lost with this exception: give back what they hold
                for r in out:
                    if type(r) is list and r[2]:
                        self._abandon(r[0], r[1])
                raise
            if not block or not self._sleep(_NE, seen, deadline):
                raise Empty

    def _abort_get(self, out: list[Any], drops: list[int], stage: int, err: _Unreadable | None) -> CorruptQueueError | None:
        """After an exception in :meth:`_get_records` at ``stage``: put the records back if it can, unlock."""
        lock = self._lock
        exc = None
        if lock._is_mine():
            h = self._h
            try:
                if stage == 1 and h[_TX] == _TX_GET and err is None:
                    self._rollback()  # nothing was taken: every record is in the queue again
                    self._walk()  # and the pool slots they name are queued again
                    h[_TX] = 0
                    out, drops = [], []
                elif err is not None:  # nothing taken (out is empty): skip what cannot be read
                    exc = self._recover(err)
                    drops = []
                elif stage == 1 and h[_TX] == 0:  # interrupted before it began: nothing taken
                    out, drops = [], []
            finally:
                lock.release()
        elif err is not None:
            exc = self._corrupt(str(err))
        for seq in drops:
            self._drop_seg(seq)
        for r in out:  # taken, and lost with this exception: give back what they hold
            if type(r) is list and r[2]:
                self._abandon(r[0], r[1])
        return exc

    def _drop_seg(self, seq: int) -> None:
        self._segs.pop(seq, None)
        if self._rc is not None and self._rc[0] == seq:
            self._rc = None
        _shm_unlink(f"{self._prefix}{seq}")

    def _settle(self) -> None:
        """Wait (up to a second) for the operation in progress; roll it back if its holder died."""
        try:
            if self._acquire(True, time.monotonic() + 1.0):
                self._lock.release()
        except BaseException:
            self._unlock_if_mine()
            raise

    def put_nowait(self, obj: Any) -> None:
        """``put(obj, False)``."""
        return self.put(obj, False)

    def get_nowait(self) -> Any:
        """``get(False)``."""
        return self.get(False)

    def qsize(self) -> int:
        """The number of items in the queue (exact: put and get update it under the lock).

        While an operation is in progress, waits for it to end (microseconds; up to 0.1 s if its
        process died, which then is rolled back), so the count is right after a death too.
        """
        h = self._h
        if h[_TX]:
            self._settle()
        return h[_COUNT]

    def empty(self) -> bool:
        """Whether the queue holds no item (at this instant)."""
        return self.qsize() == 0

    def full(self) -> bool:
        """Whether a bounded queue holds ``maxsize`` items (at this instant)."""
        return bool(self._maxsize) and self.qsize() >= self._maxsize

    def close(self) -> None:
        """This process will not use the queue any more (put and get raise ValueError afterwards).

        Queued data stays for the other processes; there is no feeder thread to flush.
        """
        self._closed = True

    def join_thread(self) -> None:
        """Kept for compatibility (no feeder thread: nothing to wait for).  Call after :meth:`close`."""
        assert self._closed, f"Queue {self!r} not closed"

    def cancel_join_thread(self) -> None:
        """Kept for compatibility: a process never waits at exit for its queued data, which is in shared memory."""


class Queue(_QueueBase):
    """A FIFO queue between processes and threads (``multiprocessing.Queue``'s API and semantics).

    ``maxsize`` > 0 bounds the number of items; 0 means unbounded (items that do not fit in the ring
    spill into shared-memory segments).  Differences from the stdlib, all on purpose: ``put`` pickles in
    the caller (errors raise there); there is no feeder thread, so ``qsize``/``empty`` are exact right
    after a ``put`` and a process that put items can be joined before anybody reads them; ``put_many``
    and ``get_many`` move batches with one round of locking.
    """

    def __init__(self, maxsize: int = 0, *, ctx: Any = None, ring_size: int = RING_SIZE) -> None:
        super().__init__(maxsize, ctx=ctx, ring_size=ring_size)


class JoinableQueue(_QueueBase):
    """A :class:`Queue` whose items are counted until :meth:`task_done` (``multiprocessing.JoinableQueue``)."""

    _joinable = True

    def __init__(self, maxsize: int = 0, *, ctx: Any = None, ring_size: int = RING_SIZE) -> None:
        super().__init__(maxsize, ctx=ctx, ring_size=ring_size)

    def task_done(self) -> None:
        """One item obtained with ``get`` has been processed.  Raises ValueError if there is none left.

        The unfinished count is raised by ``put`` in the same operation that queues the item (rolled
        back with it), so a death anywhere never makes :meth:`join` return early or this raise falsely.
        """
        h = self._h
        try:
            self._acquire(True, None)
            if _crash.on:
                _crash.hit("queue.task_done.locked")
            if h[_UNFINISHED] == 0:
                raise ValueError("task_done() called too many times")
            h[_UNFINISHED] -= 1  # one store: done or not
            if _crash.on:
                _crash.hit("queue.task_done.lowered")
            if h[_UNFINISHED] == 0:
                self._wake(_DONE)
            self._lock.release()
        except BaseException:
            self._unlock_if_mine()
            raise

    def join(self) -> None:
        """Wait until every item put has been processed (``task_done`` called for it)."""
        while True:
            try:
                self._acquire(True, None)
                if _crash.on:
                    _crash.hit("queue.join.locked")
                done = self._h[_UNFINISHED] == 0
                seen = self._w[_DONE]
                self._lock.release()
            except BaseException:
                self._unlock_if_mine()
                raise
            if done:
                return
            self._sleep(_DONE, seen, None)


class SimpleQueue(_QueueBase):
    """An unbounded queue with put, get, empty and close (``multiprocessing.SimpleQueue``)."""

    def __init__(self, *, ctx: Any = None, ring_size: int = RING_SIZE) -> None:
        super().__init__(0, ctx=ctx, ring_size=ring_size)

    def get(self) -> Any:  # type: ignore[override]
        """Remove and return the oldest item, waiting while the queue is empty."""
        return super().get()

    def _check_closed(self) -> None:
        if self._closed:  # as the stdlib's, whose pipe is closed
            raise OSError("handle is closed")

    def empty(self) -> bool:
        """Whether the queue holds no item (at this instant)."""
        self._check_closed()
        return super().empty()

    def put(self, obj: Any) -> None:  # type: ignore[override]
        """Put ``obj`` in the queue (pickled here: errors raise in the caller)."""
        super().put(obj)
