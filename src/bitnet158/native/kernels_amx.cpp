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

namespace bitnet158 {

namespace {

constexpr int kTile = 16;  // rows of a tile (kAmxPassGroups groups); tokens of a B tile
static_assert(kTile == kAmxTileTokens && kTile == kAmxPassGroups * kRows, "one tile per pass");
constexpr int64_t kChunk = 64;  // k values per tile
constexpr int kTokenTilesPerPass = 4;  // C tiles 0-3, the A tile 4, the B tile 5
constexpr int64_t kAmxPrefetchItems = 4;  // (block, pass) items a block's bytes are fetched ahead

// Every tile is 16 rows of 64 bytes: C 16 rows x 16 int32, A 16 rows x 64 codes, B 16 rows (of 4
// k values) x 16 tokens x 4 bytes.
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
    for (int i = 0; i < 6; ++i) {
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
        !__builtin_cpu_supports("avx512vbmi"))  // every AMX CPU has it (1.6-bit unpacking)
        return false;
    // Linux hands out the tile state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
    // It refuses when a thread's signal stack is too small for the larger signal frame (then the
    // avx512 kernels run), and once granted it refuses later too-small sigaltstack calls
    // (Documentation/arch/x86/xstate.rst). Under BITNET158_ISA=avx512 the engine never asks.
    static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return granted;
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
                                                    Scratch::amx_codes)
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

}  // namespace bitnet158

#else

namespace bitnet158 {
bool amx_usable() { return false; }
void amx_activations(const int8_t*, int64_t, int64_t, int8_t*) {}
void gemm_groups_amx(const int8_t*, const int32_t*, int64_t, int64_t, const uint8_t*, int64_t,
                     int64_t, int64_t, const GemmOut&, bool) {}
void gemm_groups_amx_gated(const int8_t*, const int32_t*, int64_t, int64_t, const uint8_t*,
                           const uint8_t*, int64_t, int64_t, int64_t, const GemmOut&, float, Gate,
                           bool) {}
}  // namespace bitnet158

#endif
