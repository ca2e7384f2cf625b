// The decoder step of forward.h. Numerics follow nn/model.py (float32 everywhere, norms as
// torch evaluates them: x * rsqrt(mean(x^2) + eps) * w), so the logits match the torch
// reference to float rounding; the ternary products are exact (kernels.h).
#include "forward.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#if defined(__unix__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "threadpool.h"

namespace bitnet158 {

namespace {

// Row-wise work (norms, RoPE, activations) is split into chunks of at least this many values:
// a decode step's single row never wakes a second thread.
constexpr int64_t kMinRowWork = 16 * 1024;
// Attention units (a run of query positions x one KV head) are batched into chunks of at least
// this many multiply-adds.
constexpr int64_t kMinAttendWork = 64 * 1024;
// A thread's step over the output layer's rows streams at least this many bytes (~20 us): the
// float head ran ~2 % slower at 64 KB steps.
constexpr int64_t kMinHeadChunkBytes = 512 * 1024;

// f(t) for t in [0, T), rows of `per_row` values each, in parallel: each thread takes the
// same contiguous share of the rows as of a GEMM's token blocks (parallel_ranges), so the rows
// a thread's GEMM share has just written are still in its own caches. In chunks claimed by
// whichever thread came first, the norms and activations of a 512-token prefill took ~10 %
// longer (half of RMSNorm's time was the first load of a row the other core had written).
template <class F>
void for_rows(int64_t T, int64_t per_row, F&& f) {
    const int64_t rows = std::max<int64_t>(1, kMinRowWork / std::max<int64_t>(per_row, 1));
    parallel_ranges(T, rows, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t)
            f(t);
    });
}

int32_t row_sum(const int8_t* x, int64_t k) {
    int32_t s = 0;
    for (int64_t i = 0; i < k; ++i)
        s += x[i];
    return s;
}

// out[k] = row of a float matrix as float32 (the clones vectorize every dtype's loop).
BITNET158_CLONES void to_float_row(const void* w, Dtype t, int64_t off, int64_t k,
                                   float* __restrict out) {
    if (t == Dtype::f16) {
        const uint16_t* p = static_cast<const uint16_t*>(w) + off;
        for (int64_t i = 0; i < k; ++i)
            out[i] = half_to_float(p[i]);
    } else if (t == Dtype::bf16) {
        const uint16_t* p = static_cast<const uint16_t*>(w) + off;
        for (int64_t i = 0; i < k; ++i)
            out[i] = bf16_to_float(p[i]);
    } else {
        std::memcpy(out, static_cast<const float*>(w) + off, size_t(k) * sizeof(float));
    }
}

// One row of the 4-bit output layer (quantize_rows_q4) from x[kpad], zero past the row's end:
// per group of 32, d = half(max|x| / 7) and codes clip(round(x / d), -8, 7) + 8, in the order of
// kernels.h Q4RowsFn.
BITNET158_CLONES void quantize_row_q4(const float* __restrict x, int64_t kpad,
                                      uint8_t* __restrict nibbles, uint16_t* __restrict d) {
    for (int64_t blk = 0; blk < kpad / kQ4Block; ++blk) {
        alignas(64) uint8_t codes[kQ4Block];  // q + 8 in natural order
        for (int g = 0; g < 8; ++g) {
            const float* xg = x + kQ4Block * blk + 32 * g;
            // max |x| over the bits: non-negative floats order as their bits do, and an integer
            // max vectorizes where a float one does not; NaNs count as 0, as std::max skips them
            int32_t top = 0;
            for (int i = 0; i < 32; ++i) {
                int32_t b;
                __builtin_memcpy(&b, &xg[i], 4);
                b &= 0x7fffffff;
                b = b > 0x7f800000 ? 0 : b;
                top = top > b ? top : b;  // (GCC keeps std::max of these scalar)
            }
            float amax;
            __builtin_memcpy(&amax, &top, 4);
            const uint16_t dh = float_to_half(amax / 7.0f);
            d[8 * blk + g] = dh;
            const float df = half_to_float(dh), inv = df > 0.0f ? 1.0f / df : 0.0f;
            for (int i = 0; i < 32; ++i)
                codes[32 * g + i] = static_cast<uint8_t>(
                    std::min(7.0f, std::max(-8.0f, std::nearbyint(xg[i] * inv))) + 8.0f);
        }
        // word 16L + l of the block holds lane l's steps 2L (low nibbles) and 2L + 1 (high):
        // the 4 bytes of a lane's step are 4 consecutive weights of one group
        uint8_t* b = nibbles + kQ4Block / 2 * blk;
        for (int word = 0; word < kQ4Block / 8; ++word) {
            const int low = 4 * (word + word / 16 * 16);  // position 64 * 2L + 4l
            uint32_t lo, hi;
            __builtin_memcpy(&lo, codes + q4_natural(low), 4);
            __builtin_memcpy(&hi, codes + q4_natural(low + 64), 4);
            const uint32_t v = lo | hi << 4;
            __builtin_memcpy(b + 4 * word, &v, 4);
        }
    }
}

// One token's int8 activations q[kpad] in the 4-bit output layer's order, and its corrections
// (kernels.h Q4RowsFn): xr[256B + p] = q[256B + q4_natural(p)]; corr[16B + l] = -8 * the sum of
// lane l's 16 activations, bytes 256B + 64s + 4l + b.
void q4_activations(const int8_t* q, int64_t kpad, int8_t* xr, int32_t* corr) {
    for (int64_t b0 = 0; b0 < kpad; b0 += kQ4Block)
        for (int p = 0; p < kQ4Block; ++p)
            xr[b0 + p] = q[b0 + q4_natural(p)];
    for (int64_t lane = 0; lane < kpad / 16; ++lane) {
        const int8_t* x = xr + kQ4Block * (lane / 16) + 4 * (lane % 16);
        int32_t sum = 0;
        for (int step = 0; step < 4; ++step)
            for (int b = 0; b < 4; ++b)
                sum += x[64 * step + b];
        corr[lane] = -8 * sum;
    }
}

// Unmap the pages around embedding row `token` (ModelWeights::release_embed_rows). A file
// cached in 2 MB folios (formats/pages.py) maps a whole folio on a read fault (Linux 6.18), so
// the lookups of a 512-token prompt mapped ~500 MB of embedding rows into the resident memory;
// the page cache keeps them. The span stays inside the embedding's own pages: the rest of the
// file's mapping (the ternary weights) keeps its 2 MB mappings.
void release_row(const ModelWeights& m, int32_t token) {
#if defined(__unix__)
    constexpr uintptr_t kFolio = uintptr_t(2) << 20;
    const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
    const uintptr_t row_bytes = uintptr_t(m.shape.hidden) * dtype_size(m.embed_dtype);
    const uintptr_t begin = reinterpret_cast<uintptr_t>(m.embed);
    const uintptr_t end = begin + uintptr_t(m.shape.vocab) * row_bytes;
    const uintptr_t row = begin + uintptr_t(token) * row_bytes;
    const uintptr_t lo = std::max(row & ~(kFolio - 1), (begin + page - 1) & ~(page - 1));
    const uintptr_t hi =
        std::min((row + row_bytes + kFolio - 1) & ~(kFolio - 1), end & ~(page - 1));
    if (hi > lo)
        madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
#else
    (void)m;
    (void)token;
#endif
}

// A norm applied to a matmul input: RMSNorm, or LayerNorm (mean-centred first), with an
// optional weight.
struct NormSpec {
    bool on = false;
    const float* weight = nullptr;
    float eps = 1e-5f;
    bool layernorm = false;
};

// y[k] = norm(x) (y may be x). The mean of squares sums float squares in double: closer to
// exact than any float order, so within rounding of torch's pairwise float sums.
BITNET158_CLONES void norm_row(const float* x, float* y, int64_t k, const float* w, float eps,
                               bool layernorm) {
    if (layernorm) {
        double sum = 0.0;
        for (int64_t i = 0; i < k; ++i)
            sum += x[i];
        const float mean = static_cast<float>(sum) / static_cast<float>(k);
        for (int64_t i = 0; i < k; ++i)
            y[i] = x[i] - mean;
        x = y;
    }
    // 16 lanes of partial sums: 4 independent chains of 4-wide vector adds (with 4 lanes, one
    // chain bound the loop to a value per cycle and norms took ~6 % of a prefill).
    double sq[16] = {};
    int64_t i = 0;
    for (; i + 16 <= k; i += 16)
        for (int l = 0; l < 16; ++l)
            sq[l] += double(x[i + l] * x[i + l]);
    for (; i < k; ++i)
        sq[0] += double(x[i] * x[i]);
    for (int w = 8; w >= 1; w /= 2)  // a fixed tree: the same sum on every ISA
        for (int l = 0; l < w; ++l)
            sq[l] += sq[l + w];
    const float ms = static_cast<float>(sq[0]) / static_cast<float>(k);
    const float r = 1.0f / std::sqrt(ms + eps);
    if (w)
        for (i = 0; i < k; ++i)
            y[i] = (x[i] * r) * w[i];
    else
        for (i = 0; i < k; ++i)
            y[i] = x[i] * r;
}

// The input of a BitLinear: optional norm, optional inner (OLMo) RMSNorm, then per-token int8
// x_q[kpad] (zero beyond k), its scale s and its sum.
void prep_row(const Kernels& kern, const float* x, int64_t k, const NormSpec& a,
              const NormSpec& inner, int8_t* q, int64_t kpad, float* s, int32_t* sum) {
    const float* src = x;
    if (a.on || inner.on) {
        float* tmp = thread_scratch<float>(k, Scratch::row);
        if (a.on) {
            norm_row(src, tmp, k, a.weight, a.eps, a.layernorm);
            src = tmp;
        }
        if (inner.on) {
            norm_row(src, tmp, k, nullptr, inner.eps, false);
            src = tmp;
        }
    }
    *s = kern.quantize_row(src, k, q);
    std::memset(q + k, 0, size_t(kpad - k));
    *sum = row_sum(q, k);
}

// Rotate-half RoPE of `heads` vectors of length d in place: x * cos + rotate_half(x) * sin.
BITNET158_CLONES void rope(float* x, int64_t heads, int64_t d, const float* c, const float* s) {
    const int64_t half = d / 2;
    for (int64_t h = 0; h < heads; ++h) {
        float* v = x + h * d;
        for (int64_t i = 0; i < half; ++i) {
            const float a = v[i], b = v[i + half];
            v[i] = a * c[i] + (-b) * s[i];
            v[i + half] = b * c[i] + a * s[i];
        }
    }
}

void store_row(const Kernels& kern, void* dst, Dtype t, const float* src, int64_t n) {
    if (t == Dtype::f16)
        kern.half_row(src, n, static_cast<uint16_t*>(dst));
    else
        std::memcpy(dst, src, size_t(n) * sizeof(float));
}

// Keys of `count` consecutive positions from pos0, all in one tile (src + c * ld: position
// pos0 + c, float32[d]), into a head's tiled keys (see kKeyTile): one thread writes a tile's
// lines, each line's positions side by side (a key at a time, two threads' stores interleaved
// on the same lines and the store took ~10 % of a prefill).
template <class T>
void store_keys(T* keys, int64_t pos0, const T* src, int64_t ld, int64_t count, int64_t d) {
    T* first = keys + key_index(pos0, 0, d);  // key pos0 + c, dimension i: + i * kKeyTile + c
    for (int64_t i = 0; i < d; ++i)
        for (int64_t c = 0; c < count; ++c)
            first[i * kKeyTile + c] = src[c * ld + i];
}

// Runs of tokens at consecutive positions of one sequence: each run's first token, then T. A
// run also ends before token t where ends_before(t, its first token) says so.
template <class F>
std::vector<int64_t> position_runs(int64_t T, const int32_t* slots, const int32_t* positions,
                                   F&& ends_before) {
    std::vector<int64_t> runs;
    for (int64_t t = 0; t < T; ++t)
        if (t == 0 || slots[t] != slots[t - 1] || positions[t] != positions[t - 1] + 1 ||
            ends_before(t, runs.back()))
            runs.push_back(t);
    runs.push_back(T);
    return runs;
}

// Consecutive 64-byte-aligned slices of the memory at `base` (null: counts their bytes only).
struct Slicer {
    char* base;
    int64_t used = 0;
    template <typename T>
    T* take(int64_t n) {
        T* p = base ? reinterpret_cast<T*>(base + used) : nullptr;
        used += round_up(n * int64_t(sizeof(T)), 64);
        return p;
    }
};

// A step's buffers, in the order forward slices them.
struct StepBuffers {
    float *x, *q, *kb, *vb, *att, *gate, *up;
    uint16_t* kh;
    int8_t* xq;
    float* s;
    int32_t* xs;
    float *cs, *sn;
};

GemmOut to_f32(float* y, const float* s, float beta, int64_t ld, bool add) {
    GemmOut o;
    o.f32 = y;
    o.s = s;
    o.beta = beta;
    o.n = ld;
    o.add = add;
    return o;
}

}  // namespace

void check_step(const ModelShape& shape, const int32_t* tokens, const int32_t* slots,
                const int32_t* positions, int64_t T, const KVCacheView& cache,
                const int64_t* out_rows, int64_t R) {
    std::vector<int64_t> keys(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) {
        if (tokens[t] < 0 || tokens[t] >= shape.vocab)
            throw std::invalid_argument("token id " + std::to_string(tokens[t]) +
                                        " is outside the vocabulary (0.." +
                                        std::to_string(shape.vocab - 1) + ")");
        if (slots[t] < 0 || slots[t] >= cache.slots)
            throw std::invalid_argument("cache slot " + std::to_string(slots[t]) +
                                        " does not exist (the cache has " +
                                        std::to_string(cache.slots) + ")");
        if (positions[t] < 0)
            throw std::invalid_argument("negative position " + std::to_string(positions[t]));
        if (positions[t] >= cache.max_ctx)
            throw std::invalid_argument(
                "context overflow: position " + std::to_string(positions[t]) +
                " is past the context length of " + std::to_string(cache.max_ctx) + " tokens");
        keys[size_t(t)] = int64_t(slots[t]) * cache.max_ctx + positions[t];
    }
    std::sort(keys.begin(), keys.end());
    if (std::adjacent_find(keys.begin(), keys.end()) != keys.end())
        throw std::invalid_argument("a (slot, position) pair occurs twice in one step");
    for (int64_t r = 0; r < R; ++r)
        if (out_rows[r] < 0 || out_rows[r] >= T)
            throw std::invalid_argument("logits row " + std::to_string(out_rows[r]) +
                                        " is not one of the " + std::to_string(T) + " tokens");
}

void forward(const ModelWeights& m, const int32_t* tokens, const int32_t* slots,
             const int32_t* positions, int64_t T, const KVCacheView& cache, const int64_t* out_rows,
             int64_t R, float* logits, Isa isa) {
    const Kernels& kern = kernels_for(isa);
    const ModelShape& sh = m.shape;
    const int64_t H = sh.hidden, I = sh.inter, D = sh.head_dim, half = D / 2;
    const int64_t NH = sh.heads, KVH = sh.kv_heads, group = NH / KVH;
    const int64_t QS = NH * D, KVS = KVH * D, V = sh.vocab, L = sh.layers;
    const Layout lay = m.layout;
    const int64_t kblock = k_block(lay);  // the layout's K padding
    const int64_t kpH = round_up(H, kblock), kpQ = round_up(QS, kblock), kpI = round_up(I, kblock);
    const int64_t es = dtype_size(cache.dtype);
    const float scale = static_cast<float>(1.0 / std::sqrt(double(D)));

    // The AMX GEMM applies the feed-forward's gate as it stores and writes act(gate) * up only:
    // up's [T, I] floats, written and read back, were ~6 % of a 512-token prefill.
    const bool gated_store = gemm_uses_amx(kern, T);

    // The step's buffers: slices of one block that this thread keeps (Scratch::step), sized
    // by a first pass that only counts.
    Slicer slicer{nullptr};
    const int64_t keys_f16 = cache.dtype == Dtype::f16 ? T * KVS : 0;
    const auto slice = [&] {
        return StepBuffers{slicer.take<float>(T * H),
                           slicer.take<float>(T * QS),
                           slicer.take<float>(T * KVS),
                           slicer.take<float>(T * KVS),
                           slicer.take<float>(T * QS),
                           slicer.take<float>(T * I),
                           slicer.take<float>(gated_store ? 0 : T * I),
                           slicer.take<uint16_t>(keys_f16),
                           slicer.take<int8_t>(T * std::max({kpH, kpQ, kpI})),
                           slicer.take<float>(T),
                           slicer.take<int32_t>(T),
                           slicer.take<float>(T * half),
                           slicer.take<float>(T * half)};
    };
    slice();
    slicer = Slicer{static_cast<char*>(thread_scratch_bytes(slicer.used, Scratch::step))};
    const StepBuffers b = slice();
    float *const x = b.x, *const q = b.q, *const kb = b.kb, *const vb = b.vb, *const att = b.att,
                 *const gate = b.gate, *const up = b.up, *const s = b.s, *const cs = b.cs,
                 *const sn = b.sn;
    uint16_t* const kh = b.kh;  // the keys in f16 (an f16 cache)
    int8_t* const xq_ = b.xq;
    int32_t* const xs = b.xs;

    // RoPE tables of these positions: angle = float(pos) * inv_freq as torch computes it.
    for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < half; ++i) {
            const float angle = static_cast<float>(positions[t]) * m.inv_freq[size_t(i)];
            cs[size_t(t * half + i)] = static_cast<float>(std::cos(double(angle)));
            sn[size_t(t * half + i)] = static_cast<float>(std::sin(double(angle)));
        }

    for_rows(T, H, [&](int64_t t) {
        to_float_row(m.embed, m.embed_dtype, int64_t(tokens[t]) * H, H, &x[size_t(t * H)]);
        if (m.release_embed_rows)
            release_row(m, tokens[t]);
    });

    const NormSpec inner{sh.inner_norm, nullptr, sh.inner_eps, false};
    for (int64_t l = 0; l < L; ++l) {
        const LayerWeights& w = m.layers[size_t(l)];

        // attention: norm + quantize, fused q/k/v, RoPE, cache store, attention, o + residual
        const NormSpec attn_norm{true, w.attn_norm, sh.eps, sh.layernorm};
        for_rows(T, H, [&](int64_t t) {
            prep_row(kern, &x[size_t(t * H)], H, attn_norm, inner, xq_ + t * kpH, kpH,
                     &s[size_t(t)], &xs[size_t(t)]);
        });
        const GemmTask qkv[3] = {
            {w.q.packed, QS, to_f32(q, s, w.q.beta, QS, false), lay},
            {w.k.packed, KVS, to_f32(kb, s, w.k.beta, KVS, false), lay},
            {w.v.packed, KVS, to_f32(vb, s, w.v.beta, KVS, false), lay},
        };
        run_gemm_tasks(kern, xq_, xs, T, kpH, qkv, 3);

        for_rows(T, QS + 2 * KVS, [&](int64_t t) {
            rope(&q[size_t(t * QS)], NH, D, &cs[size_t(t * half)], &sn[size_t(t * half)]);
            rope(&kb[size_t(t * KVS)], KVH, D, &cs[size_t(t * half)], &sn[size_t(t * half)]);
            if (cache.dtype == Dtype::f16)
                kern.half_row(&kb[size_t(t * KVS)], KVS, &kh[size_t(t * KVS)]);
            for (int64_t h = 0; h < KVH; ++h) {
                const int64_t at =
                    (((slots[t] * L + l) * KVH + h) * cache.max_ctx + positions[t]) * D;
                store_row(kern, static_cast<char*>(cache.v) + at * es, cache.dtype,
                          &vb[size_t(t * KVS + h * D)], D);
            }
        });
        // Keys by (run of positions within one tile, head).
        const std::vector<int64_t> tile_runs = position_runs(
            T, slots, positions, [&](int64_t t, int64_t) { return positions[t] % kKeyTile == 0; });
        for_rows((int64_t(tile_runs.size()) - 1) * KVH, kKeyTile * D, [&](int64_t u) {
            const int64_t t0 = tile_runs[size_t(u / KVH)], h = u % KVH;
            const int64_t count = tile_runs[size_t(u / KVH) + 1] - t0;
            const int64_t head = ((slots[t0] * L + l) * KVH + h) * cache.max_ctx * D;
            if (cache.dtype == Dtype::f16)
                store_keys(static_cast<uint16_t*>(cache.k) + head, positions[t0],
                           &kh[size_t(t0 * KVS + h * D)], KVS, count, D);
            else
                store_keys(static_cast<float*>(cache.k) + head, positions[t0],
                           &kb[size_t(t0 * KVS + h * D)], KVS, count, D);
        });

        // Attention by runs of up to kern.attend_positions positions (a prefill).
        const std::vector<int64_t> runs = position_runs(
            T, slots, positions,
            [&](int64_t t, int64_t first) { return t - first == kern.attend_positions; });
        const int64_t nruns = int64_t(runs.size()) - 1;
        int64_t work = 0;
        for (int64_t t = 0; t < T; ++t)
            work += (int64_t(positions[t]) + 1) * KVS * group * 2;
        const int64_t units = nruns * KVH;
        const int64_t per_chunk =
            std::max<int64_t>(1, units * kMinAttendWork / std::max<int64_t>(work, 1));
        // Runs in token order, each thread starting on its own share of the positions (the q
        // rows its GEMM share wrote, the rows its next norms read; in chunks claimed by either
        // thread, attention took ~3 % longer); the thread with the shorter runs then takes the
        // longest ones from the back of the other's share.
        parallel_ranges(units, per_chunk, [&](int64_t u0, int64_t u1) {
            for (int64_t u = u0; u < u1; ++u) {
                const int64_t r = u / KVH, h = u % KVH;
                const int64_t t0 = runs[size_t(r)], npos = runs[size_t(r) + 1] - t0;
                const int64_t n0 = int64_t(positions[t0]) + 1;
                const int64_t at = ((slots[t0] * L + l) * KVH + h) * cache.max_ctx * D * es;
                kern.attend(&q[size_t(t0 * QS + h * group * D)], QS, npos, group,
                            static_cast<const char*>(cache.k) + at,
                            static_cast<const char*>(cache.v) + at, cache.dtype, n0, D, scale,
                            thread_scratch<float>(npos * group * (n0 + npos - 1), Scratch::scores),
                            &att[size_t(t0 * QS + h * group * D)], QS);
            }
        });

        const NormSpec attn_sub{sh.subln, w.attn_sub_norm, sh.eps, false};
        for_rows(T, QS, [&](int64_t t) {
            prep_row(kern, &att[size_t(t * QS)], QS, attn_sub, inner, xq_ + t * kpQ, kpQ,
                     &s[size_t(t)], &xs[size_t(t)]);
        });
        const GemmTask o{w.o.packed, H, to_f32(x, s, w.o.beta, H, true), lay};
        run_gemm_tasks(kern, xq_, xs, T, kpQ, &o, 1);

        // feed-forward: norm + quantize, fused gate/up, act(gate) * up + sub norm + quantize,
        // down + residual
        const NormSpec ffn_norm{true, w.ffn_norm, sh.eps, sh.layernorm};
        for_rows(T, H, [&](int64_t t) {
            prep_row(kern, &x[size_t(t * H)], H, ffn_norm, inner, xq_ + t * kpH, kpH, &s[size_t(t)],
                     &xs[size_t(t)]);
        });
        GemmTask gate_up[2] = {
            {w.gate.packed, I, to_f32(gate, s, w.gate.beta, I, false), lay},
            {w.up.packed, I, to_f32(up, s, w.up.beta, I, false), lay},
        };
        if (gated_store) {
            gate_up[0].up = w.up.packed;
            gate_up[0].up_beta = w.up.beta;
            gate_up[0].act = sh.relu2 ? Gate::relu2 : Gate::silu;
        }
        run_gemm_tasks(kern, xq_, xs, T, kpH, gate_up, gated_store ? 1 : 2);

        const NormSpec ffn_sub{sh.subln, w.ffn_sub_norm, sh.eps, false};
        for_rows(T, I, [&](int64_t t) {
            float* g = &gate[size_t(t * I)];
            if (!gated_store) {  // else the GEMM's store applied it
                if (sh.relu2)
                    relu2_mul(g, &up[size_t(t * I)], I);
                else
                    kern.silu_mul(g, &up[size_t(t * I)], I);
            }
            prep_row(kern, g, I, ffn_sub, inner, xq_ + t * kpI, kpI, &s[size_t(t)], &xs[size_t(t)]);
        });
        const GemmTask down{w.down.packed, H, to_f32(x, s, w.down.beta, H, true),
                            lay};
        run_gemm_tasks(kern, xq_, xs, T, kpI, &down, 1);
    }

    if (R == 0)
        return;
    // final norm of the requested rows, then the output layer over vocabulary chunks
    std::vector<float> h(static_cast<size_t>(R * H));
    for (int64_t r = 0; r < R; ++r)
        norm_row(&x[size_t(out_rows[r] * H)], &h[size_t(r * H)], H, m.final_norm, sh.eps,
                 sh.layernorm);
    if (m.head.w_q4) {
        const int64_t kp = m.head.kpad;
        AlignedArray<int8_t> hq(R * kp);
        std::vector<int8_t> natural(static_cast<size_t>(kp));
        std::vector<int32_t> corr(static_cast<size_t>(R * kp / 16));
        std::vector<float> inv_s(static_cast<size_t>(R));
        for (int64_t r = 0; r < R; ++r) {
            inv_s[size_t(r)] = 1.0f / kern.quantize_row(&h[size_t(r * H)], H, natural.data());
            q4_activations(natural.data(), kp, hq.get() + r * kp, &corr[size_t(r * kp / 16)]);
        }
        parallel_ranges(V, cdiv(kMinHeadChunkBytes, kp / 2), [&](int64_t r0, int64_t r1) {
            kern.q4_rows(hq.get(), corr.data(), inv_s.data(), R, kp, m.head.w_q4, m.head.d_q4, r0,
                         r1, logits, V);
        });
    } else if (m.head.w_i8) {
        const int64_t kp = m.head.kpad;
        AlignedArray<int8_t> hq(R * kp);
        std::vector<float> hs(static_cast<size_t>(R));
        for (int64_t r = 0; r < R; ++r) {
            hs[size_t(r)] = kern.quantize_row(&h[size_t(r * H)], H, hq.get() + r * kp);
        }
        int32_t* acc = reinterpret_cast<int32_t*>(logits);  // int32 dots, then floats in place
        parallel_ranges(V, cdiv(kMinHeadChunkBytes, kp), [&](int64_t r0, int64_t r1) {
            kern.int8_rows(hq.get(), R, kp, m.head.w_i8, m.head.row_sum, r0, r1, acc, V);
            for (int64_t t = 0; t < R; ++t)
                for (int64_t r = r0; r < r1; ++r)
                    logits[t * V + r] =
                        static_cast<float>(acc[t * V + r]) / hs[size_t(t)] / m.head.row_scale[r];
        });
    } else {
        parallel_ranges(V, cdiv(kMinHeadChunkBytes, H * dtype_size(m.head.dtype)),
                        [&](int64_t r0, int64_t r1) {
                            kern.float_rows(h.data(), R, H, m.head.w, m.head.dtype, r0, r1,
                                            logits, V);
                        });
    }
}

void quantize_rows_int8(const void* w, Dtype dtype, int64_t rows, int64_t k, int64_t kpad,
                        int8_t* q, float* row_scale, int32_t* row_sum_out, Isa isa) {
    const Kernels& kern = kernels_for(isa);
    for_rows(rows, k, [&](int64_t r) {
        float* tmp = thread_scratch<float>(k, Scratch::row);
        to_float_row(w, dtype, r * k, k, tmp);
        int8_t* qr = q + r * kpad;
        row_scale[r] = kern.quantize_row(tmp, k, qr);
        std::memset(qr + k, 0, size_t(kpad - k));
        row_sum_out[r] = row_sum(qr, k);
    });
}

void quantize_rows_q4(const void* w, Dtype dtype, int64_t rows, int64_t k, int64_t kpad,
                      uint8_t* nibbles, uint16_t* d) {
    for_rows(rows, k, [&](int64_t r) {
        float* tmp = thread_scratch<float>(kpad, Scratch::row);
        to_float_row(w, dtype, r * k, k, tmp);
        std::fill(tmp + k, tmp + kpad, 0.0f);
        quantize_row_q4(tmp, kpad, nibbles + r * (kpad / 2), d + r * (kpad / 32));
    });
}

}  // namespace bitnet158
