/* Quantized matrix-vector kernels for batch-1 decode on x86-64 CPUs (AVX2 + FMA).
 *
 * Weights stay in 32-element blocks (GGUF's Q8_0, Q4_0, Q4_1, repacked so scales are float32);
 * activations are quantized to int8 blocks of 32 (as llama.cpp's Q8_0/Q8_1) and every block
 * product is an integer dot product:  sum_i w_i x_i = d_w d_x sum_i q_w,i q_x,i  (+ m_w sum_i x_i
 * for Q4_1's offset). AVX2 has no signed*signed byte multiply, so (as llama.cpp does) we multiply
 * |q_w| (unsigned) by q_x carrying q_w's sign: _mm256_maddubs_epi16(sign(q_w,q_w), sign(q_x,q_w)).
 *
 * Layouts (row-major, k a multiple of 32, nb = k / 32):
 *   q8:   qs int8 [rows][k],          d float [rows][nb]            w = q * d
 *   q4_0: qs uint8 [rows][k/2],       d float [rows][nb]            w = (nibble - 8) * d
 *   q4_1: qs uint8 [rows][k/2],       d, m float [rows][nb]         w = nibble * d + m
 *   nibbles of a block: byte j holds element j (low 4 bits) and element j+16 (high 4 bits).
 * Rounding is round-half-to-even everywhere, matching torch.round in the Python fallback.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define QK 32

static inline float hsum8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* x (n, k) float -> q (n, k) int8, d (n, nb) scale, s (n, nb) = d * sum(q) */
void quantize_act(const float *x, int64_t n, int64_t k, int8_t *q, float *d, float *s) {
    const int64_t nb = k / QK;
    #pragma omp parallel for schedule(static) if (n * nb > 256)
    for (int64_t r = 0; r < n * nb; r++) {
        const float *xb = x + r * QK;
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
        const float inv = m > 0.0f ? 127.0f / m : 0.0f;
        const __m256 vinv = _mm256_set1_ps(inv);
        __m256i i32[4];
        for (int j = 0; j < 4; j++)
            i32[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], vinv),
                                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_hadd_epi32(s4, s4);
        s4 = _mm_hadd_epi32(s4, s4);
        /* pack 32 int32 -> 32 int8, restoring element order after the lane-wise packs */
        __m256i p16a = _mm256_packs_epi32(i32[0], i32[1]);
        __m256i p16b = _mm256_packs_epi32(i32[2], i32[3]);
        __m256i p8 = _mm256_packs_epi16(p16a, p16b);
        p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + r * QK), p8);
        d[r] = scale;
        s[r] = scale * (float)_mm_cvtsi128_si32(s4);
    }
}

static inline __m256 dot_q8_block(__m256i qw, __m256i qx) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
}

static inline __m256i unpack_nibbles(const uint8_t *p) {
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    const __m128i low = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
    return _mm256_set_m128i(hi, lo); /* elements 0..15 then 16..31 */
}

#define ROWS_PARALLEL _Pragma("omp parallel for schedule(static) if (rows * nb * n > 4096)")

/* Each weight block is loaded (and unpacked) once and multiplied with up to NT activation rows,
 * so a batch of decode steps costs one pass over the weights. */
#define NT 8

/* q8 and q4_0: symmetric blocks, w = q * d; only how a block's 32 values are loaded differs. */
static inline void gemm_sym(int q4, const void *wq, const float *wd, int64_t rows, int64_t k,
                            const int8_t *xq, const float *xd, int64_t n, float *y) {
    const int64_t nb = k / QK;
    const __m256i eight = _mm256_set1_epi8(8);
    ROWS_PARALLEL
    for (int64_t r = 0; r < rows; r++) {
        const float *d = wd + r * nb;
        for (int64_t t0 = 0; t0 < n; t0 += NT) {
            const int64_t nt = n - t0 < NT ? n - t0 : NT;
            __m256 acc[NT];
            for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                __m256i qw = q4 ? _mm256_sub_epi8(unpack_nibbles((const uint8_t *)wq + r * (k / 2) + b * 16), eight)
                                : _mm256_loadu_si256((const __m256i *)((const int8_t *)wq + r * k + b * QK));
                for (int t = 0; t < nt; t++) {
                    __m256i qx = _mm256_loadu_si256((const __m256i *)(xq + (t0 + t) * k + b * QK));
                    acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d[b] * xd[(t0 + t) * nb + b]), dot_q8_block(qw, qx),
                                             acc[t]);
                }
            }
            for (int t = 0; t < nt; t++) y[(t0 + t) * rows + r] = hsum8(acc[t]);
        }
    }
}

void gemm_q8(const int8_t *wq, const float *wd, int64_t rows, int64_t k,
             const int8_t *xq, const float *xd, int64_t n, float *y) {
    gemm_sym(0, wq, wd, rows, k, xq, xd, n, y);
}

void gemm_q4_0(const uint8_t *wq, const float *wd, int64_t rows, int64_t k,
               const int8_t *xq, const float *xd, int64_t n, float *y) {
    gemm_sym(1, wq, wd, rows, k, xq, xd, n, y);
}

void gemm_q4_1(const uint8_t *wq, const float *wd, const float *wm, int64_t rows, int64_t k,
               const int8_t *xq, const float *xd, const float *xs, int64_t n, float *y) {
    const int64_t nb = k / QK;
    const __m256i ones = _mm256_set1_epi16(1);
    ROWS_PARALLEL
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *w = wq + r * (k / 2);
        const float *d = wd + r * nb, *m = wm + r * nb;
        for (int64_t t0 = 0; t0 < n; t0 += NT) {
            const int64_t nt = n - t0 < NT ? n - t0 : NT;
            __m256 acc[NT];
            float offset[NT];
            for (int t = 0; t < nt; t++) {
                acc[t] = _mm256_setzero_ps();
                offset[t] = 0.0f;
            }
            for (int64_t b = 0; b < nb; b++) {
                __m256i qw = unpack_nibbles(w + b * 16); /* unsigned 0..15 */
                for (int t = 0; t < nt; t++) {
                    const int64_t row = (t0 + t) * nb + b;
                    __m256i qx = _mm256_loadu_si256((const __m256i *)(xq + (t0 + t) * k + b * QK));
                    __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(qw, qx), ones));
                    acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d[b] * xd[row]), dot, acc[t]);
                    offset[t] += m[b] * xs[row];
                }
            }
            for (int t = 0; t < nt; t++) y[(t0 + t) * rows + r] = hsum8(acc[t]) + offset[t];
        }
    }
}

/* Dequantize to float (rows, k), for the prefill GEMM path. */
void dequant_q8(const int8_t *wq, const float *wd, int64_t rows, int64_t k, float *out) {
    const int64_t nb = k / QK;
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < rows * nb; i++) {
        const __m256 d = _mm256_set1_ps(wd[i]);
        for (int j = 0; j < 4; j++) {
            __m128i b8 = _mm_loadl_epi64((const __m128i *)(wq + i * QK + 8 * j));
            _mm256_storeu_ps(out + i * QK + 8 * j, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b8))));
        }
    }
}

void dequant_q4(const uint8_t *wq, const float *wd, const float *wm, int64_t rows, int64_t k, float *out) {
    /* wm == 0: Q4_0 ((n - 8) * d); else Q4_1 (n * d + m) */
    const int64_t nb = k / QK;
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < rows * nb; i++) {
        const float d = wd[i], m = wm ? wm[i] : -8.0f * d;
        const uint8_t *p = wq + i * 16;
        float *o = out + i * QK;
        for (int j = 0; j < 16; j++) {
            o[j] = (float)(p[j] & 0x0F) * d + m;
            o[j + 16] = (float)(p[j] >> 4) * d + m;
        }
    }
}

/* One call per decode matmul: quantize x (n, k) then multiply. kind: 0 = q8, 1 = q4_0, 2 = q4_1. */
void qlinear(int kind, const void *wq, const float *wd, const float *wm, int64_t rows, int64_t k,
             const float *x, int64_t n, float *y) {
    const int64_t nb = k / QK;
    int8_t stack_q[8 * 8192];
    float stack_f[2 * 8 * 256];
    int8_t *xq = stack_q;
    float *xd = stack_f, *xs = stack_f + n * nb;
    void *heap = NULL;
    if (n * k > (int64_t)sizeof(stack_q) || 2 * n * nb > (int64_t)(sizeof(stack_f) / sizeof(float))) {
        heap = malloc((size_t)(n * k + 2 * n * nb * sizeof(float)));
        if (!heap) return;
        xd = (float *)heap;
        xs = xd + n * nb;
        xq = (int8_t *)(xs + n * nb);
    }
    quantize_act(x, n, k, xq, xd, xs);
    if (kind == 0) gemm_q8((const int8_t *)wq, wd, rows, k, xq, xd, n, y);
    else if (kind == 1) gemm_q4_0((const uint8_t *)wq, wd, rows, k, xq, xd, n, y);
    else gemm_q4_1((const uint8_t *)wq, wd, wm, rows, k, xq, xd, xs, n, y);
    free(heap);
}

/* Attention for one new token per row, each row over its own number of cached keys.
 * q: (B, H, D); the layer's cache k, v: (rows, KVH, S, D); lens: keys per row; out: (B, H, D).
 * Every (row, head) is computed the same way whatever the batch, so batched decoding gives
 * each sequence exactly what it gets alone. Query head h reads KV head h / (H / KVH). */
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum8(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

void attn_decode(const float *q, const float *k, const float *v, int64_t B, int64_t H, int64_t KVH, int64_t D,
                 int64_t S, const int64_t *lens, float scale, float *out) {
    const int64_t rep = H / KVH;
    #pragma omp parallel for schedule(static) if (B * H > 1)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H, n = lens[b];
        const float *qv = q + bh * D;
        const float *kb = k + (b * KVH + h / rep) * S * D;
        const float *vb = v + (b * KVH + h / rep) * S * D;
        float *o = out + bh * D;
        float stack[4096];
        float *p = n <= 4096 ? stack : (float *)malloc((size_t)n * sizeof(float));
        float m = -INFINITY, sum = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            p[j] = dot_f32(qv, kb + j * D, D) * scale;
            if (p[j] > m) m = p[j];
        }
        for (int64_t j = 0; j < n; j++) {
            p[j] = expf(p[j] - m);
            sum += p[j];
        }
        for (int64_t i = 0; i < D; i++) o[i] = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            const float w = p[j] / sum;
            const float *vj = vb + j * D;
            int64_t i = 0;
            for (; i + 8 <= D; i += 8)
                _mm256_storeu_ps(o + i, _mm256_fmadd_ps(_mm256_set1_ps(w), _mm256_loadu_ps(vj + i),
                                                        _mm256_loadu_ps(o + i)));
            for (; i < D; i++) o[i] += w * vj[i];
        }
        if (p != stack) free(p);
    }
}
