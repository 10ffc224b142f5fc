/* flagcx shared-memory host transport: point to point.
 *
 * Each ordered pair has a ring; messages are an 8-byte length and the payload. Posted
 * ops are advanced by one progress thread per communicator, which never blocks on a
 * single op, so crossing sends larger than the ring complete.
 */
#include "shm_internal.h"

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
