"""Generation: prefill the prompt in one forward, then decode one token per step.

`generate_tokens` yields token ids; `stream_text` turns them into text deltas, cut before
the first stop string. Both are lazy: closing the text stream stops the decoding.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..formats.tokenizer import IncrementalDecoder
from .kv_cache import KVCache
from .model import EngineModel
from .sampling import sample


@dataclass
class GenerationStats:
    """What the last generation did and how long it took (sampling included in decode)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0  # forwards after the prefill (the first new token needs none)
    finish_reason: str = ""  # "stop" (eos / stop string), "length" or "context"

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: new tokens per second after the prefill."""
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0


def prefill(model: EngineModel, cache: KVCache, prompt_ids: Sequence[int]) -> np.ndarray:
    """Run the whole prompt as one [T, H] matrix; logits float32[V] of its last position."""
    return model.forward(np.asarray(prompt_ids), cache, last_only=True)[0]


def decode_one(model: EngineModel, cache: KVCache, token: int) -> np.ndarray:
    """Run one token after the cached ones; its logits float32[V]."""
    return model.forward(np.array([token]), cache)[0]


def generate_tokens(
    model: EngineModel,
    cache: KVCache,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    rng: np.random.Generator,
    stop_ids: Iterable[int] = (),
    stats: GenerationStats | None = None,
    **sampling,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` sampled ids; stop before any of `stop_ids`.

    `sampling`: temperature, top_k, top_p, penalty (see `sampling.sample`). Generation also
    ends, with finish_reason "context", when the cache is full.
    """
    stats = GenerationStats() if stats is None else stats
    stats.prompt_tokens = len(prompt_ids)
    stop_ids = set(stop_ids)
    history = list(prompt_ids)
    t0 = time.perf_counter()
    logits = prefill(model, cache, prompt_ids)
    stats.prefill_seconds = time.perf_counter() - t0
    for step in range(max_new_tokens):
        t0 = time.perf_counter()
        if step:
            logits = decode_one(model, cache, history[-1])
            stats.decode_steps += 1
        token = sample(logits, rng, previous=history, **sampling)
        stats.decode_seconds += time.perf_counter() - t0
        if token in stop_ids:
            stats.finish_reason = "stop"
            return
        history.append(token)
        stats.new_tokens += 1
        yield token
        if cache.length == cache.max_context and step + 1 < max_new_tokens:
            stats.finish_reason = "context"
            return
    stats.finish_reason = "length"


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could begin a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def first_stop(text: str, stops: Sequence[str], start: int) -> int:
    """Index of the earliest stop string found at or after `start`, or -1."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def stream_text(
    tokens: Iterator[int],
    decoder: IncrementalDecoder,
    stop: Sequence[str] = (),
    stats: GenerationStats | None = None,
) -> Iterator[str]:
    """Text deltas of `tokens` (decoded by `decoder`), cut before the first stop string.

    Text that could be the beginning of a stop string is held back until it cannot, so no
    part of a stop string is ever streamed. (Nothing already sent can start a stop string,
    hence the search from `sent`.)
    """
    stop = [s for s in stop if s]
    text, sent = "", 0
    try:
        for token in tokens:
            text += decoder.push(token)
            cut = first_stop(text, stop, sent)
            if cut >= 0:
                if cut > sent:
                    yield text[sent:cut]
                if stats is not None:
                    stats.finish_reason = "stop"
                return
            safe = len(text) - held_back(text, stop)
            if safe > sent:
                yield text[sent:safe]
                sent = safe
        text += decoder.flush()
        cut = first_stop(text, stop, sent)
        if cut >= 0 and stats is not None:
            stats.finish_reason = "stop"
        end = cut if cut >= 0 else len(text)
        if end > sent:
            yield text[sent:end]
    finally:
        if hasattr(tokens, "close"):
            tokens.close()
