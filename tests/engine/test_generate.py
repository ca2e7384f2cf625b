"""Generation through the public API: sampling, stop strings, streaming, chat, errors."""

from __future__ import annotations

import pytest
from engine_fixtures import TOKENIZER_JSON

import bitnet158
from bitnet158.engine.generate import stream_text
from bitnet158.errors import FormatError, GenerationError
from bitnet158.formats.tokenizer import IncrementalDecoder, Tokenizer

PROMPT = "ROMEO: But, soft!"


@pytest.fixture(scope="module")
def model(tiny_path):
    return bitnet158.load(tiny_path, threads=1)


def test_greedy_follows_the_logits(model):
    ids = model.tokenizer.encode(PROMPT)
    out = model.generate(ids, max_new_tokens=6, temperature=0)
    seq = list(ids)
    for _ in range(6):
        seq.append(int(model.logits(seq)[-1].argmax()))
    assert out == model.tokenizer.decode(seq[len(ids) :], skip_special_tokens=True)
    assert model.generate(PROMPT, max_new_tokens=6, temperature=0) == out


def test_seed_reproducibility(model):
    kwargs = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95)
    a = model.generate(PROMPT, seed=7, **kwargs)
    assert model.generate(PROMPT, seed=7, **kwargs) == a
    assert any(model.generate(PROMPT, seed=s, **kwargs) != a for s in (8, 9, 10))


def test_stream_concatenates_to_the_same_text(model):
    kwargs = dict(max_new_tokens=16, temperature=1.0, seed=3)
    deltas = list(model.generate(PROMPT, stream=True, **kwargs))
    assert all(isinstance(d, str) and d for d in deltas)
    assert "".join(deltas) == model.generate(PROMPT, **kwargs)


def test_stop_string_truncates_before_it(model):
    kwargs = dict(max_new_tokens=20, temperature=1.0, seed=1)
    full = model.generate(PROMPT, **kwargs)
    stop = full[6:9]
    want = full[: full.find(stop)]
    assert len(stop) == 3 and len(want) < len(full)
    assert model.generate(PROMPT, stop=stop, **kwargs) == want
    assert model.last_stats.finish_reason == "stop"
    streamed = list(model.generate(PROMPT, stop=["zzzz-never", stop], stream=True, **kwargs))
    assert "".join(streamed) == want


class _PieceTokenizer:
    """Token i decodes to PIECES[i]: stop-string logic without a real model."""

    PIECES = ["Hel", "lo", " Wo", "rld", "!", " Bye"]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.PIECES[i] for i in ids)


@pytest.mark.parametrize(
    "stop,want",
    [
        ("lo W", "Hel"),  # spans three tokens
        ("!", "Hello World"),
        ("ld! B", "Hello Wor"),
        ("xyz", "Hello World! Bye"),
        ("Bye!", "Hello World! Bye"),  # a possible beginning at the very end
    ],
)
def test_stream_text_holds_back_possible_stop_strings(stop, want):
    decoder = IncrementalDecoder(_PieceTokenizer())
    deltas = list(stream_text(iter(range(6)), decoder, [stop]))
    assert "".join(deltas) == want


def test_eos_ends_generation(model):
    first = int(model.logits(model.tokenizer.encode(PROMPT))[-1].argmax())
    model.eos_ids.add(first)
    try:
        assert model.generate(PROMPT, temperature=0, max_new_tokens=5) == ""
        assert model.last_stats.finish_reason == "stop" and model.last_stats.new_tokens == 0
    finally:
        model.eos_ids.discard(first)


def test_chat_uses_the_template_and_stops_at_end_of_turn(model):
    messages = [{"role": "user", "content": "Hello"}]
    prompt = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "<|user|>Hello<|eot_id|><|assistant|>"
    ids = model.tokenizer.encode(prompt, add_bos=False)
    assert model.chat(messages, temperature=0, max_new_tokens=5) == model.generate(
        ids, temperature=0, max_new_tokens=5
    )
    eot = model.tokenizer.token_to_id("<|eot_id|>")
    assert eot in model.end_of_turn_ids


def test_stats_are_recorded(model):
    model.generate(PROMPT, max_new_tokens=8, temperature=0)
    s = model.last_stats
    assert s.prompt_tokens == len(model.tokenizer.encode(PROMPT))
    assert s.new_tokens == 8 and s.finish_reason == "length" and s.decode_steps == 7
    assert s.prefill_seconds > 0 and s.tokens_per_second > 0


def test_generation_ends_when_the_context_is_full(tiny_path):
    model = bitnet158.load(tiny_path, max_context=10)
    ids = list(range(3, 9))
    model.generate(ids, max_new_tokens=50, temperature=0)
    assert model.last_stats.finish_reason == "context"
    assert model.last_stats.new_tokens == 5  # 6 prompt + 4 decoded fill 10; the 5th is sampled
    with pytest.raises(GenerationError, match="context length"):
        model.generate(list(range(3, 14)), max_new_tokens=1)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_p=1.2),
        dict(top_k=0),
        dict(max_new_tokens=-1),
        dict(repetition_penalty=0.0),
    ],
)
def test_bad_parameters_raise(model, kwargs):
    with pytest.raises(GenerationError):
        model.generate(PROMPT, **kwargs)
    with pytest.raises(GenerationError):  # checked at the call, not on first iteration
        model.generate(PROMPT, stream=True, **kwargs)


def test_bad_inputs_raise(model, tmp_path):
    assert model.generate(PROMPT, max_new_tokens=0) == ""
    with pytest.raises(GenerationError, match="vocabulary"):
        model.generate([1, 10**6])
    with pytest.raises(GenerationError, match="empty"):
        model.generate([])
    with pytest.raises(FormatError, match="no such file"):
        bitnet158.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.txt").write_text("hello")
    with pytest.raises(FormatError):
        bitnet158.load(tmp_path / "junk.txt")
    assert Tokenizer.from_json(TOKENIZER_JSON).decode([]) == ""
