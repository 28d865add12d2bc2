/* Decode attention over the paged KV pool, read in place: one new query token per request
 * attends over its slots req_to_token[row][0 : seq_len], with no gathered copy of K/V.
 *
 *   q        [B, H, D]        float32, contiguous
 *   k_buf    [S, Hkv, D]      the pool of one layer, float32 or bfloat16 (kv_bf16); v_buf likewise
 *   req_to_token [R, ctx]     int64, rows[b] picks request b's row
 *   out      [B, H, D]        float32
 *
 * Query head h reads KV head h / (H / Hkv) (grouped-query attention). A task is one request and
 * one KV head with its G query heads (K/V read once for the group), or one query head when the
 * batch has too few groups to keep every thread busy. Softmax is exact: scores first, then the
 * max, then exp and the weighted sum of V, in float32 (bfloat16 K/V are widened as they are read).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"

/* One layer's K or V pool: rows of Hkv * D elements, float32 or bfloat16. */
typedef struct {
    const char *base; /* at the KV head this task reads */
    int64_t row_bytes;
    int bf16;
} kv_view;

static inline const void *kv_row(kv_view kv, int64_t slot) { return kv.base + slot * kv.row_bytes; }

static inline float kv_at(const void *row, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

#ifdef NL_AVX2
static inline __m256 kv_load8(const void *row, int64_t i, int bf16) {
    if (bf16) /* bfloat16 is float32's upper half: widen by a shift */
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i))), 16));
    return _mm256_loadu_ps((const float *)row + i);
}
#endif

static inline float dot(const float *a, const void *b, int64_t n, int bf16) {
#ifdef NL_AVX2
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), kv_load8(b, i, bf16), acc);
    float r = hsum(acc);
#else
    float r = 0;
    int64_t i = 0;
#endif
    for (; i < n; i++) r += a[i] * kv_at(b, i, bf16);
    return r;
}


/* s[t] = exp(s[t] - mx) over n values; returns their sum. */
static inline float exp_sum(float *s, int64_t n, float mx) {
    float sum = 0;
    int64_t t = 0;
#ifdef NL_AVX2
    __m256 acc = _mm256_setzero_ps();
    const __m256 vm = _mm256_set1_ps(mx);
    for (; t + 8 <= n; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), vm));
        _mm256_storeu_ps(s + t, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum(acc);
#endif
    for (; t < n; t++) {
        s[t] = expf(s[t] - mx);
        sum += s[t];
    }
    return sum;
}

static inline void axpy(float a, const void *x, float *y, int64_t n, int bf16) {
    int64_t i = 0;
#ifdef NL_AVX2
    const __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, kv_load8(x, i, bf16), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += a * kv_at(x, i, bf16);
}

/* scores[t] = scale * q . k_t for the len keys of one KV head: four keys per pass, so four
 * independent FMA chains hide the FMA latency, and one reduction yields all four sums. */
static void qk_scores(const float *q, kv_view k, const int64_t *slots, int64_t len, int64_t D,
                      float scale, float *scores) {
    int64_t t = 0;
#ifdef NL_AVX2
    if (D % 8 == 0) {
        for (; t + 4 <= len; t += 4) {
            const void *k0 = kv_row(k, slots[t]), *k1 = kv_row(k, slots[t + 1]);
            const void *k2 = kv_row(k, slots[t + 2]), *k3 = kv_row(k, slots[t + 3]);
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t i = 0; i < D; i += 8) {
                const __m256 qv = _mm256_loadu_ps(q + i);
                a0 = _mm256_fmadd_ps(qv, kv_load8(k0, i, k.bf16), a0);
                a1 = _mm256_fmadd_ps(qv, kv_load8(k1, i, k.bf16), a1);
                a2 = _mm256_fmadd_ps(qv, kv_load8(k2, i, k.bf16), a2);
                a3 = _mm256_fmadd_ps(qv, kv_load8(k3, i, k.bf16), a3);
            }
            /* [sum a0, sum a1, sum a2, sum a3] */
            const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
            const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
            _mm_storeu_ps(scores + t, _mm_mul_ps(sums, _mm_set1_ps(scale)));
        }
    }
#endif
    for (; t < len; t++) scores[t] = scale * dot(q, kv_row(k, slots[t]), D, k.bf16);
}

/* Query heads [h0, h0 + g) of request b, all on the KV head k and v are at. scores: scratch of
 * g * len floats. */
static void attend(const float *q, kv_view k, kv_view v, const int64_t *slots, int64_t len,
                   int64_t H, int64_t D, float scale, int64_t b, int64_t h0, int64_t g,
                   float *scores, float *out) {
    for (int64_t j = 0; j < g; j++)
        qk_scores(q + (b * H + h0 + j) * D, k, slots, len, D, scale, scores + j * len);
    for (int64_t j = 0; j < g; j++) {
        float *s = scores + j * len, mx = -INFINITY;
        for (int64_t t = 0; t < len; t++) mx = s[t] > mx ? s[t] : mx;
        const float inv = 1.0f / exp_sum(s, len, mx);
        for (int64_t t = 0; t < len; t++) s[t] *= inv;
        float *o = out + (b * H + h0 + j) * D;
        for (int64_t i = 0; i < D; i++) o[i] = 0;
    }
    for (int64_t t = 0; t < len; t++) {
        const void *vr = kv_row(v, slots[t]);
        for (int64_t j = 0; j < g; j++) axpy(scores[j * len + t], vr, out + (b * H + h0 + j) * D, D, v.bf16);
    }
}

/* The tasks of one decode attention as an orphaned `omp for` (see gemm_blocks.c). */
void nl_decode_attention_omp_for(const float *q, const void *k_buf, const void *v_buf, int kv_bf16,
                                 const int64_t *req_to_token, int64_t ctx, const int64_t *rows,
                                 const int64_t *seq_lens, int64_t B, int64_t H, int64_t Hkv,
                                 int64_t D, float scale, float *out, int nthreads) {
    const int64_t esize = kv_bf16 ? 2 : 4;
    const int64_t G = H / Hkv;
    /* Whole groups when there are enough of them to share out, else one query head per task. */
    const int64_t g = B * Hkv >= 2 * nthreads ? G : 1;
    const int64_t tasks = B * (H / g);
    float *scores = NULL;
    int64_t cap = 0;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t b = task / (H / g), h0 = (task % (H / g)) * g, len = seq_lens[b];
        if (g * len > cap) {
            free(scores);
            cap = g * len;
            scores = malloc(sizeof(float) * (size_t)cap);
        }
        const int64_t head = (h0 / G) * D * esize, row = Hkv * D * esize;
        const kv_view k = {(const char *)k_buf + head, row, kv_bf16};
        const kv_view v = {(const char *)v_buf + head, row, kv_bf16};
        attend(q, k, v, req_to_token + rows[b] * ctx, len, H, D, scale, b, h0, g, scores, out);
    }
    free(scores);
}

void nl_decode_attention(const float *q, const void *k_buf, const void *v_buf, int kv_bf16,
                         const int64_t *req_to_token, int64_t ctx, const int64_t *rows,
                         const int64_t *seq_lens, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                         float scale, float *out, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    nl_decode_attention_omp_for(q, k_buf, v_buf, kv_bf16, req_to_token, ctx, rows, seq_lens, B, H,
                                Hkv, D, scale, out, nthreads);
}
