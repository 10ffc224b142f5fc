/* flagcx shared-memory host transport: the C API the Python adapter calls through cffi.
 *
 * One POSIX shm segment per communicator holds a record per rank (progress counter,
 * pid, futex words), a staging slot per rank for collectives and a ring buffer per
 * ordered pair of ranks for send/recv. Every collective runs to completion inside one
 * call (the cffi call releases the GIL); send/recv are posted, advanced by the calling
 * thread while it posts and waits, and otherwise by a progress thread. Functions return FXS_OK or an FXS_E* code; fxs_error() then says
 * what went wrong. Sizes are bytes unless called counts (elements).
 *
 * The block between the cdef markers is read verbatim by csrc/build_shm.py as the
 * cffi declarations, so it holds only declarations cffi can parse.
 */
#ifndef FLAGCX_SHM_H
#define FLAGCX_SHM_H

#include <stddef.h>
#include <stdint.h>

/* cdef-begin */
#define FXS_OK 0
#define FXS_ETIMEOUT 1  /* a peer did not arrive within the timeout (see fxs_error_ranks) */
#define FXS_EDEAD 2     /* a peer process died */
#define FXS_EPEER 3     /* a peer closed or aborted its end of the communicator */
#define FXS_EBROKEN 4   /* an earlier error made this communicator unusable */
#define FXS_EINVAL 5    /* ranks disagree about the call (sizes, op, root) */
#define FXS_ESYS 6      /* a system call failed (errno text in fxs_error) */
#define FXS_EPENDING 7  /* the p2p op has not finished yet */

#define FXS_DT_F32 0
#define FXS_DT_F64 1
#define FXS_DT_F16 2
#define FXS_DT_BF16 3
#define FXS_DT_I8 4
#define FXS_DT_U8 5
#define FXS_DT_I32 6
#define FXS_DT_I64 7
#define FXS_NUM_DTYPES 8

#define FXS_OP_SUM 0
#define FXS_OP_PROD 1
#define FXS_OP_MAX 2
#define FXS_OP_MIN 3
#define FXS_OP_AVG 4
#define FXS_NUM_OPS 5

typedef struct fxs_comm fxs_comm;
typedef struct fxs_op fxs_op;

/* Segment life cycle. Rank 0 creates (mode 0600, O_EXCL); the others attach by name.
 * slot_bytes: staging bytes per rank (two halves, double-buffered); p2p_bytes: ring
 * bytes per ordered pair. Whoever completes the attach count unlinks the name. */
int fxs_create(const char *name, int rank, int size, uint64_t slot_bytes, uint64_t p2p_bytes,
               double timeout, fxs_comm **out, char *err, size_t errlen);
int fxs_attach(const char *name, int rank, int size, double timeout, fxs_comm **out, char *err,
               size_t errlen);
int fxs_unlink(const char *name);
/* Unlink this user's segments named /<prefix>* whose creator (rank 0) died in this pid namespace
 * before every rank attached; returns how many were removed. */
int fxs_sweep(const char *prefix);
/* Mark this rank closed (aborted when abort != 0), stop the progress thread, fail
 * pending p2p ops, unmap and free. Never waits for peers. */
void fxs_close(fxs_comm *c, int abort);

/* Error details of the last failed call: text, peer ranks involved (late or dead). */
const char *fxs_error(fxs_comm *c);
int fxs_error_ranks(fxs_comm *c, int *ranks, int max);
int fxs_broken(fxs_comm *c);
uint32_t fxs_segment_mode(fxs_comm *c);
uint64_t fxs_segment_bytes(fxs_comm *c);
/* Effective sizes: staging bytes per rank (two halves), the one-step allreduce
 * threshold, ring bytes per ordered pair. */
uint64_t fxs_slot_bytes(fxs_comm *c);
uint64_t fxs_small_bytes(fxs_comm *c);
uint64_t fxs_ring_bytes(fxs_comm *c);
/* Threads (this one + helpers) that split large copies and reductions of collectives;
 * takes effect until the first large op starts the helpers. Returns the count in use. */
int fxs_set_threads(fxs_comm *c, int nthreads);

/* Single copy for large messages: peers read each other's buffers (process_vm_readv) instead of
 * staging them in the segment. fxs_cma_probe: 1 when this rank can read every peer's memory (call
 * once every rank attached); fxs_set_cma: use it from min_bytes per message or block up (0: never);
 * every rank must set the same value (agree on the probes first). Returns the value in use. */
int fxs_cma_probe(fxs_comm *c);
uint64_t fxs_set_cma(fxs_comm *c, uint64_t min_bytes);

/* Collectives (pointers passed as integers). In place when send == recv (allreduce, reduce,
 * alltoall; allgather: send == recv + rank * nbytes; reducescatter: recv == send + rank *
 * count * esize; gather and scatter: the root's block of the whole buffer). An alltoall is
 * in place on every rank or on none (a mix fails as mismatched calls). */
int fxs_allreduce(fxs_comm *c, uintptr_t send, uintptr_t recv, uint64_t count, int dtype, int op);
int fxs_reduce(fxs_comm *c, uintptr_t send, uintptr_t recv, uint64_t count, int dtype, int op,
               int root);
int fxs_reducescatter(fxs_comm *c, uintptr_t send, uintptr_t recv, uint64_t count, int dtype,
                      int op);
int fxs_allgather(fxs_comm *c, uintptr_t send, uintptr_t recv, uint64_t nbytes);
int fxs_broadcast(fxs_comm *c, uintptr_t buf, uint64_t nbytes, int root);
int fxs_gather(fxs_comm *c, uintptr_t send, uintptr_t recv, uint64_t nbytes, int root);
int fxs_scatter(fxs_comm *c, uintptr_t send, uintptr_t recv, uint64_t nbytes, int root);
/* gather / scatter with the root's blocks at their own addresses (recvs[p] / sends[p]: rank p's
 * nbytes; read on the root only, NULL elsewhere): a torch tensor list without a staging copy. */
int fxs_gather_list(fxs_comm *c, uintptr_t send, const uint64_t *recvs, uint64_t nbytes, int root);
int fxs_scatter_list(fxs_comm *c, const uint64_t *sends, uintptr_t recv, uint64_t nbytes, int root);
int fxs_alltoall(fxs_comm *c, uintptr_t send, uintptr_t recv, uint64_t nbytes);
int fxs_alltoallv(fxs_comm *c, uintptr_t send, const uint64_t *send_counts, uintptr_t recv,
                  const uint64_t *recv_counts);
int fxs_barrier(fxs_comm *c);

/* Point to point. fxs_post returns a new op (NULL with the code in *rc); peer -1 =
 * any source. It advances the posted ops before returning (an op that can complete now is
 * done); waits != 0 says the caller calls fxs_op_wait on it next, so what is left stays with
 * the caller instead of waking the progress thread. fxs_op_wait advances every posted op
 * while it waits. The op belongs to the caller until fxs_op_release, even after close. */
fxs_op *fxs_post(fxs_comm *c, int is_recv, int peer, uintptr_t buf, uint64_t nbytes, int waits, int *rc);
int fxs_op_test(fxs_op *op);                  /* FXS_OK, FXS_EPENDING or the op's error */
int fxs_op_poll(fxs_op *op);                  /* fxs_op_test after one pass over the rings (never blocks) */
int fxs_op_wait(fxs_op *op, double timeout);  /* FXS_ETIMEOUT when still pending */
int fxs_op_source(fxs_op *op);
uint64_t fxs_op_progress(fxs_op *op);         /* bytes moved so far */
const char *fxs_op_error(fxs_op *op);
int fxs_op_error_peer(fxs_op *op);
void fxs_op_release(fxs_op *op);

/* Reduce kernels on local buffers (dst = op over srcs), exposed for tests. */
int fxs_reduce_local(uintptr_t dst, const uintptr_t *srcs, int nsrc, uint64_t count, int dtype,
                     int op, int avg_n);
/* cdef-end */

#endif
