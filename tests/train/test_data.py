"""Token shards: tokenization of text and JSON lines, bad data, slicing, deterministic batches."""

import json

import numpy as np
import pytest
from train_fixtures import CORPUS

from bitnet158.errors import FormatError
from bitnet158.train.data import TokenShards, batch_at, split_holdout, tokenize_to_shards


def encode(text: str) -> list[int]:  # a byte tokenizer: the reference is bytes themselves
    return list(text.encode("utf-8"))


@pytest.fixture
def files(tmp_path):
    (tmp_path / "a.txt").write_text(CORPUS[0] + "\n" + CORPUS[1], encoding="utf-8")
    lines = [{"text": CORPUS[2]}, {"text": ""}, {"text": "naïve ✓"}, {"text": CORPUS[3]}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    return [tmp_path / "a.txt", tmp_path / "b.jsonl"]


def test_text_and_jsonl_become_shards_with_eos_and_empty_documents_counted(files, tmp_path):
    stats = tokenize_to_shards(files, encode, 256, 255, tmp_path / "tok", shard_tokens=50,
                               progress=False)  # fmt: skip
    docs = [CORPUS[0] + "\n" + CORPUS[1], CORPUS[2], "naïve ✓", CORPUS[3]]
    expected = [t for d in docs for t in encode(d) + [255]]
    assert (stats.documents, stats.skipped_empty, stats.tokens) == (4, 1, len(expected))
    shards = TokenShards(tmp_path / "tok")
    assert stats.shards == len(shards.shards) > 1
    assert len(shards) == len(expected)
    np.testing.assert_array_equal(shards[:], expected)
    for lo, hi in [(0, 7), (45, 130), (49, 51), (len(expected) - 3, len(expected) + 10)]:
        np.testing.assert_array_equal(shards[lo:hi], expected[lo:hi])  # across shard borders


def test_batches_are_a_pure_function_of_seed_and_step(files, tmp_path):
    tokenize_to_shards(files, encode, 256, 255, tmp_path / "tok", shard_tokens=64, progress=False)
    shards = TokenShards(tmp_path / "tok")
    flat = shards[:]
    a = batch_at(shards, 7, 4, 16, seed=3)
    b = batch_at(flat, 7, 4, 16, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], batch_at(flat, 8, 4, 16, seed=3)[0])
    np.testing.assert_array_equal(a[0][:, 1:], a[1][:, :-1])  # targets are the next tokens
    train, val = split_holdout(shards, 40)
    assert len(train) + len(val) == len(shards)
    np.testing.assert_array_equal(val[:], flat[-40:])
    np.testing.assert_array_equal(train[5:9], flat[5:9])


def test_same_inputs_reuse_the_shards(files, tmp_path):
    calls = []

    def counting(text):
        calls.append(text)
        return encode(text)

    tokenize_to_shards(files, counting, 256, 255, tmp_path / "tok", progress=False)
    n = len(calls)
    tokenize_to_shards(files, counting, 256, 255, tmp_path / "tok", progress=False)
    assert len(calls) == n


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": broken\n', "b.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n["a list"]\n', "b.jsonl:2: expected a JSON object"),
        ('{"body": "no text field"}\n', "b.jsonl:1: no string field 'text'"),
        ('{"text": ""}\n\n', "every document is empty"),
    ],
)
def test_bad_datasets_are_clear_errors(tmp_path, content, message):
    (tmp_path / "b.jsonl").write_text(content)
    with pytest.raises(FormatError, match=message):
        tokenize_to_shards(
            [tmp_path / "b.jsonl"], encode, 256, None, tmp_path / "t", progress=False
        )


def test_token_ids_outside_the_vocabulary_are_an_error(files, tmp_path):
    with pytest.raises(FormatError, match="outside the vocabulary"):
        tokenize_to_shards(files, encode, 100, None, tmp_path / "t", progress=False)
    with pytest.raises(FormatError, match="no index.json"):
        TokenShards(tmp_path / "nothing")
