// The whole decoder step in C++: embedding, every layer (norms fused with activation
// quantization, fused q/k/v and gate/up GEMMs, RoPE, grouped-query attention over a
// preallocated KV cache, ReLU^2 or SwiGLU, subln norms, residuals), final norm, output layer.
// The math is nn/model.py's; one call runs any number of tokens of any number of sequences.
// Weights are borrowed pointers (memory-mapped arrays): nothing here copies or frees them.
#pragma once

#include <cstdint>
#include <vector>

#include "dispatch.h"
#include "kernels.h"

namespace bitnet158 {

// One ternary projection: W [n, k] packed in our layout (uint8[ceil(n/4), kpad]), y = x W^T
// with its own weight scale beta.
struct Ternary {
    const uint8_t* packed = nullptr;
    float beta = 1.0f;
    int64_t n = 0, k = 0;
};

struct LayerWeights {
    const float* attn_norm = nullptr;      // float32[hidden], null: no weight
    const float* ffn_norm = nullptr;       // float32[hidden], null: no weight
    const float* attn_sub_norm = nullptr;  // float32[q_size] (subln only)
    const float* ffn_sub_norm = nullptr;   // float32[inter] (subln only)
    Ternary q, k, v, o, gate, up, down;
};

// ModelConfig's fields that the forward pass reads.
struct ModelShape {
    int64_t hidden = 0, inter = 0, heads = 0, kv_heads = 0, head_dim = 0, vocab = 0, layers = 0;
    bool relu2 = false;       // hidden_act: relu2 (else silu)
    bool subln = false;       // attn_sub_norm before o, ffn_sub_norm before down
    bool inner_norm = false;  // parameter-free RMSNorm on every BitLinear input (OLMo)
    bool layernorm = false;   // block and final norms: mean-centred LayerNorm (else RMSNorm)
    float eps = 1e-5f, inner_eps = 1e-5f;
};

// The output layer: exact float rows (f32/f16/bf16); int8 rows with a scale per row (logit =
// float(x_q . w_q) / s_x / row_scale); or 4-bit groups of 32 with an f16 scale each (kernels.h
// Q4RowsFn). The hidden state is quantized per token to int8 for the last two.
struct OutputLayer {
    const void* w = nullptr;  // [vocab, hidden] of dtype
    Dtype dtype = Dtype::f32;
    const int8_t* w_i8 = nullptr;      // int8[vocab, kpad], kpad = hidden rounded up to 64
    const float* row_scale = nullptr;  // float32[vocab]
    const int32_t* row_sum = nullptr;  // int32[vocab]
    const uint8_t* w_q4 = nullptr;     // uint8[vocab, kpad / 2], kpad = hidden rounded up to 256
    const uint16_t* d_q4 = nullptr;    // f16[vocab, kpad / 32]
    int64_t kpad = 0;
};

struct ModelWeights {
    ModelShape shape;
    Layout layout = Layout::bits2;  // of every ternary matrix
    const void* embed = nullptr;  // [vocab, hidden] of embed_dtype
    Dtype embed_dtype = Dtype::f32;
    // The embedding is a read-only file mapping used for lookups only (the output layer is
    // another matrix or a compressed copy): each looked-up row is unmapped again (forward.cpp).
    bool release_embed_rows = false;
    const float* final_norm = nullptr;  // float32[hidden], null: no weight
    OutputLayer head;
    std::vector<LayerWeights> layers;
    std::vector<float> inv_freq;  // float32[head_dim / 2], RoPE frequencies
};

// Keys and values [slots, layers, kv_heads, max_ctx, head_dim] in f32 or f16, each head's keys
// in tiles of kKeyTile positions (kernels.h), so max_ctx is a multiple of kKeyTile.
struct KVCacheView {
    void* k = nullptr;
    void* v = nullptr;
    Dtype dtype = Dtype::f32;
    int64_t slots = 0, max_ctx = 0;
};

// Throws std::invalid_argument (a Python ValueError) for a token id outside the vocabulary,
// a slot outside the cache, a position at or past max_ctx ("context overflow") or a (slot,
// position) given twice. Nothing is written when it throws.
void check_step(const ModelShape& shape, const int32_t* tokens, const int32_t* slots,
                const int32_t* positions, int64_t T, const KVCacheView& cache,
                const int64_t* out_rows, int64_t R);

// Run tokens[T] (token t of sequence slots[t] at position positions[t]) through every layer:
// their keys and values land in the cache, and each token attends to positions
// 0..positions[t] of its slot (earlier ones must be in the cache or in this call).
// logits float32[R, vocab] are those of the tokens out_rows[R]. Call check_step first.
void forward(const ModelWeights& m, const int32_t* tokens, const int32_t* slots,
             const int32_t* positions, int64_t T, const KVCacheView& cache, const int64_t* out_rows,
             int64_t R, float* logits, Isa isa);

// Per-row int8 copy of a float matrix w [rows, k] (dtype): q int8[rows, kpad] (zero padded),
// row_scale = 127 / max|w_row| and row_sum = sum of q's row (quant.quantize_activations per
// row, the activation rule applied to weights).
void quantize_rows_int8(const void* w, Dtype dtype, int64_t rows, int64_t k, int64_t kpad,
                        int8_t* q, float* row_scale, int32_t* row_sum, Isa isa);

// 4-bit copy of a float matrix w [rows, k] (dtype) in the layout of kernels.h Q4RowsFn:
// nibbles uint8[rows, kpad / 2], d f16[rows, kpad / 32] with d = max|w| / 7 over each group
// of 32 (rounded to f16) and q = clip(round(w / d), -8, 7); kpad = k rounded up to kQ4Block.
void quantize_rows_q4(const void* w, Dtype dtype, int64_t rows, int64_t k, int64_t kpad,
                      uint8_t* nibbles, uint16_t* d);

}  // namespace bitnet158
