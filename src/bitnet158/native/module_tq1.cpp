// Python binding of the 1.6-bit ternary GEMM (kernels_tq1.h): bitnet158._native.
// ternary_gemm_tq1_i32. Its arguments are checked as module.cpp checks ternary_gemm_i32's:
// dtype, dimensions and C-contiguity (TypeError), n, k and shapes (ValueError), each message
// naming the argument; no silent conversion. The GIL is released while computing.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <optional>
#include <string>

#include "dispatch.h"
#include "kernels_tq1.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace bitnet158 {

namespace {

using Arr = nb::ndarray<nb::ro, nb::device::cpu>;

constexpr int64_t kMaxK = int64_t(1) << 22;  // as module.cpp: every int32 sum stays exact

std::string shape_of(const Arr& a) {
    std::string s = "(";
    for (size_t i = 0; i < a.ndim(); ++i)
        s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + (a.ndim() == 1 ? ",)" : ")");
}

// A 2-D, C-contiguous array of element type T, else TypeError naming it.
template <class T>
const T* matrix(const Arr& a, const char* what, const char* type) {
    if (a.dtype() != nb::dtype<T>())
        throw nb::type_error((std::string(what) + " must be " + type).c_str());
    if (a.ndim() != 2)
        throw nb::type_error(
            (std::string(what) + " must be 2-dimensional, got shape " + shape_of(a)).c_str());
    const int64_t rows = a.shape(0), cols = a.shape(1);
    const bool contiguous = a.size() == 0 || ((cols == 1 || a.stride(1) == 1) &&
                                              (rows == 1 || a.stride(0) == cols));
    if (!contiguous)
        throw nb::type_error((std::string(what) +
                              " must be C-contiguous (a strided view is not: pass "
                              "np.ascontiguousarray(...))")
                                 .c_str());
    return static_cast<const T*>(a.data());
}

Isa isa_argument(const std::optional<std::string>& name) {
    if (!name)
        return active_isa();
    const Isa isa = parse_isa(*name);  // std::invalid_argument -> ValueError
    if (!isa_supported(isa))
        throw nb::value_error(("ISA '" + *name + "' is not supported by this CPU").c_str());
    return isa;
}

}  // namespace

void bind_tq1(nb::module_& m) {
    m.def(
        "ternary_gemm_tq1_i32",
        [](Arr x_q, Arr packed, int64_t n, int64_t k, std::optional<std::string> isa) {
            const Isa use = isa_argument(isa);
            const int8_t* xd = matrix<int8_t>(x_q, "x_q", "int8");
            const uint8_t* wd = matrix<uint8_t>(packed, "packed", "uint8");
            if (n < 1 || k < 1 || k > kMaxK)
                throw nb::value_error(("n and k must be >= 1 and k <= " + std::to_string(kMaxK) +
                                       ", got n=" + std::to_string(n) + ", k=" + std::to_string(k))
                                          .c_str());
            if (int64_t(x_q.shape(1)) != k)
                throw nb::value_error(("x_q has " + std::to_string(x_q.shape(1)) +
                                       " columns, expected k=" + std::to_string(k))
                                          .c_str());
            const int64_t groups = cdiv(n, kRows), bytes = tq1_group_bytes(k);
            if (int64_t(packed.shape(0)) != groups || int64_t(packed.shape(1)) != bytes)
                throw nb::value_error(("packed (1.6-bit weights for n=" + std::to_string(n) +
                                       ", k=" + std::to_string(k) + ") must have shape (" +
                                       std::to_string(groups) + ", " + std::to_string(bytes) +
                                       "), got " + shape_of(packed))
                                          .c_str());
            const int64_t T = x_q.shape(0);
            int32_t* out = new int32_t[size_t(std::max<int64_t>(T * n, 1))];
            nb::capsule owner(out, [](void* p) noexcept { delete[] static_cast<int32_t*>(p); });
            {
                nb::gil_scoped_release release;
                ternary_gemm_tq1_i32(xd, T, k, wd, n, out, use);
            }
            const size_t shape[2] = {size_t(T), size_t(n)};
            return nb::ndarray<nb::numpy, int32_t>(out, 2, shape, owner);
        },
        "x_q"_a.noconvert(), "packed"_a.noconvert(), "n"_a, "k"_a, "isa"_a = nb::none(),
        "Exact dot products x_q int8[T, k] . W^T -> int32[T, n], W ternary [n, k] packed by "
        "packing.pack_ours_tq1 (uint8[ceil(n/4), 256*ceil(k/320)], 5 trits per byte). isa avx512 "
        "runs the AVX-512 VBMI kernel where the CPU has VBMI; avx2 and scalar run the portable "
        "kernel (see tq1_kernel).");
    m.def(
        "tq1_kernel",
        [](std::optional<std::string> isa) {
            return std::string(tq1_kernel_name(isa_argument(isa)));
        },
        "isa"_a = nb::none(),
        "The kernel ternary_gemm_tq1_i32 runs for this ISA: 'avx512' or 'scalar'.");
}

}  // namespace bitnet158
