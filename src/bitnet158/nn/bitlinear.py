"""BitLinear in torch: latent weights, absmean ternary weights, per-token int8 activations, STE.

The numerics are `bitnet158.quant`'s, in torch, and agree with them bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """beta = max(mean|W|, 1e-5) as a float32 scalar tensor (mean accumulated in float64)."""
    return w.detach().double().abs().mean().float().clamp(min=EPS)


def quantize_weights(
    w: torch.Tensor, beta: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes (float tensor in {-1, 0, 1}) and beta, so that W ~ codes * beta."""
    beta = weight_scale(w) if beta is None else beta
    codes = (w.float() * (1.0 / beta)).round().clamp(-1, 1)
    return codes, beta


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 codes (as float) and s[..., 1], so that x ~ codes / s."""
    x = x.float()
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return (x * s).round().clamp(-128, 127), s


def rms_norm_no_affine(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Parameter-free RMSNorm in float32 (the norm inside OLMo-Bitnet's BitLinear)."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


class BitLinear(nn.Linear):
    """A linear layer trained with latent weights and run with ternary weights and int8 inputs.

    Forward: y = (q_a(x) . q_w(W)) with straight-through gradients, where q_w is absmean
    ternary (times beta) and q_a is per-token absmax int8 (divided by s). `lam` < 1 mixes
    the full-precision and quantized values (lambda warm-up for converting fp16 models).
    `inner_norm` applies a parameter-free RMSNorm to the input first (OLMo-Bitnet style).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        inner_norm: bool = False,
        inner_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.inner_norm = inner_norm
        self.inner_norm_eps = inner_norm_eps
        self.lam = 1.0
        # When set, beta is this value instead of mean|W|: the stored scale of a ternary
        # checkpoint (W = codes * beta would re-derive a smaller mean), or the one scale of a
        # fused foreign matrix (OLMo's att_proj) split into q/k/v.
        self.register_buffer("fixed_beta", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inner_norm:
            x = rms_norm_no_affine(x, self.inner_norm_eps)
        x = x.float()
        codes, s = quantize_activations(x)
        x_q = x + self.lam * (codes / s - x).detach()
        w = self.weight.float()
        w_codes, beta = quantize_weights(w, self.fixed_beta)
        w_q = w + self.lam * (w_codes * beta - w).detach()
        return F.linear(x_q, w_q, None if self.bias is None else self.bias.float())

    @torch.no_grad()
    def ternary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The deployed form: int8 codes [out, in] and the float32 scalar beta."""
        codes, beta = quantize_weights(self.weight, self.fixed_beta)
        return codes.to(torch.int8), beta
