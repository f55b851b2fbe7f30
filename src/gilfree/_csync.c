/*
 * gilfree._csync: robust inter-process locks and semaphores over shared memory (layer L1, C).
 *
 *   process A                         shared block (in a memfd arena)                 process B
 *   ---------                         ------------------------------                  ---------
 *   acquire(): CAS value 1->0 -----> | value  (futex word: free count) | <----- acquire(): value==0:
 *              holders[i] = pidA     | waiters                         |          waiters++, futex_wait
 *                                    | holders[24] / owner pid+tid     |          every 100 ms: is any
 *   release(): holders[i] = 0        | flags (HANDOFF, OVERFLOW)       |          recorded holder dead?
 *              value++ ; if waiters: |                                 |          -> OwnerDiedError(pid)
 *              futex_wake(value, 1)                                                  or take its slot over
 *
 * The design follows the classic futex semaphore (Drepper, "Futexes Are Tricky": a counter word, a
 * waiter count, FUTEX_WAIT only while the word reads 0), not pthread robust mutexes: a Lock may be
 * released by a process other than the one that acquired it (the stdlib allows it), which a robust
 * mutex forbids.  What differs from the classic design: each acquisition records its holder
 * (a slot table for semaphores, owner pid + thread id for recursive locks), so a waiter that has
 * slept for a slice checks whether a recorded holder is dead (kill(pid, 0), or a zombie in
 * /proc/pid/stat) and then raises or takes over instead of sleeping forever.  Holder records are
 * only meaningful while every release is done by the acquirer; the first release by a process that
 * holds no slot sets HANDOFF and turns the dead-holder check off for that lock (a semaphore used as a
 * signal must never report a false death).
 *
 * A Lock (a semaphore whose maxvalue is 1) also records its owner pid + thread id in owner_pid /
 * owner_tid, set by whoever acquires it and cleared by whoever releases it: _is_mine() and _count()
 * (what Condition and the reprs ask) stay exact across hand-offs, unlike the holder slots.
 *
 * Where this runs: any thread of any process that maps the block.  acquire() releases the GIL while
 * it sleeps in FUTEX_WAIT and handles signals (Ctrl-C raises KeyboardInterrupt).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "_crash.h"
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define GF_NHOLD 24
#define GF_SEMAPHORE 0
#define GF_RECURSIVE 1
#define GF_F_HANDOFF 1u
#define GF_F_OVERFLOW 2u
#define GF_SLICE_NS 100000000LL /* how long a waiter sleeps before it looks for a dead holder */
#define GF_SPIN 400             /* polls of a taken lock before sleeping (about 2-4 us) */

static inline void
cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

typedef struct {
    uint32_t value;    /* futex word: number of free slots */
    uint32_t waiters;  /* processes/threads sleeping on value */
    uint32_t maxvalue;
    uint32_t kind;
    int32_t owner_pid; /* recursive lock: owner */
    uint32_t flags;
    uint64_t owner_tid;
    uint32_t rcount;   /* recursive lock: recursion depth */
    uint32_t magic;
    int32_t holders[GF_NHOLD];
} gf_block;

#define GF_MAGIC 0x67665331u /* "gfS1" */

/* What other extensions may call (the capsule gilfree._csync._C_API; keep in step with _cqueue.c):
   a non-blocking acquire and a release of a (non-recursive) SemBlock, without argument parsing. */
#define GF_LOCK_CAPI_VERSION 1
typedef struct {
    int version;
    int (*try_acquire)(PyObject *lock); /* 1 acquired, 0 busy, -1 exception */
    int (*release)(PyObject *lock);     /* 0, or -1 exception */
} gf_lock_capi;

/* getpid() is a system call in current glibc; the pid is cached and refreshed in a forked child. */
static int cached_pid = 0;

static void
refresh_pid(void)
{
    cached_pid = (int)getpid();
}

static inline int
my_pid(void)
{
    return cached_pid;
}

static PyObject *owner_died_error = NULL;   /* set by set_classes() */
static PyObject *owner_died_warning = NULL; /* set by set_classes() */

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    gf_block *b;
    int mode; /* 0: raise OwnerDiedError, 1: take the dead holder's place */
    int recovered_pid;
    int has_view;
} SemBlock;

static int
futex_wait(uint32_t *addr, uint32_t expected, long long ns)
{
    struct timespec ts, *pts = NULL;
    if (ns >= 0) {
        ts.tv_sec = ns / 1000000000LL;
        ts.tv_nsec = ns % 1000000000LL;
        pts = &ts;
    }
    if (syscall(SYS_futex, addr, FUTEX_WAIT, expected, pts, NULL, 0) == -1)
        return errno;
    return 0;
}

static void
futex_wake(uint32_t *addr, int n)
{
    syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0);
}

static long long
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Is process `pid` alive (and not a zombie waiting to be reaped)? */
static int
pid_alive(int pid)
{
    char path[64], buf[512];
    FILE *f;
    size_t n;
    char *p;
    if (pid <= 0)
        return 0;
    if (pid == my_pid())
        return 1;
    if (kill(pid, 0) == -1 && errno == ESRCH)
        return 0;
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    f = fopen(path, "r");
    if (f == NULL)
        return errno == ENOENT ? 0 : 1;
    n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    p = strrchr(buf, ')');
    if (p != NULL && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X'))
        return 0;
    return 1;
}

/* A non-recursive lock: a semaphore with one slot.  Its owner fields say which thread holds it. */
static inline int
is_lock(gf_block *b)
{
    return b->kind == GF_SEMAPHORE && b->maxvalue == 1;
}

static void
set_lock_owner(gf_block *b, int pid, uint64_t tid)
{
    if (is_lock(b)) {
        __atomic_store_n(&b->owner_tid, tid, __ATOMIC_SEQ_CST);
        __atomic_store_n(&b->owner_pid, pid, __ATOMIC_SEQ_CST);
    }
}

static int
try_take(gf_block *b)
{
    uint32_t v = __atomic_load_n(&b->value, __ATOMIC_SEQ_CST);
    while (v > 0) {
        if (__atomic_compare_exchange_n(&b->value, &v, v - 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return 1;
    }
    return 0;
}

static void
record_holder(gf_block *b, int pid)
{
    int i;
    if (__atomic_load_n(&b->flags, __ATOMIC_RELAXED) & (GF_F_HANDOFF | GF_F_OVERFLOW))
        return;
    for (i = 0; i < GF_NHOLD; i++) {
        int32_t expected = 0;
        if (__atomic_compare_exchange_n(&b->holders[i], &expected, pid, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
            return;
    }
    __atomic_or_fetch(&b->flags, GF_F_OVERFLOW, __ATOMIC_SEQ_CST);
}

static void
forget_holder(gf_block *b, int pid)
{
    int i;
    uint32_t flags = __atomic_load_n(&b->flags, __ATOMIC_RELAXED);
    if (flags & (GF_F_HANDOFF | GF_F_OVERFLOW))
        return;
    for (i = 0; i < GF_NHOLD; i++) {
        int32_t expected = pid;
        if (__atomic_compare_exchange_n(&b->holders[i], &expected, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
            return;
    }
    /* Released by a process that holds no slot: a hand-off or a signal.  Holder records no longer
       say who holds what, so stop judging by them. */
    __atomic_or_fetch(&b->flags, GF_F_HANDOFF, __ATOMIC_SEQ_CST);
}

/* The pid of a recorded holder that is dead, or 0. */
static int
dead_holder(gf_block *b)
{
    int i;
    if (b->kind == GF_RECURSIVE) {
        int pid = __atomic_load_n(&b->owner_pid, __ATOMIC_SEQ_CST);
        return (pid && !pid_alive(pid)) ? pid : 0;
    }
    if (__atomic_load_n(&b->flags, __ATOMIC_SEQ_CST) & (GF_F_HANDOFF | GF_F_OVERFLOW))
        return 0;
    for (i = 0; i < GF_NHOLD; i++) {
        int pid = __atomic_load_n(&b->holders[i], __ATOMIC_SEQ_CST);
        if (pid && !pid_alive(pid))
            return pid;
    }
    return 0;
}

/* Take the place of dead holder `pid`: 1 + the slot taken (0 for a recursive lock) on success, 0
   if someone else was faster. */
static int
take_over(gf_block *b, int pid, int me, uint64_t tid)
{
    int i;
    if (b->kind == GF_RECURSIVE) {
        int32_t expected = pid;
        if (!__atomic_compare_exchange_n(&b->owner_pid, &expected, me, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return 0;
        b->owner_tid = tid;
        b->rcount = 1;
        return 1;
    }
    for (i = 0; i < GF_NHOLD; i++) {
        int32_t expected = pid;
        if (__atomic_compare_exchange_n(&b->holders[i], &expected, me, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
            set_lock_owner(b, me, tid);
            return 1 + i;
        }
    }
    return 0;
}

/* Undo take_over() (its caller is not going to return the lock to Python code): the dead process is
   the recorded holder again, so the next waiter finds it as this one did. */
static void
undo_take_over(gf_block *b, int taken, int pid, int me)
{
    if (b->kind == GF_RECURSIVE) {
        b->owner_tid = 0;
        b->rcount = 1;
        __atomic_store_n(&b->owner_pid, pid, __ATOMIC_SEQ_CST);
        return;
    }
    set_lock_owner(b, pid, 0);
    __atomic_compare_exchange_n(&b->holders[taken - 1], &me, pid, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

static int
SemBlock_init(SemBlock *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer", "offset", "init", "kind", "value", "maxvalue", "mode", NULL};
    PyObject *buffer;
    Py_ssize_t offset;
    int init, kind = GF_SEMAPHORE, mode = 0;
    long long value = 1, maxvalue = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Onp|iLLi", kwlist, &buffer, &offset, &init, &kind,
                                     &value, &maxvalue, &mode))
        return -1;
    if (self->has_view) {
        PyErr_SetString(PyExc_RuntimeError, "SemBlock already initialised");
        return -1;
    }
    if (kind != GF_SEMAPHORE && kind != GF_RECURSIVE) {
        PyErr_Format(PyExc_ValueError, "unknown kind %d", kind);
        return -1;
    }
    if (value < 0 || maxvalue < 0 || value > maxvalue || maxvalue > INT_MAX ||
        (kind == GF_RECURSIVE && maxvalue != 1)) {
        PyErr_Format(PyExc_ValueError, "invalid value %lld / maxvalue %lld", value, maxvalue);
        return -1;
    }
    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE) < 0)
        return -1;
    self->has_view = 1;
    if (offset < 0 || offset % 8 != 0 || offset + (Py_ssize_t)sizeof(gf_block) > self->view.len) {
        PyErr_Format(PyExc_ValueError, "offset %zd does not leave room for a block of %zu bytes", offset,
                     sizeof(gf_block));
        return -1;
    }
    self->b = (gf_block *)((char *)self->view.buf + offset);
    if (mode < 0 || mode > 2) {
        PyErr_Format(PyExc_ValueError, "unknown mode %d", mode);
        return -1;
    }
    self->mode = mode;
    self->recovered_pid = 0;
    if (init) {
        memset(self->b, 0, sizeof(gf_block));
        self->b->kind = (uint32_t)kind;
        self->b->maxvalue = (uint32_t)maxvalue;
        self->b->magic = GF_MAGIC;
        __atomic_store_n(&self->b->value, (uint32_t)value, __ATOMIC_SEQ_CST);
    }
    else if (self->b->magic != GF_MAGIC) {
        PyErr_SetString(PyExc_ValueError, "no lock block at this offset (not initialised, or overwritten)");
        return -1;
    }
    return 0;
}

static void
SemBlock_dealloc(SemBlock *self)
{
    if (self->has_view)
        PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject SemBlockType; /* defined below */

static int
check_ready(SemBlock *self)
{
    if (self->b == NULL) {
        PyErr_SetString(PyExc_ValueError, "lock block is not initialised");
        return -1;
    }
    return 0;
}

static PyObject *
raise_owner_died(SemBlock *self, int pid)
{
    PyObject *exc_type = owner_died_error ? owner_died_error : PyExc_RuntimeError;
    PyObject *args = Py_BuildValue("(iO)", pid, (PyObject *)self);
    if (args != NULL) {
        PyErr_SetObject(exc_type, args);
        Py_DECREF(args);
    }
    return NULL;
}

/* Sleep until a slot is free, the deadline passes (-1: never) or a holder is found dead.
   Returns 1 (took a slot), 0 (timed out), -1 (exception set). */
static int
wait_for_slot(SemBlock *self, long long deadline, int me, uint64_t tid, int *taken)
{
    gf_block *b = self->b;
    int result = 0;
    __atomic_add_fetch(&b->waiters, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        long long slice = GF_SLICE_NS, now;
        int err, dead;
        if (try_take(b)) {
            result = 1;
            break;
        }
        if (deadline >= 0) {
            now = now_ns();
            if (now >= deadline) {
                result = 0;
                break;
            }
            if (deadline - now < slice)
                slice = deadline - now;
        }
        Py_BEGIN_ALLOW_THREADS
        err = futex_wait(&b->value, 0, slice);
        Py_END_ALLOW_THREADS
        /* Not only after EINTR: a signal that arrived while this thread was not inside the futex
           call (taking the GIL back, checking holders) has set Python's flag all the same, and would
           otherwise wait until the whole acquire ends -- forever without a timeout. */
        if (PyErr_CheckSignals() < 0) {
            result = -1;
            break;
        }
        if (try_take(b)) {
            result = 1;
            break;
        }
        if (err == ETIMEDOUT && (dead = dead_holder(b)) != 0) {
            if (self->mode >= 1 && (*taken = take_over(b, dead, me, tid)) != 0) {
                self->recovered_pid = dead;
                result = 2;
                break;
            }
            if (self->mode == 0) {
                raise_owner_died(self, dead);
                result = -1;
                break;
            }
        }
    }
    __atomic_sub_fetch(&b->waiters, 1, __ATOMIC_SEQ_CST);
    return result;
}

static PyObject *
do_acquire(SemBlock *self, int blocking, PyObject *timeout_obj)
{
    gf_block *b;
    int me, r, taken = 0;
    uint64_t tid;
    long long deadline = -1;
    if (check_ready(self) < 0)
        return NULL;
    b = self->b;
    me = my_pid();
    tid = (uint64_t)PyThread_get_thread_ident();
    if (b->kind == GF_RECURSIVE && __atomic_load_n(&b->owner_pid, __ATOMIC_SEQ_CST) == me &&
        b->owner_tid == tid) {
        b->rcount++;
        Py_RETURN_TRUE;
    }
    if (try_take(b)) {
        r = 1;
    }
    else {
        int spin;
        r = 0;
        /* A critical section of Python code lasts a microsecond or two: when the holder runs on
           another CPU, polling for that long is cheaper than a futex sleep and wake-up. */
        if (blocking) {
            for (spin = 0; spin < GF_SPIN; spin++) {
                cpu_relax();
                if (__atomic_load_n(&b->value, __ATOMIC_RELAXED) > 0 && try_take(b)) {
                    r = 1;
                    break;
                }
            }
        }
        if (r) {
            /* taken while spinning */
        }
        else if (!blocking) {
            r = 0;
        }
        else {
            if (timeout_obj != NULL && timeout_obj != Py_None) {
                double t = PyFloat_AsDouble(timeout_obj);
                if (t == -1.0 && PyErr_Occurred())
                    return NULL;
                if (t < 0)
                    t = 0;
                deadline = now_ns() + (long long)(t * 1e9);
            }
            r = wait_for_slot(self, deadline, me, tid, &taken);
            if (r < 0)
                return NULL;
            if (r == 2) { /* took a dead holder's place: its records are ours now; tell the caller */
                /* mode 2: the caller repairs what the lock protects itself (a queue): no warning */
                if (self->mode == 1 && owner_died_warning != NULL &&
                    PyErr_WarnFormat(owner_died_warning, 1,
                                     "took over a %s whose holder, pid %d, died while holding it; the data it "
                                     "protected may be half-updated", Py_TYPE(self)->tp_name,
                                     self->recovered_pid) < 0) {
                    /* the warning is an error here (a warnings filter): acquire() raises, so the
                       caller does not hold the lock -- give it back to the dead holder */
                    undo_take_over(b, taken, self->recovered_pid, me);
                    self->recovered_pid = 0;
                    return NULL;
                }
                Py_RETURN_TRUE;
            }
        }
    }
    if (!r)
        Py_RETURN_FALSE;
    self->recovered_pid = 0; /* this acquire took no dead holder's place */
    if (b->kind == GF_RECURSIVE) {
        b->owner_tid = tid;
        b->rcount = 1;
        __atomic_store_n(&b->owner_pid, me, __ATOMIC_SEQ_CST);
    }
    else {
        record_holder(b, me);
        set_lock_owner(b, me, tid);
    }
    Py_RETURN_TRUE;
}

static PyObject *
SemBlock_acquire(SemBlock *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"block", "timeout", NULL};
    int blocking = 1;
    PyObject *timeout_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|pO", kwlist, &blocking, &timeout_obj))
        return NULL;
    return do_acquire(self, blocking, timeout_obj);
}

/* For other extensions (the queue's C path, through the capsule _csync._C_API): acquire without
   waiting a SemBlock that is not recursive.  1: acquired, 0: taken by someone else, -1: an exception
   (not a SemBlock, or a recursive lock).  What acquire(False) does, without parsing arguments. */
static int
capi_try_acquire(PyObject *obj)
{
    SemBlock *self = (SemBlock *)obj;
    gf_block *b;
    int me;
    if (!PyObject_TypeCheck(obj, &SemBlockType)) {
        PyErr_SetString(PyExc_TypeError, "not a SemBlock");
        return -1;
    }
    if (check_ready(self) < 0)
        return -1;
    b = self->b;
    if (b->kind == GF_RECURSIVE) {
        PyErr_SetString(PyExc_TypeError, "a recursive lock");
        return -1;
    }
    if (!try_take(b))
        return 0;
    me = my_pid();
    self->recovered_pid = 0;
    record_holder(b, me);
    set_lock_owner(b, me, (uint64_t)PyThread_get_thread_ident());
    return 1;
}

static PyObject *SemBlock_release(SemBlock *self, PyObject *Py_UNUSED(ignored));

/* release(), for other extensions: 0, or -1 with an exception. */
static int
capi_release(PyObject *obj)
{
    PyObject *r = SemBlock_release((SemBlock *)obj, NULL);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static PyObject *
SemBlock_release(SemBlock *self, PyObject *Py_UNUSED(ignored))
{
    gf_block *b;
    int me;
    uint32_t v;
    if (check_ready(self) < 0)
        return NULL;
    b = self->b;
    me = my_pid();
    if (b->kind == GF_RECURSIVE) {
        if (__atomic_load_n(&b->owner_pid, __ATOMIC_SEQ_CST) != me ||
            b->owner_tid != (uint64_t)PyThread_get_thread_ident() || b->rcount == 0) {
            PyErr_SetString(PyExc_AssertionError, "attempt to release recursive lock not owned by thread");
            return NULL;
        }
        if (--b->rcount > 0)
            Py_RETURN_NONE;
        b->owner_tid = 0;
        __atomic_store_n(&b->owner_pid, 0, __ATOMIC_SEQ_CST);
        __atomic_store_n(&b->value, 1, __ATOMIC_SEQ_CST);
    }
    else {
        v = __atomic_load_n(&b->value, __ATOMIC_SEQ_CST);
        if (v >= b->maxvalue) {
            PyErr_SetString(PyExc_ValueError, "semaphore or lock released too many times");
            return NULL;
        }
        /* the owner fields go before the slot is given back: the next owner's must survive */
        set_lock_owner(b, 0, 0);
        do {
            if (v >= b->maxvalue) {
                PyErr_SetString(PyExc_ValueError, "semaphore or lock released too many times");
                return NULL;
            }
        } while (!__atomic_compare_exchange_n(&b->value, &v, v + 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
        forget_holder(b, me);
    }
    if (__atomic_load_n(&b->waiters, __ATOMIC_SEQ_CST) > 0)
        futex_wake(&b->value, 1);
    Py_RETURN_NONE;
}

static PyObject *
SemBlock_enter(SemBlock *self, PyObject *Py_UNUSED(ignored))
{
    return do_acquire(self, 1, NULL);
}

static PyObject *
SemBlock_exit(SemBlock *self, PyObject *args)
{
    return SemBlock_release(self, NULL);
}

static PyObject *
SemBlock_get_value(SemBlock *self, PyObject *Py_UNUSED(ignored))
{
    if (check_ready(self) < 0)
        return NULL;
    return PyLong_FromUnsignedLong(__atomic_load_n(&self->b->value, __ATOMIC_SEQ_CST));
}

static PyObject *
SemBlock_is_zero(SemBlock *self, PyObject *Py_UNUSED(ignored))
{
    if (check_ready(self) < 0)
        return NULL;
    return PyBool_FromLong(__atomic_load_n(&self->b->value, __ATOMIC_SEQ_CST) == 0);
}

/* Recursion depth held by the calling thread (recursive locks) or the slots held by this process. */
static PyObject *
SemBlock_count(SemBlock *self, PyObject *Py_UNUSED(ignored))
{
    gf_block *b;
    int i, n = 0, me = my_pid();
    if (check_ready(self) < 0)
        return NULL;
    b = self->b;
    if (b->kind == GF_RECURSIVE) {
        if (__atomic_load_n(&b->owner_pid, __ATOMIC_SEQ_CST) == me &&
            b->owner_tid == (uint64_t)PyThread_get_thread_ident())
            return PyLong_FromUnsignedLong(b->rcount);
        return PyLong_FromLong(0);
    }
    if (is_lock(b)) /* as the stdlib's: 1 while a thread of this process holds it */
        return PyLong_FromLong(__atomic_load_n(&b->owner_pid, __ATOMIC_SEQ_CST) == me);
    for (i = 0; i < GF_NHOLD; i++)
        if (__atomic_load_n(&b->holders[i], __ATOMIC_SEQ_CST) == me)
            n++;
    return PyLong_FromLong(n);
}

static PyObject *
SemBlock_is_mine(SemBlock *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *n;
    if (check_ready(self) < 0)
        return NULL;
    if (is_lock(self->b)) /* held by this thread */
        return PyBool_FromLong(__atomic_load_n(&self->b->owner_pid, __ATOMIC_SEQ_CST) == my_pid() &&
                               __atomic_load_n(&self->b->owner_tid, __ATOMIC_SEQ_CST) ==
                                   (uint64_t)PyThread_get_thread_ident());
    n = SemBlock_count(self, NULL);
    int r;
    if (n == NULL)
        return NULL;
    r = PyObject_IsTrue(n);
    Py_DECREF(n);
    return PyBool_FromLong(r > 0);
}

/* Owner pid of a (recursive) lock, or the first recorded holder of a semaphore (0: none known). */
static PyObject *
SemBlock_owner(SemBlock *self, PyObject *Py_UNUSED(ignored))
{
    gf_block *b;
    int i;
    if (check_ready(self) < 0)
        return NULL;
    b = self->b;
    if (b->kind == GF_RECURSIVE || is_lock(b))
        return PyLong_FromLong(__atomic_load_n(&b->owner_pid, __ATOMIC_SEQ_CST));
    for (i = 0; i < GF_NHOLD; i++) {
        int pid = __atomic_load_n(&b->holders[i], __ATOMIC_SEQ_CST);
        if (pid)
            return PyLong_FromLong(pid);
    }
    return PyLong_FromLong(0);
}

static PyObject *
SemBlock_dead_holder(SemBlock *self, PyObject *Py_UNUSED(ignored))
{
    if (check_ready(self) < 0)
        return NULL;
    return PyLong_FromLong(dead_holder(self->b));
}

static PyObject *
SemBlock_tracking(SemBlock *self, PyObject *Py_UNUSED(ignored))
{
    if (check_ready(self) < 0)
        return NULL;
    if (self->b->kind == GF_RECURSIVE)
        Py_RETURN_TRUE;
    return PyBool_FromLong(!(__atomic_load_n(&self->b->flags, __ATOMIC_SEQ_CST) & (GF_F_HANDOFF | GF_F_OVERFLOW)));
}

static PyObject *
SemBlock_get_recovered(SemBlock *self, void *closure)
{
    return PyLong_FromLong(self->recovered_pid);
}

static PyObject *
SemBlock_get_mode(SemBlock *self, void *closure)
{
    return PyLong_FromLong(self->mode);
}

static PyObject *
SemBlock_get_kind(SemBlock *self, void *closure)
{
    if (check_ready(self) < 0)
        return NULL;
    return PyLong_FromUnsignedLong(self->b->kind);
}

static PyObject *
SemBlock_get_maxvalue(SemBlock *self, void *closure)
{
    if (check_ready(self) < 0)
        return NULL;
    return PyLong_FromUnsignedLong(self->b->maxvalue);
}

static PyMethodDef SemBlock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))SemBlock_acquire, METH_VARARGS | METH_KEYWORDS,
     "acquire(block=True, timeout=None) -> bool"},
    {"release", (PyCFunction)SemBlock_release, METH_NOARGS, "release()"},
    {"__enter__", (PyCFunction)SemBlock_enter, METH_NOARGS, "acquire()"},
    {"__exit__", (PyCFunction)SemBlock_exit, METH_VARARGS, "release()"},
    {"_get_value", (PyCFunction)SemBlock_get_value, METH_NOARGS, "free slots"},
    {"_is_zero", (PyCFunction)SemBlock_is_zero, METH_NOARGS, "no free slot"},
    {"_count", (PyCFunction)SemBlock_count, METH_NOARGS,
     "depth held by this thread (recursive lock), 1 if this process holds it (lock), slots held by this process"},
    {"_is_mine", (PyCFunction)SemBlock_is_mine, METH_NOARGS, "held by this thread (locks) or process (semaphores)"},
    {"_owner", (PyCFunction)SemBlock_owner, METH_NOARGS, "pid of the owner or of a recorded holder, 0 if none"},
    {"_dead_holder", (PyCFunction)SemBlock_dead_holder, METH_NOARGS, "pid of a dead recorded holder, or 0"},
    {"_tracking", (PyCFunction)SemBlock_tracking, METH_NOARGS, "whether holder records are meaningful"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef SemBlock_getset[] = {
    {"_recovered_from", (getter)SemBlock_get_recovered, NULL, "pid whose place the last acquire took, or 0", NULL},
    {"_mode", (getter)SemBlock_get_mode, NULL, "0: raise on a dead holder, 1: take over", NULL},
    {"_kind", (getter)SemBlock_get_kind, NULL, "0: semaphore, 1: recursive lock", NULL},
    {"_maxvalue", (getter)SemBlock_get_maxvalue, NULL, "the most free slots", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SemBlockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gilfree._csync.SemBlock",
    .tp_doc = "A robust lock or semaphore stored in a shared-memory block.",
    .tp_basicsize = sizeof(SemBlock),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)SemBlock_init,
    .tp_dealloc = (destructor)SemBlock_dealloc,
    .tp_methods = SemBlock_methods,
    .tp_getset = SemBlock_getset,
};

static PyObject *
set_classes(PyObject *module, PyObject *args)
{
    PyObject *error, *warning;
    if (!PyArg_ParseTuple(args, "OO", &error, &warning))
        return NULL;
    Py_INCREF(error);
    Py_XSETREF(owner_died_error, error);
    Py_INCREF(warning);
    Py_XSETREF(owner_died_warning, warning);
    Py_RETURN_NONE;
}

static PyObject *
module_pid_alive(PyObject *module, PyObject *arg)
{
    long pid = PyLong_AsLong(arg);
    if (pid == -1 && PyErr_Occurred())
        return NULL;
    if (pid <= 0 || pid > INT_MAX)
        Py_RETURN_FALSE;
    return PyBool_FromLong(pid_alive((int)pid));
}

static PyMethodDef module_methods[] = {
    GF_CRASH_METHODS
    {"set_classes", set_classes, METH_VARARGS, "set_classes(error, warning): raised / warned for a dead holder"},
    {"pid_alive", module_pid_alive, METH_O, "pid_alive(pid): the process runs (is neither gone nor a zombie)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef csync_module = {
    PyModuleDef_HEAD_INIT, "gilfree._csync", "Robust inter-process locks over shared memory (futex based).",
    -1, module_methods,
};

PyMODINIT_FUNC
PyInit__csync(void)
{
    PyObject *m;
    if (PyType_Ready(&SemBlockType) < 0)
        return NULL;
    refresh_pid();
    gf_crash_from_env();
    pthread_atfork(NULL, NULL, refresh_pid);
    m = PyModule_Create(&csync_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&SemBlockType);
    if (PyModule_AddObject(m, "SemBlock", (PyObject *)&SemBlockType) < 0) {
        Py_DECREF(&SemBlockType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "BLOCK_SIZE", (long)sizeof(gf_block));
    PyModule_AddIntConstant(m, "SEMAPHORE", GF_SEMAPHORE);
    PyModule_AddIntConstant(m, "RECURSIVE", GF_RECURSIVE);
    PyModule_AddIntConstant(m, "SLICE_MS", (long)(GF_SLICE_NS / 1000000));
    {
        static gf_lock_capi capi = {GF_LOCK_CAPI_VERSION, capi_try_acquire, capi_release};
        PyObject *capsule = PyCapsule_New(&capi, "gilfree._csync._C_API", NULL);
        if (capsule == NULL || PyModule_AddObject(m, "_C_API", capsule) < 0) {
            Py_XDECREF(capsule);
            Py_DECREF(m);
            return NULL;
        }
    }
    return m;
}
