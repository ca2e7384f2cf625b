"""formats/tokenizer.py against tokenizers and transformers' PreTrainedTokenizerFast."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from bitnet158.errors import FormatError, GenerationError
from bitnet158.formats.tokenizer import BITNET_CHAT_TEMPLATE, Tokenizer

SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld, ça va? naïve café",
    "日本語のテキスト 😀 emoji and 中文",
    "User: hi Assistant: hello System: be brief",
] * 20
TEXTS = ["hello world", "  two  spaces\nnew line\t", "héllo wörld 日本語 😀👍", "", "naïve café ça"]


@pytest.fixture(scope="module")
def byte_bpe() -> HFTokenizer:
    """A Llama-3-like byte-level BPE, small enough that CJK characters and emoji span tokens."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return tok


@pytest.fixture(scope="module")
def byte_fallback() -> HFTokenizer:
    """A Llama-2-like tokenizer: ▁ for spaces, <0xNN> byte fallback, a decoder that strips the
    first leading space (what makes streaming need context)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for ch in "▁abcdefghijklmnopqrstuvwxyzé":
        vocab[ch] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def _fast(backend: HFTokenizer, template: str | None = None):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )
    fast.chat_template = template
    return fast


def test_round_trip_and_bos(byte_bpe):
    tok = Tokenizer.from_json(byte_bpe.to_str())
    fast = _fast(byte_bpe)
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|eot_id|>"
    for text in TEXTS:
        ids = tok.encode(text, add_bos=False)
        assert tok.decode(ids) == text
        with_bos = tok.encode(text)
        assert with_bos == [tok.bos_token_id, *ids]
        assert with_bos == fast.encode(text)  # transformers' post-processor adds the same BOS
    assert tok.encode("<|begin_of_text|>hi") == tok.encode("hi")  # never two BOS
    assert tok.decode(tok.encode("hi"), skip_special_tokens=True) == "hi"
    assert tok.vocab_size == byte_bpe.get_vocab_size() and tok.get_vocab()["<|eot_id|>"] == 2


LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
STRICT_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}{%- set messages = messages[1:] %}
{%- endif %}
{{ bos_token }}{% if system is defined %}[SYS]{{ system | tojson }}[/SYS]{% endif %}
{% for m in messages %}
    {% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant') }}
    {% endif %}
    {% if m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% continue %}{% endif %}
    [INST] {{ m['content'] }} [/INST]
{% endfor %}
{% if add_generation_prompt %}>>> {% endif %}"""
MESSAGES = [
    {"role": "system", "content": 'Be brief. "Quotes" & <tags> stay.'},
    {"role": "user", "content": "Hi there  "},
    {"role": "assistant", "content": "Hello! 😀"},
    {"role": "user", "content": "日本語で?"},
]


@pytest.mark.parametrize("template", [LLAMA3_TEMPLATE, STRICT_TEMPLATE, BITNET_CHAT_TEMPLATE])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(byte_bpe, template, add_generation_prompt):
    tok = Tokenizer.from_json(byte_bpe.to_str(), template)
    expected = _fast(byte_bpe, template).apply_chat_template(
        MESSAGES,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        eot_token="<|eot_id|>",
    )
    assert (
        tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt) == expected
    )


def test_template_errors(byte_bpe):
    tok = Tokenizer.from_json(byte_bpe.to_str(), STRICT_TEMPLATE)
    with pytest.raises(GenerationError, match="roles must alternate"):
        tok.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        )
    with pytest.raises(FormatError, match="chat template line 1"):
        Tokenizer.from_json(byte_bpe.to_str(), "{% for %}").apply_chat_template(MESSAGES)


def test_sandbox_blocks_attribute_escapes(byte_bpe):
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(GenerationError, match="unsafe|not safely callable|access"):
        Tokenizer.from_json(byte_bpe.to_str(), evil).apply_chat_template(MESSAGES)


def test_bitnet_2b4t_fallback_format(byte_bpe):
    tok = Tokenizer.from_json(byte_bpe.to_str())  # no chat template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages) == (
        "<|begin_of_text|>System: Be brief.<|eot_id|>User: Hi<|eot_id|>Assistant: "
    )
    assert (
        tok.apply_chat_template(
            [*messages, {"role": "assistant", "content": "Hello."}], add_generation_prompt=False
        )
        == "<|begin_of_text|>System: Be brief.<|eot_id|>User: Hi<|eot_id|>Assistant: Hello.<|eot_id|>"
    )


def test_from_directory_reads_configs(tmp_path, byte_bpe):
    byte_bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<|begin_of_text|>", "special": True},
                "eos_token": "<|end_of_text|>",
                "chat_template": [{"name": "default", "template": LLAMA3_TEMPLATE}],
            }
        )
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    tok = Tokenizer.from_file(tmp_path)
    assert (tok.bos_token, tok.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert tok.eos_token_ids == [1, 2] and tok.chat_template == LLAMA3_TEMPLATE
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").eos_token == "<|end_of_text|>"
    with pytest.raises(FormatError, match="no such file"):
        Tokenizer.from_file(tmp_path / "missing")
    with pytest.raises(FormatError, match="cannot load"):
        Tokenizer.from_json("{}")


def _stream_checks(tok: Tokenizer, text: str) -> list[str]:
    ids = tok.encode(text, add_bos=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "no token splits a character"
    deltas = list(tok.stream(ids))
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    return deltas


def test_stream_never_splits_a_character(byte_bpe):
    tok = Tokenizer.from_json(byte_bpe.to_str())
    deltas = _stream_checks(tok, "héllo 日本語のテキスト 😀👍 done")
    assert len(deltas) > 3


def test_stream_with_byte_fallback_and_leading_space(byte_fallback):
    tok = Tokenizer.from_json(byte_fallback.to_str())
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    deltas = _stream_checks(tok, "héllo wörld 日本 ok")
    assert deltas[:6] == ["h", "é", "l", "l", "o", " "]  # first space stripped, later ones kept
