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
    # Summed in chunks of 2^20: a float64 copy of a whole 2B4T matrix (141 MB, fresh pages
    # every step) cost more than the rest of BitLinear's overhead (benchmarks/bench_bitlinear.py).
    flat = w.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=w.device)
    for chunk in flat.split(1 << 20):
        total += torch.linalg.vector_norm(chunk, 1, dtype=torch.float64)
    return (total / max(w.numel(), 1)).float().clamp(min=EPS)


def quantize_weights(
    w: torch.Tensor, beta: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes (float tensor in {-1, 0, 1}) and beta, so that W ~ codes * beta."""
    beta = weight_scale(w) if beta is None else beta
    codes = (w.float() * (1.0 / beta)).round_().clamp_(-1, 1)
    return codes, beta


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 codes (as float) and s[..., 1], so that x ~ codes / s."""
    x = x.float()
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return (x * s).round_().clamp_(-128, 127), s


def rms_norm_no_affine(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Parameter-free RMSNorm in float32 (the norm inside OLMo-Bitnet's BitLinear)."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def mix(x: torch.Tensor, q: torch.Tensor, lam: float) -> torch.Tensor:
    """x + lam * (q - x), computed in place in q: the value the STE forwards (q is consumed)."""
    q.sub_(x)
    if lam != 1.0:  # 1.0 * d == d: skip the pass
        q.mul_(lam)
    return q.add_(x)


class _BitLinearFunction(torch.autograd.Function):
    """y = mix(x, q_a(x)) . mix(W, q_w(W))^T with straight-through gradients.

    The same values as `x + lam * (q(x) - x).detach()` through autograd, but the quantized
    operands are built in place (fewer full passes over W, no temporaries) and the backward
    is two matmuls, as nn.Linear's: dx = g . W_q, dW = g^T . x_q.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lam, fixed_beta):
        codes, s = quantize_activations(x)
        x_q = mix(x, codes.div_(s), lam)
        w = weight.float()
        w_codes, beta = quantize_weights(w, fixed_beta)
        w_q = mix(w, w_codes.mul_(beta), lam)
        # Under autocast, F.linear would cast both operands to the low-precision dtype; do it
        # here so that the backward multiplies the same operands.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        if dtype is not None:
            x_q, w_q = x_q.to(dtype), w_q.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        elif bias is not None:
            bias = bias.float()
        with torch.autocast(device, enabled=False):
            y = F.linear(x_q, w_q, bias)
        ctx.save_for_backward(x_q, w_q)
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        x_q, w_q = ctx.saved_tensors
        grad = grad.to(w_q.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ w_q).float()
        g2 = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = (g2.t() @ x_q.reshape(-1, x_q.shape[-1])).to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0).to(ctx.weight_dtype)
        return grad_x, grad_w, grad_b, None, None


class BitLinear(nn.Linear):
    """A linear layer trained with latent weights and run with ternary weights and int8 inputs.

    Forward: y = (q_a(x) . q_w(W)) with straight-through gradients, where q_w is absmean
    ternary (times beta) and q_a is per-token absmax int8 (divided by s). `lam` < 1 mixes
    the full-precision and quantized values, `x + lam * (q(x) - x)` (lambda warm-up for
    converting fp16 models). `inner_norm` applies a parameter-free RMSNorm to the input first
    (OLMo-Bitnet style). Outside autocast the output has the input's dtype (float32 inside).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        inner_norm: bool = False,
        inner_norm_eps: float = 1e-5,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.inner_norm = inner_norm
        self.inner_norm_eps = inner_norm_eps
        self.lam = 1.0
        # When set, beta is this value instead of mean|W|: the stored scale of a ternary
        # checkpoint (W = codes * beta would re-derive a smaller mean), or the one scale of a
        # fused foreign matrix (OLMo's att_proj) split into q/k/v.
        self.register_buffer("fixed_beta", None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, inner_norm={self.inner_norm}, lam={self.lam}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x = rms_norm_no_affine(x, self.inner_norm_eps) if self.inner_norm else x.float()
        y = _BitLinearFunction.apply(x, self.weight, self.bias, float(self.lam), self.fixed_beta)
        if in_dtype != y.dtype and not torch.is_autocast_enabled(x.device.type):
            y = y.to(in_dtype)  # e.g. a bf16 Hugging Face model converted by quantize_model
        return y

    @torch.no_grad()
    def ternary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The deployed form: int8 codes [out, in] and the float32 scalar beta."""
        codes, beta = quantize_weights(self.weight, self.fixed_beta)
        return codes.to(torch.int8), beta


def set_lambda(model: nn.Module, lam: float) -> None:
    """Set the warm-up mixing factor of every BitLinear in `model` (1 = fully quantized)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    for module in model.modules():
        if isinstance(module, BitLinear):
            module.lam = lam
