/* Small-M matmuls over weights stored in blocks of 32 along K:
 *
 *   y[m, n] = sum_k x[m, k] * w[n, k]
 *
 *   q4: w = d * q + m per block, q in 0..15 packed two per byte (byte j of a block holds element j
 *       in its low nibble and element j + 16 in its high nibble: GGUF's Q4_1 layout), d and m in
 *       float16, stored [N][K/32][2].
 *   q8: w = d * q per block, q int8, d float16 [N][K/32] (GGUF's Q8_0).
 *
 * The activations are rounded to int8 per block of 32 as well (scale = absmax / 127), so a block's
 * dot product is integer arithmetic, eight multiply-adds per instruction, with one float multiply
 * by the two scales: llama.cpp's recipe for these formats (its Q8_1 for x), and the reason it is
 * several times cheaper than converting every weight to float. These are decode kernels: they stream the weights once per call and reuse each block for
 * up to TILE rows of x, so their cost is the weight bytes while M is small.
 *
 * Threads split N; each thread writes its own columns of y, so nothing is reduced across threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define TILE 4

static inline float half_to_float(uint16_t h) {
#ifdef NL_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

/* x [M, K] -> int8 codes xq [M, K], scales xd [M, K/32] and xs [M, K/32], the sum of the block's
 * rounded values (xd * sum of codes): q4's m term then sees the same x as its d term, so a block's
 * result is exactly (dequantized w) . (dequantized x), and the rounding error sum(w_i e_i) stays
 * centred instead of carrying m's offset. */
static void quantize_rows(const float *x, int64_t M, int64_t K, int8_t *xq, float *xd, float *xs) {
    for (int64_t i = 0; i < M * (K / BLOCK); i++) {
        const float *xb = x + i * BLOCK;
        float amax = 0;
        for (int j = 0; j < BLOCK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float d = amax / 127, inv = d > 0 ? 1 / d : 0;
        int32_t sum = 0;
        for (int j = 0; j < BLOCK; j++) {
            const int8_t q = (int8_t)nearbyintf(xb[j] * inv);
            xq[i * BLOCK + j] = q;
            sum += q;
        }
        xd[i] = d;
        xs[i] = d * (float)sum;
    }
}

#ifdef NL_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Sum of u[i] * s[i] over 32 bytes (u unsigned, s signed) as 8 float lanes. */
static inline __m256 dot_us8(__m256i u, __m256i s) {
    const __m256i pairs = _mm256_maddubs_epi16(u, s); /* |15 * 127 * 2|, |127 * 127 * 2| fit int16 */
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#endif

/* One weight row against rows [r0, r0 + rows) of the quantized x; rows is a constant at every call
 * site (see the switch below), so the loops unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void
q4_row(const int8_t *xq, const float *xd, const float *xs, int64_t K, const uint8_t *codes,
       const uint16_t *dm, int64_t r0, const int rows, float *out) {
    const int64_t nb = K / BLOCK;
    float macc[TILE] = {0};
#ifdef NL_AVX2
    __m256 acc[TILE];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    const __m128i low = _mm_set1_epi8(0x0f);
    for (int64_t b = 0; b < nb; b++) {
        const __m128i v = _mm_loadu_si128((const __m128i *)(codes + b * 16));
        const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low), _mm_and_si128(v, low));
        const float d = half_to_float(dm[2 * b]), m = half_to_float(dm[2 * b + 1]);
        for (int r = 0; r < rows; r++) {
            const int64_t i = (r0 + r) * nb + b;
            const __m256i xb = _mm256_loadu_si256((const __m256i *)(xq + i * BLOCK));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xd[i]), dot_us8(w, xb), acc[r]);
            macc[r] += m * xs[i];
        }
    }
    for (int r = 0; r < rows; r++) out[r] = hsum(acc[r]) + macc[r];
#else
    float acc[TILE] = {0};
    for (int64_t b = 0; b < nb; b++) {
        const float d = half_to_float(dm[2 * b]), m = half_to_float(dm[2 * b + 1]);
        for (int r = 0; r < rows; r++) {
            const int64_t i = (r0 + r) * nb + b;
            int32_t s = 0;
            for (int j = 0; j < 16; j++) {
                s += (codes[b * 16 + j] & 0x0f) * xq[i * BLOCK + j];
                s += (codes[b * 16 + j] >> 4) * xq[i * BLOCK + j + 16];
            }
            acc[r] += d * xd[i] * (float)s;
            macc[r] += m * xs[i];
        }
    }
    for (int r = 0; r < rows; r++) out[r] = acc[r] + macc[r];
#endif
}

static inline __attribute__((always_inline)) void
q8_row(const int8_t *xq, const float *xd, int64_t K, const int8_t *codes, const uint16_t *ds,
       int64_t r0, const int rows, float *out) {
    const int64_t nb = K / BLOCK;
#ifdef NL_AVX2
    __m256 acc[TILE];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(codes + b * BLOCK));
        const __m256i aw = _mm256_sign_epi8(w, w); /* |w|; x takes w's sign: maddubs wants u8 */
        const float d = half_to_float(ds[b]);
        for (int r = 0; r < rows; r++) {
            const int64_t i = (r0 + r) * nb + b;
            const __m256i xb = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xq + i * BLOCK)), w);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xd[i]), dot_us8(aw, xb), acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) out[r] = hsum(acc[r]);
#else
    float acc[TILE] = {0};
    for (int64_t b = 0; b < nb; b++) {
        const float d = half_to_float(ds[b]);
        for (int r = 0; r < rows; r++) {
            const int64_t i = (r0 + r) * nb + b;
            int32_t s = 0;
            for (int j = 0; j < BLOCK; j++) s += codes[b * BLOCK + j] * xq[i * BLOCK + j];
            acc[r] += d * xd[i] * (float)s;
        }
    }
    for (int r = 0; r < rows; r++) out[r] = acc[r];
#endif
}

/* q8 weights against float activations (weight-only int8: x is not rounded). Each block is
 * converted to float once and reused for every row of the tile; two accumulators per row keep
 * the FMA latency off the critical path. */
static inline __attribute__((always_inline)) void
q8f_row(const float *x, int64_t K, const int8_t *codes, const uint16_t *ds, int64_t r0,
        const int rows, float *out) {
    const int64_t nb = K / BLOCK;
#ifdef NL_AVX2
    __m256 acc[TILE][2];
    for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *q = codes + b * BLOCK;
        const __m256 d = _mm256_set1_ps(half_to_float(ds[b]));
        __m256 w[4];
        for (int j = 0; j < 4; j++)
            w[j] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * j)))));
        for (int r = 0; r < rows; r++) {
            const float *xb = x + (r0 + r) * K + b * BLOCK;
            acc[r][0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xb), acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), acc[r][1]);
            acc[r][0] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), acc[r][1]);
        }
    }
    for (int r = 0; r < rows; r++) out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
#else
    float acc[TILE] = {0};
    for (int64_t b = 0; b < nb; b++) {
        const float d = half_to_float(ds[b]);
        for (int r = 0; r < rows; r++) {
            const float *xb = x + (r0 + r) * K + b * BLOCK;
            float s = 0;
            for (int j = 0; j < BLOCK; j++) s += (float)codes[b * BLOCK + j] * xb[j];
            acc[r] += d * s;
        }
    }
    for (int r = 0; r < rows; r++) out[r] = acc[r];
#endif
}

/* Runs BODY(rows) with rows a compile-time constant 1..TILE. */
#define WITH_ROWS(n, BODY)          \
    switch (n) {                    \
    case 1: BODY(1); break;         \
    case 2: BODY(2); break;         \
    case 3: BODY(3); break;         \
    default: BODY(4);               \
    }

/* Columns of y for every weight row this thread gets: an orphaned `omp for`, so it shares out
 * the rows inside an enclosing parallel region (the fused decode step) or runs them all alone. x
 * was rounded by quantize_rows unless the matrix keeps float activations. */
void nl_gemm_omp_for(const nl_matrix *w, const float *x, const int8_t *xq, const float *xd,
                     const float *xs, int64_t M, float *y) {
    const int64_t K = w->K, N = w->N, nb = K / BLOCK;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float out[TILE];
        for (int64_t r0 = 0; r0 < M; r0 += TILE) {
            const int rows = (int)(M - r0 < TILE ? M - r0 : TILE);
            if (w->kind == NL_Q4) {
                const uint8_t *c = (const uint8_t *)w->codes + n * (K / 2);
#define Q4(R) q4_row(xq, xd, xs, K, c, w->scales + n * nb * 2, r0, R, out)
                WITH_ROWS(rows, Q4)
            } else if (w->kind == NL_Q8) {
                const int8_t *c = (const int8_t *)w->codes + n * K;
#define Q8(R) q8_row(xq, xd, K, c, w->scales + n * nb, r0, R, out)
                WITH_ROWS(rows, Q8)
            } else {
                const int8_t *c = (const int8_t *)w->codes + n * K;
#define Q8F(R) q8f_row(x, K, c, w->scales + n * nb, r0, R, out)
                WITH_ROWS(rows, Q8F)
            }
            for (int r = 0; r < rows; r++)
                y[(r0 + r) * N + n] = w->bias ? out[r] + w->bias[n] : out[r];
        }
    }
}

/* Rounds x for w (one thread; callers inside a parallel region wrap it in `omp single`). */
void nl_gemm_prepare(const nl_matrix *w, const float *x, int64_t M, int8_t *xq, float *xd, float *xs) {
    if (w->kind != NL_Q8F) quantize_rows(x, M, w->K, xq, xd, xs);
}

/* y [M, N] = x [M, K] @ w.T (+ bias), on its own threads. */
void nl_gemm(const nl_matrix *w, const float *x, int64_t M, float *y, int nthreads) {
    const int64_t nb = w->K / BLOCK;
    int8_t *xq = malloc((size_t)(M * w->K));
    float *xd = malloc(sizeof(float) * (size_t)(M * nb)), *xs = malloc(sizeof(float) * (size_t)(M * nb));
    nl_gemm_prepare(w, x, M, xq, xd, xs);
#pragma omp parallel num_threads(nthreads)
    nl_gemm_omp_for(w, x, xq, xd, xs, M, y);
    free(xq);
    free(xd);
    free(xs);
}
