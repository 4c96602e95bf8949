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

#define ATT_CHUNK 128 /* keys per attention work item */

void attention_ws(const float *q, const float *k, const float *v, int64_t B, int64_t H, int64_t KVH, int64_t D,
                  int64_t S, int64_t row_stride, const int64_t *kv_row, const int64_t *lens, float scale,
                  float *part, int64_t max_chunks, float *out);

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

#endif
