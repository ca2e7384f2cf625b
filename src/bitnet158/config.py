"""ModelConfig: one dataclass describing every supported BitNet b1.58 architecture variant.

Variants differ by fields, never by class:
- bitnet-2b4t (microsoft/bitnet-b1.58-2B-4T): relu2 gated FFN, subln norms, GQA, tied embeddings.
- llama-b158 (the paper / 1bitLLM, and our shipped model): silu gated FFN (SwiGLU), subln norms.
- llama (Falcon-E, Falcon3-1.58bit, Llama3-8B-1.58): plain Llama, ternary linears, no subln.
- olmo-bitnet (NousResearch/OLMo-Bitnet-1B): OLMo block, parameter-free RMSNorm inside each
  BitLinear (`inner_norm`), non-parametric LayerNorm blocks.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

ACTIVATIONS = ("relu2", "silu")
NORM_KINDS = ("rmsnorm", "layernorm")
# The native engine's limits (native/module.cpp): int32 sums stay exact up to 2^22 columns,
# token ids and positions are int32. A config beyond them is refused before anything is sized
# by it (a file declaring 2^40 layers must not make the loader loop or allocate).
MAX_WIDTH = 1 << 22
MAX_LAYERS = 1 << 16
MAX_INT32 = 2**31 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


@dataclass
class ModelConfig:
    """Shapes and architecture switches of a decoder-only BitNet b1.58 model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    family: str = "llama-b158"  # informative name of the variant, see the module docstring
    hidden_act: str = "silu"  # gate activation of the gated FFN: act(gate(x)) * up(x)
    subln: bool = True  # attn_sub_norm before o_proj, ffn_sub_norm before down_proj
    inner_norm: bool = False  # parameter-free RMSNorm on the input of every BitLinear (OLMo)
    norm_kind: str = "rmsnorm"  # block norms: rmsnorm (x * w) or layernorm (mean-centred)
    norm_affine: bool = True  # block norms carry a weight vector
    rms_norm_eps: float = 1e-5
    inner_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if not self.head_dim and _is_int(self.hidden_size) and _is_int(self.num_heads):
            self.head_dim = self.hidden_size // max(self.num_heads, 1)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError if a field has the wrong type, is out of range, or contradicts
        another (configs come from files: every field is checked, not trusted)."""
        limits = {
            "vocab_size": MAX_INT32,
            "hidden_size": MAX_WIDTH,
            "intermediate_size": MAX_WIDTH,
            "num_layers": MAX_LAYERS,
            "num_heads": MAX_WIDTH,
            "num_kv_heads": MAX_WIDTH,
            "head_dim": MAX_WIDTH,
            "max_position_embeddings": MAX_INT32,
        }
        for name, limit in limits.items():
            value = getattr(self, name)
            if not _is_int(value) or not 0 < value <= limit:
                raise ConfigError(
                    f"config field {name} must be an integer in 1..{limit}, got {value!r}"
                )
        if self.q_size > MAX_WIDTH:
            raise ConfigError(
                f"num_heads * head_dim = {self.q_size} exceeds the supported maximum {MAX_WIDTH}"
            )
        for name in ("rms_norm_eps", "inner_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not _is_real(value) or value < 0 or (name == "rope_theta" and value == 0):
                raise ConfigError(f"config field {name} must be a positive number, got {value!r}")
        for name in ("subln", "inner_norm", "norm_affine", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config field {name} must be true or false, got {getattr(self, name)!r}")  # fmt: skip
        if not isinstance(self.family, str):
            raise ConfigError(f"config field family must be a string, got {self.family!r}")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                raise ConfigError(f"config field {name} must be an integer or null, got {value!r}")
        if not isinstance(self.eos_token_ids, list) or not all(map(_is_int, self.eos_token_ids)):
            raise ConfigError(
                f"config field eos_token_ids must be a list of integers, got {self.eos_token_ids!r}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not one of {ACTIVATIONS}")
        if self.norm_kind not in NORM_KINDS:
            raise ConfigError(f"norm_kind {self.norm_kind!r} is not one of {NORM_KINDS}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a ModelConfig is a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:  # a required field is missing
            raise ConfigError(f"incomplete ModelConfig: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        if not isinstance(text, str):
            raise ConfigError(f"a ModelConfig is JSON text, got {type(text).__name__}")
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"ModelConfig is not valid JSON: {exc}") from None
