/* Decode attention over the paged KV pool, read in place: one new query token per request
 * attends over its slots req_to_token[row][0 : seq_len], with no gathered copy of K/V.
 *
 *   q        [B, H, D]        float32, contiguous
 *   k_buf    [S, Hkv, D]      the pool of one layer, float32 or bfloat16 (kv_bf16); v_buf likewise
 *   req_to_token [R, ctx]     int64, rows[b] picks request b's row
 *   out      [B, H, D]        float32
 *
 * Query head h reads KV head h / (H / Hkv) (grouped-query attention). A task is one request and
 * one KV head with its G query heads (K/V read once for the group); with too few groups to keep
 * every thread busy, a chunk of such a task's keys (split-K, merged after), or for short contexts
 * one query head. Softmax is exact: scores first, then the max, then exp and the weighted sum of
 * V, in float32 (bfloat16 K/V are widened as they are read); chunks merge by rescaling to the
 * largest max.
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

/* o[0:D] = sum over t of w[t] * v_t (o overwritten). 64 dims at a time sit in eight registers
 * across all the keys, so o is not loaded and stored once per key; then 8 at a time, then one. */
static void weighted_sum(const float *w, kv_view v, const int64_t *slots, int64_t len, int64_t D,
                         float *o) {
    int64_t d0 = 0;
#ifdef NL_AVX2
    for (; d0 + 64 <= D; d0 += 64) {
        __m256 a[8];
        for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
        for (int64_t t = 0; t < len; t++) {
            const void *vr = kv_row(v, slots[t]);
            const __m256 wt = _mm256_set1_ps(w[t]);
            for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(wt, kv_load8(vr, d0 + 8 * i, v.bf16), a[i]);
        }
        for (int i = 0; i < 8; i++) _mm256_storeu_ps(o + d0 + 8 * i, a[i]);
    }
    for (; d0 + 8 <= D; d0 += 8) { /* a head size that is no multiple of 64: 8 dims at a time */
        __m256 a = _mm256_setzero_ps();
        for (int64_t t = 0; t < len; t++)
            a = _mm256_fmadd_ps(_mm256_set1_ps(w[t]), kv_load8(kv_row(v, slots[t]), d0, v.bf16), a);
        _mm256_storeu_ps(o + d0, a);
    }
#endif
    for (int64_t i = d0; i < D; i++) o[i] = 0;
    for (int64_t t = 0; d0 < D && t < len; t++) {
        const void *vr = kv_row(v, slots[t]);
        for (int64_t i = d0; i < D; i++) o[i] += w[t] * kv_at(vr, i, v.bf16);
    }
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

/* Query heads [h0, h0 + g) of request b, all on the KV head k and v are at, over the len keys at
 * `slots`: per head j, the scores' max m[j], the sum l[j] of exp(score - m[j]) and, in o + j * D,
 * the sum of exp(score - m[j]) * v: the unnormalized softmax, so partial results over chunks of
 * the keys can be merged. scores: scratch of g * len floats. */
static void attend_part(const float *q, kv_view k, kv_view v, const int64_t *slots, int64_t len,
                        int64_t H, int64_t D, float scale, int64_t b, int64_t h0, int64_t g,
                        float *scores, float *m, float *l, float *o) {
    for (int64_t j = 0; j < g; j++) {
        float *s = scores + j * len, mx = -INFINITY;
        qk_scores(q + (b * H + h0 + j) * D, k, slots, len, D, scale, s);
        for (int64_t t = 0; t < len; t++) mx = s[t] > mx ? s[t] : mx;
        m[j] = mx;
        l[j] = len ? exp_sum(s, len, mx) : 0.0f;
        weighted_sum(s, v, slots, len, D, o + j * D);
    }
}

/* Keys per chunk at least: below this a chunk's fixed costs outweigh the spread over threads. */
#define MIN_CHUNK 64

/* How many chunks each request's keys are split into: with fewer KV-head groups than twice the
 * threads (decode of one or two requests), whole groups leave threads idle, and one task per query
 * head would read each KV head G times over; chunks of the keys, merged after, do neither. */
static int64_t key_splits(const int64_t *seq_lens, int64_t B, int64_t groups, int nthreads) {
    if (groups >= 2 * nthreads) return 1;
    int64_t longest = 0;
    for (int64_t b = 0; b < B; b++) longest = seq_lens[b] > longest ? seq_lens[b] : longest;
    const int64_t want = (2 * nthreads + groups - 1) / groups, most = longest / MIN_CHUNK;
    return want < most ? want : (most > 1 ? most : 1);
}

/* Scratch of at least n floats, kept per thread across tasks. */
static float *grow(float *buf, int64_t *cap, int64_t n) {
    if (n <= *cap) return buf;
    free(buf);
    *cap = n;
    return malloc(sizeof(float) * (size_t)n);
}

/* The tasks of one decode attention as orphaned `omp for`s (see gemm_blocks.c): one task per
 * request and KV head (its G query heads read K/V once), or per query head where the groups are
 * too few and the keys too short to split; with key_splits > 1, one per chunk of the keys, then
 * one merge per request and KV head. */
void nl_decode_attention_omp_for(const float *q, const void *k_buf, const void *v_buf, int kv_bf16,
                                 const int64_t *req_to_token, int64_t ctx, const int64_t *rows,
                                 const int64_t *seq_lens, int64_t B, int64_t H, int64_t Hkv,
                                 int64_t D, float scale, float *out, int nthreads) {
    const int64_t esize = kv_bf16 ? 2 : 4, row = Hkv * D * esize;
    const int64_t G = H / Hkv, splits = key_splits(seq_lens, B, B * Hkv, nthreads);
    /* Whole groups when there are enough of them to share out, else one query head per task. */
    const int64_t g = splits > 1 || B * Hkv >= 2 * nthreads ? G : 1;
    const int64_t tasks = B * (H / g) * splits, part = g * (D + 2); /* m, l, o per head */
    float *scores = NULL, *parts = NULL;
    int64_t cap = 0;
    if (splits > 1) {
#pragma omp single copyprivate(parts)
        parts = malloc(sizeof(float) * (size_t)(tasks * part));
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t c = task % splits, bh = task / splits;
        const int64_t b = bh / (H / g), h0 = (bh % (H / g)) * g, len = seq_lens[b];
        const int64_t chunk = (len + splits - 1) / splits;
        const int64_t t0 = c * chunk < len ? c * chunk : len, t1 = t0 + chunk < len ? t0 + chunk : len;
        scores = grow(scores, &cap, g * (t1 - t0) + 2 * g);
        const int64_t head = (h0 / G) * D * esize;
        const kv_view k = {(const char *)k_buf + head, row, kv_bf16};
        const kv_view v = {(const char *)v_buf + head, row, kv_bf16};
        const int64_t *slots = req_to_token + rows[b] * ctx + t0;
        float *ml = scores + g * (t1 - t0);
        if (splits > 1) {
            float *p = parts + task * part;
            attend_part(q, k, v, slots, t1 - t0, H, D, scale, b, h0, g, scores, p, p + g, p + 2 * g);
            continue;
        }
        float *o = out + (b * H + h0) * D;
        attend_part(q, k, v, slots, t1 - t0, H, D, scale, b, h0, g, scores, ml, ml + g, o);
        for (int64_t j = 0; j < g; j++)
            for (int64_t i = 0; i < D; i++) o[j * D + i] /= ml[g + j];
    }
    free(scores);
    if (splits == 1) return;
    /* Merge the chunks of each request and KV head: rescale each to the largest max. */
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * Hkv; bh++) {
        const float *first = parts + bh * splits * part;
        for (int64_t j = 0; j < g; j++) {
            float mx = -INFINITY, sum = 0;
            for (int64_t c = 0; c < splits; c++) mx = first[c * part + j] > mx ? first[c * part + j] : mx;
            float *o = out + (bh * G + j) * D;
            for (int64_t i = 0; i < D; i++) o[i] = 0;
            for (int64_t c = 0; c < splits; c++) {
                const float *p = first + c * part;
                if (p[g + j] == 0) continue; /* an empty chunk */
                const float w = expf(p[j] - mx);
                sum += w * p[g + j];
                for (int64_t i = 0; i < D; i++) o[i] += w * p[2 * g + j * D + i];
            }
            for (int64_t i = 0; i < D; i++) o[i] /= sum;
        }
    }
#pragma omp single nowait
    free(parts);
}

void nl_decode_attention(const float *q, const void *k_buf, const void *v_buf, int kv_bf16,
                         const int64_t *req_to_token, int64_t ctx, const int64_t *rows,
                         const int64_t *seq_lens, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                         float scale, float *out, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    nl_decode_attention_omp_for(q, k_buf, v_buf, kv_bf16, req_to_token, ctx, rows, seq_lens, B, H,
                                Hkv, D, scale, out, nthreads);
}
