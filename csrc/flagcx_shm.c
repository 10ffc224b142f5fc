/* flagcx shared-memory host transport (see flagcx_shm.h for the API).
 *
 * Segment layout (one POSIX shm object per communicator, created by rank 0):
 *   page 0      header (magic, sizes, attach count)
 *   records     one 128-byte record per rank: its collective step counter, the op
 *               descriptor of its last two steps, pid + pid namespace (liveness), its
 *               state (attached / closed / aborted), a sleeper count and a futex word
 *   slots       per rank slot_bytes of staging, two halves used alternately by steps
 *   channels    per ordered pair (src, dst) a control block (head, tail) and a ring
 *
 * Collective protocol. Every rank numbers its steps 1, 2, 3... (rec.seq). Data of
 * step s is written in the writer's half (s & 1) after every rank has posted step
 * s - 1 (so nobody still reads what step s - 2 left there), then the writer posts s;
 * readers wait until the writers' seq >= s and finish reading before they post s + 1.
 * Large ops are cut into chunks that alternate halves, so a fast rank copies chunk
 * c + 1 in while slower ranks still copy chunk c out. Allreduce takes one step per
 * chunk (every rank reduces the whole chunk) for 2 ranks or small messages, else two:
 * reduce-scatter (rank r reduces part r into its other half) and all-gather.
 *
 * Waiting spins briefly, then sched_yield()s (ranks often outnumber cores), then
 * sleeps on the waiter's futex word; a poster only issues FUTEX_WAKE when the record
 * says someone sleeps. Every wait checks the awaited peers' state and pid every few ms
 * (a dead or closed peer fails the call at once) and gives up after the timeout,
 * naming the ranks that did not arrive. Any such error breaks the communicator.
 *
 * Point to point. Each ordered pair has a ring; messages are an 8-byte length and the
 * payload. Posted ops are advanced by one progress thread per communicator, which
 * never blocks on a single op, so crossing sends larger than the ring complete.
 */
#define _GNU_SOURCE
#include "flagcx_shm.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "flagcx_reduce.h"

#define MAGIC 0x6873786367616c66ULL /* "flagcxsh" */
#define VERSION 3u
#define LINE 64
#define PAGE 4096

#define SPIN_ITERS 16          /* PAUSE polls before yielding (more hurts when ranks outnumber cores) */
#define YIELD_NS 2000000LL     /* sched_yield() polling before sleeping */
#define SLEEP_NS 2000000LL     /* longest futex sleep between checks */
#define FIRST_CHECK_NS 1000000LL
#define CHECK_NS 5000000LL     /* peer liveness check period */
#define IDLE_SLEEP_NS 100000000LL

enum { ST_NONE = 0, ST_ATTACHED = 1, ST_CLOSED = 2, ST_ABORTED = 3, ST_MISMATCH = 4 };
enum { OP_PENDING = 0, OP_DONE = 1, OP_FAILED = 2 };
enum {
    OPC_ALLREDUCE = 1, OPC_REDUCE, OPC_REDUCESCATTER, OPC_ALLGATHER, OPC_BROADCAST, OPC_GATHER,
    OPC_SCATTER, OPC_ALLTOALL, OPC_ALLTOALLV, OPC_BARRIER
};
static const char *const OPC_NAMES[] = {"?", "allreduce", "reduce", "reducescatter", "allgather",
                                        "broadcast", "gather", "scatter", "alltoall", "alltoallv",
                                        "barrier"};
static const char *const DT_NAMES[] = {"float32", "float64", "float16", "bfloat16",
                                       "int8", "uint8", "int32", "int64"};
static const char *const RED_NAMES[] = {"sum", "prod", "max", "min", "avg"};

typedef struct {
    _Atomic uint64_t seq;
    _Atomic uint64_t desc[2];
    _Atomic uint32_t sleepers;
    _Atomic uint32_t state;
    int32_t pid;
    uint32_t reserved;
    uint64_t pidns;
    _Atomic uint64_t failed; /* 0, or the step at which this rank's communicator broke (first error) */
    char pad0[LINE - 56];
    _Atomic uint32_t wake;
    char pad1[LINE - 4];
} rank_rec;

typedef struct {
    uint64_t magic;
    uint32_t version, nranks;
    uint64_t slot_bytes, chan_bytes, off_ranks, off_slots, off_ctrl, off_data, total;
    _Atomic uint32_t attached;
    int32_t creator_pid; /* for fxs_sweep; a segment named from the start has it before its memory is reserved */
    uint64_t creator_pidns;
} seg_hdr;

typedef struct {
    _Atomic uint64_t head; /* bytes written by the sender */
    char pad0[LINE - 8];
    _Atomic uint64_t tail; /* bytes consumed by the receiver */
    char pad1[LINE - 8];
} chan_ctrl;

struct fxs_op {
    fxs_op *next;
    _Atomic int refs;
    _Atomic uint32_t state;
    _Atomic uint32_t waiters;
    int is_recv, peer;
    _Atomic int source;
    char *buf;
    uint64_t len;
    _Atomic uint64_t moved;
    int header_done;
    int err, err_peer;
    char msg[512];
};

struct fxs_comm {
    int me, n;
    char *base;
    size_t total;
    seg_hdr *hdr;
    rank_rec *rec;
    char *slots;
    size_t slot_bytes, half, small_bytes;
    chan_ctrl *ctrl;
    char *data;
    size_t chan_bytes;
    uint64_t seq;
    uint64_t *known;
    const void **srcs;
    uint64_t *disp_s, *disp_r;
    int64_t timeout_ns;
    pid_t owner; /* the process that attached; a forked child only unmaps */
    uint32_t mode;
    uint64_t my_pidns;
    signed char *pid_ok; /* -1 unknown, 0 not checkable (other pid namespace), 1 checkable */
    char err[512];
    int err_ranks[8], err_nranks;
    /* shared with the progress thread */
    pthread_mutex_t lock;
    _Atomic int broken;
    char broken_msg[512];
    int broken_ranks[8], broken_nranks;
    fxs_op *in_head, *in_tail;
    int thread_on;
    pthread_t thread;
    _Atomic int stop;
    /* owned by the progress thread */
    fxs_op **sq_head, **sq_tail, **cur;
    fxs_op *rq_head, *rq_tail;
    uint64_t *shead, *rtail;
    int rr;
    /* helper threads for large copies and reductions (see "helper threads") */
    int nthreads, helpers_on;
    pthread_t *helpers;
    struct helper_arg *hargs;
    _Atomic uint32_t job_gen, job_sleepers, job_left;
    _Atomic int helpers_stop;
    int job_kind; /* JOB_COPY, JOB_REDUCE or JOB_GATHER */
    size_t job_part; /* JOB_GATHER: elements per source part (part q comes from job_srcs[q]) */
    char *job_dst;
    const char *job_src;
    size_t job_count, job_es;
    fxs_reduce_fn job_fn;
    const void *const *job_srcs;
    int job_nsrc, job_avg;
    const void **job_part_srcs; /* nthreads x n source pointers, one row per thread */
};

/* ---------------------------------------------------------------- utilities */

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void futex_wait(_Atomic uint32_t *addr, uint32_t val, int64_t ns, int private_) {
    if (ns < 1000) ns = 1000;
    struct timespec ts = {(time_t)(ns / 1000000000LL), (long)(ns % 1000000000LL)};
    syscall(SYS_futex, (uint32_t *)addr, private_ ? FUTEX_WAIT_PRIVATE : FUTEX_WAIT, val, &ts,
            NULL, 0);
}

static void futex_wake(_Atomic uint32_t *addr, int private_) {
    syscall(SYS_futex, (uint32_t *)addr, private_ ? FUTEX_WAKE_PRIVATE : FUTEX_WAKE, INT_MAX,
            NULL, NULL, 0);
}

static inline size_t min_sz(size_t a, size_t b) { return a < b ? a : b; }

static void set_err(fxs_comm *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
}

static void put_err(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static inline void wake_rank(fxs_comm *c, int p);

/* Mark the communicator unusable (first reason wins); safe from both threads. The step it
 * broke at is published in this rank's record, so that a peer arriving later at that
 * collective fails it too instead of completing it from the data this rank had posted. */
static void mark_broken(fxs_comm *c, int code, const char *msg, const int *ranks, int nranks, uint64_t step) {
    int first = 0;
    pthread_mutex_lock(&c->lock);
    if (!atomic_load(&c->broken)) {
        snprintf(c->broken_msg, sizeof c->broken_msg, "%s", msg);
        c->broken_nranks = nranks < 8 ? nranks : 8;
        for (int i = 0; i < c->broken_nranks; i++) c->broken_ranks[i] = ranks[i];
        atomic_store(&c->broken, code);
        first = 1;
    }
    pthread_mutex_unlock(&c->lock);
    if (first && c->rec) {
        atomic_store(&c->rec[c->me].failed, step);
        for (int q = 0; q < c->n; q++)
            if (q != c->me) wake_rank(c, q);
    }
}

/* The error returned by every call once the communicator is broken. */
static int broken_error(fxs_comm *c) {
    pthread_mutex_lock(&c->lock);
    set_err(c, "the communicator is unusable after an earlier error (%s); destroy it and create a new one",
            c->broken_msg);
    c->err_nranks = c->broken_nranks;
    for (int i = 0; i < c->err_nranks; i++) c->err_ranks[i] = c->broken_ranks[i];
    pthread_mutex_unlock(&c->lock);
    return FXS_EBROKEN;
}

/* Fail the current call with code and c->err, and break the communicator at `step`: the first
 * collective step this rank did not complete (FAILED_UNKNOWN when the progress thread broke it). */
#define FAILED_UNKNOWN UINT64_MAX
static int fail_at(fxs_comm *c, int code, uint64_t step) {
    mark_broken(c, code, c->err, c->err_ranks, c->err_nranks, step);
    return code;
}

static uint64_t self_pidns(void) {
    struct stat st;
    if (stat("/proc/self/ns/pid", &st) != 0) return 0;
    return ((uint64_t)st.st_dev << 40) ^ (uint64_t)st.st_ino;
}

/* 1 when pid is gone or a zombie. */
static int pid_dead(pid_t pid) {
    if (kill(pid, 0) != 0 && errno == ESRCH) return 1;
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT;
    ssize_t k = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (k <= 0) return 0;
    buf[k] = 0;
    char *rp = strrchr(buf, ')');
    return rp && rp[1] == ' ' && (rp[2] == 'Z' || rp[2] == 'X');
}

/* 0 when peer p looks alive, else FXS_EDEAD / FXS_EPEER with the reason in msg. */
static int peer_problem(fxs_comm *c, int p, char *msg, size_t len) {
    rank_rec *r = &c->rec[p];
    uint32_t st = atomic_load(&r->state);
    if (st == ST_CLOSED || st == ST_ABORTED) {
        snprintf(msg, len, "rank %d (pid %d) %s its communicator", p, (int)r->pid,
                 st == ST_CLOSED ? "closed" : "aborted");
        return FXS_EPEER;
    }
    if (st == ST_MISMATCH) {
        snprintf(msg, len, "rank %d (pid %d) found that the ranks' collective calls do not match (its error "
                 "names both calls; a rank that finished its part earlier, e.g. a broadcast root, only "
                 "learns it here)", p, (int)r->pid);
        return FXS_EPEER;
    }
    if (st == ST_NONE) return 0; /* not attached yet: only the timeout applies */
    if (atomic_load(&r->failed)) {
        snprintf(msg, len, "rank %d (pid %d) stopped after an error of its own (it timed out or lost a peer) and "
                 "will not reach this step", p, (int)r->pid);
        return FXS_EPEER;
    }
    signed char ok = __atomic_load_n(&c->pid_ok[p], __ATOMIC_RELAXED); /* both threads check */
    if (ok < 0) {
        ok = (signed char)(r->pid > 0 && c->my_pidns && r->pidns == c->my_pidns);
        __atomic_store_n(&c->pid_ok[p], ok, __ATOMIC_RELAXED);
    }
    if (ok && pid_dead(r->pid)) {
        snprintf(msg, len, "rank %d (pid %d) died", p, (int)r->pid);
        return FXS_EDEAD;
    }
    return 0;
}

/* Wake rank p's sleeping threads, if any (a full fence first: Dekker with the sleeper). */
static inline void wake_rank(fxs_comm *c, int p) {
    rank_rec *r = &c->rec[p];
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&r->sleepers, memory_order_relaxed)) {
        atomic_fetch_add(&r->wake, 1);
        futex_wake(&r->wake, 0);
    }
}

/* ---------------------------------------------------------------- collective sync */

static inline char *slot(fxs_comm *c, int r, uint64_t step) {
    return c->slots + (size_t)r * c->slot_bytes + (size_t)(step & 1) * c->half;
}

/* Post the next step: data for it is in place. */
static inline void post(fxs_comm *c) {
    c->seq++;
    atomic_store_explicit(&c->rec[c->me].seq, c->seq, memory_order_seq_cst);
    for (int p = 0; p < c->n; p++) {
        if (p == c->me) continue;
        if (atomic_load_explicit(&c->rec[p].sleepers, memory_order_seq_cst)) {
            atomic_fetch_add(&c->rec[p].wake, 1);
            futex_wake(&c->rec[p].wake, 0);
        }
    }
}

/* Whether every awaited rank (all, or only `only`) has posted step `target`. */
static inline int ready(fxs_comm *c, uint64_t target, int only) {
    if (only >= 0) {
        if (only == c->me || c->known[only] >= target) return 1;
        uint64_t v = atomic_load_explicit(&c->rec[only].seq, memory_order_acquire);
        c->known[only] = v;
        return v >= target;
    }
    for (int p = 0; p < c->n; p++) {
        if (p == c->me || c->known[p] >= target) continue;
        uint64_t v = atomic_load_explicit(&c->rec[p].seq, memory_order_acquire);
        c->known[p] = v;
        if (v < target) return 0;
    }
    return 1;
}

/* A dead awaited peer fails the wait (reported before one that merely closed). A peer that
 * posted step `target` before it closed or died is not awaited any more: its data stays in the
 * segment, so a rank that finished its part and left fails only the waits that still need it.
 * (The state is read before the sequence number, which the peer stored first.) */
static int check_waited(fxs_comm *c, uint64_t target, int only) {
    char msg[256], first_msg[256];
    int first = -1, first_rc = 0;
    for (int p = 0; p < c->n; p++) {
        if (p == c->me || (only >= 0 && p != only) || c->known[p] >= target) continue;
        int rc = peer_problem(c, p, msg, sizeof msg);
        if (rc) {
            c->known[p] = atomic_load_explicit(&c->rec[p].seq, memory_order_acquire);
            if (c->known[p] >= target) continue;
        }
        if (rc && (first < 0 || (rc == FXS_EDEAD && first_rc != FXS_EDEAD))) {
            first = p;
            first_rc = rc;
            memcpy(first_msg, msg, sizeof msg);
        }
    }
    if (first < 0 || ready(c, target, only)) return FXS_OK;
    set_err(c, "%s", first_msg);
    c->err_ranks[0] = first;
    c->err_nranks = 1;
    return fail_at(c, first_rc, target);
}

static int timeout_error(fxs_comm *c, uint64_t target, int only, int64_t waited) {
    char list[256] = "";
    size_t used = 0;
    c->err_nranks = 0;
    for (int p = 0; p < c->n; p++)
        if (p != c->me) c->known[p] = atomic_load_explicit(&c->rec[p].seq, memory_order_acquire);
    for (int p = 0; p < c->n; p++) {
        if (p == c->me || (only >= 0 && p != only) || c->known[p] >= target) continue;
        if (c->err_nranks < 8) c->err_ranks[c->err_nranks] = p;
        c->err_nranks++;
        if (used < sizeof list - 64)
            used += (size_t)snprintf(list + used, sizeof list - used, "%srank %d (pid %d, %llu step(s) behind)",
                                     used ? ", " : "", p, (int)c->rec[p].pid,
                                     (unsigned long long)(target - c->known[p]));
    }
    if (c->err_nranks > 8) c->err_nranks = 8;
    set_err(c, "Timed out after %.3g s waiting for %s: alive but not in this collective "
            "(blocked elsewhere, hung, or calling a different op)",
            (double)waited / 1e9, list);
    return fail_at(c, FXS_ETIMEOUT, target);
}

/* Wait until the awaited ranks posted step `target`: spin, yield, then futex sleep. */
static int wait_seq(fxs_comm *c, uint64_t target, int only) {
    if (ready(c, target, only)) return FXS_OK;
    for (int i = 0; i < SPIN_ITERS; i++) {
        cpu_relax();
        if (ready(c, target, only)) return FXS_OK;
    }
    rank_rec *mine = &c->rec[c->me];
    int64_t t0 = now_ns(), deadline = t0 + c->timeout_ns, next_check = t0 + FIRST_CHECK_NS;
    int64_t yield_end = t0 + YIELD_NS;
    for (;;) {
        if (ready(c, target, only)) return FXS_OK;
        int64_t t = now_ns();
        if (t >= next_check) {
            int rc = check_waited(c, target, only);
            if (rc || ready(c, target, only)) return rc;
            next_check = t + CHECK_NS;
        }
        if (t >= deadline) {
            if (ready(c, target, only)) return FXS_OK;
            return timeout_error(c, target, only, t - t0);
        }
        if (t < yield_end) {
            sched_yield();
            continue;
        }
        uint32_t w = atomic_load(&mine->wake);
        atomic_fetch_add(&mine->sleepers, 1);
        atomic_thread_fence(memory_order_seq_cst);
        if (!ready(c, target, only)) {
            int64_t slice = SLEEP_NS;
            if (deadline - t < slice) slice = deadline - t;
            if (next_check - t < slice) slice = next_check - t;
            futex_wait(&mine->wake, w, slice, 0);
        }
        atomic_fetch_sub(&mine->sleepers, 1);
    }
}

static uint64_t mkdesc(int opc, int dtype, int redop, int root, uint64_t size) {
    return ((uint64_t)opc << 56) | ((uint64_t)(dtype & 0xf) << 52) | ((uint64_t)(redop & 0xf) << 48) |
           ((uint64_t)(root & 0xffff) << 32) | (size & 0xffffffffULL);
}

static void describe(uint64_t d, char *out, size_t len) {
    int opc = (int)(d >> 56), dt = (int)((d >> 52) & 0xf), red = (int)((d >> 48) & 0xf);
    int root = (int)((d >> 32) & 0xffff);
    unsigned long long size = d & 0xffffffffULL;
    const char *name = opc > 0 && opc <= OPC_BARRIER ? OPC_NAMES[opc] : "an unknown op";
    switch (opc) {
    case OPC_ALLREDUCE:
    case OPC_REDUCESCATTER:
        snprintf(out, len, "%s(%llu x %s, %s)", name, size, DT_NAMES[dt % FXS_NUM_DTYPES],
                 RED_NAMES[red % FXS_NUM_OPS]);
        break;
    case OPC_REDUCE:
        snprintf(out, len, "%s(%llu x %s, %s, root %d)", name, size, DT_NAMES[dt % FXS_NUM_DTYPES],
                 RED_NAMES[red % FXS_NUM_OPS], root);
        break;
    case OPC_BROADCAST:
    case OPC_GATHER:
    case OPC_SCATTER:
        snprintf(out, len, "%s(%llu bytes, root %d)", name, size, root);
        break;
    case OPC_BARRIER:
    case OPC_ALLTOALLV:
        snprintf(out, len, "%s", name);
        break;
    default:
        snprintf(out, len, "%s(%llu bytes)", name, size);
    }
}

/* After the first wait of an op: every awaited rank must be running the same call. */
static int check_desc(fxs_comm *c, uint64_t step, int only) {
    uint64_t mine = atomic_load_explicit(&c->rec[c->me].desc[step & 1], memory_order_relaxed);
    for (int p = 0; p < c->n; p++) {
        if (p == c->me || (only >= 0 && p != only)) continue;
        uint64_t theirs = atomic_load_explicit(&c->rec[p].desc[step & 1], memory_order_relaxed);
        if (theirs != mine) {
            char a[128], b[128];
            describe(theirs, a, sizeof a);
            describe(mine, b, sizeof b);
            set_err(c, "rank %d called %s while this rank called %s; every rank must make the same "
                    "collective calls in the same order with matching sizes", p, a, b);
            c->err_ranks[0] = p;
            c->err_nranks = 1;
            /* Publish it: ranks that already returned from their part (a broadcast root, a
             * reduce's senders) fail their next call at once instead of running out of step. */
            atomic_store(&c->rec[c->me].state, ST_MISMATCH);
            for (int q = 0; q < c->n; q++)
                if (q != c->me) wake_rank(c, q);
            return fail_at(c, FXS_EINVAL, step);
        }
    }
    return FXS_OK;
}

/* Start an op: refuse on a broken communicator, wait until every rank posted the
 * current step (so this rank may write its next half), publish the op descriptor. */
static int op_begin(fxs_comm *c, uint64_t desc) {
    if (atomic_load_explicit(&c->broken, memory_order_relaxed)) return broken_error(c);
    c->err_nranks = 0;
    int rc = wait_seq(c, c->seq, -1);
    if (rc) return rc;
    atomic_store_explicit(&c->rec[c->me].desc[(c->seq + 1) & 1], desc, memory_order_relaxed);
    return FXS_OK;
}

/* After the first wait of an op: no awaited rank gave up on this step. A rank that timed out
 * had posted its data; without this check a late rank would complete the collective that its
 * peers failed, and run one step ahead of them (one more optimizer step, say). */
static int check_failed(fxs_comm *c, uint64_t step, int only) {
    for (int p = 0; p < c->n; p++) {
        if (p == c->me || (only >= 0 && p != only)) continue;
        uint64_t f = atomic_load_explicit(&c->rec[p].failed, memory_order_acquire);
        if (f && f <= step) {
            set_err(c, "rank %d (pid %d) already failed this collective (it timed out or lost a peer before this "
                    "rank arrived), so it cannot complete on any rank", p, (int)c->rec[p].pid);
            c->err_ranks[0] = p;
            c->err_nranks = 1;
            return fail_at(c, FXS_EPEER, step);
        }
    }
    return FXS_OK;
}

/* Post, then wait for the awaited ranks' copy of the same step (checking the op on the first). */
static int exchange(fxs_comm *c, int only, int first) {
    post(c);
    int rc = wait_seq(c, c->seq, only);
    if (!rc && first) rc = check_desc(c, c->seq, only);
    if (!rc && first) rc = check_failed(c, c->seq, only);
    return rc;
}

/* Element range [a, b) of part q when m elements are split over n ranks (16-element aligned). */
static void part_range(size_t m, int n, int q, size_t *a, size_t *b) {
    size_t per = (m + (size_t)n - 1) / (size_t)n;
    per = (per + 15) & ~(size_t)15;
    size_t lo = per * (size_t)q;
    *a = lo < m ? lo : m;
    *b = lo + per < m ? lo + per : m;
}

/* ---------------------------------------------------------------- helper threads
 *
 * One thread copies and reduces at the bandwidth one core gets, far below a many-core
 * host's. With nthreads > 1 (fxs_set_threads) a job of PAR_MIN_BYTES or more is split
 * into nthreads equal ranges: the caller runs range 0, helpers 1..nthreads-1. A job is
 * published by bumping job_gen (its fields are written before); helpers spin a while,
 * then sleep on job_gen (job_sleepers tells the caller whether a wake is needed); the
 * caller spins until job_left is 0. Helpers start with the first large job and end at
 * close. Jobs never overlap: one caller thread, and it waits for the last range.
 */

#define PAR_MIN_BYTES ((size_t)256 * 1024)
#define HELPER_SPIN 8000

enum { JOB_COPY, JOB_REDUCE, JOB_GATHER };

struct helper_arg {
    fxs_comm *c;
    int idx;
    uint32_t seen;
};

static void job_part(fxs_comm *c, int idx) {
    size_t per = (c->job_count + (size_t)c->nthreads - 1) / (size_t)c->nthreads;
    per = (per + 63) & ~(size_t)63;
    size_t a = per * (size_t)idx, b = a + per;
    if (a >= c->job_count) return;
    if (b > c->job_count) b = c->job_count;
    size_t es = c->job_es;
    if (c->job_kind == JOB_COPY) {
        memcpy(c->job_dst + a * es, c->job_src + a * es, (b - a) * es);
        return;
    }
    if (c->job_kind == JOB_GATHER) { /* dst[i] = part (i / job_part) of the sources, at the same offset */
        for (size_t i = a; i < b;) {
            size_t q = i / c->job_part, end = min_sz(b, (q + 1) * c->job_part);
            memcpy(c->job_dst + i * es, (const char *)c->job_srcs[q] + i * es, (end - i) * es);
            i = end;
        }
        return;
    }
    const void **srcs = c->job_part_srcs + (size_t)idx * (size_t)c->n;
    for (int p = 0; p < c->job_nsrc; p++) srcs[p] = (const char *)c->job_srcs[p] + a * es;
    c->job_fn(c->job_dst + a * es, srcs, c->job_nsrc, b - a, c->job_avg);
}

static void *helper_main(void *arg) {
    struct helper_arg *h = (struct helper_arg *)arg;
    fxs_comm *c = h->c;
    uint32_t seen = h->seen;
    for (;;) {
        uint32_t g;
        int spins = 0;
        while ((g = atomic_load_explicit(&c->job_gen, memory_order_acquire)) == seen) {
            if (atomic_load_explicit(&c->helpers_stop, memory_order_relaxed)) return NULL;
            if (++spins < HELPER_SPIN) {
                cpu_relax();
                continue;
            }
            atomic_fetch_add(&c->job_sleepers, 1);
            futex_wait(&c->job_gen, seen, 100000000LL, 1);
            atomic_fetch_sub(&c->job_sleepers, 1);
            spins = 0;
        }
        if (atomic_load(&c->helpers_stop)) return NULL;
        seen = g;
        job_part(c, h->idx);
        atomic_fetch_sub_explicit(&c->job_left, 1, memory_order_acq_rel);
    }
}

static void stop_helpers(fxs_comm *c) {
    if (!c->helpers_on) return;
    atomic_store(&c->helpers_stop, 1);
    atomic_fetch_add(&c->job_gen, 1);
    futex_wake(&c->job_gen, 1);
    for (int i = 0; i < c->helpers_on; i++) pthread_join(c->helpers[i], NULL);
    c->helpers_on = 0;
}

/* Start the helpers; on failure run with those that started. */
static void start_helpers(fxs_comm *c) {
    int want = c->nthreads - 1;
    c->helpers = calloc((size_t)want, sizeof *c->helpers);
    c->hargs = calloc((size_t)want, sizeof *c->hargs);
    c->job_part_srcs = calloc((size_t)c->nthreads * (size_t)c->n, sizeof *c->job_part_srcs);
    if (!c->helpers || !c->hargs || !c->job_part_srcs) {
        c->nthreads = 1;
        return;
    }
    uint32_t gen = atomic_load(&c->job_gen);
    int started = 0;
    for (int i = 0; i < want; i++) {
        c->hargs[i] = (struct helper_arg){c, i + 1, gen};
        if (pthread_create(&c->helpers[i], NULL, helper_main, &c->hargs[i]) != 0) break;
        started++;
    }
    c->helpers_on = started;
    c->nthreads = started + 1;
}

static void par_run(fxs_comm *c) {
    atomic_store(&c->job_left, (uint32_t)(c->nthreads - 1));
    atomic_fetch_add(&c->job_gen, 1);
    if (atomic_load(&c->job_sleepers)) futex_wake(&c->job_gen, 1);
    job_part(c, 0);
    int spins = 0;
    while (atomic_load_explicit(&c->job_left, memory_order_acquire)) {
        if (atomic_load_explicit(&c->helpers_stop, memory_order_relaxed)) break; /* closed under us (abort from another thread) */
        if (++spins < 4096) {
            cpu_relax();
        } else {
            sched_yield();
            spins = 0;
        }
    }
}

static int parallel(fxs_comm *c, size_t bytes) {
    if (c->nthreads < 2 || bytes < PAR_MIN_BYTES || c->owner != getpid()) return 0;
    if (!c->helpers_on) start_helpers(c);
    return c->nthreads > 1;
}

/* memcpy, split over the helper threads when large. */
static void pcopy(fxs_comm *c, void *dst, const void *src, size_t bytes) {
    if (!parallel(c, bytes)) {
        memcpy(dst, src, bytes);
        return;
    }
    c->job_kind = JOB_COPY;
    c->job_dst = (char *)dst;
    c->job_src = (const char *)src;
    c->job_count = bytes;
    c->job_es = 1;
    par_run(c);
}

/* fn(dst, srcs, nsrc, count, avg_n), split over the helper threads when large. */
static void preduce(fxs_comm *c, fxs_reduce_fn fn, void *dst, const void *const *srcs, int nsrc, size_t count,
                    size_t es, int avg_n) {
    if (!parallel(c, count * es)) {
        fn(dst, srcs, nsrc, count, avg_n);
        return;
    }
    c->job_kind = JOB_REDUCE;
    c->job_dst = (char *)dst;
    c->job_count = count;
    c->job_es = es;
    c->job_fn = fn;
    c->job_srcs = srcs;
    c->job_nsrc = nsrc;
    c->job_avg = avg_n;
    par_run(c);
}

/* dst[0, count) from parts of ``per`` elements: part q is srcs[q] (indexed like dst), split
 * over the helper threads as one job when large (the all-gather half of an allreduce). */
static void pgather(fxs_comm *c, void *dst, const void *const *srcs, size_t per, size_t count, size_t es) {
    if (!parallel(c, count * es)) {
        for (size_t i = 0, q = 0; i < count; i += per, q++)
            memcpy((char *)dst + i * es, (const char *)srcs[q] + i * es, min_sz(per, count - i) * es);
        return;
    }
    c->job_kind = JOB_GATHER;
    c->job_dst = (char *)dst;
    c->job_srcs = srcs;
    c->job_part = per;
    c->job_count = count;
    c->job_es = es;
    par_run(c);
}

int fxs_set_threads(fxs_comm *c, int nthreads) {
    if (!c->helpers_on) c->nthreads = nthreads < 1 ? 1 : nthreads > 64 ? 64 : nthreads;
    return c->nthreads;
}

/* ---------------------------------------------------------------- collectives */

static int reduce_common(fxs_comm *c, const char *send, char *recv, uint64_t count, int dtype,
                         int op, int root) {
    size_t es = fxs_dtype_size(dtype);
    fxs_reduce_fn fn = fxs_reduce_kernel(dtype, op);
    if (!es || !fn) {
        set_err(c, "the shm transport cannot reduce dtype %d with op %d", dtype, op);
        return FXS_EINVAL;
    }
    int rc = op_begin(c, mkdesc(root < 0 ? OPC_ALLREDUCE : OPC_REDUCE, dtype, op, root < 0 ? 0 : root, count));
    if (rc) return rc;
    int n = c->n, me = c->me, out = root < 0 || root == me;
    size_t bytes = count * es;
    if (n == 1) {
        if (recv != send) memmove(recv, send, bytes);
        if (op == FXS_OP_AVG) fn(recv, (const void *const *)&recv, 1, count, 1);
        return FXS_OK;
    }
    size_t chunk = (c->half / es) & ~(size_t)63;
    if (bytes <= c->small_bytes || n == 2) {
        /* one step per chunk: everyone stages its input, every receiving rank reduces it
         * all (fewest syncs; for 2 ranks also the least memory traffic) */
        for (uint64_t off = 0; off < count; off += chunk) {
            size_t m = min_sz(chunk, count - off);
            if (off && (rc = wait_seq(c, c->seq, -1))) return rc;
            pcopy(c, slot(c, me, c->seq + 1), send + off * es, m * es);
            if (!out) {
                post(c);
                continue;
            }
            if ((rc = exchange(c, -1, off == 0))) return rc;
            for (int p = 0; p < n; p++) c->srcs[p] = slot(c, p, c->seq);
            preduce(c, fn, recv + off * es, c->srcs, n, m, es, n);
        }
        return FXS_OK;
    }
    /* chunked reduce-scatter + all-gather through the slots */
    for (uint64_t off = 0; off < count; off += chunk) {
        size_t m = min_sz(chunk, count - off), a, b;
        if (off && (rc = wait_seq(c, c->seq, -1))) return rc;
        pcopy(c, slot(c, me, c->seq + 1), send + off * es, m * es);
        if ((rc = exchange(c, -1, off == 0))) return rc;
        part_range(m, n, me, &a, &b);
        if (b > a) {
            for (int p = 0; p < n; p++) c->srcs[p] = slot(c, p, c->seq) + a * es;
            preduce(c, fn, slot(c, me, c->seq + 1) + a * es, c->srcs, n, b - a, es, n);
        }
        if (!out) {
            post(c);
            continue;
        }
        if ((rc = exchange(c, -1, 0))) return rc;
        for (int q = 0; q < n; q++) c->srcs[q] = slot(c, q, c->seq);
        part_range(m, n, 0, &a, &b);
        pgather(c, recv + off * es, c->srcs, b, m, es); /* parts of part_range's size b (part 0 is [0, b)) */
    }
    return FXS_OK;
}

int fxs_allreduce(fxs_comm *c, uintptr_t send, uintptr_t recv, uint64_t count, int dtype, int op) {
    return reduce_common(c, (const char *)send, (char *)recv, count, dtype, op, -1);
}

int fxs_reduce(fxs_comm *c, uintptr_t send, uintptr_t recv, uint64_t count, int dtype, int op,
               int root) {
    return reduce_common(c, (const char *)send, (char *)recv, count, dtype, op, root);
}

int fxs_reducescatter(fxs_comm *c, uintptr_t send_, uintptr_t recv_, uint64_t count, int dtype,
                      int op) {
    const char *send = (const char *)send_;
    char *recv = (char *)recv_;
    size_t es = fxs_dtype_size(dtype);
    fxs_reduce_fn fn = fxs_reduce_kernel(dtype, op);
    if (!es || !fn) {
        set_err(c, "the shm transport cannot reduce dtype %d with op %d", dtype, op);
        return FXS_EINVAL;
    }
    int rc = op_begin(c, mkdesc(OPC_REDUCESCATTER, dtype, op, 0, count));
    if (rc) return rc;
    int n = c->n, me = c->me;
    if (n == 1) {
        if (recv != send) memmove(recv, send, count * es);
        if (op == FXS_OP_AVG) fn(recv, (const void *const *)&recv, 1, count, 1);
        return FXS_OK;
    }
    /* window of w elements of every rank's block per step: stage n windows, reduce mine */
    size_t w = (c->half / ((size_t)n * es)) & ~(size_t)15;
    for (uint64_t off = 0; off < count; off += w) {
        size_t m = min_sz(w, count - off);
        if (off && (rc = wait_seq(c, c->seq, -1))) return rc;
        char *dst = slot(c, me, c->seq + 1);
        for (int q = 0; q < n; q++) memcpy(dst + (size_t)q * w * es, send + ((size_t)q * count + off) * es, m * es);
        if ((rc = exchange(c, -1, off == 0))) return rc;
        for (int p = 0; p < n; p++) c->srcs[p] = slot(c, p, c->seq) + (size_t)me * w * es;
        fn(recv + off * es, c->srcs, n, m, n);
    }
    return FXS_OK;
}

int fxs_allgather(fxs_comm *c, uintptr_t send_, uintptr_t recv_, uint64_t nbytes) {
    const char *send = (const char *)send_;
    char *recv = (char *)recv_;
    int rc = op_begin(c, mkdesc(OPC_ALLGATHER, 0, 0, 0, nbytes));
    if (rc) return rc;
    int n = c->n, me = c->me;
    char *mine = recv + (size_t)me * nbytes;
    if (mine != send) memmove(mine, send, nbytes);
    if (n == 1) return FXS_OK;
    for (uint64_t off = 0; off < nbytes; off += c->half) {
        size_t k = min_sz(c->half, nbytes - off);
        if (off && (rc = wait_seq(c, c->seq, -1))) return rc;
        memcpy(slot(c, me, c->seq + 1), mine + off, k);
        if ((rc = exchange(c, -1, off == 0))) return rc;
        for (int p = 0; p < n; p++)
            if (p != me) memcpy(recv + (size_t)p * nbytes + off, slot(c, p, c->seq), k);
    }
    return FXS_OK;
}

int fxs_broadcast(fxs_comm *c, uintptr_t buf_, uint64_t nbytes, int root) {
    char *buf = (char *)buf_;
    int rc = op_begin(c, mkdesc(OPC_BROADCAST, 0, 0, root, nbytes));
    if (rc) return rc;
    if (c->n == 1) return FXS_OK;
    for (uint64_t off = 0; off < nbytes; off += c->half) {
        size_t k = min_sz(c->half, nbytes - off);
        if (c->me == root) {
            if (off && (rc = wait_seq(c, c->seq, -1))) return rc;
            memcpy(slot(c, root, c->seq + 1), buf + off, k);
            post(c);
        } else {
            if ((rc = exchange(c, root, off == 0))) return rc;
            memcpy(buf + off, slot(c, root, c->seq), k);
        }
    }
    return FXS_OK;
}

int fxs_gather(fxs_comm *c, uintptr_t send_, uintptr_t recv_, uint64_t nbytes, int root) {
    const char *send = (const char *)send_;
    char *recv = (char *)recv_;
    int rc = op_begin(c, mkdesc(OPC_GATHER, 0, 0, root, nbytes));
    if (rc) return rc;
    int n = c->n, me = c->me;
    if (me == root) memmove(recv + (size_t)me * nbytes, send, nbytes);
    if (n == 1) return FXS_OK;
    for (uint64_t off = 0; off < nbytes; off += c->half) {
        size_t k = min_sz(c->half, nbytes - off);
        if (off && (rc = wait_seq(c, c->seq, -1))) return rc;
        if (me != root) {
            memcpy(slot(c, me, c->seq + 1), send + off, k);
            post(c);
            continue;
        }
        if ((rc = exchange(c, -1, off == 0))) return rc;
        for (int p = 0; p < n; p++)
            if (p != me) memcpy(recv + (size_t)p * nbytes + off, slot(c, p, c->seq), k);
    }
    return FXS_OK;
}

int fxs_scatter(fxs_comm *c, uintptr_t send_, uintptr_t recv_, uint64_t nbytes, int root) {
    const char *send = (const char *)send_;
    char *recv = (char *)recv_;
    int rc = op_begin(c, mkdesc(OPC_SCATTER, 0, 0, root, nbytes));
    if (rc) return rc;
    int n = c->n, me = c->me;
    if (me == root) memmove(recv, send + (size_t)me * nbytes, nbytes);
    if (n == 1) return FXS_OK;
    size_t w = (c->half / (size_t)n) & ~(size_t)63;
    for (uint64_t off = 0; off < nbytes; off += w) {
        size_t k = min_sz(w, nbytes - off);
        if (me == root) {
            if (off && (rc = wait_seq(c, c->seq, -1))) return rc;
            char *dst = slot(c, me, c->seq + 1);
            for (int p = 0; p < n; p++)
                if (p != me) memcpy(dst + (size_t)p * w, send + (size_t)p * nbytes + off, k);
            post(c);
        } else {
            if ((rc = exchange(c, root, off == 0))) return rc;
            memcpy(recv + off, slot(c, root, c->seq) + (size_t)me * w, k);
        }
    }
    return FXS_OK;
}

/* Exchange rounds of alltoall(v): in round r, rank p stages bytes [r*w, r*w + w) of its
 * block for every rank q at offset q*w of its half; then every rank collects its
 * window from each peer. */
static int alltoall_rounds(fxs_comm *c, const char *send, const uint64_t *scount, const uint64_t *sdisp,
                           char *recv, const uint64_t *rcount, const uint64_t *rdisp, uint64_t maxc,
                           int first) {
    int n = c->n, me = c->me, rc;
    size_t w = (c->half / (size_t)n) & ~(size_t)63;
    if (rcount[me]) memcpy(recv + rdisp[me], send + sdisp[me], rcount[me]);
    for (uint64_t off = 0; off < maxc; off += w) {
        if ((!first || off) && (rc = wait_seq(c, c->seq, -1))) return rc;
        char *dst = slot(c, me, c->seq + 1);
        for (int q = 0; q < n; q++)
            if (q != me && scount[q] > off) memcpy(dst + (size_t)q * w, send + sdisp[q] + off, min_sz(w, scount[q] - off));
        if ((rc = exchange(c, -1, first && off == 0))) return rc;
        for (int p = 0; p < n; p++)
            if (p != me && rcount[p] > off)
                memcpy(recv + rdisp[p] + off, slot(c, p, c->seq) + (size_t)me * w, min_sz(w, rcount[p] - off));
    }
    return FXS_OK;
}

int fxs_alltoall(fxs_comm *c, uintptr_t send, uintptr_t recv, uint64_t nbytes) {
    int rc = op_begin(c, mkdesc(OPC_ALLTOALL, 0, 0, 0, nbytes));
    if (rc) return rc;
    uint64_t *disp = c->disp_s, *counts = c->disp_r; /* same counts and offsets on both sides */
    for (int p = 0; p < c->n; p++) {
        disp[p] = (uint64_t)p * nbytes;
        counts[p] = nbytes;
    }
    return alltoall_rounds(c, (const char *)send, counts, disp, (char *)recv, counts, disp, nbytes, 1);
}

int fxs_alltoallv(fxs_comm *c, uintptr_t send, const uint64_t *scount, uintptr_t recv,
                  const uint64_t *rcount) {
    int rc = op_begin(c, mkdesc(OPC_ALLTOALLV, 0, 0, 0, 0));
    if (rc) return rc;
    int n = c->n, me = c->me;
    uint64_t maxc = 0;
    if (n > 1) {
        /* first step: publish both count rows; every rank validates the whole matrix,
         * so all reach the same verdict and the protocol stays in step */
        uint64_t *row = (uint64_t *)slot(c, me, c->seq + 1);
        memcpy(row, scount, (size_t)n * 8);
        memcpy(row + n, rcount, (size_t)n * 8);
        if ((rc = exchange(c, -1, 1))) return rc;
        int bad_p = -1, bad_q = -1;
        uint64_t bad_s = 0, bad_r = 0;
        for (int p = 0; p < n; p++) {
            const uint64_t *rp = (const uint64_t *)slot(c, p, c->seq);
            for (int q = 0; q < n; q++) {
                uint64_t s = rp[q], r = ((const uint64_t *)slot(c, q, c->seq))[n + p];
                if (s > maxc) maxc = s;
                if (s != r && bad_p < 0) {
                    bad_p = p, bad_q = q, bad_s = s, bad_r = r;
                }
            }
        }
        if (bad_p >= 0) {
            set_err(c, "rank %d sends %llu bytes to rank %d but rank %d expects %llu bytes from rank %d; "
                    "make the send and receive splits of every pair of ranks agree",
                    bad_p, (unsigned long long)bad_s, bad_q, bad_q, (unsigned long long)bad_r, bad_p);
            c->err_ranks[0] = bad_p;
            c->err_ranks[1] = bad_q;
            c->err_nranks = 2;
            return FXS_EINVAL;
        }
    } else if (scount[0] != rcount[0]) {
        set_err(c, "this rank sends %llu bytes to itself but expects %llu", (unsigned long long)scount[0],
                (unsigned long long)rcount[0]);
        return FXS_EINVAL;
    }
    uint64_t s = 0, r = 0;
    for (int p = 0; p < n; p++) {
        c->disp_s[p] = s;
        c->disp_r[p] = r;
        s += scount[p];
        r += rcount[p];
    }
    return alltoall_rounds(c, (const char *)send, scount, c->disp_s, (char *)recv, rcount, c->disp_r, maxc, 0);
}

int fxs_barrier(fxs_comm *c) {
    int rc = op_begin(c, mkdesc(OPC_BARRIER, 0, 0, 0, 0));
    if (rc || c->n == 1) return rc;
    return exchange(c, -1, 1);
}

int fxs_reduce_local(uintptr_t dst, const uintptr_t *srcs, int nsrc, uint64_t count, int dtype, int op,
                     int avg_n) {
    fxs_reduce_fn fn = fxs_reduce_kernel(dtype, op);
    if (!fn || nsrc < 1) return FXS_EINVAL;
    fn((void *)dst, (const void *const *)srcs, nsrc, count, avg_n);
    return FXS_OK;
}

/* ---------------------------------------------------------------- point to point */

static inline size_t chan_index(fxs_comm *c, int src, int dst) {
    return (size_t)src * (size_t)(c->n - 1) + (size_t)(dst < src ? dst : dst - 1);
}

static void ring_write(char *ring, size_t cap, uint64_t pos, const char *src, size_t k) {
    size_t at = (size_t)(pos % cap), first = min_sz(k, cap - at);
    memcpy(ring + at, src, first);
    if (k > first) memcpy(ring, src + first, k - first);
}

static void ring_read(char *dst, const char *ring, size_t cap, uint64_t pos, size_t k) {
    size_t at = (size_t)(pos % cap), first = min_sz(k, cap - at);
    memcpy(dst, ring + at, first);
    if (k > first) memcpy(dst + first, ring, k - first);
}

static void op_unref(fxs_op *op) {
    if (atomic_fetch_sub(&op->refs, 1) == 1) free(op);
}

/* Complete op (err 0) or fail it; drops the progress thread's reference. */
static void op_finish(fxs_op *op, int err, int peer, const char *msg) {
    if (err) {
        op->err = err;
        op->err_peer = peer;
        snprintf(op->msg, sizeof op->msg, "%s", msg);
    }
    atomic_store_explicit(&op->state, err ? OP_FAILED : OP_DONE, memory_order_release);
    if (atomic_load(&op->waiters)) futex_wake(&op->state, 1);
    op_unref(op);
}

static void fail_list(fxs_op **head, int err, int peer, const char *msg) {
    fxs_op *op = *head;
    *head = NULL;
    while (op) {
        fxs_op *next = op->next;
        op_finish(op, err, peer, msg);
        op = next;
    }
}

/* Fail every op the progress thread holds (after the communicator broke or closed). */
static void fail_all(fxs_comm *c, int err, int peer, const char *msg) {
    pthread_mutex_lock(&c->lock);
    fxs_op *in = c->in_head;
    c->in_head = c->in_tail = NULL;
    pthread_mutex_unlock(&c->lock);
    fail_list(&in, err, peer, msg);
    for (int p = 0; p < c->n; p++) {
        fail_list(&c->sq_head[p], err, peer, msg);
        c->sq_tail[p] = NULL;
        if (c->cur[p]) {
            op_finish(c->cur[p], err, peer, msg);
            c->cur[p] = NULL;
        }
    }
    fail_list(&c->rq_head, err, peer, msg);
    c->rq_tail = NULL;
}

/* Advance the first send to `to`; 1 when bytes moved. */
static int send_progress(fxs_comm *c, fxs_op *op) {
    int to = op->peer;
    size_t idx = chan_index(c, c->me, to), cap = c->chan_bytes;
    chan_ctrl *ch = &c->ctrl[idx];
    char *ring = c->data + idx * cap;
    uint64_t head = c->shead[to], tail = atomic_load_explicit(&ch->tail, memory_order_acquire);
    int moved = 0;
    if (!op->header_done) {
        if (cap - (head - tail) < 8) return 0;
        ring_write(ring, cap, head, (const char *)&op->len, 8);
        head += 8;
        op->header_done = 1;
        moved = 1;
    }
    uint64_t done = atomic_load_explicit(&op->moved, memory_order_relaxed);
    while (done < op->len) {
        uint64_t space = cap - (head - tail);
        if (!space) {
            tail = atomic_load_explicit(&ch->tail, memory_order_acquire);
            if (!(cap - (head - tail))) break;
            continue;
        }
        size_t k = min_sz(op->len - done, space);
        ring_write(ring, cap, head, op->buf + done, k);
        head += k;
        done += k;
        moved = 1;
    }
    if (moved) {
        atomic_store_explicit(&op->moved, done, memory_order_relaxed);
        c->shead[to] = head;
        atomic_store_explicit(&ch->head, head, memory_order_release);
        wake_rank(c, to);
    }
    return moved;
}

/* The first posted recv that accepts a message from `src` (removed from the queue). */
static fxs_op *match_recv(fxs_comm *c, int src) {
    fxs_op *prev = NULL;
    for (fxs_op *op = c->rq_head; op; prev = op, op = op->next) {
        if (op->peer != src && op->peer != -1) continue;
        if (prev) prev->next = op->next;
        else c->rq_head = op->next;
        if (c->rq_tail == op) c->rq_tail = prev;
        op->next = NULL;
        return op;
    }
    return NULL;
}

/* Advance the receive side of channel src -> me; 1 when bytes moved. */
static int recv_progress(fxs_comm *c, int src) {
    size_t idx = chan_index(c, src, c->me), cap = c->chan_bytes;
    chan_ctrl *ch = &c->ctrl[idx];
    const char *ring = c->data + idx * cap;
    uint64_t tail = c->rtail[src], head = atomic_load_explicit(&ch->head, memory_order_acquire);
    fxs_op *op = c->cur[src];
    int moved = 0;
    if (!op) {
        if (head - tail < 8 || !c->rq_head) return 0;
        op = match_recv(c, src);
        if (!op) return 0;
        uint64_t len;
        ring_read((char *)&len, ring, cap, tail, 8);
        tail += 8;
        moved = 1;
        atomic_store(&op->source, src);
        if (len != op->len) {
            char msg[256];
            snprintf(msg, sizeof msg, "rank %d sent a message of %llu bytes but the matching recv holds %llu bytes; "
                     "post receives of exactly the sent size", src, (unsigned long long)len,
                     (unsigned long long)op->len);
            int r = src;
            mark_broken(c, FXS_EINVAL, msg, &r, 1, FAILED_UNKNOWN);
            op_finish(op, FXS_EINVAL, src, msg);
            op = NULL;
        } else {
            c->cur[src] = op;
        }
    }
    if (op) {
        uint64_t done = atomic_load_explicit(&op->moved, memory_order_relaxed);
        while (done < op->len) {
            if (head == tail) {
                head = atomic_load_explicit(&ch->head, memory_order_acquire);
                if (head == tail) break;
            }
            size_t k = min_sz(op->len - done, head - tail);
            ring_read(op->buf + done, ring, cap, tail, k);
            tail += k;
            done += k;
            moved = 1;
        }
        atomic_store_explicit(&op->moved, done, memory_order_relaxed);
    }
    if (moved) {
        c->rtail[src] = tail;
        atomic_store_explicit(&ch->tail, tail, memory_order_release);
        wake_rank(c, src);
    }
    if (op && atomic_load_explicit(&op->moved, memory_order_relaxed) == op->len) {
        c->cur[src] = NULL;
        op_finish(op, 0, src, NULL);
    }
    return moved;
}

static void take_posted(fxs_comm *c) {
    pthread_mutex_lock(&c->lock);
    fxs_op *op = c->in_head;
    c->in_head = c->in_tail = NULL;
    pthread_mutex_unlock(&c->lock);
    while (op) {
        fxs_op *next = op->next;
        op->next = NULL;
        if (op->is_recv) {
            if (c->rq_tail) c->rq_tail->next = op;
            else c->rq_head = op;
            c->rq_tail = op;
        } else {
            int p = op->peer;
            if (c->sq_tail[p]) c->sq_tail[p]->next = op;
            else c->sq_head[p] = op;
            c->sq_tail[p] = op;
        }
        op = next;
    }
}

/* One pass over every channel; 1 when anything moved. */
static int progress_pass(fxs_comm *c) {
    int any = 0, n = c->n;
    take_posted(c);
    for (int i = 0; i < n; i++) {
        int p = (c->rr + i) % n;
        if (p == c->me) continue;
        while (c->sq_head[p]) {
            fxs_op *op = c->sq_head[p];
            any |= send_progress(c, op);
            if (!op->header_done || atomic_load_explicit(&op->moved, memory_order_relaxed) < op->len) break;
            c->sq_head[p] = op->next;
            if (!c->sq_head[p]) c->sq_tail[p] = NULL;
            op->next = NULL;
            op_finish(op, 0, p, NULL);
        }
        while (recv_progress(c, p)) any = 1;
    }
    c->rr = (c->rr + 1) % n;
    return any;
}

static int has_pending(fxs_comm *c) {
    if (c->rq_head) return 1;
    for (int p = 0; p < c->n; p++)
        if (c->sq_head[p] || c->cur[p]) return 1;
    return 0;
}

/* Peers that pending ops wait on: a dead or closed one breaks the communicator. */
static int check_p2p_peers(fxs_comm *c) {
    char msg[256];
    int any_live = 0, any_src = 0;
    for (fxs_op *op = c->rq_head; op; op = op->next)
        if (op->peer < 0) any_src = 1;
    for (int p = 0; p < c->n; p++) {
        if (p == c->me) continue;
        int involved = c->sq_head[p] || c->cur[p];
        for (fxs_op *op = c->rq_head; op && !involved; op = op->next)
            if (op->peer == p) involved = 1;
        if (!involved && !any_src) continue;
        int rc = peer_problem(c, p, msg, sizeof msg);
        if (!rc) {
            any_live = 1;
            continue;
        }
        if (!involved) continue;
        if (progress_pass(c)) return 0; /* the peer's last data may still be in the ring */
        int r = p;
        mark_broken(c, rc, msg, &r, 1, FAILED_UNKNOWN);
        return rc;
    }
    if (any_src && !any_live && c->n > 1) {
        snprintf(msg, sizeof msg, "every other rank closed, aborted or died while a recv from any source was pending");
        if (progress_pass(c)) return 0;
        mark_broken(c, FXS_EPEER, msg, NULL, 0, FAILED_UNKNOWN);
        return FXS_EPEER;
    }
    return 0;
}

static void *progress_main(void *arg) {
    fxs_comm *c = (fxs_comm *)arg;
    rank_rec *mine = &c->rec[c->me];
    int64_t idle_since = 0, next_check = 0;
    while (!atomic_load(&c->stop)) {
        if (atomic_load(&c->broken)) {
            pthread_mutex_lock(&c->lock);
            char msg[512];
            snprintf(msg, sizeof msg, "%s", c->broken_msg);
            int code = atomic_load(&c->broken), peer = c->broken_nranks ? c->broken_ranks[0] : -1;
            pthread_mutex_unlock(&c->lock);
            fail_all(c, code, peer, msg);
        } else if (progress_pass(c)) {
            idle_since = 0;
            continue;
        }
        int pending = has_pending(c);
        int64_t t = now_ns();
        if (pending) {
            if (!idle_since) {
                idle_since = t;
                next_check = t + FIRST_CHECK_NS;
            }
            if (t >= next_check) {
                check_p2p_peers(c);
                next_check = t + CHECK_NS;
            }
            if (t - idle_since < YIELD_NS) {
                sched_yield();
                continue;
            }
        }
        uint32_t w = atomic_load(&mine->wake);
        atomic_fetch_add(&mine->sleepers, 1);
        atomic_thread_fence(memory_order_seq_cst);
        if (!atomic_load(&c->stop) && !progress_pass(c)) {
            int64_t slice = pending ? SLEEP_NS : IDLE_SLEEP_NS;
            if (pending && next_check - t < slice) slice = next_check - t;
            futex_wait(&mine->wake, w, slice, 0);
        } else {
            idle_since = 0;
        }
        atomic_fetch_sub(&mine->sleepers, 1);
    }
    fail_all(c, FXS_EBROKEN, -1, "the communicator was closed before this op finished");
    return NULL;
}

static int start_thread(fxs_comm *c) {
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* signals stay with the application's threads */
    int rc = pthread_create(&c->thread, NULL, progress_main, c);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) return rc;
    c->thread_on = 1;
    return 0;
}

fxs_op *fxs_post(fxs_comm *c, int is_recv, int peer, uintptr_t buf, uint64_t nbytes, int *rc) {
    if (atomic_load(&c->broken)) {
        *rc = broken_error(c);
        return NULL;
    }
    if (peer == c->me || peer >= c->n || peer < (is_recv ? -1 : 0)) {
        set_err(c, "peer %d is not another rank of this communicator (size %d)", peer, c->n);
        *rc = FXS_EINVAL;
        return NULL;
    }
    fxs_op *op = (fxs_op *)calloc(1, sizeof *op);
    if (!op) {
        set_err(c, "out of memory posting a %s", is_recv ? "recv" : "send");
        *rc = FXS_ESYS;
        return NULL;
    }
    atomic_init(&op->refs, 2);
    op->is_recv = is_recv;
    op->peer = peer;
    atomic_init(&op->source, -1);
    op->buf = (char *)buf;
    op->len = nbytes;
    op->err_peer = -1;
    pthread_mutex_lock(&c->lock);
    int e = c->thread_on ? 0 : start_thread(c);
    if (e) {
        pthread_mutex_unlock(&c->lock);
        free(op);
        set_err(c, "cannot start the progress thread: %s", strerror(e));
        *rc = FXS_ESYS;
        return NULL;
    }
    if (c->in_tail) c->in_tail->next = op;
    else c->in_head = op;
    c->in_tail = op;
    pthread_mutex_unlock(&c->lock);
    rank_rec *mine = &c->rec[c->me];
    atomic_fetch_add(&mine->wake, 1);
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load(&mine->sleepers)) futex_wake(&mine->wake, 0);
    *rc = FXS_OK;
    return op;
}

int fxs_op_test(fxs_op *op) {
    uint32_t st = atomic_load_explicit(&op->state, memory_order_acquire);
    return st == OP_PENDING ? FXS_EPENDING : st == OP_DONE ? FXS_OK : op->err;
}

int fxs_op_wait(fxs_op *op, double timeout) {
    if (!(timeout < 1e9)) timeout = 1e9; /* also NaN / inf: ~30 years */
    if (timeout < 0) timeout = 0;
    int64_t t0 = now_ns(), deadline = t0 + (int64_t)(timeout * 1e9), yield_end = t0 + 200000;
    for (;;) {
        int rc = fxs_op_test(op);
        if (rc != FXS_EPENDING) return rc;
        int64_t t = now_ns();
        if (t >= deadline) return FXS_ETIMEOUT;
        if (t < yield_end) {
            sched_yield();
            continue;
        }
        atomic_fetch_add(&op->waiters, 1);
        atomic_thread_fence(memory_order_seq_cst);
        if (atomic_load(&op->state) == OP_PENDING) {
            int64_t slice = deadline - t < IDLE_SLEEP_NS ? deadline - t : IDLE_SLEEP_NS;
            futex_wait(&op->state, OP_PENDING, slice, 1);
        }
        atomic_fetch_sub(&op->waiters, 1);
    }
}

int fxs_op_source(fxs_op *op) { return atomic_load(&op->source); }
uint64_t fxs_op_progress(fxs_op *op) { return atomic_load(&op->moved); }
const char *fxs_op_error(fxs_op *op) { return op->msg; }
int fxs_op_error_peer(fxs_op *op) { return op->err_peer; }
void fxs_op_release(fxs_op *op) { op_unref(op); }

/* ---------------------------------------------------------------- segment life cycle */

static size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

static int comm_init(fxs_comm **out, char *base, size_t total, int rank, double timeout, uint32_t mode,
                     const char *name, char *err, size_t errlen) {
    seg_hdr *h = (seg_hdr *)base;
    int n = (int)h->nranks;
    fxs_comm *c = (fxs_comm *)calloc(1, sizeof *c);
    if (!c) {
        put_err(err, errlen, "out of memory");
        return FXS_ESYS;
    }
    c->me = rank;
    c->n = n;
    c->base = base;
    c->total = total;
    c->hdr = h;
    c->rec = (rank_rec *)(base + h->off_ranks);
    c->slots = base + h->off_slots;
    c->slot_bytes = h->slot_bytes;
    c->half = h->slot_bytes / 2;
    /* one-step allreduce reads n inputs per rank: worth it for 2 ranks at any size, for
     * more ranks only while that beats a second sync (measured crossover ~8 KiB at 4) */
    c->small_bytes = n <= 2 ? c->half : min_sz(c->half, (size_t)32 * 1024 / (size_t)(n - 1));
    c->ctrl = (chan_ctrl *)(base + h->off_ctrl);
    c->data = base + h->off_data;
    c->chan_bytes = h->chan_bytes;
    c->timeout_ns = (int64_t)((timeout < 1e9 ? timeout : 1e9) * 1e9);
    c->owner = getpid();
    c->mode = mode;
    c->my_pidns = self_pidns();
    c->nthreads = 1;
    pthread_mutex_init(&c->lock, NULL);
    size_t un = (size_t)n;
    c->known = calloc(un, sizeof *c->known);
    c->srcs = calloc(un, sizeof *c->srcs);
    c->disp_s = calloc(un, sizeof *c->disp_s);
    c->disp_r = calloc(un, sizeof *c->disp_r);
    c->pid_ok = malloc(un);
    c->sq_head = calloc(un, sizeof *c->sq_head);
    c->sq_tail = calloc(un, sizeof *c->sq_tail);
    c->cur = calloc(un, sizeof *c->cur);
    c->shead = calloc(un, sizeof *c->shead);
    c->rtail = calloc(un, sizeof *c->rtail);
    if (!c->known || !c->srcs || !c->disp_s || !c->disp_r || !c->pid_ok || !c->sq_head || !c->sq_tail ||
        !c->cur || !c->shead || !c->rtail) {
        put_err(err, errlen, "out of memory");
        c->base = NULL; /* the caller unmaps */
        c->me = -1;
        fxs_close(c, 1);
        return FXS_ESYS;
    }
    memset(c->pid_ok, -1, un);
    rank_rec *mine = &c->rec[rank];
    if (atomic_load(&mine->state) != ST_NONE) {
        put_err(err, errlen, "rank %d of segment %s is already attached; two processes claim the same rank",
                rank, name);
        c->base = NULL; /* the caller unmaps */
        c->me = -1;     /* and that record belongs to the other process */
        fxs_close(c, 1);
        return FXS_EINVAL;
    }
    mine->pid = (int32_t)getpid();
    mine->pidns = c->my_pidns;
    atomic_store(&mine->seq, 0);
    atomic_store(&mine->state, ST_ATTACHED);
    if (atomic_fetch_add(&h->attached, 1) + 1 == h->nranks) shm_unlink(name);
    *out = c;
    return FXS_OK;
}

int fxs_create(const char *name, int rank, int size, uint64_t slot_bytes, uint64_t p2p_bytes, double timeout,
               fxs_comm **out, char *err, size_t errlen) {
    if (size < 1 || rank < 0 || rank >= size) {
        put_err(err, errlen, "rank %d is not in [0, %d)", rank, size);
        return FXS_EINVAL;
    }
    size_t n = (size_t)size;
    size_t slot = round_up(slot_bytes < 2 * PAGE ? 2 * PAGE : slot_bytes, 2 * PAGE);
    if (slot < 2 * n * PAGE) slot = 2 * n * PAGE; /* alltoall/scatter windows of >= 4 KiB per rank */
    size_t chan = n > 1 ? round_up(p2p_bytes < PAGE ? PAGE : p2p_bytes, PAGE) : 0;
    size_t nchan = n * (n - 1);
    size_t off_ranks = PAGE;
    size_t off_slots = round_up(off_ranks + n * sizeof(rank_rec), PAGE);
    size_t off_ctrl = off_slots + n * slot;
    size_t off_data = round_up(off_ctrl + nchan * sizeof(chan_ctrl), PAGE);
    size_t total = off_data + nchan * chan;
    /* The segment is built unnamed (an O_TMPFILE in /dev/shm, freed by the kernel if this
     * process dies) and named only once its header is complete: no kill leaves a name that
     * fxs_sweep could not recognise. Where /dev/shm has no O_TMPFILE, or there is no /proc to
     * name it through, it is named from the start. */
    int named = 0;
    int fd = access("/proc/self/fd", X_OK) == 0 ? open("/dev/shm", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600) : -1;
    if (fd < 0) {
        fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
        named = 1;
    }
    if (fd < 0) {
        put_err(err, errlen, "shm_open(%s) failed: %s", name, strerror(errno));
        return FXS_ESYS;
    }
    int e = 0;
    const char *what = NULL;
    if (fchmod(fd, 0600) != 0) e = errno, what = "fchmod";
    else if (ftruncate(fd, (off_t)total) != 0) e = errno, what = "ftruncate";
    else {
        /* A named segment gets its creator's identity first: a creator killed while the memory
         * is reserved (seconds for a large segment) leaves a segment that fxs_sweep recognises. */
        seg_hdr pre;
        memset(&pre, 0, sizeof pre);
        pre.magic = MAGIC;
        pre.version = VERSION;
        pre.creator_pid = (int32_t)getpid();
        pre.creator_pidns = self_pidns();
        if (named && pwrite(fd, &pre, sizeof pre, 0) != (ssize_t)sizeof pre) e = errno ? errno : EIO, what = "writing the header of";
        else if ((e = posix_fallocate(fd, 0, (off_t)total)) != 0) what = "reserving memory for";
    }
    if (what) {
        put_err(err, errlen, "%s the %.1f MiB segment %s failed: %s; /dev/shm may be too small (e.g. docker's "
                "64 MiB default: use --shm-size), or lower FLAGCX_SHM_BUFFER / FLAGCX_SHM_P2P_BUFFER, or set "
                "FLAGCX_CPU_ADAPTER=gloo", what, (double)total / 1048576.0, name, strerror(e));
        close(fd);
        if (named) shm_unlink(name);
        return FXS_ESYS;
    }
    struct stat st;
    uint32_t mode = fstat(fd, &st) == 0 ? (uint32_t)(st.st_mode & 07777) : 0;
    char *base = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        put_err(err, errlen, "mmap of %s (%zu bytes) failed: %s", name, total, strerror(errno));
        close(fd);
        if (named) shm_unlink(name);
        return FXS_ESYS;
    }
    seg_hdr *h = (seg_hdr *)base;
    h->version = VERSION;
    h->nranks = (uint32_t)size;
    h->slot_bytes = slot;
    h->chan_bytes = chan;
    h->off_ranks = off_ranks;
    h->off_slots = off_slots;
    h->off_ctrl = off_ctrl;
    h->off_data = off_data;
    h->total = total;
    h->creator_pid = (int32_t)getpid();
    h->creator_pidns = self_pidns();
    atomic_store(&h->attached, 0);
    atomic_thread_fence(memory_order_seq_cst);
    h->magic = MAGIC;
    if (!named) {
        char path[64];
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        char target[NAME_MAX + 16];
        snprintf(target, sizeof target, "/dev/shm%s", name);
        if (linkat(AT_FDCWD, path, AT_FDCWD, target, AT_SYMLINK_FOLLOW) != 0) {
            put_err(err, errlen, "naming the segment %s (linkat %s) failed: %s", name, target, strerror(errno));
            close(fd);
            munmap(base, total);
            return FXS_ESYS;
        }
    }
    close(fd);
    int rc = comm_init(out, base, total, rank, timeout, mode, name, err, errlen);
    if (rc) {
        munmap(base, total);
        shm_unlink(name);
    }
    return rc;
}

int fxs_attach(const char *name, int rank, int size, double timeout, fxs_comm **out, char *err, size_t errlen) {
    int fd = shm_open(name, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) {
        put_err(err, errlen, "shm_open(%s) failed: %s (ranks on different hosts, or containers that do not "
                "share /dev/shm? set FLAGCX_CPU_ADAPTER=gloo)", name, strerror(errno));
        return FXS_ESYS;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || (size_t)st.st_size < PAGE) {
        put_err(err, errlen, "segment %s is missing or truncated", name);
        close(fd);
        return FXS_ESYS;
    }
    size_t total = (size_t)st.st_size;
    char *base = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED) {
        put_err(err, errlen, "mmap of %s failed: %s", name, strerror(errno));
        return FXS_ESYS;
    }
    seg_hdr *h = (seg_hdr *)base;
    if (h->magic != MAGIC || h->version != VERSION || h->total != total || (int)h->nranks != size ||
        rank < 0 || rank >= size) {
        put_err(err, errlen, "segment %s does not match this communicator (magic/version/size: %d ranks "
                "expected, segment has %u); all ranks must run the same flagcx build", name, size, h->nranks);
        munmap(base, total);
        return FXS_EINVAL;
    }
    int rc = comm_init(out, base, total, rank, timeout, (uint32_t)(st.st_mode & 07777), name, err, errlen);
    if (rc) munmap(base, total);
    return rc;
}

int fxs_unlink(const char *name) { return shm_unlink(name) == 0 ? 0 : errno; }

/* A segment's name lives from its creation by rank 0 until the last rank attaches. If rank 0
 * and every rank still to attach die in that window, nobody unlinks it. Such a segment is
 * recognised by its header: this user's file, our magic, and a creator (rank 0) that was in
 * this pid namespace and is gone (a communicator cannot work without rank 0, so a rank still to
 * attach is doomed anyway; ranks that attached keep their mappings). */
int fxs_sweep(const char *prefix) {
    uint64_t ns = self_pidns();
    DIR *dir = ns ? opendir("/dev/shm") : NULL;
    if (!dir) return 0;
    size_t plen = strlen(prefix);
    size_t head = sizeof(seg_hdr);
    int removed = 0;
    struct dirent *e;
    while ((e = readdir(dir)) != NULL) {
        if (strncmp(e->d_name, prefix, plen) != 0) continue;
        char name[NAME_MAX + 2];
        snprintf(name, sizeof name, "/%s", e->d_name);
        int fd = shm_open(name, O_RDONLY | O_CLOEXEC, 0);
        if (fd < 0) continue;
        struct stat st;
        char *base = MAP_FAILED;
        if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == geteuid() && (size_t)st.st_size >= head)
            base = mmap(NULL, head, PROT_READ, MAP_SHARED, fd, 0);
        close(fd);
        if (base == MAP_FAILED) continue;
        const seg_hdr *h = (const seg_hdr *)base;
        int orphan = 0;
        if (h->magic == MAGIC && h->version == VERSION)
            orphan = h->creator_pid > 0 && h->creator_pidns == ns && pid_dead(h->creator_pid);
        munmap(base, head);
        if (orphan && shm_unlink(name) == 0) removed++;
    }
    closedir(dir);
    return removed;
}

void fxs_close(fxs_comm *c, int abort) {
    if (!c) return;
    if (c->owner != getpid()) { /* a forked child: the rank and its threads belong to the parent */
        c->me = -1;
        c->thread_on = 0;
        c->helpers_on = 0;
    }
    stop_helpers(c);
    if (c->me >= 0 && c->rec) {
        /* A published mismatch stays: it tells peers more than "closed" would. */
        if (atomic_load(&c->rec[c->me].state) != ST_MISMATCH)
            atomic_store(&c->rec[c->me].state, abort ? ST_ABORTED : ST_CLOSED);
        for (int p = 0; p < c->n; p++) {
            if (p == c->me) continue;
            atomic_fetch_add(&c->rec[p].wake, 1);
            futex_wake(&c->rec[p].wake, 0);
        }
    }
    if (c->thread_on) {
        atomic_store(&c->stop, 1);
        atomic_fetch_add(&c->rec[c->me].wake, 1);
        futex_wake(&c->rec[c->me].wake, 0);
        pthread_join(c->thread, NULL);
    }
    if (c->base) munmap(c->base, c->total);
    free(c->known);
    free(c->srcs);
    free(c->disp_s);
    free(c->disp_r);
    free(c->pid_ok);
    free(c->sq_head);
    free(c->sq_tail);
    free(c->cur);
    free(c->shead);
    free(c->rtail);
    free(c->helpers);
    free(c->hargs);
    free(c->job_part_srcs);
    pthread_mutex_destroy(&c->lock);
    free(c);
}

const char *fxs_error(fxs_comm *c) { return c->err; }

int fxs_error_ranks(fxs_comm *c, int *ranks, int max) {
    int k = c->err_nranks < max ? c->err_nranks : max;
    for (int i = 0; i < k; i++) ranks[i] = c->err_ranks[i];
    return k;
}

int fxs_broken(fxs_comm *c) { return atomic_load(&c->broken); }
uint32_t fxs_segment_mode(fxs_comm *c) { return c->mode; }
uint64_t fxs_segment_bytes(fxs_comm *c) { return c->total; }
uint64_t fxs_slot_bytes(fxs_comm *c) { return c->slot_bytes; }
uint64_t fxs_small_bytes(fxs_comm *c) { return c->small_bytes; }
uint64_t fxs_ring_bytes(fxs_comm *c) { return c->chan_bytes; }
