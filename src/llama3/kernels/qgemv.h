/* Shared by quants.c (GGUF block kernels), qgemv.c (SiLU), attention.c (paged decode attention) and decode.c (the
 * fused decode step). */
#ifndef LLAMA3_QGEMV_H
#define LLAMA3_QGEMV_H

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

#define QK 32    /* elements per block of the legacy formats (Q4_0 ... Q8_0, IQ4_NL) and of Q8 activations */
#define QK_K 256 /* elements per super-block of the K-quants and IQ4_XS, and of Q8_K activations */

/* Weight kinds, defined once: X(name, GGML type id (ggml.h's enum ggml_type, gguf-py's GGMLQuantizationType),
 * values per block, bytes per block). The Python side checks them against gguf-py when it loads the library. */
#define GGML_KINDS(X)                                                                                          \
    X(F32, 0, 1, 4) X(F16, 1, 1, 2) X(BF16, 30, 1, 2) X(Q4_0, 2, 32, 18) X(Q4_1, 3, 32, 20) X(Q5_0, 6, 32, 22)  \
    X(Q5_1, 7, 32, 24) X(Q8_0, 8, 32, 34) X(Q2_K, 10, 256, 84) X(Q3_K, 11, 256, 110) X(Q4_K, 12, 256, 144)     \
    X(Q5_K, 13, 256, 176) X(Q6_K, 14, 256, 210) X(IQ4_NL, 20, 32, 18) X(IQ4_XS, 23, 256, 136)

#define KIND_ENUM(name, id, elems, bytes) KIND_##name = id,
enum { GGML_KINDS(KIND_ENUM) };

/* A weight matrix (rows, k): each row is k / block_elems blocks exactly as a GGUF file stores them
 * (row_bytes apart; for F32/F16/BF16 a block is one value). */
typedef struct {
    int64_t kind;
    const uint8_t *data;
    int64_t rows, k, row_bytes;
} qmat;

/* n rows of activations of length k (row stride k): the float values and the quantized forms the weights read.
 *   ACT_Q8  (legacy kinds, IQ4_NL): int8 blocks of 32, q8 (n, k), scale d8 (n, k/32), s8 = d8 * sum(q) (n, k/32)
 *   ACT_Q8K (K-quants, IQ4_XS):     int8 blocks of 256, qk (n, k), scale dk (n, k/256), sums of 16 bk (n, k/16)
 * Float kinds (F32, F16, BF16) read f. Both are llama.cpp's pairings (its Q8_0/Q8_1 and Q8_K). */
typedef struct {
    const float *f;
    int8_t *q8;
    float *d8, *s8;
    int8_t *qk;
    float *dk;
    int16_t *bk;
    int64_t k;
} acts;

enum { ACT_Q8 = 1, ACT_Q8K = 2 };

int act_needs(const qmat *W);                       /* the ACT_* forms W's kind reads */
int act_needs_list(const qmat *W, int64_t n_w);     /* ... any of n_w matrices reads */
size_t acts_bytes(int64_t n, int64_t k);            /* a buffer for every form of n rows of k */
void acts_init(acts *X, void *buf, const float *f, int64_t n, int64_t k); /* X's forms laid out in buf */

/* Elements [j0, j1) of row t of X->f into the forms in needs (j0, j1 multiples of QK_K, or j1 = k; a block
 * cut by j1 is skipped, which only float kinds allow). Touches only that span: call it per row or span
 * inside a parallel region. */
void quantize_acts_row(const acts *X, int64_t t, int64_t j0, int64_t j1, int needs);

/* y[t * ldy + r] (+)= row r of W . activation row t, for every row of W and t < n. A worksharing construct:
 * inside a parallel region the rows are split among the threads (then a barrier); outside, one thread.
 * Each (row, activation row) product takes the same operations whatever n and the thread count. */
void matmul_ws(const qmat *W, const acts *X, int64_t n, float *y, int64_t ldy, int add);

/* n_w matrices on the same activations, outputs side by side in rows of ldy (W[0]'s rows, then W[1]'s ...):
 * one worksharing loop over all their rows, so one barrier. */
void matmul_list_ws(const qmat *W, int64_t n_w, const acts *X, int64_t n, float *y, int64_t ldy);

/* Row r of W as k floats, exactly as gguf-py's dequantize computes them. */
void dequant_row(const qmat *W, int64_t r, float *out);

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
