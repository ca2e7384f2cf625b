// Per-ISA ternary kernels: activation quantization and the int8 x ternary GEMM over our packed
// layout (packing.py `pack_ours`). Every function here exists once per ISA (scalar, avx2,
// avx512) with the same signature; dispatch.h picks one at run time. The scalar twin defines
// the result: the SIMD versions must agree with it bit for bit.
#pragma once

#include <cstdint>

namespace bitnet158 {

constexpr int64_t kBlock = 256;  // K values per block of our layout
constexpr int64_t kRows = 4;     // rows interleaved per group of our layout
constexpr float kEps = 1e-5f;    // floor of max|x|, as quant.EPS
constexpr int kMaxTileTokens = 4;  // tokens one GEMM tile reuses each weight block for

// Where a GEMM writes its results: int32 dot products, or the dequantized float
// y = float(dot) / s[t] * beta (bitlinear's epilogue, in exactly that order).
struct GemmOut {
    int32_t* i32 = nullptr;   // [T, n] when f32 is null
    float* f32 = nullptr;     // [T, n]
    const float* s = nullptr; // [T] activation scales (f32 only)
    float beta = 1.0f;        // weight scale (f32 only)
    int64_t n = 0;            // output features = leading dimension of the output

    void store(int64_t t, int64_t row, int32_t dot) const {
        if (f32)
            f32[t * n + row] = static_cast<float>(dot) / s[t] * beta;
        else
            i32[t * n + row] = dot;
    }
};

// Quantize one row: x float32[k] -> q int8[k] with s = activation_scale(max|x|), q =
// clip(round_half_even(x * s), -128, 127); returns s. A NaN element becomes -128 (the SIMD
// convert's "integer indefinite" saturated), and NaNs are ignored by the max.
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

float quantize_row_scalar(const float* x, int64_t k, int8_t* q);
void gemm_groups_scalar(const int8_t* x_q, const int32_t* x_sum, int64_t T, int64_t kpad,
                        const uint8_t* packed, int64_t n, int64_t g0, int64_t g1,
                        const GemmOut& out);

#if defined(__x86_64__) || defined(__i386__)
#define BITNET158_X86 1
float quantize_row_avx2(const float* x, int64_t k, int8_t* q);
void gemm_groups_avx2(const int8_t* x_q, const int32_t* x_sum, int64_t T, int64_t kpad,
                      const uint8_t* packed, int64_t n, int64_t g0, int64_t g1,
                      const GemmOut& out);
float quantize_row_avx512(const float* x, int64_t k, int8_t* q);
void gemm_groups_avx512(const int8_t* x_q, const int32_t* x_sum, int64_t T, int64_t kpad,
                        const uint8_t* packed, int64_t n, int64_t g0, int64_t g1,
                        const GemmOut& out);
#endif

// Scalar rounding shared by every ISA for elements outside a full SIMD vector.
inline int8_t quantize_value(float v) {
    // x * s is within [-127, 127] (up to one rounding) for finite x, so only NaN is special.
    const float r = __builtin_nearbyintf(v);  // current rounding mode: half to even by default
    if (!(r >= -128.0f)) return -128;
    if (r > 127.0f) return 127;
    return static_cast<int8_t>(r);
}

// s = (1 / max(amax, 1e-5)) * 127 in float32, as torch evaluates `127 / amax` and as
// quant.quantize_activations does (a true division differs in the last bit for some amax).
inline float activation_scale(float amax) {
    return (1.0f / (amax > kEps ? amax : kEps)) * 127.0f;
}

}  // namespace bitnet158
