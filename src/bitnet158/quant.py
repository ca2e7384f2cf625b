"""BitNet b1.58 numerics in numpy: absmean ternary weights and per-token absmax int8 activations.

The torch twins live in `bitnet158.nn.bitlinear` and agree with these bit for bit
(tests/test_quant.py). Both follow the reference code of the "Training Tips" PDF as used by
1bitLLM, OLMo-Bitnet and transformers: a scale `s = 1 / max(mean|W|, 1e-5)` multiplied in,
round-half-to-even (np.round / torch.round), then clip.
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
    beta = weight_scale(w) if scale is None else np.float32(scale)
    inv = np.float32(1.0) / beta
    codes = np.clip(np.round(np.asarray(w, dtype=np.float32) * inv), -1, 1)
    return codes.astype(np.int8), beta


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token (per-row) absmax int8: x_q int8[T, K] and s float32[T] with x ~ x_q / s."""
    x = np.asarray(x, dtype=np.float32)
    amax = np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(EPS))
    # torch evaluates `127 / amax` as reciprocal(amax) * 127; every reference implementation is
    # torch code, so do the same (a true division differs in the last bit for some amax).
    s = (np.float32(1.0) / amax) * np.float32(127.0)
    x_q = np.clip(np.round(x * s), -128, 127).astype(np.int8)
    return x_q, s[..., 0]


def ternary_linear_reference(x: np.ndarray, codes: np.ndarray, beta: float) -> np.ndarray:
    """y = (x_q . W_q) * beta / s with an exact int32 dot product: float32[T, N]."""
    x_q, s = quantize_activations(x)
    acc = x_q.astype(np.int32) @ codes.astype(np.int32).T
    return acc.astype(np.float32) / s[..., None] * np.float32(beta)
