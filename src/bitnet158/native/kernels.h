// Per-ISA ternary kernels: activation quantization and the int8 x ternary GEMM over our packed
// layout (packing.py `pack_ours`). Every function here exists once per ISA (scalar, avx2,
// avx512) with the same signature; dispatch.h picks one at run time. The scalar twin defines
// the result: the SIMD versions must agree with it bit for bit.
#pragma once

#include <cstdint>

namespace bitnet158 {

constexpr int64_t kBlock = 256;    // K values per block of our layout
constexpr int64_t kRows = 4;       // rows interleaved per group of our layout
constexpr float kEps = 1e-5f;      // floor of max|x|, as quant.EPS
constexpr int kMaxTileTokens = 4;  // tokens one GEMM tile reuses each weight block for
// Decode, and the first token tile of a batch over each block of weights, fetch the packed
// weights this far ahead into L2: on 2 Sapphire Rapids cores the hardware prefetchers alone
// streamed 15-17 GB/s of a 26 GB/s read probe, 23-26 with it (AVX-512; the AVX2 decode went 79
// -> 56 ms per 2B-4T token; batches of 2 and 4 tokens 1.6-2.3x the multiply-adds per second).
// On AMD Zen 4 the one-token 2-bit GEMV streams faster without it (over the 2B-4T weights 3-30 %
// faster in 16 of 16 alternating rounds, a whole 4-bit-head step ~8 % in 9 of 10, the AVX2
// decode 3-12 % in 6 of 6): its own prefetchers keep up, and the extra requests compete with
// them. Batches of 4 and 16 tokens there still gain from it (5 of 6 rounds each), and so does
// the 1.6-bit GEMV, which spends more time per byte decoding (5 of 6). Zen 5 is like Intel here
// again: the GEMV over the 2B-4T weights ~9 % faster with it (7 of 8 alternating rounds), a
// 4-bit-head step in 10 of 14. prefetch_gemv says whether the one-token 2-bit GEMV fetches
// ahead (CPUID at load: not on AMD before Zen 5).
// float_row_at_a_time: the one-token float output layer streams a row at a time with no
// prefetch of its own, on AMD (Zen 4: a head-bound step at a median 0.87 of the read probe
// against 0.82 for 4 rows at once and their prefetch, 12 alternating runs each; Zen 5: a
// one-layer 2B-4T step, 95 % head, ~15 % faster in 7 of 8 rounds).
constexpr int64_t kGemvPrefetchBytes = 3072;
extern const bool prefetch_gemv;
extern const bool float_row_at_a_time;

// The 4 row lines of the weight block at w (one group of our layout), kGemvPrefetchBytes ahead,
// into L2 (prefetcht1 on x86).
inline void prefetch_ahead(const uint8_t* w) {
    for (int64_t r = 0; r < kRows; ++r)
        __builtin_prefetch(w + kGemvPrefetchBytes + 64 * r, 0, 2);
}

// The mask of a 16-lane vector's first n lanes (none for n <= 0, all for n >= 16).
inline uint16_t first_lanes(int64_t n) {
    return n >= 16 ? uint16_t(0xffff) : n <= 0 ? uint16_t(0) : uint16_t((1u << n) - 1);
}

// The 64-byte lines of `bytes` bytes at p, into L1 (prefetcht0 on x86).
inline void prefetch_lines(const void* p, int64_t bytes) {
    for (int64_t at = 0; at < bytes; at += 64)
        __builtin_prefetch(static_cast<const char*>(p) + at, 0, 3);
}

// Buffers that a thread keeps for its next calls (the pool's threads and the caller each have
// their own), one per use: a fresh allocation per call would be mapped and faulted in anew
// (glibc maps blocks of 128 KB and more), and the large ones are in huge pages.
enum class Scratch { row, scores, codes, amx_activations, amx_attention, step, count };
// The buffer `which` of this thread, at least `bytes`, 64-byte aligned (its contents are lost
// when it grows).
void* thread_scratch_bytes(int64_t bytes, Scratch which);
template <typename T>
T* thread_scratch(int64_t n, Scratch which) {
    return static_cast<T*>(thread_scratch_bytes(n * int64_t(sizeof(T)), which));
}

// Where a GEMM writes its results: int32 dot products, or the dequantized float
// y = float(dot) / s[t] * beta (bitlinear's epilogue, in exactly that order), stored or added
// to what is there (a residual connection: x + bitlinear(h)).
struct GemmOut {
    int32_t* i32 = nullptr;    // [T, n] when f32 is null
    float* f32 = nullptr;      // [T, n]
    const float* s = nullptr;  // [T] activation scales (f32 only)
    float beta = 1.0f;         // weight scale (f32 only)
    int64_t n = 0;             // leading dimension of the output
    bool add = false;          // f32 += y instead of f32 = y

    void store(int64_t t, int64_t row, int32_t dot) const {
        if (f32) {
            const float y = static_cast<float>(dot) / s[t] * beta;
            if (add)
                f32[t * n + row] += y;
            else
                f32[t * n + row] = y;
        } else {
            i32[t * n + row] = dot;
        }
    }
};

// Element types of float matrices (embedding, output layer) and of the KV cache.
enum class Dtype : int { f32 = 0, f16 = 1, bf16 = 2 };

inline int64_t dtype_size(Dtype t) { return t == Dtype::f32 ? 4 : 2; }  // bytes per value

// The KV cache holds a head's keys in tiles of kKeyTile positions, each tile [d][kKeyTile]: a
// dimension of 16 consecutive keys is one vector, so a score loop runs keys as lanes (one FMA
// chain per score over the dimensions, no reductions). Values stay [position][d]. A cache's
// capacity is a multiple of kKeyTile.
constexpr int64_t kKeyTile = 16;

// Where dimension i of key j sits in a head's tiled keys.
inline int64_t key_index(int64_t j, int64_t i, int64_t d) {
    return ((j / kKeyTile) * d + i) * kKeyTile + j % kKeyTile;
}

// Causal attention of `npos` consecutive query positions of one sequence, for `group` query
// heads sharing one KV head: position i (its heads q + i * ldq, float32[group, d], already
// rotated) attends to the first n0 + i keys (tiled, see kKeyTile) and values [., d] (f32 or
// f16), and out + i * ldo, float32[group, d], gets softmax(q k^T * scale) v. scores: float32
// scratch of npos * group * (n0 + npos - 1). A position's result does not depend on npos (bit
// for bit): a prefill gives the logits of one-token steps (except attend_amx's, below).
using AttendFn = void (*)(const float* q, int64_t ldq, int64_t npos, int64_t group,
                          const void* keys, const void* values, Dtype kv, int64_t n0, int64_t d,
                          float scale, float* scores, float* out, int64_t ldo);

// Output-layer logits in exact float: out[t * ldo + r] = sum_i h[t, i] * W[r, i] for the rows
// r in [r0, r1) of W [rows, k] (dtype w: f32, f16 or bf16) and T tokens of h float32[T, k].
using FloatRowsFn = void (*)(const float* h, int64_t T, int64_t k, const void* w, Dtype wt,
                             int64_t r0, int64_t r1, float* out, int64_t ldo);

// The 4-bit output layer: rows of W in groups of 32 weights q in [-8, 7] with an f16 scale d
// each, d[r, g] for weights 32g..32g+31. A block of kQ4Block = 256 weights (8 groups) takes 128
// bytes in the order of a 16-lane int32 multiply-add, so that each lane sums one group and one
// vector of scales serves the block: lane l = g + 8h (h < 2) holds weights 32g + 16h + 4s + b
// (b < 4) of steps s < 4, and byte 64L + 4l + b holds q+8 of step s = 2L in its low nibble and
// of s = 2L + 1 in its high one. Position p of a block (0..255, step p / 64, lane p % 64 / 4)
// is weight q4_natural(p). x_q int8[T, kpad] comes in that order too (kpad a multiple of
// kQ4Block, zero padded): x_q[t, 256B + p] = x[t, 256B + q4_natural(p)]; x_corr int32[T,
// kpad/16] = -8 * (the sum of each lane's 16 activations). out[t * ldo + r] = inv_s[t] *
// sum_g d[r, g] * (x[t] . q[r])_g for rows [r0, r1); w uint8[rows, kpad/2], d f16[rows, kpad/32].
// Before, 128 weights took 64 bytes in natural order and each 4-weight lane sum was converted
// and scaled apart: the 4-bit head ran at ~75 % of the read bandwidth, limited by instructions.
constexpr int64_t kQ4Block = 256;
constexpr int q4_natural(int p) {
    return 32 * (p % 64 / 4 % 8) + 16 * (p % 64 / 32) + 4 * (p / 64) + p % 4;
}

using Q4RowsFn = void (*)(const int8_t* x_q, const int32_t* x_corr, const float* inv_s, int64_t T,
                          int64_t kpad, const uint8_t* w, const uint16_t* d, int64_t r0, int64_t r1,
                          float* out, int64_t ldo);

// SwiGLU: g[i] = silu(g[i]) * u[i], silu(x) = x / (1 + e^-x) as torch evaluates it.
using SiluMulFn = void (*)(float* g, const float* u, int64_t n);

// out[i] = x[i] in IEEE binary16 bits (the float16 KV cache): round to nearest even, overflow
// to inf, subnormals kept, NaN quieted with its top payload bits (as F16C's VCVTPS2PH does).
using HalfRowFn = void (*)(const float* x, int64_t n, uint16_t* out);

// The int8 output layer: out[t * ldo + r] = sum_i x_q[t, i] * W[r, i], exact, for rows
// r in [r0, r1) of W int8[rows, kpad] (kpad a multiple of 64, zero padded, like x_q int8[T,
// kpad]); w_sum int32[rows] = sum_i W[r, i] (for kernels that compute in unsigned x + 128).
using Int8RowsFn = void (*)(const int8_t* x_q, int64_t T, int64_t kpad, const int8_t* w,
                            const int32_t* w_sum, int64_t r0, int64_t r1, int32_t* out,
                            int64_t ldo);

// Quantize one row: x float32[k] -> q int8[k] with s = activation_scale(max|x|), q =
// clip(round_half_even(x * s), -128, 127); returns s. A row holding a NaN gets s = NaN (torch's
// absmax propagates it), so all its codes are -128 (the SIMD convert's "integer indefinite",
// saturated) and every output dequantized with s is NaN, as in the torch model.
using QuantizeRowFn = float (*)(const float* x, int64_t k, int8_t* q);

// Dot products of T activation rows with the rows of groups [g0, g1) of a packed matrix:
//   x_q    int8[T, kpad], zero beyond k (so the zero-weight padding contributes nothing),
//          64-byte aligned (not required, but the AVX-512 kernel is tuned for it)
//   x_sum  int32[T], sum of each activation row (removes the +1 of the stored codes)
//   packed uint8[ceil(n/4), kpad], our layout; rows >= n of the last group are not stored.
// T is at most a few tens (dispatch splits tokens into chunks that stay in L2).
using GemmGroupsFn = void (*)(const int8_t* x_q, const int32_t* x_sum, int64_t T, int64_t kpad,
                              const uint8_t* packed, int64_t n, int64_t g0, int64_t g1,
                              const GemmOut& out);

// The AMX GEMM (kernels_amx.cpp), for prefill and large batches: the activations first go
// into the tiles' order, b int8[ceil(T/16) * 16 * kpad] (amx_activations; token tile j starts
// at b + 16 * j * kpad), then gemm_groups_amx takes them where gemm_groups takes x_q, best with
// g0 and g1 multiples of kAmxPassGroups.
constexpr int64_t kAmxTileTokens = 16;  // tokens per B tile
constexpr int64_t kAmxPassGroups = 4;   // row groups per tile pass (16 rows: one A tile)
constexpr int64_t kAmxCallPasses = 4;   // passes a call takes together (sharing their B tiles)
bool amx_usable();  // CPUID has AMX-TILE and AMX-INT8, and Linux granted the tile state
void amx_activations(const int8_t* x_q, int64_t T, int64_t kpad, int8_t* b);
// tq1: packed holds 1.6-bit groups (kernels_tq1.h), kpad a multiple of their 320-value block.
void gemm_groups_amx(const int8_t* b, const int32_t* x_sum, int64_t T, int64_t kpad,
                     const uint8_t* packed, int64_t n, int64_t g0, int64_t g1, const GemmOut& out,
                     bool tq1);
// A feed-forward's gate: ReLU² (relu(g)^2 * u, BitNet b1.58 2B-4T) or SwiGLU (silu(g) * u).
enum class Gate { relu2, silu };
// The same for a feed-forward's gate and up matrices (same shape and layout) with the gate in
// the epilogue: out.f32[t, row] = act(g) * u, g dequantized with out.beta and u with up_beta as
// GemmOut::store does, then the activation as the separate pass does it (relu2_mul, or the
// AVX-512 silu_mul): the same bits as storing both and that pass, without writing (and reading
// back) up's [T, n] floats.
void gemm_groups_amx_gated(const int8_t* b, const int32_t* x_sum, int64_t T, int64_t kpad,
                           const uint8_t* gate, const uint8_t* up, int64_t n, int64_t g0,
                           int64_t g1, const GemmOut& out, float up_beta, Gate act, bool tq1);

// Attention of prefills on AMX-BF16 tiles (kernels_amx.cpp), where the cache is f16 and a call
// fills at least one 16-row tile (positions x heads); attend_avx512 otherwise. Queries and
// softmax weights are split into two bf16 parts (16 of their 24 significant bits) and f16 keys
// and values into two exactly, so a tile product is three bf16 products summed in f32 (hi.hi +
// hi.lo + lo.hi): outputs within ~2^-16 of the f32 kernels', far below the f16 cache's own
// rounding (2^-11). On 2 Sapphire Rapids cores a 512-token prefill's attention took ~45 % less
// time (pp512 +10-13 %; after 1500 context tokens +50 %). Unlike every other attend, its
// results are not bit for bit those of one-token steps, which stay on the FMA kernels: a step
// on tiles would split its whole cache again (at 1500 positions 57 ms instead of 48.5), and
// TDPBF16PS sums its products in an order of its own that FMAs do not reproduce.
void attend_amx(const float* q, int64_t ldq, int64_t npos, int64_t group, const void* keys,
                const void* values, Dtype kv, int64_t n0, int64_t d, float scale, float* scores,
                float* out, int64_t ldo);

#define BITNET158_DECLARE_KERNELS(isa)                                                             \
    float quantize_row_##isa(const float* x, int64_t k, int8_t* q);                                \
    void gemm_groups_##isa(const int8_t* x_q, const int32_t* x_sum, int64_t T, int64_t kpad,       \
                           const uint8_t* packed, int64_t n, int64_t g0, int64_t g1,               \
                           const GemmOut& out);                                                    \
    void attend_##isa(const float* q, int64_t ldq, int64_t npos, int64_t group, const void* keys,  \
                      const void* values, Dtype kv, int64_t n0, int64_t d, float scale,            \
                      float* scores, float* out, int64_t ldo);                                     \
    void float_rows_##isa(const float* h, int64_t T, int64_t k, const void* w, Dtype wt,           \
                          int64_t r0, int64_t r1, float* out, int64_t ldo);                        \
    void int8_rows_##isa(const int8_t* x_q, int64_t T, int64_t kpad, const int8_t* w,              \
                         const int32_t* w_sum, int64_t r0, int64_t r1, int32_t* out, int64_t ldo); \
    void silu_mul_##isa(float* g, const float* u, int64_t n);                                      \
    void half_row_##isa(const float* x, int64_t n, uint16_t* out);                                 \
    void q4_rows_##isa(const int8_t* x_q, const int32_t* x_corr, const float* inv_s, int64_t T,    \
                       int64_t kpad, const uint8_t* w, const uint16_t* d, int64_t r0, int64_t r1,  \
                       float* out, int64_t ldo);

BITNET158_DECLARE_KERNELS(scalar)
// One position of attend_scalar (n keys): the reference, and the AVX2 kernel's fallback.
void attend_position_scalar(const float* q, int64_t group, const void* keys, const void* values,
                            Dtype kv, int64_t n, int64_t d, float scale, float* scores, float* out);

#if defined(__x86_64__) || defined(__i386__)
#define BITNET158_X86 1
BITNET158_DECLARE_KERNELS(avx2)
BITNET158_DECLARE_KERNELS(avx512)
// A row of n scores replaced by e^(s - max s), returning their sum: attend_avx512's softmax
// before its normalization (attend_amx normalizes its outputs instead).
float exp_row_avx512(float* s, int64_t n);
// The prefill GEMM's multiply instruction run back to back on one thread, `iters` rounds of
// independent chains in registers (no memory): the multiply-adds done (bitnet158 bench's
// prefill ceiling, dispatch.h multiply_add_rate). AVX-512: vpdpbusd; AVX2: vpmaddubsw (its
// GEMM also widens the sums, so this is an upper bound); AMX: TDPBUSD (kernels_amx.cpp).
int64_t multiply_adds_avx512(int64_t iters);
int64_t multiply_adds_avx2(int64_t iters);
int64_t multiply_adds_amx(int64_t iters);
// The 1.6-bit GEMM's batches of at least kCodesMinTokens tokens (kernels_tq1.cpp) decode each
// group once into byte codes (codes[r * kpad + k], 0..2, for the 4 rows of group g), and
// codes_gemm_avx512 stores the T tokens' dot products with them through out (GemmGroupsFn's
// contract for that one group); sums: int32 scratch of T * kRows.
constexpr int64_t kCodesMinTokens = 8;
void codes_gemm_avx512(const int8_t* x_q, const int32_t* x_sum, int64_t T, int64_t kpad,
                       const uint8_t* codes, int32_t* sums, int64_t g, int64_t n,
                       const GemmOut& out);
#endif

// Scalar rounding shared by every ISA for elements outside a full SIMD vector.
inline int8_t quantize_value(float v) {
    // x * s is within [-127, 127] (up to one rounding) for finite x, so only NaN is special.
    const float r = __builtin_nearbyintf(v);  // current rounding mode: half to even by default
    if (!(r >= -128.0f))
        return -128;
    if (r > 127.0f)
        return 127;
    return static_cast<int8_t>(r);
}

// s = (1 / max(amax, 1e-5)) * 127 in float32, as torch evaluates `127 / amax` and as
// quant.quantize_activations does (a true division differs in the last bit for some amax).
inline float activation_scale(float amax) {
    return (1.0f / (amax > kEps ? amax : kEps)) * 127.0f;
}

// The scale of a row, NaN when the row holds a NaN (see QuantizeRowFn).
inline float row_scale(float amax, bool has_nan) {
    return has_nan ? __builtin_nanf("") : activation_scale(amax);
}

// IEEE half and bfloat16 bits -> float32, exactly (scalar paths and the loops the clones
// vectorize; the SIMD kernels convert in hardware).
inline float half_to_float(uint16_t h) {
    // Branch-free, so that loops of it vectorize: a half's magnitude bits moved into a float's
    // place are its value times 2^-112, subnormals included (exact: a power of two); infinities
    // and NaNs keep an all-ones exponent instead. (Denormal floats must not be flushed: the
    // default, which nothing in this process changes.)
    const uint32_t mag = uint32_t(h & 0x7fff) << 13;
    float f;
    __builtin_memcpy(&f, &mag, 4);
    f *= 0x1p112f;
    uint32_t bits;
    __builtin_memcpy(&bits, &f, 4);
    if ((h & 0x7c00) == 0x7c00)
        bits = mag | 0x7f800000u;
    bits |= uint32_t(h & 0x8000) << 16;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}

inline float bf16_to_float(uint16_t h) {
    const uint32_t bits = uint32_t(h) << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}

// Element i of a row of dtype t, as float (every ISA's scalar tails).
inline float load_float(const void* p, Dtype t, int64_t i) {
    switch (t) {
        case Dtype::f16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
        case Dtype::bf16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
        default: return static_cast<const float*>(p)[i];
    }
}

// float32 -> IEEE half bits, rounding to nearest even (the KV cache's scalar store).
inline uint16_t float_to_half(float f) {
    uint32_t x;
    __builtin_memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u)  // NaN: quiet, the top 9 of its 23 payload bits kept
        return uint16_t(sign | 0x7e00 | ((ax >> 13) & 0x1ff));
    if (ax == 0x7f800000u)
        return uint16_t(sign | 0x7c00);
    if (ax >= 0x477ff000u)
        return uint16_t(sign | 0x7c00);  // rounds to >= 65520: inf
    if (ax < 0x38800000u) {              // below the smallest normal half: a subnormal or zero
        float a;
        __builtin_memcpy(&a, &ax, 4);
        // a * 2^24 is the subnormal's integer mantissa; rint rounds half to even
        return uint16_t(sign | static_cast<uint32_t>(__builtin_nearbyintf(a * 16777216.0f)));
    }
    const uint32_t odd = (ax >> 13) & 1;
    const uint32_t r = (ax + 0xfff + odd) >> 13;  // round half to even on the dropped bits
    return uint16_t(sign | (r - (112 << 10)));
}

}  // namespace bitnet158
