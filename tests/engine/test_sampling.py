"""Sampling against hand-computed distributions and transformers' logits processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitnet158.engine.sampling import check_params, probabilities, repetition_penalty, sample
from bitnet158.errors import GenerationError

P = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = np.log(P).astype(np.float32)  # softmax(LOGITS) == P


def test_greedy_is_argmax():
    logits = np.array([0.1, 2.0, -1.0, 1.9], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert all(sample(logits, rng, temperature=0) == 1 for _ in range(5))


def test_temperature_scales_logits():
    np.testing.assert_allclose(probabilities(LOGITS, 1.0), P, rtol=1e-6)
    want = P**2 / (P**2).sum()  # T = 0.5 squares the probabilities
    np.testing.assert_allclose(probabilities(LOGITS, 0.5), want, rtol=1e-6)


def test_top_k_keeps_the_k_most_likely():
    np.testing.assert_allclose(probabilities(LOGITS, 1.0, top_k=2), [0.625, 0.375, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(probabilities(LOGITS, 1.0, top_k=10), P, rtol=1e-6)


@pytest.mark.parametrize(
    "top_p,want",
    [
        (0.4, [1, 0, 0, 0]),
        (0.7, [0.625, 0.375, 0, 0]),
        (0.9, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
        (1.0, P),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, want):
    np.testing.assert_allclose(probabilities(LOGITS, 1.0, top_p=top_p), want, rtol=1e-6)


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = np.array([2.0, -1.0, 0.5, -3.0], dtype=np.float32)
    out = repetition_penalty(logits, [0, 1, 1], 2.0)
    np.testing.assert_array_equal(out, [1.0, -2.0, 0.5, -3.0])
    np.testing.assert_array_equal(logits, [2.0, -1.0, 0.5, -3.0])  # input untouched


def test_agrees_with_transformers_processors():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50).astype(np.float32) * 3
    previous = [3, 7, 7, 20]
    ids = torch.tensor([previous])
    scores = torch.from_numpy(logits.copy())[None]
    scores = RepetitionPenaltyLogitsProcessor(1.3)(ids, scores)
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        scores = warper(ids, scores)
    want = torch.softmax(scores.double(), -1)[0].numpy()
    ours = probabilities(repetition_penalty(logits, previous, 1.3), 0.7, top_k=10, top_p=0.8)
    np.testing.assert_allclose(ours, want, atol=1e-6)


def test_sample_frequencies_follow_the_distribution():
    rng = np.random.default_rng(1)
    draws = [sample(LOGITS, rng, temperature=1.0, top_k=3) for _ in range(6000)]
    freq = np.bincount(draws, minlength=4) / len(draws)
    want = np.array([0.5, 0.3, 0.15, 0]) / 0.95
    assert freq[3] == 0
    np.testing.assert_allclose(freq, want, atol=0.025)


def test_seeded_sampling_is_reproducible():
    logits = np.random.default_rng(0).standard_normal(100).astype(np.float32)

    def draws(seed):
        rng = np.random.default_rng(seed)
        return [sample(logits, rng, temperature=1.0, top_p=0.9) for _ in range(20)]

    assert draws(5) == draws(5)
    assert draws(5) != draws(6)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1),
        dict(temperature=float("nan")),
        dict(top_k=0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(penalty=0.0),
    ],
)
def test_bad_parameters_are_rejected(kwargs):
    params = dict(temperature=1.0, top_k=None, top_p=None, penalty=1.0) | kwargs
    with pytest.raises(GenerationError):
        check_params(**params)


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])  # flat, a 128k vocabulary's usual, peaked
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_on_a_large_vocabulary_matches_a_full_sort(scale, top_p):
    """The nucleus sorts only a head of the distribution: the kept set and its probabilities
    must be those of a stable descending sort of all 128256 ids (ties by lower id first)."""
    rng = np.random.default_rng(int(scale * 10) + int(top_p * 1000))
    logits = (rng.standard_normal(128256) * scale).astype(np.float32)
    logits[::3] = np.round(logits[::3])  # many exact ties
    p = probabilities(logits, 0.7)  # temperature only: the reference starts from it
    order = np.argsort(-p, kind="stable")
    mass_before = np.cumsum(p[order]) - p[order]
    want = p.copy()
    want[order[mass_before >= top_p]] = 0.0
    want /= want.sum()
    np.testing.assert_array_equal(probabilities(logits, 0.7, top_p=top_p), want)
