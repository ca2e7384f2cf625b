// Run-time ISA choice and the threaded entry points over the per-ISA kernels (kernels.h);
// threads come from threadpool.h.
// Shapes are checked by the callers (module.cpp); these functions trust their arguments.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "kernels.h"

namespace bitnet158 {

// amx: the avx512 kernels, with AMX tiles for the GEMM of prefill and large batches.
enum class Isa { scalar, avx2, avx512, amx };

const char* isa_name(Isa isa);
// Parse "scalar" | "avx2" | "avx512" | "amx"; throws std::invalid_argument for any other name.
Isa parse_isa(const std::string& name);
// Does this CPU run kernels of this ISA (CPUID: AVX2+FMA+F16C; AVX-512 F/BW/VL/VNNI; amx: those
// and AMX-TILE/INT8 with the tile state granted by the OS)?
bool isa_supported(Isa isa);
std::vector<Isa> supported_isas();
// The ISA in use: BITNET158_ISA if set (std::runtime_error if this CPU lacks it), else the
// best supported one. Read once.
Isa active_isa();

// The kernels of one ISA (kernels.h).
struct Kernels {
    QuantizeRowFn quantize_row;
    GemmGroupsFn gemm_groups;
    AttendFn attend;
    FloatRowsFn float_rows;
    Int8RowsFn int8_rows;
    SiluMulFn silu_mul;
    Q4RowsFn q4_rows;
    HalfRowFn half_row;
    GemmGroupsFn gemm_groups_tq1 = nullptr;  // over 1.6-bit groups (kernels_tq1.h)
    bool amx = false;  // GEMMs of 12 or more tokens run on AMX tiles (dispatch.cpp)
    // Query positions of one sequence per attention call: the FMA kernels' blocks of keys and
    // values pass through L1 once per call; attend_amx splits all of them into bf16 parts once
    // per call (runs of 128: a 512-token prefill's attention 3 % faster than 64, 12 % than 32).
    int64_t attend_positions = 16;
};
const Kernels& kernels_for(Isa isa);

inline int64_t cdiv(int64_t a, int64_t b) {
    return (a + b - 1) / b;
}
inline int64_t round_up(int64_t a, int64_t b) {
    return cdiv(a, b) * b;
}

// A zero-filled (unless `zero` is false: its writer fills every element), 64-byte aligned
// array of n elements (every 64-value plane the AVX-512 GEMM loads is one cache line).
template <class T>
struct AlignedArray {
    explicit AlignedArray(int64_t n, bool zero = true) {
        const size_t bytes =
            static_cast<size_t>(round_up(std::max<int64_t>(n, 1) * int64_t(sizeof(T)), 64));
        void* p = std::aligned_alloc(64, bytes);
        if (!p)
            throw std::bad_alloc();
        if (zero)
            __builtin_memset(p, 0, bytes);
        data.reset(static_cast<T*>(p));
    }
    struct Free {
        void operator()(T* p) const { std::free(p); }
    };
    std::unique_ptr<T, Free> data;
    T* get() const { return data.get(); }
};

// How a ternary matrix is packed: our 2-bit layout (packing.pack_ours, groups of kpad bytes,
// kpad a multiple of 256) or the 1.6-bit one (pack_ours_tq1, kernels_tq1.h: kpad a multiple of
// 320, groups of kpad * 4 / 5 bytes).
enum class Layout { bits2, tq1 };
constexpr int64_t kTq1Block = 320;  // K values of one block of the 1.6-bit layout: 5 planes of 64

// K values per block of a layout: activations are zero-padded to a multiple of it.
inline int64_t k_block(Layout layout) {
    return layout == Layout::tq1 ? kTq1Block : kBlock;
}

// One matrix of a (possibly fused) GEMM: packed W [n, kpad] and where its results go.
struct GemmTask {
    const uint8_t* packed;
    int64_t n;
    GemmOut out;
    Layout layout = Layout::bits2;
    // AMX only (gemm_uses_amx): packed is a gate, `up` its up matrix with weight scale up_beta,
    // and out gets act(gate) * up (gemm_groups_amx_gated)
    const uint8_t* up = nullptr;
    float up_beta = 0.0f;
    Gate act = Gate::relu2;
};

// Whether run_gemm_tasks takes T tokens on the AMX GEMM.
bool gemm_uses_amx(const Kernels& kern, int64_t T);

// All dot products of x_q int8[T, kpad] (64-byte aligned, zero beyond k; x_sum its row sums)
// with every task's matrix, as one job of the thread pool: the fused q/k/v or gate/up
// projections share one quantized input and one wait. kpad suits every task's layout.
void run_gemm_tasks(const Kernels& kern, const int8_t* x_q, const int32_t* x_sum, int64_t T,
                    int64_t kpad, const GemmTask* tasks, int64_t ntasks);

// x float32[T, k] -> x_q int8[T, k], s float32[T] (quant.quantize_activations).
void quantize_activations(const float* x, int64_t T, int64_t k, int8_t* x_q, float* s, Isa isa);

// x_q int8[T, k] . ternary W[n, k] (packed in `layout`: 2-bit uint8[ceil(n/4), ceil(k/256)*256],
// or 1.6-bit, kernels_tq1.h) -> out int32[T, n], exact.
void ternary_gemm_i32(const int8_t* x_q, int64_t T, int64_t k, const uint8_t* packed, int64_t n,
                      int32_t* out, Isa isa, Layout layout = Layout::bits2);

// y float32[T, n] = float(quantize(x) . W) / s * beta (quant.ternary_linear_reference). With
// `up` (a matrix packed alike): act(y) * (the same for up with up_beta), the gate of a
// feed-forward (fused into the AMX GEMM's store where it runs).
void bitlinear(const float* x, int64_t T, int64_t k, const uint8_t* packed, float beta, int64_t n,
               float* y, Isa isa, const uint8_t* up = nullptr, float up_beta = 0.0f,
               Gate act = Gate::relu2);

// Row-wise float loops (norms, ReLU^2) compiled for AVX-512, AVX2 and the baseline, picked by
// the loader from CPUID. They neither reassociate nor contract (-ffp-contract=off), so every
// clone computes the same bits.
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#define BITNET158_CLONES \
    __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BITNET158_CLONES
#endif

// ReLU^2 gate: g[i] = relu(g[i])^2 * u[i] (the AMX GEMM's relu2 store computes the same bits).
void relu2_mul(float* g, const float* u, int64_t n);

// Read all n bytes at p with the thread pool and return their xor (64 bits at a time): the
// bandwidth probe of `bitnet158 bench`.
uint64_t read_bytes(const uint8_t* p, int64_t n);

// Multiply-adds per second of the instruction `isa`'s prefill GEMM multiplies with (AMX
// TDPBUSD, AVX-512 vpdpbusd, AVX2 vpmaddubsw), run for about `seconds` on the thread pool from
// registers alone: the compute ceiling of a prefill (bitnet158 bench). 0 for the scalar ISA.
double multiply_add_rate(Isa isa, double seconds);

}  // namespace bitnet158
