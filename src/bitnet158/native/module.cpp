// Python bindings of the native kernels: bitnet158._native.
//
// Every array argument must already have the right dtype, be C-contiguous and live on the CPU
// (no silent conversion: a float64 or int32 array is a TypeError, a wrong shape a ValueError).
// Read-only arrays (memory-mapped weights) are accepted. The GIL is released while computing.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <string>
#include <vector>

#include "dispatch.h"
#include "kernels.h"
#include "threadpool.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace bitnet158;

namespace {

template <class T>
using In2D = nb::ndarray<const T, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
template <class T>
using Out = nb::ndarray<nb::numpy, T>;

// Limits keep every int32 sum exact: |sum x*(w+1)| <= 2 * 128 * k < 2^31.
constexpr int64_t kMaxK = int64_t(1) << 22;

template <class T>
Out<T> new_array(std::initializer_list<size_t> shape, T** data) {
    size_t size = 1;
    for (size_t d : shape) size *= d;
    T* ptr = new T[size > 0 ? size : 1];
    nb::capsule owner(ptr, [](void* p) noexcept { delete[] static_cast<T*>(p); });
    *data = ptr;
    return Out<T>(ptr, shape.size(), shape.begin(), owner);
}

Isa pick_isa(const std::optional<std::string>& name) {
    if (!name) return active_isa();
    const Isa isa = parse_isa(*name);  // std::invalid_argument -> ValueError
    if (!isa_supported(isa))
        throw nb::value_error(("ISA '" + *name + "' is not supported by this CPU").c_str());
    return isa;
}

void check_dims(int64_t n, int64_t k) {
    if (n < 1 || k < 1)
        throw nb::value_error(
            ("n and k must be >= 1, got n=" + std::to_string(n) + ", k=" + std::to_string(k))
                .c_str());
    if (k > kMaxK)
        throw nb::value_error(("k=" + std::to_string(k) + " exceeds the supported maximum " +
                               std::to_string(kMaxK))
                                  .c_str());
}

void check_packed(const In2D<uint8_t>& packed, int64_t n, int64_t k) {
    const int64_t groups = (n + kRows - 1) / kRows, kpad = (k + kBlock - 1) / kBlock * kBlock;
    if (int64_t(packed.shape(0)) != groups || int64_t(packed.shape(1)) != kpad)
        throw nb::value_error(("packed weights for n=" + std::to_string(n) + ", k=" +
                               std::to_string(k) + " must have shape (" + std::to_string(groups) +
                               ", " + std::to_string(kpad) + "), got (" +
                               std::to_string(packed.shape(0)) + ", " +
                               std::to_string(packed.shape(1)) + ")")
                                  .c_str());
}

template <class T>
void check_k(const In2D<T>& x, int64_t k, const char* what) {
    if (int64_t(x.shape(1)) != k)
        throw nb::value_error((std::string(what) + " has " + std::to_string(x.shape(1)) +
                               " columns, expected k=" + std::to_string(k))
                                  .c_str());
}

}  // namespace

NB_MODULE(_native, m) {
    m.doc() = "bitnet158 native kernels: ternary GEMM over the packed layout of packing.py";

    m.def("isa", [] { return std::string(isa_name(active_isa())); },
          "The instruction set the kernels dispatch to (BITNET158_ISA overrides CPUID).");
    m.def(
        "available_isas",
        [] {
            std::vector<std::string> out;
            for (Isa isa : supported_isas()) out.emplace_back(isa_name(isa));
            return out;
        },
        "The instruction sets this CPU can run, from CPUID.");
    m.def("set_num_threads", &set_num_threads, "n"_a,
          "Use n >= 1 threads in every kernel (default: the CPUs this process may run on).");
    m.def("get_num_threads", &num_threads, "The number of threads the kernels use.");

    m.def(
        "quantize_activations",
        [](In2D<float> x, std::optional<std::string> isa) {
            const Isa use = pick_isa(isa);
            const int64_t T = x.shape(0), k = x.shape(1);
            int8_t* q;
            float* s;
            auto q_arr = new_array<int8_t>({size_t(T), size_t(k)}, &q);
            auto s_arr = new_array<float>({size_t(T)}, &s);
            {
                nb::gil_scoped_release release;
                quantize_activations(x.data(), T, k, q, s, use);
            }
            return nb::make_tuple(q_arr, s_arr);
        },
        "x"_a.noconvert(), "isa"_a = nb::none(),
        "Per-row absmax int8: x float32[T, K] -> (x_q int8[T, K], s float32[T]), bit-identical "
        "to bitnet158.quant.quantize_activations for finite input.");

    m.def(
        "ternary_gemm_i32",
        [](In2D<int8_t> x_q, In2D<uint8_t> packed, int64_t n, int64_t k,
           std::optional<std::string> isa) {
            const Isa use = pick_isa(isa);
            check_dims(n, k);
            check_k(x_q, k, "x_q");
            check_packed(packed, n, k);
            const int64_t T = x_q.shape(0);
            int32_t* out;
            auto arr = new_array<int32_t>({size_t(T), size_t(n)}, &out);
            {
                nb::gil_scoped_release release;
                ternary_gemm_i32(x_q.data(), T, k, packed.data(), n, out, use);
            }
            return arr;
        },
        "x_q"_a.noconvert(), "packed"_a.noconvert(), "n"_a, "k"_a, "isa"_a = nb::none(),
        "Exact dot products x_q int8[T, k] . W^T -> int32[T, n], W ternary [n, k] packed by "
        "packing.pack_ours (uint8[ceil(n/4), ceil(k/256)*256]).");

    m.def(
        "bitlinear",
        [](In2D<float> x, In2D<uint8_t> packed, double beta, int64_t n, int64_t k,
           std::optional<std::string> isa) {
            const Isa use = pick_isa(isa);
            check_dims(n, k);
            check_k(x, k, "x");
            check_packed(packed, n, k);
            const int64_t T = x.shape(0);
            float* y;
            auto arr = new_array<float>({size_t(T), size_t(n)}, &y);
            {
                nb::gil_scoped_release release;
                bitlinear(x.data(), T, k, packed.data(), static_cast<float>(beta), n, y, use);
            }
            return arr;
        },
        "x"_a.noconvert(), "packed"_a.noconvert(), "beta"_a, "n"_a, "k"_a, "isa"_a = nb::none(),
        "Quantized linear y = float(x_q . W^T) / s * beta -> float32[T, n], bit-identical to "
        "bitnet158.quant.ternary_linear_reference for finite x.");
}
