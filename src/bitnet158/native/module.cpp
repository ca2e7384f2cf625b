// Python bindings of the native kernels (placeholder until the first kernel lands).
#include <nanobind/nanobind.h>

namespace nb = nanobind;

NB_MODULE(_native, m) {
    m.doc() = "bitnet158 native kernels";
    m.def("isa", []() { return "scalar"; }, "The instruction set the kernels dispatch to.");
}
