/* The whole decode step in one call: one new token per row through every layer, the same math as
 * llama3/model.py's Transformer.forward with a KV cache (and the block matmuls of quants.c),
 * without ~1,000 PyTorch dispatches per token. llama3/engine/cdecoder.py builds the structs and checks
 * which models qualify; tests/test_decoders.py holds it against the PyTorch path.
 *
 * Per layer, for each row b at position pos[b]:
 *   xn = rmsnorm(x) * attn_norm          -> the int8 blocks the matrices read (quants.c)
 *   q, k, v = wq, wk, wv . xn             (one worksharing pass over the three)
 *   q, k = rope(q, k, pos); cache[pos] = k, v   (the paged cache of llama3/engine/cache.py)
 *   a = softmax(q . K^T / sqrt(D)) . V    over the row's pos + 1 keys (query head h uses KV head h / rep)
 *   x += wo . a
 *   xn = rmsnorm(x) * ffn_norm
 *   g, u = w1, w3 . xn;  x += w2 . (silu(g) * u)
 * then logits = output . (rmsnorm(x) * norm).
 *
 * The keys and values live in the paged cache (attention.c reads them through each sequence's block table).
 * One OpenMP parallel region per step; every matrix is split by rows between the threads, and the small
 * per-row work between matrices is split by rows or heads. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"

typedef struct {
    const float *attn_norm, *ffn_norm;
    qmat qkv[3];
    int64_t n_qkv; /* 3 (wq, wk, wv); outputs side by side: q | k | v */
    qmat w13[2];
    int64_t n_w13; /* 2 (w1, w3); outputs: gate | up */
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

/* tokens (B), pos (B): the new token of each sequence and its position; tables (B, width): each sequence's
 * block table in the paged cache; logits (B, vocab). 0 on success, -1 when out of memory. */
int decode_step(const model_w *M, const kv_cache *C, int64_t B, const int64_t *tokens, const int64_t *pos,
                const int64_t *tables, int64_t width, float *logits, int64_t nthreads) {
    const int64_t dim = M->dim, H = M->n_heads, KVH = M->n_kv_heads, D = M->head_dim, hidden = M->hidden;
    const int64_t nqkv = (H + 2 * KVH) * D, nbh_ceil = (hidden + QK_K - 1) / QK_K, bs = C->block_size;
    const int64_t block_elems = C->n_layers * 2 * KVH * bs * D, esz = C->dtype == KV_F32 ? 4 : 2;
    int64_t maxk = dim > hidden ? dim : hidden;
    if (H * D > maxk) maxk = H * D;
    const size_t floats = (size_t)(B * (dim + maxk + nqkv + 2 * hidden + 2 * D));
    int64_t longest = 0;
    for (int64_t b = 0; b < B; b++) longest = pos[b] + 1 > longest ? pos[b] + 1 : longest;
    const int64_t max_chunks = (longest + ATT_CHUNK - 1) / ATT_CHUNK;
    float *x = malloc(floats * sizeof(float) + acts_bytes(B, maxk));
    float *part = malloc((size_t)(B * H * max_chunks * (D + 2) + B * H * D + nqkv * B) * sizeof(float));
    int64_t *lens = malloc((size_t)B * sizeof(int64_t));
    if (!x || !part || !lens) {
        free(x), free(part), free(lens);
        return -1;
    }
    for (int64_t b = 0; b < B; b++) lens[b] = pos[b] + 1;
    float *att = part + B * H * max_chunks * (D + 2), *qkv_q = att + B * H * D; /* queries, (B, H, D) */
    float *xf = x + B * dim, *qkv = xf + B * maxk, *h13 = qkv + B * nqkv, *rcos = h13 + B * 2 * hidden;
    float *rsin = rcos + B * D;
    void *abuf = rsin + B * D;
    /* activations of length k: floats in xf (or att) with row stride k, their quantized forms in abuf */
    acts Xdim, Xatt, Xhid;
    acts_init(&Xdim, abuf, xf, B, dim), acts_init(&Xatt, abuf, att, B, H * D), acts_init(&Xhid, abuf, xf, B, hidden);

    #pragma omp parallel num_threads((int)nthreads)
    {
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            dequant_row(&M->embed, tokens[b], x + b * dim);
            rope_angles(M->rope_freqs, pos[b], D, rcos + b * D, rsin + b * D);
        }

        for (int64_t l = 0; l < M->n_layers; l++) {
            const layer_w *L = &M->layers[l];
            const int need_qkv = act_needs_list(L->qkv, L->n_qkv), need_w13 = act_needs_list(L->w13, L->n_w13);

            #pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++) {
                rmsnorm(x + b * dim, L->attn_norm, dim, M->eps, xf + b * dim);
                quantize_acts_row(&Xdim, b, 0, dim, need_qkv);
            }
            matmul_list_ws(L->qkv, L->n_qkv, &Xdim, B, qkv, nqkv);

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
                quantize_acts_row(&Xatt, b, 0, H * D, act_needs(&L->wo));
            matmul_ws(&L->wo, &Xatt, B, x, dim, 1);

            #pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++) {
                rmsnorm(x + b * dim, L->ffn_norm, dim, M->eps, xf + b * dim);
                quantize_acts_row(&Xdim, b, 0, dim, need_w13);
            }
            matmul_list_ws(L->w13, L->n_w13, &Xdim, B, h13, 2 * hidden);

            #pragma omp for schedule(static)
            for (int64_t i = 0; i < B * nbh_ceil; i++) { /* silu(gate) * up, a super-block at a time */
                const int64_t b = i / nbh_ceil, j0 = i % nbh_ceil * QK_K, j1 = j0 + QK_K < hidden ? j0 + QK_K : hidden;
                const float *g = h13 + b * 2 * hidden + j0, *u = g + hidden;
                silu_mul(g, u, j1 - j0, xf + b * hidden + j0);
                quantize_acts_row(&Xhid, b, j0, j1, act_needs(&L->w2));
            }
            matmul_ws(&L->w2, &Xhid, B, x, dim, 1);
        }

        #pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            rmsnorm(x + b * dim, M->norm, dim, M->eps, xf + b * dim);
            quantize_acts_row(&Xdim, b, 0, dim, act_needs(&M->output));
        }
        matmul_ws(&M->output, &Xdim, B, logits, M->vocab, 0);
    }
    free(x), free(part), free(lens);
    return 0;
}

/* Sizes and field offsets of the structs llama3/kernels/__init__.py mirrors with ctypes ("name size" and
 * "name.field offset" lines), and the cache dtype enum ("KV_F16 1"); it checks them when it loads the library. */
#define LAYOUT_STRUCT(T) at += snprintf(buf + at, sizeof(buf) - (size_t)at, #T " %zu\n", sizeof(T))
#define LAYOUT_FIELD(T, f) at += snprintf(buf + at, sizeof(buf) - (size_t)at, #T "." #f " %zu\n", offsetof(T, f))
const char *struct_layout(void) {
    static char buf[4096];
    int at = 0;
    LAYOUT_STRUCT(qmat), LAYOUT_FIELD(qmat, kind), LAYOUT_FIELD(qmat, data), LAYOUT_FIELD(qmat, rows);
    LAYOUT_FIELD(qmat, k), LAYOUT_FIELD(qmat, row_bytes);
    LAYOUT_STRUCT(acts), LAYOUT_FIELD(acts, f), LAYOUT_FIELD(acts, q8), LAYOUT_FIELD(acts, d8);
    LAYOUT_FIELD(acts, s8), LAYOUT_FIELD(acts, qk), LAYOUT_FIELD(acts, dk), LAYOUT_FIELD(acts, bk), LAYOUT_FIELD(acts, k);
    LAYOUT_STRUCT(layer_w), LAYOUT_FIELD(layer_w, attn_norm), LAYOUT_FIELD(layer_w, ffn_norm), LAYOUT_FIELD(layer_w, qkv);
    LAYOUT_FIELD(layer_w, n_qkv), LAYOUT_FIELD(layer_w, w13), LAYOUT_FIELD(layer_w, n_w13), LAYOUT_FIELD(layer_w, wo);
    LAYOUT_FIELD(layer_w, w2);
    LAYOUT_STRUCT(model_w), LAYOUT_FIELD(model_w, dim), LAYOUT_FIELD(model_w, n_layers), LAYOUT_FIELD(model_w, n_heads);
    LAYOUT_FIELD(model_w, n_kv_heads), LAYOUT_FIELD(model_w, head_dim), LAYOUT_FIELD(model_w, hidden);
    LAYOUT_FIELD(model_w, vocab), LAYOUT_FIELD(model_w, eps), LAYOUT_FIELD(model_w, attn_scale);
    LAYOUT_FIELD(model_w, rope_freqs), LAYOUT_FIELD(model_w, embed);
    LAYOUT_FIELD(model_w, norm), LAYOUT_FIELD(model_w, output), LAYOUT_FIELD(model_w, layers);
    LAYOUT_STRUCT(kv_cache), LAYOUT_FIELD(kv_cache, pool), LAYOUT_FIELD(kv_cache, dtype);
    LAYOUT_FIELD(kv_cache, block_size), LAYOUT_FIELD(kv_cache, n_layers);
    at += snprintf(buf + at, sizeof(buf) - (size_t)at, "KV_F32 %d\nKV_F16 %d\nKV_BF16 %d\n", KV_F32, KV_F16, KV_BF16);
    return buf;
}
