/* Element-wise reduction kernels of the shm transport (internal to csrc/). */
#ifndef FLAGCX_REDUCE_H
#define FLAGCX_REDUCE_H

#include <stddef.h>

/* dst[i] = op(srcs[0][i], ..., srcs[nsrc-1][i]) for i < count, inputs combined in
 * index order (so every rank computes bit-identical results). dst may alias srcs[0].
 * Half types accumulate in float32. For AVG the sum is divided by avg_n. */
typedef void (*fxs_reduce_fn)(void *dst, const void *const *srcs, int nsrc, size_t count, int avg_n);

/* The kernel for (dtype, op) (FXS_DT_*, FXS_OP_*), or NULL when not defined (AVG on integers). */
fxs_reduce_fn fxs_reduce_kernel(int dtype, int op);

/* Size in bytes of one element of dtype, 0 for an unknown dtype. */
size_t fxs_dtype_size(int dtype);

#endif
