/* Shared by qgemv.c (block kernels) and decode.c (the fused decode step). */
#ifndef LLAMA3_QGEMV_H
#define LLAMA3_QGEMV_H

#include <immintrin.h>
#include <stdint.h>

#define QK 32

enum { KIND_Q8 = 0, KIND_Q4_0 = 1, KIND_Q4_1 = 2, KIND_F32 = 3 };

/* A weight matrix (rows, k). Quantized kinds: see the layouts in qgemv.c (scales d and offsets m are
 * float16 bits, as in GGUF); KIND_F32: qs is float (rows, k). */
typedef struct {
    int64_t kind;
    const void *qs;
    const uint16_t *d, *m;
    int64_t rows, k;
} qmat;

/* n rows of activations of length k: the float values and their int8 blocks (q, scale d, s = d * sum(q)). */
typedef struct {
    const float *f;
    const int8_t *q;
    const float *d, *s;
    int64_t k;
} acts;

/* y[t * ldy + r] (+)= row r of W . activation row t, for every row of W and t < n. A worksharing construct:
 * inside a parallel region the rows are split among the threads (then a barrier); outside, one thread. */
void matmul_ws(const qmat *W, const acts *X, int64_t n, float *y, int64_t ldy, int add);

/* Row r of W as k floats. */
void dequant_row(const qmat *W, int64_t r, float *out);

/* One row of k floats (k a multiple of 32) to int8 blocks. */
void quantize_row(const float *x, int64_t k, int8_t *q, float *d, float *s);

/* out = silu(g) * u, n floats. */
void silu_mul(const float *g, const float *u, int64_t n, float *out);

static inline float hsum8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* sum a[i] b[i]: 8 lanes, then the tail in order. */
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum8(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* sum a[i] b[i] with a in float16: 8 lanes, then the tail in order. */
static inline float dot_f16_f32(const uint16_t *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a + i))), _mm256_loadu_ps(b + i), acc);
    float s = hsum8(acc);
    for (; i < n; i++) s += _cvtsh_ss(a[i]) * b[i];
    return s;
}

/* exp(x) for 8 floats (Cephes' polynomial after splitting off a power of two; ~1 ulp), 0 below -87. */
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f), hi = _mm256_set1_ps(88.0f);
    const __m256 tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

#endif
