"""Regression tests of what fuzzing the server found (tests/fuzz, RELIABILITY.md): each request,
reduced by hand to the field that crashed, is now a 4xx answer."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from bitnet158.errors import GenerationError
from bitnet158.serve import Limits, create_app


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, limits=Limits(max_tokens=4, slots=2))) as c:
        yield c


@pytest.mark.parametrize("seed", [-1, -(2**63)])
def test_a_negative_seed_is_a_400_not_a_500(client, model, seed):
    """serve target: {"seed": -9223372036854775808} made numpy's default_rng raise ValueError
    while the request was being set up: HTTP 500."""
    for route, body in [
        ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 4, "temperature": 0.7}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ]:
        r = client.post(route, json={**body, "seed": seed})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "seed"
    ok = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "seed": 2**70})
    assert ok.status_code == 200, ok.text  # any non-negative integer seeds numpy
    with pytest.raises(GenerationError, match="seed must be an integer >= 0"):
        model.generate("ROMEO:", max_new_tokens=1, seed=seed)


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45])
def test_a_tiny_temperature_is_greedy_not_a_500(client, model, temperature):
    """serve target: {"temperature": 1e-300} was 0 in float32, the sampling distribution NaN,
    the sampled id past the vocabulary, and the request a 500 "generation failed"."""
    body = {"prompt": "ROMEO:", "max_tokens": 4, "temperature": temperature, "top_p": 0.9}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    greedy = model.generate("ROMEO:", max_new_tokens=4, temperature=0)
    assert r.json()["choices"][0]["text"] == greedy
    assert model.generate("ROMEO:", max_new_tokens=4, temperature=temperature, seed=1) == greedy


@pytest.mark.parametrize("penalty", [1e-300, 1e-40, 1e300])
def test_an_extreme_repetition_penalty_is_not_a_500(client, model, penalty):
    """serve target: {"prompt": [[5], [1]], "repetition_penalty": 1e-300}: a positive logit
    divided by it was +inf, inf - inf made the sampling distribution NaN: HTTP 500."""
    body = {"prompt": [[5], [1]], "max_tokens": 3, "repetition_penalty": penalty, "seed": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert [c["finish_reason"] in ("length", "stop") for c in r.json()["choices"]] == [True] * 2
    for temperature in (0, 1.0):
        text = model.generate([5], max_new_tokens=3, temperature=temperature,
                              repetition_penalty=penalty, seed=0)  # fmt: skip
        assert isinstance(text, str)
