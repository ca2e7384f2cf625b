// The 1.6-bit ternary GEMM (kernels_tq1.h): a scalar twin that defines the result and an
// AVX-512 VBMI kernel that must agree with it bit for bit.
//
// Layout (packing.py `pack_ours_tq1`): rows in groups of 4; per block of 320 k values each row
// has 64 bytes, byte m holding the codes t_i = w + 1 of k = 320*b + 64*i + m, i = 0..4, as
//   byte = 64 * (a // 7) + 7 * c + a % 7,   a = 9*t0 + 3*t1 + t2,  c = 3*t3 + t4.
// Both kernels decode a byte through two tables: kTables.low[byte] = t0 | t1 << 2 | t2 << 4 and
// kTables.high[byte & 63] = t3 | t4 << 2 (c depends on the low 6 bits only). A byte the packer
// never writes decodes as zero weights (code 1) in the planes its table entry covers.
#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "kernels_tq1.h"

#if defined(BITNET158_X86)
#include <immintrin.h>
#endif

namespace bitnet158 {

namespace {

struct Tq1Tables {
    alignas(64) uint8_t low[256];
    alignas(64) uint8_t high[64];
};

constexpr uint8_t kZeroLow = 1 | 1 << 2 | 1 << 4;  // t0 = t1 = t2 = 1: zero weights
constexpr uint8_t kZeroHigh = 1 | 1 << 2;

constexpr Tq1Tables make_tables() {
    Tq1Tables t{};
    for (int b = 0; b < 256; ++b) {
        const int d = b & 63, a = 7 * (b >> 6) + d % 7;
        t.low[b] = d == 63 || a > 26 ? kZeroLow : uint8_t(a / 9 | (a / 3 % 3) << 2 | (a % 3) << 4);
    }
    for (int d = 0; d < 64; ++d) {
        const int c = d / 7;
        t.high[d] = d == 63 ? kZeroHigh : uint8_t(c / 3 | (c % 3) << 2);
    }
    return t;
}

constexpr Tq1Tables kTables = make_tables();

// sum_k x[k] * t(k) of row r of a group over all blocks (t = w + 1).
int32_t row_dot_codes_tq1(const uint8_t* group, int64_t nblocks, int r, const int8_t* x) {
    int32_t acc = 0;
    for (int64_t b = 0; b < nblocks; ++b) {
        const uint8_t* w = group + b * kRows * kTq1RowBytes + kTq1RowBytes * r;
        const int8_t* xb = x + b * kTq1Block;
        for (int m = 0; m < 64; ++m) {
            const int lo = kTables.low[w[m]], hi = kTables.high[w[m] & 63];
            acc += (lo & 3) * xb[m] + (lo >> 2 & 3) * xb[64 + m] + (lo >> 4) * xb[128 + m] +
                   (hi & 3) * xb[192 + m] + (hi >> 2) * xb[256 + m];
        }
    }
    return acc;
}

void tq1_groups_scalar(const int8_t* x_q, const int32_t* x_sum, int64_t T, int64_t kpad,
                       const uint8_t* packed, int64_t n, int64_t g0, int64_t g1,
                       const GemmOut& out) {
    const int64_t nblocks = kpad / kTq1Block, group_bytes = tq1_group_bytes_padded(kpad);
    for (int64_t g = g0; g < g1; ++g)
        for (int r = 0; r < kRows && g * kRows + r < n; ++r)
            for (int64_t t = 0; t < T; ++t)
                out.store(t, g * kRows + r,
                          row_dot_codes_tq1(packed + g * group_bytes, nblocks, r, x_q + t * kpad) -
                              x_sum[t]);  // sum x*(w+1) - sum x
}

}  // namespace

#if defined(BITNET158_X86)
namespace {

#define BITNET158_AVX512_VBMI \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))

// 64 weight bytes as two 256-bit loads (kernels_avx512.cpp's load64 says why).
BITNET158_AVX512_VBMI inline __m512i load64_tq1(const uint8_t* p) {
    const __m256i* q = reinterpret_cast<const __m256i*>(p);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(q)),
                              _mm256_loadu_si256(q + 1), 1);
}

// The decode tables in registers: low[] as 4 vectors of 64 entries, high[] as one.
struct Tq1Regs {
    __m512i low0, low1, low2, low3, high;
};

BITNET158_AVX512_VBMI inline Tq1Regs load_tables() {
    return {_mm512_load_si512(kTables.low), _mm512_load_si512(kTables.low + 64),
            _mm512_load_si512(kTables.low + 128), _mm512_load_si512(kTables.low + 192),
            _mm512_load_si512(kTables.high)};
}

// Codes of 64 bytes: lo = t0 | t1 << 2 | t2 << 4 (vpermi2b reads 7 index bits, so two lookups
// and a blend on bit 7), hi = t3 | t4 << 2 (vpermb reads the low 6 bits).
BITNET158_AVX512_VBMI inline void decode(__m512i p, const Tq1Regs& tab, __m512i& lo, __m512i& hi) {
    const __mmask64 top = _mm512_movepi8_mask(p);
    hi = _mm512_permutexvar_epi8(p, tab.high);
    lo = _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(tab.low0, p, tab.low1),
                                _mm512_permutex2var_epi8(tab.low2, p, tab.low3));
}

// The planes are picked by masks, not shifts: (lo & 12) is 4 * t1, so its products go into an
// accumulator of 4x scaled sums (exact, divided at the end). Shifts cost as much as the byte
// permutes on Zen 4; masks are cheap. Per block a 32-bit lane of an accumulator gains at most
// 8 products of |value| <= 48 * 128: no overflow for k up to 2^22 (module.cpp's limit).
#define BITNET158_TQ1_ROW(r)                                                          \
    {                                                                                 \
        __m512i lo, hi;                                                               \
        decode(load64_tq1(w + 64 * r), tab, lo, hi);                                  \
        s1_##r = _mm512_dpbusd_epi32(s1_##r, _mm512_and_si512(lo, m1), x0);           \
        s4_##r = _mm512_dpbusd_epi32(s4_##r, _mm512_and_si512(lo, m4), x1);           \
        s16_##r = _mm512_dpbusd_epi32(s16_##r, _mm512_and_si512(lo, m16), x2);        \
        s1_##r = _mm512_dpbusd_epi32(s1_##r, _mm512_and_si512(hi, m1), x3);           \
        s4_##r = _mm512_dpbusd_epi32(s4_##r, _mm512_and_si512(hi, m4), x4);           \
    }

// Decode (one token), 4 rows: per 64-byte row block one decode and 5 vpdpbusd; the block's 5
// activation vectors are loaded once for the 4 rows. Named accumulators: GCC spills arrays.
BITNET158_AVX512_VBMI void tile_gemv_tq1(const uint8_t* group, int64_t nblocks, const int8_t* x,
                                         int32_t dots[kRows]) {
    const Tq1Regs tab = load_tables();
    const __m512i m1 = _mm512_set1_epi8(3), m4 = _mm512_set1_epi8(12), m16 = _mm512_set1_epi8(48);
    __m512i s1_0 = _mm512_setzero_si512(), s1_1 = s1_0, s1_2 = s1_0, s1_3 = s1_0;
    __m512i s4_0 = s1_0, s4_1 = s1_0, s4_2 = s1_0, s4_3 = s1_0;
    __m512i s16_0 = s1_0, s16_1 = s1_0, s16_2 = s1_0, s16_3 = s1_0;
    for (int64_t b = 0; b < nblocks; ++b) {
        const uint8_t* w = group + b * kRows * kTq1RowBytes;
        const int8_t* xb = x + b * kTq1Block;
        prefetch_ahead(w);
        const __m512i x0 = _mm512_load_si512(xb), x1 = _mm512_load_si512(xb + 64),
                      x2 = _mm512_load_si512(xb + 128), x3 = _mm512_load_si512(xb + 192),
                      x4 = _mm512_load_si512(xb + 256);
        BITNET158_TQ1_ROW(0)
        BITNET158_TQ1_ROW(1)
        BITNET158_TQ1_ROW(2)
        BITNET158_TQ1_ROW(3)
    }
    // (4 * S4) >> 2 and (16 * S16) >> 4 are exact: every term of those sums is a multiple
    dots[0] = _mm512_reduce_add_epi32(s1_0) + (_mm512_reduce_add_epi32(s4_0) >> 2) +
              (_mm512_reduce_add_epi32(s16_0) >> 4);
    dots[1] = _mm512_reduce_add_epi32(s1_1) + (_mm512_reduce_add_epi32(s4_1) >> 2) +
              (_mm512_reduce_add_epi32(s16_1) >> 4);
    dots[2] = _mm512_reduce_add_epi32(s1_2) + (_mm512_reduce_add_epi32(s4_2) >> 2) +
              (_mm512_reduce_add_epi32(s16_2) >> 4);
    dots[3] = _mm512_reduce_add_epi32(s1_3) + (_mm512_reduce_add_epi32(s4_3) >> 2) +
              (_mm512_reduce_add_epi32(s16_3) >> 4);
}
#undef BITNET158_TQ1_ROW

// Several tokens (up to 4), one row at a time: each block of the row is decoded once and
// multiplied into every token (the group's 4 rows stay in L1 between the row passes).
template <int NT>
BITNET158_AVX512_VBMI void tile_tq1(const uint8_t* group, int64_t nblocks, const int8_t* x,
                                    int64_t ldx, int32_t dots[4][kRows]) {
    const Tq1Regs tab = load_tables();
    const __m512i m1 = _mm512_set1_epi8(3), m4 = _mm512_set1_epi8(12), m16 = _mm512_set1_epi8(48);
    for (int r = 0; r < kRows; ++r) {
        __m512i s1[NT], s4[NT], s16[NT];
        for (int t = 0; t < NT; ++t)
            s1[t] = s4[t] = s16[t] = _mm512_setzero_si512();
        for (int64_t b = 0; b < nblocks; ++b) {
            __m512i lo, hi;
            decode(load64_tq1(group + b * kRows * kTq1RowBytes + kTq1RowBytes * r), tab, lo, hi);
            const __m512i c0 = _mm512_and_si512(lo, m1), c1 = _mm512_and_si512(lo, m4),
                          c2 = _mm512_and_si512(lo, m16), c3 = _mm512_and_si512(hi, m1),
                          c4 = _mm512_and_si512(hi, m4);
#pragma GCC unroll 4
            for (int t = 0; t < NT; ++t) {
                const int8_t* xb = x + t * ldx + b * kTq1Block;
                s1[t] = _mm512_dpbusd_epi32(s1[t], c0, _mm512_load_si512(xb));
                s4[t] = _mm512_dpbusd_epi32(s4[t], c1, _mm512_load_si512(xb + 64));
                s16[t] = _mm512_dpbusd_epi32(s16[t], c2, _mm512_load_si512(xb + 128));
                s1[t] = _mm512_dpbusd_epi32(s1[t], c3, _mm512_load_si512(xb + 192));
                s4[t] = _mm512_dpbusd_epi32(s4[t], c4, _mm512_load_si512(xb + 256));
            }
        }
        for (int t = 0; t < NT; ++t)
            dots[t][r] = _mm512_reduce_add_epi32(s1[t]) + (_mm512_reduce_add_epi32(s4[t]) >> 2) +
                         (_mm512_reduce_add_epi32(s16[t]) >> 4);
    }
}

BITNET158_AVX512_VBMI void tq1_groups_avx512(const int8_t* x_q, const int32_t* x_sum, int64_t T,
                                             int64_t kpad, const uint8_t* packed, int64_t n,
                                             int64_t g0, int64_t g1, const GemmOut& out) {
    const int64_t nblocks = kpad / kTq1Block, group_bytes = tq1_group_bytes_padded(kpad);
    if (T >= kCodesMinTokens) {  // each group decoded once for all tokens, not once per tile
        uint8_t* codes = thread_scratch<uint8_t>(kRows * (kpad + 4 * T), Scratch::codes);
        int32_t* sums = reinterpret_cast<int32_t*>(codes + kRows * kpad);
        for (int64_t g = g0; g < g1; ++g) {
            for (int64_t b = 0; b < nblocks; ++b)
                tq1_unpack_block(packed + g * group_bytes + b * kRows * kTq1RowBytes,
                                 codes + b * kTq1Block, kpad);
            codes_gemm_avx512(x_q, x_sum, T, kpad, codes, sums, g, n, out);
        }
        return;
    }
    int32_t dots[4][kRows];
    for (int64_t g = g0; g < g1; ++g) {
        const uint8_t* group = packed + g * group_bytes;
        for (int64_t t0 = 0, nt = 0; t0 < T; t0 += nt) {
            nt = std::min<int64_t>(4, T - t0);
            const int8_t* x = x_q + t0 * kpad;
            switch (nt) {
                case 1: tile_gemv_tq1(group, nblocks, x, dots[0]); break;
                case 2: tile_tq1<2>(group, nblocks, x, kpad, dots); break;
                case 3: tile_tq1<3>(group, nblocks, x, kpad, dots); break;
                default: tile_tq1<4>(group, nblocks, x, kpad, dots); break;
            }
            for (int r = 0; r < kRows && g * kRows + r < n; ++r)
                for (int64_t t = 0; t < nt; ++t)
                    out.store(t0 + t, g * kRows + r, dots[t][r] - x_sum[t0 + t]);
        }
    }
}

}  // namespace

BITNET158_AVX512_VBMI void tq1_unpack_block(const uint8_t* block, uint8_t* rows, int64_t ld) {
    const Tq1Regs tab = load_tables();
    const __m512i m3 = _mm512_set1_epi8(3);
    for (int r = 0; r < kRows; ++r) {
        __m512i lo, hi;
        decode(load64_tq1(block + kTq1RowBytes * r), tab, lo, hi);
        uint8_t* dst = rows + r * ld;
        _mm512_storeu_si512(dst, _mm512_and_si512(lo, m3));
        _mm512_storeu_si512(dst + 64, _mm512_and_si512(_mm512_srli_epi16(lo, 2), m3));
        _mm512_storeu_si512(dst + 128, _mm512_and_si512(_mm512_srli_epi16(lo, 4), m3));
        _mm512_storeu_si512(dst + 192, _mm512_and_si512(hi, m3));
        _mm512_storeu_si512(dst + 256, _mm512_and_si512(_mm512_srli_epi16(hi, 2), m3));
    }
}

#undef BITNET158_AVX512_VBMI

namespace {

bool cpu_has_vbmi() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vbmi");
}

}  // namespace
#endif  // BITNET158_X86

GemmGroupsFn tq1_groups_for(Isa isa) {
#if defined(BITNET158_X86)
    if ((isa == Isa::avx512 || isa == Isa::amx) && cpu_has_vbmi())
        return tq1_groups_avx512;
#endif
    (void)isa;
    return tq1_groups_scalar;
}

const char* tq1_kernel_name(Isa isa) {
    return tq1_groups_for(isa) == tq1_groups_scalar ? "scalar" : "avx512";
}


}  // namespace bitnet158
