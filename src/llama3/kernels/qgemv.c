/* Quantized matrix-vector kernels for decode on x86-64 CPUs (AVX2 + FMA).
 *
 * Weights stay in 32-element blocks (GGUF's Q8_0, Q4_0, Q4_1 with their float16 scales, the integer
 * values and the scales in separate arrays);
 * activations are quantized to int8 blocks of 32 (as llama.cpp's Q8_0/Q8_1) and every block
 * product is an integer dot product:  sum_i w_i x_i = d_w d_x sum_i q_w,i q_x,i  (+ m_w sum_i x_i
 * for Q4_1's offset). AVX2 has no signed*signed byte multiply, so (as llama.cpp does) we multiply
 * |q_w| (unsigned) by q_x carrying q_w's sign: _mm256_maddubs_epi16(sign(q_w,q_w), sign(q_x,q_w)).
 *
 * Layouts (row-major, k a multiple of 32, nb = k / 32):
 *   q8:   qs int8 [rows][k],          d f16 [rows][nb]              w = q * d
 *   q4_0: qs uint8 [rows][k/2],       d f16 [rows][nb]              w = (nibble - 8) * d
 *   q4_1: qs uint8 [rows][k/2],       d, m f16 [rows][nb]           w = nibble * d + m
 *   nibbles of a block: byte j holds element j (low 4 bits) and element j+16 (high 4 bits).
 * Rounding is round-half-to-even everywhere, matching torch.round in the Python fallback.
 *
 * Every (weight row, activation row) product is computed by the same sequence of operations
 * whatever the number of activation rows, so a batch gives each row what it would get alone.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "qgemv.h"

/* 32 floats -> 32 int8 with one scale d = max|x| / 127 and s = d * sum(q). */
static inline void quantize_block(const float *xb, int8_t *q, float *d, float *s) {
    __m256 v[4], amax = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int j = 0; j < 4; j++) {
        v[j] = _mm256_loadu_ps(xb + 8 * j);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float m = _mm_cvtss_f32(m4);
    const float scale = m / 127.0f;
    const __m256 vinv = _mm256_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
    __m256i i32[4];
    for (int j = 0; j < 4; j++)
        i32[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], vinv),
                                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_hadd_epi32(s4, s4);
    s4 = _mm_hadd_epi32(s4, s4);
    /* pack 32 int32 -> 32 int8, restoring element order after the lane-wise packs */
    __m256i p8 = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
    p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)q, p8);
    *d = scale;
    *s = scale * (float)_mm_cvtsi128_si32(s4);
}

void quantize_row(const float *x, int64_t k, int8_t *q, float *d, float *s) {
    for (int64_t b = 0; b < k / QK; b++) quantize_block(x + b * QK, q + b * QK, d + b, s + b);
}

/* x (n, k) float -> q (n, k) int8, d (n, nb) scale, s (n, nb) = d * sum(q) */
void quantize_act(const float *x, int64_t n, int64_t k, int8_t *q, float *d, float *s) {
    const int64_t nb = k / QK;
    #pragma omp parallel for schedule(static) if (n * nb > 256)
    for (int64_t r = 0; r < n * nb; r++) quantize_block(x + r * QK, q + r * QK, d + r, s + r);
}

/* ------------------------------------------------------------------ block dot products */
static inline __m256i unpack_nibbles(const uint8_t *p) {
    /* the 16 bytes in both halves; the upper half shifted right by 4: low nibbles, then high nibbles */
    const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    return _mm256_and_si256(_mm256_srlv_epi64(b, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0F));
}

/* Block b of row r as 32 bytes: signed values (q8, q4_0) or unsigned 0..15 (q4_1). */
static inline __m256i load_block(int kind, const qmat *W, int64_t r, int64_t b) {
    if (kind == KIND_Q8) return _mm256_loadu_si256((const __m256i *)((const int8_t *)W->qs + r * W->k + b * QK));
    __m256i u = unpack_nibbles((const uint8_t *)W->qs + r * (W->k / 2) + b * 16);
    return kind == KIND_Q4_0 ? _mm256_sub_epi8(u, _mm256_set1_epi8(8)) : u;
}

/* The integer dot product of a weight block and an activation block, as 8 float partial sums. */
static inline __m256 block_dot(int kind, __m256i qw, const int8_t *xq) {
    const __m256i qx = _mm256_loadu_si256((const __m256i *)xq);
    __m256i p16 = kind == KIND_Q4_1 ? _mm256_maddubs_epi16(qw, qx)
                                    : _mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

/* Rows [r0, r1) of W against activation rows [t0, t0 + nt), nt <= NT. Called with constant kind and nt so
 * that each instance is specialized; the operations for one (row, activation row) pair never depend on nt:
 * blocks alternate between two accumulators (two FMA chains in flight), summed at the end. */
#define NT 4
static inline __attribute__((always_inline)) void rows_kernel(int kind, int nt, const qmat *W, int64_t r0,
                                                              int64_t r1, const acts *X, int64_t t0, float *y,
                                                              int64_t ldy, int add) {
    const int64_t k = W->k, nb = k / QK;
    for (int64_t r = r0; r < r1; r++) {
        float out[NT];
        if (kind == KIND_F32) {
            const float *w = (const float *)W->qs + r * k;
            for (int t = 0; t < nt; t++) out[t] = dot_f32(w, X->f + (t0 + t) * k, k);
        } else {
            const uint16_t *d = W->d + r * nb;
            __m256 a0[NT], a1[NT];
            for (int t = 0; t < nt; t++) a0[t] = a1[t] = _mm256_setzero_ps();
            int64_t b = 0;
            if (nt == 1) { /* the 8 scale products of 8 blocks in one multiply (the same products as below) */
                const float *xd = X->d + t0 * nb;
                const int8_t *xq = X->q + t0 * k;
                for (; b + 8 <= nb; b += 8) {
                    const __m256 sc = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + b))),
                                                    _mm256_loadu_ps(xd + b));
                    for (int j = 0; j < 8; j += 2) {
                        const __m256i w0 = load_block(kind, W, r, b + j), w1 = load_block(kind, W, r, b + j + 1);
                        a0[0] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(sc, _mm256_set1_epi32(j)),
                                                block_dot(kind, w0, xq + (b + j) * QK), a0[0]);
                        a1[0] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(sc, _mm256_set1_epi32(j + 1)),
                                                block_dot(kind, w1, xq + (b + j + 1) * QK), a1[0]);
                    }
                }
            }
            for (; b + 2 <= nb; b += 2) {
                const __m256i w0 = load_block(kind, W, r, b), w1 = load_block(kind, W, r, b + 1);
                const float d0 = _cvtsh_ss(d[b]), d1 = _cvtsh_ss(d[b + 1]);
                for (int t = 0; t < nt; t++) {
                    const int8_t *xq = X->q + (t0 + t) * k + b * QK;
                    const float *xd = X->d + (t0 + t) * nb + b;
                    a0[t] = _mm256_fmadd_ps(_mm256_set1_ps(d0 * xd[0]), block_dot(kind, w0, xq), a0[t]);
                    a1[t] = _mm256_fmadd_ps(_mm256_set1_ps(d1 * xd[1]), block_dot(kind, w1, xq + QK), a1[t]);
                }
            }
            if (b < nb) {
                const __m256i w0 = load_block(kind, W, r, b);
                const float d0 = _cvtsh_ss(d[b]);
                for (int t = 0; t < nt; t++)
                    a0[t] = _mm256_fmadd_ps(_mm256_set1_ps(d0 * X->d[(t0 + t) * nb + b]),
                                            block_dot(kind, w0, X->q + (t0 + t) * k + b * QK), a0[t]);
            }
            for (int t = 0; t < nt; t++) {
                out[t] = hsum8(_mm256_add_ps(a0[t], a1[t]));
                if (kind == KIND_Q4_1) out[t] += dot_f16_f32(W->m + r * nb, X->s + (t0 + t) * nb, nb);
            }
        }
        for (int t = 0; t < nt; t++) {
            float *o = y + (t0 + t) * ldy + r;
            *o = add ? *o + out[t] : out[t];
        }
    }
}

#define NT_CASES(kind)                                                                          \
    switch (nt) {                                                                               \
    case 1: rows_kernel(kind, 1, W, r0, r1, X, t0, y, ldy, add); break;                         \
    case 2: rows_kernel(kind, 2, W, r0, r1, X, t0, y, ldy, add); break;                         \
    case 3: rows_kernel(kind, 3, W, r0, r1, X, t0, y, ldy, add); break;                         \
    default: rows_kernel(kind, 4, W, r0, r1, X, t0, y, ldy, add); break;                        \
    }

static void rows_any(const qmat *W, int64_t r0, int64_t r1, const acts *X, int64_t t0, int nt, float *y,
                     int64_t ldy, int add) {
    switch (W->kind) {
    case KIND_Q8: NT_CASES(KIND_Q8) break;
    case KIND_Q4_0: NT_CASES(KIND_Q4_0) break;
    case KIND_Q4_1: NT_CASES(KIND_Q4_1) break;
    default: NT_CASES(KIND_F32) break;
    }
}

#define CHUNK 16 /* rows per work item */

void matmul_ws(const qmat *W, const acts *X, int64_t n, float *y, int64_t ldy, int add) {
    const int64_t chunks = (W->rows + CHUNK - 1) / CHUNK;
    #pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t r0 = c * CHUNK, r1 = r0 + CHUNK < W->rows ? r0 + CHUNK : W->rows;
        /* each group of NT activation rows reuses the chunk's weight blocks from L1 */
        for (int64_t t0 = 0; t0 < n; t0 += NT) rows_any(W, r0, r1, X, t0, (int)(n - t0 < NT ? n - t0 : NT), y, ldy, add);
    }
}

/* One call per decode matmul from Python: quantize x (n, k), then y (n, rows) = x . W^T.
 * kind: 0 = q8, 1 = q4_0, 2 = q4_1. */
void qlinear(int kind, const void *wq, const uint16_t *wd, const uint16_t *wm, int64_t rows, int64_t k,
             const float *x, int64_t n, float *y) {
    const int64_t nb = k / QK;
    void *heap = malloc((size_t)(n * k + 2 * n * nb * sizeof(float)));
    if (!heap) return;
    float *xd = (float *)heap, *xs = xd + n * nb;
    int8_t *xq = (int8_t *)(xs + n * nb);
    for (int64_t t = 0; t < n; t++) quantize_row(x + t * k, k, xq + t * k, xd + t * nb, xs + t * nb);
    const qmat W = {kind, wq, wd, wm, rows, k};
    const acts X = {x, xq, xd, xs, k};
    #pragma omp parallel if (rows * nb * n > 4096)
    matmul_ws(&W, &X, n, y, rows, 0);
    free(heap);
}

/* ------------------------------------------------------------------------ dequantize */
void dequant_row(const qmat *W, int64_t r, float *out) {
    const int64_t k = W->k, nb = k / QK;
    if (W->kind == KIND_F32) {
        memcpy(out, (const float *)W->qs + r * k, (size_t)k * sizeof(float));
        return;
    }
    for (int64_t b = 0; b < nb; b++) {
        const float d = _cvtsh_ss(W->d[r * nb + b]);
        float *o = out + b * QK;
        if (W->kind == KIND_Q8) {
            const int8_t *q = (const int8_t *)W->qs + r * k + b * QK;
            for (int j = 0; j < 4; j++)
                _mm256_storeu_ps(o + 8 * j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                                              _mm_loadl_epi64((const __m128i *)(q + 8 * j)))),
                                                          _mm256_set1_ps(d)));
        } else { /* q4_0: (n - 8) * d; q4_1: n * d + m */
            const uint8_t *q = (const uint8_t *)W->qs + r * (k / 2) + b * 16;
            const int q41 = W->kind == KIND_Q4_1, off = q41 ? 0 : 8;
            const float m = q41 ? _cvtsh_ss(W->m[r * nb + b]) : 0.0f;
            for (int j = 0; j < 16; j++) {
                o[j] = (float)((q[j] & 0x0F) - off) * d;
                o[j + 16] = (float)((q[j] >> 4) - off) * d;
                if (q41) o[j] += m, o[j + 16] += m;
            }
        }
    }
}

/* To float (rows, k), for the prefill GEMM path. */
static void dequant(const qmat *W, float *out) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < W->rows; r++) dequant_row(W, r, out + r * W->k);
}

void dequant_q8(const int8_t *wq, const uint16_t *wd, int64_t rows, int64_t k, float *out) {
    const qmat W = {KIND_Q8, wq, wd, NULL, rows, k};
    dequant(&W, out);
}

void dequant_q4(const uint8_t *wq, const uint16_t *wd, const uint16_t *wm, int64_t rows, int64_t k, float *out) {
    const qmat W = {wm ? KIND_Q4_1 : KIND_Q4_0, wq, wd, wm, rows, k};
    dequant(&W, out);
}

/* ------------------------------------------------------------------------- SwiGLU */
void silu_mul(const float *g, const float *u, int64_t n, float *out) {
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}
