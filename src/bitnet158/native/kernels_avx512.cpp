// AVX-512 VNNI kernels (Ice Lake / Zen 4 and later). Compiled per function with a target
// attribute, never with -march, and only called when CPUID reports every feature below.
#include "kernels.h"

#if defined(BITNET158_X86)
#include <immintrin.h>

#include <algorithm>

#define BITNET158_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c")))

namespace bitnet158 {

BITNET158_AVX512 float quantize_row_avx512(const float* x, int64_t k, int8_t* q) {
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 nan = 0;
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {  // max(a, b) returns b when a is NaN: NaNs are ignored
        const __m512 v = _mm512_loadu_ps(x + i);
        vmax = _mm512_max_ps(_mm512_abs_ps(v), vmax);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    if (i < k) {
        const __mmask16 tail = static_cast<__mmask16>((1u << (k - i)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(tail, x + i);
        vmax = _mm512_max_ps(_mm512_abs_ps(v), vmax);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    const float s = row_scale(_mm512_reduce_max_ps(vmax), nan != 0);
    const __m512 vs = _mm512_set1_ps(s);
    for (i = 0; i + 16 <= k; i += 16) {
        const __m512i r = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), vs),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtsepi32_epi8(r));
    }
    for (; i < k; ++i)
        q[i] = quantize_value(x[i] * s);
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
    const __m256i half =
        _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1));
}

// acc += u8 . s8 as _mm512_dpbusd_epi32, in place: with the intrinsic, GCC 12 copied the tiles'
// accumulators into temporaries and back, and stored some to the stack, on every block.
BITNET158_AVX512 static inline void dpbusd_into(__m512i& acc, __m512i u8, __m512i s8) {
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "vm"(s8));
}

// 4 rows x NT tokens: every 64-byte weight load is unpacked once (4 planes of 64 k values) and
// multiplied into NT activation rows with vpdpbusd (u8 codes x s8 activations -> int32).
template <int NT>
BITNET158_AVX512 static inline void tile(const uint8_t* group, int64_t nblocks, const int8_t* x,
                                         int64_t ldx, int32_t dots[kMaxTileTokens][kRows],
                                         bool fetch) {
    __m512i acc[kRows][NT];
    for (int r = 0; r < kRows; ++r)
        for (int t = 0; t < NT; ++t)
            acc[r][t] = _mm512_setzero_si512();
    const __m512i mask = _mm512_set1_epi8(3);
    for (int64_t b = 0; b < nblocks; ++b) {
        const uint8_t* w = group + b * kBlock;
        const int8_t* xb = x + b * kBlock;
        if (fetch)  // the first token tile over a block of groups streams it from memory
            prefetch_ahead(w);
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
                dpbusd_into(a, c0, _mm512_loadu_si512(xt));
                dpbusd_into(a, c1, _mm512_loadu_si512(xt + 64));
                dpbusd_into(a, c2, _mm512_loadu_si512(xt + 128));
                dpbusd_into(a, c3, _mm512_loadu_si512(xt + 192));
                acc[r][t] = a;
            }
        }
    }
    for (int t = 0; t < NT; ++t)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dots[t]),
                         hsum4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]));
}

// The full 4 rows x 4 tokens tile with its 16 accumulators as named variables: GCC does not
// keep an array of 16 vectors in registers (it copied and spilled them, ~30 % slower).
// a<row><token>, zeroed; then the tile's sums stored as dots[token][row].
#define BITNET158_ACC4X4                                                              \
    __m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00;            \
    __m512i a10 = a00, a11 = a00, a12 = a00, a13 = a00;                               \
    __m512i a20 = a00, a21 = a00, a22 = a00, a23 = a00;                               \
    __m512i a30 = a00, a31 = a00, a32 = a00, a33 = a00;
#define BITNET158_STORE4X4(dots)                                                      \
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dots[0]), hsum4(a00, a10, a20, a30)); \
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dots[1]), hsum4(a01, a11, a21, a31)); \
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dots[2]), hsum4(a02, a12, a22, a32)); \
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dots[3]), hsum4(a03, a13, a23, a33));
#define BITNET158_DOT4(acc, xt)                          \
    dpbusd_into(acc, c0, _mm512_loadu_si512(xt));       \
    dpbusd_into(acc, c1, _mm512_loadu_si512(xt + 64));  \
    dpbusd_into(acc, c2, _mm512_loadu_si512(xt + 128)); \
    dpbusd_into(acc, c3, _mm512_loadu_si512(xt + 192));
#define BITNET158_ROW(r)                                                   \
    {                                                                      \
        const __m512i p = load64(w + 64 * r);                              \
        const __m512i c0 = _mm512_and_si512(p, mask);                      \
        const __m512i c1 = _mm512_and_si512(_mm512_srli_epi16(p, 2), mask); \
        const __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(p, 4), mask); \
        const __m512i c3 = _mm512_and_si512(_mm512_srli_epi16(p, 6), mask); \
        BITNET158_DOT4(a##r##0, xb)                                         \
        BITNET158_DOT4(a##r##1, xb + ldx)                                   \
        BITNET158_DOT4(a##r##2, xb + 2 * ldx)                               \
        BITNET158_DOT4(a##r##3, xb + 3 * ldx)                               \
    }
BITNET158_AVX512 static inline void tile4x4(const uint8_t* group, int64_t nblocks, const int8_t* x,
                                            int64_t ldx, int32_t dots[kMaxTileTokens][kRows],
                                            bool fetch) {
    BITNET158_ACC4X4
    const __m512i mask = _mm512_set1_epi8(3);
    for (int64_t b = 0; b < nblocks; ++b) {
        const uint8_t* w = group + b * kBlock;
        const int8_t* xb = x + b * kBlock;
        if (fetch)
            prefetch_ahead(w);
        BITNET158_ROW(0)
        BITNET158_ROW(1)
        BITNET158_ROW(2)
        BITNET158_ROW(3)
    }
    BITNET158_STORE4X4(dots)
}
#undef BITNET158_ROW
#undef BITNET158_DOT4

// 4 rows x 3 tokens with the tokens' activations held in 12 registers: each 64-byte weight load
// is unpacked once into 4 code planes and multiplied into 3 tokens, and no activation is loaded
// twice per block (Zen 4 loads one 512-bit vector per cycle: the 4 x 4 tile's 64 activation
// loads per block, not its 64 vpdpbusd, were the bound).
#define BITNET158_DOT3(r)                                     \
    {                                                         \
        const __m512i p = load64(w + 64 * r);                 \
        const __m512i c0 = _mm512_and_si512(p, mask);         \
        const __m512i c1 = _mm512_and_si512(_mm512_srli_epi16(p, 2), mask); \
        const __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(p, 4), mask); \
        const __m512i c3 = _mm512_and_si512(_mm512_srli_epi16(p, 6), mask); \
        dpbusd_into(a##r##0, c0, x00); \
        dpbusd_into(a##r##1, c0, x10); \
        dpbusd_into(a##r##2, c0, x20); \
        dpbusd_into(a##r##0, c1, x01); \
        dpbusd_into(a##r##1, c1, x11); \
        dpbusd_into(a##r##2, c1, x21); \
        dpbusd_into(a##r##0, c2, x02); \
        dpbusd_into(a##r##1, c2, x12); \
        dpbusd_into(a##r##2, c2, x22); \
        dpbusd_into(a##r##0, c3, x03); \
        dpbusd_into(a##r##1, c3, x13); \
        dpbusd_into(a##r##2, c3, x23); \
    }
BITNET158_AVX512 static inline void tile4x3(const uint8_t* group, int64_t nblocks, const int8_t* x,
                                            int64_t ldx, int32_t dots[kMaxTileTokens][kRows],
                                            bool fetch) {
    __m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a10 = a00, a11 = a00, a12 = a00;
    __m512i a20 = a00, a21 = a00, a22 = a00, a30 = a00, a31 = a00, a32 = a00;
    const __m512i mask = _mm512_set1_epi8(3);
    for (int64_t b = 0; b < nblocks; ++b) {
        const uint8_t* w = group + b * kBlock;
        if (fetch)
            prefetch_ahead(w);
        const int8_t* x0 = x + b * kBlock;
        const int8_t* x1 = x0 + ldx;
        const int8_t* x2 = x1 + ldx;
        const __m512i x00 = _mm512_loadu_si512(x0), x01 = _mm512_loadu_si512(x0 + 64);
        const __m512i x02 = _mm512_loadu_si512(x0 + 128), x03 = _mm512_loadu_si512(x0 + 192);
        const __m512i x10 = _mm512_loadu_si512(x1), x11 = _mm512_loadu_si512(x1 + 64);
        const __m512i x12 = _mm512_loadu_si512(x1 + 128), x13 = _mm512_loadu_si512(x1 + 192);
        const __m512i x20 = _mm512_loadu_si512(x2), x21 = _mm512_loadu_si512(x2 + 64);
        const __m512i x22 = _mm512_loadu_si512(x2 + 128), x23 = _mm512_loadu_si512(x2 + 192);
        BITNET158_DOT3(0)
        BITNET158_DOT3(1)
        BITNET158_DOT3(2)
        BITNET158_DOT3(3)
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dots[0]), hsum4(a00, a10, a20, a30));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dots[1]), hsum4(a01, a11, a21, a31));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dots[2]), hsum4(a02, a12, a22, a32));
}
#undef BITNET158_DOT3

// Decode (one token) streams the weights once, so it is bound by how fast they arrive, not by
// arithmetic:
// - each 64-byte block of a row is split into its 4 code planes by AND masks alone, the plane j
//   (bits 2j, 2j + 1) left in place, so its accumulator holds 4^j x its dot product and is
//   shifted back exactly at the end (no shifts per block; the lanes stay far from overflow,
//   |sum| <= 2^16 per 256 k values). On a 2-core Sapphire Rapids this streamed ~8 % faster.
// - the lines kGemvPrefetchBytes ahead are fetched into L2 where prefetch_gemv (kernels.h);
// - the 16 accumulators are named variables updated in place (dpbusd_into): as an array, with
//   the intrinsic, GCC copied them and spilled some to the stack on every block.
#define BITNET158_GEMV_ROW(r)                                \
    {                                                        \
        const __m512i p = load64(w + 64 * r);                \
        dpbusd_into(a##r##0, _mm512_and_si512(p, m0), x0); \
        dpbusd_into(a##r##1, _mm512_and_si512(p, m1), x1); \
        dpbusd_into(a##r##2, _mm512_and_si512(p, m2), x2); \
        dpbusd_into(a##r##3, _mm512_and_si512(p, m3), x3); \
    }
// a0 + a1 / 4 + a2 / 16 + a3 / 64, each division exact (see tile_gemv).
BITNET158_AVX512 static inline __m512i plane_sum(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
    return _mm512_add_epi32(_mm512_add_epi32(a0, _mm512_srai_epi32(a1, 2)),
                            _mm512_add_epi32(_mm512_srai_epi32(a2, 4), _mm512_srai_epi32(a3, 6)));
}
BITNET158_AVX512 static inline void tile_gemv(const uint8_t* group, int64_t nblocks,
                                              const int8_t* x,
                                              int32_t dots[kMaxTileTokens][kRows]) {
    BITNET158_ACC4X4
    const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0c);
    const __m512i m2 = _mm512_set1_epi8(0x30), m3 = _mm512_set1_epi8(static_cast<char>(0xc0));
    for (int64_t b = 0; b < nblocks; ++b) {
        const uint8_t* w = group + b * kBlock;
        const int8_t* xb = x + b * kBlock;
        if (prefetch_gemv)
            prefetch_ahead(w);
        const __m512i x0 = _mm512_loadu_si512(xb), x1 = _mm512_loadu_si512(xb + 64);
        const __m512i x2 = _mm512_loadu_si512(xb + 128), x3 = _mm512_loadu_si512(xb + 192);
        BITNET158_GEMV_ROW(0)
        BITNET158_GEMV_ROW(1)
        BITNET158_GEMV_ROW(2)
        BITNET158_GEMV_ROW(3)
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dots[0]),
                     hsum4(plane_sum(a00, a01, a02, a03), plane_sum(a10, a11, a12, a13),
                           plane_sum(a20, a21, a22, a23), plane_sum(a30, a31, a32, a33)));
}
#undef BITNET158_GEMV_ROW

// out.store of group g's rows (those below n) for token t, 4 lanes at a time: the same IEEE
// operations as element by element (float(dot) / s * beta, then added to the output), so the
// same bits. A scalar division per result was ~5 % of a 512-token prefill's GEMM on Zen 4.
BITNET158_AVX512 static inline void store_group(const GemmOut& out, int64_t t, int64_t g,
                                                int64_t n, const int32_t dots[kRows],
                                                int32_t x_sum) {
    const int64_t row = g * kRows;
    const __mmask8 m = static_cast<__mmask8>(n - row >= kRows ? 0xf : (1u << (n - row)) - 1);
    const __m128i dot = _mm_sub_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dots)),
                                      _mm_set1_epi32(x_sum));
    if (!out.f32) {
        _mm_mask_storeu_epi32(out.i32 + t * out.n + row, m, dot);
        return;
    }
    __m128 y = _mm_mul_ps(_mm_div_ps(_mm_cvtepi32_ps(dot), _mm_set1_ps(out.s[t])),
                          _mm_set1_ps(out.beta));
    float* o = out.f32 + t * out.n + row;
    if (out.add)
        y = _mm_add_ps(_mm_maskz_loadu_ps(m, o), y);
    _mm_mask_storeu_ps(o, m, y);
}

// The 1.6-bit GEMM's batches (kernels_tq1.cpp) multiply from byte codes, each group decoded
// once (codes_gemm_avx512 in kernels.h): a tile then issues only loads and vpdpbusd. The k
// values go in slices whose codes stay in L1 while every token tile passes over them (a
// 7040-wide group's codes are 28 KB, as many as a tile's activations).
constexpr int64_t kCodesSlice = 2560;

#define BITNET158_CODES4(r)                                       \
    {                                                             \
        const __m512i c = _mm512_loadu_si512(codes + r * ld + k); \
        dpbusd_into(a##r##0, c, x0);                              \
        dpbusd_into(a##r##1, c, x1);                              \
        dpbusd_into(a##r##2, c, x2);                              \
        dpbusd_into(a##r##3, c, x3);                              \
    }
// 4 rows x 4 tokens over kn k values: codes + r * ld, activations x + t * ldx.
BITNET158_AVX512 static inline void codes_tile4x4(const uint8_t* codes, int64_t ld, int64_t kn,
                                                  const int8_t* x, int64_t ldx,
                                                  int32_t dots[kMaxTileTokens][kRows]) {
    BITNET158_ACC4X4
    for (int64_t k = 0; k < kn; k += 64) {
        const __m512i x0 = _mm512_loadu_si512(x + k), x1 = _mm512_loadu_si512(x + ldx + k);
        const __m512i x2 = _mm512_loadu_si512(x + 2 * ldx + k);
        const __m512i x3 = _mm512_loadu_si512(x + 3 * ldx + k);
        BITNET158_CODES4(0)
        BITNET158_CODES4(1)
        BITNET158_CODES4(2)
        BITNET158_CODES4(3)
    }
    BITNET158_STORE4X4(dots)
}
#undef BITNET158_CODES4
#undef BITNET158_ACC4X4
#undef BITNET158_STORE4X4

// The same for the last 1-3 tokens of a batch.
template <int NT>
BITNET158_AVX512 static inline void codes_tile(const uint8_t* codes, int64_t ld, int64_t kn,
                                               const int8_t* x, int64_t ldx,
                                               int32_t dots[kMaxTileTokens][kRows]) {
    __m512i acc[kRows][NT];
    for (int r = 0; r < kRows; ++r)
        for (int t = 0; t < NT; ++t)
            acc[r][t] = _mm512_setzero_si512();
    for (int64_t k = 0; k < kn; k += 64)
#pragma GCC unroll 4
        for (int r = 0; r < kRows; ++r) {
            const __m512i c = _mm512_loadu_si512(codes + r * ld + k);
#pragma GCC unroll 4
            for (int t = 0; t < NT; ++t)
                dpbusd_into(acc[r][t], c, _mm512_loadu_si512(x + t * ldx + k));
        }
    for (int t = 0; t < NT; ++t)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dots[t]),
                         hsum4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]));
}

BITNET158_AVX512 void codes_gemm_avx512(const int8_t* x_q, const int32_t* x_sum, int64_t T,
                                        int64_t kpad, const uint8_t* codes, int32_t* sums,
                                        int64_t g, int64_t n, const GemmOut& out) {
    int32_t dots[kMaxTileTokens][kRows];
    for (int64_t k0 = 0; k0 < kpad; k0 += kCodesSlice) {
        const int64_t kn = std::min(kCodesSlice, kpad - k0);
        for (int64_t t0 = 0; t0 < T; t0 += kMaxTileTokens) {
            const int64_t nt = std::min<int64_t>(kMaxTileTokens, T - t0);
            const int8_t* x = x_q + t0 * kpad + k0;
            switch (nt) {
                case 1: codes_tile<1>(codes + k0, kpad, kn, x, kpad, dots); break;
                case 2: codes_tile<2>(codes + k0, kpad, kn, x, kpad, dots); break;
                case 3: codes_tile<3>(codes + k0, kpad, kn, x, kpad, dots); break;
                default: codes_tile4x4(codes + k0, kpad, kn, x, kpad, dots); break;
            }
            for (int64_t t = 0; t < nt; ++t)
                for (int r = 0; r < kRows; ++r) {
                    int32_t& sum = sums[(t0 + t) * kRows + r];
                    sum = (k0 ? sum : 0) + dots[t][r];
                }
        }
    }
    for (int64_t t = 0; t < T; ++t)
        store_group(out, t, g, n, sums + t * kRows, x_sum[t]);
}

// Groups are taken in blocks that stay in L2 while every token tile passes over them, so a
// tile's activations (4 x kpad bytes) stay in L1: with all T tokens per group instead, 16
// tokens of a 2560-wide input (40 KB) cycled through the 32 KB L1 and halved the throughput.
constexpr int64_t kGroupBlockBytes = 192 * 1024;

BITNET158_AVX512 void gemm_groups_avx512(const int8_t* x_q, const int32_t* x_sum, int64_t T,
                                         int64_t kpad, const uint8_t* packed, int64_t n, int64_t g0,
                                         int64_t g1, const GemmOut& out) {
    const int64_t nblocks = kpad / kBlock;
    const int64_t block = kGroupBlockBytes / kpad > 1 ? kGroupBlockBytes / kpad : 1;
    int32_t dots[kMaxTileTokens][kRows];
    for (int64_t gb = g0; gb < g1; gb += block) {
        const int64_t ge = gb + block < g1 ? gb + block : g1;
        for (int64_t t0 = 0, nt = 0; t0 < T; t0 += nt) {
            // tiles of 3 tokens (activations in registers) where they fit, 4 when 4 are left
            nt = T - t0 == 4 ? 4 : T - t0 >= 3 ? 3 : T - t0;
            const int8_t* x = x_q + t0 * kpad;
            for (int64_t g = gb; g < ge; ++g) {
                const uint8_t* group = packed + g * kpad;
                switch (nt) {
                    case 1: tile_gemv(group, nblocks, x, dots); break;
                    case 2: tile<2>(group, nblocks, x, kpad, dots, t0 == 0); break;
                    case 3: tile4x3(group, nblocks, x, kpad, dots, t0 == 0); break;
                    default: tile4x4(group, nblocks, x, kpad, dots, t0 == 0); break;
                }
                for (int64_t t = 0; t < nt; ++t)
                    store_group(out, t0 + t, g, n, dots[t], x_sum[t0 + t]);
            }
        }
    }
}

BITNET158_AVX512 int64_t multiply_adds_avx512(int64_t iters) {
    const __m512i u = _mm512_set1_epi8(1), x = _mm512_set1_epi8(1);
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
    __m512i a6 = a0, a7 = a0, a8 = a0, a9 = a0, a10 = a0, a11 = a0;
    for (int64_t i = 0; i < iters; ++i) {  // 12 chains: more than latency x throughput
        dpbusd_into(a0, u, x);
        dpbusd_into(a1, u, x);
        dpbusd_into(a2, u, x);
        dpbusd_into(a3, u, x);
        dpbusd_into(a4, u, x);
        dpbusd_into(a5, u, x);
        dpbusd_into(a6, u, x);
        dpbusd_into(a7, u, x);
        dpbusd_into(a8, u, x);
        dpbusd_into(a9, u, x);
        dpbusd_into(a10, u, x);
        dpbusd_into(a11, u, x);
    }
    // xor, not add: the chains' sums overflow int32, and UBSan checks the scalar reduction
    const __m512i all = _mm512_xor_si512(
        _mm512_xor_si512(_mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3)),
                         _mm512_xor_si512(_mm512_xor_si512(a4, a5), _mm512_xor_si512(a6, a7))),
        _mm512_xor_si512(_mm512_xor_si512(a8, a9), _mm512_xor_si512(a10, a11)));
    volatile int32_t sink = _mm_cvtsi128_si32(_mm512_castsi512_si128(all));  // keeps every chain
    (void)sink;
    return iters * 12 * 64;
}

// ---- float kernels: attention and the output layer ----

// e^x within ~2 ulp: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p the degree-6 Taylor
// polynomial; scalef gives 0 below the float range and inf above it.
BITNET158_AVX512 static inline __m512 exp_neg(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// 16 floats of a row of dtype t starting at element i (f32 or f16; bf16 for the output layer).
BITNET158_AVX512 static inline __m512 load16(const void* p, Dtype t, int64_t i) {
    if (t == Dtype::f16)
        return _mm512_cvtph_ps(_mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i)));
    if (t == Dtype::bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i))),
            16));
    return _mm512_loadu_ps(static_cast<const float*>(p) + i);
}

BITNET158_AVX512 static inline __m512 load16_tail(const void* p, Dtype t, int64_t i, int64_t n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    if (t == Dtype::f16)
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i));
    if (t == Dtype::bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i)),
            16));
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
}

// 16 values at element `at` of f16 or f32 values, lanes outside m zero: load16_tail with the
// dtype a template argument, so that weigh_rows' inner loop has no dtype branch.
template <bool F16>
BITNET158_AVX512 static inline __m512 value16(const void* values, int64_t at, __mmask16 m) {
    return F16 ? _mm512_cvtph_ps(
                     _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(values) + at))
               : _mm512_maskz_loadu_ps(m, static_cast<const float*>(values) + at);
}

// out[r] (+)= sum_{j < cnt[r]} p[r][j] v[j] for R rows (positions x heads), values [m, d] f16 or
// f32 (add: continue the chains from a previous block of values): 32 output values per pass,
// each one FMA chain over j in order, so a row's result does not depend on the rows beside it
// (a prefill's values are a one-token step's, bit for bit). Each value vector is converted once
// for all R rows: 4 heads x 64 values per pass converted it for 4 rows only, and the conversions
// took a third of the FMA ports. Rows of later positions count more values (j past a row's
// count is skipped for it); chunks past d are masked off. `ahead` (or null): the next block of
// values, fetched into L1 a row per value during the first pass (a one-token step's values
// come from DRAM: at 1500 positions its attention took ~35 % longer without it).
template <int R, bool F16>
BITNET158_AVX512 static void weigh_rows(const float* const* p, const int64_t* cnt,
                                        const void* values, int64_t d, float* const* out,
                                        bool add, const char* ahead) {
    const int64_t row_bytes = d * (F16 ? 2 : 4);
    int64_t common = cnt[0], most = cnt[0];
    for (int r = 1; r < R; ++r) {
        common = std::min(common, cnt[r]);
        most = std::max(most, cnt[r]);
    }
    for (int64_t i0 = 0; i0 < d; i0 += 32) {
        const __mmask16 mk[2] = {first_lanes(d - i0), first_lanes(d - i0 - 16)};
        __m512 acc[R][2];
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < 2; ++c)
                acc[r][c] = add ? _mm512_maskz_loadu_ps(mk[c], out[r] + i0 + 16 * c)
                                : _mm512_setzero_ps();
        for (int64_t j = 0; j < common; ++j) {
            if (ahead && i0 == 0)
                prefetch_lines(ahead + j * row_bytes, row_bytes);
            const __m512 v0 = value16<F16>(values, j * d + i0, mk[0]),
                         v1 = value16<F16>(values, j * d + i0 + 16, mk[1]);
            for (int r = 0; r < R; ++r) {
                const __m512 pr = _mm512_set1_ps(p[r][j]);
                acc[r][0] = _mm512_fmadd_ps(pr, v0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(pr, v1, acc[r][1]);
            }
        }
        for (int64_t j = common; j < most; ++j) {
            const __m512 v0 = value16<F16>(values, j * d + i0, mk[0]),
                         v1 = value16<F16>(values, j * d + i0 + 16, mk[1]);
            for (int r = 0; r < R; ++r)
                if (j < cnt[r]) {
                    const __m512 pr = _mm512_set1_ps(p[r][j]);
                    acc[r][0] = _mm512_fmadd_ps(pr, v0, acc[r][0]);
                    acc[r][1] = _mm512_fmadd_ps(pr, v1, acc[r][1]);
                }
        }
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < 2; ++c)
                _mm512_mask_storeu_ps(out[r] + i0 + 16 * c, mk[c], acc[r][c]);
    }
}

using WeighRowsFn = void (*)(const float* const*, const int64_t*, const void*, int64_t,
                             float* const*, bool, const char*);
constexpr int kWeighRows = 8;  // rows per block: 16 accumulators
template <bool F16>
static constexpr WeighRowsFn kWeighRowBlocks[kWeighRows] = {
    weigh_rows<1, F16>, weigh_rows<2, F16>, weigh_rows<3, F16>, weigh_rows<4, F16>,
    weigh_rows<5, F16>, weigh_rows<6, F16>, weigh_rows<7, F16>, weigh_rows<8, F16>};
static constexpr const WeighRowsFn* kWeighRowBlock[2] = {  // [values are f16]
    kWeighRowBlocks<false>, kWeighRowBlocks<true>};

// Scores of R query rows (rows[r], length d) against NT consecutive key tiles (see kKeyTile) at
// `tiles`: each score is one FMA chain over the dimensions in order, 16 keys per vector, so it
// does not depend on R or NT (a prefill's scores are a one-token step's, bit for bit). A tile's
// vector feeds all R rows and a row's value all NT tiles: R x NT chains in flight, no
// reductions, and each key converted once per block of rows. dst[r] + 16t gets tile t's scores
// times scale, the first left[r] - 16t of them (keys past a row's count are not stored).
// `ahead` (or null): the next call's NT tiles, fetched into L1 a dimension at a time.
template <int R, int NT, bool F16>
BITNET158_AVX512 static void score_block(const float* const* rows, const void* tiles, int64_t d,
                                         float scale, float* const* dst, const int64_t* left,
                                         const char* ahead) {
    // row r, tile t: acc[r * NT + t], updated by the FMA intrinsic (with an asm-pinned FMA, GCC
    // kept these 16 accumulators on the stack)
    __m512 acc[R * NT];
    for (int c = 0; c < R * NT; ++c)
        acc[c] = _mm512_setzero_ps();
    const uint16_t* half = static_cast<const uint16_t*>(tiles);
    const float* full = static_cast<const float*>(tiles);
    for (int64_t i = 0; i < d; ++i) {
        __m512 k[NT];
        for (int t = 0; t < NT; ++t) {
            const int64_t at = (t * d + i) * kKeyTile;
            if (ahead)  // the same dimension of the next call's tiles
                _mm_prefetch(ahead + at * (F16 ? 2 : 4), _MM_HINT_T0);
            k[t] = F16 ? _mm512_cvtph_ps(_mm256_loadu_si256(
                             reinterpret_cast<const __m256i*>(half + at)))
                       : _mm512_loadu_ps(full + at);
        }
        for (int r = 0; r < R; ++r) {
            const __m512 qv = _mm512_set1_ps(rows[r][i]);
            for (int t = 0; t < NT; ++t)
                acc[r * NT + t] = _mm512_fmadd_ps(qv, k[t], acc[r * NT + t]);
        }
    }
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < NT; ++t) {
            const int64_t cnt = std::min(kKeyTile, left[r] - t * kKeyTile);
            if (cnt > 0)
                _mm512_mask_storeu_ps(dst[r] + t * kKeyTile,
                                      static_cast<__mmask16>((1u << cnt) - 1),
                                      _mm512_mul_ps(acc[r * NT + t], vscale));
        }
}

using ScoreBlockFn = void (*)(const float* const*, const void*, int64_t, float, float* const*,
                              const int64_t*, const char*);
constexpr int kScoreRows = 8;  // rows per block: with two tiles, 16 chains in flight
template <int NT, bool F16>
static constexpr ScoreBlockFn kScoreBlocks[kScoreRows] = {
    score_block<1, NT, F16>, score_block<2, NT, F16>, score_block<3, NT, F16>,
    score_block<4, NT, F16>, score_block<5, NT, F16>, score_block<6, NT, F16>,
    score_block<7, NT, F16>, score_block<8, NT, F16>};
static constexpr const ScoreBlockFn* kScoreBlock[2][2] = {  // [keys are f16][tiles - 1]
    {kScoreBlocks<1, false>, kScoreBlocks<2, false>},
    {kScoreBlocks<1, true>, kScoreBlocks<2, true>},
};

BITNET158_AVX512 float exp_row_avx512(float* sg, int64_t n) {
    __m512 vmax = _mm512_set1_ps(-__builtin_inff());
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(sg + j));
    float m = _mm512_reduce_max_ps(vmax);
    for (; j < n; ++j)
        m = sg[j] > m ? sg[j] : m;
    const __m512 vm = _mm512_set1_ps(m);
    __m512 vsum = _mm512_setzero_ps();
    for (j = 0; j + 16 <= n; j += 16) {
        const __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(sg + j), vm));
        _mm512_storeu_ps(sg + j, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    if (j < n) {
        const __mmask16 tail = static_cast<__mmask16>((1u << (n - j)) - 1);
        const __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sg + j), vm));
        _mm512_mask_storeu_ps(sg + j, tail, e);
        vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(tail, e));
    }
    return _mm512_reduce_add_ps(vsum);
}

// Softmax of a row of scores in place.
BITNET158_AVX512 static void softmax_row(float* sg, int64_t n) {
    const __m512 inv = _mm512_set1_ps(1.0f / exp_row_avx512(sg, n));
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        _mm512_storeu_ps(sg + j, _mm512_mul_ps(_mm512_loadu_ps(sg + j), inv));
    for (; j < n; ++j)
        sg[j] *= _mm512_cvtss_f32(inv);
}

// Values are taken in blocks of this many rows, which stay in L1 while every position of the
// call passes over them. Position by position, each row came from L2 once per position, and a
// 512-token prefill's attention took 15-17 % longer (blocks of 32: 5 % longer than 64; f16
// blocks widened to f32 once per call: no faster).
constexpr int64_t kAttendValues = 64;

BITNET158_AVX512 void attend_avx512(const float* q, int64_t ldq, int64_t npos, int64_t group,
                                    const void* keys, const void* values, Dtype kv, int64_t n0,
                                    int64_t d, float scale, float* scores, float* out,
                                    int64_t ldo) {
    const int64_t es = dtype_size(kv), nmax = n0 + npos - 1;
    // position i's scores: group rows of its n0 + i keys, from scores + i * group * nmax
    const auto scores_of = [&](int64_t i) { return scores + i * group * nmax; };
    // Scores two tiles at a time (each tile of keys read once per call, for all the rows that
    // reach it), the rows (position, head) in blocks of up to kScoreRows.
    const int64_t nrows = npos * group, tiles = (nmax + kKeyTile - 1) / kKeyTile;
    for (int64_t b = 0; b < tiles; b += 2) {
        const int64_t nt = std::min<int64_t>(2, tiles - b);
        const char* tile = static_cast<const char*>(keys) + b * kKeyTile * d * es;
        // rows reach tile b from the first position with more than b * kKeyTile keys
        const int64_t r_first = std::max<int64_t>(0, b * kKeyTile - n0 + 1) * group;
        for (int64_t r0 = r_first; r0 < nrows; r0 += kScoreRows) {
            const int64_t m = std::min<int64_t>(kScoreRows, nrows - r0);
            const float* rows[kScoreRows];
            float* dst[kScoreRows];
            int64_t left[kScoreRows];
            for (int64_t k = 0; k < m; ++k) {
                const int64_t i = (r0 + k) / group, g = (r0 + k) % group, n = n0 + i;
                rows[k] = q + i * ldq + g * d;
                dst[k] = scores_of(i) + g * n + b * kKeyTile;
                left[k] = n - b * kKeyTile;
            }
            // the first block of rows fetches the next two tiles (when both hold keys)
            const char* ahead =
                r0 == r_first && b + 4 <= tiles ? tile + 2 * kKeyTile * d * es : nullptr;
            kScoreBlock[kv == Dtype::f16][nt - 1][m - 1](rows, tile, d, scale, dst, left, ahead);
        }
    }
    for (int64_t i = 0; i < npos; ++i)
        for (int64_t g = 0; g < group; ++g)
            softmax_row(scores_of(i) + g * (n0 + i), n0 + i);
    // out[row] = sum_j p[row, j] v[j], a block of values at a time, for the rows (position, head)
    // that reach it in blocks of up to kWeighRows
    for (int64_t kb = 0; kb < nmax; kb += kAttendValues) {
        const char* vblock = static_cast<const char*>(values) + kb * d * es;
        const int64_t r_first = std::max<int64_t>(0, kb - n0 + 1) * group;
        for (int64_t r0 = r_first; r0 < nrows; r0 += kWeighRows) {
            const int64_t m = std::min<int64_t>(kWeighRows, nrows - r0);
            const float* p[kWeighRows];
            float* dst[kWeighRows];
            int64_t cnt[kWeighRows];
            for (int64_t k = 0; k < m; ++k) {
                const int64_t i = (r0 + k) / group, g = (r0 + k) % group, n = n0 + i;
                p[k] = scores_of(i) + g * n + kb;
                cnt[k] = std::min(kb + kAttendValues, n) - kb;
                dst[k] = out + i * ldo + g * d;
            }
            // the first block of rows fetches the next block of values (when it is whole)
            const char* ahead = r0 == r_first && kb + 2 * kAttendValues <= nmax
                                    ? vblock + kAttendValues * d * es
                                    : nullptr;
            kWeighRowBlock[kv == Dtype::f16][m - 1](p, cnt, vblock, d, dst, kb > 0, ahead);
        }
    }
}

// The 4 rows after a tile's own are fetched into L2 while its first token tile runs, one line per
// row each time the tile's rows cross one: without it, every group of rows waited on DRAM (~20 %
// of the batched head on Zen 4). next is null where no 4 rows follow.
BITNET158_AVX512 static inline void prefetch_rows(const char* next, int64_t row_bytes,
                                                  int64_t offset) {
    if (next != nullptr && offset % 64 == 0)
        for (int i = 0; i < 4; ++i)
            _mm_prefetch(next + i * row_bytes + offset, _MM_HINT_T1);
}

// NR rows x NT tokens of the output layer: each weight vector is converted once for NT tokens
// and each activation vector loaded once for NR rows (batched decode reads every row for many
// sequences). Every (row, token) dot has the same order whatever the tile: one 16-lane
// accumulator over the 16-chunks of k, the masked tail last, then the lane reduction; so a
// sequence's logits do not depend on the batch it was decoded in.
template <int NR, int NT>
BITNET158_AVX512 static inline void float_tile(const float* h, int64_t k, const void* w, Dtype wt,
                                               int64_t r, int64_t t0, float* out, int64_t ldo,
                                               const char* next) {
    const int64_t es = dtype_size(wt);
    const void* row[NR];
    for (int i = 0; i < NR; ++i)
        row[i] = static_cast<const char*>(w) + (r + i) * k * es;
    __m512 acc[NR][NT];
    for (int i = 0; i < NR; ++i)
        for (int t = 0; t < NT; ++t)
            acc[i][t] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= k; c += 16) {
        prefetch_rows(next, k * es, c * es);
        __m512 wv[NR];
        for (int i = 0; i < NR; ++i)
            wv[i] = load16(row[i], wt, c);
        for (int t = 0; t < NT; ++t) {
            const __m512 x = _mm512_loadu_ps(h + (t0 + t) * k + c);
            for (int i = 0; i < NR; ++i)
                acc[i][t] = _mm512_fmadd_ps(x, wv[i], acc[i][t]);
        }
    }
    if (c < k) {
        const __mmask16 mask = static_cast<__mmask16>((1u << (k - c)) - 1);
        for (int i = 0; i < NR; ++i) {
            const __m512 wv = load16_tail(row[i], wt, c, k);
            for (int t = 0; t < NT; ++t)
                acc[i][t] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, h + (t0 + t) * k + c), wv,
                                            acc[i][t]);
        }
    }
    for (int i = 0; i < NR; ++i)
        for (int t = 0; t < NT; ++t)
            out[(t0 + t) * ldo + r + i] = _mm512_reduce_add_ps(acc[i][t]);
}

// float_tile<4, 4> with named accumulators (GCC spilled the array of 16 to the stack).
#define BITNET158_FMA4(t, xp)                                      \
    {                                                              \
        const __m512 x = _mm512_loadu_ps(xp);                      \
        a0##t = _mm512_fmadd_ps(x, w0, a0##t);                     \
        a1##t = _mm512_fmadd_ps(x, w1, a1##t);                     \
        a2##t = _mm512_fmadd_ps(x, w2, a2##t);                     \
        a3##t = _mm512_fmadd_ps(x, w3, a3##t);                     \
    }
#define BITNET158_FMA4_TAIL(t, xp)                                 \
    {                                                              \
        const __m512 x = _mm512_maskz_loadu_ps(mask, xp);          \
        a0##t = _mm512_fmadd_ps(x, w0, a0##t);                     \
        a1##t = _mm512_fmadd_ps(x, w1, a1##t);                     \
        a2##t = _mm512_fmadd_ps(x, w2, a2##t);                     \
        a3##t = _mm512_fmadd_ps(x, w3, a3##t);                     \
    }
BITNET158_AVX512 static inline void float_tile44(const float* h, int64_t k, const void* w,
                                                 Dtype wt, int64_t r, int64_t t0, float* out,
                                                 int64_t ldo, const char* next) {
    const int64_t es = dtype_size(wt);
    const char* r0 = static_cast<const char*>(w) + r * k * es;
    const char *r1 = r0 + k * es, *r2 = r1 + k * es, *r3 = r2 + k * es;
    const float *h0 = h + t0 * k, *h1 = h0 + k, *h2 = h1 + k, *h3 = h2 + k;
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
    __m512 a10 = a00, a11 = a00, a12 = a00, a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    __m512 a30 = a00, a31 = a00, a32 = a00, a33 = a00;
    int64_t c = 0;
    for (; c + 16 <= k; c += 16) {
        prefetch_rows(next, k * es, c * es);
        const __m512 w0 = load16(r0, wt, c), w1 = load16(r1, wt, c);
        const __m512 w2 = load16(r2, wt, c), w3 = load16(r3, wt, c);
        BITNET158_FMA4(0, h0 + c)
        BITNET158_FMA4(1, h1 + c)
        BITNET158_FMA4(2, h2 + c)
        BITNET158_FMA4(3, h3 + c)
    }
    if (c < k) {
        const __mmask16 mask = static_cast<__mmask16>((1u << (k - c)) - 1);
        const __m512 w0 = load16_tail(r0, wt, c, k), w1 = load16_tail(r1, wt, c, k);
        const __m512 w2 = load16_tail(r2, wt, c, k), w3 = load16_tail(r3, wt, c, k);
        BITNET158_FMA4_TAIL(0, h0 + c)
        BITNET158_FMA4_TAIL(1, h1 + c)
        BITNET158_FMA4_TAIL(2, h2 + c)
        BITNET158_FMA4_TAIL(3, h3 + c)
    }
    float* o = out + t0 * ldo + r;
    const __m512 rows[4][4] = {{a00, a10, a20, a30}, {a01, a11, a21, a31},
                               {a02, a12, a22, a32}, {a03, a13, a23, a33}};
    for (int t = 0; t < 4; ++t)
        for (int i = 0; i < 4; ++i)
            o[t * ldo + i] = _mm512_reduce_add_ps(rows[t][i]);
}
#undef BITNET158_FMA4
#undef BITNET158_FMA4_TAIL

// next: the rows to prefetch during the first token tile (null: none).
template <int NR>
BITNET158_AVX512 static inline void float_tiles(const float* h, int64_t T, int64_t k,
                                                const void* w, Dtype wt, int64_t r, float* out,
                                                int64_t ldo, const char* next) {
    int64_t t0 = 0;
    for (; t0 + 4 <= T; t0 += 4, next = nullptr)
        if constexpr (NR == 4)
            float_tile44(h, k, w, wt, r, t0, out, ldo, next);
        else
            float_tile<NR, 4>(h, k, w, wt, r, t0, out, ldo, next);
    switch (T - t0) {
        case 1: float_tile<NR, 1>(h, k, w, wt, r, t0, out, ldo, next); break;
        case 2: float_tile<NR, 2>(h, k, w, wt, r, t0, out, ldo, next); break;
        case 3: float_tile<NR, 3>(h, k, w, wt, r, t0, out, ldo, next); break;
        default: break;
    }
}

// Rows in fours, the next four prefetched (for one token too: four FMA chains; on the first
// hosts, before the 2 MB pages, ~15 % faster than one row at a time and ~30 % slower without the
// prefetch) except for one token where float_row_at_a_time (AMD): a row at a time there, measured
// faster on Zen 4 and Zen 5 (kernels.h). Batches: 4 rows x 4 tokens per tile, 16
// accumulators, 4 conversions and 4 activation loads per 16 FMAs.
BITNET158_AVX512 void float_rows_avx512(const float* h, int64_t T, int64_t k, const void* w,
                                        Dtype wt, int64_t r0, int64_t r1, float* out, int64_t ldo) {
    const int64_t row_bytes = k * dtype_size(wt);
    int64_t r = r0;
    if (T == 1 && float_row_at_a_time) {  // the hardware prefetchers alone (kernels.h)
        for (; r < r1; ++r)
            float_tiles<1>(h, T, k, w, wt, r, out, ldo, nullptr);
        return;
    }
    for (; r + 4 <= r1; r += 4) {
        const char* next =
            r + 8 <= r1 ? static_cast<const char*>(w) + (r + 4) * row_bytes : nullptr;
        float_tiles<4>(h, T, k, w, wt, r, out, ldo, next);
    }
    for (; r < r1; ++r)
        float_tiles<1>(h, T, k, w, wt, r, out, ldo, nullptr);
}

// NR rows x NT tokens of the int8 output layer: each weight load serves NT tokens, each
// activation load NR rows. Integer sums are exact, so the tiling cannot change a result.
template <int NR, int NT>
BITNET158_AVX512 static inline void int8_tile(const int8_t* x_q, int64_t kpad, const int8_t* w,
                                              const int32_t* w_sum, int64_t r, int64_t t0,
                                              int32_t* out, int64_t ldo) {
    // vpdpbusd multiplies unsigned by signed bytes: (x + 128) . w - 128 * sum(w) = x . w
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    __m512i acc[NR][NT];
    for (int i = 0; i < NR; ++i)
        for (int t = 0; t < NT; ++t)
            acc[i][t] = _mm512_setzero_si512();
    for (int64_t c = 0; c < kpad; c += 64) {
        __m512i wv[NR];
        for (int i = 0; i < NR; ++i)
            wv[i] = load64(w + (r + i) * kpad + c);
        for (int t = 0; t < NT; ++t) {
            const __m512i xv = _mm512_xor_si512(_mm512_loadu_si512(x_q + (t0 + t) * kpad + c), flip);
            for (int i = 0; i < NR; ++i)
                dpbusd_into(acc[i][t], xv, wv[i]);
        }
    }
    for (int i = 0; i < NR; ++i)
        for (int t = 0; t < NT; ++t)
            out[(t0 + t) * ldo + r + i] = _mm512_reduce_add_epi32(acc[i][t]) - 128 * w_sum[r + i];
}

template <int NR>
BITNET158_AVX512 static inline void int8_tiles(const int8_t* x_q, int64_t T, int64_t kpad,
                                               const int8_t* w, const int32_t* w_sum, int64_t r,
                                               int32_t* out, int64_t ldo) {
    int64_t t0 = 0;
    for (; t0 + 4 <= T; t0 += 4)
        int8_tile<NR, 4>(x_q, kpad, w, w_sum, r, t0, out, ldo);
    switch (T - t0) {
        case 1: int8_tile<NR, 1>(x_q, kpad, w, w_sum, r, t0, out, ldo); break;
        case 2: int8_tile<NR, 2>(x_q, kpad, w, w_sum, r, t0, out, ldo); break;
        case 3: int8_tile<NR, 3>(x_q, kpad, w, w_sum, r, t0, out, ldo); break;
        default: break;
    }
}

// Decode (T = 1) streams one row at a time with two accumulator chains; batches take 4 rows x
// 4 tokens.
BITNET158_AVX512 void int8_rows_avx512(const int8_t* x_q, int64_t T, int64_t kpad, const int8_t* w,
                                       const int32_t* w_sum, int64_t r0, int64_t r1, int32_t* out,
                                       int64_t ldo) {
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    int64_t r = r0;
    if (T > 1) {
        for (; r + 4 <= r1; r += 4)
            int8_tiles<4>(x_q, T, kpad, w, w_sum, r, out, ldo);
        for (; r < r1; ++r)
            int8_tiles<1>(x_q, T, kpad, w, w_sum, r, out, ldo);
        return;
    }
    for (; r < r1; ++r) {
        const int8_t* wr = w + r * kpad;
        __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
        int64_t i = 0;
        for (; i + 128 <= kpad; i += 128) {
            dpbusd_into(a0, _mm512_xor_si512(_mm512_loadu_si512(x_q + i), flip), load64(wr + i));
            dpbusd_into(a1, _mm512_xor_si512(_mm512_loadu_si512(x_q + i + 64), flip),
                        load64(wr + i + 64));
        }
        if (i < kpad)
            dpbusd_into(a0, _mm512_xor_si512(_mm512_loadu_si512(x_q + i), flip), load64(wr + i));
        out[r] = _mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1)) - 128 * w_sum[r];
    }
}

BITNET158_AVX512 void silu_mul_avx512(float* g, const float* u, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 x = _mm512_loadu_ps(g + i);
        const __m512 e = exp_neg(_mm512_sub_ps(_mm512_setzero_ps(), x));
        _mm512_storeu_ps(
            g + i, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i)));
    }
    silu_mul_scalar(g + i, u + i, n - i);
}

BITNET158_AVX512 void half_row_avx512(const float* x, int64_t n, uint16_t* out) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    if (i < n) {
        const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
        _mm256_mask_storeu_epi16(out + i, m,
                                 _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, x + i),
                                                 _MM_FROUND_TO_NEAREST_INT));
    }
}

// One block of a row of the 4-bit layer (Q4RowsFn) for NT tokens: its 4 steps' codes unpacked
// and its 8 group scales spread to the 16 lanes once for all NT tokens; each token's 16 lane
// sums (integers, from its correction) are converted once and acc[t][J] += them x the scales.
template <int NT, int J>
BITNET158_AVX512 static inline void q4_block_tokens(const uint8_t* w, const uint16_t* d,
                                                    const int8_t* x, int64_t ldx,
                                                    const int32_t* corr, int64_t ldc,
                                                    __m512 acc[][2]) {
    const __m512i low = _mm512_set1_epi8(15);
    const __m512i p0 = load64(w), p1 = load64(w + 64);
    const __m512i c0 = _mm512_and_si512(p0, low);
    const __m512i c1 = _mm512_and_si512(_mm512_srli_epi16(p0, 4), low);
    const __m512i c2 = _mm512_and_si512(p1, low);
    const __m512i c3 = _mm512_and_si512(_mm512_srli_epi16(p1, 4), low);
    const __m512 ds = _mm512_castps256_ps512(
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d))));
    const __m512 scale = _mm512_shuffle_f32x4(ds, ds, 0x44);  // lanes g and 8 + g: group g
    for (int t = 0; t < NT; ++t) {  // corr + sum (q + 8) x = sum q x, per lane
        const int8_t* xt = x + t * ldx;
        __m512i sum = _mm512_loadu_si512(corr + t * ldc);
        dpbusd_into(sum, c0, _mm512_loadu_si512(xt));
        dpbusd_into(sum, c1, _mm512_loadu_si512(xt + 64));
        dpbusd_into(sum, c2, _mm512_loadu_si512(xt + 128));
        dpbusd_into(sum, c3, _mm512_loadu_si512(xt + 192));
        acc[t][J] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[t][J]);
    }
}

constexpr int64_t kQ4PrefetchBytes = 2048;  // of nibbles (an eighth as many of scales)

// One row x NT tokens: the blocks alternate between two accumulator chains per token. Each
// token's sums take the same order whatever NT: a batch does not change a logit.
template <int NT>
BITNET158_AVX512 static void q4_row_tokens(const int8_t* x_q, const int32_t* x_corr,
                                           const float* inv_s, int64_t kpad, const uint8_t* wr,
                                           const uint16_t* dr, int64_t r, int64_t t0, float* out,
                                           int64_t ldo) {
    const int64_t blocks = kpad / kQ4Block, ldc = kpad / 16, bytes = kQ4Block / 2;
    const int8_t* x = x_q + t0 * kpad;
    const int32_t* corr = x_corr + t0 * ldc;
    __m512 acc[NT][2];
    for (int t = 0; t < NT; ++t)
        acc[t][0] = acc[t][1] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) {
        // the rows (and their scales) ahead into L2, as tile_gemv does for the ternary stream
        const char* ahead = reinterpret_cast<const char*>(wr + bytes * b + kQ4PrefetchBytes);
        for (int line = 0; line < 4; ++line)
            _mm_prefetch(ahead + 64 * line, _MM_HINT_T1);
        if (b % 4 == 0)  // 4 blocks of scales per line
            _mm_prefetch(reinterpret_cast<const char*>(dr + 8 * b + kQ4PrefetchBytes / 16),
                         _MM_HINT_T1);
        q4_block_tokens<NT, 0>(wr + bytes * b, dr + 8 * b, x + kQ4Block * b, kpad, corr + 16 * b,
                               ldc, acc);
        q4_block_tokens<NT, 1>(wr + bytes * (b + 1), dr + 8 * (b + 1), x + kQ4Block * (b + 1),
                               kpad, corr + 16 * (b + 1), ldc, acc);
    }
    if (b < blocks)
        q4_block_tokens<NT, 0>(wr + bytes * b, dr + 8 * b, x + kQ4Block * b, kpad, corr + 16 * b,
                               ldc, acc);
    for (int t = 0; t < NT; ++t)
        out[(t0 + t) * ldo + r] =
            _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1])) * inv_s[t0 + t];
}

using Q4RowTokensFn = void (*)(const int8_t*, const int32_t*, const float*, int64_t,
                              const uint8_t*, const uint16_t*, int64_t, int64_t, float*, int64_t);
static constexpr Q4RowTokensFn kQ4RowTokens[4] = {q4_row_tokens<1>, q4_row_tokens<2>,
                                                  q4_row_tokens<3>, q4_row_tokens<4>};
constexpr int64_t kQ4BlockBytes = 192 * 1024;  // rows of the 4-bit head per L2 block (batches)

// One row at a time (several row streams at once defeat the prefetcher, kernel_limits.md). Batches
// take the rows in blocks that stay in L2 while each tile of 4 tokens (its activations in L1)
// passes over them: row by row for every token, the activations came from L2 each time (~15 % of
// a 16-token step).
BITNET158_AVX512 void q4_rows_avx512(const int8_t* x_q, const int32_t* x_corr, const float* inv_s,
                                     int64_t T, int64_t kpad, const uint8_t* w, const uint16_t* d,
                                     int64_t r0, int64_t r1, float* out, int64_t ldo) {
    const int64_t row_bytes = kpad / 2 + kpad / 16, fit = kQ4BlockBytes / row_bytes;
    const int64_t block = fit > 1 ? fit : 1;
    for (int64_t rb = r0; rb < r1; rb += block) {
        const int64_t re = rb + block < r1 ? rb + block : r1;
        for (int64_t t0 = 0; t0 < T; t0 += 4) {
            const int64_t nt = T - t0 < 4 ? T - t0 : 4;
            for (int64_t r = rb; r < re; ++r)
                kQ4RowTokens[nt - 1](x_q, x_corr, inv_s, kpad, w + r * (kpad / 2),
                                     d + r * (kpad / 32), r, t0, out, ldo);
        }
    }
}

}  // namespace bitnet158

#endif  // BITNET158_X86
