// Run-time ISA choice and the threaded entry points over the per-ISA kernels (kernels.h);
// threads come from threadpool.h.
// Shapes are checked by the callers (module.cpp); these functions trust their arguments.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace bitnet158 {

enum class Isa { scalar, avx2, avx512 };

const char* isa_name(Isa isa);
// Parse "scalar" | "avx2" | "avx512"; throws std::invalid_argument for any other name.
Isa parse_isa(const std::string& name);
// Does this CPU run kernels of this ISA (CPUID: AVX2+FMA; AVX-512 F/BW/VL/VNNI)?
bool isa_supported(Isa isa);
std::vector<Isa> supported_isas();
// The ISA in use: BITNET158_ISA if set (std::runtime_error if this CPU lacks it), else the
// best supported one. Read once.
Isa active_isa();

// x float32[T, k] -> x_q int8[T, k], s float32[T] (quant.quantize_activations).
void quantize_activations(const float* x, int64_t T, int64_t k, int8_t* x_q, float* s, Isa isa);

// x_q int8[T, k] . ternary W[n, k] (packed: uint8[ceil(n/4), ceil(k/256)*256], our layout)
// -> out int32[T, n], exact.
void ternary_gemm_i32(const int8_t* x_q, int64_t T, int64_t k, const uint8_t* packed, int64_t n,
                      int32_t* out, Isa isa);

// y float32[T, n] = float(quantize(x) . W) / s * beta (quant.ternary_linear_reference).
void bitlinear(const float* x, int64_t T, int64_t k, const uint8_t* packed, float beta,
               int64_t n, float* y, Isa isa);

}  // namespace bitnet158
