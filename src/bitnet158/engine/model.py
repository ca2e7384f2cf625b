"""The torch-free model: weights handed to the native decoder step, one call per step.

The math is `bitnet158.nn.model`'s, every `ModelConfig` variant (relu2/silu gated FFN, subln
norms, OLMo's parameter-free RMSNorm inside each BitLinear, RMSNorm/LayerNorm blocks with or
without weights, tied or untied output layer); `native/forward.cpp` runs all layers of a step
in C++ (tests/engine compare its logits with the torch reference).

One step is any set of tokens, each in a KV-cache slot at a position: a prompt (prefill, a GEMM
over blocks of tokens), one token (decode), or one token of each of several sequences (batched
decode, the same GEMM path).
"""

from __future__ import annotations

import mmap
import warnings
from collections.abc import Sequence

import numpy as np

from .. import _native
from ..config import ModelConfig
from ..errors import GenerationError
from ..formats.native import FLOAT_MATRICES, projection_shapes
from ..packing import pack_ours, unpack_ours_tq1
from .kv_cache import KVCache, aligned_zeros

PREFILL_CHUNK = 512  # prompt tokens per native call: bounds the step's scratch memory
# The output layer: the stored float matrix, an int8 copy (a scale per row) or a 4-bit copy
# (groups of 32 with an f16 scale each), made at load.
HEAD_KINDS = ("exact", "int8", "q4")


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """float32[head_dim / 2], computed as `nn.model.rope_tables` does (float32 power)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return np.float32(1.0) / (np.float32(theta) ** exponent)


def native_array(value, dtype=None) -> np.ndarray:
    """`value` as the native extension takes arrays: C-contiguous, of `dtype`, and aligned to
    its element size. Zero-copy when it already is; a tensor a file stores at an odd offset
    (safetensors and GGUF allow it) is copied, since the extension refuses a misaligned one."""
    return np.require(value, dtype=dtype, requirements=["C", "A"])


def _float_matrix(tensors: dict[str, np.ndarray], name: str) -> tuple[np.ndarray, bool]:
    """An embedding/output matrix as stored (zero-copy) and whether it is BF16 bits."""
    value = tensors[name]
    if value.dtype not in (np.float32, np.float16, np.uint16):
        value = np.asarray(value, dtype=np.float32)
    return native_array(value), name in FLOAT_MATRICES and value.dtype == np.uint16


def _mapping_of(array: np.ndarray) -> tuple[mmap.mmap, int] | None:
    """The read-only mmap an array views (as formats.native's memory-mapped tensors do) and
    the array's offset in it, or None for other memory: unmapping pages of a writable or
    copy-on-write mapping could discard what was written there."""
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if base is None:
        return None
    with memoryview(base) as view:
        if not view.readonly:
            return None
    return base, array.ctypes.data - np.frombuffer(base, dtype=np.uint8).ctypes.data


def _release_pages(array: np.ndarray) -> None:
    """Drop the pages of a memory-mapped (read-only) array from this process: they stay in the
    page cache and come back on the next read, but no longer count in its resident memory."""
    found = _mapping_of(array)
    if found is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    mm, start = found
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (start + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > first:
        mm.madvise(mmap.MADV_DONTNEED, first, end - first)


HEAD_BLOCK_ROWS = 8192  # output-layer rows quantized per block at load


def _quantize_in_blocks(quantize, w: np.ndarray, bf16: bool) -> tuple[np.ndarray, ...]:
    """A compressed copy of the output layer w [V, H], a block of rows at a time, written in
    place, each block's memory-mapped source pages released once read: the load never holds
    both whole copies (peak memory: ternary layers + compressed copy, not + the F16 matrix)."""
    # Quantizing no rows gives the parts' dtypes and row shapes.
    parts = tuple(
        aligned_zeros((w.shape[0],) + p.shape[1:], p.dtype) for p in quantize(w[:0], bf16)
    )
    for r0 in range(0, w.shape[0], HEAD_BLOCK_ROWS):
        rows = slice(r0, r0 + HEAD_BLOCK_ROWS)
        quantize(w[rows], bf16, out=tuple(p[rows] for p in parts))
        _release_pages(w[rows])
    return parts


class EngineModel:
    """A BitNet b1.58 decoder over native tensors (`.packed` names, see formats.native).

    `lm_head`: "exact" runs the output layer in its stored dtype (F32/F16/BF16, as the
    checkpoint has it); "int8" quantizes it per row at load (half the bytes of F16 per token),
    "q4" to 4 bits in groups of 32 (0.56 bytes per weight). The embedding lookup stays exact.
    `layout`: how the `.packed` tensors are packed, "2bit" or "tq1" (formats.native.LAYOUTS).
    """

    def __init__(
        self,
        config: ModelConfig,
        tensors: dict[str, np.ndarray],
        lm_head: str = "exact",
        layout: str = "2bit",
    ) -> None:
        if lm_head not in HEAD_KINDS:
            raise ValueError(f"lm_head must be one of {HEAD_KINDS}, got {lm_head!r}")
        # Without a 1.6-bit kernel (AVX-512 VBMI) the portable one would run, many times slower
        # than the 2-bit kernels: repack to 2 bits here instead, a matrix at a time.
        repack = layout == "tq1" and _native.tq1_kernel() == "scalar"
        if repack:
            warnings.warn(
                "this CPU has no kernel for the 1.6-bit layout (it needs AVX-512 VBMI): the "
                "weights are repacked to the 2-bit layout at load (a slower load, 25 % more "
                "memory); convert the file once instead: `bitnet158 convert MODEL OUT --to "
                "bitnet158`",
                stacklevel=2,
            )
            layout = "2bit"
        self.config = cfg = config
        self.native = _native.Model(
            hidden=cfg.hidden_size,
            inter=cfg.intermediate_size,
            heads=cfg.num_heads,
            kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            vocab=cfg.vocab_size,
            layers=cfg.num_layers,
            relu2=cfg.hidden_act == "relu2",
            subln=cfg.subln,
            inner_norm=cfg.inner_norm,
            layernorm=cfg.norm_kind == "layernorm",
            eps=cfg.rms_norm_eps,
            inner_eps=cfg.inner_norm_eps,
            inv_freq=rope_inv_freq(cfg.head_dim, cfg.rope_theta),
            layout=layout,
        )

        def vector(name: str) -> np.ndarray | None:
            return native_array(tensors[name], np.float32) if name in tensors else None

        projections = projection_shapes(cfg)

        def packed(name: str, n: int, k: int) -> np.ndarray:
            if not repack:
                return native_array(tensors[name], np.uint8)
            two_bit = pack_ours(unpack_ours_tq1(tensors[name], n, k))
            _release_pages(tensors[name])
            return native_array(two_bit, np.uint8)

        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            self.native.set_layer(
                i,
                vector(p + "attn_norm.weight"),
                vector(p + "ffn_norm.weight"),
                vector(p + "attn_sub_norm.weight"),
                vector(p + "ffn_sub_norm.weight"),
                [packed(f"{p}{proj}.packed", n, k) for proj, (n, k) in projections.items()],
                [
                    float(np.asarray(tensors[f"{p}{proj}.scale"]).reshape(-1)[0])
                    for proj in projections
                ],
            )
        embed, embed_bf16 = _float_matrix(tensors, "embed.weight")
        # Only lookups read a mapped embedding that is not the output layer as it is stored.
        lookups_only = lm_head != "exact" or not cfg.tie_word_embeddings
        release_rows = lookups_only and _mapping_of(embed) is not None
        self.native.set_embedding(embed, embed_bf16, release_rows)
        head, head_bf16 = (None, embed_bf16)
        if not cfg.tie_word_embeddings:
            head, head_bf16 = _float_matrix(tensors, "lm_head.weight")
        self.native.set_output(vector("norm.weight"), head, head_bf16)
        if lm_head != "exact":
            source = embed if head is None else head
            quantize = {"int8": _native.quantize_rows_int8, "q4": _native.quantize_rows_q4}
            parts = _quantize_in_blocks(quantize[lm_head], source, head_bf16)
            if lm_head == "int8":
                self.native.set_output_int8(*parts)
            else:
                self.native.set_output_q4(*parts)

    @property
    def head_kind(self) -> str:
        """The output layer in use: float32, float16, bfloat16 or int8."""
        return self.native.head_kind

    def new_cache(
        self, max_context: int | None = None, dtype: str = "float32", slots: int = 1
    ) -> KVCache:
        """An empty KV cache of `slots` sequences of `max_context` tokens (default:
        max_position_embeddings), float32 or float16."""
        cfg = self.config
        size = cfg.max_position_embeddings if max_context is None else max_context
        return KVCache(cfg.num_layers, size, cfg.num_kv_heads, cfg.head_dim, dtype, slots)

    def step(
        self,
        tokens: Sequence[int] | np.ndarray,
        slots: Sequence[int] | np.ndarray,
        positions: Sequence[int] | np.ndarray,
        cache: KVCache,
        logits_of: Sequence[int] | np.ndarray,
    ) -> np.ndarray:
        """One native call: token t goes into slot slots[t] at positions[t] and attends to that
        slot's positions up to its own; logits float32[len(logits_of), V] of the tokens
        `logits_of`. The caller keeps `cache.lengths` (see `forward` and `decode`)."""
        tokens = native_array(np.reshape(tokens, -1), np.int32)
        if tokens.size and not 0 <= tokens.min() <= tokens.max() < self.config.vocab_size:
            raise GenerationError(f"token ids must be in 0..{self.config.vocab_size - 1}")
        positions = native_array(np.reshape(positions, -1), np.int32)
        if positions.size and positions.max() >= cache.max_context:  # the capacity may be more
            raise GenerationError(
                f"context overflow: position {positions.max()} is past the context length of "
                f"{cache.max_context} tokens"
            )
        try:
            return self.native.forward(
                tokens,
                native_array(np.reshape(slots, -1), np.int32),
                positions,
                cache.k,
                cache.v,
                native_array(np.reshape(logits_of, -1), np.int64),
            )
        except ValueError as exc:  # context overflow, bad slot: the native checks wrote nothing
            raise GenerationError(str(exc)) from None

    def forward(
        self, tokens: np.ndarray, cache: KVCache, last_only: bool = False, slot: int = 0
    ) -> np.ndarray:
        """Run tokens int[T] after the ones cached in `slot`; logits float32[T or 1, V].

        A long prompt goes PREFILL_CHUNK tokens per native call (each a GEMM over its tokens).
        """
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.size and not 0 <= tokens.min() <= tokens.max() < self.config.vocab_size:
            raise GenerationError(f"token ids must be in 0..{self.config.vocab_size - 1}")
        start = cache.reserve(len(tokens), slot)
        out = []
        for c0 in range(0, len(tokens), PREFILL_CHUNK):
            chunk = tokens[c0 : c0 + PREFILL_CHUNK]
            T = len(chunk)
            if last_only:
                rows = [T - 1] if c0 + T == len(tokens) else []
            else:
                rows = range(T)
            positions = np.arange(start + c0, start + c0 + T)
            out.append(self.step(chunk, np.full(T, slot), positions, cache, rows))
            cache.lengths[slot] = start + c0 + T
        return np.concatenate(out) if out else np.zeros((0, self.config.vocab_size), np.float32)

    def decode(self, tokens: Sequence[int], cache: KVCache, slots: Sequence[int]) -> np.ndarray:
        """Batched decode: append tokens[i] to slot slots[i] (distinct slots), all in one
        GEMM step; logits float32[B, V]."""
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        if len(set(slots.tolist())) != len(slots):
            raise GenerationError("decode: each slot may appear once per step")
        positions = np.array([cache.reserve(1, int(s)) for s in slots], dtype=np.int64)
        logits = self.step(tokens, slots, positions, cache, range(len(slots)))
        cache.lengths[slots] += 1
        return logits
