"""SFT: assistant-only targets, summed loss, packing that does not change the loss, bad data."""

import pytest
import torch
import torch.nn.functional as F
from train_fixtures import TOKENIZER_JSON, tiny_config

from bitnet158.errors import FormatError
from bitnet158.formats.tokenizer import Tokenizer
from bitnet158.nn.model import Transformer
from bitnet158.train.loop import TrainConfig
from bitnet158.train.sft import IGNORE, SFTTask, build_sft_dataset, encode_chat, sft

# Every piece of a turn is delimited by special tokens, so a conversation's tokens are exactly
# the concatenation of its pieces' tokens: an independent way to know which are the reply's.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}<|eot_id|>{{ m['content'] }}"
    "<|end_of_text|>{% endfor %}{% if add_generation_prompt %}assistant<|eot_id|>{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris is the capital of France."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Who?"},
     {"role": "assistant", "content": "ROMEO: But, soft!"}],
    [{"role": "user", "content": "It is the east"},
     {"role": "assistant", "content": "and Juliet is the sun."}],
]  # fmt: skip


@pytest.fixture
def tok() -> Tokenizer:
    return Tokenizer.from_json(TOKENIZER_JSON, TEMPLATE, bos_token="<|begin_of_text|>",
                               eos_token="<|end_of_text|>")  # fmt: skip


def piecewise(tok: Tokenizer, messages) -> tuple[list[int], list[bool]]:
    ids, mask = [tok.bos_token_id], [False]
    special = {"eot": tok.token_to_id("<|eot_id|>"), "end": tok.token_to_id("<|end_of_text|>")}
    for m in messages:
        role = tok.encode(m["role"], add_bos=False)
        content = tok.encode(m["content"], add_bos=False)
        train = m["role"] == "assistant"
        ids += role + [special["eot"]] + content + [special["end"]]
        mask += [False] * (len(role) + 1) + [train] * (len(content) + 1)
    return ids, mask


def test_targets_are_exactly_the_assistant_replies(tok):
    for messages in CONVERSATIONS:
        assert encode_chat(tok, messages) == piecewise(tok, messages)


def test_default_template_marks_the_reply_and_its_end_of_turn(tokenizer):
    ids, mask = encode_chat(tokenizer, CONVERSATIONS[0])
    reply = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert reply.strip() == "Paris is the capital of France.<|eot_id|>"


def per_example_sum(model, tok, messages) -> torch.Tensor:
    ids, mask = piecewise(tok, messages)
    x = torch.tensor([ids[:-1]])
    y = torch.tensor([t if m else IGNORE for t, m in zip(ids[1:], mask[1:], strict=True)])
    return F.cross_entropy(model(x)[0], y, ignore_index=IGNORE, reduction="sum")


def test_packed_loss_is_the_sum_over_examples_of_their_own_losses(tok):
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    rows, stats = build_sft_dataset(tok, CONVERSATIONS, seq_len=128, packing=True)
    assert stats.rows < len(CONVERSATIONS)  # several conversations share a row
    cfg = TrainConfig(batch_size=stats.rows, seq_len=128)
    task = SFTTask(rows, cfg, "sum")
    batch = {k: v for k, v in task.rows.items()}
    with torch.no_grad():
        packed = task.loss_sum(model, batch)
        reference = sum(per_example_sum(model, tok, m) for m in CONVERSATIONS)
    torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-4)
    assert task.normalizer(batch) == 1.0  # summed, not averaged (2B4T)
    assert SFTTask(rows, cfg, "mean").normalizer(batch) == stats.target_tokens
    unpacked, st2 = build_sft_dataset(tok, CONVERSATIONS, seq_len=128, packing=False)
    assert st2.rows == len(CONVERSATIONS) and st2.target_tokens == stats.target_tokens


def test_empty_and_over_long_conversations_are_skipped_and_counted(tok):
    data = CONVERSATIONS + [
        [{"role": "user", "content": "no reply"}],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}],
        [{"role": "user", "content": "ROMEO " * 80}, {"role": "assistant", "content": "ok"}],
    ]
    _, stats = build_sft_dataset(tok, data, seq_len=128)
    assert (stats.examples, stats.skipped_empty, stats.skipped_too_long) == (3, 2, 1)
    with pytest.raises(FormatError, match="no usable conversation: 1 without .* 1 longer"):
        build_sft_dataset(tok, data[4:], seq_len=128)


def test_sft_lowers_the_loss_on_assistant_tokens(tok):
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    cfg = TrainConfig(steps=40, batch_size=2, seq_len=128, warmup_steps=2, lr_peak=1e-2,
                      lr_cooldown=1e-3, drop_at=1.0, wd_peak=0.0, log_every=100)  # fmt: skip
    rows, _ = build_sft_dataset(tok, CONVERSATIONS, seq_len=128)
    task = SFTTask(rows, cfg)
    with torch.no_grad():
        before = task.loss_sum(model, task.rows).item()
    sft(model, tok, CONVERSATIONS, cfg, log=lambda s: None)
    with torch.no_grad():
        after = task.loss_sum(model, task.rows).item()
    assert after < 0.5 * before


def test_read_conversations_formats_and_errors(tmp_path):
    from bitnet158.train.sft import read_conversations

    good = tmp_path / "good.jsonl"
    good.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                    '{"prompt": "c", "completion": "d"}\n')  # fmt: skip
    convs = read_conversations([good])
    assert convs[1] == [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "robot", "content": "a"}]}\n')
    with pytest.raises(FormatError, match="bad.jsonl:1"):
        read_conversations([bad])
