"""The server through the official `openai` client and raw HTTP, on a real loopback server."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serve_fixtures import ServerThread, SlowBackend

from bitnet158.serve import create_app

MESSAGES = [{"role": "user", "content": "Wherefore art thou?"}]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def sse(response: httpx.Response) -> list:
    """The data payloads of an SSE response ("[DONE]" kept as a string)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_models_list(client, model_path):
    models = client.models.list().data
    assert [m.id for m in models] == [model_path.stem]
    assert client.models.retrieve(model_path.stem).id == model_path.stem


def test_completion_is_the_library_generation(client, model, model_path):
    for temperature, seed in ((0.0, None), (0.9, 7)):
        result = client.completions.create(
            model=model_path.stem, prompt="ROMEO:", max_tokens=12, temperature=temperature,
            seed=seed,
        )  # fmt: skip
        want = model.generate("ROMEO:", max_new_tokens=12, temperature=temperature, seed=seed)
        choice = result.choices[0]
        assert choice.text == want
        assert choice.finish_reason == model.last_stats.finish_reason
        assert result.usage.prompt_tokens == model.last_stats.prompt_tokens
        assert result.usage.completion_tokens == model.last_stats.new_tokens
        assert (
            result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
        )


def test_streamed_chat(client, model, model_path):
    stream = client.chat.completions.create(
        model=model_path.stem, messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == model.chat(MESSAGES, max_new_tokens=10, temperature=0)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    assert chunks[-1].usage.completion_tokens == model.last_stats.new_tokens


def test_chat_n_choices_and_stop(client, model_path):
    reply = client.chat.completions.create(
        model=model_path.stem, messages=MESSAGES, max_tokens=8, temperature=1.0, seed=3, n=3
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1  # each choice samples its own
    assert 0 < reply.usage.completion_tokens <= 3 * 8
    full = client.completions.create(model=model_path.stem, prompt="JULIET:", max_tokens=12,
                                     temperature=0).choices[0].text  # fmt: skip
    stop = full[4:6]
    cut = client.completions.create(model=model_path.stem, prompt="JULIET:", max_tokens=12,
                                    temperature=0, stop=[stop]).choices[0]  # fmt: skip
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_error_cases_through_the_client(client, model_path):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="x")
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=model_path.stem, prompt="x", max_tokens=10**6)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model_path.stem, prompt="ROMEO " * 400)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(
            model=model_path.stem, messages=[{"role": "wizard", "content": "hi"}]
        )


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"prompt": 5}', 400, "prompt"),
        (b'{"prompt": "x", "temperature": "hot"}', 400, "temperature"),
        (b'{"prompt": "x", "max_tokens": true}', 400, "max_tokens"),
        (b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),  # no empty completions
        (b'{"prompt": "x", "top_p": 0}', 400, "top_p"),
        (b'{"prompt": "x", "n": 5}', 400, "n"),
        (b'{"prompt": [1, 999999]}', 400, "prompt"),
        (b'{"prompt": "x", "logprobs": 3}', 400, "logprobs"),
        (b'{"prompt": "x", "echo": true}', 400, "echo"),
        (b'{"prompt": [], "max_tokens": 3}', 400, "prompt"),
        (
            b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l",'
            b' "m", "n", "o", "p", "q"]}',
            400,
            "stop",
        ),
        (b'{"max_tokens": 3}', 400, "prompt"),
    ],
)
def test_bad_completion_bodies(server, body, status, param):
    r = httpx.post(server.url + "/v1/completions", content=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_bad_chat_bodies_and_routes(server):
    url = server.url
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user"}] * 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": 1, "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
    # an unknown role and a non-text part are found by checks of the whole body: still named
    two = [{"role": "user", "content": "x"}, {"role": "wizard", "content": "x"}]
    r = httpx.post(url + "/v1/chat/completions", json={"messages": two})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].role"
    assert "'wizard' is not one of" in r.json()["error"]["message"]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    r = httpx.post(url + "/v1/chat/completions", json={"messages": image})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_body_size_limit(server):
    big = json.dumps({"prompt": "x" * (100 << 10)}).encode()
    r = httpx.post(server.url + "/v1/completions", content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    r = httpx.post(server.url + "/v1/completions", content=chunks())
    assert r.status_code == 413
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_health_and_metrics(server, client, model_path):
    client.completions.create(model=model_path.stem, prompt="ROMEO:", max_tokens=3)
    health = httpx.get(server.url + "/health").json()
    assert health == {"status": "ok", "model": model_path.stem, "active_sequences": 0,
                      "queue_depth": 0}  # fmt: skip
    text = httpx.get(server.url + "/metrics").text
    for name in ("requests_total", "request_duration_seconds", "time_to_first_token_seconds",
                 "prompt_tokens_total", "completion_tokens_total", "queue_depth"):  # fmt: skip
        assert f"# TYPE bitnet158_{name} " in text
    assert 'bitnet158_requests_total{path="/v1/completions",status="200"}' in text
    assert metric(server.url, "bitnet158_completion_tokens_total") >= 3


def test_concurrent_requests_are_batched_and_match_one_at_a_time(slow_server, model):
    server = slow_server  # 2 slots, 1 waiting, 20 ms a step: the requests overlap
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    prompts = ["ROMEO:", "JULIET:", "It is the east"]
    steps = metric(server.url, "bitnet158_decode_steps_total")
    sequences = metric(server.url, "bitnet158_decode_step_sequences_total")

    def one(prompt):
        reply = client.completions.create(prompt=prompt, model="tiny-serve", max_tokens=40,
                                          temperature=0)  # fmt: skip
        return reply.choices[0].text

    with ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(one, prompts))
    assert texts == [model.generate(p, max_new_tokens=40, temperature=0) for p in prompts]
    steps = metric(server.url, "bitnet158_decode_steps_total") - steps
    sequences = metric(server.url, "bitnet158_decode_step_sequences_total") - sequences
    assert sequences / steps > 1.3  # most steps decoded two sequences


def test_disconnect_frees_the_slot(slow_server):
    url = slow_server.url
    body = {"prompt": "ROMEO:", "max_tokens": 200, "stream": True, "temperature": 0}
    with httpx.stream("POST", url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        assert httpx.get(url + "/health").json()["active_sequences"] == 1
    # 200 tokens at 20 ms a step would take 4 s; the slot must be free well before
    deadline = time.monotonic() + 1.0
    while httpx.get(url + "/health").json()["active_sequences"]:
        assert time.monotonic() < deadline, "the slot of a closed stream is still in use"
        time.sleep(0.02)


def test_queue_bound_answers_429(slow_server):
    url = slow_server.url
    body = {"prompt": "ROMEO:", "max_tokens": 150, "stream": True, "temperature": 0}
    with httpx.Client(timeout=30) as http:
        streams = []

        def open_stream(wait_for: str, value: int):
            streams.append(http.stream("POST", url + "/v1/completions", json=body))
            assert streams[-1].__enter__().status_code == 200
            deadline = time.monotonic() + 5
            while http.get(url + "/health").json()[wait_for] != value:
                assert time.monotonic() < deadline
                time.sleep(0.01)

        try:
            open_stream("active_sequences", 1)
            open_stream("active_sequences", 2)  # both slots busy
            open_stream("queue_depth", 1)  # the queue is at its bound of 1
            r = http.post(url + "/v1/completions", json={"prompt": "x"})
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model="tiny-serve", prompt="x")
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    assert httpx.get(url + "/health").json()["status"] == "ok"


class FailingBackend(SlowBackend):
    """A step raises while `failing` is set: the fault of an engine, not of a request."""

    failing = True

    def step(self, work):
        if self.failing:
            raise RuntimeError("engine fault")
        return super().step(work)


def test_an_engine_fault_fails_its_requests_not_the_server(model):
    backend = FailingBackend(model.engine, 2, model.max_context, pause=0)
    with ServerThread(create_app(model, backend=backend)) as srv:
        body = {"prompt": "ROMEO:", "max_tokens": 5}
        r = httpx.post(srv.url + "/v1/completions", json=body)
        assert r.status_code == 500 and "engine fault" in r.json()["error"]["message"]
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}) as r:
            events = sse(r)
        assert "engine fault" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
        backend.failing = False
        # Seeded, so the reply (which may end at an end-of-sequence token) is model.generate's.
        r = httpx.post(srv.url + "/v1/completions", json={**body, "seed": 0})
        expected = model.generate("ROMEO:", max_new_tokens=5, temperature=1.0, seed=0)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
        assert r.json()["usage"]["completion_tokens"] == model.last_stats.new_tokens
