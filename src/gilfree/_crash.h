/*
 * Crash points for gilfree's C extensions (test-only; see gilfree/_crash.py for the Python side).
 *
 * A crash point is a named step of a shared-memory protocol: GF_CRASH_POINT("lock.acquire.taken").
 * When nothing is armed (always, outside the crash tests) a point costs one predictable branch on a
 * static int.  When armed, the process whose point of that name is hit (after `skip` earlier hits)
 * SIGKILLs itself there (action 1) or SIGSTOPs itself (action 2), so that a test can check what the
 * survivors see with the victim dead, or still alive, exactly between two instructions.
 *
 * Armed from Python (gilfree._crash.arm, which calls each loaded extension's _arm_crash) or, for a
 * whole process tree, by GILFREE_CRASH_AT="name[:skip[:action]]" read when the extension loads.
 * Each extension includes this header and so has its own copy of the state.
 */
#ifndef GILFREE_CRASH_H
#define GILFREE_CRASH_H

#include <Python.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int gf_crash_on = 0;
static char gf_crash_name[128];
static long gf_crash_skip = 0;
static int gf_crash_action = 1; /* 1 SIGKILL, 2 SIGSTOP */

static void
gf_crash_hit(const char *name)
{
    if (strcmp(name, gf_crash_name) != 0)
        return;
    if (gf_crash_skip > 0) {
        gf_crash_skip--;
        return;
    }
    if (gf_crash_action == 2) {
        gf_crash_on = 0; /* once: after SIGCONT the process goes on normally */
        kill(getpid(), SIGSTOP);
        return;
    }
    kill(getpid(), SIGKILL);
    for (;;)
        pause();
}

#define GF_CRASH_POINT(name)                            \
    do {                                                \
        if (__builtin_expect(gf_crash_on, 0))           \
            gf_crash_hit(name);                         \
    } while (0)

static void
gf_crash_set(const char *name, long skip, int action)
{
    gf_crash_on = 0;
    if (name == NULL || name[0] == 0 || strlen(name) >= sizeof(gf_crash_name))
        return;
    strcpy(gf_crash_name, name);
    gf_crash_skip = skip < 0 ? 0 : skip;
    gf_crash_action = action == 2 ? 2 : 1;
    gf_crash_on = 1;
}

/* GILFREE_CRASH_AT="name[:skip[:action]]", action "kill" (default) or "stop". */
static void
gf_crash_from_env(void)
{
    const char *spec = getenv("GILFREE_CRASH_AT");
    char buf[256], *colon, *colon2;
    long skip = 0;
    int action = 1;
    if (spec == NULL || spec[0] == 0 || strlen(spec) >= sizeof(buf))
        return;
    strcpy(buf, spec);
    colon = strchr(buf, ':');
    if (colon != NULL) {
        *colon = 0;
        colon2 = strchr(colon + 1, ':');
        if (colon2 != NULL) {
            *colon2 = 0;
            action = strcmp(colon2 + 1, "stop") == 0 ? 2 : 1;
        }
        skip = strtol(colon + 1, NULL, 10);
    }
    gf_crash_set(buf, skip, action);
}

/* _arm_crash(name, skip, action): arm (an empty name disarms). */
static PyObject *
gf_crash_arm_py(PyObject *module, PyObject *args)
{
    const char *name;
    long skip = 0;
    int action = 1;
    if (!PyArg_ParseTuple(args, "s|li", &name, &skip, &action))
        return NULL;
    gf_crash_set(name, skip, action);
    Py_RETURN_NONE;
}

#define GF_CRASH_METHODS \
    {"_arm_crash", gf_crash_arm_py, METH_VARARGS, "_arm_crash(name, skip=0, action=1): test-only crash point"},

#endif
