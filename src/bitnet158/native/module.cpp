// Python bindings of the native kernels: bitnet158._native.
//
// Every array argument is taken as it comes (any dtype, any strides) and checked here before
// C++ touches it: dtype, number of dimensions and C-contiguity (TypeError), shape and alignment
// (ValueError), each message naming the argument. No silent conversion: a float64 array where
// float32 belongs is an error, not a copy. Arrays must be on the CPU; read-only arrays
// (memory-mapped weights) are accepted except for the KV cache, which is written. The GIL is
// released while computing.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <sys/mman.h>
#include <unistd.h>

#include <climits>
#include <cstring>
#include <type_traits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "forward.h"
#include "kernels.h"
#include "kernels_tq1.h"
#include "threadpool.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace bitnet158;

namespace {

// Array arguments: any dtype and layout, checked by `typed` / `check_layout` below.
using Arr = nb::ndarray<nb::ro, nb::device::cpu>;
using ArrRW = nb::ndarray<nb::device::cpu>;  // written by C++: a read-only array is refused
template <class T>
using Out = nb::ndarray<nb::numpy, T>;

// Limits keep every int32 sum exact: |sum x*(w+1)| <= 2 * 128 * k < 2^31.
constexpr int64_t kMaxK = int64_t(1) << 22;
constexpr int64_t kMaxLayers = int64_t(1) << 16;
constexpr int kMaxThreads = 1024;

template <class T>
Out<T> new_array(std::initializer_list<size_t> shape, T** data) {
    size_t size = 1;
    for (size_t d : shape)
        size *= d;
    T* ptr = new T[size > 0 ? size : 1];
    nb::capsule owner(ptr, [](void* p) noexcept { delete[] static_cast<T*>(p); });
    *data = ptr;
    return Out<T>(ptr, shape.size(), shape.begin(), owner);
}

// T[rows, cols] whose data is 64-byte aligned (cols * sizeof(T) a multiple of 64 keeps every
// row so), in pages of its own that go back to the system when the array is freed: from glibc's
// heap, quantizing an output layer a block at a time into fresh arrays once kept ~270 MB of freed
// blocks resident (the load now passes out= instead). The first page holds the mapping's size.
template <class T>
Out<T> new_aligned(int64_t rows, int64_t cols, T** data) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const size_t bytes = page + size_t(std::max<int64_t>(rows * cols, 1)) * sizeof(T);
    void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        throw std::bad_alloc();
    std::memcpy(base, &bytes, sizeof(bytes));
    nb::capsule owner(base, [](void* p) noexcept {
        size_t n;
        std::memcpy(&n, p, sizeof(n));
        munmap(p, n);
    });
    void* ptr = static_cast<char*>(base) + page;
    *data = static_cast<T*>(ptr);
    const size_t shape[2] = {size_t(rows), size_t(cols)};
    return Out<T>(ptr, 2, shape, owner);
}

Isa pick_isa(const std::optional<std::string>& name) {
    if (!name)
        return active_isa();
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
        throw nb::value_error(
            ("k=" + std::to_string(k) + " exceeds the supported maximum " + std::to_string(kMaxK))
                .c_str());
}

// Packed ternary weights [n, k]: groups of kRows rows, `group_bytes` per group (the 2-bit
// layout's by default: k padded to kBlock).
void check_packed(const Arr& packed, int64_t n, int64_t k, const char* what,
                  int64_t group_bytes = 0) {
    const int64_t groups = (n + kRows - 1) / kRows;
    const int64_t kpad = group_bytes ? group_bytes : (k + kBlock - 1) / kBlock * kBlock;
    if (int64_t(packed.shape(0)) != groups || int64_t(packed.shape(1)) != kpad)
        throw nb::value_error((std::string(what) + " (weights for n=" + std::to_string(n) +
                               ", k=" + std::to_string(k) + ") must have shape (" +
                               std::to_string(groups) + ", " + std::to_string(kpad) + "), got (" +
                               std::to_string(packed.shape(0)) + ", " +
                               std::to_string(packed.shape(1)) + ")")
                                  .c_str());
}

void check_k(const Arr& x, int64_t k, const char* what) {
    if (int64_t(x.shape(1)) != k)
        throw nb::value_error((std::string(what) + " has " + std::to_string(x.shape(1)) +
                               " columns, expected k=" + std::to_string(k))
                                  .c_str());
}

std::string shape_str(const nb::ndarray<>& a) {
    std::string out = "(";
    for (size_t i = 0; i < a.ndim(); ++i)
        out += (i ? ", " : "") + std::to_string(a.shape(i));
    return out + (a.ndim() == 1 ? ",)" : ")");
}

bool is_dtype(nb::dlpack::dtype dt, nb::dlpack::dtype_code code, int bits) {
    return dt.code == uint8_t(code) && dt.bits == bits && dt.lanes == 1;
}

// float32, float16, or uint16 holding bfloat16 bits (`bf16` says which a uint16 array is).
template <class A>
Dtype float_dtype(const A& a, bool bf16, const char* what) {
    using nb::dlpack::dtype_code;
    if (is_dtype(a.dtype(), dtype_code::Float, 32) && !bf16)
        return Dtype::f32;
    if (is_dtype(a.dtype(), dtype_code::Float, 16) && !bf16)
        return Dtype::f16;
    if (is_dtype(a.dtype(), dtype_code::UInt, 16) && bf16)
        return Dtype::bf16;
    throw nb::type_error((std::string(what) + " must be float32, float16, or uint16 bfloat16 bits "
                                              "(with bf16=True)")
                             .c_str());
}

template <class A>
void check_aligned(const A& a, size_t align, const char* what) {
    if (reinterpret_cast<uintptr_t>(a.data()) % align)
        throw nb::value_error(
            (std::string(what) + " is not " + std::to_string(align) +
             "-byte aligned (allocate it with numpy, not as a view at an odd offset)")
                .c_str());
}

void check_shape(const nb::ndarray<>& a, std::initializer_list<int64_t> want, const char* what) {
    bool ok = a.ndim() == want.size();
    size_t i = 0;
    for (int64_t d : want)
        ok = ok && i < a.ndim() && int64_t(a.shape(i++)) == d;
    if (!ok) {
        std::string w = "(";
        i = 0;
        for (int64_t d : want)
            w += (i++ ? ", " : "") + std::to_string(d);
        throw nb::value_error((std::string(what) + " must have shape " + w +
                               (want.size() == 1 ? ",)" : ")") + ", got " + shape_str(a))
                                  .c_str());
    }
}

std::string dtype_str(nb::dlpack::dtype dt) {
    using nb::dlpack::dtype_code;
    const char* kind = "unknown";
    switch (dtype_code(dt.code)) {
        case dtype_code::Int: kind = "int"; break;
        case dtype_code::UInt: kind = "uint"; break;
        case dtype_code::Float: kind = "float"; break;
        case dtype_code::Bfloat: kind = "bfloat"; break;
        case dtype_code::Complex: kind = "complex"; break;
        case dtype_code::Bool: kind = "bool"; break;
        default: break;
    }
    return kind + std::to_string(dt.bits) + (dt.lanes != 1 ? "x" + std::to_string(dt.lanes) : "");
}

template <class A>
bool c_contiguous(const A& a) {
    if (a.size() == 0)  // no elements: nothing is read, whatever the strides say
        return true;
    int64_t expected = 1;  // stride of dimension i in elements, if C-contiguous
    for (size_t i = a.ndim(); i-- > 0;) {
        if (a.shape(i) != 1 && a.stride(i) != expected)
            return false;
        expected *= int64_t(a.shape(i));
    }
    return true;
}

// What every array argument must be, whatever its dtype: `ndim`-D and C-contiguous (else a
// TypeError: not the kind of array the function takes), its data `align`-byte aligned (else a
// ValueError: a T* to misaligned memory is undefined behaviour, even where x86 reads it).
template <class A>
void check_layout(const A& a, size_t ndim, size_t align, const char* what) {
    if (a.ndim() != ndim)
        throw nb::type_error((std::string(what) + " must be " + std::to_string(ndim) +
                               "-dimensional, got shape " + shape_str(nb::ndarray<>(a)))
                                  .c_str());
    if (!c_contiguous(a))
        throw nb::type_error(
            (std::string(what) + " must be C-contiguous (a strided view is not: pass "
                                 "np.ascontiguousarray(...))")
                .c_str());
    check_aligned(a, align, what);
}

template <class T>
const char* type_name() {
    if constexpr (std::is_same_v<T, float>)
        return "float32";
    else if constexpr (std::is_same_v<T, int8_t>)
        return "int8";
    else if constexpr (std::is_same_v<T, uint8_t>)
        return "uint8";
    else if constexpr (std::is_same_v<T, uint16_t>)
        return "uint16";
    else if constexpr (std::is_same_v<T, int32_t>)
        return "int32";
    else
        return "int64";
}

// The data of an array argument of element type T, after the checks of check_layout.
template <class T, class A>
const T* typed(const A& a, size_t ndim, const char* what, size_t align = alignof(T)) {
    if (a.dtype() != nb::dtype<T>())
        throw nb::type_error((std::string(what) + " must be " + type_name<T>() + ", got " +
                              dtype_str(a.dtype()))
                                 .c_str());
    check_layout(a, ndim, align, what);
    return static_cast<const T*>(a.data());
}

// An array argument that C++ writes (the KV cache, an out= array): refused when read-only.
ArrRW writable(const nb::handle& obj, const char* what) {
    ArrRW a;
    if (!nb::try_cast(obj, a, false))
        throw nb::type_error((std::string(what) +
                              " must be a writable array on the CPU (not read-only or "
                              "memory-mapped read-only): the native code writes into it")
                                 .c_str());
    return a;
}

// The data of out[i], an array the caller gives for a result: writable, of element type T,
// C-contiguous, `align`-byte aligned and of the result's shape.
template <class T>
T* out_part(const nb::tuple& out, size_t i, std::initializer_list<int64_t> shape,
            const char* what, size_t align = alignof(T)) {
    const ArrRW a = writable(out[i], what);
    typed<T>(a, shape.size(), what, align);
    check_shape(nb::ndarray<>(a), shape, what);
    return static_cast<T*>(a.data());
}

// out= of the quantize functions: none (they allocate) or a tuple of `parts` arrays.
void check_out(const std::optional<nb::tuple>& out, size_t parts) {
    if (out && out->size() != parts)
        throw nb::value_error(
            ("out must be a tuple of " + std::to_string(parts) + " arrays").c_str());
}

// The weights of a model for the native decoder step (forward.h). The arrays are borrowed,
// never copied: the object holds a reference to each so that memory-mapped weights outlive it.
class NativeModel {
public:
    NativeModel(int64_t hidden, int64_t inter, int64_t heads, int64_t kv_heads, int64_t head_dim,
                int64_t vocab, int64_t layers, bool relu2, bool subln, bool inner_norm,
                bool layernorm, double eps, double inner_eps, Arr inv_freq,
                const std::string& layout) {
        if (layout != "2bit" && layout != "tq1")
            throw nb::value_error(
                ("unknown weight layout '" + layout + "': expected '2bit' or 'tq1'").c_str());
        w_.layout = layout == "tq1" ? Layout::tq1 : Layout::bits2;
        ModelShape& sh = w_.shape;
        sh.hidden = hidden;
        sh.inter = inter;
        sh.heads = heads;
        sh.kv_heads = kv_heads;
        sh.head_dim = head_dim;
        sh.vocab = vocab;
        sh.layers = layers;
        sh.relu2 = relu2;
        sh.subln = subln;
        sh.inner_norm = inner_norm;
        sh.layernorm = layernorm;
        sh.eps = float(eps);
        sh.inner_eps = float(inner_eps);
        if (hidden < 1 || inter < 1 || heads < 1 || kv_heads < 1 || head_dim < 2 || head_dim % 2 ||
            vocab < 1 || layers < 1 || heads % kv_heads)
            throw nb::value_error(
                ("inconsistent model shape: hidden=" + std::to_string(hidden) + ", inter=" +
                 std::to_string(inter) + ", heads=" + std::to_string(heads) + ", kv_heads=" +
                 std::to_string(kv_heads) + ", head_dim=" + std::to_string(head_dim) +
                 ", vocab=" + std::to_string(vocab) + ", layers=" + std::to_string(layers))
                    .c_str());
        // Each factor bounded first, so that heads * head_dim cannot overflow.
        if (std::max({hidden, inter, heads, head_dim}) > kMaxK || heads * head_dim > kMaxK)
            throw nb::value_error(("a matrix is wider than the supported maximum " +
                                   std::to_string(kMaxK))
                                      .c_str());
        if (vocab > INT32_MAX || layers > kMaxLayers)
            throw nb::value_error(("vocab must fit token ids of int32 and layers be at most " +
                                   std::to_string(kMaxLayers))
                                      .c_str());
        const float* f = typed<float>(inv_freq, 1, "inv_freq");
        check_shape(nb::ndarray<>(inv_freq), {head_dim / 2}, "inv_freq");
        w_.inv_freq.assign(f, f + head_dim / 2);
        w_.layers.resize(size_t(layers));
        set_.assign(size_t(layers), false);
    }

    void set_layer(int64_t i, std::optional<Arr> attn_norm, std::optional<Arr> ffn_norm,
                   std::optional<Arr> attn_sub_norm, std::optional<Arr> ffn_sub_norm,
                   std::vector<Arr> packed, std::vector<float> betas) {
        const ModelShape& sh = w_.shape;
        if (i < 0 || i >= sh.layers)
            throw nb::index_error(("layer index " + std::to_string(i) + " is out of range (0.." +
                                   std::to_string(sh.layers - 1) + ")")
                                      .c_str());
        if (packed.size() != 7 || betas.size() != 7)
            throw nb::value_error(
                "give 7 packed matrices and 7 scales: q, k, v, o, gate, up, down");
        const int64_t H = sh.hidden, QS = sh.heads * sh.head_dim, KVS = sh.kv_heads * sh.head_dim;
        // Everything is checked before anything changes: a refused call leaves the layer as it was.
        auto norm = [&](const std::optional<Arr>& a, int64_t n, bool required,
                        const char* what) -> const float* {
            if (!a) {
                if (required)
                    throw nb::value_error((std::string(what) + " is required").c_str());
                return nullptr;
            }
            const float* data = typed<float>(*a, 1, what);
            check_shape(nb::ndarray<>(*a), {n}, what);
            return data;
        };
        LayerWeights L;
        L.attn_norm = norm(attn_norm, H, false, "attn_norm");
        L.ffn_norm = norm(ffn_norm, H, false, "ffn_norm");
        L.attn_sub_norm = norm(attn_sub_norm, QS, sh.subln, "attn_sub_norm");
        L.ffn_sub_norm = norm(ffn_sub_norm, sh.inter, sh.subln, "ffn_sub_norm");
        const int64_t shapes[7][2] = {{QS, H},       {KVS, H},      {KVS, H},     {H, QS},
                                      {sh.inter, H}, {sh.inter, H}, {H, sh.inter}};
        const char* names[7] = {"packed q",    "packed k",  "packed v",   "packed o",
                                "packed gate", "packed up", "packed down"};
        Ternary* dst[7] = {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down};
        for (int j = 0; j < 7; ++j) {
            const int64_t n = shapes[j][0], k = shapes[j][1];
            const uint8_t* data = typed<uint8_t>(packed[size_t(j)], 2, names[j]);
            check_packed(packed[size_t(j)], n, k, names[j],
                         w_.layout == Layout::tq1 ? tq1_group_bytes(k) : 0);
            *dst[j] = Ternary{data, betas[size_t(j)], n, k};
        }
        for (const auto& a : {attn_norm, ffn_norm, attn_sub_norm, ffn_sub_norm})
            if (a)
                keep_.push_back(nb::cast(*a));
        for (const Arr& a : packed)
            keep_.push_back(nb::cast(a));
        w_.layers[size_t(i)] = L;
        set_[size_t(i)] = true;
    }

    void set_embedding(Arr embed, bool bf16, bool release_rows) {
        const ModelShape& sh = w_.shape;
        const Dtype dtype = float_dtype(embed, bf16, "embed");
        check_layout(embed, 2, embed.itemsize(), "embed");
        check_shape(nb::ndarray<>(embed), {sh.vocab, sh.hidden}, "embed");
        keep_.push_back(nb::cast(embed));
        w_.embed_dtype = dtype;
        w_.embed = embed.data();
        w_.release_embed_rows = release_rows;
    }

    // The float output layer (None: the embedding, tied) and the final norm's weight.
    void set_output(std::optional<Arr> final_norm, std::optional<Arr> head, bool bf16) {
        const ModelShape& sh = w_.shape;
        if (!w_.embed)
            throw nb::value_error("set_embedding first");
        const float* norm = nullptr;
        if (final_norm) {
            norm = typed<float>(*final_norm, 1, "final norm");
            check_shape(nb::ndarray<>(*final_norm), {sh.hidden}, "final norm");
        }
        OutputLayer out{};
        if (head) {
            out.dtype = float_dtype(*head, bf16, "lm_head");
            check_layout(*head, 2, head->itemsize(), "lm_head");
            check_shape(nb::ndarray<>(*head), {sh.vocab, sh.hidden}, "lm_head");
            out.w = head->data();
        } else {
            out.dtype = w_.embed_dtype;
            out.w = w_.embed;
        }
        // Everything checked: only now change the model.
        if (final_norm)
            keep_.push_back(nb::cast(*final_norm));
        if (head)
            keep_.push_back(nb::cast(*head));
        w_.final_norm = norm;
        w_.head = out;
        head_set_ = true;
    }

    // Switch the output layer to int8 rows (quantize_rows_int8's output).
    void set_output_int8(Arr q, Arr row_scale, Arr row_sum) {
        const ModelShape& sh = w_.shape;
        if (!head_set_)
            throw nb::value_error("set_output first");
        const int64_t kpad = round_up(sh.hidden, 64);
        const int8_t* qd = typed<int8_t>(q, 2, "int8 lm_head", 64);
        const float* sd = typed<float>(row_scale, 1, "row_scale");
        const int32_t* rd = typed<int32_t>(row_sum, 1, "row_sum");
        check_shape(nb::ndarray<>(q), {sh.vocab, kpad}, "int8 lm_head");
        check_shape(nb::ndarray<>(row_scale), {sh.vocab}, "row_scale");
        check_shape(nb::ndarray<>(row_sum), {sh.vocab}, "row_sum");
        for (auto o : {nb::cast(q), nb::cast(row_scale), nb::cast(row_sum)})
            keep_.push_back(o);
        w_.head.w_q4 = nullptr;
        w_.head.w_i8 = qd;
        w_.head.row_scale = sd;
        w_.head.row_sum = rd;
        w_.head.kpad = kpad;
    }

    // Switch the output layer to 4-bit groups (quantize_rows_q4's output).
    void set_output_q4(Arr nibbles, Arr d) {
        const ModelShape& sh = w_.shape;
        if (!head_set_)
            throw nb::value_error("set_output first");
        const int64_t kpad = round_up(sh.hidden, kQ4Block);
        const uint8_t* nd = typed<uint8_t>(nibbles, 2, "4-bit lm_head", 64);
        const uint16_t* dd = typed<uint16_t>(d, 2, "4-bit lm_head scales");
        check_shape(nb::ndarray<>(nibbles), {sh.vocab, kpad / 2}, "4-bit lm_head");
        check_shape(nb::ndarray<>(d), {sh.vocab, kpad / 32}, "4-bit lm_head scales");
        for (auto o : {nb::cast(nibbles), nb::cast(d)})
            keep_.push_back(o);
        w_.head.w_i8 = nullptr;
        w_.head.w_q4 = nd;
        w_.head.d_q4 = dd;
        w_.head.kpad = kpad;
    }

    std::string head_kind() const {
        if (w_.head.w_q4)
            return "q4";
        if (w_.head.w_i8)
            return "int8";
        switch (w_.head.dtype) {
            case Dtype::f16: return "float16";
            case Dtype::bf16: return "bfloat16";
            default: return "float32";
        }
    }

    Out<float> forward(Arr tokens, Arr slots, Arr positions, nb::handle k_arg, nb::handle v_arg,
                       Arr out_rows, std::optional<std::string> isa) {
        const Isa use = pick_isa(isa);
        const ArrRW k_cache = writable(k_arg, "k_cache"), v_cache = writable(v_arg, "v_cache");
        const ModelShape& sh = w_.shape;
        for (size_t i = 0; i < set_.size(); ++i)
            if (!set_[i])
                throw nb::value_error(("layer " + std::to_string(i) + " is not set").c_str());
        if (!head_set_)
            throw nb::value_error("the output layer is not set");
        const int32_t* tok = typed<int32_t>(tokens, 1, "tokens");
        const int32_t* slot = typed<int32_t>(slots, 1, "slots");
        const int32_t* pos = typed<int32_t>(positions, 1, "positions");
        const int64_t* rows = typed<int64_t>(out_rows, 1, "out_rows");
        const int64_t T = tokens.shape(0), R = out_rows.shape(0);
        if (int64_t(slots.shape(0)) != T || int64_t(positions.shape(0)) != T)
            throw nb::value_error("tokens, slots and positions must have the same length");
        KVCacheView cache;
        using nb::dlpack::dtype_code;
        if (is_dtype(k_cache.dtype(), dtype_code::Float, 32))
            cache.dtype = Dtype::f32;
        else if (is_dtype(k_cache.dtype(), dtype_code::Float, 16))
            cache.dtype = Dtype::f16;
        else
            throw nb::type_error(
                ("k_cache must be float32 or float16, got " + dtype_str(k_cache.dtype())).c_str());
        if (v_cache.dtype() != k_cache.dtype())
            throw nb::type_error(("v_cache must have the same dtype as k_cache (" +
                                  dtype_str(k_cache.dtype()) + "), got " +
                                  dtype_str(v_cache.dtype()))
                                     .c_str());
        check_layout(k_cache, 5, 64, "k_cache");
        check_layout(v_cache, 5, 64, "v_cache");
        cache.slots = k_cache.shape(0);
        cache.max_ctx = k_cache.shape(3);
        if (cache.max_ctx % kKeyTile)
            throw nb::value_error(("the KV cache's capacity (axis 3) must be a multiple of " +
                                   std::to_string(kKeyTile) + " positions, got " +
                                   std::to_string(cache.max_ctx))
                                      .c_str());
        const int64_t want[5] = {cache.slots, sh.layers, sh.kv_heads, cache.max_ctx, sh.head_dim};
        for (const ArrRW* a : {&k_cache, &v_cache})
            check_shape(nb::ndarray<>(*a), {want[0], want[1], want[2], want[3], want[4]},
                        a == &k_cache ? "k_cache" : "v_cache");
        const auto* kb = static_cast<const uint8_t*>(k_cache.data());
        const auto* vb = static_cast<const uint8_t*>(v_cache.data());
        const size_t bytes = k_cache.nbytes();
        if (bytes && kb < vb + bytes && vb < kb + bytes)
            throw nb::value_error("k_cache and v_cache must not share memory");
        cache.k = k_cache.data();
        cache.v = v_cache.data();
        check_step(sh, tok, slot, pos, T, cache, rows, R);
        float* logits;
        auto arr = new_array<float>({size_t(R), size_t(sh.vocab)}, &logits);
        {
            nb::gil_scoped_release release;
            bitnet158::forward(w_, tok, slot, pos, T, cache, rows, R, logits, use);
        }
        return arr;
    }

private:
    ModelWeights w_;
    std::vector<bool> set_;
    bool head_set_ = false;
    std::vector<nb::object> keep_;
};

// The exact int32 GEMM of one packed layout (the ternary_gemm_i32 and ternary_gemm_tq1_i32
// bindings): the same argument checks in the same order.
Out<int32_t> int32_gemm(Layout layout, const char* what, const Arr& x_q, const Arr& packed,
                        int64_t n, int64_t k, const std::optional<std::string>& isa) {
    const Isa use = pick_isa(isa);
    const int8_t* xd = typed<int8_t>(x_q, 2, "x_q");
    const uint8_t* wd = typed<uint8_t>(packed, 2, "packed");
    check_dims(n, k);
    check_k(x_q, k, "x_q");
    check_packed(packed, n, k, what, layout == Layout::tq1 ? tq1_group_bytes(k) : 0);
    const int64_t T = x_q.shape(0);
    int32_t* out;
    auto arr = new_array<int32_t>({size_t(T), size_t(n)}, &out);
    {
        nb::gil_scoped_release release;
        ternary_gemm_i32(xd, T, k, wd, n, out, use, layout);
    }
    return arr;
}

}  // namespace

NB_MODULE(_native, m) {
    m.doc() = "bitnet158 native kernels: ternary GEMM over the packed layout of packing.py";
    // positions per tile of a head's keys in the KV cache (kernels.h): engine/kv_cache.py
    // rounds a cache's capacity up to a multiple of it
    m.attr("key_tile") = kKeyTile;

    m.def(
        "isa", [] { return std::string(isa_name(active_isa())); },
        "The instruction set the kernels dispatch to (BITNET158_ISA overrides CPUID).");
    m.def(
        "available_isas",
        [] {
            std::vector<std::string> out;
            for (Isa isa : supported_isas())
                out.emplace_back(isa_name(isa));
            return out;
        },
        "The instruction sets this CPU can run, from CPUID.");
    m.def(
        "set_num_threads",
        [](int n) {
            if (n < 1 || n > kMaxThreads)
                throw nb::value_error(("number of threads must be in 1.." +
                                       std::to_string(kMaxThreads) + ", got " + std::to_string(n))
                                          .c_str());
            set_num_threads(n);
        },
        "n"_a, "Use n threads in every kernel (default: the CPUs this process may run on).");
    m.def("get_num_threads", &num_threads, "The number of threads the kernels use.");

    m.def(
        "quantize_activations",
        [](Arr x, std::optional<std::string> isa) {
            const Isa use = pick_isa(isa);
            const float* xd = typed<float>(x, 2, "x");
            const int64_t T = x.shape(0), k = x.shape(1);
            int8_t* q;
            float* s;
            auto q_arr = new_array<int8_t>({size_t(T), size_t(k)}, &q);
            auto s_arr = new_array<float>({size_t(T)}, &s);
            {
                nb::gil_scoped_release release;
                quantize_activations(xd, T, k, q, s, use);
            }
            return nb::make_tuple(q_arr, s_arr);
        },
        "x"_a.noconvert(), "isa"_a = nb::none(),
        "Per-row absmax int8: x float32[T, K] -> (x_q int8[T, K], s float32[T]), bit-identical "
        "to bitnet158.quant.quantize_activations for finite input.");

    m.def(
        "float_to_half",
        [](Arr x, std::optional<std::string> isa) {
            const Kernels& kern = kernels_for(pick_isa(isa));
            const float* xd = typed<float>(x, 1, "x");
            const int64_t n = x.shape(0);
            uint16_t* out;
            auto out_arr = new_array<uint16_t>({size_t(n)}, &out);
            kern.half_row(xd, n, out);
            return out_arr;
        },
        "x"_a.noconvert(), "isa"_a = nb::none(),
        "float32[n] -> uint16[n], the IEEE binary16 bits the float16 KV cache stores: round to "
        "nearest even, NaN quieted with its top payload bits (as F16C).");

    m.def(
        "ternary_gemm_i32",
        [](Arr x_q, Arr packed, int64_t n, int64_t k, std::optional<std::string> isa) {
            return int32_gemm(Layout::bits2, "packed", x_q, packed, n, k, isa);
        },
        "x_q"_a.noconvert(), "packed"_a.noconvert(), "n"_a, "k"_a, "isa"_a = nb::none(),
        "Exact dot products x_q int8[T, k] . W^T -> int32[T, n], W ternary [n, k] packed by "
        "packing.pack_ours (uint8[ceil(n/4), ceil(k/256)*256]).");

    m.def(
        "ternary_gemm_tq1_i32",
        [](Arr x_q, Arr packed, int64_t n, int64_t k, std::optional<std::string> isa) {
            return int32_gemm(Layout::tq1, "packed (1.6-bit weights)", x_q, packed, n, k, isa);
        },
        "x_q"_a.noconvert(), "packed"_a.noconvert(), "n"_a, "k"_a, "isa"_a = nb::none(),
        "Exact dot products x_q int8[T, k] . W^T -> int32[T, n], W ternary [n, k] packed by "
        "packing.pack_ours_tq1 (uint8[ceil(n/4), 256*ceil(k/320)], 5 trits per byte). isa avx512 "
        "runs the AVX-512 VBMI kernel where the CPU has VBMI; avx2 and scalar run the portable "
        "kernel (see tq1_kernel).");

    m.def(
        "tq1_kernel",
        [](std::optional<std::string> isa) { return std::string(tq1_kernel_name(pick_isa(isa))); },
        "isa"_a = nb::none(),
        "The kernel ternary_gemm_tq1_i32 runs for this ISA: 'avx512' or 'scalar'.");

    m.def(
        "bitlinear",
        [](Arr x, Arr packed, double beta, int64_t n, int64_t k, std::optional<std::string> isa,
           std::optional<Arr> up, double up_beta, const std::string& gate) {
            const Isa use = pick_isa(isa);
            const float* xd = typed<float>(x, 2, "x");
            const uint8_t* wd = typed<uint8_t>(packed, 2, "packed");
            check_dims(n, k);
            check_k(x, k, "x");
            check_packed(packed, n, k, "packed");
            if (gate != "relu2" && gate != "silu")
                throw std::invalid_argument("gate must be 'relu2' or 'silu', not '" + gate + "'");
            const uint8_t* ud = nullptr;
            if (up) {
                ud = typed<uint8_t>(*up, 2, "up");
                check_packed(*up, n, k, "up");
            }
            const int64_t T = x.shape(0);
            float* y;
            auto arr = new_array<float>({size_t(T), size_t(n)}, &y);
            {
                nb::gil_scoped_release release;
                bitlinear(xd, T, k, wd, static_cast<float>(beta), n, y, use, ud,
                          static_cast<float>(up_beta), gate == "silu" ? Gate::silu : Gate::relu2);
            }
            return arr;
        },
        "x"_a.noconvert(), "packed"_a.noconvert(), "beta"_a, "n"_a, "k"_a, "isa"_a = nb::none(),
        "up"_a.noconvert() = nb::none(), "up_beta"_a = 1.0, "gate"_a = "relu2",
        "Quantized linear y = float(x_q . W^T) / s * beta -> float32[T, n], bit-identical to "
        "bitnet158.quant.ternary_linear_reference for finite x. With up (a second matrix packed "
        "alike): act(y) * (the same with up and up_beta), a feed-forward's gate: act relu(y)^2 "
        "(gate='relu2') or silu(y) (gate='silu'), as the engine applies it.");

    m.def(
        "attention",
        [](Arr q, Arr keys, Arr values, int64_t n0, double scale, std::optional<std::string> isa) {
            const Isa use = pick_isa(isa);
            const float* qd = typed<float>(q, 3, "q");
            const Dtype kv = float_dtype(keys, false, "keys");
            if (float_dtype(values, false, "values") != kv)
                throw nb::type_error("keys and values must have the same dtype");
            check_layout(keys, 2, keys.itemsize(), "keys");
            check_layout(values, 2, values.itemsize(), "values");
            const int64_t npos = q.shape(0), group = q.shape(1), d = q.shape(2);
            const int64_t n = n0 + npos - 1;  // keys the last position attends to
            if (n0 < 1 || npos < 1 || group < 1 || d < 1)
                throw nb::value_error("need n0 >= 1 and a non-empty q [positions, heads, d]");
            check_shape(nb::ndarray<>(keys), {n, d}, "keys");
            check_shape(nb::ndarray<>(values), {n, d}, "values");
            // the kernels' layout: keys in tiles of kKeyTile positions (zeros past n)
            const int64_t es = dtype_size(kv), cap = round_up(n, kKeyTile);
            std::vector<char> tiled(size_t(cap * d * es), 0);
            for (int64_t j = 0; j < n; ++j)
                for (int64_t i = 0; i < d; ++i)
                    std::memcpy(&tiled[size_t(key_index(j, i, d) * es)],
                                static_cast<const char*>(keys.data()) + (j * d + i) * es,
                                size_t(es));
            std::vector<float> scores(size_t(npos * group * n));
            float* out;
            auto arr = new_array<float>({size_t(npos), size_t(group), size_t(d)}, &out);
            {
                nb::gil_scoped_release release;
                kernels_for(use).attend(qd, group * d, npos, group, tiled.data(), values.data(),
                                        kv, n0, d, static_cast<float>(scale), scores.data(), out,
                                        group * d);
            }
            return arr;
        },
        "q"_a.noconvert(), "keys"_a.noconvert(), "values"_a.noconvert(), "n0"_a, "scale"_a,
        "isa"_a = nb::none(),
        "Causal attention of one sequence's positions n0 - 1 .. n0 + P - 2 as the engine computes "
        "it: q float32[P, heads, d] (heads sharing one KV head), keys and values float32 or "
        "float16 [n0 + P - 1, d]; position i attends to the first n0 + i keys. Returns "
        "softmax(q k^T * scale) v, float32[P, heads, d].");

    m.def(
        "quantize_rows_int8",
        [](Arr w, bool bf16, std::optional<std::string> isa, std::optional<nb::tuple> out) {
            const Isa use = pick_isa(isa);
            const Dtype dt = float_dtype(w, bf16, "w");
            check_layout(w, 2, w.itemsize(), "w");
            check_out(out, 3);
            const int64_t rows = w.shape(0), k = w.shape(1),
                          kpad = round_up(std::max<int64_t>(k, 1), 64);
            int8_t* q;
            float* scale;
            int32_t* sum;
            nb::tuple result;
            if (out) {  // rows 64-byte aligned, as the kernels read them
                q = out_part<int8_t>(*out, 0, {rows, kpad}, "out[0] (q)", 64);
                scale = out_part<float>(*out, 1, {rows}, "out[1] (row_scale)");
                sum = out_part<int32_t>(*out, 2, {rows}, "out[2] (row_sum)");
                result = *out;
            } else {  // 64-byte aligned rows: allocate one spare line and return an aligned view
                auto q_arr = new_aligned<int8_t>(rows, kpad, &q);
                auto s_arr = new_array<float>({size_t(rows)}, &scale);
                auto sum_arr = new_array<int32_t>({size_t(rows)}, &sum);
                result = nb::make_tuple(q_arr, s_arr, sum_arr);
            }
            {
                nb::gil_scoped_release release;
                quantize_rows_int8(w.data(), dt, rows, k, kpad, q, scale, sum, use);
            }
            return result;
        },
        "w"_a.noconvert(), "bf16"_a = false, "isa"_a = nb::none(), "out"_a = nb::none(),
        "Per-row int8 copy of a float matrix w [rows, k] -> (q int8[rows, ceil(k/64)*64], "
        "row_scale float32[rows] = 127/max|row|, row_sum int32[rows]), for the int8 output layer; "
        "written into `out` (a tuple of those three arrays, q 64-byte aligned) when given.");

    m.def(
        "quantize_rows_q4",
        [](Arr w, bool bf16, std::optional<nb::tuple> out) {
            const Dtype dt = float_dtype(w, bf16, "w");
            check_layout(w, 2, w.itemsize(), "w");
            check_out(out, 2);
            const int64_t rows = w.shape(0), k = w.shape(1),
                          kpad = round_up(std::max<int64_t>(k, 1), kQ4Block);
            uint8_t* nib;
            uint16_t* d;
            nb::tuple result;
            if (out) {
                nib = out_part<uint8_t>(*out, 0, {rows, kpad / 2}, "out[0] (nibbles)", 64);
                d = out_part<uint16_t>(*out, 1, {rows, kpad / 32}, "out[1] (d)");
                result = *out;
            } else {
                auto nib_arr = new_aligned<uint8_t>(rows, kpad / 2, &nib);
                auto d_arr = new_array<uint16_t>({size_t(rows), size_t(kpad / 32)}, &d);
                result = nb::make_tuple(nib_arr, d_arr);
            }
            {
                nb::gil_scoped_release release;
                quantize_rows_q4(w.data(), dt, rows, k, kpad, nib, d);
            }
            return result;
        },
        "w"_a.noconvert(), "bf16"_a = false, "out"_a = nb::none(),
        "4-bit copy of a float matrix w [rows, k] for the output layer -> (nibbles uint8[rows, "
        "ceil(k/256)*128], d float16 bits uint16[rows, ceil(k/256)*8]): groups of 32 weights "
        "q = clip(round(w / d), -8, 7) with d = max|w| / 7 per group; 256 weights take 128 bytes "
        "in the order of the kernels (kernels.h Q4RowsFn). Written into `out` (a tuple of those "
        "two arrays, nibbles 64-byte aligned) when given.");

    nb::class_<NativeModel>(m, "Model",
                            "Weights of a model for the native decoder step (borrowed arrays).")
        .def(nb::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, bool,
                      bool, bool, double, double, Arr, const std::string&>(),
             "hidden"_a, "inter"_a, "heads"_a, "kv_heads"_a, "head_dim"_a, "vocab"_a, "layers"_a,
             "relu2"_a, "subln"_a, "inner_norm"_a, "layernorm"_a, "eps"_a, "inner_eps"_a,
             "inv_freq"_a.noconvert(), "layout"_a = "2bit",
             "layout: how every ternary matrix is packed, '2bit' (packing.pack_ours) or 'tq1' "
             "(packing.pack_ours_tq1, 5 trits per byte).")
        .def("set_layer", &NativeModel::set_layer, "i"_a, "attn_norm"_a.noconvert().none(),
             "ffn_norm"_a.noconvert().none(), "attn_sub_norm"_a.noconvert().none(),
             "ffn_sub_norm"_a.noconvert().none(), "packed"_a.noconvert(), "betas"_a,
             "Layer i: norm weights (None: none) and the 7 packed projections q, k, v, o, gate, "
             "up, down (in the model's layout) with their scales.")
        .def("set_embedding", &NativeModel::set_embedding, "embed"_a.noconvert(), "bf16"_a = false,
             "release_rows"_a = false,
             "release_rows: embed is a read-only file mapping that only lookups read; each "
             "looked-up row's pages are unmapped again (never pass it for anonymous memory: "
             "unmapping discards that).")
        .def("set_output", &NativeModel::set_output, "final_norm"_a.noconvert().none(),
             "head"_a.noconvert().none(), "bf16"_a = false,
             "Final norm weight and output layer (None: tied to the embedding).")
        .def("set_output_int8", &NativeModel::set_output_int8, "q"_a.noconvert(),
             "row_scale"_a.noconvert(), "row_sum"_a.noconvert())
        .def("set_output_q4", &NativeModel::set_output_q4, "nibbles"_a.noconvert(),
             "d"_a.noconvert())
        .def_prop_ro("head_kind", &NativeModel::head_kind,
                     "The output layer in use: float32, float16, bfloat16, int8 or q4.")
        .def("forward", &NativeModel::forward, "tokens"_a.noconvert(), "slots"_a.noconvert(),
             "positions"_a.noconvert(), "k_cache"_a, "v_cache"_a,
             "out_rows"_a.noconvert(), "isa"_a = nb::none(),
             "Run tokens int32[T] (sequence slots[T], positions[T]) through every layer, writing "
             "their keys/values into the caches [slots, layers, kv_heads, max_context, head_dim] "
             "(float32 or float16, 64-byte aligned); logits float32[R, vocab] of tokens "
             "out_rows int64[R]. ValueError on a context overflow or bad ids; nothing is written "
             "then.");

    m.def(
        "read_bytes",
        [](Arr buf) {
            const uint8_t* p = typed<uint8_t>(buf, 1, "buf");
            const int64_t n = buf.shape(0);
            nb::gil_scoped_release release;
            return read_bytes(p, n);
        },
        "buf"_a.noconvert(),
        "Read every byte of buf with the kernels' threads (a memory read bandwidth probe); "
        "returns a checksum.");

    m.def(
        "multiply_add_rate",
        [](double seconds, std::optional<std::string> isa) {
            if (!(seconds > 0.0 && seconds <= 60.0))
                throw nb::value_error("seconds must be in (0, 60]");
            const Isa use = pick_isa(isa);
            nb::gil_scoped_release release;
            return multiply_add_rate(use, seconds);
        },
        "seconds"_a = 0.2, "isa"_a = nb::none(),
        "Multiply-adds per second of the instruction the prefill GEMM multiplies with on this "
        "ISA (amx: TDPBUSD, avx512: vpdpbusd, avx2: vpmaddubsw), on the kernels' threads from "
        "registers for about `seconds`: the compute ceiling of a prefill. 0.0 for scalar.");
}
