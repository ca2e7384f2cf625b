// The ternary GEMM on AMX tiles (Sapphire Rapids and later): prefill and large batches. One
// TDPBUSD multiplies a 16 x 64 tile of unsigned bytes by a 64 x 16 tile of signed bytes, 16K
// multiply-adds, 16 times the work of a 512-bit vpdpbusd. The sums are exact int32, as on every
// other ISA, so the results are bit-identical to the scalar kernel's.
//
// A (unsigned) is the weight codes, 16 rows x 64 k values: our layout holds each row's 64
// consecutive k values of a block as one bit plane of 64 bytes (packing.pack_ours), so a row
// block is unpacked with a shift and a mask per plane into a buffer the tiles load from.
// B (signed) is the activations in the tiles' "VNNI" order, made once per GEMM by
// amx_activations: 16 tokens per tile, for each 4 consecutive k values the 4 bytes of every
// token side by side. C[row][token] - x_sum[token] is then the dot product (codes are w + 1).
//
// A pass holds 4 token tiles in C (tiles 0-3) and reuses each A tile for all four: on one
// Sapphire Rapids core, 128 tokens x 2560 x 27648 ran at ~810 G multiply-adds/s (the AVX-512
// tiles ~180), against ~680 for 2 x 2 blocking (2 A x 2 B tiles). A call takes up to 4 passes
// and unpacks the next block of codes while this one's tiles multiply: unpacking all of a pass's
// rows first and then multiplying left the tiles idle ~30 % of the time. Its first group of 4
// token tiles goes pass by pass, the C tiles kept over all k; a call of more than 64 tokens
// keeps its passes' unpacked codes, and its later groups go a block of k values at a time for
// all passes (the C tiles stored to L1 between blocks, the block's B tiles shared while in L1).
// Storing the C tiles is what slows the tiles most (one core: 64 % of TDPBUSD's peak without
// the round trips, 50 % with the stores alone), but without the shared B tiles the later groups
// read 4 times the activations from L2 (all pass by pass: gate/up +12 %). Against all block by
// block, a 512-token prefill's q/k/v took 5 % less time, o 4 %, down 8 % (pp512 +3 %).
#include "kernels.h"
#include "kernels_tq1.h"

#if defined(BITNET158_X86) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#define BITNET158_AMX \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8,prfchw")))
#define BITNET158_AMX_BF16 \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,f16c,amx-tile,amx-bf16")))

namespace bitnet158 {

namespace {

constexpr int kTile = 16;  // rows of a tile (kAmxPassGroups groups); tokens of a B tile
static_assert(kTile == kAmxTileTokens && kTile == kAmxPassGroups * kRows, "one tile per pass");
constexpr int64_t kChunk = 64;  // k values per tile
constexpr int kTokenTilesPerPass = 4;  // C tiles 0-3, the A tile 4, the B tile 5
constexpr int64_t kAmxPrefetchItems = 4;  // (block, pass) items a block's bytes are fetched ahead

// Every tile is 16 rows of 64 bytes: C 16 rows x 16 int32, A 16 rows x 64 codes, B 16 rows (of 4
// k values) x 16 tokens x 4 bytes (attend_amx: C 16 x 16 floats, A 16 x 32 bf16, B 16 rows of
// 2 k values x 16 columns).
struct alignas(64) TileConfig {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// Not inlined, so that the AMX tests run the form that GCC once broke (below).
__attribute__((noinline)) BITNET158_AMX void configure_tiles() {
    TileConfig cfg;
    for (int i = 0; i < 8; ++i) {
        cfg.colsb[i] = 64;
        cfg.rows[i] = kTile;
    }
    // LDTILECFG with all 64 bytes as its operand: GCC 12's _tile_loadconfig tells the compiler
    // that it reads 8, so where this function is not inlined GCC drops the stores of the rows
    // and widths (every tile then has 0 rows, and the first tile instruction raises SIGILL).
    asm volatile("ldtilecfg %0" : : "m"(cfg));
}

// Bytes of one block of a packed group: 4 rows x 64 bytes in both layouts.
constexpr int64_t kPackedBlockBytes = kRows * kBlock / 4;
static_assert(kPackedBlockBytes == kRows * kTq1RowBytes, "2-bit and 1.6-bit blocks alike");

// Where block b of packed group g starts.
inline const uint8_t* packed_block(const uint8_t* packed, int64_t kpad, int64_t g, int64_t b,
                                   bool tq1) {
    return packed + g * (tq1 ? tq1_group_bytes_padded(kpad) : kpad) + b * kPackedBlockBytes;
}

// Block b (kblk k values: kBlock, or kTq1Block for 1.6-bit groups) of 16 rows of codes:
// packed groups [g, g + 4) (those < g_end; the others zero) into a[row * kblk + k], one byte
// per code (0, 1 or 2).
BITNET158_AMX void unpack_block(const uint8_t* packed, int64_t kpad, int64_t g, int64_t g_end,
                                int64_t b, uint8_t* a, bool tq1) {
    const __m512i mask = _mm512_set1_epi8(3);
    const int64_t kblk = tq1 ? kTq1Block : kBlock;
    for (int gi = 0; gi < kAmxPassGroups; ++gi) {
        uint8_t* rows = a + gi * kRows * kblk;
        if (g + gi >= g_end) {
            std::memset(rows, 0, size_t(kRows * kblk));
            continue;
        }
        const uint8_t* block = packed_block(packed, kpad, g + gi, b, tq1);
        if (tq1) {
            tq1_unpack_block(block, rows, kblk);
            continue;
        }
        for (int r = 0; r < kRows; ++r) {
            const __m512i p = _mm512_loadu_si512(block + 64 * r);
            uint8_t* dst = rows + r * kBlock;
            _mm512_storeu_si512(dst, _mm512_and_si512(p, mask));
            _mm512_storeu_si512(dst + 64, _mm512_and_si512(_mm512_srli_epi16(p, 2), mask));
            _mm512_storeu_si512(dst + 128, _mm512_and_si512(_mm512_srli_epi16(p, 4), mask));
            _mm512_storeu_si512(dst + 192, _mm512_and_si512(_mm512_srli_epi16(p, 6), mask));
        }
    }
}

// The packed bytes unpack_block(packed, kpad, g, g_end, b, ., tq1) will read, into L1: they
// come from memory, and the unpacking of the next block has only this block's products
// (~250 cycles) to wait for them.
BITNET158_AMX void prefetch_block(const uint8_t* packed, int64_t kpad, int64_t g, int64_t g_end,
                                  int64_t b, bool tq1) {
    for (int64_t gi = g; gi < std::min(g + kAmxPassGroups, g_end); ++gi)
        prefetch_lines(packed_block(packed, kpad, gi, b, tq1), kPackedBlockBytes);
}

// C tiles 0 .. NTT-1 (zeroed when `first`) += A (16 rows of kn codes at a, row stride kn) x B
// (token tiles at b, b + ldb, ...; each k step's tile 1 KB after the last) over kn k values.
// `resident`: the sums stay in the tiles until the `last` block of the pass stores them to c;
// otherwise they are loaded from c (unless `first`) and stored back.
template <int NTT>
BITNET158_AMX void tile_block(const uint8_t* a, const int8_t* b, int64_t ldb, int64_t kn,
                              bool first, bool last, bool resident, int32_t* c) {
    constexpr int64_t kC = kTile * kTile;  // int32 per C tile
    if (!first && !resident) {
        _tile_loadd(0, c, 64);
        if (NTT > 1)
            _tile_loadd(1, c + kC, 64);
        if (NTT > 2)
            _tile_loadd(2, c + 2 * kC, 64);
        if (NTT > 3)
            _tile_loadd(3, c + 3 * kC, 64);
    } else if (first) {
        _tile_zero(0);
        if (NTT > 1)
            _tile_zero(1);
        if (NTT > 2)
            _tile_zero(2);
        if (NTT > 3)
            _tile_zero(3);
    }
    for (int64_t k = 0; k < kn; k += kChunk) {
        _tile_loadd(4, a + k, kn);
        const int8_t* bk = b + k * kTile;
        _tile_loadd(5, bk, 64);
        _tile_dpbusd(0, 4, 5);
        if (NTT > 1) {
            _tile_loadd(5, bk + ldb, 64);
            _tile_dpbusd(1, 4, 5);
        }
        if (NTT > 2) {
            _tile_loadd(5, bk + 2 * ldb, 64);
            _tile_dpbusd(2, 4, 5);
        }
        if (NTT > 3) {
            _tile_loadd(5, bk + 3 * ldb, 64);
            _tile_dpbusd(3, 4, 5);
        }
    }
    if (resident && !last)
        return;
    _tile_stored(0, c, 64);
    if (NTT > 1)
        _tile_stored(1, c + kC, 64);
    if (NTT > 2)
        _tile_stored(2, c + 2 * kC, 64);
    if (NTT > 3)
        _tile_stored(3, c + 3 * kC, 64);
}

// The 16 x 16 dwords r[token][j] transposed in place: r[j][token].
BITNET158_AMX inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {  // dword pairs of rows i, i + 1
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  // qword pairs: 4 rows' dwords side by side per 128 bits
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; ++i) {  // 128-bit lanes: rows 0-3 with 4-7, 8-11 with 12-15
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 8; ++i) {  // then rows 0-7 with 8-15
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    }
}

// out.store of one pass's results: c[tile][row][token % 16] for rows [row0, row0 + rows) and
// tokens [t0, t0 + ntok), each tile transposed in registers to 16 rows per token (a gather per
// token was ~3 % slower). The same IEEE operations as GemmOut::store, element by element, so
// the same bits. With c_up (the up matrix's pass over the same rows and tokens), act(y) * u is
// stored instead of y, u dequantized with up_beta, computed as the separate pass would: ReLU² as
// relu2_mul (max(0, y) keeps a NaN or -0 y as std::max(y, 0) does); SwiGLU by silu_mul_avx512
// itself over the pass's rows (its vector code, or its scalar tail for the last, partial pass
// of a row: the same lanes as over a whole row).
BITNET158_AMX void store_pass(const int32_t* c, const int32_t* c_up, float up_beta, Gate act,
                              int64_t t0, int64_t ntok, int64_t row0, int64_t rows,
                              const int32_t* x_sum, const GemmOut& out) {
    const __mmask16 m = static_cast<__mmask16>((1u << rows) - 1);
    for (int64_t i0 = 0; i0 < ntok; i0 += kTile) {
        __m512i dots[kTile], ups[kTile];
        for (int r = 0; r < kTile; ++r)
            dots[r] = _mm512_load_si512(c + i0 * kTile + r * kTile);
        transpose16(dots);
        if (c_up) {
            for (int r = 0; r < kTile; ++r)
                ups[r] = _mm512_load_si512(c_up + i0 * kTile + r * kTile);
            transpose16(ups);
        }
        for (int64_t i = 0; i < std::min<int64_t>(kTile, ntok - i0); ++i) {
            const int64_t t = t0 + i0 + i;
            const __m512i xs = _mm512_set1_epi32(x_sum[t]);
            const __m512i dot = _mm512_sub_epi32(dots[i], xs);
            if (!out.f32) {
                _mm512_mask_storeu_epi32(out.i32 + t * out.n + row0, m, dot);
                continue;
            }
            const __m512 s = _mm512_set1_ps(out.s[t]);
            __m512 y = _mm512_mul_ps(_mm512_div_ps(_mm512_cvtepi32_ps(dot), s),
                                     _mm512_set1_ps(out.beta));
            if (c_up) {
                const __m512i up_dot = _mm512_sub_epi32(ups[i], xs);
                const __m512 u = _mm512_mul_ps(_mm512_div_ps(_mm512_cvtepi32_ps(up_dot), s),
                                               _mm512_set1_ps(up_beta));
                if (act == Gate::relu2) {
                    const __m512 r = _mm512_max_ps(_mm512_setzero_ps(), y);
                    y = _mm512_mul_ps(_mm512_mul_ps(r, r), u);
                } else {
                    alignas(64) float g16[kTile], u16[kTile];
                    _mm512_store_ps(g16, y);
                    _mm512_store_ps(u16, u);
                    silu_mul_avx512(g16, u16, rows);
                    y = _mm512_load_ps(g16);
                }
            }
            float* o = out.f32 + t * out.n + row0;
            if (out.add)
                y = _mm512_add_ps(_mm512_maskz_loadu_ps(m, o), y);
            _mm512_mask_storeu_ps(o, m, y);
        }
    }
}

// The output line of row group `row` (16 rows, 64 bytes) for token t, fetched for writing: a
// pass writes one line per token, each in another 4 KB page of [T, n] (n * 4 bytes apart), and
// without this each store waited for its line (~10 % of the GEMM in a 512-token prefill).
BITNET158_AMX inline void prefetch_out_line(const GemmOut& out, int64_t t, int64_t row) {
    _m_prefetchw(out.f32 ? static_cast<void*>(out.f32 + t * out.n + row)
                         : static_cast<void*>(out.i32 + t * out.n + row));
}

}  // namespace

bool amx_usable() {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8") ||
        !__builtin_cpu_supports("amx-bf16") ||  // every AMX CPU has these three (attention,
        !__builtin_cpu_supports("avx512bf16") ||  // its bf16 parts, 1.6-bit unpacking)
        !__builtin_cpu_supports("avx512vbmi"))
        return false;
    // Linux hands out the tile state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
    // It refuses when a thread's signal stack is too small for the larger signal frame (then the
    // avx512 kernels run), and once granted it refuses later too-small sigaltstack calls
    // (Documentation/arch/x86/xstate.rst). Under BITNET158_ISA=avx512 the engine never asks.
    static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return granted;
}

BITNET158_AMX int64_t multiply_adds_amx(int64_t iters) {
    alignas(64) static const int8_t zeros[kTile * 64] = {};  // the values do not matter
    configure_tiles();
    _tile_loadd(4, zeros, 64);
    _tile_loadd(5, zeros, 64);
    _tile_loadd(6, zeros, 64);
    _tile_loadd(7, zeros, 64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t i = 0; i < iters; ++i) {  // 4 chains (C tiles), as a pass of the GEMM
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
        _tile_dpbusd(2, 5, 6);
        _tile_dpbusd(3, 5, 7);
    }
    alignas(64) int32_t c[kTile * kTile];
    _tile_stored(0, c, 64);
    _tile_release();
    volatile int32_t sink = c[0];
    (void)sink;
    return iters * 4 * kTile * kTile * kChunk;
}

BITNET158_AMX void amx_activations(const int8_t* x_q, int64_t T, int64_t kpad, int8_t* b) {
    // b[tile][k / 4][token % 16][k % 4]: the dword of 4 k values of each token, transposed 16
    // x 16 dwords (64 k values of 16 tokens) at a time; tokens past T are zeros.
    const int64_t tiles = (T + kTile - 1) / kTile;
    for (int64_t tt = 0; tt < tiles; ++tt) {
        int32_t* dst = reinterpret_cast<int32_t*>(b + tt * kpad * kTile);
        for (int64_t k0 = 0; k0 < kpad; k0 += 64) {
            __m512i r[16];
            for (int n = 0; n < kTile; ++n) {
                const int64_t t = tt * kTile + n;
                r[n] = t < T ? _mm512_loadu_si512(x_q + t * kpad + k0) : _mm512_setzero_si512();
            }
            transpose16(r);
            for (int j = 0; j < 16; ++j)
                _mm512_storeu_si512(dst + (k0 / 4 + j) * kTile, r[j]);
        }
    }
}

namespace {

// gemm_groups_amx over `sets` matrices of the same shape (1; or 2, gate and up, whose passes over
// the same rows a call takes side by side and whose results store_pass combines).
BITNET158_AMX void gemm_amx(const int8_t* b, const int32_t* x_sum, int64_t T, int64_t kpad,
                            const uint8_t* const* packed, int64_t sets, int64_t n, int64_t g0,
                            int64_t g1, const GemmOut& out, float up_beta, Gate act, bool tq1) {
    constexpr int64_t kC = kTile * kTile;
    const int64_t kblk = tq1 ? kTq1Block : kBlock, blocks = kpad / kblk;
    const int64_t item_bytes = kTile * kblk;  // one (block, pass) of unpacked codes
    // Unpacked codes. With one group of token tiles, two items in turn (this one, the next one)
    // stay in L1. With more, every item of the passes is kept (in L2) for the later groups,
    // which then need no unpacking (written for one group only, the strip's stores evict
    // L1 lines that the tiles need: the FFN's down GEMM took ~15 % longer). The later groups'
    // tiles load the codes from L2 directly: fetched into L1 an item ahead, the 64 prefetches
    // waited for fill buffers, and gate/up took 3-15 % longer.
    const int64_t tiles = (T + kTile - 1) / kTile;
    const bool keep = tiles > kTokenTilesPerPass;
    alignas(64) uint8_t ring[2][kTile * kTq1Block];
    uint8_t* strip = keep ? thread_scratch<uint8_t>(kAmxCallPasses * blocks * item_bytes,
                                                    Scratch::codes)
                          : nullptr;
    const auto codes = [&](int64_t p, int64_t kb) {  // pass p's block kb
        const int64_t it = p * blocks + kb;  // its place in the unpacking order
        return keep ? strip + it * item_bytes : ring[it % 2];
    };
    alignas(64) int32_t c[kAmxCallPasses][kTokenTilesPerPass * kC];
    configure_tiles();
    const int64_t set_passes = kAmxCallPasses / sets;  // row passes of each matrix per call
    for (int64_t gp = g0; gp < g1; gp += set_passes * kAmxPassGroups) {
        const int64_t row_passes =
            std::min(set_passes, (g1 - gp + kAmxPassGroups - 1) / kAmxPassGroups);
        const int64_t passes = row_passes * sets, items = blocks * passes;
        // pass p: matrix p / row_passes, its row groups from group(p)
        const auto matrix = [&](int64_t p) { return packed[p / row_passes]; };
        const auto group = [&](int64_t p) { return gp + p % row_passes * kAmxPassGroups; };
        for (int64_t tt = 0; tt < tiles; tt += kTokenTilesPerPass) {
            const int8_t* bt = b + tt * kpad * kTile;
            const int64_t ntt = std::min<int64_t>(kTokenTilesPerPass, tiles - tt);
            // The group that unpacks takes (pass, block) in turn, its sums kept in the tiles
            // over the whole pass; it unpacks the next block of codes before this one's
            // products are issued, so the vector unit unpacks while the tiles multiply (one
            // after the other, the unpacking took ~30 % of the GEMM). The later groups take
            // (block, pass) in turn, each block's B tiles shared by the passes while in L1,
            // their sums stored and loaded between blocks.
            const bool unpack = tt == 0;
            const int64_t ntok = std::min(ntt * kTile, T - tt * kTile), lines = row_passes * ntok;
            // item i's pass and block
            const auto pass_of = [&](int64_t i) { return unpack ? i / blocks : i % passes; };
            const auto block_of = [&](int64_t i) { return unpack ? i % blocks : i / passes; };
            if (unpack)
                unpack_block(matrix(0), kpad, gp, g1, 0, codes(0, 0), tq1);
            for (int64_t it = 0; it < items; ++it) {
                const int64_t kb = block_of(it), p = pass_of(it);
                // the lines store_pass will write, a share per item (the passes' lines in turn)
                for (int64_t l = it * lines / items; l < (it + 1) * lines / items; ++l)
                    prefetch_out_line(out, tt * kTile + l % ntok,
                                      (gp + l / ntok * kAmxPassGroups) * kRows);
                if (unpack && it + 1 < items) {
                    const int64_t q = pass_of(it + 1), qb = block_of(it + 1);
                    unpack_block(matrix(q), kpad, group(q), g1, qb, codes(q, qb), tq1);
                }
                if (unpack && it + kAmxPrefetchItems < items) {
                    const int64_t q = pass_of(it + kAmxPrefetchItems);
                    prefetch_block(matrix(q), kpad, group(q), g1,
                                   block_of(it + kAmxPrefetchItems), tq1);
                }
                const int8_t* bk = bt + kb * kblk * kTile;
                const uint8_t* ak = codes(p, kb);
                const int64_t ldb = kpad * kTile;
                const bool first = kb == 0, last = kb + 1 == blocks;
                switch (ntt) {
                    case 1: tile_block<1>(ak, bk, ldb, kblk, first, last, unpack, c[p]); break;
                    case 2: tile_block<2>(ak, bk, ldb, kblk, first, last, unpack, c[p]); break;
                    case 3: tile_block<3>(ak, bk, ldb, kblk, first, last, unpack, c[p]); break;
                    default: tile_block<4>(ak, bk, ldb, kblk, first, last, unpack, c[p]); break;
                }
            }
            for (int64_t p = 0; p < row_passes; ++p) {
                const int64_t g = group(p);
                const int64_t rows = std::min({int64_t(kTile), n - g * kRows, (g1 - g) * kRows});
                store_pass(c[p], sets == 2 ? c[p + row_passes] : nullptr, up_beta, act,
                           tt * kTile, ntok, g * kRows, rows, x_sum, out);
            }
        }
    }
    _tile_release();
}

}  // namespace

BITNET158_AMX void gemm_groups_amx(const int8_t* b, const int32_t* x_sum, int64_t T, int64_t kpad,
                                   const uint8_t* packed, int64_t n, int64_t g0, int64_t g1,
                                   const GemmOut& out, bool tq1) {
    gemm_amx(b, x_sum, T, kpad, &packed, 1, n, g0, g1, out, 0.0f, Gate::relu2, tq1);
}

BITNET158_AMX void gemm_groups_amx_gated(const int8_t* b, const int32_t* x_sum, int64_t T,
                                         int64_t kpad, const uint8_t* gate, const uint8_t* up,
                                         int64_t n, int64_t g0, int64_t g1, const GemmOut& out,
                                         float up_beta, Gate act, bool tq1) {
    const uint8_t* const packed[2] = {gate, up};
    gemm_amx(b, x_sum, T, kpad, packed, 2, n, g0, g1, out, up_beta, act, tq1);
}

// ---- attention of prefills on AMX-BF16 tiles (see kernels.h) ----

namespace {

// bf16 bits (16 of them) back to floats.
BITNET158_AMX_BF16 inline __m512 widen_bf16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 16 floats as bf16 hi + lo: hi = x rounded to 8 significant bits, lo = the rest rounded to 8
// more (exact for the 11 of an f16 value).
BITNET158_AMX_BF16 inline void split16(__m512 x, uint16_t* hi, uint16_t* lo) {
    const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
    const __m512 rest = _mm512_sub_ps(x, widen_bf16(h));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi), h);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo),
                        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(rest)));
}

// One row of a B tile, hi and lo parts (64 bytes each): split16 of a and b (16 floats each)
// interleaved a0 b0 a1 b1 ...: 2 consecutive k values for each of the tile's 16 columns.
BITNET158_AMX_BF16 inline void split_pairs(__m512 a, __m512 b, uint16_t* hi, uint16_t* lo) {
    alignas(64) static constexpr uint16_t kPairs[32] = {0,  16, 1,  17, 2,  18, 3,  19,
                                                        4,  20, 5,  21, 6,  22, 7,  23,
                                                        8,  24, 9,  25, 10, 26, 11, 27,
                                                        12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i pairs = _mm512_load_si512(kPairs);
    const __m512i h = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));  // a, then b
    const __m512 ha = widen_bf16(_mm512_castsi512_si256(h));
    const __m512 hb = widen_bf16(_mm512_extracti64x4_epi64(h, 1));
    const __m512i l = reinterpret_cast<__m512i>(
        _mm512_cvtne2ps_pbh(_mm512_sub_ps(b, hb), _mm512_sub_ps(a, ha)));
    _mm512_store_si512(hi, _mm512_permutexvar_epi16(pairs, h));
    _mm512_store_si512(lo, _mm512_permutexvar_epi16(pairs, l));
}

// 16 f16 values at p as floats, lanes outside m zero (not read).
BITNET158_AMX_BF16 inline __m512 half16(const uint16_t* p, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

constexpr int64_t kTileHalfs = 512;  // bf16 values per tile

// Whether the f16 values of positions [j0, j0 + n) are all finite. A row tile's last chunk of
// values reaches positions past some of its rows' counts, whose weights are 0; an infinite or
// NaN value there would make those rows NaN (0 x inf), where the FMA kernels skip it.
BITNET158_AMX_BF16 bool finite_values(const void* values, int64_t j0, int64_t n, int64_t d) {
    const uint16_t* v = static_cast<const uint16_t*>(values) + j0 * d;
    const __m512i exponent = _mm512_set1_epi16(0x7c00);  // all ones: inf or NaN
    __mmask32 bad = 0;
    int64_t i = 0;
    for (; i + 32 <= n * d; i += 32) {
        const __m512i e = _mm512_and_si512(_mm512_loadu_si512(v + i), exponent);
        bad |= _mm512_cmpeq_epi16_mask(e, exponent);
    }
    for (; i < n * d; ++i)
        bad |= (v[i] & 0x7c00) == 0x7c00;
    return bad == 0;
}

}  // namespace

BITNET158_AMX_BF16 void attend_amx(const float* q, int64_t ldq, int64_t npos, int64_t group,
                                   const void* keys, const void* values, Dtype kv, int64_t n0,
                                   int64_t d, float scale, float* scores, float* out,
                                   int64_t ldo) {
    const int64_t rows = npos * group;
    if (kv != Dtype::f16 || rows < kTile || !finite_values(values, n0, npos - 1, d))
        return attend_avx512(q, ldq, npos, group, keys, values, kv, n0, d, scale, scores, out,
                             ldo);
    // Rows (position, head) as in attend_avx512, 16 per row tile; keys and values padded with
    // zeros to whole 32s (a P.V tile's k values), dimensions to whole 32s (a Q.K tile's).
    const int64_t tiles = cdiv(rows, kTile), nmax = n0 + npos - 1, nk = round_up(nmax, 32);
    const int64_t dk = round_up(d, 32), chunks = dk / 32, slices = cdiv(d, 16);
    const auto count = [&](int64_t r) { return n0 + r / group; };  // keys of row r
    const int64_t key_halfs = nk / kKeyTile * chunks * kTileHalfs;
    const int64_t value_halfs = nk / 32 * slices * kTileHalfs;
    // the split keys and values (hi, lo), then one row tile's queries, scores and weights
    uint16_t* kh = thread_scratch<uint16_t>(
        2 * (key_halfs + value_halfs) + 2 * kTile * dk + 2 * kTile * nk + 2 * kTile * nk,
        Scratch::amx_attention);
    uint16_t *kl = kh + key_halfs, *vh = kl + key_halfs, *vl = vh + value_halfs;
    uint16_t *qh = vl + value_halfs, *ql = qh + kTile * dk;
    uint16_t *ph = ql + kTile * dk, *pl = ph + kTile * nk;
    float* sc = reinterpret_cast<float*>(pl + kTile * nk);  // [16][nk]

    // keys: B tiles [key tile][32 dimensions], row r = dimensions 2r, 2r + 1 of its 16 keys
    const uint16_t* kc = static_cast<const uint16_t*>(keys);
    for (int64_t kt = 0; kt < nk / kKeyTile; ++kt) {
        const __mmask16 live = first_lanes(nmax - kt * kKeyTile);  // keys past nmax: zeros
        const uint16_t* tile = kc + kt * d * kKeyTile;
        for (int64_t c = 0; c < chunks; ++c) {
            const int64_t at = (kt * chunks + c) * kTileHalfs;
            for (int64_t r = 0; r < 16; ++r) {
                const int64_t i = c * 32 + 2 * r;  // dimension i's 16 keys
                split_pairs(half16(tile + i * kKeyTile, i < d ? live : 0),
                            half16(tile + (i + 1) * kKeyTile, i + 1 < d ? live : 0),
                            kh + at + 32 * r, kl + at + 32 * r);
            }
        }
    }
    // values: B tiles [32 positions][16 dimensions], row r = positions 2r, 2r + 1
    const uint16_t* vc = static_cast<const uint16_t*>(values);
    for (int64_t pc = 0; pc < nk / 32; ++pc)
        for (int64_t sl = 0; sl < slices; ++sl) {
            const __mmask16 m = first_lanes(d - sl * 16);
            const int64_t at = (pc * slices + sl) * kTileHalfs;
            for (int64_t r = 0; r < 16; ++r) {
                const int64_t j = pc * 32 + 2 * r;  // positions j, j + 1 (past nmax: zeros)
                split_pairs(half16(vc + j * d + sl * 16, j < nmax ? m : 0),
                            half16(vc + (j + 1) * d + sl * 16, j + 1 < nmax ? m : 0),
                            vh + at + 32 * r, vl + at + 32 * r);
            }
        }

    configure_tiles();
    const __m512 vscale = _mm512_set1_ps(scale);
    alignas(64) float block[kTile][64];
    for (int64_t t = 0; t < tiles; ++t) {
        const int64_t r0 = t * kTile, nr = std::min<int64_t>(kTile, rows - r0);
        const int64_t most = count(r0 + nr - 1), wide = round_up(most, 32);
        // queries times scale: A tiles, row r's dimensions in hi and lo parts (rows past nr:
        // zeros)
        for (int64_t r = 0; r < kTile; ++r) {
            const float* src = q + (r0 + r) / group * ldq + (r0 + r) % group * d;
            for (int64_t i = 0; i < dk; i += 16) {
                const __m512 x = r < nr ? _mm512_maskz_loadu_ps(first_lanes(d - i), src + i)
                                        : _mm512_setzero_ps();
                split16(_mm512_mul_ps(x, vscale), qh + r * dk + i, ql + r * dk + i);
            }
        }
        // scores, two key tiles at a time: C 0 and 1 += hi.hi + hi.lo + lo.hi (the lo.lo term
        // is below f32's rounding)
        const int64_t key_tiles = cdiv(most, kKeyTile);
        for (int64_t kt = 0; kt < key_tiles; kt += 2) {
            const bool two = kt + 1 < key_tiles;
            _tile_zero(0);
            _tile_zero(1);
            for (int64_t c = 0; c < chunks; ++c) {
                const int64_t at = (kt * chunks + c) * kTileHalfs;
                _tile_loadd(2, qh + c * 32, dk * 2);
                _tile_loadd(3, ql + c * 32, dk * 2);
                _tile_loadd(4, kh + at, 64);
                _tile_loadd(5, kl + at, 64);
                if (two) {
                    _tile_loadd(6, kh + at + chunks * kTileHalfs, 64);
                    _tile_loadd(7, kl + at + chunks * kTileHalfs, 64);
                }
                _tile_dpbf16ps(0, 2, 4);
                if (two)
                    _tile_dpbf16ps(1, 2, 6);
                _tile_dpbf16ps(0, 2, 5);
                if (two)
                    _tile_dpbf16ps(1, 2, 7);
                _tile_dpbf16ps(0, 3, 4);
                if (two)
                    _tile_dpbf16ps(1, 3, 6);
            }
            _tile_stored(0, sc + kt * kKeyTile, nk * 4);
            if (two)
                _tile_stored(1, sc + (kt + 1) * kKeyTile, nk * 4);
        }
        // each row's e^(s - max s) in hi and lo parts, zeros past its count (rows past nr: all
        // zeros); the outputs are divided by their sums
        alignas(64) float inv[kTile];
        for (int64_t r = 0; r < kTile; ++r) {
            float* s = sc + r * nk;
            const int64_t n = r < nr ? count(r0 + r) : 0;
            inv[r] = n > 0 ? 1.0f / exp_row_avx512(s, n) : 0.0f;
            for (int64_t j = 0; j < wide; j += 16)
                split16(_mm512_maskz_loadu_ps(first_lanes(n - j), s + j), ph + r * nk + j,
                        pl + r * nk + j);
        }
        // out = weights x values: 64 dimensions (4 C tiles) at a time over the 32-position
        // chunks the tile's last row reaches
        for (int64_t s0 = 0; s0 < slices; s0 += 4) {
            const int64_t ns = std::min<int64_t>(4, slices - s0);
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t pc = 0; pc < wide / 32; ++pc) {
                _tile_loadd(4, ph + pc * 32, nk * 2);
                _tile_loadd(5, pl + pc * 32, nk * 2);
                const int64_t at = (pc * slices + s0) * kTileHalfs;
                // C s += hi.hi + hi.lo + lo.hi, tiles 6 and 7 holding slice s's parts
#define BITNET158_PV(s)                                      \
    if (ns > s) {                                            \
        _tile_loadd(6, vh + at + s * kTileHalfs, 64);        \
        _tile_loadd(7, vl + at + s * kTileHalfs, 64);        \
        _tile_dpbf16ps(s, 4, 6);                             \
        _tile_dpbf16ps(s, 4, 7);                             \
        _tile_dpbf16ps(s, 5, 6);                             \
    }
                BITNET158_PV(0)
                BITNET158_PV(1)
                BITNET158_PV(2)
                BITNET158_PV(3)
#undef BITNET158_PV
            }
            _tile_stored(0, &block[0][0], 256);
            _tile_stored(1, &block[0][16], 256);
            _tile_stored(2, &block[0][32], 256);
            _tile_stored(3, &block[0][48], 256);
            for (int64_t r = 0; r < nr; ++r) {
                float* dst = out + (r0 + r) / group * ldo + (r0 + r) % group * d + s0 * 16;
                for (int64_t i = 0; i < 16 * ns; i += 16)
                    _mm512_mask_storeu_ps(
                        dst + i, first_lanes(d - s0 * 16 - i),
                        _mm512_mul_ps(_mm512_load_ps(&block[r][i]), _mm512_set1_ps(inv[r])));
            }
        }
    }
    _tile_release();
}
}  // namespace bitnet158

#else

namespace bitnet158 {
bool amx_usable() { return false; }
void attend_amx(const float* q, int64_t ldq, int64_t npos, int64_t group, const void* keys,
                const void* values, Dtype kv, int64_t n0, int64_t d, float scale, float* scores,
                float* out, int64_t ldo) {
    attend_scalar(q, ldq, npos, group, keys, values, kv, n0, d, scale, scores, out, ldo);
}
void amx_activations(const int8_t*, int64_t, int64_t, int8_t*) {}
int64_t multiply_adds_amx(int64_t) { return 0; }
void gemm_groups_amx(const int8_t*, const int32_t*, int64_t, int64_t, const uint8_t*, int64_t,
                     int64_t, int64_t, const GemmOut&, bool) {}
void gemm_groups_amx_gated(const int8_t*, const int32_t*, int64_t, int64_t, const uint8_t*,
                           const uint8_t*, int64_t, int64_t, int64_t, const GemmOut&, float, Gate,
                           bool) {}
}  // namespace bitnet158

#endif
