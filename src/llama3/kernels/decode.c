/* The whole decode step in one call: one new token per row through every layer, the same math as
 * llama3/model.py's Transformer.forward with a KV cache (and the quantized linears of qgemv.c),
 * without ~1,000 PyTorch dispatches per token. llama3/engine/cdecoder.py builds the structs and checks
 * which models qualify; tests/test_decoders.py holds it against the PyTorch path.
 *
 * Per layer, for each row b at position pos[b]:
 *   xn = rmsnorm(x) * attn_norm          -> int8 blocks
 *   q, k, v = wqkv . xn                   (one matrix, or wq/wk/wv)
 *   q, k = rope(q, k, pos); cache[pos] = k, v
 *   a = softmax(q . K^T / sqrt(D)) . V    over the row's pos + 1 keys (query head h uses KV head h / rep)
 *   x += wo . a
 *   xn = rmsnorm(x) * ffn_norm
 *   g, u = w13 . xn;  x += w2 . (silu(g) * u)
 * then logits = output . (rmsnorm(x) * norm).
 *
 * The keys and values live in the paged cache of llama3/engine/cache.py (attention.c reads it through each
 * sequence's block table). One OpenMP parallel region per step; every matrix is split by rows between the
 * threads, and the small per-row work between matrices is split by rows or heads. */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"

typedef struct {
    const float *attn_norm, *ffn_norm;
    qmat qkv[3];
    int64_t n_qkv; /* 1 (fused wqkv) or 3 (wq, wk, wv); outputs side by side: q | k | v */
    qmat w13[2];
    int64_t n_w13; /* 1 (fused w13) or 2 (w1, w3); outputs: gate | up */
    qmat wo, w2;
} layer_w;

typedef struct {
    int64_t dim, n_layers, n_heads, n_kv_heads, head_dim, hidden, vocab;
    double eps, attn_scale;
    const float *rope_freqs;          /* (head_dim / 2): each pair's rotation per position (model.rope_frequencies) */
    qmat embed;                       /* (vocab, dim): a looked-up row is dequantized */
    const float *norm;
    qmat output;
    const layer_w *layers;
} model_w;

static void rmsnorm(const float *x, const float *w, int64_t n, double eps, float *out) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = hsum8(acc);
    for (; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + (float)eps);
    for (i = 0; i < n; i++) out[i] = (x[i] * r) * w[i];
}

/* cos and sin of position p's angles laid out like the pairs: cos = [c0, c0, c1, ...], sin = [-s0, s0, ...]
 * (model.rope_angles). */
static void rope_angles(const float *freqs, int64_t p, int64_t D, float *cos_out, float *sin_out) {
    for (int64_t i = 0; i < D / 2; i++) {
        const float a = (float)p * freqs[i], c = cosf(a), s = sinf(a);
        cos_out[2 * i] = cos_out[2 * i + 1] = c;
        sin_out[2 * i] = -s, sin_out[2 * i + 1] = s;
    }
}

/* Rotate each adjacent pair of a head: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin); sin holds [-s, s]. */
static void rope(float *x, const float *cos, const float *sin, int64_t D) {
    for (int64_t i = 0; i < D; i += 2) {
        const float x0 = x[i], x1 = x[i + 1];
        x[i] = x0 * cos[i] + x1 * sin[i];
        x[i + 1] = x1 * cos[i + 1] + x0 * sin[i + 1];
    }
}

/* Several matrices applied to the same activations, outputs side by side in rows of ldy. */
static void matmul_list(const qmat *W, int64_t n_w, const acts *X, int64_t n, float *y, int64_t ldy) {
    int64_t off = 0;
    for (int64_t i = 0; i < n_w; i++) {
        matmul_ws(&W[i], X, n, y + off, ldy, 0);
        off += W[i].rows;
    }
}

/* tokens (B), pos (B): the new token of each sequence and its position; tables (B, width): each sequence's
 * block table in the paged cache; logits (B, vocab). 0 on success, -1 when out of memory. */
int decode_step(const model_w *M, const kv_cache *C, int64_t B, const int64_t *tokens, const int64_t *pos,
                const int64_t *tables, int64_t width, float *logits, int64_t nthreads) {
    const int64_t dim = M->dim, H = M->n_heads, KVH = M->n_kv_heads, D = M->head_dim, hidden = M->hidden;
    const int64_t nqkv = (H + 2 * KVH) * D, nbh_ceil = (hidden + QK - 1) / QK, bs = C->block_size;
    const int64_t block_elems = C->n_layers * 2 * KVH * bs * D, esz = C->dtype == KV_F32 ? 4 : 2;
    int64_t maxk = dim > hidden ? dim : hidden;
    if (H * D > maxk) maxk = H * D;
    const size_t floats = (size_t)(B * (dim + maxk + 2 * (maxk / QK) + nqkv + 2 * hidden + 2 * D));
    int64_t longest = 0;
    for (int64_t b = 0; b < B; b++) longest = pos[b] + 1 > longest ? pos[b] + 1 : longest;
    const int64_t max_chunks = (longest + ATT_CHUNK - 1) / ATT_CHUNK;
    float *x = malloc(floats * sizeof(float) + (size_t)(B * maxk));
    float *part = malloc((size_t)(B * H * max_chunks * (D + 2) + B * H * D + nqkv * B) * sizeof(float));
    int64_t *lens = malloc((size_t)B * sizeof(int64_t));
    if (!x || !part || !lens) {
        free(x), free(part), free(lens);
        return -1;
    }
    for (int64_t b = 0; b < B; b++) lens[b] = pos[b] + 1;
    float *att = part + B * H * max_chunks * (D + 2), *qkv_q = att + B * H * D; /* queries, (B, H, D) */
    float *xf = x + B * dim, *xd = xf + B * maxk, *xs = xd + B * (maxk / QK), *qkv = xs + B * (maxk / QK);
    float *h13 = qkv + B * nqkv, *rcos = h13 + B * 2 * hidden, *rsin = rcos + B * D;
    int8_t *xq = (int8_t *)(rsin + B * D);
    /* activations of length k live in xf/xq/xd/xs with row stride k */
    const acts Xdim = {xf, xq, xd, xs, dim}, Xatt = {att, xq, xd, xs, H * D}, Xhid = {xf, xq, xd, xs, hidden};

    #pragma omp parallel num_threads((int)nthreads)
    {
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            dequant_row(&M->embed, tokens[b], x + b * dim);
            rope_angles(M->rope_freqs, pos[b], D, rcos + b * D, rsin + b * D);
        }

        for (int64_t l = 0; l < M->n_layers; l++) {
            const layer_w *L = &M->layers[l];

            #pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++) {
                rmsnorm(x + b * dim, L->attn_norm, dim, M->eps, xf + b * dim);
                quantize_row(xf + b * dim, dim, xq + b * dim, xd + b * (dim / QK), xs + b * (dim / QK));
            }
            matmul_list(L->qkv, L->n_qkv, &Xdim, B, qkv, nqkv);

            #pragma omp for schedule(static)
            for (int64_t i = 0; i < B * (H + KVH); i++) { /* rope every q and k head; k and v into the cache */
                const int64_t b = i / (H + KVH), h = i % (H + KVH);
                float *head = qkv + b * nqkv + h * D;
                rope(head, rcos + b * D, rsin + b * D, D);
                if (h < H) {
                    memcpy(qkv_q + (b * H + h) * D, head, (size_t)D * sizeof(float));
                } else { /* position pos[b]: block tables[b][pos / bs], slot pos % bs; the value KVH heads later */
                    const int64_t block = tables[b * width + pos[b] / bs];
                    const int64_t at = block * block_elems + ((l * 2 * KVH + (h - H)) * bs + pos[b] % bs) * D;
                    kv_store((char *)C->pool + at * esz, head, D, (int)C->dtype);
                    kv_store((char *)C->pool + (at + KVH * bs * D) * esz, head + KVH * D, D, (int)C->dtype);
                }
            }
            paged_attention_ws(C, l, qkv_q, B, H, KVH, D, tables, width, lens, (float)M->attn_scale, part, max_chunks,
                               att);
            #pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++)
                quantize_row(att + b * H * D, H * D, xq + b * H * D, xd + b * (H * D / QK), xs + b * (H * D / QK));
            matmul_ws(&L->wo, &Xatt, B, x, dim, 1);

            #pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++) {
                rmsnorm(x + b * dim, L->ffn_norm, dim, M->eps, xf + b * dim);
                quantize_row(xf + b * dim, dim, xq + b * dim, xd + b * (dim / QK), xs + b * (dim / QK));
            }
            matmul_list(L->w13, L->n_w13, &Xdim, B, h13, 2 * hidden);

            #pragma omp for schedule(static)
            for (int64_t i = 0; i < B * nbh_ceil; i++) { /* silu(gate) * up, block by block */
                const int64_t b = i / nbh_ceil, blk = i % nbh_ceil, j0 = blk * QK;
                const float *g = h13 + b * 2 * hidden + j0, *u = g + hidden;
                float *a = xf + b * hidden + j0;
                silu_mul(g, u, hidden - j0 < QK ? hidden - j0 : QK, a);
                if (blk < hidden / QK) /* (a partial last block only happens with float matrices) */
                    quantize_row(a, QK, xq + b * hidden + j0, xd + b * (hidden / QK) + blk, xs + b * (hidden / QK) + blk);
            }
            matmul_ws(&L->w2, &Xhid, B, x, dim, 1);
        }

        #pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            rmsnorm(x + b * dim, M->norm, dim, M->eps, xf + b * dim);
            quantize_row(xf + b * dim, dim, xq + b * dim, xd + b * (dim / QK), xs + b * (dim / QK));
        }
        matmul_ws(&M->output, &Xdim, B, logits, M->vocab, 0);
    }
    free(x), free(part), free(lens);
    return 0;
}

/* Sizes and field offsets of the structs that llama3/kernels/structs.py mirrors with ctypes, checked before the
 * step is used: (sizeof, offsets of every field in declaration order) per struct in a fixed order, then the
 * cache dtype enum's values. */
int64_t decode_struct_layout(int64_t *out, int64_t cap) {
    const int64_t v[] = {
        sizeof(qmat), offsetof(qmat, kind), offsetof(qmat, qs), offsetof(qmat, d), offsetof(qmat, m),
        offsetof(qmat, rows), offsetof(qmat, k),
        sizeof(layer_w), offsetof(layer_w, attn_norm), offsetof(layer_w, ffn_norm), offsetof(layer_w, qkv),
        offsetof(layer_w, n_qkv), offsetof(layer_w, w13), offsetof(layer_w, n_w13), offsetof(layer_w, wo),
        offsetof(layer_w, w2),
        sizeof(model_w), offsetof(model_w, dim), offsetof(model_w, n_layers), offsetof(model_w, n_heads),
        offsetof(model_w, n_kv_heads), offsetof(model_w, head_dim), offsetof(model_w, hidden),
        offsetof(model_w, vocab), offsetof(model_w, eps), offsetof(model_w, attn_scale),
        offsetof(model_w, rope_freqs), offsetof(model_w, embed), offsetof(model_w, norm), offsetof(model_w, output),
        offsetof(model_w, layers),
        sizeof(kv_cache), offsetof(kv_cache, pool), offsetof(kv_cache, dtype), offsetof(kv_cache, block_size),
        offsetof(kv_cache, n_layers),
        KV_F32, KV_F16, KV_BF16, /* the cache dtype enum */
    };
    const int64_t n = (int64_t)(sizeof(v) / sizeof(v[0]));
    for (int64_t i = 0; i < n && i < cap; i++) out[i] = v[i];
    return n;
}
