"""The continuous-batching scheduler, driven by fake backends (no model needed)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from serve_fixtures import tokenizer_json

from bitnet158.formats.tokenizer import IncrementalDecoder, Tokenizer
from bitnet158.serve.batching import Batcher, Generation, QueueFull, SamplingParams, StopText

TOKENIZER = Tokenizer.from_json(tokenizer_json())
V = TOKENIZER.vocab_size


def successor(token: int) -> int:
    """The fake model's greedy continuation of `token`."""
    return (token * 7 + 3) % V


class FakeBackend:
    """Greedy logits pointing at successor(last token); records every call."""

    def __init__(self, num_slots: int = 2, max_context: int = 100_000, max_step_tokens=64):
        self.num_slots, self.max_context, self.max_step_tokens = (
            num_slots, max_context, max_step_tokens,
        )  # fmt: skip
        self.calls: list[tuple] = []
        self.lengths = [0] * num_slots
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on: int | None = None  # a token that makes a step raise

    def step(self, work):
        self.gate.wait(10)
        self.calls.append(("step", tuple((slot, len(tokens)) for slot, tokens in work)))
        assert len({slot for slot, _ in work}) == len(work)
        assert sum(len(t) for _, t in work) <= self.max_step_tokens
        rows = []
        for slot, tokens in work:
            if self.fail_on in tokens:
                raise RuntimeError("boom")
            self.lengths[slot] += len(tokens)
            assert self.lengths[slot] <= self.max_context
            row = np.zeros(V, np.float32)
            row[successor(tokens[-1])] = 10.0
            rows.append(row)
        return np.stack(rows)

    def release(self, slot):
        self.calls.append(("release", slot))
        self.lengths[slot] = 0


class Collector:
    """on_event target: texts and ends by choice index, and an event per finished sequence."""

    def __init__(self) -> None:
        self.text: dict[int, str] = {}
        self.ended: dict[int, threading.Event] = {}
        self.events = []

    def gen(self, prompt, max_tokens=5, index=0, stop=(), stop_ids=()):
        self.text[index] = ""
        self.ended[index] = threading.Event()
        params = SamplingParams(max_tokens=max_tokens, temperature=0, stop=stop)
        return Generation(list(prompt), params, TOKENIZER, frozenset(stop_ids), self, index=index)

    def __call__(self, event) -> None:
        self.events.append(event)
        self.text[event.seq.index] += event.text
        if event.finish_reason:
            self.ended[event.seq.index].set()

    def wait(self, index: int = 0) -> None:
        assert self.ended[index].wait(10), f"sequence {index} did not end"


def expected_tokens(prompt, count):
    out, t = [], prompt[-1]
    for _ in range(count):
        t = successor(t)
        out.append(t)
    return out


@pytest.fixture
def backend():
    return FakeBackend()


@pytest.fixture
def batcher(backend):
    b = Batcher(backend, max_waiting=4)
    yield b
    backend.gate.set()
    b.close()


def test_one_sequence_greedy(batcher):
    c = Collector()
    g = c.gen([10, 11], max_tokens=6)
    batcher.submit([g])
    c.wait()
    assert g.finish_reason == "length" and g.completion_tokens == 6
    assert c.text[0] == TOKENIZER.decode(expected_tokens([10, 11], 6), skip_special_tokens=True)
    assert batcher.active == 0 and batcher.waiting == 0


def test_sequences_share_decode_steps_and_queue_for_slots(batcher, backend):
    backend.gate.clear()  # hold the first step until all are queued
    c = Collector()
    gens = [c.gen([20 + i], max_tokens=3 + i, index=i) for i in range(3)]
    batcher.submit(gens)
    backend.gate.set()
    for i in range(3):
        c.wait(i)
    steps = [call[1] for call in backend.calls if call[0] == "step"]
    assert steps[0] == ((0, 1), (1, 1))  # both prompts prefilled in one step
    assert steps[1] == ((0, 1), (1, 1))  # then decoded together
    # the third sequence got a slot as soon as one was freed, before the other ended
    release = backend.calls.index(("release", 0))
    assert backend.calls[release + 1] == ("step", ((1, 1), (0, 1)))  # decode 1 + prefill 0
    for i, g in enumerate(gens):
        assert g.completion_tokens == 3 + i
        want = TOKENIZER.decode(expected_tokens([20 + i], 3 + i), skip_special_tokens=True)
        assert c.text[i] == want


def test_cancel_frees_the_slot_before_the_next_step(batcher, backend):
    c = Collector()
    g = c.gen([30], max_tokens=90_000)
    batcher.submit([g])
    while g.completion_tokens < 3:
        time.sleep(0.001)
    batcher.cancel(g)
    c.wait()
    assert g.finish_reason == "cancelled" and g.completion_tokens < 90_000
    assert batcher.active == 0
    assert ("release", 0) in backend.calls


def test_stop_token_and_stop_string(batcher):
    c = Collector()
    tokens = expected_tokens([40], 8)
    g1 = c.gen([40], max_tokens=50, stop_ids={tokens[3]})
    batcher.submit([g1])
    c.wait()
    assert g1.finish_reason == "stop" and g1.completion_tokens == 3
    text = TOKENIZER.decode(tokens, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    c2 = Collector()
    g2 = c2.gen([40], max_tokens=8, stop=[stop])
    batcher.submit([g2])
    c2.wait()
    assert g2.finish_reason == "stop" and c2.text[0] == text[: text.index(stop)]


def test_queue_bound(batcher, backend):
    backend.gate.clear()
    c = Collector()
    batcher.submit([c.gen([1], max_tokens=100, index=i) for i in range(2)])  # the two slots
    while batcher.active < 2:
        time.sleep(0.001)
    batcher.submit([c.gen([1], index=i) for i in range(2, 6)])  # 4 waiting: the bound
    with pytest.raises(QueueFull):
        batcher.submit([c.gen([1], index=6)])
    assert batcher.waiting == 4


def test_a_failing_step_ends_its_sequences_and_the_worker_goes_on(batcher, backend):
    c = Collector()
    backend.fail_on = successor(50)
    g = c.gen([50], max_tokens=10)
    batcher.submit([g])
    c.wait()
    assert g.finish_reason == "error" and "boom" in c.events[-1].error
    backend.fail_on = None
    c2 = Collector()
    g2 = c2.gen([60], max_tokens=4)
    batcher.submit([g2])
    c2.wait()
    assert g2.finish_reason == "length" and g2.completion_tokens == 4


def test_long_prompts_are_prefilled_in_chunks_beside_the_decodes():
    backend = FakeBackend(max_step_tokens=8)
    batcher = Batcher(backend)
    try:
        c = Collector()
        backend.gate.clear()
        short, long = c.gen([5], max_tokens=6, index=0), c.gen(list(range(3, 23)), index=1)
        batcher.submit([short, long])
        backend.gate.set()
        c.wait(0)
        c.wait(1)
        steps = [call[1] for call in backend.calls if call[0] == "step"]
        # 20 prompt tokens in chunks of what the budget leaves beside the short one's decode
        assert steps[:4] == [((0, 1), (1, 7)), ((0, 1), (1, 7)), ((0, 1), (1, 6)), ((0, 1), (1, 1))]
        assert c.text[1] == TOKENIZER.decode(expected_tokens([22], 5), skip_special_tokens=True)
    finally:
        batcher.close()


def test_context_full_ends_with_length():
    backend = FakeBackend(max_context=8)
    batcher = Batcher(backend)
    try:
        c = Collector()
        g = c.gen([1, 2, 3, 4, 5], max_tokens=100)
        batcher.submit([g])
        c.wait()
        # 5 cached, then tokens 1..3 decoded into positions 6..8: 4 tokens fit
        assert g.finish_reason == "length" and g.completion_tokens == 4
    finally:
        batcher.close()


def test_stop_text_holds_back_a_possible_stop_prefix():
    ids = TOKENIZER.encode("ROMEO: But, soft! what light", add_bos=False)
    st = StopText(IncrementalDecoder(TOKENIZER), ["soft!", "light"])
    out, stopped = "", False
    for t in ids:
        delta, stopped = st.push(t)
        out += delta
        assert "sof" not in out
        if stopped:
            break
    assert stopped and out == "ROMEO: But, "
