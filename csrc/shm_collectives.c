/* flagcx shared-memory host transport: the collective protocol and the collectives.
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
 */
#include "shm_internal.h"

/* As torch.distributed and flagcx.Communicator name them (messages quote the user's call). */
static const char *const OPC_NAMES[] = {"?", "all_reduce", "reduce", "reduce_scatter", "all_gather",
                                        "broadcast", "gather", "scatter", "all_to_all", "all_to_all",
                                        "barrier"};
static const char *const DT_NAMES[] = {"float32", "float64", "float16", "bfloat16",
                                       "int8", "uint8", "int32", "int64"};
static const char *const RED_NAMES[] = {"sum", "prod", "max", "min", "avg"};

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
        snprintf(out, len, "%s(%s[%llu], %s)", name, DT_NAMES[dt % FXS_NUM_DTYPES], size,
                 RED_NAMES[red % FXS_NUM_OPS]);
        break;
    case OPC_REDUCE:
        snprintf(out, len, "%s(%s[%llu], %s, root=%d)", name, DT_NAMES[dt % FXS_NUM_DTYPES], size,
                 RED_NAMES[red % FXS_NUM_OPS], root);
        break;
    case OPC_BROADCAST:
    case OPC_GATHER:
    case OPC_SCATTER:
        snprintf(out, len, "%s(%llu bytes, root=%d)", name, size, root);
        break;
    case OPC_BARRIER:
        snprintf(out, len, "%s()", name);
        break;
    case OPC_ALLTOALLV:
        snprintf(out, len, "%s(split sizes)", name);
        break;
    case OPC_ALLTOALL:
        snprintf(out, len, "%s(%llu bytes%s)", name, size, root ? ", in place" : "");
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
            int a2a = (int)(theirs >> 56) == OPC_ALLTOALL && (int)(mine >> 56) == OPC_ALLTOALL &&
                      ((theirs >> 32) & 0xffff) != ((mine >> 32) & 0xffff); /* in place on one side only */
            set_err(c, "rank %d called %s while this rank called %s; every rank must call the same "
                    "collectives, with matching dtypes, sizes, roots and reduce ops, in the same order%s",
                    p, a, b, a2a ? " (an all_to_all runs in place on every rank or on none)" : "");
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

/* Whether a move of `bytes` per block goes single copy (the same verdict on every rank: cma_min is agreed). */
static inline int single_copy(fxs_comm *c, uint64_t bytes) { return c->n > 1 && c->cma_min && bytes >= c->cma_min; }

/* allgather's blocks go single copy from this size at least (every rank decides alike, in
 * place or not). 2-core VM, 2 ranks, 2026-12-08, against the segment: 64-128 KiB blocks
 * 0.63-0.70x out of place (in place about even); 256-512 KiB blocks 1.00-1.03x out of
 * place, 1.41-2.27x in place. */
#define ALLGATHER_SINGLE_COPY_FLOOR (256ULL << 10)

/* Single-copy step: publish `mine` (the address peers read from), wait until every rank has; the
 * caller then reads the peers' blocks with read_peer and ends with exchange(c, -1, 0), after which
 * no peer reads this rank's memory any more. */
static int publish(fxs_comm *c, const void *mine) {
    atomic_store_explicit(&c->rec[c->me].addr[(c->seq + 1) & 1], (uint64_t)(uintptr_t)mine, memory_order_relaxed);
    return exchange(c, -1, 1);
}

static int read_peer(fxs_comm *c, int p, void *dst, uint64_t offset, size_t bytes) {
    uint64_t base = atomic_load_explicit(&c->rec[p].addr[c->seq & 1], memory_order_relaxed);
    int e = cma_read(c, p, dst, base + offset, bytes, 1);
    if (!e) return FXS_OK;
    set_err(c, "reading %zu bytes of rank %d (pid %d) out of its memory failed: %s", bytes, p, (int)c->rec[p].pid, strerror(e));
    c->err_ranks[0] = p;
    c->err_nranks = 1;
    return fail_at(c, e == ESRCH ? FXS_EDEAD : FXS_ESYS, c->seq);
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
    if (single_copy(c, nbytes) && nbytes >= ALLGATHER_SINGLE_COPY_FLOOR) {
        if ((rc = publish(c, mine))) return rc;
        for (int p = 0; p < n; p++)
            if (p != me && (rc = read_peer(c, p, recv + (size_t)p * nbytes, 0, nbytes))) return rc;
        return exchange(c, -1, 0);
    }
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

#define BLOCK(blocks, p) ((char *)(uintptr_t)(blocks)[p])

/* gather into the root's block addresses (blocks[p]: rank p's nbytes; unread off the root). */
static int gather_blocks(fxs_comm *c, const char *send, const uint64_t *blocks, uint64_t nbytes, int root) {
    int rc = op_begin(c, mkdesc(OPC_GATHER, 0, 0, root, nbytes));
    if (rc) return rc;
    int n = c->n, me = c->me;
    if (me == root) memmove(BLOCK(blocks, me), send, nbytes);
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
            if (p != me) memcpy(BLOCK(blocks, p) + off, slot(c, p, c->seq), k);
    }
    return FXS_OK;
}

/* scatter from the root's block addresses (blocks[p]: rank p's nbytes; unread off the root). */
static int scatter_blocks(fxs_comm *c, const uint64_t *blocks, char *recv, uint64_t nbytes, int root) {
    int rc = op_begin(c, mkdesc(OPC_SCATTER, 0, 0, root, nbytes));
    if (rc) return rc;
    int n = c->n, me = c->me;
    if (me == root) memmove(recv, BLOCK(blocks, me), nbytes);
    if (n == 1) return FXS_OK;
    size_t w = (c->half / (size_t)n) & ~(size_t)63;
    for (uint64_t off = 0; off < nbytes; off += w) {
        size_t k = min_sz(w, nbytes - off);
        if (me == root) {
            if (off && (rc = wait_seq(c, c->seq, -1))) return rc;
            char *dst = slot(c, me, c->seq + 1);
            for (int p = 0; p < n; p++)
                if (p != me) memcpy(dst + (size_t)p * w, BLOCK(blocks, p) + off, k);
            post(c);
        } else {
            if ((rc = exchange(c, root, off == 0))) return rc;
            memcpy(recv + off, slot(c, root, c->seq) + (size_t)me * w, k);
        }
    }
    return FXS_OK;
}

/* The root's blocks of one whole buffer, in the comm's scratch array (gather and scatter use no other). */
static const uint64_t *whole_blocks(fxs_comm *c, uintptr_t whole, uint64_t nbytes, int root) {
    if (c->me == root)
        for (int p = 0; p < c->n; p++) c->disp_s[p] = (uint64_t)whole + (uint64_t)p * nbytes;
    return c->disp_s;
}

int fxs_gather(fxs_comm *c, uintptr_t send, uintptr_t recv, uint64_t nbytes, int root) {
    return gather_blocks(c, (const char *)send, whole_blocks(c, recv, nbytes, root), nbytes, root);
}

int fxs_scatter(fxs_comm *c, uintptr_t send, uintptr_t recv, uint64_t nbytes, int root) {
    return scatter_blocks(c, whole_blocks(c, send, nbytes, root), (char *)recv, nbytes, root);
}

int fxs_gather_list(fxs_comm *c, uintptr_t send, const uint64_t *recvs, uint64_t nbytes, int root) {
    return gather_blocks(c, (const char *)send, recvs, nbytes, root);
}

int fxs_scatter_list(fxs_comm *c, const uint64_t *sends, uintptr_t recv, uint64_t nbytes, int root) {
    return scatter_blocks(c, sends, (char *)recv, nbytes, root);
}

/* Exchange rounds of alltoall(v): in round r, rank p stages bytes [r*w, r*w + w) of its
 * block for every rank q at offset q*w of its half; then every rank collects its
 * window from each peer. Even alltoall may run in place (recv == send): a round writes
 * only the windows it staged, and later rounds read windows further on. */
static int alltoall_rounds(fxs_comm *c, const char *send, const uint64_t *scount, const uint64_t *sdisp,
                           char *recv, const uint64_t *rcount, const uint64_t *rdisp, uint64_t maxc,
                           int first) {
    int n = c->n, me = c->me, rc;
    size_t w = (c->half / (size_t)n) & ~(size_t)63;
    if (rcount[me]) memmove(recv + rdisp[me], send + sdisp[me], rcount[me]);
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
    /* In place is part of the call (root field): single copy serves out of place only (in place,
     * peers would read what this rank overwrites), and the ranks' paths must agree. */
    int in_place = send == recv;
    int rc = op_begin(c, mkdesc(OPC_ALLTOALL, 0, 0, in_place, nbytes));
    if (rc) return rc;
    if (!in_place && single_copy(c, nbytes)) {
        int n = c->n, me = c->me;
        memmove((char *)recv + (size_t)me * nbytes, (const char *)send + (size_t)me * nbytes, nbytes);
        if ((rc = publish(c, (const void *)send))) return rc;
        for (int p = 0; p < n; p++)
            if (p != me && (rc = read_peer(c, p, (char *)recv + (size_t)p * nbytes, (uint64_t)me * nbytes, nbytes))) return rc;
        return exchange(c, -1, 0);
    }
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
