"""Readers and writers of checkpoint formats.

Every reader produces the same canonical form, a `ModelConfig` plus a flat dict of numpy
arrays with these names (H = hidden_size, I = intermediate_size, V = vocab_size):

    embed.weight                      float [V, H]
    lm_head.weight                    float [V, H]   only when not config.tie_word_embeddings
    norm.weight                       float [H]      only when config.norm_affine
    layers.{i}.attn_norm.weight       float [H]      only when config.norm_affine
    layers.{i}.ffn_norm.weight        float [H]      only when config.norm_affine
    layers.{i}.attn_sub_norm.weight   float [q_size] only when config.subln
    layers.{i}.ffn_sub_norm.weight    float [I]      only when config.subln
    layers.{i}.{proj}.codes           int8  [N, K]   ternary codes in {-1, 0, 1}
    layers.{i}.{proj}.scale           float32 []     beta: W = codes * beta

with proj in q (N=q_size), k, v (N=kv_size), o (N=H, K=q_size), gate, up (N=I), down (K=I).
A fused foreign matrix with one scale (OLMo's att_proj) is split into q/k/v that share it:
the scale of a sub-matrix is never merged or re-derived.

Our own file (native.py) stores the same names with `.codes` replaced by `.packed` (our
kernel layout, packing.py) and is memory-mapped at load time.
"""
