"""BitNet b1.58 numerics in numpy: absmean ternary weights and per-token absmax int8 activations.

The torch twins live in `bitnet158.nn.bitlinear` and agree with these bit for bit
(tests/test_quant.py). Both follow the reference code of the "Training Tips" PDF as used by
1bitLLM, OLMo-Bitnet and transformers: a scale `s = 1 / max(mean|W|, 1e-5)` multiplied in,
round-half-to-even (np.round / torch.round), then clip.

Edge cases, defined here and kept by the native kernels bit for bit (tests/test_quant.py,
tests/engine/test_edge_cases.py):
- an all-zero weight matrix gets beta = 1e-5 (the floor) and all-zero codes; an all-zero
  activation row gets s = 127 / 1e-5 and all-zero codes: both give exact zeros, never NaN;
- weights with NaN or inf have no absmean scale: `quantize_weights` raises ValueError;
- activations with NaN or inf (a fault upstream) still quantize, as the SIMD kernels do:
  a row holding a NaN gets the scale NaN, as torch's absmax propagates it, and all its codes
  are -128 (x86's float-to-int conversion of NaN, saturated), so every output of that row is
  NaN, as in the torch twin; an inf makes the row's scale 0, so its finite values become 0,
  the inf itself -128, and the row's dequantized outputs inf or NaN. Training stops on a
  non-finite loss, generation on non-finite logits (engine.sampling).
"""

from __future__ import annotations

import numpy as np

EPS = 1e-5  # floor of mean|W| and of max|x|, as in every published BitNet b1.58 code


def weight_scale(w: np.ndarray) -> np.float32:
    """Absmean scale beta = max(mean|W|, 1e-5) of a whole matrix, as float32.

    The mean is accumulated in float64 so that numpy and torch (different summation orders)
    produce the same float32 scale.
    """
    mean = np.abs(np.asarray(w, dtype=np.float64)).mean() if w.size else 0.0
    return np.float32(max(np.float32(mean), np.float32(EPS)))


def quantize_weights(
    w: np.ndarray, scale: np.float32 | None = None
) -> tuple[np.ndarray, np.float32]:
    """Ternary codes int8[N, K] in {-1, 0, 1} and the scale beta, so that W ~ codes * beta.

    `scale` forces a given beta (e.g. one scale shared by a fused q/k/v matrix).
    """
    w = np.asarray(w, dtype=np.float32)
    bad = w.size - np.count_nonzero(np.isfinite(w))
    if bad:
        raise ValueError(f"{bad} of {w.size} weights are NaN or infinite: no ternary scale exists")
    beta = weight_scale(w) if scale is None else np.float32(scale)
    inv = np.float32(1.0) / beta
    codes = np.clip(np.round(w * inv), -1, 1)
    return codes.astype(np.int8), beta


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token (per-row) absmax int8: x_q int8[T, K] and s float32[T] with x ~ x_q / s.

    NaN and inf give the native kernels' result (see the module docstring).
    """
    x = np.asarray(x, dtype=np.float32)
    amax = np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(EPS))  # NaN propagates
    # torch evaluates `127 / amax` as reciprocal(amax) * 127; every reference implementation is
    # torch code, so do the same (a true division differs in the last bit for some amax).
    s = (np.float32(1.0) / amax) * np.float32(127.0)
    with np.errstate(invalid="ignore"):  # inf * 0 (a row holding an inf has s = 0)
        r = np.round(x * s)
    x_q = np.where(np.isnan(r), np.float32(-128), np.clip(r, -128, 127)).astype(np.int8)
    return x_q, s[..., 0]


def ternary_linear_reference(x: np.ndarray, codes: np.ndarray, beta: float) -> np.ndarray:
    """y = (x_q . W_q) * beta / s with an exact int32 dot product: float32[T, N]."""
    x_q, s = quantize_activations(x)
    acc = x_q.astype(np.int32) @ codes.astype(np.int32).T
    with np.errstate(divide="ignore", invalid="ignore"):  # s = 0: a row that held an inf
        return acc.astype(np.float32) / s[..., None] * np.float32(beta)
