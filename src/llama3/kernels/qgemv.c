/* Attention and SiLU for the decode step on x86-64 CPUs (AVX2 + FMA); the block kernels are in quants.c. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "qgemv.h"

/* ------------------------------------------------------------------------- attention */
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

/* The 8 sums of a[0..7]'s lanes, as one vector. */
static inline __m256 hsum8x8(const __m256 *a) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* Scores of one query against n <= ATT_CHUNK keys, then that chunk's softmax statistics:
 * ml = (max score m, sum of exp(s - m)), acc = sum_j exp(s_j - m) v_j. Constant D keeps acc in registers. */
static inline __attribute__((always_inline)) void attend_chunk_d(const float *q, const float *k, const float *v,
                                                                 int64_t n, int64_t D, float scale, float *ml,
                                                                 float *acc) {
    float s[ATT_CHUNK];
    int64_t j = 0;
    if (D % 8 == 0) {
        for (; j + 8 <= n; j += 8) {
            __m256 a[8];
            for (int t = 0; t < 8; t++) a[t] = _mm256_setzero_ps();
            for (int64_t i = 0; i < D; i += 8) {
                const __m256 qv = _mm256_loadu_ps(q + i);
                for (int t = 0; t < 8; t++) a[t] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + (j + t) * D + i), a[t]);
            }
            _mm256_storeu_ps(s + j, _mm256_mul_ps(hsum8x8(a), _mm256_set1_ps(scale)));
        }
    }
    for (; j < n; j++) s[j] = dot_f32(q, k + j * D, D) * scale;
    float m = -INFINITY;
    for (j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
    __m256 lv = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(m)));
        _mm256_storeu_ps(s + j, e);
        lv = _mm256_add_ps(lv, e);
    }
    float l = hsum8(lv);
    for (; j < n; j++) l += (s[j] = expf(s[j] - m));
    ml[0] = m, ml[1] = l;
    if (D % 8 == 0 && D <= 128) {
        __m256 o[16];
        for (int64_t i = 0; i < D / 8; i++) o[i] = _mm256_setzero_ps();
        for (j = 0; j < n; j++) {
            const __m256 w = _mm256_set1_ps(s[j]);
            for (int64_t i = 0; i < D / 8; i++) o[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + j * D + 8 * i), o[i]);
        }
        for (int64_t i = 0; i < D / 8; i++) _mm256_storeu_ps(acc + 8 * i, o[i]);
    } else {
        for (int64_t i = 0; i < D; i++) acc[i] = 0.0f;
        for (j = 0; j < n; j++)
            for (int64_t i = 0; i < D; i++) acc[i] += s[j] * v[j * D + i];
    }
}

void attend_chunk(const float *q, const float *k, const float *v, int64_t n, int64_t D, float scale, float *ml,
                  float *acc) {
    if (D == 64) attend_chunk_d(q, k, v, n, 64, scale, ml, acc);
    else if (D == 128) attend_chunk_d(q, k, v, n, 128, scale, ml, acc);
    else attend_chunk_d(q, k, v, n, D, scale, ml, acc);
}

/* Join the chunks of one query: out = sum_c acc_c exp(m_c - M) / sum_c l_c exp(m_c - M). */
void attend_merge(const float *part, int64_t nch, int64_t D, float *out) {
    const int64_t stride = D + 2;
    float M = -INFINITY, L = 0.0f;
    for (int64_t c = 0; c < nch; c++) M = part[c * stride] > M ? part[c * stride] : M;
    for (int64_t i = 0; i < D; i++) out[i] = 0.0f;
    for (int64_t c = 0; c < nch; c++) {
        const float *p = part + c * stride, w = expf(p[0] - M);
        L += p[1] * w;
        for (int64_t i = 0; i < D; i++) out[i] += w * p[2 + i];
    }
    const float inv = 1.0f / L;
    for (int64_t i = 0; i < D; i++) out[i] *= inv;
}

/* Decode attention for B rows of H query heads, row b over its first lens[b] keys. q: (B, H, D); out (B, H, D);
 * the key/value of (row b, KV head g, position j) is at k/v + kv_row[b] * row_stride + (g * S + j) * D.
 * Keys are cut into chunks of ATT_CHUNK (so long contexts spread over the threads, as flash decoding does);
 * part holds B * H * ceil(max len / ATT_CHUNK) * (D + 2) floats. A worksharing construct, like matmul_ws.
 * How a (row, head) is computed depends only on its own length: batches give what each row gets alone. */
void attention_ws(const float *q, const float *k, const float *v, int64_t B, int64_t H, int64_t KVH, int64_t D,
                  int64_t S, int64_t row_stride, const int64_t *kv_row, const int64_t *lens, float scale,
                  float *part, int64_t max_chunks, float *out) {
    const int64_t rep = H / KVH, stride = D + 2;
    /* items ordered (row, KV head, chunk, query head of the group): the rep queries that share a KV head
     * read each chunk of keys and values one after another, while it is in the core's cache */
    #pragma omp for schedule(static)
    for (int64_t it = 0; it < B * H * max_chunks; it++) {
        const int64_t r = it % rep, c = (it / rep) % max_chunks, g = (it / rep / max_chunks) % KVH;
        const int64_t b = it / (rep * max_chunks * KVH), h = g * rep + r, bh = b * H + h, j0 = c * ATT_CHUNK;
        const int64_t i = bh * max_chunks + c; /* where this (query, chunk) keeps its partial result */
        if (j0 >= lens[b]) continue;
        const int64_t n = lens[b] - j0 < ATT_CHUNK ? lens[b] - j0 : ATT_CHUNK;
        const int64_t at = (kv_row ? kv_row[b] : b) * row_stride + ((h / rep) * S + j0) * D;
        attend_chunk(q + bh * D, k + at, v + at, n, D, scale, part + i * stride, part + i * stride + 2);
    }
    #pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++)
        attend_merge(part + bh * max_chunks * stride, (lens[bh / H] + ATT_CHUNK - 1) / ATT_CHUNK, D, out + bh * D);
}

/* The same from Python (Attention.forward's decode path): q (B, H, D); the layer's cache k, v: (rows, KVH, S, D),
 * row b attending to its first lens[b] keys. */
void attn_decode(const float *q, const float *k, const float *v, int64_t B, int64_t H, int64_t KVH, int64_t D,
                 int64_t S, const int64_t *lens, float scale, float *out) {
    int64_t longest = 0;
    for (int64_t b = 0; b < B; b++) longest = lens[b] > longest ? lens[b] : longest;
    const int64_t max_chunks = (longest + ATT_CHUNK - 1) / ATT_CHUNK;
    float *part = malloc((size_t)(B * H * max_chunks * (D + 2)) * sizeof(float));
    if (!part) return;
    #pragma omp parallel if (B * H * max_chunks > 1)
    attention_ws(q, k, v, B, H, KVH, D, S, KVH * S * D, NULL, lens, scale, part, max_chunks, out);
    free(part);
}
