/* flagcx shared-memory host transport: point to point.
 *
 * Each ordered pair has a ring; messages are an 8-byte length and the payload. A pass
 * over the rings advances every posted op and never blocks on a single op, so crossing
 * sends larger than the ring complete. Whoever holds plock runs the passes: the caller
 * itself, in fxs_post (an op that can complete now completes before it returns) and in
 * fxs_op_wait (the waiting thread moves the data, so a blocking send/recv involves no
 * other thread), else one progress thread per communicator, which advances what nobody
 * waits on (an isend while the caller computes, a send larger than the ring). The thread
 * sleeps while idle and stands by while a caller drives; peers wake a rank's p2p sleepers
 * only, never its collective waiters (and a collective step never wakes them).
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

/* Complete op (err 0) or fail it; drops the queues' reference (plock held). A caller may be
 * asleep on the op (fxs_op_wait after the communicator closed) or on the rank's p2p word. */
static void op_finish(fxs_op *op, int err, int peer, const char *msg) {
    fxs_comm *c = op->comm;
    if (err) {
        op->err = err;
        op->err_peer = peer;
        snprintf(op->msg, sizeof op->msg, "%s", msg);
    }
    atomic_store_explicit(&op->state, err ? OP_FAILED : OP_DONE, memory_order_release);
    if (atomic_load(&op->waiters)) futex_wake(&op->state, 1);
    if (c->rec && c->me >= 0) wake_p2p(c, c->me);
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

/* Fail every posted op (after the communicator broke or closed; plock held). */
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

/* Header bit of a single-copy message: the header holds the length and the sender's address,
 * the receiver reads the payload out of the sender's memory and counts it in the channel's acks. */
#define CMA_BIT (1ULL << 63)

/* Advance the first send to `to`; 1 when bytes moved. */
static int send_progress(fxs_comm *c, fxs_op *op) {
    int to = op->peer;
    size_t idx = chan_index(c, c->me, to), cap = c->chan_bytes;
    chan_ctrl *ch = &c->ctrl[idx];
    char *ring = c->data + idx * cap;
    uint64_t head = c->shead[to], tail = atomic_load_explicit(&ch->tail, memory_order_acquire);
    int moved = 0;
    if (!op->header_done) {
        int single = c->cma_min && op->len >= c->cma_min;
        uint64_t header[2] = {op->len | (single ? CMA_BIT : 0), (uint64_t)(uintptr_t)op->buf};
        size_t hb = single ? 16 : 8;
        if (cap - (head - tail) < hb) return 0;
        ring_write(ring, cap, head, (const char *)header, hb);
        head += hb;
        op->header_done = 1;
        if (single) op->ticket = ++c->cma_sent[to];
        moved = 1;
    }
    if (op->ticket) { /* single copy: done once the receiver has read it */
        if (atomic_load_explicit(&ch->acks, memory_order_acquire) >= op->ticket) {
            atomic_store_explicit(&op->moved, op->len, memory_order_relaxed);
            return 1;
        }
        if (moved) {
            c->shead[to] = head;
            atomic_store_explicit(&ch->head, head, memory_order_release);
            wake_p2p(c, to);
        }
        return moved;
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
        wake_p2p(c, to);
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
        uint64_t len, addr = 0;
        ring_read((char *)&len, ring, cap, tail, 8);
        int single = (len & CMA_BIT) != 0;
        len &= ~CMA_BIT;
        if (single && head - tail < 16) return 0; /* written with the length: arrives with it */
        op = match_recv(c, src);
        if (!op) return 0;
        if (single) ring_read((char *)&addr, ring, cap, tail + 8, 8);
        tail += single ? 16 : 8;
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
        } else if (single) {
            int e = cma_read(c, src, op->buf, addr, len, 0);
            uint32_t st = atomic_load(&c->rec[src].state);
            if (!e && (st == ST_CLOSED || st == ST_ABORTED)) e = ECANCELED; /* it may have freed the buffer meanwhile */
            if (e) {
                char msg[256];
                snprintf(msg, sizeof msg, "reading the %llu-byte message of rank %d (pid %d) out of its memory failed: %s",
                         (unsigned long long)len, src, (int)c->rec[src].pid,
                         e == ECANCELED ? "it closed its communicator meanwhile" : strerror(e));
                int r = src, code = e == ESRCH ? FXS_EDEAD : e == ECANCELED ? FXS_EPEER : FXS_ESYS;
                mark_broken(c, code, msg, &r, 1, FAILED_UNKNOWN);
                op_finish(op, code, src, msg);
                op = NULL;
            } else {
                atomic_store_explicit(&op->moved, len, memory_order_relaxed);
                atomic_fetch_add_explicit(&ch->acks, 1, memory_order_release);
            }
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
        wake_p2p(c, src);
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

/* Whether posted ops need progress while nobody waits (plock held): a send still writing, a
 * message half read, or a recv larger than the ring (its sender stalls until it drains). A
 * recv whose message fits the ring does not: the message waits there for fxs_op_wait; nor
 * does an announced single-copy send with nothing queued behind it: the receiver reads it,
 * and a wait or a poll sees the ack. */
static int needs_thread(fxs_comm *c) {
    for (int p = 0; p < c->n; p++) {
        const fxs_op *s = c->sq_head[p];
        if ((s && !(s->ticket && !s->next)) || c->cur[p]) return 1;
    }
    for (fxs_op *op = c->rq_head; op; op = op->next)
        if (op->len + 8 > c->chan_bytes) return 1;
    pthread_mutex_lock(&c->lock);
    int posted = c->in_head != NULL;
    pthread_mutex_unlock(&c->lock);
    return posted;
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

/* Fail every op once the communicator broke (plock held). */
static void fail_broken(fxs_comm *c) {
    pthread_mutex_lock(&c->lock);
    char msg[512];
    snprintf(msg, sizeof msg, "%s", c->broken_msg);
    int code = atomic_load(&c->broken), peer = c->broken_nranks ? c->broken_ranks[0] : -1;
    pthread_mutex_unlock(&c->lock);
    fail_all(c, code, peer, msg);
}

/* One pass, or failing every op of a broken communicator (plock held); 1 when anything moved. */
static int advance(fxs_comm *c) {
    if (atomic_load(&c->broken)) {
        fail_broken(c);
        return 0;
    }
    return progress_pass(c);
}

/* Make the progress thread look at the ops: it sleeps on thread_wake (idle, standing by) or on
 * the rank's p2p word (ops pending); the word is bumped before its state is read (Dekker). */
static void kick_thread(fxs_comm *c) {
    rank_rec *mine = &c->rec[c->me];
    atomic_fetch_add(&c->thread_wake, 1);
    atomic_fetch_add(&mine->p2p_wake, 1);
    atomic_thread_fence(memory_order_seq_cst);
    int st = atomic_load(&c->thread_state);
    if (st == TS_IDLE) futex_wake(&c->thread_wake, 1);
    else if (st == TS_PENDING) futex_wake(&mine->p2p_wake, 0);
}

static void *progress_main(void *arg) {
    fxs_comm *c = (fxs_comm *)arg;
    rank_rec *mine = &c->rec[c->me];
    int64_t next_check = 0;
    while (!atomic_load(&c->stop)) {
        uint32_t w = atomic_load(&c->thread_wake);
        if (atomic_load(&c->drivers)) { /* a caller advances the ops; the last to leave kicks */
            atomic_store(&c->thread_state, TS_IDLE);
            atomic_thread_fence(memory_order_seq_cst);
            if (atomic_load(&c->drivers) && !atomic_load(&c->stop)) futex_wait(&c->thread_wake, w, IDLE_SLEEP_NS, 1);
            atomic_store(&c->thread_state, TS_RUNNING);
            continue;
        }
        pthread_mutex_lock(&c->plock);
        int moved = advance(c), pending = needs_thread(c);
        int64_t t = now_ns();
        if (pending && !moved) {
            if (!next_check) next_check = t + FIRST_CHECK_NS;
            if (t >= next_check) {
                check_p2p_peers(c);
                next_check = t + CHECK_NS;
            }
        } else if (!pending) {
            next_check = 0;
        }
        pthread_mutex_unlock(&c->plock);
        if (moved) continue;
        /* Nothing moves now: sleep until a peer touches a ring (ops need it) or a caller kicks. */
        _Atomic uint32_t *word = pending ? &mine->p2p_wake : &c->thread_wake;
        uint32_t v = pending ? atomic_load(&mine->p2p_wake) : w;
        atomic_store(&c->thread_state, pending ? TS_PENDING : TS_IDLE);
        if (pending) atomic_fetch_add(&mine->p2p_sleepers, 1);
        atomic_thread_fence(memory_order_seq_cst);
        int again = atomic_load(&c->stop) || atomic_load(&c->drivers);
        if (!again && pending) {
            pthread_mutex_lock(&c->plock);
            again = advance(c);
            pthread_mutex_unlock(&c->plock);
        }
        if (!again) {
            int64_t slice = pending ? SLEEP_NS : IDLE_SLEEP_NS;
            if (pending && next_check - t < slice) slice = next_check - t;
            futex_wait(word, v, slice, !pending);
        }
        if (pending) atomic_fetch_sub(&mine->p2p_sleepers, 1);
        atomic_store(&c->thread_state, TS_RUNNING);
    }
    pthread_mutex_lock(&c->plock);
    fail_all(c, FXS_EBROKEN, -1, "the communicator was closed before this op finished");
    pthread_mutex_unlock(&c->plock);
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

fxs_op *fxs_post(fxs_comm *c, int is_recv, int peer, uintptr_t buf, uint64_t nbytes, int waits, int *rc) {
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
    op->comm = c;
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
    atomic_fetch_add(&c->refs, 1);
    /* Advance now: a send that fits the ring, or a recv whose message is there, is done on return. */
    if (pthread_mutex_trylock(&c->plock) == 0) {
        advance(c);
        int pending = needs_thread(c);
        pthread_mutex_unlock(&c->plock);
        if (pending && !waits && !atomic_load(&c->drivers)) kick_thread(c);
    } else if (!waits) {
        kick_thread(c); /* whoever holds plock may have looked before this op was posted */
    }
    *rc = FXS_OK;
    return op;
}

int fxs_op_test(fxs_op *op) {
    uint32_t st = atomic_load_explicit(&op->state, memory_order_acquire);
    return st == OP_PENDING ? FXS_EPENDING : st == OP_DONE ? FXS_OK : op->err;
}

int fxs_op_poll(fxs_op *op) {
    int rc = fxs_op_test(op);
    if (rc != FXS_EPENDING) return rc;
    fxs_comm *c = op->comm;
    atomic_fetch_add(&c->users, 1);
    atomic_thread_fence(memory_order_seq_cst);
    if (!atomic_load(&c->stop) && pthread_mutex_trylock(&c->plock) == 0) {
        advance(c);
        pthread_mutex_unlock(&c->plock);
    }
    atomic_fetch_sub(&c->users, 1);
    return fxs_op_test(op);
}

/* Sleep on the op itself until it finishes or the deadline passes (the progress thread or the
 * communicator's close finishes it). */
static int wait_finished(fxs_op *op, int64_t deadline) {
    for (;;) {
        int rc = fxs_op_test(op);
        if (rc != FXS_EPENDING) return rc;
        int64_t t = now_ns();
        if (t >= deadline) return FXS_ETIMEOUT;
        atomic_fetch_add(&op->waiters, 1);
        atomic_thread_fence(memory_order_seq_cst);
        if (atomic_load(&op->state) == OP_PENDING)
            futex_wait(&op->state, OP_PENDING, deadline - t < IDLE_SLEEP_NS ? deadline - t : IDLE_SLEEP_NS, 1);
        atomic_fetch_sub(&op->waiters, 1);
    }
}

/* Wait for op, advancing every posted op meanwhile: passes while yielding, then sleeps on the
 * rank's p2p word (peers bump it when they touch a ring), checking the awaited peers' liveness. */
int fxs_op_wait(fxs_op *op, double timeout) {
    int rc = fxs_op_test(op);
    if (rc != FXS_EPENDING) return rc;
    if (!(timeout < 1e9)) timeout = 1e9; /* also NaN / inf: ~30 years */
    if (timeout < 0) timeout = 0;
    int64_t t0 = now_ns(), deadline = t0 + (int64_t)(timeout * 1e9);
    fxs_comm *c = op->comm;
    atomic_fetch_add(&c->users, 1);
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load(&c->stop)) { /* closing: the segment may go at any moment; close fails the op */
        atomic_fetch_sub(&c->users, 1);
        return wait_finished(op, deadline);
    }
    atomic_fetch_add(&c->drivers, 1);
    rank_rec *mine = &c->rec[c->me];
    int64_t yield_end = t0 + YIELD_NS, next_check = t0 + FIRST_CHECK_NS;
    for (;;) {
        int moved = 0;
        int64_t t = now_ns();
        if (pthread_mutex_trylock(&c->plock) == 0) {
            moved = advance(c);
            if (!moved && t >= next_check && fxs_op_test(op) == FXS_EPENDING) {
                if (check_p2p_peers(c)) advance(c);
                next_check = t + CHECK_NS;
            }
            pthread_mutex_unlock(&c->plock);
        }
        rc = fxs_op_test(op);
        if (rc != FXS_EPENDING || atomic_load(&c->stop)) break;
        if (t >= deadline) {
            rc = FXS_ETIMEOUT;
            break;
        }
        if (moved) continue;
        if (t < yield_end) {
            sched_yield();
            continue;
        }
        uint32_t w = atomic_load(&mine->p2p_wake);
        atomic_fetch_add(&mine->p2p_sleepers, 1);
        atomic_thread_fence(memory_order_seq_cst);
        if (fxs_op_test(op) == FXS_EPENDING && !atomic_load(&c->stop)) {
            int64_t slice = SLEEP_NS;
            if (deadline - t < slice) slice = deadline - t;
            if (next_check - t < slice) slice = next_check - t;
            futex_wait(&mine->p2p_wake, w, slice, 0);
        }
        atomic_fetch_sub(&mine->p2p_sleepers, 1);
    }
    /* The last caller to leave hands what is still pending to the progress thread (it leaves
     * first, then looks: a post that saw it still driving left its op to it). */
    if (atomic_fetch_sub(&c->drivers, 1) == 1 && !atomic_load(&c->stop)) {
        pthread_mutex_lock(&c->plock);
        int pending = needs_thread(c);
        pthread_mutex_unlock(&c->plock);
        if (pending) kick_thread(c);
    }
    atomic_fetch_sub(&c->users, 1);
    if (rc == FXS_EPENDING) return wait_finished(op, deadline);
    return rc;
}

int fxs_op_source(fxs_op *op) { return atomic_load(&op->source); }
uint64_t fxs_op_progress(fxs_op *op) { return atomic_load(&op->moved); }
const char *fxs_op_error(fxs_op *op) { return op->msg; }
int fxs_op_error_peer(fxs_op *op) { return op->err_peer; }
void fxs_op_release(fxs_op *op) {
    fxs_comm *c = op->comm;
    op_unref(op);
    comm_unref(c);
}
