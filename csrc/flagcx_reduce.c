/* Element-wise reduction kernels of the shm transport.
 *
 * Each kernel combines nsrc inputs into dst one tile at a time: the tile is loaded
 * into an accumulator array (float32 for float16/bfloat16), every other input is
 * combined into it, and the tile is stored back, so each input is read once and dst
 * written once whatever nsrc is. The loops are plain C written for the
 * auto-vectoriser; on x86-64 every kernel is compiled for AVX-512, AVX2(+F16C) and
 * baseline x86-64 and picked at load time (target_clones), so one build runs on any
 * x86-64 CPU. Integer sums and products wrap (two's complement), as in NCCL; float
 * max/min propagate NaN, as torch does.
 */
#include "flagcx_reduce.h"

#include <stdint.h>
#include <string.h>

#include "flagcx_shm.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define FXS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 6
#define FXS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FXS_CLONES
#endif

#define TILE 512

/* ---- element conversions ------------------------------------------------------ */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16; /* round to nearest even */
    return f != f ? (uint16_t)0x7fc0u : (uint16_t)rounded;
}

#if defined(__FLT16_MANT_DIG__)
typedef _Float16 fxs_half;
static inline float f16_to_f32(fxs_half h) { return (float)h; }
static inline fxs_half f32_to_f16(float f) { return (fxs_half)f; }
#else
/* No _Float16 in this compiler: IEEE binary16 by bit manipulation. */
typedef uint16_t fxs_half;
static inline float f16_to_f32(fxs_half h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        u = sign;
    } else {
        float f = (float)man * (1.0f / 16777216.0f); /* man * 2^-24 */
        memcpy(&u, &f, sizeof u);
        u |= sign;
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline fxs_half f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (fxs_half)(sign | 0x7e00u);           /* NaN */
    if (a >= 0x477ff000u) return (fxs_half)(sign | 0x7c00u);          /* overflow -> inf */
    if (a < 0x38800000u) {                                             /* subnormal or zero */
        float t;
        memcpy(&t, &a, sizeof t);
        t += 0.5f; /* 2^-1: aligns the binary16 subnormal ulp (2^-24) to float's ulp, rounds to even */
        uint32_t v;
        memcpy(&v, &t, sizeof v);
        return (fxs_half)(sign | (v - 0x3f000000u));
    }
    uint32_t r = a + 0xc8000fffu + ((a >> 13) & 1u); /* rebias exponent, round to nearest even */
    return (fxs_half)(sign | (r >> 13));
}
#endif

/* ---- combine operations -------------------------------------------------------- */

#define C_SUM(a, v) ((a) + (v))
#define C_PROD(a, v) ((a) * (v))
#define C_MAXF(a, v) (((a) > (v) || (a) != (a)) ? (a) : (v))
#define C_MINF(a, v) (((a) < (v) || (a) != (a)) ? (a) : (v))
#define C_MAXI(a, v) ((a) > (v) ? (a) : (v))
#define C_MINI(a, v) ((a) < (v) ? (a) : (v))
#define IDENT(x) (x)

/* One kernel: T element type, A accumulator type, LD/ST convert T<->A, CB combines. */
#define KERNEL(NAME, T, A, LD, ST, CB, AVG)                                                   \
    FXS_CLONES static void NAME(void *dst_, const void *const *srcs, int nsrc, size_t count, \
                                int avg_n) {                                                 \
        T *dst = (T *)dst_;                                                                  \
        A acc[TILE];                                                                         \
        (void)avg_n;                                                                         \
        for (size_t base = 0; base < count; base += TILE) {                                  \
            size_t m = count - base < TILE ? count - base : TILE;                            \
            const T *s0 = (const T *)srcs[0] + base;                                         \
            for (size_t i = 0; i < m; i++) acc[i] = (A)LD(s0[i]);                            \
            for (int p = 1; p < nsrc; p++) {                                                 \
                const T *sp = (const T *)srcs[p] + base;                                     \
                for (size_t i = 0; i < m; i++) {                                             \
                    A v = (A)LD(sp[i]);                                                      \
                    A a = acc[i];                                                            \
                    acc[i] = CB(a, v);                                                       \
                }                                                                            \
            }                                                                                \
            if (AVG) {                                                                       \
                A div = (A)avg_n;                                                            \
                for (size_t i = 0; i < m; i++) acc[i] = acc[i] / div;                        \
            }                                                                                \
            for (size_t i = 0; i < m; i++) dst[base + i] = ST(acc[i]);                       \
        }                                                                                    \
    }

/* Floating types: sum, prod, max, min, avg. */
#define FLOAT_KERNELS(P, T, A, LD, ST)                 \
    KERNEL(P##_sum, T, A, LD, ST, C_SUM, 0)            \
    KERNEL(P##_prod, T, A, LD, ST, C_PROD, 0)          \
    KERNEL(P##_max, T, A, LD, ST, C_MAXF, 0)           \
    KERNEL(P##_min, T, A, LD, ST, C_MINF, 0)           \
    KERNEL(P##_avg, T, A, LD, ST, C_SUM, 1)

/* Integer types: wrapping sum/prod in the unsigned type U, max/min in T. */
#define INT_KERNELS(P, T, U)                           \
    KERNEL(P##_sum, T, U, IDENT, (T), C_SUM, 0)        \
    KERNEL(P##_prod, T, U, IDENT, (T), C_PROD, 0)      \
    KERNEL(P##_max, T, T, IDENT, IDENT, C_MAXI, 0)     \
    KERNEL(P##_min, T, T, IDENT, IDENT, C_MINI, 0)

FLOAT_KERNELS(k_f32, float, float, IDENT, IDENT)
FLOAT_KERNELS(k_f64, double, double, IDENT, IDENT)
FLOAT_KERNELS(k_f16, fxs_half, float, f16_to_f32, f32_to_f16)
FLOAT_KERNELS(k_bf16, uint16_t, float, bf16_to_f32, f32_to_bf16)
INT_KERNELS(k_i8, int8_t, uint8_t)
INT_KERNELS(k_u8, uint8_t, uint8_t)
INT_KERNELS(k_i32, int32_t, uint32_t)
INT_KERNELS(k_i64, int64_t, uint64_t)

#define FROW(P) {P##_sum, P##_prod, P##_max, P##_min, P##_avg}
#define IROW(P) {P##_sum, P##_prod, P##_max, P##_min, NULL}

static const fxs_reduce_fn KERNELS[FXS_NUM_DTYPES][FXS_NUM_OPS] = {
    [FXS_DT_F32] = FROW(k_f32), [FXS_DT_F64] = FROW(k_f64), [FXS_DT_F16] = FROW(k_f16),
    [FXS_DT_BF16] = FROW(k_bf16), [FXS_DT_I8] = IROW(k_i8), [FXS_DT_U8] = IROW(k_u8),
    [FXS_DT_I32] = IROW(k_i32), [FXS_DT_I64] = IROW(k_i64),
};

static const size_t SIZES[FXS_NUM_DTYPES] = {
    [FXS_DT_F32] = 4, [FXS_DT_F64] = 8, [FXS_DT_F16] = 2, [FXS_DT_BF16] = 2,
    [FXS_DT_I8] = 1,  [FXS_DT_U8] = 1,  [FXS_DT_I32] = 4, [FXS_DT_I64] = 8,
};

fxs_reduce_fn fxs_reduce_kernel(int dtype, int op) {
    if (dtype < 0 || dtype >= FXS_NUM_DTYPES || op < 0 || op >= FXS_NUM_OPS) return NULL;
    return KERNELS[dtype][op];
}

size_t fxs_dtype_size(int dtype) {
    if (dtype < 0 || dtype >= FXS_NUM_DTYPES) return 0;
    return SIZES[dtype];
}
