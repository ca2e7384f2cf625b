"""The library's front door: `bitnet158.load(path).generate(...)`, torch-free.

model = bitnet158.load()                       # the shipped model
print(model.generate("ROMEO:", max_new_tokens=64, seed=0))
for delta in model.chat([{"role": "user", "content": "Hi"}], stream=True):
    print(delta, end="")
print(model.last_stats.tokens_per_second)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .engine.generate import GenerationStats, generate_tokens, stream_text
from .engine.kernels import set_num_threads
from .engine.kv_cache import KV_DTYPES
from .engine.model import EngineModel
from .engine.sampling import check_params
from .errors import GenerationError
from .formats.convert import read_checkpoint
from .formats.native import NativeCheckpoint, check_finite
from .formats.tokenizer import IncrementalDecoder, Tokenizer

# Tokens that end an assistant turn in the chat templates of the supported families.
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end_of_turn|>", "<|endoftext|>", "</s>")


class Model:
    """A loaded model: config, tokenizer, and generation on the native engine."""

    def __init__(
        self,
        config: ModelConfig,
        engine: EngineModel,
        tokenizer: Tokenizer,
        path: Path,
        max_context: int | None = None,
        kv_cache_dtype: str = "float32",
    ) -> None:
        self.config, self.engine, self.tokenizer, self.path = config, engine, tokenizer, path
        self.max_context = max_context or config.max_position_embeddings
        self.kv_cache_dtype = kv_cache_dtype
        self.last_stats = GenerationStats()
        self.eos_ids = set(config.eos_token_ids) | set(tokenizer.eos_token_ids)
        vocab = tokenizer.get_vocab()
        self.end_of_turn_ids = self.eos_ids | {vocab[t] for t in END_OF_TURN if t in vocab}

    def __repr__(self) -> str:
        return f"Model({str(self.path)!r}, family={self.config.family!r})"

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise GenerationError(
                f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})"
            )
        return ids

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits float32[T, vocab] of every position of one sequence (fresh cache)."""
        ids = self._check_ids(token_ids)
        if not ids:
            raise GenerationError("logits of an empty sequence")
        if len(ids) > self.max_context:
            raise GenerationError(
                f"{len(ids)} tokens exceed the context length of {self.max_context}"
            )
        return self.engine.forward(
            np.asarray(ids), self.engine.new_cache(len(ids), self.kv_cache_dtype)
        )

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """Continue `prompt` (text, or token ids): the new text, or its deltas when stream=True.

        Ends at an end-of-sequence token, before the first `stop` string, after
        `max_new_tokens`, or when the context is full. Statistics land in `last_stats`.
        """
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_bos=True)
        else:
            ids = self._check_ids(prompt)
        return self._run(ids, self.eos_ids, max_new_tokens, temperature, top_k, top_p,
                         repetition_penalty, seed, stop, stream)  # fmt: skip

    def chat(
        self,
        messages: Sequence[dict[str, str]],
        max_new_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """The assistant's reply to `messages` (role/content dicts), via the chat template."""
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_bos=False)  # templates write their own BOS
        return self._run(ids, self.end_of_turn_ids, max_new_tokens, temperature, top_k, top_p,
                         repetition_penalty, seed, stop, stream)  # fmt: skip

    def _run(
        self, ids, stop_ids, max_new_tokens, temperature, top_k, top_p, penalty, seed, stop, stream
    ) -> str | Iterator[str]:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}")
        check_params(temperature, top_k, top_p, penalty)
        if seed is not None and (not isinstance(seed, (int, np.integer)) or seed < 0):
            raise GenerationError(f"seed must be an integer >= 0 or None, got {seed!r}")
        if not ids:
            raise GenerationError("empty prompt: give at least one token")
        if len(ids) > self.max_context:
            raise GenerationError(
                f"the prompt has {len(ids)} tokens, more than the context length of "
                f"{self.max_context} (load with a larger max_context or shorten the prompt)"
            )
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        self.last_stats = stats = GenerationStats(prompt_tokens=len(ids))
        tokens = generate_tokens(
            self.engine,
            self.engine.new_cache(self.max_context, self.kv_cache_dtype),
            ids,
            max_new_tokens,
            np.random.default_rng(seed),
            stop_ids=stop_ids,
            stats=stats,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            penalty=penalty,
        )
        decoder = IncrementalDecoder(self.tokenizer, skip_special_tokens=True)
        for token in ids[-4:]:  # context, so that the first new token's leading space shows
            decoder.push(token)
        deltas = stream_text(tokens, decoder, stops, stats)
        return deltas if stream else "".join(deltas)


def checkpoint_tokenizer(ckpt: NativeCheckpoint) -> Tokenizer:
    """The tokenizer stored with a checkpoint, BOS/EOS from its config."""
    return Tokenizer.for_model(ckpt.tokenizer_json, ckpt.chat_template, ckpt.config, str(ckpt.path))


def load(
    path: str | os.PathLike | None = None,
    *,
    threads: int | None = None,
    max_context: int | None = None,
    lm_head: str = "exact",
    kv_cache_dtype: str = "float32",
) -> Model:
    """Load a model for generation: None / "shakespeare-b158" (the shipped model), one of our
    `.safetensors` files (memory-mapped), or a Hugging Face checkpoint directory (packed on
    the fly).

    `lm_head`: "exact" (the stored F32/F16/BF16 output layer), "int8" (a per-row int8 copy)
    or "q4" (4-bit groups of 32): faster decode; `kv_cache_dtype`: "float32" or "float16" (half the cache memory).
    """
    if max_context is not None and max_context < 1:
        raise ValueError(f"max_context must be a positive integer, got {max_context}")
    if kv_cache_dtype not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_DTYPES}, got {kv_cache_dtype!r}")
    set_num_threads(threads)
    ckpt = read_checkpoint(path)
    check_finite(ckpt)
    tokenizer = checkpoint_tokenizer(ckpt)
    engine = EngineModel(ckpt.config, ckpt.tensors, lm_head=lm_head, layout=ckpt.layout)
    return Model(ckpt.config, engine, tokenizer, Path(ckpt.path), max_context, kv_cache_dtype)
