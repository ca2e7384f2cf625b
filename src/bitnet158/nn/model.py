"""The reference BitNet b1.58 transformer in torch: every supported variant, one readable file.

Variants are fields of `ModelConfig` (relu2/silu FFN, subln norms, BitLinear inner norm,
RMSNorm/LayerNorm blocks, tied embeddings). Module names are the canonical tensor names of
`bitnet158.formats`, so a checkpoint maps onto this model without a renaming table.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .bitlinear import BitLinear

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last axis, in float32, with an optional weight."""

    def __init__(self, dim: int, eps: float, kind: str = "rmsnorm", affine: bool = True) -> None:
        super().__init__()
        self.eps, self.kind = eps, kind
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x if self.weight is None else x * self.weight.float()


def rope_tables(
    head_dim: int, theta: float, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., T, head_dim] for rotate-half RoPE (the Hugging Face / GPT-NeoX layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def packed_layout(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions int64[B, T] and attention mask bool[B, 1, T, T] of rows packing several sequences.

    `segment_ids[B, T]` numbers the sequences of a row (equal ids are one contiguous sequence):
    positions restart at 0 in each, and a token attends causally within its own sequence only,
    so a packed row computes exactly what its sequences would compute one by one.
    """
    B, T = segment_ids.shape
    t = torch.arange(T, device=segment_ids.device).expand(B, T)
    new = torch.ones_like(segment_ids, dtype=torch.bool)
    new[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = torch.where(new, t, torch.zeros_like(t)).cummax(dim=1).values
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return t - starts, (same & causal)[:, None]


class Block(nn.Module):
    """Pre-norm decoder block: h = x + Attn(norm(x)); out = h + FFN(norm(h))."""

    def __init__(self, cfg: ModelConfig, ternary: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        H, ffn = cfg.hidden_size, cfg.intermediate_size

        def linear(k: int, n: int) -> nn.Linear:
            if not ternary:  # the full-precision twin of the same architecture
                return nn.Linear(k, n, bias=False)
            return BitLinear(k, n, inner_norm=cfg.inner_norm, inner_norm_eps=cfg.inner_norm_eps)

        self.attn_norm = Norm(H, cfg.rms_norm_eps, cfg.norm_kind, cfg.norm_affine)
        self.ffn_norm = Norm(H, cfg.rms_norm_eps, cfg.norm_kind, cfg.norm_affine)
        self.q, self.k, self.v = (
            linear(H, cfg.q_size),
            linear(H, cfg.kv_size),
            linear(H, cfg.kv_size),
        )
        self.o = linear(cfg.q_size, H)
        self.gate, self.up, self.down = linear(H, ffn), linear(H, ffn), linear(ffn, H)
        if cfg.subln:
            self.attn_sub_norm = Norm(cfg.q_size, cfg.rms_norm_eps)
            self.ffn_sub_norm = Norm(ffn, cfg.rms_norm_eps)

    def attention(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q(x).view(B, T, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            enable_gqa=cfg.num_kv_heads != cfg.num_heads,
        )  # fmt: skip
        y = y.transpose(1, 2).reshape(B, T, cfg.q_size)
        if cfg.subln:
            y = self.attn_sub_norm(y)
        return self.o(y)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate(x)
        act = F.relu(gate).square() if self.cfg.hidden_act == "relu2" else F.silu(gate)
        h = act * self.up(x)
        if self.cfg.subln:
            h = self.ffn_sub_norm(h)
        return self.down(h)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = x + self.attention(self.attn_norm(x), cos, sin, mask)
        return h + self.ffn(self.ffn_norm(h))


class Transformer(nn.Module):
    """Decoder-only BitNet b1.58 model; forward(idx[B, T]) -> logits float32[B, T, vocab].

    `ternary=False` builds the full-precision twin (nn.Linear everywhere), for comparisons.
    """

    def __init__(self, cfg: ModelConfig, ternary: bool = True) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, ternary) for _ in range(cfg.num_layers))
        self.norm = Norm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_kind, cfg.norm_affine)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(self, idx: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of idx[B, T]; `segment_ids[B, T]` marks packed sequences (see packed_layout)."""
        T = idx.shape[1]
        mask = None
        positions = torch.arange(T, device=idx.device)
        if segment_ids is not None:
            positions, mask = packed_layout(segment_ids)
        cos, sin = rope_tables(self.config.head_dim, self.config.rope_theta, positions)
        if cos.dim() == 3:  # per-row positions: broadcast over the heads
            cos, sin = cos[:, None], sin[:, None]
        x = self.embed(idx).float()
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return F.linear(self.norm(x), self.output_weight().float())

    def num_parameters(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    # --- the weight-file contract (canonical names, see bitnet158.formats) ---

    @classmethod
    def from_tensors(cls, cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> Transformer:
        """Build a model from canonical tensors; ternary layers keep their stored scales."""
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device="cpu")
        state = {}
        for name, value in tensors.items():
            if name.endswith(".codes"):
                base = name[: -len(".codes")]
                beta = np.float32(tensors[base + ".scale"])
                state[base + ".weight"] = torch.from_numpy(value.astype(np.float32) * beta)
                state[base + ".fixed_beta"] = torch.tensor(beta)
            elif not name.endswith(".scale"):
                state[name] = torch.from_numpy(np.asarray(value, dtype=np.float32))
        for module in model.modules():
            if isinstance(module, BitLinear):
                module.fixed_beta = torch.empty(())
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise KeyError(
                f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return model

    @torch.no_grad()
    def to_tensors(self) -> dict[str, np.ndarray]:
        """Canonical tensors of the deployed model: ternary codes + scales, float norms/embeddings."""
        out: dict[str, np.ndarray] = {}
        for name, module in self.named_modules():
            if isinstance(module, BitLinear):
                codes, beta = module.ternary()
                out[name + ".codes"] = codes.numpy()
                out[name + ".scale"] = np.float32(beta.item())
        for name, p in self.named_parameters():
            base = name.rsplit(".", 1)[0]
            if not isinstance(self.get_submodule(base), BitLinear):
                out[name] = p.detach().float().numpy().copy()
        return out
