/* flagcx shared-memory host transport: the segment's life cycle, errors and peer liveness.
 *
 * Segment layout (one POSIX shm object per communicator, created by rank 0):
 *   page 0      header (magic, sizes, attach count)
 *   records     one 128-byte record per rank: its collective step counter, the op
 *               descriptor of its last two steps, pid + pid namespace (liveness), its
 *               state (attached / closed / aborted), a sleeper count and a futex word
 *   slots       per rank slot_bytes of staging, two halves used alternately by steps
 *   channels    per ordered pair (src, dst) a control block (head, tail) and a ring
 *
 * Any error breaks the communicator: mark_broken publishes the step it broke at in this
 * rank's record, so that a peer arriving later at that collective fails it too.
 */
#include "shm_internal.h"

/* ---------------------------------------------------------------- errors and liveness */

FXS_HIDDEN void set_err(fxs_comm *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
}

FXS_HIDDEN void put_err(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Mark the communicator unusable (first reason wins); safe from both threads. The step it
 * broke at is published in this rank's record, so that a peer arriving later at that
 * collective fails it too instead of completing it from the data this rank had posted. */
FXS_HIDDEN void mark_broken(fxs_comm *c, int code, const char *msg, const int *ranks, int nranks, uint64_t step) {
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
FXS_HIDDEN int broken_error(fxs_comm *c) {
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
FXS_HIDDEN int fail_at(fxs_comm *c, int code, uint64_t step) {
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
FXS_HIDDEN int peer_problem(fxs_comm *c, int p, char *msg, size_t len) {
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

/* ---------------------------------------------------------------- segment life cycle */

static size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

/* What fxs_cma_probe reads out of each peer's process: it proves that this rank may read the peer's memory. */
static const uint64_t CMA_PROBE = 0x616d632d78636766ULL; /* "fgcx-cma" */

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
    atomic_init(&c->refs, 1);
    pthread_mutex_init(&c->lock, NULL);
    pthread_mutex_init(&c->plock, NULL);
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
    c->cma_sent = calloc(un, sizeof *c->cma_sent);
    if (!c->known || !c->srcs || !c->disp_s || !c->disp_r || !c->pid_ok || !c->sq_head || !c->sq_tail ||
        !c->cur || !c->shead || !c->rtail || !c->cma_sent) {
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
    mine->probe = (uint64_t)(uintptr_t)&CMA_PROBE;
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
    release_helpers(c);
    if (c->me >= 0 && c->rec) {
        /* A published mismatch stays: it tells peers more than "closed" would. */
        if (atomic_load(&c->rec[c->me].state) != ST_MISMATCH)
            atomic_store(&c->rec[c->me].state, abort ? ST_ABORTED : ST_CLOSED);
        for (int p = 0; p < c->n; p++) {
            if (p == c->me) continue;
            atomic_fetch_add(&c->rec[p].wake, 1);
            futex_wake(&c->rec[p].wake, 0);
            atomic_fetch_add(&c->rec[p].p2p_wake, 1);
            futex_wake(&c->rec[p].p2p_wake, 0);
        }
    }
    atomic_store(&c->stop, 1);
    if (c->thread_on) {
        /* callers waiting in fxs_op_wait see stop and leave; the thread fails what is left */
        atomic_fetch_add(&c->thread_wake, 1);
        futex_wake(&c->thread_wake, 1);
        atomic_fetch_add(&c->rec[c->me].p2p_wake, 1);
        futex_wake(&c->rec[c->me].p2p_wake, 0);
        pthread_join(c->thread, NULL);
    }
    while (atomic_load(&c->users)) sched_yield(); /* no caller touches the segment after this */
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
    free(c->cma_sent);
    c->base = NULL;
    c->rec = NULL;
    comm_unref(c);
}

FXS_HIDDEN void comm_unref(fxs_comm *c) {
    if (atomic_fetch_sub(&c->refs, 1) != 1) return;
    pthread_mutex_destroy(&c->lock);
    pthread_mutex_destroy(&c->plock);
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

/* ---------------------------------------------------------------- single copy (cross-memory attach) */

int fxs_cma_probe(fxs_comm *c) {
    for (int p = 0; p < c->n; p++) {
        if (p == c->me) continue;
        rank_rec *r = &c->rec[p];
        uint64_t seen = 0;
        if (r->pid <= 0 || !c->my_pidns || r->pidns != c->my_pidns || !r->probe) return 0;
        if (cma_read(c, p, &seen, r->probe, sizeof seen, 0) || seen != CMA_PROBE) return 0;
    }
    return 1;
}

uint64_t fxs_set_cma(fxs_comm *c, uint64_t min_bytes) {
    c->cma_min = (size_t)min_bytes;
    return c->cma_min;
}
