// AVX-512 VNNI kernels (Ice Lake / Zen 4 and later). Compiled per function with a target
// attribute, never with -march, and only called when CPUID reports every feature below.
#include "kernels.h"

#if defined(BITNET158_X86)
#include <immintrin.h>

#define BITNET158_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

namespace bitnet158 {

BITNET158_AVX512 float quantize_row_avx512(const float* x, int64_t k, int8_t* q) {
    __m512 vmax = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= k; i += 16)  // max(a, b) returns b when a is NaN: NaNs are ignored
        vmax = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + i)), vmax);
    if (i < k) {
        const __mmask16 tail = static_cast<__mmask16>((1u << (k - i)) - 1);
        vmax = _mm512_max_ps(_mm512_abs_ps(_mm512_maskz_loadu_ps(tail, x + i)), vmax);
    }
    const float s = activation_scale(_mm512_reduce_max_ps(vmax));
    const __m512 vs = _mm512_set1_ps(s);
    for (i = 0; i + 16 <= k; i += 16) {
        const __m512i r = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), vs),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtsepi32_epi8(r));
    }
    for (; i < k; ++i) q[i] = quantize_value(x[i] * s);
    return s;
}

// 64 bytes of weights as two 256-bit loads. Measured on Zen 4 (which splits 512-bit loads
// anyway): streaming weights from DRAM with _mm512_loadu_si512 ran at half speed when the array
// was not 64-byte aligned (numpy and mmap give 16 or 8), and ~20 % slower even when aligned.
// Activations come from dispatch's 64-byte aligned buffer and are loaded whole.
BITNET158_AVX512 static inline __m512i load64(const void* p) {
    const __m256i* q = static_cast<const __m256i*>(p);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(q)),
                              _mm256_loadu_si256(q + 1), 1);
}

// The 4 horizontal sums of a, b, c, d as one int32x4: transposing adds, not 4 separate reductions.
BITNET158_AVX512 static inline __m128i hsum4(__m512i a, __m512i b, __m512i c, __m512i d) {
    const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
    const __m512i abcd =  // every 128-bit lane: partial sums of a, b, c, d
        _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
    const __m256i half = _mm256_add_epi32(_mm512_castsi512_si256(abcd),
                                          _mm512_extracti64x4_epi64(abcd, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1));
}

// 4 rows x NT tokens: every 64-byte weight load is unpacked once (4 planes of 64 k values) and
// multiplied into NT activation rows with vpdpbusd (u8 codes x s8 activations -> int32).
template <int NT>
BITNET158_AVX512 static inline void tile(const uint8_t* group, int64_t nblocks, const int8_t* x,
                                         int64_t ldx, int32_t dots[kMaxTileTokens][kRows]) {
    __m512i acc[kRows][NT];
    for (int r = 0; r < kRows; ++r)
        for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_si512();
    const __m512i mask = _mm512_set1_epi8(3);
    for (int64_t b = 0; b < nblocks; ++b) {
        const uint8_t* w = group + b * kBlock;
        const int8_t* xb = x + b * kBlock;
#pragma GCC unroll 4
        for (int r = 0; r < kRows; ++r) {
            const __m512i p = load64(w + 64 * r);
            const __m512i c0 = _mm512_and_si512(p, mask);
            const __m512i c1 = _mm512_and_si512(_mm512_srli_epi16(p, 2), mask);
            const __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(p, 4), mask);
            const __m512i c3 = _mm512_and_si512(_mm512_srli_epi16(p, 6), mask);
#pragma GCC unroll 4
            for (int t = 0; t < NT; ++t) {
                const int8_t* xt = xb + t * ldx;
                __m512i a = acc[r][t];
                a = _mm512_dpbusd_epi32(a, c0, _mm512_loadu_si512(xt));
                a = _mm512_dpbusd_epi32(a, c1, _mm512_loadu_si512(xt + 64));
                a = _mm512_dpbusd_epi32(a, c2, _mm512_loadu_si512(xt + 128));
                a = _mm512_dpbusd_epi32(a, c3, _mm512_loadu_si512(xt + 192));
                acc[r][t] = a;
            }
        }
    }
    for (int t = 0; t < NT; ++t)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dots[t]),
                         hsum4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]));
}

// Decode (one token): two accumulator chains per row so vpdpbusd latency never limits a
// memory-bound stream.
BITNET158_AVX512 static inline void tile_gemv(const uint8_t* group, int64_t nblocks,
                                              const int8_t* x,
                                              int32_t dots[kMaxTileTokens][kRows]) {
    __m512i acc0[kRows], acc1[kRows];
    for (int r = 0; r < kRows; ++r) acc0[r] = acc1[r] = _mm512_setzero_si512();
    const __m512i mask = _mm512_set1_epi8(3);
    for (int64_t b = 0; b < nblocks; ++b) {
        const uint8_t* w = group + b * kBlock;
        const int8_t* xb = x + b * kBlock;
        const __m512i x0 = _mm512_loadu_si512(xb), x1 = _mm512_loadu_si512(xb + 64);
        const __m512i x2 = _mm512_loadu_si512(xb + 128), x3 = _mm512_loadu_si512(xb + 192);
#pragma GCC unroll 4
        for (int r = 0; r < kRows; ++r) {
            const __m512i p = load64(w + 64 * r);
            acc0[r] = _mm512_dpbusd_epi32(acc0[r], _mm512_and_si512(p, mask), x0);
            acc1[r] = _mm512_dpbusd_epi32(acc1[r],
                                          _mm512_and_si512(_mm512_srli_epi16(p, 2), mask), x1);
            acc0[r] = _mm512_dpbusd_epi32(acc0[r],
                                          _mm512_and_si512(_mm512_srli_epi16(p, 4), mask), x2);
            acc1[r] = _mm512_dpbusd_epi32(acc1[r],
                                          _mm512_and_si512(_mm512_srli_epi16(p, 6), mask), x3);
        }
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dots[0]),
                     hsum4(_mm512_add_epi32(acc0[0], acc1[0]), _mm512_add_epi32(acc0[1], acc1[1]),
                           _mm512_add_epi32(acc0[2], acc1[2]), _mm512_add_epi32(acc0[3], acc1[3])));
}

BITNET158_AVX512 void gemm_groups_avx512(const int8_t* x_q, const int32_t* x_sum, int64_t T,
                                         int64_t kpad, const uint8_t* packed, int64_t n,
                                         int64_t g0, int64_t g1, const GemmOut& out) {
    const int64_t nblocks = kpad / kBlock;
    int32_t dots[kMaxTileTokens][kRows];
    for (int64_t g = g0; g < g1; ++g) {
        const uint8_t* group = packed + g * kpad;
        for (int64_t t0 = 0; t0 < T; t0 += kMaxTileTokens) {
            const int64_t nt = T - t0 < kMaxTileTokens ? T - t0 : kMaxTileTokens;
            const int8_t* x = x_q + t0 * kpad;
            switch (nt) {
                case 1: tile_gemv(group, nblocks, x, dots); break;
                case 2: tile<2>(group, nblocks, x, kpad, dots); break;
                case 3: tile<3>(group, nblocks, x, kpad, dots); break;
                default: tile<4>(group, nblocks, x, kpad, dots); break;
            }
            for (int r = 0; r < kRows && g * kRows + r < n; ++r)
                for (int64_t t = 0; t < nt; ++t)
                    out.store(t0 + t, g * kRows + r, dots[t][r] - x_sum[t0 + t]);
        }
    }
}

}  // namespace bitnet158

#endif  // BITNET158_X86
