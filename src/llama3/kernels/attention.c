/* Decode attention over the paged KV cache (llama3/engine/cache.py): one new query per sequence.
 *
 * The pool is (n_blocks, n_layers, 2, n_kv_heads, block_size, head_dim) in float32, float16 or bfloat16;
 * sequence b's key/value at position j is in block table[b][j / block_size], slot j % block_size.
 * Keys are cut into chunks of ATT_CHUNK (as flash decoding does, so a long context spreads over the
 * threads); each (query head, chunk) keeps its softmax statistics and weighted sum of values, and the
 * chunks of a query are merged at the end. How a (sequence, head) is computed depends only on its own
 * length: a batch gives each sequence what it gets alone, at any thread count.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"

/* 8 cache elements as floats. */
static inline __m256 load8(const void *p, int64_t i, int dtype) {
    if (dtype == KV_F32) return _mm256_loadu_ps((const float *)p + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    if (dtype == KV_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); /* bf16: the high half */
}

static inline float load1(const void *p, int64_t i, int dtype) {
    if (dtype == KV_F32) return ((const float *)p)[i];
    const uint16_t h = ((const uint16_t *)p)[i];
    if (dtype == KV_F16) return _cvtsh_ss(h);
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* float -> bfloat16, round to nearest even (NaN kept a NaN), as torch's conversion. */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

void kv_store(void *dst, const float *src, int64_t n, int dtype) {
    if (dtype == KV_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
    } else if (dtype == KV_F16) {
        uint16_t *d = (uint16_t *)dst;
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
        for (; i < n; i++) d[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
    } else {
        uint16_t *d = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++) d[i] = to_bf16(src[i]);
    }
}

/* The 8 sums of a[0..7]'s lanes, as one vector. */
static inline __m256 hsum8x8(const __m256 *a) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

static inline float dot_kv(const float *q, const void *k, int64_t D, int dtype) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k, i, dtype), acc);
    float s = hsum8(acc);
    for (; i < D; i++) s += q[i] * load1(k, i, dtype);
    return s;
}

/* One query against keys [j0, j0 + n) of one sequence and KV head: ml = (max score m, sum exp(s - m)),
 * acc = sum_j exp(s_j - m) v_j. ``kv_at(j)`` is the cache element offset of position j's key; its value sits
 * ``vdelta`` elements further. Constant D and dtype specialize the loops. */
static inline __attribute__((always_inline)) void attend_chunk_t(
        const float *q, const void *pool, const int64_t *table, int64_t bs, int64_t block_elems, int64_t head_off,
        int64_t vdelta, int64_t j0, int64_t n, int64_t D, int dtype, float scale, float *ml, float *acc) {
    const int esz = dtype == KV_F32 ? 4 : 2;
    const char *base = (const char *)pool;
#define KPTR(j) (base + (size_t)((table[(j) / bs] * block_elems + head_off + ((j) % bs) * D)) * esz)
    float s[ATT_CHUNK];
    int64_t t = 0;
    if (D % 8 == 0) {
        for (; t + 8 <= n; t += 8) {
            __m256 a[8];
            const char *kp[8];
            for (int u = 0; u < 8; u++) a[u] = _mm256_setzero_ps(), kp[u] = KPTR(j0 + t + u);
            for (int64_t i = 0; i < D; i += 8) {
                const __m256 qv = _mm256_loadu_ps(q + i);
                for (int u = 0; u < 8; u++) a[u] = _mm256_fmadd_ps(qv, load8(kp[u], i, dtype), a[u]);
            }
            _mm256_storeu_ps(s + t, _mm256_mul_ps(hsum8x8(a), _mm256_set1_ps(scale)));
        }
    }
    for (; t < n; t++) s[t] = dot_kv(q, KPTR(j0 + t), D, dtype) * scale;
    float m = -INFINITY;
    for (t = 0; t < n; t++) m = s[t] > m ? s[t] : m;
    __m256 lv = _mm256_setzero_ps();
    for (t = 0; t + 8 <= n; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), _mm256_set1_ps(m)));
        _mm256_storeu_ps(s + t, e);
        lv = _mm256_add_ps(lv, e);
    }
    float l = hsum8(lv);
    for (; t < n; t++) l += (s[t] = expf(s[t] - m));
    ml[0] = m, ml[1] = l;
    if (D % 8 == 0 && D <= 256) {
        __m256 o[32];
        for (int64_t i = 0; i < D / 8; i++) o[i] = _mm256_setzero_ps();
        for (t = 0; t < n; t++) {
            const __m256 w = _mm256_set1_ps(s[t]);
            const char *vp = KPTR(j0 + t) + (size_t)vdelta * esz;
            for (int64_t i = 0; i < D / 8; i++) o[i] = _mm256_fmadd_ps(w, load8(vp, 8 * i, dtype), o[i]);
        }
        for (int64_t i = 0; i < D / 8; i++) _mm256_storeu_ps(acc + 8 * i, o[i]);
    } else {
        for (int64_t i = 0; i < D; i++) acc[i] = 0.0f;
        for (t = 0; t < n; t++) {
            const char *vp = KPTR(j0 + t) + (size_t)vdelta * esz;
            for (int64_t i = 0; i < D; i++) acc[i] += s[t] * load1(vp, i, dtype);
        }
    }
#undef KPTR
}

#define ATTEND(D_, T_) attend_chunk_t(q, C->pool, table, bs, block_elems, head_off, vdelta, j0, n, D_, T_, scale, ml, acc)

static void attend_chunk(const kv_cache *C, const float *q, const int64_t *table, int64_t block_elems,
                         int64_t head_off, int64_t vdelta, int64_t j0, int64_t n, int64_t D, float scale, float *ml,
                         float *acc) {
    const int64_t bs = C->block_size;
    switch (C->dtype) {
    case KV_F16:
        if (D == 64) ATTEND(64, KV_F16); else if (D == 128) ATTEND(128, KV_F16); else ATTEND(D, KV_F16);
        break;
    case KV_BF16:
        if (D == 64) ATTEND(64, KV_BF16); else if (D == 128) ATTEND(128, KV_BF16); else ATTEND(D, KV_BF16);
        break;
    default:
        if (D == 64) ATTEND(64, KV_F32); else if (D == 128) ATTEND(128, KV_F32); else ATTEND(D, KV_F32);
    }
}

/* Join the chunks of one query: out = sum_c acc_c exp(m_c - M) / sum_c l_c exp(m_c - M). */
static void attend_merge(const float *part, int64_t nch, int64_t D, float *out) {
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

void paged_attention_ws(const kv_cache *C, int64_t layer, const float *q, int64_t B, int64_t H, int64_t KVH,
                        int64_t D, const int64_t *tables, int64_t width, const int64_t *lens, float scale, float *part,
                        int64_t max_chunks, float *out) {
    const int64_t rep = H / KVH, stride = D + 2, bs = C->block_size;
    const int64_t block_elems = C->n_layers * 2 * KVH * bs * D, vdelta = KVH * bs * D;
    /* items ordered (sequence, KV head, chunk, query head of the group): the rep queries sharing a KV head
     * read each chunk of keys and values one after another, while it is in the core's cache */
    #pragma omp for schedule(static)
    for (int64_t it = 0; it < B * H * max_chunks; it++) {
        const int64_t r = it % rep, c = (it / rep) % max_chunks, g = (it / rep / max_chunks) % KVH;
        const int64_t b = it / (rep * max_chunks * KVH), h = g * rep + r, bh = b * H + h, j0 = c * ATT_CHUNK;
        if (j0 >= lens[b]) continue;
        const int64_t n = lens[b] - j0 < ATT_CHUNK ? lens[b] - j0 : ATT_CHUNK;
        const int64_t head_off = (layer * 2 * KVH + g) * bs * D; /* keys of KV head g within a block */
        float *p = part + (bh * max_chunks + c) * stride;
        attend_chunk(C, q + bh * D, tables + b * width, block_elems, head_off, vdelta, j0, n, D, scale, p, p + 2);
    }
    #pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++)
        attend_merge(part + bh * max_chunks * stride, (lens[bh / H] + ATT_CHUNK - 1) / ATT_CHUNK, D, out + bh * D);
}

/* The same from Python, for tests and tinkerers: q, out (B, H, D); tables (B, width). */
int paged_attention(const kv_cache *C, int64_t layer, const float *q, int64_t B, int64_t H, int64_t KVH, int64_t D,
                    const int64_t *tables, int64_t width, const int64_t *lens, float scale, float *out,
                    int64_t nthreads) {
    int64_t longest = 1;
    for (int64_t b = 0; b < B; b++) longest = lens[b] > longest ? lens[b] : longest;
    const int64_t max_chunks = (longest + ATT_CHUNK - 1) / ATT_CHUNK;
    float *part = malloc((size_t)(B * H * max_chunks * (D + 2)) * sizeof(float));
    if (!part) return -1;
    #pragma omp parallel num_threads((int)nthreads)
    paged_attention_ws(C, layer, q, B, H, KVH, D, tables, width, lens, scale, part, max_chunks, out);
    free(part);
    return 0;
}
