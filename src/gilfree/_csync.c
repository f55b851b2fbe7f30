/*
 * gilfree._csync: robust inter-process locks, semaphores and condition variables over shared memory
 * (layer L1, C).
 *
 *   process A                          shared block (in a memfd arena)                process B
 *   ---------                          ------------------------------                 ---------
 *   Lock.acquire(): CAS word          | word (64 bits, one atomic unit):  | <----- acquire(): word held:
 *     0 -> {pidA, tidA}  (one step:   |   value: futex half: 0 free, or   |          set W, futex_wait(value)
 *     the state IS the holder)        |          owner pid | W (waiters)  |          every 100 ms: owner pid
 *   release(): word -> 0; W? wake 1   |   aux:   owner kernel thread id   |          dead? -> OwnerDiedError
 *                                     |          (semaphores: the journal)|          or CAS it over to itself
 *   Semaphore.acquire():              | flags (HANDOFF, OVERFLOW), rcount |
 *     claim holders[i] = pidA|PENDING | holders[56]: pid, or pid|PENDING  |
 *     CAS word {n, 0} -> {n-1, op}    +-----------------------------------+
 *     holders[i] = pidA; op -> 0        op = the pending-operation journal: (pid, acquire/release, slot)
 *
 * Every state between two instructions is either harmless or recognisable by a waiter, so a process
 * SIGKILLed anywhere never leaves a lock held by nobody on record, nor a record of a holder that does
 * not hold it (issue 11; each step below is a named crash point, killed in tests/test_lock_crash.py):
 *
 *  - Lock (a semaphore with maxvalue 1) and RLock: the holder's pid and kernel thread id ARE the lock
 *    word, written by the compare-and-swap that takes it and cleared by the exchange that frees it
 *    (the kernel's robust futexes keep the owner TID in the futex word for the same reason).  A
 *    waiter that has slept a slice and finds the pid in the word dead raises OwnerDiedError(pid), or,
 *    in takeover mode, swaps the dead pid for its own: a live holder can never be taken over, a dead
 *    one is always found.  The waiters bit W is set by a sleeper before it sleeps and cleared by the
 *    release, which then wakes one; the woken thread takes the lock with W set again (it cannot know
 *    whether others sleep), as in Drepper's mutex ("Futexes Are Tricky", mutex3).  A sleeper killed
 *    in its sleep costs at most one needless wake-up, never a system call on every later release.
 *  - Counting semaphores have no single owner, so the holder table cannot live in the word.  The
 *    word's second half is a journal of the one operation in progress (pid, acquire or release, slot),
 *    as the kernel's robust list has list_op_pending: the count and the journal change in one 64-bit
 *    compare-and-swap, then the holder slot is written, then the journal is cleared.  Any process that
 *    finds the journal naming a dead pid finishes the step for it (repair()); a slot claimed but never
 *    paid for (pid|PENDING with no journal naming it) is freed.  While the journal is set nobody else
 *    changes the count (it is held for a few instructions).
 *  - Condition: each sleeper has a slot (state + pid) in the condition's block; notify() marks up to
 *    n live sleepers' slots NOTIFIED and wakes each on its own slot, so there is no shared token a
 *    death can leak and notify never waits for a sleeper (the stdlib's notify waits for each woken
 *    sleeper to report, forever if it was killed).
 *
 * A Lock may be released by a process other than the one that acquired it (the stdlib allows it);
 * the first such release sets HANDOFF and turns the dead-holder check off for that lock, as holder
 * records no longer say who is responsible for releasing it.  A pid reused by a new process after
 * its holder died is seen as alive (pids wrap only after pid_max processes).
 *
 * Where this runs: any thread of any process that maps the block.  acquire() and wait() release the
 * GIL while they sleep in FUTEX_WAIT and handle signals (Ctrl-C raises KeyboardInterrupt); no step
 * between two changes of shared state runs Python code, so a signal handler cannot interrupt one.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "_crash.h"
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define GF_NHOLD 56
#define GF_SEMAPHORE 0
#define GF_RECURSIVE 1
#define GF_F_HANDOFF 1u
#define GF_F_OVERFLOW 2u
#define GF_W 0x80000000u       /* value: someone may sleep on the word */
#define GF_PENDING 0x80000000u /* holders[i]: claimed, not yet paid for */
#define GF_OP_RELEASE 0x80u    /* journal: the operation is a release */
#define GF_SLICE_NS 100000000LL /* how long a waiter sleeps before it looks for a dead holder */
#define GF_SPIN 400             /* polls of a taken lock before sleeping (about 2-4 us) */
#define GF_FOREVER_S 1e9        /* timeouts longer than this (about 31 years) mean "no timeout" */

static inline void
cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

typedef union {
    uint64_t all;
    struct {
        uint32_t value; /* the futex word */
        uint32_t aux;   /* locks: owner thread id; semaphores: the journal */
    } h;
} gf_word;

typedef struct {
    uint64_t word; /* a gf_word, only ever changed as a whole (64-bit atomics) */
    uint32_t maxvalue;
    uint32_t kind;
    uint32_t flags;
    uint32_t magic;
    uint32_t rcount; /* recursive lock: depth, changed by the owner only */
    uint32_t reserved;
    int32_t holders[GF_NHOLD];
} gf_block;

#define GF_MAGIC 0x67665332u /* "gfS2" */

/* What other extensions may call (the capsule gilfree._csync._C_API; keep in step with _cqueue.c):
   a non-blocking acquire and a release of a (non-recursive) SemBlock, without argument parsing. */
#define GF_LOCK_CAPI_VERSION 1
typedef struct {
    int version;
    int (*try_acquire)(PyObject *lock); /* 1 acquired, 0 busy, -1 exception */
    int (*release)(PyObject *lock);     /* 0, or -1 exception */
} gf_lock_capi;

static inline uint64_t
pack(uint32_t value, uint32_t aux)
{
    gf_word w;
    w.h.value = value;
    w.h.aux = aux;
    return w.all;
}

static inline uint32_t
wval(uint64_t all)
{
    gf_word w;
    w.all = all;
    return w.h.value;
}

static inline uint32_t
waux(uint64_t all)
{
    gf_word w;
    w.all = all;
    return w.h.aux;
}

static inline uint32_t *
futex_addr(gf_block *b)
{
    return &((gf_word *)&b->word)->h.value;
}

static inline uint64_t
load_word(gf_block *b)
{
    return __atomic_load_n(&b->word, __ATOMIC_SEQ_CST);
}

static inline int
cas_word(gf_block *b, uint64_t *expected, uint64_t desired)
{
    return __atomic_compare_exchange_n(&b->word, expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

/* getpid() and gettid() are system calls; both are cached, and refreshed in a forked child. */
static int cached_pid = 0;
static __thread uint32_t cached_tid = 0;

static void
refresh_ids(void)
{
    cached_pid = (int)getpid();
    cached_tid = 0;
}

static inline int
my_pid(void)
{
    return cached_pid;
}

/* The kernel's id of the calling thread: unique among the live threads of the machine, so that
   {pid, tid} in one word names one thread of one process. */
static inline uint32_t
my_tid(void)
{
    if (__builtin_expect(cached_tid == 0, 0))
        cached_tid = (uint32_t)syscall(SYS_gettid);
    return cached_tid;
}

static PyObject *owner_died_error = NULL;   /* set by set_classes() */
static PyObject *owner_died_warning = NULL; /* set by set_classes() */

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    gf_block *b;
    int mode; /* 0: raise OwnerDiedError, 1: take the dead holder's place (warn), 2: same, silently */
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

/* Wake up to n sleepers; the number woken. */
static long
futex_wake(uint32_t *addr, int n)
{
    long r = syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0);
    return r < 0 ? 0 : r;
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
    if (p != NULL && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X')) {
        /* a zombie leader may still have live threads (its main thread called pthread_exit):
           the process lives while /proc/pid/status counts more than one thread */
        char *t;
        snprintf(path, sizeof(path), "/proc/%d/status", pid);
        f = fopen(path, "r");
        if (f == NULL)
            return 0;
        n = fread(buf, 1, sizeof(buf) - 1, f);
        while (n == sizeof(buf) - 1 && (t = strstr(buf, "Threads:")) == NULL) {
            /* the line is further on: keep the tail, read on */
            memmove(buf, buf + n - 16, 16);
            n = 16 + fread(buf + 16, 1, sizeof(buf) - 17, f);
            buf[n] = 0;
        }
        fclose(f);
        buf[n] = 0;
        t = strstr(buf, "Threads:");
        return t != NULL && strtol(t + 8, NULL, 10) > 1;
    }
    return 1;
}

/* A timeout object (None, or seconds) as an absolute deadline in ns; -1: none.  -2: error set. */
static long long
deadline_from(PyObject *timeout_obj)
{
    double t;
    if (timeout_obj == NULL || timeout_obj == Py_None)
        return -1;
    t = PyFloat_AsDouble(timeout_obj);
    if (t == -1.0 && PyErr_Occurred())
        return -2;
    if (isnan(t)) {
        PyErr_SetString(PyExc_ValueError, "timeout must be a number of seconds or None, not nan");
        return -2;
    }
    if (t > GF_FOREVER_S)
        return -1;
    if (t < 0)
        t = 0;
    return now_ns() + (long long)(t * 1e9);
}

/* Locks and recursive locks keep their owner in the word; counting semaphores keep a holder table. */
static inline int
is_owned(gf_block *b)
{
    return b->kind == GF_RECURSIVE || b->maxvalue == 1;
}

static inline int
tracking(gf_block *b)
{
    return !(__atomic_load_n(&b->flags, __ATOMIC_SEQ_CST) & (GF_F_HANDOFF | GF_F_OVERFLOW));
}

/* ---------------------------------------------------------------------------------------------
 * Lock and RLock: the word is 0 (free) or {owner pid | W, owner tid}.
 * --------------------------------------------------------------------------------------------- */

static inline int
owner_of(uint64_t w)
{
    return (int)(wval(w) & ~GF_W);
}

static inline int
lock_try(gf_block *b, int me, uint32_t tid, uint32_t wbit)
{
    uint64_t expected = 0;
    if (!cas_word(b, &expected, pack((uint32_t)me | wbit, tid)))
        return 0;
    GF_CRASH_POINT("lock.acquire.taken");
    if (b->kind == GF_RECURSIVE)
        b->rcount = 1;
    return 1;
}

/* The pid of the lock's owner if that process is dead (and the lock was never handed off), or 0.
   The word is read again after the pid is found dead: an owner that released the lock and exited
   between the first read and the check did not die holding it (a dead process changes nothing). */
static int
lock_dead_owner(gf_block *b)
{
    int pid = owner_of(load_word(b));
    if (pid == 0 || (b->kind != GF_RECURSIVE && !tracking(b)))
        return 0;
    GF_CRASH_POINT("lock.check.read");
    if (pid_alive(pid))
        return 0;
    return owner_of(load_word(b)) == pid ? pid : 0;
}

/* Swap dead owner `pid` for this thread; 1 on success (0: someone else was first, or it moved). */
static int
lock_take_over(gf_block *b, int pid, int me, uint32_t tid)
{
    uint64_t w = load_word(b);
    if (owner_of(w) != pid)
        return 0;
    if (!cas_word(b, &w, pack((uint32_t)me | GF_W, tid)))
        return 0;
    GF_CRASH_POINT("lock.takeover.swapped");
    if (b->kind == GF_RECURSIVE)
        b->rcount = 1;
    return 1;
}

/* What a wait ends with. */
#define GF_TIMEOUT 0
#define GF_TOOK 1
#define GF_TOOK_OVER 2
#define GF_DEAD 3   /* the holder is dead (its pid in *dead) and this lock raises */
#define GF_ERROR -1 /* an exception is set */

/* Sleep until the lock is free, the deadline passes (-1: never) or its owner is found dead. */
static int
lock_wait(SemBlock *self, long long deadline, int me, uint32_t tid, int *dead_out)
{
    gf_block *b = self->b;
    for (;;) {
        uint64_t w = load_word(b);
        long long slice = GF_SLICE_NS, now;
        int err, dead;
        if (w == 0) {
            if (lock_try(b, me, tid, GF_W)) /* W: others may sleep too */
                return GF_TOOK;
            continue;
        }
        if (!(wval(w) & GF_W)) {
            uint64_t with_w = pack(wval(w) | GF_W, waux(w));
            if (!cas_word(b, &w, with_w))
                continue;
            w = with_w;
            GF_CRASH_POINT("lock.wait.flagged");
        }
        if (deadline >= 0) {
            now = now_ns();
            if (now >= deadline)
                return 0;
            if (deadline - now < slice)
                slice = deadline - now;
        }
        Py_BEGIN_ALLOW_THREADS
        err = futex_wait(futex_addr(b), wval(w), slice);
        Py_END_ALLOW_THREADS
        /* Not only after EINTR: a signal that arrived while this thread was not inside the futex
           call has set Python's flag all the same, and would otherwise wait until the acquire ends. */
        if (PyErr_CheckSignals() < 0)
            return -1;
        if (err == ETIMEDOUT && (dead = lock_dead_owner(b)) != 0) {
            if (self->mode >= 1) {
                if (lock_take_over(b, dead, me, tid)) {
                    self->recovered_pid = dead;
                    return GF_TOOK_OVER;
                }
                continue;
            }
            *dead_out = dead;
            return GF_DEAD;
        }
    }
}

/* Release a Lock or RLock (any thread may release a Lock; only the owner an RLock). */
static int
lock_release(gf_block *b, int me)
{
    uint64_t old, w = load_word(b);
    if (b->kind == GF_RECURSIVE) {
        if (owner_of(w) != me || waux(w) != my_tid() || b->rcount == 0) {
            PyErr_SetString(PyExc_AssertionError, "attempt to release recursive lock not owned by thread");
            return -1;
        }
        if (--b->rcount > 0)
            return 0;
    }
    else if (w == 0) {
        PyErr_SetString(PyExc_ValueError, "semaphore or lock released too many times");
        return -1;
    }
    GF_CRASH_POINT("lock.release.before");
    old = __atomic_exchange_n(&b->word, 0, __ATOMIC_SEQ_CST);
    if (old == 0) { /* another thread released it between our look and the exchange */
        PyErr_SetString(PyExc_ValueError, "semaphore or lock released too many times");
        return -1;
    }
    GF_CRASH_POINT("lock.release.freed");
    if (owner_of(old) != me) /* released by a process that did not take it: a hand-off */
        __atomic_or_fetch(&b->flags, GF_F_HANDOFF, __ATOMIC_SEQ_CST);
    if (wval(old) & GF_W)
        futex_wake(futex_addr(b), 1);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Counting semaphores: the word is {count | W, journal}; journal = pid << 8 | op | slot + 1.
 * --------------------------------------------------------------------------------------------- */

static inline uint32_t
journal(int pid, uint32_t op, int slot)
{
    return ((uint32_t)pid << 8) | op | (uint32_t)(slot + 1);
}

/* Clear journal entry `entry` (if it is still there), keeping the count and W as they are. */
static void
clear_journal(gf_block *b, uint32_t entry)
{
    uint64_t w = load_word(b);
    while (waux(w) == entry) {
        if (cas_word(b, &w, pack(wval(w), 0)))
            return;
    }
}

/* Finish the step journalled by dead process: the count already changed, so write (acquire) or erase
   (release) its holder record, then clear the journal.  Idempotent: a repairer may die half-way. */
static void
repair(gf_block *b, uint32_t entry)
{
    int pid = (int)(entry >> 8), slot = (int)(entry & 0x7f) - 1;
    if (slot >= 0 && slot < GF_NHOLD) {
        int32_t expected;
        if (entry & GF_OP_RELEASE) {
            expected = pid;
            __atomic_compare_exchange_n(&b->holders[slot], &expected, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
        }
        else {
            expected = (int32_t)((uint32_t)pid | GF_PENDING);
            __atomic_compare_exchange_n(&b->holders[slot], &expected, pid, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST);
        }
    }
    GF_CRASH_POINT("sem.repair.fixed");
    clear_journal(b, entry);
}

/* The journal of `w` is set: another operation is between its two steps.  Wait for it a moment;
   if it stays, and its process is dead, finish it.  1: it stays and its process lives (preempted,
   or stopped by SIGSTOP between two instructions): the caller must not spin on, holding the GIL
   and ignoring its timeout, but wait as for a busy semaphore. */
static int
settle(gf_block *b, uint64_t w)
{
    uint32_t entry = waux(w);
    int i;
    for (i = 0; i < GF_SPIN; i++) {
        cpu_relax();
        if (waux(load_word(b)) != entry)
            return 0;
    }
    sched_yield();
    if (waux(load_word(b)) != entry)
        return 0;
    if (!pid_alive((int)(entry >> 8))) {
        repair(b, entry);
        return 0;
    }
    return 1;
}

/* Sleep a little without the GIL (a journal held by a stalled live process); -1 on a signal's
   exception. */
static int
pause_briefly(void)
{
    struct timespec ts = {0, 200000};
    Py_BEGIN_ALLOW_THREADS
    nanosleep(&ts, NULL);
    Py_END_ALLOW_THREADS
    return PyErr_CheckSignals();
}

/* Claim a holder slot for `me` (pid|PENDING); -1 if the table is full (tracking stops). */
static int
claim_slot(gf_block *b, int me)
{
    int i, round;
    for (round = 0; round < 2; round++) {
        for (i = 0; i < GF_NHOLD; i++) {
            int32_t expected = 0;
            if (__atomic_compare_exchange_n(&b->holders[i], &expected, (int32_t)((uint32_t)me | GF_PENDING), 0,
                                            __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
                return i;
        }
        /* full: free the claims of processes that died before paying for them, then look again */
        for (i = 0; i < GF_NHOLD; i++) {
            int32_t h = __atomic_load_n(&b->holders[i], __ATOMIC_SEQ_CST);
            if (((uint32_t)h & GF_PENDING) && !pid_alive((int)((uint32_t)h & ~GF_PENDING)) &&
                waux(load_word(b)) != journal((int)((uint32_t)h & ~GF_PENDING), 0, i))
                __atomic_compare_exchange_n(&b->holders[i], &h, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
        }
    }
    __atomic_or_fetch(&b->flags, GF_F_OVERFLOW, __ATOMIC_SEQ_CST);
    return -1;
}

static void
unclaim_slot(gf_block *b, int slot, int me)
{
    int32_t expected = (int32_t)((uint32_t)me | GF_PENDING);
    __atomic_compare_exchange_n(&b->holders[slot], &expected, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

/* Take one unit without waiting: 1 taken, 0 none free, 2 busy (the journal names a live process
   stalled between two steps). */
static int
sem_try(gf_block *b, int me)
{
    int slot = -1, tracked;
    uint64_t w = load_word(b), next;
    for (;;) {
        if (waux(w)) {
            if (settle(b, w)) {
                if (slot >= 0)
                    unclaim_slot(b, slot, me);
                return 2;
            }
            w = load_word(b);
            continue;
        }
        if ((wval(w) & ~GF_W) == 0) {
            if (slot >= 0)
                unclaim_slot(b, slot, me);
            return 0;
        }
        tracked = tracking(b);
        if (tracked && slot < 0) {
            slot = claim_slot(b, me);
            if (slot < 0)
                tracked = 0;
            GF_CRASH_POINT("sem.acquire.claimed");
            w = load_word(b);
            continue;
        }
        if (!tracked && slot >= 0) {
            unclaim_slot(b, slot, me);
            slot = -1;
        }
        next = pack(wval(w) - 1, tracked ? journal(me, 0, slot) : 0);
        if (cas_word(b, &w, next))
            break;
    }
    if (slot >= 0) {
        GF_CRASH_POINT("sem.acquire.taken");
        __atomic_store_n(&b->holders[slot], me, __ATOMIC_SEQ_CST);
        GF_CRASH_POINT("sem.acquire.recorded");
        clear_journal(b, waux(next));
    }
    return 1;
}

/* Wake one sleeper; if there was none (it died, or timed out), clear W so that later releases make
   no system call. */
static void
wake_one(gf_block *b)
{
    uint64_t w;
    if (futex_wake(futex_addr(b), 1) > 0)
        return;
    w = load_word(b);
    while (wval(w) & GF_W) {
        if (cas_word(b, &w, pack(wval(w) & ~GF_W, waux(w))))
            break;
    }
}

static int
find_own_slot(gf_block *b, int me)
{
    int i;
    for (i = 0; i < GF_NHOLD; i++)
        if (__atomic_load_n(&b->holders[i], __ATOMIC_SEQ_CST) == me)
            return i;
    return -1;
}

static int
sem_release(gf_block *b, int me)
{
    int slot = -1;
    uint64_t w, next;
    w = load_word(b);
    for (;;) {
        if (waux(w)) {
            if (settle(b, w) && pause_briefly() < 0)
                return -1; /* interrupted: nothing was released */
            w = load_word(b);
            continue;
        }
        if ((wval(w) & ~GF_W) >= b->maxvalue) {
            PyErr_SetString(PyExc_ValueError, "semaphore or lock released too many times");
            return -1;
        }
        /* looked up here, with no GIL release before the swap: two threads of this process
           releasing at once each erase a slot of their own */
        slot = (__atomic_load_n(&b->flags, __ATOMIC_SEQ_CST) & GF_F_HANDOFF) ? -1 : find_own_slot(b, me);
        next = pack(wval(w) + 1, slot >= 0 ? journal(me, GF_OP_RELEASE, slot) : 0);
        if (cas_word(b, &w, next))
            break;
    }
    if (slot >= 0) {
        int32_t expected = me;
        GF_CRASH_POINT("sem.release.given");
        __atomic_compare_exchange_n(&b->holders[slot], &expected, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
        GF_CRASH_POINT("sem.release.forgotten");
        clear_journal(b, waux(next));
    }
    else if (tracking(b)) {
        /* released by a process that holds no slot: a hand-off or a signal.  Holder records no
           longer say who holds what, so stop judging by them. */
        __atomic_or_fetch(&b->flags, GF_F_HANDOFF, __ATOMIC_SEQ_CST);
    }
    else if ((wval(next) & ~GF_W) == b->maxvalue && b->maxvalue < (uint32_t)INT_MAX) {
        /* a bounded semaphore whose holders outgrew the table is whole again: nobody holds a
           unit, so holder records can be trusted from here on */
        uint32_t flags = GF_F_OVERFLOW;
        __atomic_compare_exchange_n(&b->flags, &flags, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    }
    if (wval(next) & GF_W)
        wake_one(b);
    return 0;
}

/* The pid of a recorded holder that is dead, or 0 (repairing a dead process's half-done step and
   freeing its unpaid claims on the way).  A slot found with a dead pid counts only if, read again
   after the check, it still holds that pid and no journal is in flight: a holder that released
   and exited meanwhile, or died between the two steps of its release, is not one. */
static int
sem_dead_holder(gf_block *b)
{
    int i, round;
    for (round = 0; round < 4; round++) {
        uint64_t w = load_word(b);
        int again = 0;
        if (waux(w)) {
            if (pid_alive((int)(waux(w) >> 8)))
                return 0; /* a step in flight: judge later */
            repair(b, waux(w));
        }
        if (!tracking(b))
            return 0;
        GF_CRASH_POINT("sem.check.scan");
        for (i = 0; i < GF_NHOLD && !again; i++) {
            int32_t h = __atomic_load_n(&b->holders[i], __ATOMIC_SEQ_CST);
            int pid = (int)((uint32_t)h & ~GF_PENDING);
            if (h == 0 || pid_alive(pid))
                continue;
            if (waux(load_word(b))) { /* a journal appeared during the scan: settle it first */
                again = 1;
                break;
            }
            if (__atomic_load_n(&b->holders[i], __ATOMIC_SEQ_CST) != h)
                continue;
            if ((uint32_t)h & GF_PENDING) { /* never paid for: free the claim */
                __atomic_compare_exchange_n(&b->holders[i], &h, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
                continue;
            }
            return pid;
        }
        if (!again)
            return 0;
    }
    return 0;
}

/* Take the place of dead holder `pid`: 1 + the slot taken on success, 0 if someone was faster. */
static int
sem_take_over(gf_block *b, int pid, int me)
{
    int i;
    for (i = 0; i < GF_NHOLD; i++) {
        int32_t expected = pid;
        if (__atomic_compare_exchange_n(&b->holders[i], &expected, me, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return 1 + i;
    }
    return 0;
}

static int
sem_wait(SemBlock *self, long long deadline, int me, int *taken, int *dead_out)
{
    gf_block *b = self->b;
    for (;;) {
        uint64_t w;
        long long slice = GF_SLICE_NS, now;
        int err, dead, r = sem_try(b, me);
        if (r == 1)
            return GF_TOOK;
        w = load_word(b);
        if (r == 2) /* stalled journal: look again in a moment, honouring the deadline and signals */
            slice = 1000000;
        else if (waux(w) || (wval(w) & ~GF_W) > 0)
            continue;
        else if (!(wval(w) & GF_W)) {
            uint64_t with_w = pack(wval(w) | GF_W, 0);
            if (!cas_word(b, &w, with_w))
                continue;
            w = with_w;
        }
        if (deadline >= 0) {
            now = now_ns();
            if (now >= deadline)
                return 0;
            if (deadline - now < slice)
                slice = deadline - now;
        }
        Py_BEGIN_ALLOW_THREADS
        err = futex_wait(futex_addr(b), wval(w), slice);
        Py_END_ALLOW_THREADS
        if (PyErr_CheckSignals() < 0)
            return -1;
        if (r == 0 && err == ETIMEDOUT && (dead = sem_dead_holder(b)) != 0) {
            if (self->mode >= 1) {
                if ((*taken = sem_take_over(b, dead, me)) != 0) {
                    self->recovered_pid = dead;
                    return GF_TOOK_OVER;
                }
                continue;
            }
            *dead_out = dead;
            return GF_DEAD;
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * The Python type.
 * --------------------------------------------------------------------------------------------- */

/* Keep a writable view of `buffer` and return the address of a `size`-byte structure at `offset`
   in it (NULL with an exception).  What SemBlock and CondBlock share. */
static char *
attach_view(Py_buffer *view, int *has_view, const char *what, PyObject *buffer, Py_ssize_t offset, size_t size)
{
    if (*has_view) {
        PyErr_Format(PyExc_RuntimeError, "%s already initialised", what);
        return NULL;
    }
    if (PyObject_GetBuffer(buffer, view, PyBUF_WRITABLE) < 0)
        return NULL;
    *has_view = 1;
    if (offset < 0 || offset % 8 != 0 || offset + (Py_ssize_t)size > view->len) {
        PyErr_Format(PyExc_ValueError, "offset %zd does not leave room for a %s of %zu bytes", offset, what, size);
        return NULL;
    }
    return (char *)view->buf + offset;
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
    if (kind != GF_SEMAPHORE && kind != GF_RECURSIVE) {
        PyErr_Format(PyExc_ValueError, "unknown kind %d", kind);
        return -1;
    }
    if (value < 0 || maxvalue < 0 || value > maxvalue || maxvalue > INT_MAX ||
        (kind == GF_RECURSIVE && maxvalue != 1)) {
        PyErr_Format(PyExc_ValueError, "invalid value %lld / maxvalue %lld", value, maxvalue);
        return -1;
    }
    if (mode < 0 || mode > 2) {
        PyErr_Format(PyExc_ValueError, "unknown mode %d", mode);
        return -1;
    }
    self->b = (gf_block *)attach_view(&self->view, &self->has_view, "lock block", buffer, offset, sizeof(gf_block));
    if (self->b == NULL)
        return -1;
    self->mode = mode;
    self->recovered_pid = 0;
    if (init) {
        memset(self->b, 0, sizeof(gf_block));
        self->b->kind = (uint32_t)kind;
        self->b->maxvalue = (uint32_t)maxvalue;
        self->b->magic = GF_MAGIC;
        /* a lock's word is 0 when free (the owner is the word); a semaphore's is its count */
        if (is_owned(self->b) && value != 1) {
            PyErr_SetString(PyExc_ValueError, "a lock is created free (value 1)");
            return -1;
        }
        __atomic_store_n(&self->b->word, is_owned(self->b) ? 0 : pack((uint32_t)value, 0), __ATOMIC_SEQ_CST);
    }
    else if (self->b->magic != GF_MAGIC || self->b->kind > GF_RECURSIVE) {
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

/* Undo a take-over (the caller is not going to return the lock to Python code): the dead process
   is the recorded holder again, so the next waiter finds it as this one did. */
static void
undo_take_over(gf_block *b, int taken, int pid, int me)
{
    if (is_owned(b)) {
        uint64_t w = load_word(b);
        if (owner_of(w) == me)
            cas_word(b, &w, pack((uint32_t)pid | GF_W, 0));
        return;
    }
    __atomic_compare_exchange_n(&b->holders[taken - 1], &me, pid, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

/* acquire(): 1 True, 0 False, -1 exception. */
static int
acquire_block(SemBlock *self, int blocking, long long deadline)
{
    gf_block *b = self->b;
    int me = my_pid(), r, taken = 0, spin, dead = 0;
    if (is_owned(b)) {
        uint32_t tid = my_tid();
        if (b->kind == GF_RECURSIVE) {
            uint64_t w = load_word(b);
            if (owner_of(w) == me && waux(w) == tid) {
                b->rcount++;
                return 1;
            }
        }
        if (lock_try(b, me, tid, 0)) {
            self->recovered_pid = 0;
            return 1;
        }
        if (!blocking)
            return 0;
        /* A critical section of Python code lasts a microsecond or two: when the holder runs on
           another CPU, polling for that long is cheaper than a futex sleep and wake-up. */
        for (spin = 0; spin < GF_SPIN; spin++) {
            cpu_relax();
            if (__atomic_load_n(&b->word, __ATOMIC_RELAXED) == 0 && lock_try(b, me, tid, 0)) {
                self->recovered_pid = 0;
                return 1;
            }
        }
        r = lock_wait(self, deadline, me, tid, &dead);
    }
    else {
        if (sem_try(b, me) == 1) {
            self->recovered_pid = 0;
            return 1;
        }
        if (!blocking)
            return 0;
        r = sem_wait(self, deadline, me, &taken, &dead);
    }
    if (r == GF_DEAD) { /* a dead holder, and this lock raises */
        raise_owner_died(self, dead);
        return -1;
    }
    if (r < 0)
        return -1;
    if (r == GF_TOOK_OVER) { /* took a dead holder's place: its records are ours now; tell the caller */
        /* mode 2: the caller repairs what the lock protects itself (a queue): no warning */
        if (self->mode == 1 && owner_died_warning != NULL &&
            PyErr_WarnFormat(owner_died_warning, 1,
                             "took over a %s whose holder, pid %d, died while holding it; the data it "
                             "protected may be half-updated", Py_TYPE(self)->tp_name, self->recovered_pid) < 0) {
            /* the warning is an error here (a warnings filter): acquire() raises, so the caller does
               not hold the lock -- give it back to the dead holder */
            undo_take_over(b, taken, self->recovered_pid, me);
            self->recovered_pid = 0;
            return -1;
        }
        return 1;
    }
    if (r == GF_TOOK)
        self->recovered_pid = 0;
    return r;
}

static PyObject *
do_acquire(SemBlock *self, int blocking, PyObject *timeout_obj)
{
    long long deadline;
    int r;
    if (check_ready(self) < 0)
        return NULL;
    deadline = deadline_from(timeout_obj); /* checked even when not blocking, as the stdlib does */
    if (deadline == -2)
        return NULL;
    if (!blocking)
        deadline = -1;
    r = acquire_block(self, blocking, deadline);
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
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

static int
release_block(SemBlock *self)
{
    gf_block *b = self->b;
    if (is_owned(b))
        return lock_release(b, my_pid());
    return sem_release(b, my_pid());
}

static PyObject *
SemBlock_release(SemBlock *self, PyObject *Py_UNUSED(ignored))
{
    if (check_ready(self) < 0 || release_block(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* For other extensions (the queue's C path, through the capsule _csync._C_API): acquire without
   waiting a SemBlock that is not recursive.  1: acquired, 0: taken by someone else, -1: an exception
   (not a SemBlock, or a recursive lock).  What acquire(False) does, without parsing arguments. */
static int
capi_try_acquire(PyObject *obj)
{
    SemBlock *self = (SemBlock *)obj;
    if (!PyObject_TypeCheck(obj, &SemBlockType)) {
        PyErr_SetString(PyExc_TypeError, "not a SemBlock");
        return -1;
    }
    if (check_ready(self) < 0)
        return -1;
    if (self->b->kind == GF_RECURSIVE) {
        PyErr_SetString(PyExc_TypeError, "a recursive lock");
        return -1;
    }
    return acquire_block(self, 0, -1);
}

/* release(), for other extensions: 0, or -1 with an exception. */
static int
capi_release(PyObject *obj)
{
    SemBlock *self = (SemBlock *)obj;
    if (check_ready(self) < 0)
        return -1;
    return release_block(self);
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

static uint32_t
free_count(gf_block *b)
{
    uint64_t w = load_word(b);
    if (is_owned(b))
        return w == 0;
    return wval(w) & ~GF_W;
}

static PyObject *
SemBlock_get_value(SemBlock *self, PyObject *Py_UNUSED(ignored))
{
    if (check_ready(self) < 0)
        return NULL;
    return PyLong_FromUnsignedLong(free_count(self->b));
}

static PyObject *
SemBlock_is_zero(SemBlock *self, PyObject *Py_UNUSED(ignored))
{
    if (check_ready(self) < 0)
        return NULL;
    return PyBool_FromLong(free_count(self->b) == 0);
}

/* Recursion depth held by the calling thread (recursive locks) or the slots held by this process. */
static PyObject *
SemBlock_count(SemBlock *self, PyObject *Py_UNUSED(ignored))
{
    gf_block *b;
    int i, n = 0, me = my_pid();
    uint64_t w;
    if (check_ready(self) < 0)
        return NULL;
    b = self->b;
    w = load_word(b);
    if (b->kind == GF_RECURSIVE)
        return PyLong_FromUnsignedLong(owner_of(w) == me && waux(w) == my_tid() ? b->rcount : 0);
    if (is_owned(b)) /* as the stdlib's: 1 while a thread of this process holds it */
        return PyLong_FromLong(owner_of(w) == me);
    for (i = 0; i < GF_NHOLD; i++)
        if (__atomic_load_n(&b->holders[i], __ATOMIC_SEQ_CST) == me)
            n++;
    return PyLong_FromLong(n);
}

static PyObject *
SemBlock_is_mine(SemBlock *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *n;
    int r;
    if (check_ready(self) < 0)
        return NULL;
    if (is_owned(self->b)) { /* held by this thread */
        uint64_t w = load_word(self->b);
        return PyBool_FromLong(owner_of(w) == my_pid() && waux(w) == my_tid());
    }
    n = SemBlock_count(self, NULL);
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
    if (is_owned(b))
        return PyLong_FromLong(owner_of(load_word(b)));
    for (i = 0; i < GF_NHOLD; i++) {
        int32_t h = __atomic_load_n(&b->holders[i], __ATOMIC_SEQ_CST);
        if (h && !((uint32_t)h & GF_PENDING))
            return PyLong_FromLong(h);
    }
    return PyLong_FromLong(0);
}

static PyObject *
SemBlock_dead_holder(SemBlock *self, PyObject *Py_UNUSED(ignored))
{
    if (check_ready(self) < 0)
        return NULL;
    return PyLong_FromLong(is_owned(self->b) ? lock_dead_owner(self->b) : sem_dead_holder(self->b));
}

static PyObject *
SemBlock_tracking(SemBlock *self, PyObject *Py_UNUSED(ignored))
{
    if (check_ready(self) < 0)
        return NULL;
    if (self->b->kind == GF_RECURSIVE)
        Py_RETURN_TRUE;
    return PyBool_FromLong(tracking(self->b));
}

static PyObject *
SemBlock_sleeping(SemBlock *self, PyObject *Py_UNUSED(ignored))
{
    if (check_ready(self) < 0)
        return NULL;
    return PyBool_FromLong((wval(load_word(self->b)) & GF_W) != 0);
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
    {"_sleeping", (PyCFunction)SemBlock_sleeping, METH_NOARGS,
     "whether the waiters flag is set (the next release makes a wake-up call)"},
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

/* ---------------------------------------------------------------------------------------------
 * Condition variables: a header and one slot per sleeper.
 *
 *   slot.state: 0 FREE, 1 NOTIFIED, >= 2 WAITING (its ticket: the oldest is notified first)
 *   slot.pid:   the sleeper, written (under the condition's lock) before state
 *
 * wait (lock held): take a FREE slot (pid, then state = ticket), release the lock, sleep on
 * slot.state while it is the ticket; then CAS ticket -> FREE (timed out) or NOTIFIED -> FREE
 * (notified), and take the lock back.  notify(n) (lock held): mark the n oldest WAITING slots whose
 * sleeper lives NOTIFIED and wake each; a WAITING slot of a dead sleeper is freed (a dead sleeper is
 * a wait that timed out), as is a NOTIFIED slot of a sleeper that died before it freed it.
 * Sleepers beyond the table sleep on a generation counter: a notify with budget left when the
 * table's sleepers are served wakes all of them (a sleeper that starts waiting later is not woken).
 * That is the one case of more than n woken -- a lost wake-up would be worse, and code that waits
 * in a loop or with wait_for (threading's advice; Barrier does) is not affected.
 *
 * A sleeper also wakes when the lock's holder is found dead: nobody could notify it any more, and
 * taking the lock back then raises OwnerDiedError (or takes it over).
 * --------------------------------------------------------------------------------------------- */

#define GF_COND_MAGIC 0x67664356u /* "gfCV" */
#define GF_COND_SLOTS 128
#define GF_CV_FREE 0u
#define GF_CV_NOTIFIED 1u

typedef struct {
    uint32_t magic;
    uint32_t nslots;
    uint32_t ticket;   /* next ticket (changed under the condition's lock) */
    uint32_t reserved0;
    uint64_t ov;       /* a gf_word, changed as a whole: value = the generation (futex word) of the
                          sleepers beyond the table, aux = how many of them wait for the next one */
    uint32_t reserved[2];
    struct {
        uint32_t state;
        int32_t pid;
    } slot[GF_COND_SLOTS];
} gf_cond;

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    gf_cond *c;
    int has_view;
} CondBlock;

static int
CondBlock_init(CondBlock *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer", "offset", "init", NULL};
    PyObject *buffer;
    Py_ssize_t offset;
    int init;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Onp", kwlist, &buffer, &offset, &init))
        return -1;
    self->c = (gf_cond *)attach_view(&self->view, &self->has_view, "condition block", buffer, offset, sizeof(gf_cond));
    if (self->c == NULL)
        return -1;
    if (init) {
        memset(self->c, 0, sizeof(gf_cond));
        self->c->nslots = GF_COND_SLOTS;
        self->c->ticket = 2;
        __atomic_store_n(&self->c->magic, GF_COND_MAGIC, __ATOMIC_SEQ_CST);
    }
    else if (self->c->magic != GF_COND_MAGIC || self->c->nslots != GF_COND_SLOTS) {
        PyErr_SetString(PyExc_ValueError, "no condition block at this offset (not initialised, or overwritten)");
        return -1;
    }
    return 0;
}

static void
CondBlock_dealloc(CondBlock *self)
{
    if (self->has_view)
        PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Free the slots of sleepers that died (WAITING: their wait counts as timed out; NOTIFIED: they
   died before freeing it).  Under the condition's lock. */
static void
cond_sweep(gf_cond *c)
{
    uint32_t i;
    for (i = 0; i < GF_COND_SLOTS; i++) {
        uint32_t s = __atomic_load_n(&c->slot[i].state, __ATOMIC_SEQ_CST);
        if (s != GF_CV_FREE && !pid_alive(c->slot[i].pid))
            __atomic_compare_exchange_n(&c->slot[i].state, &s, GF_CV_FREE, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    }
}

/* A slot for this sleeper (-1: the table is full; it waits on the generation counter). */
static int
cond_register(gf_cond *c, int me)
{
    int round;
    uint32_t i, ticket;
    for (round = 0; round < 2; round++) {
        for (i = 0; i < GF_COND_SLOTS; i++) {
            if (__atomic_load_n(&c->slot[i].state, __ATOMIC_SEQ_CST) == GF_CV_FREE) {
                ticket = c->ticket;
                c->ticket = ticket + 1 < 2 ? 2 : ticket + 1;
                __atomic_store_n(&c->slot[i].pid, me, __ATOMIC_SEQ_CST);
                __atomic_store_n(&c->slot[i].state, ticket, __ATOMIC_SEQ_CST);
                return (int)i;
            }
        }
        cond_sweep(c);
    }
    return -1;
}

/* wait(lock, timeout): the whole of Condition.wait with the lock held: register, release the lock
   (all levels of an RLock), sleep, take it back (restoring the depth).  True if notified. */
static PyObject *
CondBlock_wait(CondBlock *self, PyObject *args)
{
    PyObject *lock_obj, *timeout_obj = Py_None;
    SemBlock *lock;
    gf_cond *c = self->c;
    gf_block *lb;
    long long deadline;
    int me = my_pid(), slot, notified = 0, interrupted = 0, r;
    uint32_t ticket = 0, gen = 0, depth = 1;
    if (!PyArg_ParseTuple(args, "O!|O", &SemBlockType, &lock_obj, &timeout_obj))
        return NULL;
    lock = (SemBlock *)lock_obj;
    if (check_ready(lock) < 0)
        return NULL;
    lb = lock->b;
    if (!is_owned(lb)) {
        PyErr_SetString(PyExc_TypeError, "a condition's lock must be a Lock or an RLock");
        return NULL;
    }
    {
        uint64_t w = load_word(lb);
        if (owner_of(w) != me || waux(w) != my_tid()) {
            PyErr_SetString(PyExc_AssertionError, "must acquire() condition before using wait()");
            return NULL;
        }
    }
    deadline = deadline_from(timeout_obj);
    if (deadline == -2)
        return NULL;
    slot = cond_register(c, me);
    if (slot >= 0)
        ticket = __atomic_load_n(&c->slot[slot].state, __ATOMIC_SEQ_CST);
    else {
        uint64_t ov = __atomic_load_n(&c->ov, __ATOMIC_SEQ_CST);
        while (!__atomic_compare_exchange_n(&c->ov, &ov, pack(wval(ov), waux(ov) + 1), 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST))
            ;
        gen = wval(ov);
    }
    GF_CRASH_POINT("cond.wait.registered");
    if (lb->kind == GF_RECURSIVE) {
        depth = lb->rcount;
        lb->rcount = 1;
    }
    if (lock_release(lb, me) < 0) { /* cannot happen: we own it */
        if (slot >= 0)
            __atomic_store_n(&c->slot[slot].state, GF_CV_FREE, __ATOMIC_SEQ_CST);
        return NULL;
    }
    GF_CRASH_POINT("cond.wait.unlocked");
    for (;;) {
        uint32_t *word = slot >= 0 ? &c->slot[slot].state : &((gf_word *)&c->ov)->h.value;
        uint32_t expected = slot >= 0 ? ticket : gen;
        long long slice = GF_SLICE_NS, now;
        int err;
        if (__atomic_load_n(word, __ATOMIC_SEQ_CST) != expected) {
            notified = 1;
            break;
        }
        if (deadline >= 0) {
            now = now_ns();
            if (now >= deadline)
                break;
            if (deadline - now < slice)
                slice = deadline - now;
        }
        Py_BEGIN_ALLOW_THREADS
        err = futex_wait(word, expected, slice);
        Py_END_ALLOW_THREADS
        if (PyErr_CheckSignals() < 0) {
            interrupted = 1;
            break;
        }
        if (err == ETIMEDOUT && __atomic_load_n(word, __ATOMIC_SEQ_CST) == expected && lock_dead_owner(lb))
            break; /* the lock's holder died (maybe notifying): re-acquiring tells */
    }
    if (slot >= 0) {
        uint32_t s = ticket;
        /* timed out or interrupted: withdraw, unless a notify came first (then it counts) */
        if (!notified && !__atomic_compare_exchange_n(&c->slot[slot].state, &s, GF_CV_FREE, 0, __ATOMIC_SEQ_CST,
                                                      __ATOMIC_SEQ_CST))
            notified = 1;
        GF_CRASH_POINT("cond.wait.woken");
        if (notified)
            __atomic_store_n(&c->slot[slot].state, GF_CV_FREE, __ATOMIC_SEQ_CST);
    }
    else if (!notified) { /* withdraw from this generation, unless a notify ended it meanwhile */
        uint64_t ov = __atomic_load_n(&c->ov, __ATOMIC_SEQ_CST);
        for (;;) {
            if (wval(ov) != gen) {
                notified = 1;
                break;
            }
            if (__atomic_compare_exchange_n(&c->ov, &ov, pack(gen, waux(ov) ? waux(ov) - 1 : 0), 0,
                                            __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
                break;
        }
    }
    GF_CRASH_POINT("cond.wait.freed");
    /* take the lock back, whatever happened (as threading.Condition does), even after Ctrl-C */
    {
        PyObject *exc_type = NULL, *exc_value = NULL, *exc_tb = NULL;
        if (interrupted)
            PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
        r = acquire_block(lock, 1, -1);
        if (r < 0) {
            Py_XDECREF(exc_type);
            Py_XDECREF(exc_value);
            Py_XDECREF(exc_tb);
            return NULL;
        }
        if (lb->kind == GF_RECURSIVE)
            lb->rcount = depth;

        if (interrupted) {
            PyErr_Restore(exc_type, exc_value, exc_tb);
            return NULL;
        }
    }
    return PyBool_FromLong(notified);
}

/* notify(n): wake up to n sleepers (the condition's lock held); the number woken. */
static PyObject *
CondBlock_notify(CondBlock *self, PyObject *arg)
{
    gf_cond *c = self->c;
    long long n = PyLong_AsLongLong(arg);
    long long woken = 0;
    if (n == -1 && PyErr_Occurred())
        return NULL;
    while (woken < n) {
        uint32_t i, best = GF_COND_SLOTS, best_age = 0, now_ticket = c->ticket;
        for (i = 0; i < GF_COND_SLOTS; i++) {
            uint32_t s = __atomic_load_n(&c->slot[i].state, __ATOMIC_SEQ_CST);
            if (s >= 2 && (best == GF_COND_SLOTS || now_ticket - s > best_age)) {
                best = i;
                best_age = now_ticket - s;
            }
        }
        if (best == GF_COND_SLOTS)
            break;
        {
            uint32_t s = now_ticket - best_age;
            uint32_t target = pid_alive(c->slot[best].pid) ? GF_CV_NOTIFIED : GF_CV_FREE;
            if (!__atomic_compare_exchange_n(&c->slot[best].state, &s, target, 0, __ATOMIC_SEQ_CST,
                                             __ATOMIC_SEQ_CST))
                continue; /* it timed out meanwhile */
            if (target == GF_CV_FREE) /* died waiting: its wait timed out */
                continue;
            GF_CRASH_POINT("cond.notify.marked");
            futex_wake(&c->slot[best].state, 1);
            woken++;
        }
    }
    if (woken < n) {
        uint64_t ov = __atomic_load_n(&c->ov, __ATOMIC_SEQ_CST);
        while (waux(ov) > 0) {
            if (__atomic_compare_exchange_n(&c->ov, &ov, pack(wval(ov) + 1, 0), 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST)) {
                woken += waux(ov);
                futex_wake(&((gf_word *)&c->ov)->h.value, INT_MAX);
                break;
            }
        }
    }
    return PyLong_FromLongLong(woken);
}

/* How many sleepers wait (for reprs). */
static PyObject *
CondBlock_waiting(CondBlock *self, PyObject *Py_UNUSED(ignored))
{
    uint32_t i, n = 0;
    for (i = 0; i < GF_COND_SLOTS; i++)
        if (__atomic_load_n(&self->c->slot[i].state, __ATOMIC_SEQ_CST) >= 2)
            n++;
    return PyLong_FromUnsignedLong(n + waux(__atomic_load_n(&self->c->ov, __ATOMIC_SEQ_CST)));
}

static PyObject *
CondBlock_sleepers(CondBlock *self, PyObject *Py_UNUSED(ignored))
{
    uint32_t i;
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    for (i = 0; i < GF_COND_SLOTS; i++) {
        uint32_t s = __atomic_load_n(&self->c->slot[i].state, __ATOMIC_SEQ_CST);
        if (s != GF_CV_FREE) {
            PyObject *item = Py_BuildValue("(iI)", self->c->slot[i].pid, s >= 2 ? 2u : s);
            if (item == NULL || PyList_Append(list, item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(list);
                return NULL;
            }
            Py_DECREF(item);
        }
    }
    return list;
}

static PyMethodDef CondBlock_methods[] = {
    {"wait", (PyCFunction)CondBlock_wait, METH_VARARGS,
     "wait(lock, timeout=None) -> bool: release lock (held by this thread), sleep until notified, take it back"},
    {"notify", (PyCFunction)CondBlock_notify, METH_O, "notify(n) -> woken: wake up to n sleepers (lock held)"},
    {"_waiting", (PyCFunction)CondBlock_waiting, METH_NOARGS, "number of sleepers"},
    {"_sleepers", (PyCFunction)CondBlock_sleepers, METH_NOARGS,
     "[(pid, state)] of the used slots: state 1 notified, 2 waiting"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CondBlockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gilfree._csync.CondBlock",
    .tp_doc = "The sleepers of a robust condition variable, in a shared-memory block.",
    .tp_basicsize = sizeof(CondBlock),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)CondBlock_init,
    .tp_dealloc = (destructor)CondBlock_dealloc,
    .tp_methods = CondBlock_methods,
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
    if (PyType_Ready(&SemBlockType) < 0 || PyType_Ready(&CondBlockType) < 0)
        return NULL;
    refresh_ids();
    gf_crash_from_env();
    pthread_atfork(NULL, NULL, refresh_ids);
    m = PyModule_Create(&csync_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&SemBlockType);
    if (PyModule_AddObject(m, "SemBlock", (PyObject *)&SemBlockType) < 0) {
        Py_DECREF(&SemBlockType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&CondBlockType);
    if (PyModule_AddObject(m, "CondBlock", (PyObject *)&CondBlockType) < 0) {
        Py_DECREF(&CondBlockType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "BLOCK_SIZE", (long)sizeof(gf_block));
    PyModule_AddIntConstant(m, "COND_SIZE", (long)sizeof(gf_cond));
    PyModule_AddIntConstant(m, "COND_SLOTS", GF_COND_SLOTS);
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
