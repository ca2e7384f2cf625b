"""Helpers of the training tests: a small byte-level BPE tokenizer, tiny configs, data."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from bitnet158.config import ModelConfig
from bitnet158.formats.tokenizer import Tokenizer

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]  # ids 0, 1, 2
CORPUS = [
    "ROMEO: But, soft! what light through yonder window breaks?",
    "JULIET: O Romeo, Romeo! wherefore art thou Romeo?",
    "It is the east, and Juliet is the sun.",
    "User: What is the capital of France? Assistant: Paris is the capital of France.",
] * 20


def build_tokenizer_json(vocab_size: int = 300) -> str:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


TOKENIZER_JSON = build_tokenizer_json()


def make_tokenizer() -> Tokenizer:
    """Our Tokenizer with BOS/EOS and no chat template (2B4T's format is the fallback)."""
    return Tokenizer.from_json(
        TOKENIZER_JSON, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
    )


def tiny_config(vocab_size: int | None = None, **overrides) -> ModelConfig:
    fields = dict(
        vocab_size=vocab_size or make_tokenizer().vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_ids=[1, 2],
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def random_tokens(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.uint16)


def corpus_tokens(repeats: int = 10) -> np.ndarray:
    """The corpus, tokenized: text with structure, so a model's loss can fall."""
    tok = make_tokenizer()
    ids: list[int] = []
    for _ in range(repeats):
        for line in CORPUS[:4]:
            ids += tok.encode(line) + [1]
    return np.asarray(ids, dtype=np.uint16)


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 --standalone ARGS`, on gloo with one thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def torchrun_failure(result: subprocess.CompletedProcess) -> str:
    """Each process's last lines of a failed torchrun, then its end: the first process to fail
    is often not the one the end shows (a peer left waiting fails later, at more length)."""
    lines = result.stderr.splitlines()
    parts = []
    for rank in (0, 1):
        own = [line for line in lines if line.startswith(f"[rank{rank}]")]
        parts.append(f"--- process {rank}:\n" + "\n".join(own[-15:]))
    return "\n".join([*parts, "--- the end:", *lines[-25:]])
