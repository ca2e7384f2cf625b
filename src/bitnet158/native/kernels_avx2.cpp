// AVX2 kernels (Haswell / Zen 1 and later). Compiled per function with a target attribute,
// never with -march, and only called when CPUID reports AVX2 and FMA.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels.h"

#if defined(BITNET158_X86)
#include <immintrin.h>

#define BITNET158_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace bitnet158 {

// The 4 horizontal sums of a, b, c, d as one int32x4.
BITNET158_AVX2 static inline __m128i hsum4(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

BITNET158_AVX2 float quantize_row_avx2(const float* x, int64_t k, int8_t* q) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vmax = _mm256_setzero_ps(), vnan = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {  // max(a, b) returns b when a is NaN: NaNs are ignored
        const __m256 v = _mm256_loadu_ps(x + i);
        vmax = _mm256_max_ps(_mm256_and_ps(v, absmask), vmax);
        vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    float amax = 0.0f;
    for (float a : lanes)
        amax = a > amax ? a : amax;
    bool has_nan = _mm256_movemask_ps(vnan) != 0;
    for (; i < k; ++i) {
        const float a = __builtin_fabsf(x[i]);
        amax = a > amax ? a : amax;
        has_nan |= a != a;
    }
    const float s = row_scale(amax, has_nan);
    const __m256 vs = _mm256_set1_ps(s);
    // 32 values per step: cvtps (half to even) -> saturating packs -> undo the lane interleave.
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (i = 0; i + 32 <= k; i += 32) {
        __m256i r[4];
        for (int j = 0; j < 4; ++j)
            r[j] = _mm256_cvtps_epi32(
                _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), vs),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        const __m256i p16 =
            _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i),
                            _mm256_permutevar8x32_epi32(p16, order));
    }
    for (; i < k; ++i)
        q[i] = quantize_value(x[i] * s);
    return s;
}

BITNET158_AVX2 static inline __m256i ld(const int8_t* a) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
}

// 4 rows x NT tokens, 32 bytes (half a row block) at a time. maddubs (u8 codes x s8
// activations -> int16 pairs, |pair| <= 2*2*128 = 512) never saturates; the 8 products of a
// row block are summed in int16 (|sum| <= 4096) and widened once with madd.
template <int NT>
BITNET158_AVX2 static inline void tile(const uint8_t* group, int64_t nblocks, const int8_t* x,
                                       int64_t ldx, int32_t dots[kMaxTileTokens][kRows],
                                       bool fetch) {
    __m256i acc[kRows][NT];
    for (int r = 0; r < kRows; ++r)
        for (int t = 0; t < NT; ++t)
            acc[r][t] = _mm256_setzero_si256();
    const __m256i mask = _mm256_set1_epi8(3);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < nblocks; ++b) {
        const uint8_t* w = group + b * kBlock;
        const int8_t* xb = x + b * kBlock;
        if (fetch)  // the group's first token tile streams it from memory
            prefetch_ahead(w);
#pragma GCC unroll 4
        for (int r = 0; r < kRows; ++r) {
            __m256i s16[NT];
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h) {
                const __m256i p = ld(reinterpret_cast<const int8_t*>(w + 64 * r + 32 * h));
                const __m256i c0 = _mm256_and_si256(p, mask);
                const __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(p, 2), mask);
                const __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(p, 4), mask);
                const __m256i c3 = _mm256_and_si256(_mm256_srli_epi16(p, 6), mask);
#pragma GCC unroll 4
                for (int t = 0; t < NT; ++t) {
                    const int8_t* xt = xb + t * ldx + 32 * h;
                    const __m256i s01 = _mm256_add_epi16(_mm256_maddubs_epi16(c0, ld(xt)),
                                                         _mm256_maddubs_epi16(c1, ld(xt + 64)));
                    const __m256i s23 = _mm256_add_epi16(_mm256_maddubs_epi16(c2, ld(xt + 128)),
                                                         _mm256_maddubs_epi16(c3, ld(xt + 192)));
                    const __m256i s = _mm256_add_epi16(s01, s23);
                    s16[t] = h == 0 ? s : _mm256_add_epi16(s16[t], s);
                }
            }
            for (int t = 0; t < NT; ++t)
                acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(s16[t], ones));
        }
    }
    for (int t = 0; t < NT; ++t)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dots[t]),
                         hsum4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]));
}

BITNET158_AVX2 void gemm_groups_avx2(const int8_t* x_q, const int32_t* x_sum, int64_t T,
                                     int64_t kpad, const uint8_t* packed, int64_t n, int64_t g0,
                                     int64_t g1, const GemmOut& out) {
    constexpr int64_t kTile = 2;  // 4 rows x 2 tokens: 8 accumulators fit the 16 ymm registers
    const int64_t nblocks = kpad / kBlock;
    int32_t dots[kMaxTileTokens][kRows];
    for (int64_t g = g0; g < g1; ++g) {
        const uint8_t* group = packed + g * kpad;
        for (int64_t t0 = 0; t0 < T; t0 += kTile) {
            const int64_t nt = T - t0 < kTile ? T - t0 : kTile;
            const int8_t* x = x_q + t0 * kpad;
            const bool fetch = t0 == 0 && (T > 1 || prefetch_gemv);  // kernels.h
            if (nt == 1)
                tile<1>(group, nblocks, x, kpad, dots, fetch);
            else
                tile<2>(group, nblocks, x, kpad, dots, fetch);
            for (int r = 0; r < kRows && g * kRows + r < n; ++r)
                for (int64_t t = 0; t < nt; ++t)
                    out.store(t0 + t, g * kRows + r, dots[t][r] - x_sum[t0 + t]);
        }
    }
}

BITNET158_AVX2 int64_t multiply_adds_avx2(int64_t iters) {
    const __m256i u = _mm256_set1_epi8(1);
    __m256i a0 = _mm256_set1_epi8(1), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
    __m256i a6 = a0, a7 = a0, a8 = a0, a9 = a0, a10 = a0, a11 = a0;
    // 12 independent chains (each product feeds the next as its signed bytes), in asm so that
    // the compiler keeps them as written
#define BITNET158_MADDUBS(a) asm("vpmaddubsw %1, %2, %0" : "=x"(a) : "x"(a), "x"(u));
    for (int64_t i = 0; i < iters; ++i) {
        BITNET158_MADDUBS(a0)
        BITNET158_MADDUBS(a1)
        BITNET158_MADDUBS(a2)
        BITNET158_MADDUBS(a3)
        BITNET158_MADDUBS(a4)
        BITNET158_MADDUBS(a5)
        BITNET158_MADDUBS(a6)
        BITNET158_MADDUBS(a7)
        BITNET158_MADDUBS(a8)
        BITNET158_MADDUBS(a9)
        BITNET158_MADDUBS(a10)
        BITNET158_MADDUBS(a11)
    }
#undef BITNET158_MADDUBS
    const __m256i sum = _mm256_xor_si256(
        _mm256_xor_si256(_mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3)),
                         _mm256_xor_si256(_mm256_xor_si256(a4, a5), _mm256_xor_si256(a6, a7))),
        _mm256_xor_si256(_mm256_xor_si256(a8, a9), _mm256_xor_si256(a10, a11)));
    volatile int sink = _mm256_extract_epi32(sum, 0);  // keeps every chain
    (void)sink;
    return iters * 12 * 32;
}

// ---- float kernels: attention and the output layer ----

BITNET158_AVX2 static inline float hsum8(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

BITNET158_AVX2 static inline float hmax8(__m256 v) {
    const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}

// e^x: 2^n * p(r) as in the AVX-512 kernel; 0 below -87, inf above 88.
BITNET158_AVX2 static inline __m256 exp_neg(__m256 x) {
    const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    const __m256 huge = _mm256_cmp_ps(x, _mm256_set1_ps(88.0f), _CMP_GT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    // inf selected, not or-ed in: inf's bits or-ed with a finite value's made a NaN (SwiGLU
    // returned NaN for gates below -88)
    return _mm256_blendv_ps(_mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e))),
                            _mm256_set1_ps(__builtin_inff()), huge);
}

BITNET158_AVX2 static inline __m256 load8(const void* p, Dtype t, int64_t i) {
    if (t == Dtype::f16)
        return _mm256_cvtph_ps(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
    if (t == Dtype::bf16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(
                reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i))),
            16));
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
}

// Scores of G heads (rows of q, length d) against one tile of keys (see kKeyTile), those of its
// first cnt keys: s[g * ld + c] = (q_g . key_c) * scale, each an FMA chain over the dimensions
// in order, 8 keys per vector. One tile's vectors feed all G heads. `next` (or null): the next
// tile, fetched into L1 a dimension at a time (a one-token step's keys come from DRAM).
template <int G>
BITNET158_AVX2 static void score_tile(const float* q, int64_t d, const void* tile, Dtype kv,
                                      float scale, float* s, int64_t ld, int64_t cnt,
                                      const char* next) {
    __m256 acc[G][2];
    for (int g = 0; g < G; ++g)
        acc[g][0] = acc[g][1] = _mm256_setzero_ps();
    const int64_t es = dtype_size(kv);
    for (int64_t i = 0; i < d; ++i) {
        if (next)
            _mm_prefetch(next + i * kKeyTile * es, _MM_HINT_T0);
        const __m256 k0 = load8(tile, kv, i * kKeyTile), k1 = load8(tile, kv, i * kKeyTile + 8);
        for (int g = 0; g < G; ++g) {
            const __m256 qg = _mm256_broadcast_ss(q + g * d + i);
            acc[g][0] = _mm256_fmadd_ps(qg, k0, acc[g][0]);
            acc[g][1] = _mm256_fmadd_ps(qg, k1, acc[g][1]);
        }
    }
    const __m256 vscale = _mm256_set1_ps(scale);
    for (int g = 0; g < G; ++g) {
        alignas(32) float r[kKeyTile];
        _mm256_store_ps(r, _mm256_mul_ps(acc[g][0], vscale));
        _mm256_store_ps(r + 8, _mm256_mul_ps(acc[g][1], vscale));
        std::memcpy(s + g * ld, r, size_t(cnt) * sizeof(float));
    }
}

// Value rows a first pass fetches ahead of the one it weighs: a one-token step's values come
// from DRAM, and each row takes only a few cycles.
constexpr int64_t kValuesAhead = 64;

// out[g][i0, i0 + 8W) = sum_j p[g * n + j] v[j][i0, i0 + 8W) for G heads, values [n, d] f16 or
// f32, each output one FMA chain over j in order. The counts are template arguments so that the
// G x W accumulators stay in registers (GCC kept runtime-sized ones on the stack). `fetch`: the
// rows kValuesAhead ahead are fetched into L1 (the first pass over the values).
template <int G, int W, bool F16>
BITNET158_AVX2 static void weigh_values_pass(const float* p, int64_t n, const void* values,
                                             int64_t d, int64_t i0, float* out, bool fetch) {
    __m256 acc[G][W];
    for (int g = 0; g < G; ++g)
        for (int c = 0; c < W; ++c)
            acc[g][c] = _mm256_setzero_ps();
    const int64_t row_bytes = d * (F16 ? 2 : 4);
    for (int64_t j = 0; j < n; ++j) {
        if (fetch && j + kValuesAhead < n)
            prefetch_lines(static_cast<const char*>(values) + (j + kValuesAhead) * row_bytes,
                           row_bytes);
        __m256 v[W];
        for (int c = 0; c < W; ++c)
            v[c] = load8(values, F16 ? Dtype::f16 : Dtype::f32, j * d + i0 + 8 * c);
        for (int g = 0; g < G; ++g) {
            const __m256 pg = _mm256_set1_ps(p[g * n + j]);
            for (int c = 0; c < W; ++c)
                acc[g][c] = _mm256_fmadd_ps(pg, v[c], acc[g][c]);
        }
    }
    for (int g = 0; g < G; ++g)
        for (int c = 0; c < W; ++c)
            _mm256_storeu_ps(out + g * d + i0 + 8 * c, acc[g][c]);
}

// All of d (a multiple of 8): passes of 32 values, then one of the 8, 16 or 24 left (`fetch`:
// the first pass fetches the rows ahead).
template <int G, bool F16>
BITNET158_AVX2 static void weigh_values(const float* p, int64_t n, const void* values, int64_t d,
                                        float* out, bool fetch) {
    int64_t i0 = 0;
    for (; i0 + 32 <= d; i0 += 32)
        weigh_values_pass<G, 4, F16>(p, n, values, d, i0, out, fetch && i0 == 0);
    const bool first = fetch && i0 == 0;
    switch ((d - i0) / 8) {
        case 3: weigh_values_pass<G, 3, F16>(p, n, values, d, i0, out, first); break;
        case 2: weigh_values_pass<G, 2, F16>(p, n, values, d, i0, out, first); break;
        case 1: weigh_values_pass<G, 1, F16>(p, n, values, d, i0, out, first); break;
        default: break;
    }
}

using WeighValuesFn = void (*)(const float*, int64_t, const void*, int64_t, float*, bool);
static constexpr WeighValuesFn kWeighValues[2][2] = {  // [values are f16][G - 1]
    {weigh_values<1, false>, weigh_values<2, false>},
    {weigh_values<1, true>, weigh_values<2, true>},
};

BITNET158_AVX2 static void attend_position(const float* q, int64_t group, const void* keys,
                                           const void* values, Dtype kv, int64_t n, int64_t d,
                                           float scale, float* scores, float* out) {
    if (d % 8) {
        attend_position_scalar(q, group, keys, values, kv, n, d, scale, scores, out);
        return;
    }
    const int64_t es = dtype_size(kv);
    for (int64_t g0 = 0; g0 < group; g0 += 4) {
        const int64_t G = group - g0 < 4 ? group - g0 : 4;
        for (int64_t j0 = 0; j0 < n; j0 += kKeyTile) {
            const void* tile = static_cast<const char*>(keys) + j0 * d * es;
            const int64_t cnt = std::min(kKeyTile, n - j0);
            float* sj = scores + g0 * n + j0;
            // the first heads' pass fetches the next tile (when it holds keys)
            const char* next = g0 == 0 && j0 + kKeyTile < n
                                   ? static_cast<const char*>(tile) + kKeyTile * d * es
                                   : nullptr;
            switch (G) {
                case 1: score_tile<1>(q + g0 * d, d, tile, kv, scale, sj, n, cnt, next); break;
                case 2: score_tile<2>(q + g0 * d, d, tile, kv, scale, sj, n, cnt, next); break;
                case 3: score_tile<3>(q + g0 * d, d, tile, kv, scale, sj, n, cnt, next); break;
                default: score_tile<4>(q + g0 * d, d, tile, kv, scale, sj, n, cnt, next); break;
            }
        }
    }
    for (int64_t g = 0; g < group; ++g) {
        float* sg = scores + g * n;
        __m256 vmax = _mm256_set1_ps(-__builtin_inff());
        int64_t j = 0;
        for (; j + 8 <= n; j += 8)
            vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(sg + j));
        float m = hmax8(vmax);
        for (; j < n; ++j)
            m = sg[j] > m ? sg[j] : m;
        const __m256 vm = _mm256_set1_ps(m);
        __m256 vsum = _mm256_setzero_ps();
        for (j = 0; j + 8 <= n; j += 8) {
            const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(sg + j), vm));
            _mm256_storeu_ps(sg + j, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        float sum = hsum8(vsum);
        for (; j < n; ++j) {
            sg[j] = std::exp(sg[j] - m);
            sum += sg[j];
        }
        const float inv = 1.0f / sum;
        for (j = 0; j < n; ++j)
            sg[j] *= inv;
    }
    // out[g] = sum_j p[g, j] v[j], up to 2 heads at a time
    for (int64_t g0 = 0; g0 < group; g0 += 2) {
        const int64_t G = group - g0 < 2 ? group - g0 : 2;
        kWeighValues[kv == Dtype::f16][G - 1](scores + g0 * n, n, values, d, out + g0 * d,
                                              g0 == 0);
    }
}

BITNET158_AVX2 void attend_avx2(const float* q, int64_t ldq, int64_t npos, int64_t group,
                                const void* keys, const void* values, Dtype kv, int64_t n0,
                                int64_t d, float scale, float* scores, float* out, int64_t ldo) {
    for (int64_t i = 0; i < npos; ++i)
        attend_position(q + i * ldq, group, keys, values, kv, n0 + i, d, scale, scores,
                        out + i * ldo);
}

// s + x[i, k) . row[i, k), one value at a time: the float output layer's tail after its
// 16-chunks, added to their sum s.
BITNET158_AVX2 static inline float add_tail(float s, const float* x, const void* row, Dtype wt,
                                            int64_t i, int64_t k) {
    for (; i < k; ++i)
        s += x[i] * load_float(row, wt, i);
    return s;
}

// One row x NT tokens of the float output layer (batches): each chunk of 16 weights is converted
// once for all NT tokens. Per token: two 8-lane FMA chains over the 16-chunks, their sum reduced,
// then the tail, the order of the one-token loop below (a batch does not change a logit).
template <int NT>
BITNET158_AVX2 static void float_row_tokens(const float* h, int64_t k, const void* row, Dtype wt,
                                            int64_t r, int64_t t0, float* out, int64_t ldo) {
    __m256 a0[NT], a1[NT];
    for (int t = 0; t < NT; ++t)
        a0[t] = a1[t] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
        const __m256 w0 = load8(row, wt, i), w1 = load8(row, wt, i + 8);
        for (int t = 0; t < NT; ++t) {
            const float* x = h + (t0 + t) * k;
            a0[t] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), w0, a0[t]);
            a1[t] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), w1, a1[t]);
        }
    }
    for (int t = 0; t < NT; ++t) {
        const float* x = h + (t0 + t) * k;
        out[(t0 + t) * ldo + r] = add_tail(hsum8(_mm256_add_ps(a0[t], a1[t])), x, row, wt, i, k);
    }
}

using FloatRowTokensFn = void (*)(const float*, int64_t, const void*, Dtype, int64_t, int64_t,
                                  float*, int64_t);
static constexpr FloatRowTokensFn kFloatRowTokens[4] = {
    float_row_tokens<1>, float_row_tokens<2>, float_row_tokens<3>, float_row_tokens<4>};

// Row by row; batches in tiles of 4 tokens. One token has its own plain loop: the same sums as
// float_row_tokens<1>, but that template's code streamed the F16 head ~20 % slower on Zen 4
// (identical hot loop as far as the disassembly shows; measured, not explained).
BITNET158_AVX2 void float_rows_avx2(const float* h, int64_t T, int64_t k, const void* w, Dtype wt,
                                    int64_t r0, int64_t r1, float* out, int64_t ldo) {
    const int64_t es = dtype_size(wt);
    for (int64_t r = r0; r < r1; ++r) {
        const void* row = static_cast<const char*>(w) + r * k * es;
        if (T == 1) {
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            int64_t i = 0;
            for (; i + 16 <= k; i += 16) {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(h + i), load8(row, wt, i), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(h + i + 8), load8(row, wt, i + 8), a1);
            }
            out[r] = add_tail(hsum8(_mm256_add_ps(a0, a1)), h, row, wt, i, k);
            continue;
        }
        for (int64_t t0 = 0; t0 < T; t0 += 4)
            kFloatRowTokens[(T - t0 < 4 ? T - t0 : 4) - 1](h, k, row, wt, r, t0, out, ldo);
    }
}

BITNET158_AVX2 void int8_rows_avx2(const int8_t* x_q, int64_t T, int64_t kpad, const int8_t* w,
                                   const int32_t* w_sum, int64_t r0, int64_t r1, int32_t* out,
                                   int64_t ldo) {
    (void)w_sum;
    // maddubs(|x|, w * sign(x)): |x| <= 128 and |w| <= 127, so the int16 pair sums never saturate
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t r = r0; r < r1; ++r) {
        const int8_t* wr = w + r * kpad;
        for (int64_t t = 0; t < T; ++t) {
            const int8_t* x = x_q + t * kpad;
            __m256i acc = _mm256_setzero_si256();
            for (int64_t i = 0; i < kpad; i += 32) {
                const __m256i xv = ld(x + i), wv = ld(wr + i);
                const __m256i p =
                    _mm256_maddubs_epi16(_mm256_sign_epi8(xv, xv), _mm256_sign_epi8(wv, xv));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
            }
            const __m128i s =
                _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
            const __m128i t2 = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
            out[t * ldo + r] = _mm_cvtsi128_si32(_mm_add_epi32(t2, _mm_shuffle_epi32(t2, 0xb1)));
        }
    }
}

BITNET158_AVX2 void silu_mul_avx2(float* g, const float* u, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 e = exp_neg(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_storeu_ps(
            g + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
    silu_mul_scalar(g + i, u + i, n - i);
}

BITNET158_AVX2 void half_row_avx2(const float* x, int64_t n, uint16_t* out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    half_row_scalar(x + i, n - i, out + i);
}

BITNET158_AVX2 void q4_rows_avx2(const int8_t* x_q, const int32_t* x_corr, const float* inv_s,
                                 int64_t T, int64_t kpad, const uint8_t* w, const uint16_t* d,
                                 int64_t r0, int64_t r1, float* out, int64_t ldo) {
    const __m256i low = _mm256_set1_epi8(15);
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t blocks = kpad / kQ4Block;
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* wr = w + r * (kpad / 2);
        const uint16_t* dr = d + r * (kpad / 32);
        for (int64_t t = 0; t < T; ++t) {
            const int8_t* x = x_q + t * kpad;
            const int32_t* corr = x_corr + t * (kpad / 16);
            __m256 acc = _mm256_setzero_ps();
            for (int64_t blk = 0; blk < blocks; ++blk) {
                const int8_t* xb = x + kQ4Block * blk;
                // int32 lane g: group g, its lanes g (h = 0) and 8 + g (h = 1) of Q4RowsFn
                __m256i s = _mm256_add_epi32(
                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr + 16 * blk)),
                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr + 16 * blk + 8)));
                for (int i = 0; i < 4; ++i) {  // bytes 32i: L = i / 2, h = i % 2
                    const __m256i p =
                        ld(reinterpret_cast<const int8_t*>(wr + kQ4Block / 2 * blk + 32 * i));
                    const int64_t at = 128 * (i / 2) + 32 * (i % 2);  // step 2L, lanes 8h..8h+7
                    // maddubs: |pair| <= 2 * 15 * 128, no saturation
                    s = _mm256_add_epi32(
                        s, _mm256_madd_epi16(
                               _mm256_maddubs_epi16(_mm256_and_si256(p, low), ld(xb + at)), ones));
                    s = _mm256_add_epi32(
                        s, _mm256_madd_epi16(
                               _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(p, 4), low),
                                                    ld(xb + at + 64)),
                               ones));
                }
                const __m128i dh = _mm_loadu_si128(reinterpret_cast<const __m128i*>(dr + 8 * blk));
                const __m256 ds = _mm256_cvtph_ps(dh);
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), ds, acc);
            }
            out[t * ldo + r] = hsum8(acc) * inv_s[t];
        }
    }
}

}  // namespace bitnet158

#endif  // BITNET158_X86
