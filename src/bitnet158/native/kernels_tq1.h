// The ternary GEMM over our 1.6-bit layout (packing.py `pack_ours_tq1`: 5 trits per byte),
// measured against the 2-bit layout by benchmarks/bench_layout.py. Apart from kernels.h
// because the engine does not use it: only the `ternary_gemm_tq1_i32` binding does.
#pragma once

#include <cstdint>

#include "dispatch.h"

namespace bitnet158 {

constexpr int64_t kTq1Block = 320;   // K values of one block: 5 planes of 64
constexpr int64_t kTq1RowBytes = 64;  // bytes of one row in one block

// Bytes of one group of 4 rows for k input features: blocks of 320, 64 bytes per row each.
inline int64_t tq1_group_bytes(int64_t k) {
    return cdiv(k, kTq1Block) * kRows * kTq1RowBytes;
}

// x_q int8[T, k] . ternary W[n, k] (packed: uint8[ceil(n/4), tq1_group_bytes(k)]) -> out
// int32[T, n], exact. Kernels: AVX-512 with VBMI where `isa` is avx512 and the CPU has VBMI
// (byte permutes decode the trits), else the portable scalar one (AVX2 has no kernel of its own).
void ternary_gemm_tq1_i32(const int8_t* x_q, int64_t T, int64_t k, const uint8_t* packed,
                          int64_t n, int32_t* out, Isa isa);

// Which kernel ternary_gemm_tq1_i32 runs for `isa`: "avx512" or "scalar".
const char* tq1_kernel_name(Isa isa);

}  // namespace bitnet158
