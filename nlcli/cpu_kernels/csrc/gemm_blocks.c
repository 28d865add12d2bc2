/* Small-M matmuls over weights stored in blocks of 32 along K:
 *
 *   y[m, n] = sum_k x[m, k] * w[n, k]
 *
 *   q4: w = d * q + m per block, q in 0..15 packed two per byte (byte j of a block holds element j
 *       in its low nibble and element j + 16 in its high nibble: GGUF's Q4_1 layout), d and m in
 *       float16, stored [N][K/32][2].
 *   q8: w = d * q per block, q int8, d float16 [N][K/32] (GGUF's Q8_0).
 *
 * The activations are rounded to int16 per block of 32 (scale = absmax / 32767), so a block's dot
 * product is integer arithmetic, sixteen 16-bit multiply-adds per instruction, and one float
 * multiply by the two scales. That is twice the instructions of llama.cpp's int8 activations but
 * a quarter of converting every weight to float, and it keeps the activations to ~15 bits: int8
 * activations cost SmolLM2 its answer to "What is the capital of France?" (llama.cpp, through
 * llama-cpp-python, answers "L'Étoile, la Marseillaise" too), int16 ones answer "Paris" as
 * float32 does.
 * These are decode kernels: they stream the weights once per call and reuse each block for up to
 * TILE rows of x, so their cost is the weight bytes while M is small.
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

/* x [M, K] -> int16 codes xq [M, K], scales xd [M, K/32] and xs [M, K/32], the sum of the block's
 * rounded values (xd * sum of codes): q4's m term then sees the same x as its d term, so a block's
 * result is exactly (dequantized w) . (dequantized x). */
void nl_gemm_prepare(const nl_matrix *w, const float *x, int64_t M, int16_t *xq, float *xd, float *xs) {
    const int64_t K = w->K;
    for (int64_t i = 0; i < M * (K / BLOCK); i++) {
        const float *xb = x + i * BLOCK;
        float amax = 0;
        for (int j = 0; j < BLOCK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float d = amax / 32767, inv = d > 0 ? 1 / d : 0;
        int32_t sum = 0;
        for (int j = 0; j < BLOCK; j++) {
            const int16_t q = (int16_t)nearbyintf(xb[j] * inv);
            xq[i * BLOCK + j] = q;
            sum += q;
        }
        xd[i] = d;
        xs[i] = d * (float)sum;
    }
}

#ifdef NL_AVX2
/* sum over a block of w (two halves of 16 int16) times x (32 int16 at xb), as 8 float lanes.
 * |w| <= 127 and |x| <= 32767: each int32 lane adds four products, far from overflow. */
static inline __m256 dot_block(__m256i w0, __m256i w1, const int16_t *xb) {
    const __m256i p = _mm256_add_epi32(
        _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xb)),
        _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xb + 16))));
    return _mm256_cvtepi32_ps(p);
}
#endif

static inline int32_t dot_block_scalar(const int16_t *w, const int16_t *xb) {
    int32_t s = 0;
    for (int j = 0; j < BLOCK; j++) s += (int32_t)w[j] * xb[j];
    return s;
}

/* One weight row against rows [r0, r0 + rows) of the rounded x; rows is a constant at every call
 * site (see WITH_ROWS), so the loops unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void
q4_row(const int16_t *xq, const float *xd, const float *xs, int64_t K, const uint8_t *codes,
       const uint16_t *dm, int64_t r0, const int rows, float *out) {
    const int64_t nb = K / BLOCK;
    float macc[TILE] = {0};
#ifdef NL_AVX2
    __m256 acc[TILE];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    const __m128i low = _mm_set1_epi8(0x0f);
    for (int64_t b = 0; b < nb; b++) {
        const __m128i v = _mm_loadu_si128((const __m128i *)(codes + b * 16));
        const __m256i w0 = _mm256_cvtepu8_epi16(_mm_and_si128(v, low));                     /* 0..15 */
        const __m256i w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), low));  /* 16..31 */
        const float d = half_to_float(dm[2 * b]), m = half_to_float(dm[2 * b + 1]);
        for (int r = 0; r < rows; r++) {
            const int64_t i = (r0 + r) * nb + b;
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xd[i]), dot_block(w0, w1, xq + i * BLOCK), acc[r]);
            macc[r] += m * xs[i];
        }
    }
    for (int r = 0; r < rows; r++) out[r] = hsum(acc[r]) + macc[r];
#else
    float acc[TILE] = {0};
    for (int64_t b = 0; b < nb; b++) {
        const float d = half_to_float(dm[2 * b]), m = half_to_float(dm[2 * b + 1]);
        int16_t w[BLOCK];
        for (int j = 0; j < 16; j++) {
            w[j] = codes[b * 16 + j] & 0x0f;
            w[j + 16] = codes[b * 16 + j] >> 4;
        }
        for (int r = 0; r < rows; r++) {
            const int64_t i = (r0 + r) * nb + b;
            acc[r] += d * xd[i] * (float)dot_block_scalar(w, xq + i * BLOCK);
            macc[r] += m * xs[i];
        }
    }
    for (int r = 0; r < rows; r++) out[r] = acc[r] + macc[r];
#endif
}

static inline __attribute__((always_inline)) void
q8_row(const int16_t *xq, const float *xd, int64_t K, const int8_t *codes, const uint16_t *ds,
       int64_t r0, const int rows, float *out) {
    const int64_t nb = K / BLOCK;
#ifdef NL_AVX2
    __m256 acc[TILE];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *q = codes + b * BLOCK;
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)q));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 16)));
        const float d = half_to_float(ds[b]);
        for (int r = 0; r < rows; r++) {
            const int64_t i = (r0 + r) * nb + b;
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xd[i]), dot_block(w0, w1, xq + i * BLOCK), acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) out[r] = hsum(acc[r]);
#else
    float acc[TILE] = {0};
    for (int64_t b = 0; b < nb; b++) {
        const float d = half_to_float(ds[b]);
        int16_t w[BLOCK];
        for (int j = 0; j < BLOCK; j++) w[j] = codes[b * BLOCK + j];
        for (int r = 0; r < rows; r++) {
            const int64_t i = (r0 + r) * nb + b;
            acc[r] += d * xd[i] * (float)dot_block_scalar(w, xq + i * BLOCK);
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
 * the rows inside an enclosing parallel region (the fused decode step) or runs them all alone.
 * xq, xd, xs: x as nl_gemm_prepare rounded it. */
void nl_gemm_omp_for(const nl_matrix *w, const int16_t *xq, const float *xd, const float *xs,
                     int64_t M, float *y) {
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
            } else {
                const int8_t *c = (const int8_t *)w->codes + n * K;
#define Q8(R) q8_row(xq, xd, K, c, w->scales + n * nb, r0, R, out)
                WITH_ROWS(rows, Q8)
            }
            for (int r = 0; r < rows; r++)
                y[(r0 + r) * N + n] = w->bias ? out[r] + w->bias[n] : out[r];
        }
    }
}

/* y [M, N] = x [M, K] @ w.T (+ bias), on its own threads. */
void nl_gemm(const nl_matrix *w, const float *x, int64_t M, float *y, int nthreads) {
    const int64_t nb = w->K / BLOCK;
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(M * w->K));
    float *xd = malloc(sizeof(float) * (size_t)(M * nb)), *xs = malloc(sizeof(float) * (size_t)(M * nb));
    nl_gemm_prepare(w, x, M, xq, xd, xs);
#pragma omp parallel num_threads(nthreads)
    nl_gemm_omp_for(w, xq, xd, xs, M, y);
    free(xq);
    free(xd);
    free(xs);
}
