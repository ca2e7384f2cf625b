// ISA detection (CPUID, BITNET158_ISA override) and the threaded drivers over kernels.h.
#include "dispatch.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>

#ifdef __linux__
#include <sys/mman.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "kernels.h"
#include "kernels_tq1.h"
#include "threadpool.h"

namespace bitnet158 {

namespace {

// A thread's step through a GEMM streams at least this many weight bytes (about a microsecond):
// smaller ones cost more in claiming than they gain in balance.
constexpr int64_t kMinChunkBytes = 32 * 1024;
// Activation rows of one pass over the weights stay within this many bytes, so they remain in
// L2 while the weights stream through once per pass.
constexpr int64_t kTokenChunkBytes = 256 * 1024;
// Activation values one quantization chunk handles at least.
constexpr int64_t kMinQuantizeChunk = 16 * 1024;

int32_t row_sum(const int8_t* x, int64_t k) {
    int32_t s = 0;
    for (int64_t i = 0; i < k; ++i)
        s += x[i];
    return s;
}

// Quantize rows of x float32[T, k] into x_q (row stride ldq, tail left as is), in parallel.
void quantize_rows(const Kernels& kern, const float* x, int64_t T, int64_t k, int8_t* x_q,
                   int64_t ldq, float* s, int32_t* x_sum) {
    const int64_t rows = std::max<int64_t>(1, kMinQuantizeChunk / std::max<int64_t>(k, 1));
    parallel_for(cdiv(T, rows), [&](int64_t c) {
        for (int64_t t = c * rows; t < std::min(T, (c + 1) * rows); ++t) {
            s[t] = kern.quantize_row(x + t * k, k, x_q + t * ldq);
            if (x_sum)
                x_sum[t] = row_sum(x_q + t * ldq, k);
        }
    });
}

// One task over one block of tokens, as units [u0, u0 + its units) of a GEMM job.
struct GemmSegment {
    int32_t task;
    int64_t t0, u0;
};

// The AMX GEMM (kernels_amx.cpp) takes blocks of at least this many tokens (fewer: the 16-token
// tiles run mostly empty, and the AVX-512 tiles were as fast at 8 tokens on Sapphire Rapids),
// and chunks of whole 16-row tile passes. A call goes over the tokens kAmxTokens at a time (4
// token tiles: all of a pass's C tiles). It takes up to kAmxCallTokens of them while their
// activations fit in kAmxCallBytes (with the unpacked codes of its passes, in L2): the codes
// are then unpacked once for 4 groups of tiles, and a 512-token prefill's gate/up and q/k/v
// GEMMs took 6-8 % less time. Unpacking for 2 groups only did not repay keeping the codes
// (the down GEMM, 6912 k values: 8 % slower), hence 64 tokens there.
constexpr int64_t kAmxMinTokens = 12;
constexpr int64_t kAmxTokens = 64;
constexpr int64_t kAmxCallTokens = 256;
constexpr int64_t kAmxCallBytes = 768 << 10;

}  // namespace

#if defined(BITNET158_X86)
namespace {
// CPUID's display family (base + extended), 0 where leaf 1 is missing: AMD Zen 3 and 4 are
// 0x19, Zen 5 0x1a.
unsigned cpu_family() {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx))
        return 0;
    const unsigned base = (eax >> 8) & 0xf;
    return base == 0xf ? base + ((eax >> 20) & 0xff) : base;
}
bool amd() {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd");
}
}  // namespace
extern const bool prefetch_gemv = !amd() || cpu_family() >= 0x1a;
extern const bool float_row_at_a_time = amd();
#else
extern const bool prefetch_gemv = true;
extern const bool float_row_at_a_time = false;
#endif

void* thread_scratch_bytes(int64_t bytes, Scratch which) {
    struct Buffer {
        struct Free {
            void operator()(void* p) const { std::free(p); }
        };
        std::unique_ptr<void, Free> data;
        int64_t size = 0;
    };
    thread_local Buffer buffers[int(Scratch::count)];
    Buffer& b = buffers[int(which)];
    if (bytes > b.size) {
        // 2 MB pages for the large ones: a 512-token prefill writes its GEMM outputs a 64-byte
        // line per token, each in another 4 KB page (with huge pages: gate/up -8 %, prep -6 %)
        constexpr int64_t kHugePage = 2 << 20;
        const int64_t align = bytes >= kHugePage ? kHugePage : 64;
        const int64_t size = round_up(bytes, align);
        b.data.reset(std::aligned_alloc(size_t(align), size_t(size)));
        b.size = b.data ? size : 0;
        if (!b.data)
            throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
        if (align == kHugePage)
            madvise(b.data.get(), size_t(size), MADV_HUGEPAGE);  // a hint: 4 KB pages if refused
#endif
    }
    return b.data.get();
}

const Kernels& kernels_for(Isa isa) {
    static const Kernels scalar{quantize_row_scalar, gemm_groups_scalar, attend_scalar,
                                float_rows_scalar,   int8_rows_scalar,   silu_mul_scalar,
                                q4_rows_scalar,      half_row_scalar,    tq1_groups_for(Isa::scalar)};
#if defined(BITNET158_X86)
    static const Kernels avx2{quantize_row_avx2, gemm_groups_avx2, attend_avx2, float_rows_avx2,
                              int8_rows_avx2,    silu_mul_avx2,    q4_rows_avx2,
                              half_row_avx2,     tq1_groups_for(Isa::avx2)};
    static const Kernels avx512{quantize_row_avx512, gemm_groups_avx512, attend_avx512,
                                float_rows_avx512,   int8_rows_avx512,   silu_mul_avx512,
                                q4_rows_avx512,      half_row_avx512,    tq1_groups_for(Isa::avx512)};
    static const Kernels amx = [] {
        Kernels k = avx512;
        k.amx = true;
        k.attend = attend_amx;
        k.attend_positions = 128;
        return k;
    }();
    if (isa == Isa::amx)
        return amx;
    if (isa == Isa::avx512)
        return avx512;
    if (isa == Isa::avx2)
        return avx2;
#endif
    (void)isa;
    return scalar;
}

bool gemm_uses_amx(const Kernels& kern, int64_t T) { return kern.amx && T >= kAmxMinTokens; }

void run_gemm_tasks(const Kernels& kern, const int8_t* x_q, const int32_t* x_sum, int64_t T,
                    int64_t kpad, const GemmTask* tasks, int64_t ntasks) {
    if (T == 0 || ntasks == 0)
        return;
    const bool amx = gemm_uses_amx(kern, T);
    // AMX: the activations in the tiles' order, once for all tasks and chunks.
    constexpr int64_t tt = kAmxTileTokens;
    int8_t* const amx_x =
        amx ? thread_scratch<int8_t>(cdiv(T, tt) * tt * kpad, Scratch::amx_activations) : nullptr;
    if (amx)  // each thread the token tiles of its own share (see for_rows in forward.cpp)
        parallel_ranges(cdiv(T, tt), 1, [&](int64_t j0, int64_t j1) {
            for (int64_t j = j0; j < j1; ++j)
                amx_activations(x_q + tt * j * kpad, std::min(tt, T - tt * j), kpad,
                                amx_x + tt * j * kpad);
        });
    const int64_t tokens =
        amx ? std::clamp(kAmxCallBytes / kpad / kAmxTokens * kAmxTokens, kAmxTokens,
                         kAmxCallTokens)
            : std::max<int64_t>(kMaxTileTokens, std::min<int64_t>(64, kTokenChunkBytes / kpad) /
                                                    kMaxTileTokens * kMaxTileTokens);
    // The work as one row of units (row groups; AMX: whole tile passes) over token blocks x
    // tasks, split into contiguous per-thread ranges.
    const int64_t unit = amx ? kAmxPassGroups : 1;
    std::vector<GemmSegment> segments;
    int64_t units = 0;
    for (int64_t t0 = 0; t0 < T; t0 += tokens)
        for (int64_t i = 0; i < ntasks; ++i) {
            segments.push_back({int32_t(i), t0, units});
            units += cdiv(cdiv(tasks[i].n, kRows), unit);
        }
    const int64_t step =
        amx ? kAmxCallPasses : cdiv(kMinChunkBytes, kpad * std::min(T, tokens) * unit);
    parallel_ranges(units, step, [&](int64_t b, int64_t e) {
        auto seg = std::upper_bound(segments.begin(), segments.end(), b,
                                    [](int64_t u, const GemmSegment& sg) { return u < sg.u0; });
        for (--seg; b < e; ++seg) {
            const GemmTask& task = tasks[seg->task];
            const int64_t g_end = cdiv(task.n, kRows);
            const int64_t seg_end = seg->u0 + cdiv(g_end, unit);
            const int64_t g0 = (b - seg->u0) * unit;
            const int64_t g1 = std::min(g_end, (std::min(e, seg_end) - seg->u0) * unit);
            b = std::min(e, seg_end);
            GemmOut part = task.out;
            if (part.f32) {
                part.f32 += seg->t0 * part.n;
                part.s += seg->t0;
            } else {
                part.i32 += seg->t0 * part.n;
            }
            const int64_t nt = std::min(tokens, T - seg->t0);
            const bool tq1 = task.layout == Layout::tq1;
            if (task.up)
                gemm_groups_amx_gated(amx_x + seg->t0 * kpad, x_sum + seg->t0, nt, kpad,
                                      task.packed, task.up, task.n, g0, g1, part, task.up_beta,
                                      task.act, tq1);
            else if (amx)
                gemm_groups_amx(amx_x + seg->t0 * kpad, x_sum + seg->t0, nt, kpad,
                                task.packed, task.n, g0, g1, part, tq1);
            else
                (tq1 ? kern.gemm_groups_tq1 : kern.gemm_groups)(x_q + seg->t0 * kpad,
                                                                x_sum + seg->t0, nt, kpad,
                                                                task.packed, task.n, g0, g1, part);
        }
    });
}

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::amx: return "amx";
        case Isa::avx512: return "avx512";
        case Isa::avx2: return "avx2";
        default: return "scalar";
    }
}

Isa parse_isa(const std::string& name) {
    if (name == "scalar")
        return Isa::scalar;
    if (name == "avx2")
        return Isa::avx2;
    if (name == "avx512")
        return Isa::avx512;
    if (name == "amx")
        return Isa::amx;
    throw std::invalid_argument("unknown ISA '" + name + "': expected scalar, avx2, avx512 or amx");
}

bool isa_supported(Isa isa) {
    if (isa == Isa::scalar)
        return true;
#if defined(BITNET158_X86)
    __builtin_cpu_init();
    if (isa == Isa::avx2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
    if (isa == Isa::avx512 || isa == Isa::amx)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
               (isa == Isa::avx512 || amx_usable());
#endif
    return false;
}

std::vector<Isa> supported_isas() {
    std::vector<Isa> out;
    for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512, Isa::amx})
        if (isa_supported(isa))
            out.push_back(isa);
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
                                         " is not one of scalar, avx2, avx512, amx");
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

void quantize_activations(const float* x, int64_t T, int64_t k, int8_t* x_q, float* s, Isa isa) {
    quantize_rows(kernels_for(isa), x, T, k, x_q, k, s, nullptr);
}

void ternary_gemm_i32(const int8_t* x_q, int64_t T, int64_t k, const uint8_t* packed, int64_t n,
                      int32_t* out, Isa isa, Layout layout) {
    const int64_t kpad = round_up(k, k_block(layout));
    // The packed rows are zero-weight padded to kpad: give the activations the same length.
    AlignedArray<int8_t> x_pad(T * kpad);
    std::vector<int32_t> x_sum(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) {
        std::memcpy(x_pad.get() + t * kpad, x_q + t * k, static_cast<size_t>(k));
        x_sum[t] = row_sum(x_q + t * k, k);
    }
    GemmOut dst;
    dst.i32 = out;
    dst.n = n;
    const GemmTask task{packed, n, dst, layout};
    run_gemm_tasks(kernels_for(isa), x_pad.get(), x_sum.data(), T, kpad, &task, 1);
}

// Branch-free: the signs of g are random.
BITNET158_CLONES void relu2_mul(float* __restrict g, const float* __restrict u, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const float r = std::max(g[i], 0.0f);
        g[i] = (r * r) * u[i];
    }
}

void bitlinear(const float* x, int64_t T, int64_t k, const uint8_t* packed, float beta, int64_t n,
               float* y, Isa isa, const uint8_t* up, float up_beta, Gate act) {
    const Kernels& kern = kernels_for(isa);
    const int64_t kpad = cdiv(k, kBlock) * kBlock;
    AlignedArray<int8_t> x_q(T * kpad);
    std::vector<int32_t> x_sum(static_cast<size_t>(T));
    std::vector<float> s(static_cast<size_t>(T));
    quantize_rows(kern, x, T, k, x_q.get(), kpad, s.data(), x_sum.data());
    GemmOut dst;
    dst.f32 = y;
    dst.s = s.data();
    dst.beta = beta;
    dst.n = n;
    GemmTask tasks[2] = {{packed, n, dst}, {up, n, dst}};
    if (!up) {
        run_gemm_tasks(kern, x_q.get(), x_sum.data(), T, kpad, tasks, 1);
    } else if (gemm_uses_amx(kern, T)) {
        tasks[0].up = up;
        tasks[0].up_beta = up_beta;
        tasks[0].act = act;
        run_gemm_tasks(kern, x_q.get(), x_sum.data(), T, kpad, tasks, 1);
    } else {
        std::vector<float> u(static_cast<size_t>(T * n));
        tasks[1].out.f32 = u.data();
        tasks[1].out.beta = up_beta;
        run_gemm_tasks(kern, x_q.get(), x_sum.data(), T, kpad, tasks, 2);
        for (int64_t t = 0; t < T; ++t)  // row by row, as the engine (SIMD bodies, then tails)
            if (act == Gate::relu2)
                relu2_mul(y + t * n, u.data() + t * n, n);
            else
                kern.silu_mul(y + t * n, u.data() + t * n, n);
    }
}

uint64_t read_bytes(const uint8_t* p, int64_t n) {
    constexpr int64_t kChunk = 1 << 20;
    std::atomic<uint64_t> total{0};
    parallel_for(cdiv(n, kChunk), [&](int64_t c) {
        const int64_t b = c * kChunk, e = std::min(n, b + kChunk);
        uint64_t acc[8] = {};
        int64_t i = b;
        for (; i + 64 <= e; i += 64)
            for (int l = 0; l < 8; ++l) {
                uint64_t v;
                std::memcpy(&v, p + i + 8 * l, 8);
                acc[l] ^= v;
            }
        for (; i < e; ++i)
            acc[0] ^= p[i];
        uint64_t x = 0;
        for (uint64_t a : acc)
            x ^= a;
        total.fetch_xor(x, std::memory_order_relaxed);
    });
    return total.load();
}

double multiply_add_rate(Isa isa, double seconds) {
#if defined(BITNET158_X86)
    int64_t (*run)(int64_t) = isa == Isa::amx      ? multiply_adds_amx
                              : isa == Isa::avx512 ? multiply_adds_avx512
                              : isa == Isa::avx2   ? multiply_adds_avx2
                                                   : nullptr;
    if (!run)
        return 0.0;
    using Clock = std::chrono::steady_clock;
    const auto elapsed = [](Clock::time_point t0) {
        return std::chrono::duration<double>(Clock::now() - t0).count();
    };
    // one thread's rate first, to size the chunks: 16 per thread, claimed as threads come, so
    // that the wall time covers all threads at work together
    int64_t iters = 1 << 12;
    for (;;) {
        const auto t0 = Clock::now();
        run(iters);
        const double s = elapsed(t0);
        if (s > 0.01) {
            iters = std::max<int64_t>(1, int64_t(double(iters) * seconds / s / 16.0));
            break;
        }
        iters *= 4;
    }
    std::atomic<int64_t> macs{0};
    const auto t0 = Clock::now();
    parallel_for(16 * int64_t(num_threads()),
                 [&](int64_t) { macs.fetch_add(run(iters), std::memory_order_relaxed); });
    return double(macs.load()) / elapsed(t0);
#else
    (void)isa;
    (void)seconds;
    return 0.0;
#endif
}

}  // namespace bitnet158
