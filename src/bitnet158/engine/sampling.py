"""Next-token sampling: repetition penalty, temperature, top-k, top-p, in that order.

The order and the formulas follow transformers' logits processors, so the same settings mean
the same thing here and there.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..errors import GenerationError


def check_params(
    temperature: float, top_k: int | None, top_p: float | None, penalty: float
) -> None:
    """Raise GenerationError for settings that have no meaning."""
    if not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise GenerationError(f"top_k must be a positive integer or None, got {top_k}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
    if not isinstance(penalty, (int, float)) or not penalty > 0:
        raise GenerationError(f"repetition_penalty must be > 0 (1 = none), got {penalty}")


def repetition_penalty(logits: np.ndarray, previous: Iterable[int], penalty: float) -> np.ndarray:
    """Penalize tokens already seen: positive logits divided by `penalty`, negative multiplied."""
    ids = np.unique(np.fromiter(previous, dtype=np.int64))
    if penalty == 1.0 or ids.size == 0:
        return logits
    logits = logits.copy()
    seen = logits[ids]
    with np.errstate(all="ignore"):  # 1e-300 is 0 in float32: x / 0 = inf, clipped below
        penalized = np.where(seen > 0, seen / penalty, seen * penalty)
    # A tiny penalty (1e-300) overflows a positive logit to +inf, and inf - inf made the
    # sampling distribution NaN (found by fuzzing the server): keep +-inf out, at float32's max.
    big = float(np.finfo(np.float32).max)  # probabilities() works in float32
    logits[ids] = np.clip(penalized, -big, big)
    return logits


def probabilities(
    logits: np.ndarray, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> np.ndarray:
    """Sampling distribution float64[V] after temperature, top-k and top-p (temperature > 0)."""
    # exp in float32 (SIMD in numpy; float64's took 1.3 ms per 128k-token vocabulary), the
    # normalization and the sums in float64. (logits - max) / temperature, as a product by
    # 1/temperature capped at float32's range: a tiny temperature (1e-300) is 0 in float32 and
    # made the distribution NaN (found by fuzzing the server). With the max subtracted first,
    # the scaled values are <= 0 (the max exactly 0) and overflow only to -inf, probability 0:
    # such a temperature is greedy, as it should be.
    x = np.asarray(logits, dtype=np.float32)
    scale = np.float32(min(1.0 / temperature, float(np.finfo(np.float32).max)))
    with np.errstate(over="ignore"):
        z = (x - x.max()) * scale
    if top_k is not None and top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z[z < kth] = -np.inf
    p = np.exp(z).astype(np.float64)  # z.max() is 0: no second shift
    p /= p.sum()
    if top_p is not None and top_p < 1.0:
        kept = np.zeros_like(p)
        nucleus = _nucleus(p, top_p)
        kept[nucleus] = p[nucleus]
        p = kept / kept.sum()
    return p


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """Ids of the smallest most likely set of `p` whose mass reaches top_p.

    The same set as a stable descending sort of the whole vocabulary followed by a cumulative
    sum (ties by lower id first), but only a head of that order is sorted: the ids with p at
    least a floor, the floor lowered 10x until the set is inside the head (a 128k-token
    vocabulary's full sort took 20 ms per token; a peaked distribution needs one small head).
    """
    for floor in (1e-3, 1e-4, 1e-5, 1e-6, 0.0):
        head = np.flatnonzero(p >= floor) if floor else np.arange(p.size)
        if floor and p[head].sum() < top_p * (1 - 1e-9):
            continue  # cannot hold the nucleus: skip the sort
        head = head[np.argsort(-p[head], kind="stable")]
        mass_before = np.cumsum(p[head]) - p[head]
        removed = mass_before >= top_p
        if not floor or removed[-1]:  # ids past the head have even more mass before them
            return head[~removed]
    raise AssertionError("unreachable: the last floor takes every id")


def sample(
    logits: np.ndarray,
    rng: np.random.Generator,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    penalty: float = 1.0,
    previous: Iterable[int] = (),
) -> int:
    """Pick the next token id from logits float32[V]; temperature 0 is greedy.

    Logits that are NaN or infinite (a model with corrupt weights, an overflow) are an error,
    not a token: argmax would pick the first NaN and the sampling distribution would be NaN.
    """
    bad = logits.size - np.count_nonzero(np.isfinite(logits))
    if bad:
        raise GenerationError(
            f"the model produced {bad} non-finite logits (NaN or inf) of {logits.size}: its "
            "weights are probably corrupt"
        )
    logits = repetition_penalty(logits, previous, penalty)
    if temperature == 0:
        return int(np.argmax(logits))
    cdf = np.cumsum(probabilities(logits, temperature, top_k, top_p))
    return int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
