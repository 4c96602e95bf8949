/* Paged decode attention (attention.c), used by the one-call decode step (decode.c). */
#ifndef LLAMA3_ATTENTION_H
#define LLAMA3_ATTENTION_H

#include "qgemv.h"

enum { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2 };

#define ATT_CHUNK 128 /* keys per attention work item */

/* The paged cache: pool (n_blocks, n_layers, 2, n_kv_heads, block_size, head_dim) of ``dtype``. */
typedef struct {
    void *pool;
    int64_t dtype, block_size, n_layers;
} kv_cache;

/* n floats into the cache's dtype (float16/bfloat16 rounded to nearest even). */
void kv_store(void *dst, const float *src, int64_t n, int dtype);

/* One layer's attention for B sequences of H query heads (q, out: (B, H, D)); sequence b reads its first
 * lens[b] positions through its block table tables[b * width ...]. part holds B * H * max_chunks * (D + 2)
 * floats, max_chunks = ceil(max lens / ATT_CHUNK). A worksharing construct (inside a parallel region). */
void paged_attention_ws(const kv_cache *C, int64_t layer, const float *q, int64_t B, int64_t H, int64_t KVH,
                        int64_t D, const int64_t *tables, int64_t width, const int64_t *lens, float scale, float *part,
                        int64_t max_chunks, float *out);

#endif
