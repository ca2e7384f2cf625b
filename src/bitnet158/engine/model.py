"""The torch-free forward pass: the math of `bitnet158.nn.model`, in numpy + native kernels.

Every variant of `ModelConfig` is handled by fields, as in the reference: relu2/silu gated
FFN, subln norms, OLMo's parameter-free RMSNorm inside each BitLinear (`inner_norm`),
RMSNorm/LayerNorm blocks with or without weights, tied or untied output layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig
from ..errors import GenerationError
from ..formats.native import FLOAT_MATRICES, bf16_to_float32, projection_shapes
from .kernels import TernaryLinear
from .kv_cache import KVCache

QUERY_BLOCK = 256  # queries per attention block in a long prefill


def norm(x: np.ndarray, weight: np.ndarray | None, eps: float, kind: str = "rmsnorm") -> np.ndarray:
    """RMSNorm or (bias-free) LayerNorm over the last axis, float32."""
    if kind == "layernorm":
        x = x - x.mean(-1, keepdims=True)
    x = x / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(eps))
    return x if weight is None else x * weight


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """float32[head_dim / 2], computed as `nn.model.rope_tables` does (float32 power)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return np.float32(1.0) / (np.float32(theta) ** exponent)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE of x float32[T, heads, head_dim]; cos, sin [T, 1, head_dim]."""
    half = x.shape[-1] // 2
    rotated = np.concatenate((-x[..., half:], x[..., :half]), axis=-1)
    return x * cos + rotated * sin


def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int) -> np.ndarray:
    """Causal grouped-query attention.

    q float32[T, heads, D] for positions start..start+T-1; keys, values [S, kv_heads, D] with
    S = start + T. Returns float32[T, heads * D]. Long prompts go QUERY_BLOCK queries at a
    time, so the scores never exceed [heads, QUERY_BLOCK, S].
    """
    T, heads, D = q.shape
    S, kv_heads = keys.shape[0], keys.shape[1]
    group = heads // kv_heads
    q = q.reshape(T, kv_heads, group, D).transpose(1, 2, 0, 3)  # [kvh, g, T, D]
    k = keys.transpose(1, 2, 0)[:, None]  # [kvh, 1, D, S]
    v = values.transpose(1, 0, 2)[:, None]  # [kvh, 1, S, D]
    out = np.empty((T, kv_heads, group, D), dtype=np.float32)
    for t0 in range(0, T, QUERY_BLOCK):
        t1 = min(T, t0 + QUERY_BLOCK)
        scores = (q[:, :, t0:t1] @ k) * np.float32(1.0 / np.sqrt(D))  # [kvh, g, t, S]
        if start + t0 + 1 < S:  # some key lies in the future of some query
            future = np.arange(S)[None, :] > (start + np.arange(t0, t1))[:, None]
            scores[..., future] = -np.inf
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        out[t0:t1] = (probs @ v).transpose(2, 0, 1, 3)
    return out.reshape(T, heads * D)


@dataclass
class Layer:
    """Weights of one decoder block."""

    attn_norm: np.ndarray | None
    ffn_norm: np.ndarray | None
    attn_sub_norm: np.ndarray | None
    ffn_sub_norm: np.ndarray | None
    q: TernaryLinear
    k: TernaryLinear
    v: TernaryLinear
    o: TernaryLinear
    gate: TernaryLinear
    up: TernaryLinear
    down: TernaryLinear


def _float32(value: np.ndarray, name: str) -> np.ndarray:
    """A float matrix as float32 (BF16 bits widened); float32 input stays a zero-copy view."""
    if name in FLOAT_MATRICES and value.dtype == np.uint16:
        return bf16_to_float32(value)
    return np.asarray(value, dtype=np.float32)


class EngineModel:
    """A BitNet b1.58 decoder over native tensors (`.packed` names, see formats.native)."""

    def __init__(self, config: ModelConfig, tensors: dict[str, np.ndarray]) -> None:
        self.config = cfg = config

        def opt(name: str) -> np.ndarray | None:
            return _float32(tensors[name], name) if name in tensors else None

        def linear(prefix: str, proj: str) -> TernaryLinear:
            n, k = projection_shapes(cfg)[proj]
            beta = float(np.asarray(tensors[f"{prefix}{proj}.scale"]).reshape(-1)[0])
            return TernaryLinear(tensors[f"{prefix}{proj}.packed"], beta, n, k)

        self.embed = _float32(tensors["embed.weight"], "embed.weight")  # [V, H]
        self.lm_head = (
            self.embed
            if cfg.tie_word_embeddings
            else _float32(tensors["lm_head.weight"], "lm_head.weight")
        )
        self.norm = opt("norm.weight")
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            self.layers.append(
                Layer(
                    attn_norm=opt(p + "attn_norm.weight"),
                    ffn_norm=opt(p + "ffn_norm.weight"),
                    attn_sub_norm=opt(p + "attn_sub_norm.weight"),
                    ffn_sub_norm=opt(p + "ffn_sub_norm.weight"),
                    **{
                        proj: linear(p, proj) for proj in ("q", "k", "v", "o", "gate", "up", "down")
                    },
                )
            )
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta)

    def new_cache(self, max_context: int | None = None) -> KVCache:
        """An empty KV cache for `max_context` tokens (default: max_position_embeddings)."""
        cfg = self.config
        size = cfg.max_position_embeddings if max_context is None else max_context
        return KVCache(cfg.num_layers, size, cfg.num_kv_heads, cfg.head_dim)

    def _linear(self, lin: TernaryLinear, x: np.ndarray) -> np.ndarray:
        if self.config.inner_norm:  # OLMo-Bitnet: parameter-free RMSNorm inside the BitLinear
            x = norm(x, None, self.config.inner_norm_eps)
        return lin(x)

    def _block(self, i: int, x: np.ndarray, cache: KVCache, start: int, cos, sin) -> np.ndarray:
        cfg, layer = self.config, self.layers[i]
        T = x.shape[0]
        h = norm(x, layer.attn_norm, cfg.rms_norm_eps, cfg.norm_kind)
        q = self._linear(layer.q, h).reshape(T, cfg.num_heads, cfg.head_dim)
        k = self._linear(layer.k, h).reshape(T, cfg.num_kv_heads, cfg.head_dim)
        v = self._linear(layer.v, h).reshape(T, cfg.num_kv_heads, cfg.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = cache.update(i, start, k, v)
        y = attention(q, keys, values, start)
        if cfg.subln:
            y = norm(y, layer.attn_sub_norm, cfg.rms_norm_eps)
        x = x + self._linear(layer.o, y)

        h = norm(x, layer.ffn_norm, cfg.rms_norm_eps, cfg.norm_kind)
        gate = self._linear(layer.gate, h)
        if cfg.hidden_act == "relu2":
            act = np.square(np.maximum(gate, np.float32(0)))
        else:
            with np.errstate(over="ignore"):  # exp(-g) overflows to inf for g << 0: silu -> 0
                act = gate / (np.float32(1) + np.exp(-gate))
        h = act * self._linear(layer.up, h)
        if cfg.subln:
            h = norm(h, layer.ffn_sub_norm, cfg.rms_norm_eps)
        return x + self._linear(layer.down, h)

    def forward(self, tokens: np.ndarray, cache: KVCache, last_only: bool = False) -> np.ndarray:
        """Run tokens int[T] after the `cache.length` cached ones; logits float32[T or 1, V]."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.size and not 0 <= tokens.min() <= tokens.max() < self.config.vocab_size:
            raise GenerationError(f"token ids must be in 0..{self.config.vocab_size - 1}")
        start = cache.reserve(len(tokens))
        positions = np.arange(start, start + len(tokens), dtype=np.float32)
        freqs = positions[:, None] * self.inv_freq[None, :]
        angles = np.concatenate((freqs, freqs), axis=-1)[:, None, :]  # [T, 1, D]
        cos, sin = np.cos(angles), np.sin(angles)

        x = self.embed[tokens].astype(np.float32, copy=True)
        for i in range(len(self.layers)):
            x = self._block(i, x, cache, start, cos, sin)
        cache.length = start + len(tokens)
        if last_only:
            x = x[-1:]
        h = norm(x, self.norm, self.config.rms_norm_eps, self.config.norm_kind)
        return h @ self.lm_head.T
