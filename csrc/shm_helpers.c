/* flagcx shared-memory host transport: helper threads for large copies and reductions, and
 * single-copy reads from a peer's memory (cross-memory attach, process_vm_readv). */
#include "shm_internal.h"

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

/* process_vm_readv of [remote, remote + bytes) of pid into dst, to the end (it may stop early): 0 or an errno. */
static int read_remote(pid_t pid, char *dst, const char *remote, size_t bytes) {
    while (bytes) {
        struct iovec local = {dst, bytes}, far = {(void *)remote, bytes};
        ssize_t k = process_vm_readv(pid, &local, 1, &far, 1, 0);
        if (k < 0) {
            if (errno == EINTR) continue;
            return errno ? errno : EIO;
        }
        if (k == 0) return EFAULT;
        dst += k;
        remote += k;
        bytes -= (size_t)k;
    }
    return 0;
}

static void job_part(fxs_comm *c, int idx) {
    size_t per = (c->job.count + (size_t)c->nthreads - 1) / (size_t)c->nthreads;
    per = (per + 63) & ~(size_t)63;
    size_t a = per * (size_t)idx, b = a + per;
    if (a >= c->job.count) return;
    if (b > c->job.count) b = c->job.count;
    size_t es = c->job.es;
    if (c->job.kind == JOB_CMA) {
        int e = read_remote(c->job.pid, c->job.dst + a, c->job.src + a, b - a);
        if (e) {
            int none = 0;
            atomic_compare_exchange_strong(&c->job_err, &none, e);
        }
        return;
    }
    if (c->job.kind == JOB_COPY) {
        memcpy(c->job.dst + a * es, c->job.src + a * es, (b - a) * es);
        return;
    }
    if (c->job.kind == JOB_GATHER) { /* dst[i] = part (i / job.part) of the sources, at the same offset */
        for (size_t i = a; i < b;) {
            size_t q = i / c->job.part, end = min_sz(b, (q + 1) * c->job.part);
            memcpy(c->job.dst + i * es, (const char *)c->job.srcs[q] + i * es, (end - i) * es);
            i = end;
        }
        return;
    }
    const void **srcs = c->job_part_srcs + (size_t)idx * (size_t)c->n;
    for (int p = 0; p < c->job.nsrc; p++) srcs[p] = (const char *)c->job.srcs[p] + a * es;
    c->job.fn(c->job.dst + a * es, srcs, c->job.nsrc, b - a, c->job.avg);
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
FXS_HIDDEN void pcopy(fxs_comm *c, void *dst, const void *src, size_t bytes) {
    if (!parallel(c, bytes)) {
        memcpy(dst, src, bytes);
        return;
    }
    c->job.kind = JOB_COPY;
    c->job.dst = (char *)dst;
    c->job.src = (const char *)src;
    c->job.count = bytes;
    c->job.es = 1;
    par_run(c);
}

/* fn(dst, srcs, nsrc, count, avg_n), split over the helper threads when large. */
FXS_HIDDEN void preduce(fxs_comm *c, fxs_reduce_fn fn, void *dst, const void *const *srcs, int nsrc, size_t count,
                    size_t es, int avg_n) {
    if (!parallel(c, count * es)) {
        fn(dst, srcs, nsrc, count, avg_n);
        return;
    }
    c->job.kind = JOB_REDUCE;
    c->job.dst = (char *)dst;
    c->job.count = count;
    c->job.es = es;
    c->job.fn = fn;
    c->job.srcs = srcs;
    c->job.nsrc = nsrc;
    c->job.avg = avg_n;
    par_run(c);
}

/* dst[0, count) from parts of ``per`` elements: part q is srcs[q] (indexed like dst), split
 * over the helper threads as one job when large (the all-gather half of an allreduce). */
FXS_HIDDEN void pgather(fxs_comm *c, void *dst, const void *const *srcs, size_t per, size_t count, size_t es) {
    if (!parallel(c, count * es)) {
        for (size_t i = 0, q = 0; i < count; i += per, q++)
            memcpy((char *)dst + i * es, (const char *)srcs[q] + i * es, min_sz(per, count - i) * es);
        return;
    }
    c->job.kind = JOB_GATHER;
    c->job.dst = (char *)dst;
    c->job.srcs = srcs;
    c->job.part = per;
    c->job.count = count;
    c->job.es = es;
    par_run(c);
}

FXS_HIDDEN int cma_read(fxs_comm *c, int p, void *dst, uint64_t remote, size_t bytes, int split) {
    pid_t pid = (pid_t)c->rec[p].pid;
    if (!split || !parallel(c, bytes)) return read_remote(pid, (char *)dst, (const char *)(uintptr_t)remote, bytes);
    atomic_store(&c->job_err, 0);
    c->job.kind = JOB_CMA;
    c->job.pid = pid;
    c->job.dst = (char *)dst;
    c->job.src = (const char *)(uintptr_t)remote;
    c->job.count = bytes;
    c->job.es = 1;
    par_run(c);
    return atomic_load(&c->job_err);
}

void release_helpers(fxs_comm *c) {
    stop_helpers(c);
    free(c->helpers);
    free(c->hargs);
    free(c->job_part_srcs);
    c->helpers = NULL;
    c->hargs = NULL;
    c->job_part_srcs = NULL;
}

int fxs_set_threads(fxs_comm *c, int nthreads) {
    if (!c->helpers_on) c->nthreads = nthreads < 1 ? 1 : nthreads > 64 ? 64 : nthreads;
    return c->nthreads;
}

