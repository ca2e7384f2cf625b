"""Edge cases of prompts and models over HTTP: empty prompts, prompts at and beyond the context,
oversize bodies, a model whose logits are NaN. Each gets a defined answer: the library's text,
or a 4xx (5xx for the broken model) with an OpenAI error object, and the server keeps serving."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from serve_fixtures import ServerThread, random_model

import bitnet158
from bitnet158.formats.convert import read_checkpoint
from bitnet158.formats.native import save_native
from bitnet158.serve import create_app


@pytest.fixture(scope="module")
def shipped():
    """The shipped model (no BOS token, context 1024) on a server with the default limits."""
    model = bitnet158.load(threads=1)
    with ServerThread(create_app(model)) as srv:
        yield srv, model


def completion(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_empty_prompt_without_a_bos_token_is_a_400(shipped):
    srv, model = shipped
    assert model.tokenizer.encode("") == []
    error = error_of(completion(srv.url, prompt=""), 400)
    assert error["param"] == "prompt" and "empty" in error["message"]


def test_empty_prompt_with_a_bos_token_continues_the_bos(server, model):
    r = completion(server.url, prompt="", max_tokens=6, temperature=0)
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == model.generate("", max_new_tokens=6, temperature=0)
    assert r.json()["usage"]["prompt_tokens"] == 1  # the BOS token alone


def test_prompts_at_and_beyond_the_context(shipped):
    srv, model = shipped
    context = model.max_context
    long_text = "ROMEO: But, soft! what light through yonder window breaks? " * 400
    assert len(model.tokenizer.encode(long_text)) > 4 * context
    error = error_of(completion(srv.url, prompt=long_text), 400)
    assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")
    assert f"context is {context} tokens" in error["message"]
    chat = [{"role": "user", "content": long_text}]
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": chat}, timeout=60)
    assert error_of(r, 400)["code"] == "context_length_exceeded"
    ids = np.random.default_rng(0).integers(10, 4000, context + 1).tolist()
    assert error_of(completion(srv.url, prompt=ids), 400)["code"] == "context_length_exceeded"
    # exactly the context: one token fits, as the library generates it
    r = completion(srv.url, prompt=ids[:context], max_tokens=16, temperature=0)
    assert r.status_code == 200, r.text
    want = model.generate(ids[:context], max_new_tokens=16, temperature=0)
    assert model.last_stats.new_tokens == 1
    assert r.json()["choices"][0]["text"] == want and r.json()["usage"]["completion_tokens"] == 1


def test_a_body_over_the_limit_is_a_413(shipped):
    srv, _ = shipped
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x" * (2 << 20)}, timeout=60)
    assert error_of(r, 413)["code"] == "body_too_large"
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"


def test_a_model_with_nan_weights_fails_its_requests_not_the_server(tmp_path):
    path = random_model(tmp_path / "good.safetensors")
    ckpt = read_checkpoint(path)
    tensors = dict(ckpt.tensors)
    tensors["embed.weight"] = np.array(tensors["embed.weight"])
    tensors["embed.weight"][9, 3] = np.nan  # tied: a NaN logit at every position
    bad = save_native(tmp_path / "nan.safetensors", ckpt.config, tensors, ckpt.tokenizer_json,
                      ckpt.chat_template)  # fmt: skip
    with ServerThread(create_app(bitnet158.load(bad, threads=1))) as srv:
        r = completion(srv.url, prompt="ROMEO:", max_tokens=4)
        error = error_of(r, 500)
        assert error["type"] == "server_error" and "non-finite logits" in error["message"]
        body = {"prompt": "ROMEO:", "max_tokens": 4, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body) as s:
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert "non-finite logits" in lines[-2] and lines[-1] == "data: [DONE]"
        health = httpx.get(srv.url + "/health").json()
        assert health["status"] == "ok" and health["active_sequences"] == 0
