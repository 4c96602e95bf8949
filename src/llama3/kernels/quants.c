/* GGUF's block formats executed in place: activation quantization, dequantization and matrix-vector
 * products for every kind of qgemv.h's enum, reading each weight row's blocks exactly as the file stores
 * them (layouts: llama.cpp's ggml-common.h; gguf-py's quants.py is the reference the tests hold us to).
 *
 * Each product pairs the weights with activations quantized the way llama.cpp runs the format:
 *   legacy kinds and IQ4_NL with int8 blocks of 32 (acts.q8):  block dot = d_w d_x sum_i v_i q_i  (+ m_w s_x)
 *   K-quants and IQ4_XS with int8 blocks of 256 (acts.qk):      sum over sub-blocks of (d sc_j) d_x sum_i v_i q_i,
 *       minus (dmin m_j) d_x sum_i q_i, where the sums of q come from the activations' sums of 16 (acts.bk)
 *   F32, F16, BF16 with the float activations, widened in registers.
 * The integer parts are exact; floats enter once per block. AVX2 has no signed*signed byte multiply, so
 * signed weights multiply as |v| (unsigned) times q carrying v's sign; weights stored unsigned (offset
 * formats, K-quants) multiply as they are and their offset is subtracted through the sums of q.
 *
 * Every (weight row, activation row) product is the same sequence of operations whatever the number of
 * activation rows (each kernel decodes a block once, then runs the same code for each activation row) and
 * whatever the thread count (a row is one thread's work): batches and thread counts never change results.
 * Built once per ISA from this one source: AVX2 + FMA + F16C, and AVX-512 (F/BW/VL/VNNI).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qgemv.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define ISA_AVX512 1
#define ISA_NAME "avx512"
#else
#define ISA_NAME "avx2"
#endif

/* ------------------------------------------------------------------------------------------ the kinds */
typedef struct {
    const char *name;
    int64_t id, elems, bytes; /* a block: elems values in bytes bytes */
} kind_info;

#define KIND_ROW(name, id, elems, bytes) {#name, id, elems, bytes},
static const kind_info KINDS[] = {GGML_KINDS(KIND_ROW)};
#define N_KINDS ((int)(sizeof(KINDS) / sizeof(KINDS[0])))

/* A block's bytes (a constant where kind is one). */
#define KIND_BYTES(name, id, elems, bytes) case id: return bytes;
static inline int64_t block_bytes(int64_t kind) {
    switch (kind) { GGML_KINDS(KIND_BYTES) default: return 0; }
}

static const kind_info *kind_of(int64_t id) {
    for (int i = 0; i < N_KINDS; i++)
        if (KINDS[i].id == id) return &KINDS[i];
    return NULL;
}

/* "name id block_elems block_bytes" per line, for the Python side to check against gguf-py. */
const char *kinds_table(void) {
    static char buf[1024];
    int at = 0;
    for (int i = 0; i < N_KINDS; i++)
        at += snprintf(buf + at, sizeof(buf) - (size_t)at, "%s %lld %lld %lld\n", KINDS[i].name,
                       (long long)KINDS[i].id, (long long)KINDS[i].elems, (long long)KINDS[i].bytes);
    return buf;
}

const char *isa_name(void) { return ISA_NAME; }

int act_needs(const qmat *W) {
    switch (W->kind) {
    case KIND_Q4_0: case KIND_Q4_1: case KIND_Q5_0: case KIND_Q5_1: case KIND_Q8_0: case KIND_IQ4_NL:
        return ACT_Q8;
    case KIND_Q2_K: case KIND_Q3_K: case KIND_Q4_K: case KIND_Q5_K: case KIND_Q6_K: case KIND_IQ4_XS:
        return ACT_Q8K;
    default:
        return 0;
    }
}

int act_needs_list(const qmat *W, int64_t n_w) {
    int needs = 0;
    for (int64_t i = 0; i < n_w; i++) needs |= act_needs(&W[i]);
    return needs;
}

/* --------------------------------------------------------------------------------- small helpers */
static inline float f16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static inline uint32_t u32_at(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline __m256i load32(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* 16 bytes -> 32 values 0..15: the low nibbles (elements 0..15), then the high nibbles (16..31). */
static inline __m256i nibbles32(const uint8_t *p) {
    const __m128i b = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0x0F));
}

/* 32 bits (little-endian) -> 32 bytes: 0x10 where element i's bit is set, else 0. */
static inline __m256i bits32_x16(const uint8_t *p) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  /* bytes 0, 1 */
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3); /* bytes 2, 3 */
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    const __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)u32_at(p)), spread);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(b, bit), bit), _mm256_set1_epi8(0x10));
}

/* IQ4_NL's and IQ4_XS's 16 non-linear levels, in both 128-bit lanes for a byte shuffle. */
static inline __m256i iq4_levels(void) {
    return _mm256_setr_epi8(-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
                            -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113);
}

/* 8 int32 lanes: the sums of 4 products of unsigned u and signed s bytes (no saturation for |u s| < 2^14). */
static inline __m256i dot_us(__m256i u, __m256i s) {
#ifdef ISA_AVX512
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* The same for signed v (|v| <= 128) and s (|s| <= 127). */
static inline __m256i dot_ss(__m256i v, __m256i s) { return dot_us(_mm256_sign_epi8(v, v), _mm256_sign_epi8(s, v)); }

/* 16 int16 lanes: pairs of u s byte products (unsigned u, signed s), for a multiply by 16-bit scales next. */
static inline __m256i pairs_us(__m256i u, __m256i s) { return _mm256_maddubs_epi16(u, s); }
static inline __m256i pairs_ss(__m256i v, __m256i s) {
    return _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(s, v));
}

#ifdef ISA_AVX512
/* 16 int32 lanes: sums of 4 products of signed bytes v (|v| <= 128) and s (|s| <= 127): |v| times s with v's sign */
static inline __m512i dot_ss512(__m512i v, __m512i s) {
    const __m512i sv = _mm512_mask_sub_epi8(s, _mm512_movepi8_mask(v), _mm512_setzero_si512(), s);
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(v), sv);
}

/* 32 int16 lanes: pairs of products of unsigned u and signed s bytes; signed v as |v| times s with v's sign */
static inline __m512i pairs_us512(__m512i u, __m512i s) { return _mm512_maddubs_epi16(u, s); }
static inline __m512i pairs_ss512(__m512i v, __m512i s) {
    const __m512i sv = _mm512_mask_sub_epi8(s, _mm512_movepi8_mask(v), _mm512_setzero_si512(), s);
    return _mm512_maddubs_epi16(_mm512_abs_epi8(v), sv);
}

static inline __m512i cat256(__m256i lo, __m256i hi) { return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); }

static inline __m256 fold512(__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
#endif

/* ------------------------------------------------------------------------- activation quantization */
static inline float absmax(const float *x, int64_t n) { /* n a multiple of 8 */
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    return _mm_cvtss_f32(m4);
}

static inline int hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_hadd_epi32(s, s);
    return _mm_cvtsi128_si32(_mm_hadd_epi32(s, s));
}

/* q = round(x * inv) (half to even) for 32 floats; sum[0], sum[1] = the sums of q's two halves of 16. */
static inline void round32(const float *x, __m256 inv, int8_t *q, int *sum) {
    __m256i i32[4];
    for (int j = 0; j < 4; j++)
        i32[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * j), inv),
                                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    sum[0] = hsum_i32(_mm256_add_epi32(i32[0], i32[1]));
    sum[1] = hsum_i32(_mm256_add_epi32(i32[2], i32[3]));
    /* 32 int32 -> 32 int8, restoring element order after the lane-wise packs */
    __m256i p8 = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

/* One block of n (32 or 256) floats: scale d = max|x| / 127, q = round(x * 127 / max|x|); sums of 16 in sums. */
static inline float quantize_block(const float *x, int64_t n, int8_t *q, int *sums) {
    const float m = absmax(x, n);
    const __m256 inv = _mm256_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
    for (int64_t j = 0; j < n; j += 32) round32(x + j, inv, q + j, sums + j / 16);
    return m / 127.0f;
}

size_t acts_bytes(int64_t n, int64_t k) {
    return (size_t)(n * (2 * (k / QK) + k / QK_K) * (int64_t)sizeof(float) + n * (k / 16) * 2 + 2 * n * k);
}

void acts_init(acts *X, void *buf, const float *f, int64_t n, int64_t k) {
    float *p = (float *)buf; /* floats first, then int16, then bytes: every field aligned */
    X->d8 = p, p += n * (k / QK);
    X->s8 = p, p += n * (k / QK);
    X->dk = p, p += n * (k / QK_K);
    X->bk = (int16_t *)p;
    X->q8 = (int8_t *)(X->bk + n * (k / 16));
    X->qk = X->q8 + n * k;
    X->f = f, X->k = k;
}

void quantize_acts_row(const acts *X, int64_t t, int64_t j0, int64_t j1, int needs) {
    const int64_t k = X->k;
    const float *x = X->f + t * k;
    int sums[QK_K / 16];
    if (needs & ACT_Q8)
        for (int64_t b = j0 / QK; (b + 1) * QK <= j1; b++) {
            const int64_t i = t * (k / QK) + b;
            X->d8[i] = quantize_block(x + b * QK, QK, X->q8 + t * k + b * QK, sums);
            X->s8[i] = X->d8[i] * (float)(sums[0] + sums[1]);
        }
    if (needs & ACT_Q8K)
        for (int64_t b = j0 / QK_K; (b + 1) * QK_K <= j1; b++) {
            X->dk[t * (k / QK_K) + b] = quantize_block(x + b * QK_K, QK_K, X->qk + t * k + b * QK_K, sums);
            for (int j = 0; j < QK_K / 16; j++) X->bk[t * (k / 16) + b * (QK_K / 16) + j] = (int16_t)sums[j];
        }
}

/* ------------------------------------------------------------------------------- decoding blocks */
/* A legacy block's 32 values as bytes: signed for Q8_0, Q4_0, Q5_0, IQ4_NL; unsigned for Q4_1, Q5_1. */
static inline __m256i legacy_values(int kind, const uint8_t *blk) {
    switch (kind) {
    case KIND_Q8_0: return load32(blk + 2);                                          /* d, qs[32] */
    case KIND_Q4_0: return _mm256_sub_epi8(nibbles32(blk + 2), _mm256_set1_epi8(8)); /* d, qs[16] */
    case KIND_Q4_1: return nibbles32(blk + 4);                                       /* d, m, qs[16] */
    case KIND_Q5_0: /* d, qh[4], qs[16]: bit i of qh is element i's fifth bit */
        return _mm256_sub_epi8(_mm256_or_si256(nibbles32(blk + 6), bits32_x16(blk + 2)), _mm256_set1_epi8(16));
    case KIND_Q5_1: return _mm256_or_si256(nibbles32(blk + 8), bits32_x16(blk + 4)); /* d, m, qh[4], qs[16] */
    default: return _mm256_shuffle_epi8(iq4_levels(), nibbles32(blk + 2));           /* IQ4_NL: d, qs[16] */
    }
}

static inline int legacy_has_min(int kind) { return kind == KIND_Q4_1 || kind == KIND_Q5_1; }

#ifdef ISA_AVX512
/* Two legacy blocks' 64 values (b0's 32, then b1's), as legacy_values. */
static inline __m512i legacy_values2(int kind, const uint8_t *b0, const uint8_t *b1) {
    if (kind == KIND_Q8_0) return cat256(load32(b0 + 2), load32(b1 + 2));
    const int at = kind == KIND_Q4_1 ? 4 : kind == KIND_Q5_0 ? 6 : kind == KIND_Q5_1 ? 8 : 2; /* the nibbles */
    const __m256i q = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(b0 + at))),
                                              _mm_loadu_si128((const __m128i *)(b1 + at)), 1);
    __m512i v = cat256(q, _mm256_srli_epi16(q, 4)); /* 128-bit lanes: low nibbles of b0, b1, high of b0, b1 */
    v = _mm512_and_si512(_mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(3, 1, 2, 0)), _mm512_set1_epi8(0x0F));
    if (kind == KIND_Q5_0 || kind == KIND_Q5_1) { /* the fifth bits: one per byte, from a 64-bit mask */
        const uint64_t h = u32_at(b0 + at - 4) | (uint64_t)u32_at(b1 + at - 4) << 32;
        v = _mm512_or_si512(v, _mm512_maskz_mov_epi8(_cvtu64_mask64(h), _mm512_set1_epi8(0x10)));
    }
    switch (kind) {
    case KIND_Q4_0: return _mm512_sub_epi8(v, _mm512_set1_epi8(8));
    case KIND_Q5_0: return _mm512_sub_epi8(v, _mm512_set1_epi8(16));
    case KIND_IQ4_NL: return _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm256_castsi256_si128(iq4_levels())), v);
    default: return v;
    }
}
#endif


static inline int sb_per16(int kind) { return kind == KIND_Q2_K || kind == KIND_Q3_K || kind == KIND_Q6_K; }
static inline int sb_has_min(int kind) { return kind == KIND_Q2_K || kind == KIND_Q4_K || kind == KIND_Q5_K; }

/* A K-quant super-block being read, two groups of 32 at a time (group g = elements 32g .. 32g+31): its scales
 * unpacked in registers, 16 int8 lanes per group of 32 (Q4_K, Q5_K, IQ4_XS: lanes 0-7) or of 16 (Q2_K, Q3_K,
 * Q6_K), with mins (Q2_K, Q4_K, Q5_K) and the offset subtracted from the stored values (Q3_K 4, Q6_K 32); and
 * the high bits (Q5_K's qh, Q3_K's hmask) shifted along as the groups go by. */
typedef struct {
    float d, dmin;
    __m128i sc, mn;
    __m256i s16; /* the scales as int16 */
    __m256i high;
    int offset;
} sb_state;

/* Q4_K/Q5_K's 12 bytes of 6-bit scales and mins, as 32-bit words a, b, c: a holds scales 0-3 (and in bits 6-7
 * of each byte the top bits of scales 4-7), b mins 0-3 (and the top bits of mins 4-7), c the low nibbles of
 * scales 4-7 and, in its high nibbles, of mins 4-7. Result: bytes 0-7 scales, 8-15 mins. */
static inline __m128i k4_scales(const uint8_t *p) { /* in general-purpose registers: the vector ports are busier */
    const uint32_t a = u32_at(p), b = u32_at(p + 4), c = u32_at(p + 8);
    return _mm_setr_epi32((int)(a & 0x3f3f3f3f), (int)((c & 0x0f0f0f0f) | ((a >> 2) & 0x30303030)),
                          (int)(b & 0x3f3f3f3f), (int)(((c >> 4) & 0x0f0f0f0f) | ((b >> 2) & 0x30303030)));
}

static inline void sb_begin(int kind, const uint8_t *blk, sb_state *S) {
    const __m128i nib = _mm_set1_epi8(0x0F);
    S->offset = 0, S->dmin = 0.0f, S->mn = _mm_setzero_si128(), S->high = _mm256_setzero_si256();
    switch (kind) {
    case KIND_Q4_K: /* d, dmin, scales[12], qs[128] */
    case KIND_Q5_K: /* d, dmin, scales[12], qh[32], qs[128] */
        S->d = f16_at(blk), S->dmin = f16_at(blk + 2);
        S->sc = k4_scales(blk + 4);
        S->mn = _mm_srli_si128(S->sc, 8);
        if (kind == KIND_Q5_K) S->high = load32(blk + 16);
        break;
    case KIND_Q6_K: /* ql[128], qh[64], scales[16] (int8), d */
        S->sc = _mm_loadu_si128((const __m128i *)(blk + 192));
        S->d = f16_at(blk + 208), S->offset = 32;
        break;
    case KIND_Q3_K: { /* hmask[32], qs[64], scales[12], d. 16 6-bit scales - 32: low nibbles in bytes 0-7 (scales
                         0-7, then their high nibbles scales 8-15), the top two bits in bytes 8-11 (scale i: byte
                         8 + i % 4, bits 2 (i / 4)) */
        const __m128i lo8 = _mm_loadl_epi64((const __m128i *)(blk + 96));
        const __m128i low = _mm_unpacklo_epi64(_mm_and_si128(lo8, nib), _mm_and_si128(_mm_srli_epi16(lo8, 4), nib));
        const __m128i top = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32((int)u32_at(blk + 104)), _mm_setr_epi32(0, 2, 4, 6)),
                                          _mm_set1_epi8(3));
        S->sc = _mm_sub_epi8(_mm_or_si128(low, _mm_slli_epi16(top, 4)), _mm_set1_epi8(32));
        S->d = f16_at(blk + 108), S->offset = 4;
        S->high = load32(blk);
        break;
    }
    case KIND_Q2_K: { /* scales[16] (scale | min << 4), qs[64], d, dmin */
        const __m128i sm = _mm_loadu_si128((const __m128i *)blk);
        S->sc = _mm_and_si128(sm, nib);
        S->mn = _mm_and_si128(_mm_srli_epi16(sm, 4), nib);
        S->d = f16_at(blk + 80), S->dmin = f16_at(blk + 82);
        break;
    }
    default: { /* IQ4_XS: d, scales_h (2 bits per group), scales_l[4] (4 bits per group), qs[128] */
        const __m128i l4 = _mm_cvtsi32_si128((int)u32_at(blk + 4)); /* group g: byte g/2, nibble g%2 */
        const __m128i low = _mm_unpacklo_epi8(_mm_and_si128(l4, nib), _mm_and_si128(_mm_srli_epi16(l4, 4), nib));
        const __m128i h = _mm_set1_epi32(blk[2] | blk[3] << 8); /* group g: bits 2g, 2g+1 */
        const __m128i three = _mm_set1_epi32(3);
        const __m128i h03 = _mm_and_si128(_mm_srlv_epi32(h, _mm_setr_epi32(0, 2, 4, 6)), three);
        const __m128i h47 = _mm_and_si128(_mm_srlv_epi32(h, _mm_setr_epi32(8, 10, 12, 14)), three);
        const __m128i top = _mm_packus_epi16(_mm_packus_epi32(h03, h47), _mm_setzero_si128());
        S->sc = _mm_sub_epi8(_mm_or_si128(low, _mm_slli_epi16(top, 4)), _mm_set1_epi8(32));
        S->d = f16_at(blk);
        break;
    }
    }
    S->s16 = _mm256_cvtepi8_epi16(S->sc);
}

static inline __m256i srl16(__m256i v, int n) { return _mm256_srl_epi16(v, _mm_cvtsi32_si128(n)); }

/* Groups 2c and 2c+1 of the super-block as 32 bytes each: unsigned 0..2^bits-1, or IQ4_XS's signed levels.
 * Call for c = 0, 1, 2, 3 in order (the high bits shift along in S). */
static inline void sb_pair(int kind, const uint8_t *blk, int c, sb_state *S, __m256i *u0, __m256i *u1) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), low2 = _mm256_set1_epi8(0x03), one = _mm256_set1_epi8(1);
    switch (kind) {
    case KIND_Q4_K:   /* byte i of qs row c: element 64c + i (low nibble), 64c + 32 + i (high) */
    case KIND_Q5_K: { /* and bit g of qh[i] is the fifth bit of element 32g + i */
        const __m256i q = load32(blk + (kind == KIND_Q4_K ? 16 : 48) + 32 * c);
        *u0 = _mm256_and_si256(q, low4);
        *u1 = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
        if (kind == KIND_Q5_K) {
            *u0 = _mm256_or_si256(*u0, _mm256_slli_epi16(_mm256_and_si256(S->high, one), 4));
            *u1 = _mm256_or_si256(*u1, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(S->high, 1), one), 4));
            S->high = _mm256_srli_epi16(S->high, 2);
        }
        break;
    }
    case KIND_Q6_K: { /* half h = c/2 of 128 elements: rows L0, L1 of its 64 ql bytes, its 32 qh bytes H; element
                         128h + 32s + i (s < 4) takes nibble s/2 of L(s%2)[i] and bits 2s, 2s+1 of H[i] */
        const int h = c >> 1, sh = 4 * (c & 1);
        const __m256i l0 = load32(blk + 64 * h), l1 = load32(blk + 64 * h + 32);
        const __m256i hb = srl16(load32(blk + 128 + 32 * h), sh);
        *u0 = _mm256_or_si256(_mm256_and_si256(srl16(l0, sh), low4), _mm256_slli_epi16(_mm256_and_si256(hb, low2), 4));
        *u1 = _mm256_or_si256(_mm256_and_si256(srl16(l1, sh), low4),
                              _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), low2), 4));
        break;
    }
    case KIND_Q3_K:   /* element 128h + 32s + i: bits 2s, 2s+1 of qs[32h + i], third bit = bit (4h + s) of hmask[i] */
    case KIND_Q2_K: { /* element 128h + 32s + i: bits 2s, 2s+1 of qs[32h + i] */
        const int sh = 4 * (c & 1);
        const __m256i q = srl16(load32(blk + (kind == KIND_Q3_K ? 32 : 16) + 32 * (c >> 1)), sh);
        *u0 = _mm256_and_si256(q, low2);
        *u1 = _mm256_and_si256(_mm256_srli_epi16(q, 2), low2);
        if (kind == KIND_Q3_K) {
            *u0 = _mm256_or_si256(*u0, _mm256_slli_epi16(_mm256_and_si256(S->high, one), 2));
            *u1 = _mm256_or_si256(*u1, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(S->high, 1), one), 2));
            S->high = _mm256_srli_epi16(S->high, 2);
        }
        break;
    }
    default: /* IQ4_XS: 16 bytes per group, as IQ4_NL's blocks */
        *u0 = _mm256_shuffle_epi8(iq4_levels(), nibbles32(blk + 8 + 32 * c));
        *u1 = _mm256_shuffle_epi8(iq4_levels(), nibbles32(blk + 8 + 32 * c + 16));
        break;
    }
}

#ifdef ISA_AVX512
/* Groups 2c and 2c+1 as one 512-bit vector (Q4_K and Q6_K decoded in 512 bits). */
static inline __m512i sb_pair512(int kind, const uint8_t *blk, int c, sb_state *S) {
    const __m512i low4 = _mm512_set1_epi8(0x0F), low2 = _mm512_set1_epi8(0x03);
    if (kind == KIND_Q4_K) {
        const __m256i q = load32(blk + 16 + 32 * c);
        return _mm512_and_si512(cat256(q, _mm256_srli_epi16(q, 4)), low4);
    }
    if (kind == KIND_Q6_K) { /* rows L0, L1 of half c/2 are 64 contiguous bytes; H pairs with L0, H >> 2 with L1 */
        const __m512i l = _mm512_loadu_si512(blk + 64 * (c >> 1));
        const __m256i h = load32(blk + 128 + 32 * (c >> 1));
        const __m512i hh = cat256(h, _mm256_srli_epi16(h, 2));
        if (c & 1)
            return _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), low4),
                                   _mm512_and_si512(hh, _mm512_set1_epi8(0x30)));
        return _mm512_or_si512(_mm512_and_si512(l, low4), _mm512_slli_epi16(_mm512_and_si512(hh, low2), 4));
    }
    __m256i u0, u1;
    sb_pair(kind, blk, c, S, &u0, &u1);
    return cat256(u0, u1);
}
#endif

/* The int16 multipliers of the pair-product lanes (lanes 0-7: elements 0-15) of groups 2c and 2c+1. */
static inline void sb_pair_scales(int kind, const sb_state *S, int c, __m256i *m0, __m256i *m1) {
    if (sb_per16(kind)) { /* group g's scales 2g, 2g+1 are dword g of s16: word 0 to the low lane, word 1 high */
        const __m256i split = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
                                               2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
        *m0 = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(S->s16, _mm256_set1_epi32(2 * c)), split);
        *m1 = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(S->s16, _mm256_set1_epi32(2 * c + 1)), split);
    } else { /* word g of s16 everywhere */
        const __m256i words = _mm256_permute2x128_si256(S->s16, S->s16, 0x00);
        *m0 = _mm256_shuffle_epi8(words, _mm256_set1_epi16((short)(0x0100 + 0x0202 * (2 * c))));
        *m1 = _mm256_shuffle_epi8(words, _mm256_set1_epi16((short)(0x0100 + 0x0202 * (2 * c + 1))));
    }
}


/* --------------------------------------------------------------------------------------- dequantize */
/* o[0..15] = scale * v - sub for 16 int8 values: the float operations of gguf-py's dequantizers. */
static inline void store16(__m128i v, float scale, float sub, float *o) {
    const __m256 s = _mm256_set1_ps(scale), m = _mm256_set1_ps(sub);
    const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
    _mm256_storeu_ps(o, _mm256_sub_ps(_mm256_mul_ps(f0, s), m));
    _mm256_storeu_ps(o + 8, _mm256_sub_ps(_mm256_mul_ps(f1, s), m));
}

static inline void dequant_legacy(int kind, const uint8_t *w, int64_t k, float *out) {
    const int64_t bs = block_bytes(kind);
    for (int64_t b = 0; b < k / QK; b++) {
        const uint8_t *blk = w + b * bs;
        const __m256i v = legacy_values(kind, blk);
        const float d = f16_at(blk), m = legacy_has_min(kind) ? -f16_at(blk + 2) : 0.0f; /* d v + m = d v - (-m) */
        store16(_mm256_castsi256_si128(v), d, m, out + b * QK);
        store16(_mm256_extracti128_si256(v, 1), d, m, out + b * QK + 16);
    }
}

static inline void dequant_k(int kind, const uint8_t *w, int64_t k, float *out) {
    const int64_t bs = block_bytes(kind);
    for (int64_t sb = 0; sb < k / QK_K; sb++) {
        const uint8_t *blk = w + sb * bs;
        sb_state S;
        sb_begin(kind, blk, &S);
        int8_t sc[16], mn[16];
        _mm_storeu_si128((__m128i *)sc, S.sc);
        _mm_storeu_si128((__m128i *)mn, S.mn);
        for (int c = 0; c < 4; c++) {
            __m256i u[2];
            sb_pair(kind, blk, c, &S, &u[0], &u[1]);
            for (int i = 0; i < 2; i++) {
                const int g = 2 * c + i;
                const __m256i v = _mm256_sub_epi8(u[i], _mm256_set1_epi8((char)S.offset));
                for (int half = 0; half < 2; half++) {
                    const int j = sb_per16(kind) ? 2 * g + half : g;
                    const float ml = sb_has_min(kind) ? S.dmin * (float)mn[j] : 0.0f;
                    const __m128i v16 = half ? _mm256_extracti128_si256(v, 1) : _mm256_castsi256_si128(v);
                    store16(v16, S.d * (float)sc[j], ml, out + sb * QK_K + 32 * g + 16 * half);
                }
            }
        }
    }
}

static inline __m256 load8_float(int kind, const uint8_t *w, int64_t i) {
    if (kind == KIND_F32) return _mm256_loadu_ps((const float *)w + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)(w + 2 * i));
    if (kind == KIND_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); /* BF16: the top half of an f32 */
}

static inline float load1_float(int kind, const uint8_t *w, int64_t i) {
    if (kind == KIND_F32) return ((const float *)w)[i];
    uint16_t h;
    memcpy(&h, w + 2 * i, 2);
    if (kind == KIND_F16) return _cvtsh_ss(h);
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline void dequant_float(int kind, const uint8_t *w, int64_t k, float *out) {
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) _mm256_storeu_ps(out + i, load8_float(kind, w, i));
    for (; i < k; i++) out[i] = load1_float(kind, w, i);
}

void dequant_row(const qmat *W, int64_t r, float *out) {
    const uint8_t *w = W->data + r * W->row_bytes;
    const int64_t k = W->k;
    switch (W->kind) {
    case KIND_F32: dequant_float(KIND_F32, w, k, out); break;
    case KIND_F16: dequant_float(KIND_F16, w, k, out); break;
    case KIND_BF16: dequant_float(KIND_BF16, w, k, out); break;
    case KIND_Q4_0: dequant_legacy(KIND_Q4_0, w, k, out); break;
    case KIND_Q4_1: dequant_legacy(KIND_Q4_1, w, k, out); break;
    case KIND_Q5_0: dequant_legacy(KIND_Q5_0, w, k, out); break;
    case KIND_Q5_1: dequant_legacy(KIND_Q5_1, w, k, out); break;
    case KIND_Q8_0: dequant_legacy(KIND_Q8_0, w, k, out); break;
    case KIND_IQ4_NL: dequant_legacy(KIND_IQ4_NL, w, k, out); break;
    case KIND_Q2_K: dequant_k(KIND_Q2_K, w, k, out); break;
    case KIND_Q3_K: dequant_k(KIND_Q3_K, w, k, out); break;
    case KIND_Q4_K: dequant_k(KIND_Q4_K, w, k, out); break;
    case KIND_Q5_K: dequant_k(KIND_Q5_K, w, k, out); break;
    case KIND_Q6_K: dequant_k(KIND_Q6_K, w, k, out); break;
    case KIND_IQ4_XS: dequant_k(KIND_IQ4_XS, w, k, out); break;
    }
}

/* ------------------------------------------------------------------------------------ dot products */
/* Each kernel: one weight row w against activation rows t0 .. t0 + nt - 1 (nt <= NT), out[t] = the products.
 * Called with constant kind and nt so that each instance is specialized. */
#define NT 4
#define KERNEL static inline __attribute__((always_inline)) void

/* Lanes j < m of 8 floats at p (the rest 0), without reading past p[m - 1]. */
static inline __m256 load_first(const float *p, int m) {
    if (m == 8) return _mm256_loadu_ps(p);
    const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(m), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_maskload_ps(p, lanes);
}

/* The float16 at byte `at` of blocks 0 .. m-1 (m <= 8, bs bytes apart) as 8 floats, 0 past m. (Eight scalar
 * loads: a gather is slower on AMD's cores.) */
static inline __m256 block_halves(const uint8_t *p, int64_t bs, int m, int at) {
    uint16_t h[8];
    for (int j = 0; j < 8; j++) {
        h[j] = 0;
        if (j < m) memcpy(&h[j], p + j * bs + at, 2);
    }
    return _mm256_cvtph_ps(_mm_setr_epi16((short)h[0], (short)h[1], (short)h[2], (short)h[3], (short)h[4], (short)h[5],
                                          (short)h[6], (short)h[7]));
}

/* Legacy kinds, 8 blocks at a time: their 8 scale products d_w d_x in one multiply, then per block
 * acc += (d_w d_x) * (block's integer dot, as 8 partial sums); blocks alternate between two accumulators. */
KERNEL dot_legacy(int kind, int nt, const uint8_t *w, const acts *X, int64_t t0, float *out) {
    const int64_t k = X->k, nb = k / QK, bs = block_bytes(kind);
    const int has_min = legacy_has_min(kind);
    __m256 a0[NT], a1[NT], am[NT];
    for (int t = 0; t < nt; t++) a0[t] = a1[t] = am[t] = _mm256_setzero_ps();
#ifdef ISA_AVX512
    __m512 a2[NT];
    for (int t = 0; t < nt; t++) a2[t] = _mm512_setzero_ps();
#endif
    for (int64_t b = 0; b < nb; b += 8) {
        const int m = nb - b < 8 ? (int)(nb - b) : 8;
        const __m256 dw = block_halves(w + b * bs, bs, m, 0);
        __m256 sc[NT];
        for (int t = 0; t < nt; t++) {
            sc[t] = _mm256_mul_ps(dw, load_first(X->d8 + (t0 + t) * nb + b, m));
            if (has_min) /* the offset m_w times the activations' d_x sum(q) */
                am[t] = _mm256_fmadd_ps(block_halves(w + b * bs, bs, m, 2), load_first(X->s8 + (t0 + t) * nb + b, m), am[t]);
        }
        int j = 0;
#ifdef ISA_AVX512
        for (; j + 2 <= m; j += 2) { /* two blocks per 512-bit vector */
            const __m512i v = legacy_values2(kind, w + (b + j) * bs, w + (b + j + 1) * bs);
            const __m512i pick = _mm512_add_epi32(_mm512_set1_epi32(j), _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1,
                                                                                         1, 1, 1, 1, 1));
            for (int t = 0; t < nt; t++) {
                const __m512i q = _mm512_loadu_si512(X->q8 + (t0 + t) * k + (b + j) * QK);
                const __m512i p = has_min ? _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, q) : dot_ss512(v, q);
                const __m512 s = _mm512_permutexvar_ps(pick, _mm512_castps256_ps512(sc[t]));
                a2[t] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(p), a2[t]);
            }
        }
#endif
        for (; j < m; j++) {
            const __m256i v = legacy_values(kind, w + (b + j) * bs);
            for (int t = 0; t < nt; t++) {
                const __m256i q = load32(X->q8 + (t0 + t) * k + (b + j) * QK);
                const __m256 p = _mm256_cvtepi32_ps(has_min ? dot_us(v, q) : dot_ss(v, q));
                const __m256 s = _mm256_permutevar8x32_ps(sc[t], _mm256_set1_epi32(j));
                if (j & 1) a1[t] = _mm256_fmadd_ps(s, p, a1[t]);
                else a0[t] = _mm256_fmadd_ps(s, p, a0[t]);
            }
        }
    }
#ifdef ISA_AVX512
    for (int t = 0; t < nt; t++) a1[t] = _mm256_add_ps(a1[t], fold512(a2[t]));
#endif
    for (int t = 0; t < nt; t++) out[t] = hsum8(_mm256_add_ps(a0[t], a1[t])) + (has_min ? hsum8(am[t]) : 0.0f);
}

/* K-quants and IQ4_XS, one super-block at a time: the integer sum over its groups of scale_j * (v . q)_j
 * (16-bit products of byte pairs times 16-bit scales), two groups at a time for every activation row; then
 * the offset through the activations' sums of 16, acc += d d_x * that, and for kinds with mins
 * accm += dmin d_x * sum_j m_j (sum of q)_j. */
KERNEL dot_k(int kind, int nt, const uint8_t *w, const acts *X, int64_t t0, float *out) {
    const int64_t k = X->k, nsb = k / QK_K, bs = block_bytes(kind);
    __m256 acc[NT], accm[NT];
    for (int t = 0; t < nt; t++) acc[t] = accm[t] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *blk = w + sb * bs;
        sb_state S;
        sb_begin(kind, blk, &S);
#ifdef ISA_AVX512
        __m512i s2[NT];
        for (int t = 0; t < nt; t++) s2[t] = _mm512_setzero_si512();
#else
        __m256i s[NT];
        for (int t = 0; t < nt; t++) s[t] = _mm256_setzero_si256();
#endif
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            __m256i m0, m1;
            sb_pair_scales(kind, &S, c, &m0, &m1);
#ifdef ISA_AVX512
            const __m512i u = sb_pair512(kind, blk, c, &S), m = cat256(m0, m1);
            for (int t = 0; t < nt; t++) {
                const __m512i q = _mm512_loadu_si512(X->qk + (t0 + t) * k + sb * QK_K + 64 * c);
                const __m512i p = kind == KIND_IQ4_XS ? pairs_ss512(u, q) : pairs_us512(u, q);
                s2[t] = _mm512_add_epi32(s2[t], _mm512_madd_epi16(p, m));
            }
#else
            __m256i u0, u1;
            sb_pair(kind, blk, c, &S, &u0, &u1);
            for (int t = 0; t < nt; t++) {
                const int8_t *q = X->qk + (t0 + t) * k + sb * QK_K + 64 * c;
                const __m256i p0 = kind == KIND_IQ4_XS ? pairs_ss(u0, load32(q)) : pairs_us(u0, load32(q));
                const __m256i p1 = kind == KIND_IQ4_XS ? pairs_ss(u1, load32(q + 32)) : pairs_us(u1, load32(q + 32));
                s[t] = _mm256_add_epi32(s[t], _mm256_add_epi32(_mm256_madd_epi16(p0, m0), _mm256_madd_epi16(p1, m1)));
            }
#endif
        }
        const __m256i m16 = _mm256_cvtepi8_epi16(S.mn);
        for (int t = 0; t < nt; t++) {
#ifdef ISA_AVX512
            __m256i si = _mm256_add_epi32(_mm512_castsi512_si256(s2[t]), _mm512_extracti64x4_epi64(s2[t], 1));
#else
            __m256i si = s[t];
#endif
            const __m256i bsum = load32(X->bk + (t0 + t) * (k / 16) + sb * (QK_K / 16)); /* 16 sums of 16 */
            const float dx = X->dk[(t0 + t) * nsb + sb];
            if (S.offset) /* sum_j sc_j sum (u - offset) q = ... - offset sum_j sc_j bsum_j */
                si = _mm256_sub_epi32(si, kind == KIND_Q6_K ? _mm256_slli_epi32(_mm256_madd_epi16(bsum, S.s16), 5)  /* 32 */
                                                            : _mm256_slli_epi32(_mm256_madd_epi16(bsum, S.s16), 2)); /* 4 */
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(S.d * dx), _mm256_cvtepi32_ps(si), acc[t]);
            if (sb_has_min(kind)) {
                __m256i mins;
                if (sb_per16(kind)) { /* Q2_K: a min per 16 */
                    mins = _mm256_madd_epi16(bsum, m16);
                } else { /* a min per 32: the sums of 16 in pairs */
                    const __m128i pairs = _mm_hadd_epi16(_mm256_castsi256_si128(bsum), _mm256_extracti128_si256(bsum, 1));
                    mins = _mm256_zextsi128_si256(_mm_madd_epi16(pairs, _mm256_castsi256_si128(m16)));
                }
                accm[t] = _mm256_fmadd_ps(_mm256_set1_ps(S.dmin * dx), _mm256_cvtepi32_ps(mins), accm[t]);
            }
        }
    }
    for (int t = 0; t < nt; t++) out[t] = hsum8(acc[t]) - (sb_has_min(kind) ? hsum8(accm[t]) : 0.0f);
}

#ifdef ISA_AVX512
static inline __m512 load16_float(int kind, const uint8_t *w, int64_t i) {
    if (kind == KIND_F32) return _mm512_loadu_ps((const float *)w + i);
    const __m256i h = load32(w + 2 * i);
    if (kind == KIND_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

KERNEL dot_float(int kind, int nt, const uint8_t *w, const acts *X, int64_t t0, float *out) {
    const int64_t k = X->k;
    __m256 a0[NT], a1[NT];
    for (int t = 0; t < nt; t++) a0[t] = a1[t] = _mm256_setzero_ps();
    int64_t i = 0;
#ifdef ISA_AVX512
    __m512 b0[NT], b1[NT]; /* 32 elements a step */
    for (int t = 0; t < nt; t++) b0[t] = b1[t] = _mm512_setzero_ps();
    for (; i + 32 <= k; i += 32) {
        const __m512 w0 = load16_float(kind, w, i), w1 = load16_float(kind, w, i + 16);
        for (int t = 0; t < nt; t++) {
            const float *x = X->f + (t0 + t) * k + i;
            b0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x), b0[t]);
            b1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16), b1[t]);
        }
    }
    for (int t = 0; t < nt; t++) a0[t] = fold512(_mm512_add_ps(b0[t], b1[t]));
#endif
    for (; i + 16 <= k; i += 16) {
        const __m256 w0 = load8_float(kind, w, i), w1 = load8_float(kind, w, i + 8);
        for (int t = 0; t < nt; t++) {
            const float *x = X->f + (t0 + t) * k + i;
            a0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), a0[t]);
            a1[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 8), a1[t]);
        }
    }
    if (i + 8 <= k) {
        const __m256 w0 = load8_float(kind, w, i);
        for (int t = 0; t < nt; t++) a0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(X->f + (t0 + t) * k + i), a0[t]);
        i += 8;
    }
    for (int t = 0; t < nt; t++) {
        float s = hsum8(_mm256_add_ps(a0[t], a1[t]));
        for (int64_t j = i; j < k; j++) s += load1_float(kind, w, j) * X->f[(t0 + t) * k + j];
        out[t] = s;
    }
}

/* ------------------------------------------------------------------------------------------ drivers */
typedef void (*rows_fn)(const qmat *W, int64_t r0, int64_t r1, const acts *X, int64_t t0, int nt, float *y,
                        int64_t ldy, int add);

#define ROWS_LOOP(dot, kind, NTC)                                                                          \
    for (int64_t r = r0; r < r1; r++) {                                                                    \
        float out[NT];                                                                                     \
        dot(kind, NTC, W->data + r * W->row_bytes, X, t0, out);                                            \
        for (int t = 0; t < NTC; t++) {                                                                    \
            float *o = y + (t0 + t) * ldy + r;                                                             \
            *o = add ? *o + out[t] : out[t];                                                               \
        }                                                                                                  \
    }

/* rows [r0, r1) of W against activation rows [t0, t0 + nt), one specialized loop per nt */
#define DEFINE_ROWS(name, dot, kind)                                                                       \
    static void name(const qmat *W, int64_t r0, int64_t r1, const acts *X, int64_t t0, int nt, float *y,   \
                     int64_t ldy, int add) {                                                               \
        switch (nt) {                                                                                      \
        case 1: ROWS_LOOP(dot, kind, 1) break;                                                             \
        case 2: ROWS_LOOP(dot, kind, 2) break;                                                             \
        case 3: ROWS_LOOP(dot, kind, 3) break;                                                             \
        default: ROWS_LOOP(dot, kind, 4) break;                                                            \
        }                                                                                                  \
    }

DEFINE_ROWS(rows_f32, dot_float, KIND_F32)
DEFINE_ROWS(rows_f16, dot_float, KIND_F16)
DEFINE_ROWS(rows_bf16, dot_float, KIND_BF16)
DEFINE_ROWS(rows_q4_0, dot_legacy, KIND_Q4_0)
DEFINE_ROWS(rows_q4_1, dot_legacy, KIND_Q4_1)
DEFINE_ROWS(rows_q5_0, dot_legacy, KIND_Q5_0)
DEFINE_ROWS(rows_q5_1, dot_legacy, KIND_Q5_1)
DEFINE_ROWS(rows_q8_0, dot_legacy, KIND_Q8_0)
DEFINE_ROWS(rows_iq4_nl, dot_legacy, KIND_IQ4_NL)
DEFINE_ROWS(rows_q2_k, dot_k, KIND_Q2_K)
DEFINE_ROWS(rows_q3_k, dot_k, KIND_Q3_K)
DEFINE_ROWS(rows_q4_k, dot_k, KIND_Q4_K)
DEFINE_ROWS(rows_q5_k, dot_k, KIND_Q5_K)
DEFINE_ROWS(rows_q6_k, dot_k, KIND_Q6_K)
DEFINE_ROWS(rows_iq4_xs, dot_k, KIND_IQ4_XS)

static rows_fn rows_for(int64_t kind) {
    switch (kind) {
    case KIND_F32: return rows_f32;
    case KIND_F16: return rows_f16;
    case KIND_BF16: return rows_bf16;
    case KIND_Q4_0: return rows_q4_0;
    case KIND_Q4_1: return rows_q4_1;
    case KIND_Q5_0: return rows_q5_0;
    case KIND_Q5_1: return rows_q5_1;
    case KIND_Q8_0: return rows_q8_0;
    case KIND_IQ4_NL: return rows_iq4_nl;
    case KIND_Q2_K: return rows_q2_k;
    case KIND_Q3_K: return rows_q3_k;
    case KIND_Q4_K: return rows_q4_k;
    case KIND_Q5_K: return rows_q5_k;
    case KIND_Q6_K: return rows_q6_k;
    case KIND_IQ4_XS: return rows_iq4_xs;
    default: return NULL;
    }
}

#define CHUNK 16 /* rows per work item */

static inline int64_t chunks_of(const qmat *W) { return (W->rows + CHUNK - 1) / CHUNK; }

static void matmul_chunks(const qmat *W, int64_t n_w, const acts *X, int64_t n, float *y, int64_t ldy, int add) {
    int64_t chunks = 0;
    for (int64_t i = 0; i < n_w; i++) chunks += chunks_of(&W[i]);
    #pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t i = 0, cc = c, col = 0; /* chunk c is chunk cc of matrix i, whose outputs start at column col */
        while (cc >= chunks_of(&W[i])) cc -= chunks_of(&W[i]), col += W[i].rows, i++;
        const int64_t r0 = cc * CHUNK, r1 = r0 + CHUNK < W[i].rows ? r0 + CHUNK : W[i].rows;
        const rows_fn f = rows_for(W[i].kind);
        /* each group of NT activation rows reuses the chunk's weight blocks from L1 */
        for (int64_t t0 = 0; t0 < n; t0 += NT)
            f(&W[i], r0, r1, X, t0, (int)(n - t0 < NT ? n - t0 : NT), y + col, ldy, add);
    }
}

void matmul_ws(const qmat *W, const acts *X, int64_t n, float *y, int64_t ldy, int add) {
    matmul_chunks(W, 1, X, n, y, ldy, add);
}

void matmul_list_ws(const qmat *W, int64_t n_w, const acts *X, int64_t n, float *y, int64_t ldy) {
    matmul_chunks(W, n_w, X, n, y, ldy, 0);
}

/* ----------------------------------------------------------------------------- entry points from Python */
/* 0 if every matrix has a supported kind, k and row size that fit its blocks, and the same k; else -2. */
static int check_mats(const qmat *W, int64_t n_w) {
    for (int64_t i = 0; i < n_w; i++) {
        const kind_info *ki = kind_of(W[i].kind);
        if (!ki || W[i].k != W[0].k || W[i].k % ki->elems || W[i].row_bytes < W[i].k / ki->elems * ki->bytes)
            return -2;
    }
    return 0;
}

/* y (n, sum of rows) = x (n, k) . [W_0; W_1; ...]^T: quantize x to the forms the matrices read, then the products.
 * 0 on success, -1 out of memory, -2 a bad matrix. */
int qmatmul(const qmat *W, int64_t n_w, const float *x, int64_t n, float *y, int64_t nthreads) {
    if (n_w < 1 || check_mats(W, n_w)) return -2;
    const int64_t k = W[0].k;
    int64_t ldy = 0;
    for (int64_t i = 0; i < n_w; i++) ldy += W[i].rows;
    void *buf = malloc(acts_bytes(n, k) + 1);
    if (!buf) return -1;
    acts X;
    acts_init(&X, buf, x, n, k);
    const int needs = act_needs_list(W, n_w);
    #pragma omp parallel num_threads((int)nthreads)
    {
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < n; t++) quantize_acts_row(&X, t, 0, k, needs);
        matmul_list_ws(W, n_w, &X, n, y, ldy);
    }
    free(buf);
    return 0;
}

/* float32 -> bfloat16 rounded to nearest even (as torch converts): the top half of bits + 0x7FFF + its last bit. */
static inline uint16_t bf16_of(uint32_t b) { return (uint16_t)((b + 0x7FFF + ((b >> 16) & 1)) >> 16); }

static void to_bf16(const float *x, int64_t n, uint16_t *out) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m256i h[2];
        for (int i = 0; i < 2; i++) {
            const __m256i b = _mm256_castps_si256(_mm256_loadu_ps(x + j + 8 * i));
            const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
            h[i] = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
        }
        /* 16 values of 16 bits in order: pack within lanes, then put the 64-bit quarters back in order */
        _mm256_storeu_si256((__m256i *)(out + j), _mm256_permute4x64_epi64(_mm256_packus_epi32(h[0], h[1]), 0xD8));
    }
    for (; j < n; j++) {
        uint32_t b;
        memcpy(&b, &x[j], 4);
        out[j] = bf16_of(b);
    }
}

/* Rows rows[0..n) of W (rows NULL: rows 0..n) as float32, or bfloat16 (rounded to nearest even) if bf16.
 * 0 on success, -1 out of memory, -2 a bad matrix. */
int dequant_rows(const qmat *W, const int64_t *rows, int64_t n, void *out, int64_t bf16, int64_t nthreads) {
    if (check_mats(W, 1)) return -2;
    const int64_t k = W->k;
    int failed = 0;
    #pragma omp parallel num_threads((int)nthreads) if (n * k > (1 << 16))
    {
        float *tmp = bf16 ? malloc((size_t)k * sizeof(float)) : NULL;
        if (bf16 && !tmp) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i++) {
            const int64_t r = rows ? rows[i] : i;
            if (!bf16) {
                dequant_row(W, r, (float *)out + i * k);
            } else if (tmp) {
                dequant_row(W, r, tmp);
                to_bf16(tmp, k, (uint16_t *)out + i * k);
            }
        }
        free(tmp);
    }
    return failed ? -1 : 0;
}
