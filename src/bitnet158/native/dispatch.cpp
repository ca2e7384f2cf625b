// ISA detection (CPUID, BITNET158_ISA override) and the threaded drivers over kernels.h.
#include "dispatch.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace bitnet158 {

namespace {

struct Kernels {
    QuantizeRowFn quantize_row;
    GemmGroupsFn gemm_groups;
};

const Kernels& kernels_for(Isa isa) {
    static const Kernels scalar{quantize_row_scalar, gemm_groups_scalar};
#if defined(BITNET158_X86)
    static const Kernels avx2{quantize_row_avx2, gemm_groups_avx2};
    static const Kernels avx512{quantize_row_avx512, gemm_groups_avx512};
    if (isa == Isa::avx512) return avx512;
    if (isa == Isa::avx2) return avx2;
#endif
    (void)isa;
    return scalar;
}

std::atomic<int> g_threads{0};  // 0: default

// Work below this many weight bytes x tokens runs on one thread: waking the others costs more.
constexpr int64_t kMinParallelWork = 1 << 16;
// Activation rows of one GEMM pass are kept within this many bytes so they stay in L2 while
// every thread streams its rows of weights once per pass.
constexpr int64_t kTokenChunkBytes = 256 * 1024;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Run f(id, count) on `nth` threads (one OpenMP team), or inline when nth == 1.
template <class F>
void parallel(int nth, F&& f) {
#ifdef _OPENMP
    if (nth > 1) {
#pragma omp parallel num_threads(nth)
        f(omp_get_thread_num(), omp_get_num_threads());
        return;
    }
#endif
    f(0, 1);
}

void barrier() {
#ifdef _OPENMP
#pragma omp barrier
#endif
}

int threads_for(int64_t units, int64_t work) {
    if (work < kMinParallelWork) return 1;
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads(), units)));
}

int32_t row_sum(const int8_t* x, int64_t k) {
    int32_t s = 0;
    for (int64_t i = 0; i < k; ++i) s += x[i];
    return s;
}

// This thread's share [g0, g1) of the row groups, over all tokens in L2-sized chunks.
void gemm_share(const Kernels& kern, int id, int count, const int8_t* x_q, const int32_t* x_sum,
                int64_t T, int64_t kpad, const uint8_t* packed, int64_t n, const GemmOut& out) {
    const int64_t groups = cdiv(n, kRows);
    const int64_t g0 = groups * id / count, g1 = groups * (id + 1) / count;
    const int64_t chunk =
        std::max<int64_t>(kMaxTileTokens, std::min<int64_t>(64, kTokenChunkBytes / kpad) /
                                              kMaxTileTokens * kMaxTileTokens);
    for (int64_t t0 = 0; t0 < T; t0 += chunk) {
        GemmOut part = out;
        if (part.f32) {
            part.f32 += t0 * n;
            part.s += t0;
        } else {
            part.i32 += t0 * n;
        }
        kern.gemm_groups(x_q + t0 * kpad, x_sum + t0, std::min(chunk, T - t0), kpad, packed, n,
                         g0, g1, part);
    }
}

}  // namespace

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::avx512: return "avx512";
        case Isa::avx2: return "avx2";
        default: return "scalar";
    }
}

Isa parse_isa(const std::string& name) {
    if (name == "scalar") return Isa::scalar;
    if (name == "avx2") return Isa::avx2;
    if (name == "avx512") return Isa::avx512;
    throw std::invalid_argument("unknown ISA '" + name + "': expected scalar, avx2 or avx512");
}

bool isa_supported(Isa isa) {
    if (isa == Isa::scalar) return true;
#if defined(BITNET158_X86)
    __builtin_cpu_init();
    if (isa == Isa::avx2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (isa == Isa::avx512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#endif
    return false;
}

std::vector<Isa> supported_isas() {
    std::vector<Isa> out;
    for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512})
        if (isa_supported(isa)) out.push_back(isa);
    return out;
}

Isa active_isa() {
    // A throwing initializer leaves the static uninitialized: the error repeats on every call.
    static const Isa active = [] {
        const char* env = std::getenv("BITNET158_ISA");
        if (env && *env) {
            Isa forced;
            try {
                forced = parse_isa(env);
            } catch (const std::invalid_argument&) {
                throw std::runtime_error(std::string("BITNET158_ISA=") + env +
                                         " is not one of scalar, avx2, avx512");
            }
            if (!isa_supported(forced))
                throw std::runtime_error(std::string("BITNET158_ISA=") + env +
                                         " but this CPU does not support it; unset it or "
                                         "choose one of the supported ISAs");
            return forced;
        }
        return supported_isas().back();
    }();
    return active;
}

void set_num_threads(int n) {
    if (n < 1) throw std::invalid_argument("number of threads must be >= 1");
    g_threads = n;
}

int num_threads() {
    const int n = g_threads.load();
    if (n > 0) return n;
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

void quantize_activations(const float* x, int64_t T, int64_t k, int8_t* x_q, float* s, Isa isa) {
    const Kernels& kern = kernels_for(isa);
    parallel(threads_for(T, T * k), [&](int id, int count) {
        for (int64_t t = T * id / count; t < T * (id + 1) / count; ++t)
            s[t] = kern.quantize_row(x + t * k, k, x_q + t * k);
    });
}

void ternary_gemm_i32(const int8_t* x_q, int64_t T, int64_t k, const uint8_t* packed, int64_t n,
                      int32_t* out, Isa isa) {
    const Kernels& kern = kernels_for(isa);
    const int64_t kpad = cdiv(k, kBlock) * kBlock;
    // The packed rows are zero-weight padded to kpad: give the activations the same length.
    std::vector<int8_t> padded;
    if (kpad != k) {
        padded.assign(static_cast<size_t>(T * kpad), 0);
        for (int64_t t = 0; t < T; ++t) std::memcpy(&padded[t * kpad], x_q + t * k, k);
        x_q = padded.data();
    }
    std::vector<int32_t> x_sum(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) x_sum[t] = row_sum(x_q + t * kpad, kpad);
    GemmOut dst;
    dst.i32 = out;
    dst.n = n;
    const int64_t groups = cdiv(n, kRows);
    parallel(threads_for(groups, T * groups * kpad), [&](int id, int count) {
        gemm_share(kern, id, count, x_q, x_sum.data(), T, kpad, packed, n, dst);
    });
}

void bitlinear(const float* x, int64_t T, int64_t k, const uint8_t* packed, float beta,
               int64_t n, float* y, Isa isa) {
    const Kernels& kern = kernels_for(isa);
    const int64_t kpad = cdiv(k, kBlock) * kBlock;
    std::vector<int8_t> x_q(static_cast<size_t>(T * kpad), 0);
    std::vector<int32_t> x_sum(static_cast<size_t>(T));
    std::vector<float> s(static_cast<size_t>(T));
    GemmOut dst;
    dst.f32 = y;
    dst.s = s.data();
    dst.beta = beta;
    dst.n = n;
    const int64_t groups = cdiv(n, kRows);
    parallel(threads_for(groups, T * groups * kpad), [&](int id, int count) {
        for (int64_t t = T * id / count; t < T * (id + 1) / count; ++t) {
            s[t] = kern.quantize_row(x + t * k, k, &x_q[t * kpad]);
            x_sum[t] = row_sum(&x_q[t * kpad], k);
        }
        barrier();  // every thread needs every quantized row
        gemm_share(kern, id, count, x_q.data(), x_sum.data(), T, kpad, packed, n, dst);
    });
}

}  // namespace bitnet158
