/* What the kernel files share: the weight matrix descriptor (mirrored by ctypes in ops.py) and the
 * building blocks the fused decode step (decode_step.c) runs inside its one parallel region. */
#ifndef NL_KERNELS_H
#define NL_KERNELS_H
#include <stdint.h>

#define BLOCK 32

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define NL_AVX2 1
#endif

/* bfloat16 <-> float32: bfloat16 is float32's upper 16 bits; narrowing rounds to nearest even,
 * as torch's .to(torch.bfloat16) does. */
static inline float bf16_to_float(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

static inline uint16_t float_to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40); /* quiet NaN */
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

#ifdef NL_AVX2
/* The sum of a vector's 8 lanes. */
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* exp(x) for 8 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-6 polynomial (Cephes' expf
 * coefficients), then scaled by 2^n through the exponent bits. Relative error ~2 ulp; inputs
 * are clamped to [-87, 88], where 2^n still fits the exponent (e^-87 is the softmax's far tail,
 * e^88 ~ 1.6e38 stands in for overflow: silu's gate / (1 + e^-gate) is then ~0 either way). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif


enum { NL_Q4 = 0, NL_Q8 = 1 }; /* Q4_1 / Q8_0 blocks */

typedef struct {
    int64_t kind;
    const void *codes;
    const uint16_t *scales; /* float16: (d, m) pairs for Q4, d for Q8 */
    const float *bias;      /* [N] or NULL */
    int64_t N, K;
} nl_matrix;

void nl_gemm_prepare(const nl_matrix *w, const float *x, int64_t M, int16_t *xq, float *xd, float *xs);
void nl_gemm_omp_for(const nl_matrix *w, const int16_t *xq, const float *xd, const float *xs,
                     int64_t M, float *y);
void nl_decode_attention_omp_for(const float *q, const void *k_buf, const void *v_buf, int kv_bf16,
                                 const int64_t *req_to_token, int64_t ctx, const int64_t *rows,
                                 const int64_t *seq_lens, int64_t B, int64_t H, int64_t Hkv,
                                 int64_t D, float scale, float *out, int nthreads);
#endif
