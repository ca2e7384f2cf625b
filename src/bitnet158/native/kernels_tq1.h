// The ternary GEMM over our 1.6-bit layout (packing.py `pack_ours_tq1`: 5 trits per byte), the
// layout of files converted with `--layout tq1`: run_gemm_tasks (dispatch.cpp) calls these for
// a GemmTask of Layout::tq1.
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
// The same for activations padded to kpad, a multiple of kTq1Block.
inline int64_t tq1_group_bytes_padded(int64_t kpad) {
    return kpad / kTq1Block * kRows * kTq1RowBytes;
}

// The kernel of GemmGroupsFn's contract over 1.6-bit groups (x_q padded to a multiple of
// kTq1Block): AVX-512 with VBMI where `isa` is avx512 or amx and the CPU has VBMI (byte
// permutes decode the trits), else the portable scalar one (AVX2 has no kernel of its own).
GemmGroupsFn tq1_groups_for(Isa isa);

// The codes (0, 1, 2) of one group's 4 rows, rows[r * kpad + k] (the AMX kernel's A tiles).
void tq1_unpack_group(const uint8_t* group, int64_t kpad, uint8_t* rows);

// x_q int8[T, k] . ternary W[n, k] (packed: uint8[ceil(n/4), tq1_group_bytes(k)]) -> out
// int32[T, n], exact. Kernels: AVX-512 with VBMI where `isa` is avx512 and the CPU has VBMI
// (byte permutes decode the trits), else the portable scalar one (AVX2 has no kernel of its own).
void ternary_gemm_tq1_i32(const int8_t* x_q, int64_t T, int64_t k, const uint8_t* packed,
                          int64_t n, int32_t* out, Isa isa);

// Which kernel ternary_gemm_tq1_i32 runs for `isa` below the AMX GEMM's token count:
// "avx512" or "scalar".
const char* tq1_kernel_name(Isa isa);

}  // namespace bitnet158
