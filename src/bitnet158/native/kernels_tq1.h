// The ternary GEMM over our 1.6-bit layout (packing.py `pack_ours_tq1`: 5 trits per byte), the
// layout of files converted with `--to bitnet158-tq1`: run_gemm_tasks (dispatch.cpp) calls
// these for a GemmTask of Layout::tq1.
#pragma once

#include <cstdint>

#include "dispatch.h"

namespace bitnet158 {

constexpr int64_t kTq1RowBytes = 64;  // bytes of one row in one block of kTq1Block (dispatch.h)

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

// The codes (0, 1, 2) of one block of a group's 4 rows (kRows x kTq1RowBytes bytes at block),
// rows[r * ld + k] for k < kTq1Block: the AMX kernel's A tiles (AVX-512 VBMI, which every CPU
// with AMX has: amx_usable checks).
void tq1_unpack_block(const uint8_t* block, uint8_t* rows, int64_t ld);

// Which kernel the 1.6-bit layout runs for `isa` below the AMX GEMM's token count: "avx512" or
// "scalar".
const char* tq1_kernel_name(Isa isa);

}  // namespace bitnet158
