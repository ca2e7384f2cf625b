// AVX2 kernels (Haswell / Zen 1 and later). Compiled per function with a target attribute,
// never with -march, and only called when CPUID reports AVX2 and FMA.
#include "kernels.h"

#if defined(BITNET158_X86)
#include <immintrin.h>

#define BITNET158_AVX2 __attribute__((target("avx2,fma")))

namespace bitnet158 {

// The 4 horizontal sums of a, b, c, d as one int32x4.
BITNET158_AVX2 static inline __m128i hsum4(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

BITNET158_AVX2 float quantize_row_avx2(const float* x, int64_t k, int8_t* q) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vmax = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8)  // max(a, b) returns b when a is NaN: NaNs are ignored
        vmax = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), absmask), vmax);
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    float amax = 0.0f;
    for (float a : lanes) amax = a > amax ? a : amax;
    for (; i < k; ++i) {
        const float a = __builtin_fabsf(x[i]);
        amax = a > amax ? a : amax;
    }
    const float s = activation_scale(amax);
    const __m256 vs = _mm256_set1_ps(s);
    // 32 values per step: cvtps (half to even) -> saturating packs -> undo the lane interleave.
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (i = 0; i + 32 <= k; i += 32) {
        __m256i r[4];
        for (int j = 0; j < 4; ++j)
            r[j] = _mm256_cvtps_epi32(_mm256_round_ps(
                _mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), vs),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        const __m256i p16 = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]),
                                               _mm256_packs_epi32(r[2], r[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i),
                            _mm256_permutevar8x32_epi32(p16, order));
    }
    for (; i < k; ++i) q[i] = quantize_value(x[i] * s);
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
                                       int64_t ldx, int32_t dots[kMaxTileTokens][kRows]) {
    __m256i acc[kRows][NT];
    for (int r = 0; r < kRows; ++r)
        for (int t = 0; t < NT; ++t) acc[r][t] = _mm256_setzero_si256();
    const __m256i mask = _mm256_set1_epi8(3);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < nblocks; ++b) {
        const uint8_t* w = group + b * kBlock;
        const int8_t* xb = x + b * kBlock;
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
            if (nt == 1)
                tile<1>(group, nblocks, x, kpad, dots);
            else
                tile<2>(group, nblocks, x, kpad, dots);
            for (int r = 0; r < kRows && g * kRows + r < n; ++r)
                for (int64_t t = 0; t < nt; ++t)
                    out.store(t0 + t, g * kRows + r, dots[t][r] - x_sum[t0 + t]);
        }
    }
}

}  // namespace bitnet158

#endif  // BITNET158_X86
