"""Hostile bytes in a queue's shared memory (issue 11, item 7): never a crash, never a read outside.

Shared memory is written by other processes; a reader must survive anything in it.  A child process
(so that a segfault or an abort is a failed test, not a dead test run) runs rounds, each with its own
seeded random generator: it fills a queue with a 4 KiB ring so that records sit in the ring, in
spill segments and in the pool of big-message segments; writes random and adversarial values (0, 1,
-1, 2**31, 2**63, the ring's size, off-by-8...) into header words, record headers (length, kind),
spill segment headers and records, pool slot words and pool records; then reads and writes until
the queue runs dry, with bounded waits.  What it may see: ``queue.Empty``/``Full``,
``CorruptQueueError`` naming the queue, and items.  Anything else -- struct.error, IndexError,
MemoryError, SystemError, OverflowError, a lock left held, a hang -- fails.  The items are not
checked against those put: with a position or a slot word overwritten (a head moved back, a used
count moved back, a queued pool slot marked free), records are read twice or written over, and
without a checksum per record (not worth its cost on every message) no reader can tell.

Garbage that reaches the unpickler would test pickle, not the queue (and pickle is not safe on
garbage: random bytes can build objects that crash the interpreter).  So the child unpickles with a
loader that first checks, with :mod:`pickletools` and without running anything, that the bytes are a
data-only pickle (the opcodes of tuples, ints, strings, bytes, out-of-band buffers) and raises
``_Garbage`` otherwise; the C fast path's own unpickler (``get()`` of a small message) is not used.

Rounds: ROUNDS per seed, time-bounded (the child stops starting rounds after BUDGET seconds, and at
least MIN_ROUNDS must have run).
"""

from __future__ import annotations

import gc
import os
import pickle
import pickletools
import queue
import random
import struct
import sys
import time

import pytest

import gilfree
from gilfree import queues, reduction

pytestmark = pytest.mark.timeout(120)

ROUNDS = 400
MIN_ROUNDS = 50
BUDGET = 10.0
_SAFE_OPS = {
    "PROTO", "FRAME", "STOP", "MARK", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE", "NONE",
    "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "SHORT_BINUNICODE",
    "BINUNICODE", "BINUNICODE8", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "MEMOIZE", "BINPUT",
    "LONG_BINPUT", "BINGET", "LONG_BINGET", "NEXT_BUFFER", "READONLY_BUFFER",
}


class _Garbage(Exception):
    pass


def _safe_loads(data, buffers=None):
    b = bytes(data)
    try:
        for op, _, _ in pickletools.genops(b):
            if op.name not in _SAFE_OPS:
                raise _Garbage(op.name)
        return pickle.loads(b, buffers=buffers)
    except _Garbage:
        raise
    except Exception as e:  # malformed: the queue handed over bytes that are not one message
        raise _Garbage(repr(e)) from None


ADVERSARIAL64 = [0, 1, 7, 8, 16, 63, 64, 4095, 4096, 4104, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 62,
                 (1 << 63), (1 << 64) - 1, (1 << 64) - 8]


def _value(rng, bits):
    if rng.random() < 0.6:
        v = rng.choice(ADVERSARIAL64)
        if rng.random() < 0.3:
            v += rng.choice([-8, -1, 1, 8])
        return v % (1 << bits)
    return rng.getrandbits(bits)


def _records(buf, pos, end, mask=None):
    """Positions of the record headers from pos to end (a ring with ``mask``, or a flat segment)."""
    out = []
    while pos < end and len(out) < 10_000:
        off = pos & mask if mask is not None else pos
        n, kind = struct.unpack_from("<II", buf, off)
        out.append((off, kind))
        if kind == queues._LINK:
            break
        pos += 8 + ((n + 7) & ~7)
    return out


def _round(seed):
    rng = random.Random(seed)
    q = gilfree.Queue(ring_size=4096)
    items = set()
    n = 0

    def put(obj):
        nonlocal n
        q.put(obj)
        items.add(queues._pickle_dumps(obj, 5) if not isinstance(obj, bytes) else obj)
        n += 1

    for i in range(rng.randrange(5, 120)):
        r = rng.random()
        if r < 0.1:
            put(bytes([i % 251]) * rng.randrange(600, 3000))  # a pool message (ring/8 = 512 bytes)
        elif r < 0.15:
            put(("L", i, "z" * rng.randrange(100, 400)))
        else:
            put(("m", i, "y" * rng.randrange(0, 60)))
        if rng.random() < 0.1:
            q.get_many(rng.randrange(1, 5), timeout=1)
    h = q._h
    for _ in range(rng.randrange(1, 4)):
        target = rng.randrange(7)
        if target == 0:  # a header word
            word = rng.choice([queues._HEAD, queues._TAIL, queues._COUNT, queues._WSEG, queues._RCUR,
                               queues._RBASE, queues._NEXT_SEQ, queues._CAP, queues._MAGIC, queues._TX,
                               *range(queues._TX_TAIL, queues._TX_RBASE + 1)])
            h[word] = _value(rng, 64)
        elif target == 1:  # a record header in the ring
            recs = _records(q._ring, h[queues._HEAD], h[queues._TAIL], q._mask)
            if recs:
                off, _ = rng.choice(recs)
                struct.pack_into("<I", q._ring, off + 4 * rng.randrange(2), _value(rng, 32))
        elif target == 2:  # random bytes anywhere in the ring
            off = rng.randrange(q._cap - 16)
            k = rng.randrange(1, 16)
            q._ring[off : off + k] = rng.randbytes(k)
        elif target == 3 and q._segs:  # a spill segment's header
            seg = rng.choice(list(q._segs.values()))
            struct.pack_into("<Q", seg, 8 * rng.randrange(2), _value(rng, 64))
        elif target == 4 and q._segs:  # a record header in a spill segment
            seg = rng.choice(list(q._segs.values()))
            used = struct.unpack_from("<Q", seg, 0)[0]
            recs = _records(seg, queues._S_HDR, min(used, len(seg)))
            if recs:
                off, _ = rng.choice(recs)
                struct.pack_into("<I", seg, off + 4 * rng.randrange(2), _value(rng, 32))
        elif target == 5:  # a pool slot word
            h[queues._POOL0 + rng.randrange(queues._NPOOL)] = _value(rng, 64)
        else:  # a POOL record's payload (slot, length)
            recs = [off for off, kind in _records(q._ring, h[queues._HEAD], h[queues._TAIL], q._mask)
                    if kind == queues._POOL]
            if recs:
                off = rng.choice(recs)
                struct.pack_into("<Q", q._ring, (off + 8 + 8 * rng.randrange(2)) & q._mask, _value(rng, 64))
    seen = []
    corrupt = empties = 0
    for step in range(400):
        try:
            if step % 7 == 3:
                q.put(("after", step))
                items.add(queues._pickle_dumps(("after", step), 5))
            elif step % 5 == 4:
                seen.append(q._get_py(True, 0.01))
            else:
                seen += q.get_many(rng.randrange(1, 50), timeout=0.01)
        except queue.Empty:
            empties += 1
            if empties >= 3:
                break
        except (queue.Full, _Garbage):
            pass
        except queues.CorruptQueueError as e:
            assert q._prefix[3:-1] in str(e), f"the error does not name the queue: {e}"
            corrupt += 1
    data = (bytes, tuple, str, int, float, bool, type(None))  # what a data-only pickle builds
    assert all(type(obj) in data for obj in seen), [type(obj) for obj in seen]
    assert not q._lock._is_mine(), "the queue lock stays held by this thread"
    assert q._lock.acquire(True, 1.0), "the queue lock stays held"
    q._lock.release()
    q.close()
    return corrupt


def _fuzz(seed0, out_path):
    queues._pickle_loads = _safe_loads
    reduction.loads = _safe_loads
    start = time.monotonic()
    done = corrupt = 0
    with open(out_path, "w") as out:
        for r in range(ROUNDS):
            if time.monotonic() - start > BUDGET:
                break
            out.write(f"round {r} seed {seed0 + r}\n")
            out.flush()
            corrupt += _round(seed0 + r)
            done += 1
            gc.collect()  # the queue (kept by its errors' tracebacks): its segments are removed now
        out.write(f"done {done} corrupt {corrupt}\n")
    os._exit(0)


@pytest.mark.parametrize("seed0", [11_000, 29_000])
def test_hostile_bytes_never_crash_the_reader(tmp_path, seed0):
    out = tmp_path / "rounds.txt"
    ctx = gilfree.get_context("fork")
    p = ctx.Process(target=_fuzz, args=(seed0, str(out)))
    p.start()
    p.join(BUDGET + 60)
    if p.exitcode is None:
        p.kill()
        p.join(5)
    log = out.read_text() if out.exists() else ""
    last = log.strip().splitlines()[-1:] or ["(nothing)"]
    assert p.exitcode == 0, f"fuzz child ended with exit code {p.exitcode}; last line: {last[0]}"
    done, corrupt = (int(x) for x in last[0].split()[1::2])
    assert done >= MIN_ROUNDS, log[-500:]
    assert corrupt > 0  # the rounds did find corruption to report
    print(f"{done} rounds, {corrupt} CorruptQueueError", file=sys.stderr)
