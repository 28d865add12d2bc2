/* One decode step of a Llama-family decoder (Llama, Mistral, Qwen2), every layer in C, in one
 * OpenMP parallel region: the matmuls and attention share their work out across the threads with
 * `omp for`, and the small per-token work between them (norms, rotary, the KV store, SiLU, the
 * residual adds, rounding x for the next matmul) runs on one thread in `omp single`. A step costs
 * one call from Python and a barrier per part instead of a dispatch, an allocation and a fork-join
 * per torch op, which is most of a small model's decode time on a CPU.
 *
 * Activations stay float32 between the matmuls whatever the model's dtype; a bfloat16 model's
 * embedding rows are widened as they are read and its K/V narrowed as they are stored.
 *
 * It computes what models/llama.py computes, with the same weights (the quantized copies of
 * layers/quantization) and the same arithmetic up to the order of sums:
 *   residual = embed[token]
 *   per layer: h = rmsnorm(residual) * attn_norm; q, k, v = h @ qkv.T (+ bias); rotate q, k;
 *              store k, v at out_loc; o = attention(q, pool); residual += o @ o_proj.T;
 *              h = rmsnorm(residual) * ffn_norm; residual += (silu(gate) * up) @ down.T
 *   out = rmsnorm(residual) * final_norm     (the lm_head stays with the caller)
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "kernels.h"

typedef struct {
    const float *attn_norm, *ffn_norm;
    nl_matrix qkv, o, gate_up, down;
    void *k_buf, *v_buf; /* this layer's pool, [slots, Hkv, D], float32 or bfloat16 */
} nl_layer;

typedef struct {
    int64_t n_layers, hidden, heads, kv_heads, head_dim, inter;
    float eps, scale;
    int64_t embed_bf16, kv_bf16; /* the embedding table's and the KV pool's dtype: else float32 */
    const void *embed;       /* [vocab, hidden] */
    const float *final_norm; /* [hidden]; the norms are float32 whatever the model's dtype */
    const float *cos_sin;    /* [positions, 2 * head_dim]: cos | cos | -sin | sin (rotary.py) */
    const nl_layer *layers;
} nl_model;

/* out = x / rms(x) * w over n values (float sums, as torch's rms_norm). */
static void rmsnorm(const float *x, const float *w, int64_t n, float eps, float *out) {
    float ss = 0;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

/* Rotate-half rotary embedding of one head in place: x * cos2 + swap_halves(x) * sin2. */
static void rope(float *x, const float *cs, int64_t D) {
    float t[512];
    const int64_t h = D / 2;
    memcpy(t, x, sizeof(float) * (size_t)D);
    for (int64_t i = 0; i < h; i++) x[i] = t[i] * cs[i] + t[i + h] * cs[D + i];
    for (int64_t i = h; i < D; i++) x[i] = t[i] * cs[i] + t[i - h] * cs[D + i];
}

/* out[i] = silu(gate[i]) * up[i] = gate / (1 + e^-gate) * up. */
static void silu_mul(const float *gate, const float *up, int64_t n, float *out) {
    int64_t i = 0;
#ifdef NL_AVX2
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
#endif
    for (; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* Row `slot` of a pool of `width`-element rows := src (narrowed to bfloat16 when the pool is). */
static void store_row(void *pool, int bf16, int64_t slot, int64_t width, const float *src) {
    if (!bf16) {
        memcpy((float *)pool + slot * width, src, sizeof(float) * (size_t)width);
        return;
    }
    uint16_t *dst = (uint16_t *)pool + slot * width;
    for (int64_t i = 0; i < width; i++) dst[i] = float_to_bf16(src[i]);
}

static void add_rows(float *acc, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) acc[i] += x[i];
}

void nl_decode_step(const nl_model *m, const int64_t *tokens, const int64_t *positions,
                    const int64_t *out_loc, const int64_t *req_to_token, int64_t ctx,
                    const int64_t *rows, const int64_t *seq_lens, int64_t B, float *out,
                    int nthreads) {
    const int64_t Hd = m->hidden, H = m->heads, Hkv = m->kv_heads, D = m->head_dim, I = m->inter;
    const int64_t qkv_n = (H + 2 * Hkv) * D, kmax = Hd > I ? (Hd > H * D ? Hd : H * D) : (I > H * D ? I : H * D);
    float *residual = malloc(sizeof(float) * (size_t)(B * Hd));
    float *h = malloc(sizeof(float) * (size_t)(B * kmax));
    float *tmp = malloc(sizeof(float) * (size_t)(B * Hd));
    float *qkv = malloc(sizeof(float) * (size_t)(B * qkv_n));
    float *q = malloc(sizeof(float) * (size_t)(B * H * D));
    float *attn = malloc(sizeof(float) * (size_t)(B * H * D));
    float *gu = malloc(sizeof(float) * (size_t)(B * 2 * I));
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(B * kmax));
    float *xd = malloc(sizeof(float) * (size_t)(B * kmax / BLOCK));
    float *xs = malloc(sizeof(float) * (size_t)(B * kmax / BLOCK));

#pragma omp parallel num_threads(nthreads)
    {
        const int nt = omp_get_num_threads();
#pragma omp single
        {
            for (int64_t b = 0; b < B; b++) {
                float *r = residual + b * Hd;
                if (m->embed_bf16)
                    for (int64_t i = 0; i < Hd; i++) r[i] = bf16_to_float(((const uint16_t *)m->embed)[tokens[b] * Hd + i]);
                else
                    memcpy(r, (const float *)m->embed + tokens[b] * Hd, sizeof(float) * (size_t)Hd);
                rmsnorm(residual + b * Hd, m->layers[0].attn_norm, Hd, m->eps, h + b * Hd);
            }
            nl_gemm_prepare(&m->layers[0].qkv, h, B, xq, xd, xs);
        }
        for (int64_t l = 0; l < m->n_layers; l++) {
            const nl_layer *L = &m->layers[l];
            nl_gemm_omp_for(&L->qkv, xq, xd, xs, B, qkv);
#pragma omp single
            for (int64_t b = 0; b < B; b++) {
                float *row = qkv + b * qkv_n;
                const float *cs = m->cos_sin + positions[b] * 2 * D;
                for (int64_t j = 0; j < H + Hkv; j++) rope(row + j * D, cs, D);
                memcpy(q + b * H * D, row, sizeof(float) * (size_t)(H * D));
                store_row(L->k_buf, (int)m->kv_bf16, out_loc[b], Hkv * D, row + H * D);
                store_row(L->v_buf, (int)m->kv_bf16, out_loc[b], Hkv * D, row + (H + Hkv) * D);
            }
            nl_decode_attention_omp_for(q, L->k_buf, L->v_buf, (int)m->kv_bf16, req_to_token, ctx,
                                        rows, seq_lens, B, H, Hkv, D, m->scale, attn, nt);
#pragma omp single
            nl_gemm_prepare(&L->o, attn, B, xq, xd, xs);
            nl_gemm_omp_for(&L->o, xq, xd, xs, B, tmp);
#pragma omp single
            {
                for (int64_t b = 0; b < B; b++) {
                    add_rows(residual + b * Hd, tmp + b * Hd, Hd);
                    rmsnorm(residual + b * Hd, L->ffn_norm, Hd, m->eps, h + b * Hd);
                }
                nl_gemm_prepare(&L->gate_up, h, B, xq, xd, xs);
            }
            nl_gemm_omp_for(&L->gate_up, xq, xd, xs, B, gu);
#pragma omp single
            {
                for (int64_t b = 0; b < B; b++) silu_mul(gu + b * 2 * I, gu + b * 2 * I + I, I, h + b * I);
                nl_gemm_prepare(&L->down, h, B, xq, xd, xs);
            }
            nl_gemm_omp_for(&L->down, xq, xd, xs, B, tmp);
#pragma omp single
            {
                const int last = l + 1 == m->n_layers;
                const float *w = last ? m->final_norm : m->layers[l + 1].attn_norm;
                for (int64_t b = 0; b < B; b++) {
                    add_rows(residual + b * Hd, tmp + b * Hd, Hd);
                    rmsnorm(residual + b * Hd, w, Hd, m->eps, (last ? out : h) + b * Hd);
                }
                if (!last) nl_gemm_prepare(&m->layers[l + 1].qkv, h, B, xq, xd, xs);
            }
        }
    }
    free(residual);
    free(h);
    free(tmp);
    free(qkv);
    free(q);
    free(attn);
    free(gu);
    free(xq);
    free(xd);
    free(xs);
}
