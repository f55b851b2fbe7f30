/*
 * gilfree._cqueue: the hot path of gilfree.queues (layer L5, C), and futex waits on its words.
 *
 * The queue's layout, its protocol and its crash-safety argument are in the docstring of
 * src/gilfree/queues.py; this file implements the common case of that protocol and nothing else.
 * `spill` is the caller's cached (seq, mapping) of a spill segment, or None: a record goes to / comes
 * from a spill segment here only if it is the one the header names.
 *
 *   Core.put(obj, block, timeout)          (Core is the C base class of the queues, holding the header,
 *                                          the lock and the spill caches.)  For a plain object
 *                                          (tuple, int, str, float, bool, None, complex): pickle it;
 *                                          take the queue lock if it is free or frees up within ~100
 *                                          polls (gilfree._csync's capsule _C_API); if producers
 *                                          append to the ring, or to the open spill segment that
 *                                          `spill` maps, the record fits, and a bounded queue has
 *                                          room: write [len|MSG|data], publish it with one store
 *                                          (tail, or the segment's `used`), count it, wake "not empty"
 *                                          sleepers if one announced itself; unlock.  Anything else:
 *                                          the Python method _put_py, given what was done.
 *   put_batch(buf, base, list, i, spill)   the same for list[i:], the caller holding the lock; one
 *                                          wake-up; returns the index of the first record left over.
 *   Core.get(block, timeout)               take the lock as put does; consume the MSG record at the
 *                                          head (one store of head, or of the read cursor rcur in a
 *                                          spill segment); unlock; unpickle it.  Anything else: _get_py.
 *   take_small(buf, base, max, spill)      the caller holds the lock: consume up to `max` MSG records;
 *                                          stop at anything else (a LINK, a big or pool message, the
 *                                          end of a spill segment).  Returns a list of payloads.
 *   dumps_batch(list, dump, clear, ...)    pickle a put_many batch with one Pickler (no lock).
 *   wait(buf, off, seen, timeout)          poll the sequence word at `off` for up to 20 us (several
 *                                          CPUs), then set the sleeper flag next to it and sleep in
 *                                          FUTEX_WAIT while it still reads `seen` (GIL released).
 *   wake(buf, off)                         bump the sequence; FUTEX_WAKE all only if the flag was set.
 *
 * Core.put and Core.get make their change one operation as queues.py does (a snapshot in header
 * words 32-42, _TX set, the change, _TX = 0), and leave to the Python path a header whose _TX is set
 * (an operation left half-done: Python repairs it) or whose magic or size is not what it was.  Every
 * step is a crash point (GF_CRASH_POINT, gilfree/_crash.h) with the same name as in queues.py.  Every
 * position, length and kind read from shared memory is checked before use; what fails a check is
 * left to the Python path, which reports it (queues.CorruptQueueError).
 *
 * Where this runs: any thread of any process that maps the queue.  Only wait() blocks.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "_crash.h"
#include <structmember.h>
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* header words: keep in step with queues.py */
enum { H_MAGIC, H_CAP, H_HEAD, H_TAIL, H_COUNT, H_WSEG, H_RCUR, H_RBASE, H_NEXT_SEQ, H_MAXSIZE,
       H_UNFINISHED, H_QID, H_FLAGS };
/* the operation in progress and its snapshot (u64 words 32-42; see queues.py: rolled back by the next
   holder if this one dies half-way) */
enum { H_TX = 32, H_TX_TAIL, H_TX_WSEG, H_TX_WUSED, H_TX_WSEALED, H_TX_COUNT, H_TX_UNF, H_TX_NEXT, H_TX_HEAD,
       H_TX_RCUR, H_TX_RBASE };
#define TX_PUT 1u
#define TX_GET 2u
#define HDR 384 /* header bytes before the ring: keep in step with queues.py */
#define F_JOINABLE 1u
#define NE_WORD 26 /* u32 index of the "not empty" sequence; its flag follows */
#define NF_WORD 28
#define K_MSG 1u
#define LINK_LEN 16
#define S_HDR 64 /* spill segment header: u64 used, u64 sealed */
#define S_USED 0
#define S_SEALED 1
#define MAGIC 0x6766517565756533ULL

/* How long wait() polls before it sleeps: 0 on a single CPU (the waker cannot run meanwhile). */
static long long spin_ns = 0;
#define SPIN_NS 20000
#define LOCK_SPIN 100 /* polls of a taken queue lock before put/get leave it to the Python path */

static inline void
cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static long long
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline uint64_t
pad8(uint64_t n)
{
    return (n + 7) & ~(uint64_t)7;
}

static void
do_wake(uint32_t *seq)
{
    __atomic_add_fetch(seq, 1, __ATOMIC_SEQ_CST);
    /* a load first: most calls find no sleeper, and then need no second locked instruction */
    if (__atomic_load_n(seq + 1, __ATOMIC_SEQ_CST) && __atomic_exchange_n(seq + 1, 0, __ATOMIC_SEQ_CST))
        syscall(SYS_futex, seq, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* The queue header inside `obj` (a writable buffer) at `base`; NULL with an exception set. */
static uint64_t *
header(PyObject *obj, Py_ssize_t base, Py_buffer *view)
{
    uint64_t *h;
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) < 0)
        return NULL;
    if (base < 0 || base % 8 || base + HDR > view->len) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "queue header out of the buffer");
        return NULL;
    }
    h = (uint64_t *)((char *)view->buf + base);
    if (h[H_MAGIC] != MAGIC || h[H_CAP] < 4096 || (h[H_CAP] & (h[H_CAP] - 1)) != 0 ||
        h[H_CAP] > (uint64_t)(view->len - base - HDR)) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "no queue header at this offset");
        return NULL;
    }
    return h;
}

/* The spill segment in `cache` (a tuple (seq, buffer) or None) if it is spill segment `seq`: its
   bytes in `sv` (to release), NULL (no exception) otherwise. */
static unsigned char *
spill(PyObject *cache, uint64_t seq, Py_buffer *sv)
{
    PyObject *num;
    unsigned long long cached;
    if (seq == 0 || cache == NULL || !PyTuple_Check(cache) || PyTuple_GET_SIZE(cache) != 2)
        return NULL;
    num = PyTuple_GET_ITEM(cache, 0);
    cached = PyLong_AsUnsignedLongLong(num);
    if (cached == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return NULL;
    }
    if (cached != seq)
        return NULL;
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(cache, 1), sv, PyBUF_WRITABLE) < 0) {
        PyErr_Clear();
        return NULL;
    }
    if (sv->len < S_HDR + LINK_LEN) {
        PyBuffer_Release(sv);
        return NULL;
    }
    return (unsigned char *)sv->buf;
}

/* Append one MSG record of `n` bytes and publish it with one store (lock held); count it.  0 (nothing
   changed) where the Python path must do it: the ring is full, the open spill chain must be closed
   or continued in a new segment, or `seg` is not the segment producers write to. */
static int
append_one(uint64_t *h, const char *data, uint64_t n, unsigned char *seg, Py_ssize_t seglen)
{
    uint64_t cap = h[H_CAP], mask = cap - 1, head, tail, size, off, start, first;
    unsigned char *ring = (unsigned char *)h + HDR;
    uint32_t rec[2];
    if (n > UINT32_MAX)
        return 0;
    size = 8 + pad8(n);
    head = __atomic_load_n(&h[H_HEAD], __ATOMIC_ACQUIRE);
    tail = h[H_TAIL];
    rec[0] = (uint32_t)n;
    rec[1] = K_MSG;
    if (tail - head > cap || ((head | tail) & 7) != 0) /* unreadable positions: the Python path reports them */
        return 0;
    if (h[H_WSEG] != 0) {
        uint64_t *sh = (uint64_t *)seg, used;
        if (seg == NULL || sh[S_SEALED] != 0 || tail - head + size + LINK_LEN <= cap / 2)
            return 0;
        used = sh[S_USED];
        if (used < S_HDR || (used & 7) != 0 || used > (uint64_t)seglen || size + LINK_LEN > (uint64_t)seglen - used)
            return 0;
        memcpy(seg + used, rec, 8);
        memcpy(seg + used + 8, data, n);
        GF_CRASH_POINT("queue.spill.written");
        __atomic_store_n(&sh[S_USED], used + size, __ATOMIC_RELEASE); /* commit */
        GF_CRASH_POINT("queue.spill.published");
    }
    else {
        if (tail - head + size + LINK_LEN > cap)
            return 0;
        off = tail & mask;
        memcpy(ring + off, rec, 8);
        start = (off + 8) & mask;
        first = cap - start;
        if (n <= first) {
            memcpy(ring + start, data, n);
        }
        else {
            memcpy(ring + start, data, first);
            memcpy(ring, data + first, n - first);
        }
        GF_CRASH_POINT("queue.put.written");
        __atomic_store_n(&h[H_TAIL], tail + size, __ATOMIC_RELEASE); /* commit */
        GF_CRASH_POINT("queue.put.published");
    }
    h[H_COUNT] += 1;
    if (h[H_FLAGS] & F_JOINABLE)
        h[H_UNFINISHED] += 1;
    GF_CRASH_POINT("queue.put.counted");
    return 1;
}

static int
parse_base(PyObject *const *args, Py_buffer *view, uint64_t **h)
{
    Py_ssize_t base = PyLong_AsSsize_t(args[1]);
    if (base == -1 && PyErr_Occurred())
        return -1;
    if ((*h = header(args[0], base, view)) == NULL)
        return -1;
    return 0;
}

static PyObject *
put_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view, sv;
    uint64_t *h, maxsize;
    unsigned char *seg = NULL;
    Py_ssize_t i, n, start, seglen = 0;
    PyObject *items;
    if (nargs != 5 || !PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "put_batch(buffer, base, list_of_bytes, start, spill)");
        return NULL;
    }
    items = args[2];
    start = PyLong_AsSsize_t(args[3]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    if (parse_base(args, &view, &h) < 0)
        return NULL;
    maxsize = h[H_MAXSIZE];
    n = PyList_GET_SIZE(items);
    if (h[H_WSEG] != 0 && (seg = spill(args[4], h[H_WSEG], &sv)) != NULL)
        seglen = sv.len;
    for (i = start < 0 ? 0 : start; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(items, i);
        if (!PyBytes_Check(item) || (maxsize && h[H_COUNT] >= maxsize))
            break;
        if (!append_one(h, PyBytes_AS_STRING(item), (uint64_t)PyBytes_GET_SIZE(item), seg, seglen))
            break;
        if (i + 1 < n)
            GF_CRASH_POINT("queue.put_many.partial");
    }
    if (seg != NULL)
        PyBuffer_Release(&sv);
    if (i > start)
        do_wake((uint32_t *)h + NE_WORD);
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(i);
}

/* Consume up to `max` MSG records at the head (lock held), appending their payloads (bytes) to
   `out`: in the ring, or in the spill segment being read if `cache` maps it.  Stops at anything else
   (a LINK, a big or pool message, the end of a spill segment, a segment not in `cache`).  Returns how
   many were consumed; an exception (MemoryError) may be set with some consumed. */
static Py_ssize_t
take_records(uint64_t *h, PyObject *cache, Py_ssize_t max, PyObject *out)
{
    Py_buffer sv;
    uint64_t cap = h[H_CAP], mask = cap - 1, head, tail, rseq = 0;
    unsigned char *ring = (unsigned char *)h + HDR, *seg = NULL;
    Py_ssize_t got = 0;
    while (got < max) {
        uint32_t rec[2];
        uint64_t n, rcur = h[H_RCUR];
        PyObject *item;
        char *dst;
        if (rcur != 0) { /* reading a spill chain: records of segment rcur >> 32 from rcur & 0xffffffff */
            uint64_t pos = rcur & 0xFFFFFFFFu, used;
            if (seg == NULL || rseq != rcur >> 32) {
                if (seg != NULL) {
                    PyBuffer_Release(&sv);
                    seg = NULL;
                }
                rseq = rcur >> 32;
                if ((seg = spill(cache, rseq, &sv)) == NULL)
                    break;
            }
            used = __atomic_load_n(&((uint64_t *)seg)[S_USED], __ATOMIC_ACQUIRE);
            if (pos < S_HDR || (pos & 7) != 0 || pos >= used || used > (uint64_t)sv.len)
                break;
            memcpy(rec, seg + pos, 8);
            if (rec[1] != K_MSG || 8 + pad8((uint64_t)rec[0]) > used - pos)
                break; /* anything else, or unreadable (the Python path reports it) */
            n = rec[0];
            item = PyBytes_FromStringAndSize((char *)seg + pos + 8, (Py_ssize_t)n);
            if (item == NULL || PyList_Append(out, item) < 0) {
                Py_XDECREF(item);
                break;
            }
            Py_DECREF(item);
            __atomic_store_n(&h[H_RCUR], rcur + 8 + pad8(n), __ATOMIC_RELEASE); /* commit */
            GF_CRASH_POINT("queue.get.consumed");
        }
        else {
            uint64_t start, first;
            head = h[H_HEAD];
            tail = __atomic_load_n(&h[H_TAIL], __ATOMIC_ACQUIRE);
            if (head == tail || tail - head > cap || ((head | tail) & 7) != 0)
                break;
            memcpy(rec, ring + (head & mask), 8);
            if (rec[1] != K_MSG || 8 + pad8((uint64_t)rec[0]) > tail - head)
                break; /* anything else, or unreadable (the Python path reports it) */
            n = rec[0];
            item = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
            if (item == NULL)
                break;
            dst = PyBytes_AS_STRING(item);
            start = ((head & mask) + 8) & mask;
            first = cap - start;
            if (n <= first) {
                memcpy(dst, ring + start, n);
            }
            else {
                memcpy(dst, ring + start, first);
                memcpy(dst + first, ring, n - first);
            }
            if (PyList_Append(out, item) < 0) {
                Py_DECREF(item);
                break;
            }
            Py_DECREF(item);
            __atomic_store_n(&h[H_HEAD], head + 8 + pad8(n), __ATOMIC_RELEASE); /* commit */
            GF_CRASH_POINT("queue.get.consumed");
        }
        if (h[H_COUNT] > 0) /* (an overwritten count must not wrap) */
            h[H_COUNT] -= 1;
        GF_CRASH_POINT("queue.get.counted");
        got++;
        if (got < max)
            GF_CRASH_POINT("queue.get_many.partial");
    }
    if (seg != NULL)
        PyBuffer_Release(&sv);
    if (got && h[H_MAXSIZE])
        do_wake((uint32_t *)h + NF_WORD);
    return got;
}

/* `out` after take_records: records already consumed are handed over even if an exception (only a
   MemoryError can happen) is set -- they would be lost otherwise. */
static PyObject *
hand_over(PyObject *out)
{
    if (PyErr_Occurred()) {
        if (out != NULL && PyList_GET_SIZE(out) > 0)
            PyErr_Clear();
        else {
            Py_XDECREF(out);
            return NULL;
        }
    }
    return out;
}

static PyObject *
take_small(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    uint64_t *h;
    Py_ssize_t max;
    PyObject *out;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "take_small(buffer, base, max_items, spill)");
        return NULL;
    }
    max = PyLong_AsSsize_t(args[2]);
    if (max == -1 && PyErr_Occurred())
        return NULL;
    if (parse_base(args, &view, &h) < 0)
        return NULL;
    out = PyList_New(0);
    if (out != NULL)
        take_records(h, args[3], max, out);
    PyBuffer_Release(&view);
    return hand_over(out);
}

/* The lock functions of gilfree._csync (its capsule _C_API): keep in step with _csync.c. */
typedef struct {
    int version;
    int (*try_acquire)(PyObject *lock);
    int (*release)(PyObject *lock);
} gf_lock_capi;
static gf_lock_capi *lock_api = NULL;
static PyObject *miss = NULL; /* what get() returns when the Python path must do it */

/* Whether a pickle names __main__ (which a receiver may be unable to import). */
static int
mentions_main(const char *p, Py_ssize_t n)
{
    const char *end = p + n, *q;
    while (end - p >= 8 && (q = memchr(p, '_', (size_t)(end - p) - 7)) != NULL) {
        if (memcmp(q, "__main__", 8) == 0)
            return 1;
        p = q + 1;
    }
    return 0;
}

/* What put() may pickle by itself: set by set_fast() from queues.py (the C pickler's dumps, and the
   package's table of extra reducers with the size it had when queues.py found that none of them can
   change a pickle; ok_size -1: never). */
static PyObject *fast_dumps = NULL, *fast_extra = NULL, *fast_loads = NULL, *str_pickled = NULL;
static Py_ssize_t fast_ok_size = -1;
static PyObject *five = NULL; /* the pickle protocol */

static PyObject *
set_fast(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t ok;
    if (nargs != 3 || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "set_fast(dumps, extra_reducers, ok_size)");
        return NULL;
    }
    ok = PyLong_AsSsize_t(args[2]);
    if (ok == -1 && PyErr_Occurred())
        return NULL;
    Py_INCREF(args[0]);
    Py_XSETREF(fast_dumps, args[0]);
    Py_INCREF(args[1]);
    Py_XSETREF(fast_extra, args[1]);
    fast_ok_size = ok;
    Py_RETURN_NONE;
}

/* Take the queue lock if it is free, or becomes free within a microsecond or two (several CPUs): its
   holder only copies bytes, and the Python path that waits for it costs several times more. */
static int
try_lock(PyObject *lock)
{
    int r = lock_api->try_acquire(lock), i;
    for (i = 0; r == 0 && spin_ns > 0 && i < LOCK_SPIN; i++) {
        cpu_relax();
        r = lock_api->try_acquire(lock);
    }
    return r;
}

/* A pickle (protocol 5) of plain data, written here without a Pickler: None, bool, int (64 bits),
   float, str, bytes, and tuples of them (16 levels at most), `cap` bytes at most.  The opcodes are
   the ones pickle writes for these types, without the memo (immutable data: sharing does not show)
   and without a frame; pickle.loads reads them back to equal objects of the same types.  Returns the
   length, or -1: not plain data, too long, or an str that is not UTF-8 (dumps() does those).
   Creating and freeing a Pickler (what dumps() does) costs more than the whole put otherwise. */
#define MINI_MAX 1024
#define MINI_DEPTH 16

static int
mini_save(PyObject *o, unsigned char *b, Py_ssize_t cap, Py_ssize_t *pos, int depth)
{
    PyTypeObject *t = Py_TYPE(o);
    Py_ssize_t p = *pos, n, i;
#define NEED(k)                 \
    do {                        \
        if (p + (k) > cap)      \
            return -1;          \
    } while (0)
    if (o == Py_None) {
        NEED(1);
        b[p++] = 'N'; /* NONE */
    }
    else if (o == Py_True || o == Py_False) {
        NEED(1);
        b[p++] = o == Py_True ? 0x88 : 0x89; /* NEWTRUE, NEWFALSE */
    }
    else if (t == &PyLong_Type) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        uint64_t u = (uint64_t)v;
        if (overflow || (v == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return -1;
        }
        if (v >= 0 && v <= 0xff) {
            NEED(2);
            b[p++] = 'K'; /* BININT1 */
            b[p++] = (unsigned char)v;
        }
        else if (v >= 0 && v <= 0xffff) {
            NEED(3);
            b[p++] = 'M'; /* BININT2 */
            b[p++] = (unsigned char)(v & 0xff);
            b[p++] = (unsigned char)(v >> 8);
        }
        else if (v >= -0x80000000LL && v <= 0x7fffffffLL) {
            NEED(5);
            b[p++] = 'J'; /* BININT: 4 bytes, little-endian, signed */
            for (i = 0; i < 4; i++)
                b[p++] = (unsigned char)(u >> (8 * i));
        }
        else {
            NEED(10);
            b[p++] = 0x8a; /* LONG1: length, then little-endian two's complement */
            b[p++] = 8;
            for (i = 0; i < 8; i++)
                b[p++] = (unsigned char)(u >> (8 * i));
        }
    }
    else if (t == &PyFloat_Type) {
        double d = PyFloat_AS_DOUBLE(o);
        uint64_t bits;
        memcpy(&bits, &d, 8);
        NEED(9);
        b[p++] = 'G'; /* BINFLOAT: big-endian IEEE 754 */
        for (i = 7; i >= 0; i--)
            b[p++] = (unsigned char)(bits >> (8 * i));
    }
    else if (t == &PyUnicode_Type || t == &PyBytes_Type) {
        const char *data;
        if (t == &PyUnicode_Type) {
            data = PyUnicode_AsUTF8AndSize(o, &n);
            if (data == NULL) { /* lone surrogates: dumps() writes them with surrogatepass */
                PyErr_Clear();
                return -1;
            }
        }
        else {
            data = PyBytes_AS_STRING(o);
            n = PyBytes_GET_SIZE(o);
        }
        if (n < 256) {
            NEED(2 + n);
            b[p++] = t == &PyUnicode_Type ? 0x8c : 'C'; /* SHORT_BINUNICODE, SHORT_BINBYTES */
            b[p++] = (unsigned char)n;
        }
        else {
            NEED(5 + n);
            b[p++] = t == &PyUnicode_Type ? 'X' : 'B'; /* BINUNICODE, BINBYTES: 4-byte length */
            for (i = 0; i < 4; i++)
                b[p++] = (unsigned char)((uint64_t)n >> (8 * i));
        }
        memcpy(b + p, data, (size_t)n);
        p += n;
    }
    else if (t == &PyTuple_Type) {
        n = PyTuple_GET_SIZE(o);
        if (depth >= MINI_DEPTH)
            return -1;
        if (n == 0) {
            NEED(1);
            b[p++] = ')'; /* EMPTY_TUPLE */
        }
        else {
            if (n > 3) {
                NEED(1);
                b[p++] = '('; /* MARK */
            }
            for (i = 0; i < n; i++)
                if (mini_save(PyTuple_GET_ITEM(o, i), b, cap, &p, depth + 1) < 0)
                    return -1;
            NEED(1);
            b[p++] = n == 1 ? 0x85 : n == 2 ? 0x86 : n == 3 ? 0x87 : 't'; /* TUPLE1/2/3, TUPLE */
        }
    }
    else {
        return -1;
    }
#undef NEED
    *pos = p;
    return 0;
}

static Py_ssize_t
mini_pickle(PyObject *obj, unsigned char *b, Py_ssize_t cap)
{
    Py_ssize_t pos = 2;
    if (cap < 4)
        return -1;
    b[0] = 0x80; /* PROTO 5 */
    b[1] = 5;
    if (mini_save(obj, b, cap - 1, &pos, 0) < 0)
        return -1;
    b[pos++] = '.'; /* STOP */
    return pos;
}

static PyObject *
mini_dumps(PyObject *module, PyObject *obj)
{
    unsigned char buf[MINI_MAX];
    Py_ssize_t n = mini_pickle(obj, buf, MINI_MAX);
    if (n < 0)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((char *)buf, n);
}

/* The common case of put: pickle a plain object, try the lock, append, wake, unlock.  True: queued.
   MISS: nothing done (not a plain object, or reducers changed).  None: dumps failed or the pickle is
   longer than `limit` (the package's pickler must do it).  bytes: the pickle, not queued (the lock was
   busy, the Python path must append it, or it names __main__).  NULL: an exception. */
/* Record what a put may change, then mark it in progress (lock held): a holder that dies before the
   end of the operation is rolled back from this by the next one (queues.py, _rollback). */
static inline void
tx_put_begin(uint64_t *h, unsigned char *seg)
{
    uint64_t *sh = (uint64_t *)seg;
    h[H_TX_TAIL] = h[H_TAIL];
    h[H_TX_WSEG] = h[H_WSEG];
    h[H_TX_WUSED] = sh != NULL ? sh[S_USED] : 0;
    h[H_TX_WSEALED] = sh != NULL ? sh[S_SEALED] : 0;
    h[H_TX_COUNT] = h[H_COUNT];
    h[H_TX_UNF] = h[H_UNFINISHED];
    h[H_TX_NEXT] = h[H_NEXT_SEQ];
    __atomic_store_n(&h[H_TX], TX_PUT, __ATOMIC_RELEASE);
    GF_CRASH_POINT("queue.put.tx_begun");
}

static inline void
tx_get_begin(uint64_t *h)
{
    h[H_TX_HEAD] = h[H_HEAD];
    h[H_TX_RCUR] = h[H_RCUR];
    h[H_TX_RBASE] = h[H_RBASE];
    h[H_TX_COUNT] = h[H_COUNT];
    __atomic_store_n(&h[H_TX], TX_GET, __ATOMIC_RELEASE);
    GF_CRASH_POINT("queue.get.tx_begun");
}

/* Whether the header, with the lock held, is as this process set it up and no operation is left
   half-done: otherwise the Python path repairs it (or reports it). */
static inline int
header_sound(uint64_t *h, uint64_t cap)
{
    return h[H_TX] == 0 && h[H_CAP] == cap && h[H_MAGIC] == MAGIC;
}

static PyObject *
fast_put(uint64_t *h, uint64_t cap, PyObject *lock, PyObject *obj, PyObject *spill_cache, Py_ssize_t limit)
{
    Py_buffer sv;
    uint64_t maxsize;
    unsigned char *seg = NULL, small[MINI_MAX];
    const char *bytes;
    PyObject *data = NULL, *callargs[2];
    PyTypeObject *t = Py_TYPE(obj);
    Py_ssize_t n;
    int done = 0, r;
    /* the types _fast_dumps() pickles without looking further (anything else: the Python path) */
    if (!(t == &PyTuple_Type || t == &PyLong_Type || t == &PyUnicode_Type || t == &PyFloat_Type ||
          t == &PyBool_Type || obj == Py_None || t == &PyComplex_Type) ||
        fast_dumps == NULL || fast_ok_size < 0 || PyDict_GET_SIZE(fast_extra) != fast_ok_size) {
        Py_INCREF(miss);
        return miss;
    }
    n = mini_pickle(obj, small, limit < MINI_MAX ? limit : MINI_MAX);
    if (n >= 0) {
        bytes = (const char *)small; /* plain data: no class to import, no __main__ to look for */
    }
    else {
        callargs[0] = obj;
        callargs[1] = five;
        data = PyObject_Vectorcall(fast_dumps, callargs, 2, NULL);
        if (data == NULL || !PyBytes_Check(data) || PyBytes_GET_SIZE(data) > limit) {
            if (data == NULL) {
                if (!PyErr_ExceptionMatches(PyExc_Exception))
                    return NULL;
                PyErr_Clear(); /* the package's pickler explains, or pickles by value */
            }
            Py_XDECREF(data);
            Py_RETURN_NONE; /* a big message, or dumps failed: the package's pickler must do it */
        }
        n = PyBytes_GET_SIZE(data);
        bytes = PyBytes_AS_STRING(data);
        if (mentions_main(bytes, n))
            return data; /* the caller decides whether a receiver can import __main__ */
    }
    r = try_lock(lock);
    if (r == 1) {
        GF_CRASH_POINT("queue.put.locked");
        maxsize = h[H_MAXSIZE];
        if (header_sound(h, cap) && (!maxsize || h[H_COUNT] < maxsize)) {
            if (h[H_WSEG] != 0)
                seg = spill(spill_cache, h[H_WSEG], &sv);
            if (h[H_WSEG] == 0 || seg != NULL) {
                tx_put_begin(h, seg);
                done = append_one(h, bytes, (uint64_t)n, seg, seg ? sv.len : 0);
                __atomic_store_n(&h[H_TX], 0, __ATOMIC_RELEASE); /* the commit of the operation */
                if (done)
                    GF_CRASH_POINT("queue.put.committed");
            }
            if (seg != NULL)
                PyBuffer_Release(&sv);
            if (done)
                do_wake((uint32_t *)h + NE_WORD);
        }
        r = lock_api->release(lock);
    }
    if (r < 0 || done) {
        Py_XDECREF(data);
        if (r < 0)
            return NULL;
        Py_RETURN_TRUE;
    }
    if (data == NULL) /* not queued: the Python path appends the pickle */
        data = PyBytes_FromStringAndSize(bytes, n);
    return data;
}

/* The common case of get: try the lock, take the small message at the head, unlock, unpickle it.
   MISS: nothing taken (the lock was busy, the queue is empty, or the Python path must do it). */
static PyObject *
fast_get(uint64_t *h, uint64_t cap, PyObject *lock, PyObject *spill_cache)
{
    PyObject *out, *item, *obj;
    int r;
    out = PyList_New(0);
    if (out == NULL)
        return NULL;
    r = try_lock(lock);
    if (r == 1) {
        GF_CRASH_POINT("queue.get.locked");
        if (header_sound(h, cap)) {
            tx_get_begin(h);
            take_records(h, spill_cache, 1, out);
            __atomic_store_n(&h[H_TX], 0, __ATOMIC_RELEASE); /* the commit of the operation */
            if (PyList_GET_SIZE(out) > 0)
                GF_CRASH_POINT("queue.get.committed");
        }
        r = lock_api->release(lock);
        if (PyList_GET_SIZE(out) > 0)
            GF_CRASH_POINT("queue.get.unlocked");
    }
    out = hand_over(out);
    if (out == NULL)
        return NULL;
    if (PyList_GET_SIZE(out) == 0) {
        Py_DECREF(out);
        if (r < 0)
            return NULL;
        Py_INCREF(miss);
        return miss;
    }
    if (r < 0) /* the message is taken: return it, the release error is lost */
        PyErr_Clear();
    item = PyList_GET_ITEM(out, 0);
    obj = PyObject_Vectorcall(fast_loads, &item, 1, NULL);
    Py_DECREF(out);
    return obj;
}

/* _cqueue.Core: the C base of queues._QueueBase.  It holds what put() and get() need (the header,
   the lock, the spill segments cached by the Python side) so that the common call is one C method
   with no Python frame; anything else goes to the Python methods _put_py / _get_py. */
typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    uint64_t *h;
    uint64_t cap;   /* the ring's size, as set up (the header's word is checked against it) */
    PyObject *lock; /* _lock */
    PyObject *deferred; /* _deferred: errors get_many kept for the next get, or None */
    PyObject *wc;   /* _wc: (seq, mapping) of the spill segment written here last */
    PyObject *rc;   /* _rc: (seq, mapping) of the spill segment read here last */
    Py_ssize_t limit; /* _big_limit */
    char closed;      /* _closed */
} Core;

static void
Core_dealloc(Core *self)
{
    if (self->has_view) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
    }
    Py_CLEAR(self->lock);
    Py_CLEAR(self->deferred);
    Py_CLEAR(self->wc);
    Py_CLEAR(self->rc);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Core_init_core(Core *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    uint64_t *h;
    Py_ssize_t base;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "_core_init(buffer, base, lock)");
        return NULL;
    }
    base = PyLong_AsSsize_t(args[1]);
    if (base == -1 && PyErr_Occurred())
        return NULL;
    if ((h = header(args[0], base, &view)) == NULL)
        return NULL;
    if (self->has_view)
        PyBuffer_Release(&self->view);
    self->view = view; /* kept: the header stays mapped while the queue lives */
    self->has_view = 1;
    self->h = h;
    self->cap = h[H_CAP];
    Py_INCREF(args[2]);
    Py_XSETREF(self->lock, args[2]);
    Py_RETURN_NONE;
}

/* Is this call put(obj) / put(obj, block) / put(obj, block, timeout), keywords block= and timeout=
   included?  Their values do not matter to the fast path: it succeeds only without waiting. */
static int
plain_call(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, Py_ssize_t npos, Py_ssize_t nmax)
{
    Py_ssize_t i, nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs < npos || nargs + nkw > nmax)
        return 0;
    for (i = 0; i < nkw; i++) {
        PyObject *k = PyTuple_GET_ITEM(kwnames, i);
        if (!PyUnicode_Check(k) || (PyUnicode_CompareWithASCIIString(k, "block") != 0 &&
                                    PyUnicode_CompareWithASCIIString(k, "timeout") != 0))
            return 0;
    }
    return 1;
}

static PyObject *str_put_py = NULL, *str_get_py = NULL;

static PyObject *
Core_put(Core *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf), nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0, i;
    PyObject *r, *callargs[8], *result;
    if (self->h != NULL && !self->closed && plain_call(args, nargs, kwnames, 1, 3)) {
        r = fast_put(self->h, self->cap, self->lock, args[0], self->wc, self->limit);
        if (r == NULL)
            return NULL;
        if (r == Py_True) {
            Py_DECREF(r);
            Py_RETURN_NONE;
        }
    }
    else {
        Py_INCREF(miss);
        r = miss;
    }
    /* the Python path: self._put_py(*args, _pickled=r, **kwargs) */
    if (nargs + nkw > 6) {
        Py_DECREF(r);
        PyErr_SetString(PyExc_TypeError, "put() takes at most 3 arguments");
        return NULL;
    }
    {
        PyObject *names = PyTuple_New(nkw + 1);
        if (names == NULL) {
            Py_DECREF(r);
            return NULL;
        }
        callargs[0] = (PyObject *)self;
        for (i = 0; i < nargs + nkw; i++)
            callargs[1 + i] = args[i];
        callargs[1 + nargs + nkw] = r;
        for (i = 0; i < nkw; i++) {
            Py_INCREF(PyTuple_GET_ITEM(kwnames, i));
            PyTuple_SET_ITEM(names, i, PyTuple_GET_ITEM(kwnames, i));
        }
        Py_INCREF(str_pickled);
        PyTuple_SET_ITEM(names, nkw, str_pickled);
        result = PyObject_VectorcallMethod(str_put_py, callargs, 1 + nargs, names);
        Py_DECREF(names);
    }
    Py_DECREF(r);
    return result;
}

static PyObject *
Core_get(Core *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *r, *callargs[4];
    Py_ssize_t i, nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (self->h != NULL && !self->closed && (self->deferred == NULL || self->deferred == Py_None) &&
        plain_call(args, nargs, kwnames, 0, 2)) {
        r = fast_get(self->h, self->cap, self->lock, self->rc);
        if (r != miss)
            return r;
        Py_DECREF(r);
    }
    if (nargs + nkw > 3) {
        PyErr_SetString(PyExc_TypeError, "get() takes at most 2 arguments");
        return NULL;
    }
    callargs[0] = (PyObject *)self;
    for (i = 0; i < nargs + nkw; i++)
        callargs[1 + i] = args[i];
    return PyObject_VectorcallMethod(str_get_py, callargs, 1 + nargs, kwnames);
}

static PyMethodDef Core_methods[] = {
    {"_core_init", (PyCFunction)(void (*)(void))Core_init_core, METH_FASTCALL,
     "_core_init(buffer, base, lock): the queue header at `base` in `buffer` (kept), and its lock"},
    {"put", (PyCFunction)(void (*)(void))Core_put, METH_FASTCALL | METH_KEYWORDS,
     "put($self, /, obj, block=True, timeout=None)\n--\n\n"
     "Put ``obj`` in the queue, waiting (if ``block``, up to ``timeout``) while a bounded queue is full.\n\n"
     "``obj`` is pickled here: an object that cannot be pickled raises ``gilfree.PicklingError`` in the\n"
     "caller and nothing is queued.  Raises ``queue.Full`` if no room was found in time."},
    {"get", (PyCFunction)(void (*)(void))Core_get, METH_FASTCALL | METH_KEYWORDS,
     "get($self, /, block=True, timeout=None)\n--\n\n"
     "Remove and return the oldest item, waiting (if ``block``, up to ``timeout``) while the queue is\n"
     "empty.\n\nRaises ``queue.Empty`` if nothing came in time."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Core_members[] = {
    {"_lock", T_OBJECT_EX, offsetof(Core, lock), 0, "the queue lock"},
    {"_deferred", T_OBJECT, offsetof(Core, deferred), 0, "errors get_many keeps for the next get, or None"},
    {"_wc", T_OBJECT, offsetof(Core, wc), 0, "(seq, mapping) of the spill segment written here last, or None"},
    {"_rc", T_OBJECT, offsetof(Core, rc), 0, "(seq, mapping) of the spill segment read here last, or None"},
    {"_big_limit", T_PYSSIZET, offsetof(Core, limit), 0, "longest pickle that travels in the ring"},
    {"_closed", T_BOOL, offsetof(Core, closed), 0, "close() was called in this process"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gilfree._cqueue.Core",
    .tp_doc = "The C base of gilfree's queues: put() and get() in one call in the common case.",
    .tp_basicsize = sizeof(Core),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
    .tp_members = Core_members,
};

static uint32_t *
word(PyObject *obj, PyObject *off_obj, Py_buffer *view)
{
    Py_ssize_t off = PyLong_AsSsize_t(off_obj);
    if (off == -1 && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) < 0)
        return NULL;
    if (off < 0 || off % 4 || off + 8 > view->len) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "futex word out of the buffer");
        return NULL;
    }
    return (uint32_t *)((char *)view->buf + off);
}

static PyObject *
wake(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    uint32_t *seq;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "wake(buffer, offset)");
        return NULL;
    }
    if ((seq = word(args[0], args[1], &view)) == NULL)
        return NULL;
    do_wake(seq);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *
wait(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    uint32_t *seq, seen;
    double timeout;
    struct timespec ts, *pts = NULL;
    int err = 0, changed = 0;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "wait(buffer, offset, seen, timeout)");
        return NULL;
    }
    seen = (uint32_t)PyLong_AsUnsignedLongMask(args[2]);
    if (PyErr_Occurred())
        return NULL;
    timeout = PyFloat_AsDouble(args[3]);
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    if (timeout >= 0) {
        ts.tv_sec = (time_t)timeout;
        ts.tv_nsec = (long)((timeout - (double)ts.tv_sec) * 1e9);
        pts = &ts;
    }
    if ((seq = word(args[0], args[1], &view)) == NULL)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    /* Poll first, for a few microseconds (several CPUs only): a producer that is running puts its next
       message sooner than a futex sleep and wake-up take, and while we poll it makes no system call. */
    if (spin_ns > 0) {
        long long start = now_ns();
        unsigned i;
        for (i = 1;; i++) {
            if (__atomic_load_n(seq, __ATOMIC_ACQUIRE) != seen) {
                changed = 1;
                break;
            }
            cpu_relax();
            if ((i & 63) == 0 && now_ns() - start > spin_ns)
                break;
        }
    }
    if (!changed) {
        __atomic_store_n(seq + 1, 1, __ATOMIC_SEQ_CST); /* a sleeper: wakers must make the system call */
        if (syscall(SYS_futex, seq, FUTEX_WAIT, seen, pts, NULL, 0) == -1)
            err = errno;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (err == EINTR && PyErr_CheckSignals() < 0)
        return NULL;
    return PyBool_FromLong(err != ETIMEDOUT);
}

/* Pickle every item of a list with one Pickler (its dump and clear_memo methods; it writes to a sink
   whose write is out.append): a list of bytes, None where dump failed or the pickle is longer than
   `limit` (the caller takes another path for those); whether any pickle mentions __main__; whether
   there is a None.  One Pickler for the batch instead of one per item (what dumps() costs). */
static PyObject *
dumps_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *items, *dump, *clear, *sink, *out, *result;
    Py_ssize_t limit, i, n;
    int main = 0, missing = 0;
    if (nargs != 5 || !PyList_Check(args[0]) || !PyList_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "dumps_batch(list, dump, clear_memo, sink_list, limit)");
        return NULL;
    }
    items = args[0];
    dump = args[1];
    clear = args[2];
    sink = args[3];
    limit = PyLong_AsSsize_t(args[4]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    n = PyList_GET_SIZE(items);
    if ((out = PyList_New(n)) == NULL)
        return NULL;
    for (i = 0; i < n; i++) {
        PyObject *item, *r, *data = NULL;
        Py_ssize_t k;
        unsigned char small[MINI_MAX];
        if (i >= PyList_GET_SIZE(items)) { /* the list shrank while pickling */
            Py_INCREF(Py_None);
            PyList_SET_ITEM(out, i, Py_None);
            missing = 1;
            continue;
        }
        /* plain data: the pickle is written here (see mini_pickle), no Pickler call */
        k = mini_pickle(PyList_GET_ITEM(items, i), small, limit < MINI_MAX ? limit : MINI_MAX);
        if (k >= 0) {
            if ((data = PyBytes_FromStringAndSize((char *)small, k)) == NULL)
                goto error;
            PyList_SET_ITEM(out, i, data);
            continue;
        }
        if (PyList_SetSlice(sink, 0, PyList_GET_SIZE(sink), NULL) < 0)
            goto error;
        item = PyList_GET_ITEM(items, i);
        Py_INCREF(item); /* dump may run code that changes the list */
        r = PyObject_Vectorcall(dump, &item, 1, NULL);
        Py_DECREF(item);
        if (r == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) /* KeyboardInterrupt...: not ours */
                goto error;
            PyErr_Clear();
        }
        else {
            Py_DECREF(r);
            k = PyList_GET_SIZE(sink);
            if (k == 1) {
                data = PyList_GET_ITEM(sink, 0);
                Py_INCREF(data);
            }
            else if (k > 1) { /* framed output of a large pickle, written in pieces */
                PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
                if (empty == NULL)
                    goto error;
                data = _PyBytes_Join(empty, sink);
                Py_DECREF(empty);
                if (data == NULL)
                    goto error;
            }
        }
        r = PyObject_CallNoArgs(clear); /* the memo keeps references: drop them item by item */
        if (r == NULL) {
            Py_XDECREF(data);
            goto error;
        }
        Py_DECREF(r);
        if (data != NULL && (!PyBytes_Check(data) || PyBytes_GET_SIZE(data) > limit))
            Py_CLEAR(data);
        if (data != NULL && !main && mentions_main(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data)))
            main = 1;
        if (data == NULL) {
            Py_INCREF(Py_None);
            data = Py_None;
            missing = 1;
        }
        PyList_SET_ITEM(out, i, data);
    }
    PyList_SetSlice(sink, 0, PyList_GET_SIZE(sink), NULL);
    result = Py_BuildValue("(NOO)", out, main ? Py_True : Py_False, missing ? Py_True : Py_False);
    return result;
error:
    for (; i < n; i++) { /* fill the rest so that the list can be freed */
        Py_INCREF(Py_None);
        PyList_SET_ITEM(out, i, Py_None);
    }
    Py_DECREF(out);
    return NULL;
}

/* [loads(r) if type(r) is bytes else decode(r) for r in records]: get_many's unpickling, without
   the Python loop.  An item that raises an Exception costs only itself: `marker` takes its place and
   the exception is appended to `failed`.  Anything else (KeyboardInterrupt...) stops it (the caller
   gives back what undecoded records hold). */
static PyObject *
loads_all(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *records, *out, *failed, *marker;
    Py_ssize_t i, n;
    if (nargs != 5 || !PyList_Check(args[0]) || !PyList_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "loads_all(records, loads, decode, failed, marker)");
        return NULL;
    }
    records = args[0];
    failed = args[3];
    marker = args[4];
    n = PyList_GET_SIZE(records);
    if ((out = PyList_New(n)) == NULL)
        return NULL;
    for (i = 0; i < n; i++) {
        PyObject *r = PyList_GET_ITEM(records, i), *obj;
        Py_INCREF(r);
        obj = PyObject_Vectorcall(PyBytes_CheckExact(r) ? args[1] : args[2], &r, 1, NULL);
        Py_DECREF(r);
        if (obj == NULL && PyErr_ExceptionMatches(PyExc_Exception)) {
#if PY_VERSION_HEX >= 0x030C0000
            PyObject *exc = PyErr_GetRaisedException();
#else
            PyObject *etype, *exc, *etb;
            PyErr_Fetch(&etype, &exc, &etb);
            PyErr_NormalizeException(&etype, &exc, &etb);
            if (etb != NULL)
                PyException_SetTraceback(exc, etb);
            Py_XDECREF(etype);
            Py_XDECREF(etb);
#endif
            int bad = PyList_Append(failed, exc);
            Py_DECREF(exc);
            if (bad == 0) {
                Py_INCREF(marker);
                obj = marker;
            }
        }
        if (obj == NULL) {
            for (; i < n; i++) { /* fill the rest so that the list can be freed */
                Py_INCREF(Py_None);
                PyList_SET_ITEM(out, i, Py_None);
            }
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, obj);
        if (PyList_GET_SIZE(records) != n) {
            Py_DECREF(out);
            PyErr_SetString(PyExc_RuntimeError, "records changed while decoding");
            return NULL;
        }
    }
    return out;
}

/* tx_begin(buffer, base, op, spill, cap) -> int: begin a put (op 1) or get (op 2) with the lock held,
   as queues.py's _tx_put_begin/_tx_get_begin do: 1.  0 (nothing done): the open spill segment is not
   the one `spill` maps, the caller does it.  2 (nothing done): the header's magic or size is not what
   it was (`cap`): the caller repairs it first. */
static PyObject *
tx_begin(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view, sv;
    uint64_t *h;
    unsigned char *seg = NULL;
    Py_ssize_t base;
    long op, r = 1;
    unsigned long long cap;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "tx_begin(buffer, base, op, spill, cap)");
        return NULL;
    }
    base = PyLong_AsSsize_t(args[1]);
    op = PyLong_AsLong(args[2]);
    cap = PyLong_AsUnsignedLongLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_WRITABLE) < 0)
        return NULL;
    if (base < 0 || base % 8 || base + HDR > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "queue header out of the buffer");
        return NULL;
    }
    h = (uint64_t *)((char *)view.buf + base);
    if (h[H_MAGIC] != MAGIC || h[H_CAP] != cap)
        r = 2;
    else if (op == TX_PUT) {
        if (h[H_WSEG] != 0 && (seg = spill(args[3], h[H_WSEG], &sv)) == NULL)
            r = 0;
        else {
            tx_put_begin(h, seg);
            if (seg != NULL)
                PyBuffer_Release(&sv);
        }
    }
    else {
        tx_get_begin(h);
    }
    PyBuffer_Release(&view);
    return PyLong_FromLong(r);
}

static PyMethodDef module_methods[] = {
    GF_CRASH_METHODS
    {"tx_begin", (PyCFunction)(void (*)(void))tx_begin, METH_FASTCALL,
     "tx_begin(buffer, base, op, spill, cap) -> int: begin a put (1) or get (2) operation, lock held; "
     "0: the caller must (spill segment not cached), 2: the header must be repaired first"},
    {"loads_all", (PyCFunction)(void (*)(void))loads_all, METH_FASTCALL,
     "loads_all(records, loads, decode, failed, marker) -> [loads(r) if type(r) is bytes else decode(r) for r "
     "in records], marker where that raised (the exception appended to failed)"},
    {"dumps_batch", (PyCFunction)(void (*)(void))dumps_batch, METH_FASTCALL,
     "dumps_batch(list, dump, clear_memo, sink_list, limit) -> (list of bytes or None, mentions __main__, "
     "has None)"},
    {"put_batch", (PyCFunction)(void (*)(void))put_batch, METH_FASTCALL,
     "put_batch(buffer, base, list_of_bytes, start, spill) -> int: append small pickled messages from "
     "index `start` on, as Core.put does (queue lock held); the index of the first one left to the Python path"},
    {"mini_dumps", (PyCFunction)mini_dumps, METH_O,
     "mini_dumps(obj) -> bytes or None: the pickle Core.put writes for plain data (None if not plain)"},
    {"set_fast", (PyCFunction)(void (*)(void))set_fast, METH_FASTCALL,
     "set_fast(dumps, extra_reducers, ok_size): Core.put pickles with dumps while the dict has that size"},
    {"take_small", (PyCFunction)(void (*)(void))take_small, METH_FASTCALL,
     "take_small(buffer, base, max_items, spill) -> list[bytes]: consume small messages at the head (lock held)"},
    {"wait", (PyCFunction)(void (*)(void))wait, METH_FASTCALL,
     "wait(buffer, offset, seen, timeout) -> bool: sleep while the sequence word reads `seen`; "
     "timeout < 0: no limit; False on timeout"},
    {"wake", (PyCFunction)(void (*)(void))wake, METH_FASTCALL,
     "wake(buffer, offset): bump the sequence word, wake its sleepers if any announced itself"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef cqueue_module = {
    PyModuleDef_HEAD_INIT, "gilfree._cqueue", "The hot path of gilfree.queues (see queues.py).", -1,
    module_methods,
};

PyMODINIT_FUNC
PyInit__cqueue(void)
{
    PyObject *m;
    gf_crash_from_env();
    PyObject *csync = PyImport_ImportModule("gilfree._csync"), *capsule;
    if (csync == NULL)
        return NULL;
    capsule = PyObject_GetAttrString(csync, "_C_API");
    Py_DECREF(csync);
    if (capsule == NULL)
        return NULL;
    lock_api = (gf_lock_capi *)PyCapsule_GetPointer(capsule, "gilfree._csync._C_API");
    Py_DECREF(capsule); /* the module keeps it */
    if (lock_api == NULL)
        return NULL;
    if (lock_api->version != 1) {
        PyErr_SetString(PyExc_ImportError, "gilfree._csync has another lock API version");
        return NULL;
    }
    if (five == NULL && (five = PyLong_FromLong(5)) == NULL)
        return NULL;
    if (str_pickled == NULL && ((str_pickled = PyUnicode_InternFromString("_pickled")) == NULL ||
                                (str_put_py = PyUnicode_InternFromString("_put_py")) == NULL ||
                                (str_get_py = PyUnicode_InternFromString("_get_py")) == NULL))
        return NULL;
    if (fast_loads == NULL) {
        PyObject *pickle = PyImport_ImportModule("_pickle");
        if (pickle == NULL)
            return NULL;
        fast_loads = PyObject_GetAttrString(pickle, "loads");
        Py_DECREF(pickle);
        if (fast_loads == NULL)
            return NULL;
    }
    if (PyType_Ready(&CoreType) < 0)
        return NULL;
    spin_ns = sysconf(_SC_NPROCESSORS_ONLN) > 1 ? SPIN_NS : 0;
    m = PyModule_Create(&cqueue_module);
    if (m == NULL)
        return NULL;
    if (miss == NULL && (miss = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type)) == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(miss);
    if (PyModule_AddObject(m, "MISS", miss) < 0) {
        Py_DECREF(miss);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
