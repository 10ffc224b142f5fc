/* Internal header of the shared-memory transport (flagcx_shm.h is the API): the segment layout, the
 * communicator, and what its files share. Internal functions have hidden visibility; nothing here is exported.
 *
 *   shm_segment.c      the segment's life cycle (create, attach, close, sweep), errors, peer liveness
 *   shm_collectives.c  the step / slot protocol and the collectives
 *   shm_p2p.c          point-to-point rings and their progress thread
 *   shm_helpers.c      helper threads that split large copies and reductions
 */
#ifndef FLAGCX_SHM_INTERNAL_H
#define FLAGCX_SHM_INTERNAL_H

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
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "flagcx_reduce.h"

#define FXS_HIDDEN __attribute__((visibility("hidden")))

#define MAGIC 0x6873786367616c66ULL /* "flagcxsh" */
#define VERSION 4u
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
enum { TS_RUNNING = 0, TS_IDLE = 1, TS_PENDING = 2 };
enum {
    OPC_ALLREDUCE = 1, OPC_REDUCE, OPC_REDUCESCATTER, OPC_ALLGATHER, OPC_BROADCAST, OPC_GATHER,
    OPC_SCATTER, OPC_ALLTOALL, OPC_ALLTOALLV, OPC_BARRIER
};

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
    _Atomic uint32_t wake; /* collective waiters of this rank sleep here */
    char pad1[LINE - 4];
    _Atomic uint32_t p2p_wake;     /* bumped when a ring of this rank changes (data in, space freed) */
    _Atomic uint32_t p2p_sleepers; /* this rank's threads asleep on p2p_wake (peers wake only then) */
    char pad2[LINE - 8];
    _Atomic uint64_t addr[2]; /* single-copy steps: the address peers read from, per step parity */
    uint64_t probe;           /* address of CMA_PROBE in this process (fxs_cma_probe reads it) */
    char pad3[LINE - 24];
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
    _Atomic uint64_t acks; /* single-copy messages the receiver has read out of the sender's memory */
    char pad1[LINE - 16];
} chan_ctrl;

struct fxs_op {
    fxs_op *next;
    fxs_comm *comm; /* holds a reference on it until fxs_op_release */
    _Atomic int refs;
    _Atomic uint32_t state;
    _Atomic uint32_t waiters;
    int is_recv, peer;
    _Atomic int source;
    char *buf;
    uint64_t len;
    _Atomic uint64_t moved;
    int header_done;
    uint64_t ticket; /* a single-copy send: done once the channel's acks reach it */
    int err, err_peer;
    char msg[512];
};


/* One job of the helper threads (shm_helpers.c): a copy, a reduction or a gather, split in ranges. */
enum { JOB_COPY, JOB_REDUCE, JOB_GATHER, JOB_CMA };
struct par_job {
    int kind;       /* JOB_COPY, JOB_REDUCE or JOB_GATHER */
    size_t part;    /* JOB_GATHER: elements per source part (part q comes from srcs[q]) */
    char *dst;
    const char *src;
    size_t count, es;
    fxs_reduce_fn fn;
    const void *const *srcs;
    int nsrc, avg;
    pid_t pid; /* JOB_CMA: the process src belongs to */
};

struct helper_arg {
    fxs_comm *c;
    int idx;
    uint32_t seen;
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
    _Atomic int refs; /* the owner's and one per op not yet released: the struct outlives the segment */
    /* shared with the progress thread */
    pthread_mutex_t lock;
    _Atomic int broken;
    char broken_msg[512];
    int broken_ranks[8], broken_nranks;
    fxs_op *in_head, *in_tail;
    int thread_on;
    pthread_t thread;
    _Atomic int stop;
    _Atomic int users;            /* callers inside fxs_op_wait: close waits for them before unmapping */
    _Atomic int drivers;          /* those of them advancing ops now; the progress thread stands by */
    _Atomic uint32_t thread_wake; /* the progress thread sleeps here when idle or standing by */
    _Atomic int thread_state;     /* TS_RUNNING, TS_IDLE (on thread_wake) or TS_PENDING (on the rank's p2p_wake) */
    /* owned by whoever holds plock: the progress thread, or a caller in fxs_post / fxs_op_wait */
    pthread_mutex_t plock;
    fxs_op **sq_head, **sq_tail, **cur;
    fxs_op *rq_head, *rq_tail;
    uint64_t *shead, *rtail;
    uint64_t *cma_sent; /* single-copy sends per peer (tickets) */
    int rr;
    size_t cma_min; /* single-copy threshold in bytes (0: off), the same on every rank */
    /* helper threads for large copies and reductions (see "helper threads") */
    int nthreads, helpers_on;
    pthread_t *helpers;
    struct helper_arg *hargs;
    _Atomic uint32_t job_gen, job_sleepers, job_left;
    _Atomic int job_err; /* JOB_CMA: the first errno of a range */
    _Atomic int helpers_stop;
    struct par_job job; /* the job being run (written before job_gen is bumped) */
    const void **job_part_srcs; /* nthreads x n source pointers, one row per thread */
};


/* The step at which a rank broke, when the progress thread broke it (no collective step known). */
#define FAILED_UNKNOWN UINT64_MAX

/* ---------------------------------------------------------------- small shared helpers */

static inline int64_t now_ns(void) {
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

static inline void futex_wait(_Atomic uint32_t *addr, uint32_t val, int64_t ns, int private_) {
    if (ns < 1000) ns = 1000;
    struct timespec ts = {(time_t)(ns / 1000000000LL), (long)(ns % 1000000000LL)};
    syscall(SYS_futex, (uint32_t *)addr, private_ ? FUTEX_WAIT_PRIVATE : FUTEX_WAIT, val, &ts,
            NULL, 0);
}

static inline void futex_wake(_Atomic uint32_t *addr, int private_) {
    syscall(SYS_futex, (uint32_t *)addr, private_ ? FUTEX_WAKE_PRIVATE : FUTEX_WAKE, INT_MAX,
            NULL, NULL, 0);
}

static inline size_t min_sz(size_t a, size_t b) { return a < b ? a : b; }

/* Bump `word` and wake its sleepers, if `sleepers` says there are any (a full fence first: Dekker with the sleeper). */
static inline void wake_word(_Atomic uint32_t *sleepers, _Atomic uint32_t *word) {
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(sleepers, memory_order_relaxed)) {
        atomic_fetch_add(word, 1);
        futex_wake(word, 0);
    }
}

/* Wake rank p's threads asleep in a collective, if any. */
static inline void wake_coll(fxs_comm *c, int p) { wake_word(&c->rec[p].sleepers, &c->rec[p].wake); }

/* Wake rank p's threads asleep on its p2p rings, if any. Kept apart from wake_coll: a collective
 * step must not wake a peer's progress thread, nor a ring's data a rank waiting in a collective. */
static inline void wake_p2p(fxs_comm *c, int p) { wake_word(&c->rec[p].p2p_sleepers, &c->rec[p].p2p_wake); }

/* Wake every sleeper of rank p (its state changed: closed, broken, mismatch). */
static inline void wake_rank(fxs_comm *c, int p) {
    wake_coll(c, p);
    wake_p2p(c, p);
}

/* ---------------------------------------------------------------- shm_segment.c: errors and liveness */

FXS_HIDDEN void set_err(fxs_comm *c, const char *fmt, ...);
FXS_HIDDEN void put_err(char *err, size_t errlen, const char *fmt, ...);
/* Mark the communicator unusable (first reason wins) at collective `step`; safe from both threads. */
FXS_HIDDEN void mark_broken(fxs_comm *c, int code, const char *msg, const int *ranks, int nranks, uint64_t step);
/* The error returned by every call once the communicator is broken. */
FXS_HIDDEN int broken_error(fxs_comm *c);
/* Fail the current call with code and c->err, and break the communicator at `step`. */
FXS_HIDDEN int fail_at(fxs_comm *c, int code, uint64_t step);
/* 0 when peer p looks alive, else FXS_EDEAD / FXS_EPEER with the reason in msg. */
FXS_HIDDEN int peer_problem(fxs_comm *c, int p, char *msg, size_t len);

/* Drop a reference on the communicator's struct (the owner's at close, an op's at release); the last frees it. */
FXS_HIDDEN void comm_unref(fxs_comm *c);

/* ---------------------------------------------------------------- shm_helpers.c */

FXS_HIDDEN void pcopy(fxs_comm *c, void *dst, const void *src, size_t bytes);
FXS_HIDDEN void preduce(fxs_comm *c, fxs_reduce_fn fn, void *dst, const void *const *srcs, int nsrc, size_t count,
                        size_t es, int avg_n);
FXS_HIDDEN void pgather(fxs_comm *c, void *dst, const void *const *srcs, size_t per, size_t count, size_t es);
/* Read `bytes` at address `remote` of rank p's process into dst: 0 or an errno. `split`: over the helper threads
 * when large (collectives only: the helpers serve the thread that runs collectives, never the p2p progress). */
FXS_HIDDEN int cma_read(fxs_comm *c, int p, void *dst, uint64_t remote, size_t bytes, int split);
/* Stop the helper threads and free what they used (at close). */
FXS_HIDDEN void release_helpers(fxs_comm *c);

#endif
