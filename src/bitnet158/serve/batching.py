"""Continuous batching: many generations share one engine step, joining and leaving at will.

A `Batcher` owns a `DecodeBackend` (a fixed number of KV-cache slots) and one worker thread.
Each loop turn it drops cancelled sequences (their slots are free for this very turn), moves
waiting sequences into free slots, then runs ONE engine step holding the next token of every
decoding sequence plus prompt tokens of the new ones (up to `max_step_tokens` in all; a long
prompt is prefilled over several turns), and samples the next token of each sequence whose
prompt is complete. A sequence leaves at its end (EOS, stop string, max_tokens, context full)
or when cancelled, and a waiting one takes its slot at the next turn, without waiting for the
rest of the batch (Orca-style iteration-level scheduling, with vLLM-style chunked prefill).

The backend is the only contract with the engine: append tokens to a set of slots in one step
-> logits [entries, V] of each entry's last token. A decode is one token for a slot, a prefill
(chunk) many; `EngineBackend` maps it onto the native engine's slotted KV cache, where the
weights are read once per step whatever the number of sequences. Tests drive it with fakes.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..engine.generate import first_stop, held_back
from ..engine.model import PREFILL_CHUNK, EngineModel
from ..engine.sampling import sample
from ..formats.tokenizer import IncrementalDecoder, Tokenizer


class QueueFull(Exception):
    """The wait queue is at its bound: the request should be retried later (HTTP 429)."""


class DecodeBackend(Protocol):
    """KV-cache slots on an engine, filled by steps that serve many sequences at once."""

    num_slots: int
    max_context: int
    max_step_tokens: int  # tokens one step may hold (bounds the engine's scratch memory)

    def step(self, work: Sequence[tuple[int, Sequence[int]]]) -> np.ndarray:
        """Append `tokens` to slot `slot` for each (slot, tokens) of `work` (a slot at most once),
        all in one step; logits float32[len(work), V] of each entry's last token."""
        ...

    def release(self, slot: int) -> None:
        """The slot's sequence is gone: the slot starts empty for the next one."""
        ...


class EngineBackend:
    """`DecodeBackend` over the native engine: one slotted KV cache, one `EngineModel.step`
    (a GEMM over all the step's tokens) per turn."""

    def __init__(
        self, engine: EngineModel, num_slots: int, max_context: int, kv_dtype: str = "float32"
    ) -> None:
        self.engine, self.num_slots, self.max_context = engine, num_slots, max_context
        self.max_step_tokens = max(PREFILL_CHUNK, num_slots)
        # calloc'd: the pages of a slot cost memory only once a sequence has used them
        self.cache = engine.new_cache(max_context, kv_dtype, slots=num_slots)

    def step(self, work: Sequence[tuple[int, Sequence[int]]]) -> np.ndarray:
        cache = self.cache
        slots = np.array([slot for slot, _ in work], dtype=np.int64)
        counts = np.array([len(tokens) for _, tokens in work], dtype=np.int64)
        starts = [cache.reserve(int(n), int(s)) for s, n in zip(slots, counts, strict=True)]
        tokens = np.concatenate([np.asarray(t, dtype=np.int64) for _, t in work])
        positions = np.concatenate(
            [np.arange(a, a + n) for a, n in zip(starts, counts, strict=True)]
        )
        logits = self.engine.step(tokens, np.repeat(slots, counts), positions, cache,
                                  np.cumsum(counts) - 1)  # fmt: skip
        cache.lengths[slots] += counts
        return logits

    def release(self, slot: int) -> None:
        self.cache.reset(slot)


class StopText:
    """Push-style text of a token stream, cut before the first stop string.

    The same rules as `engine.generate.stream_text`: text that could begin a stop string is
    held back until it cannot, so no part of a stop string is ever sent.
    """

    def __init__(self, decoder: IncrementalDecoder, stops: Sequence[str]) -> None:
        self.decoder, self.stops = decoder, [s for s in stops if s]
        self.text, self.sent = "", 0

    def push(self, token: int) -> tuple[str, bool]:
        """(new text to send, whether a stop string was reached)."""
        self.text += self.decoder.push(token)
        return self._emit(final=False)

    def flush(self) -> tuple[str, bool]:
        """The held-back rest at the end of the stream."""
        self.text += self.decoder.flush()
        return self._emit(final=True)

    def _emit(self, final: bool) -> tuple[str, bool]:
        cut = first_stop(self.text, self.stops, self.sent)
        end = cut if cut >= 0 else len(self.text)
        if cut < 0 and not final:
            end -= held_back(self.text, self.stops)
        delta = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta, cut >= 0


@dataclass
class SamplingParams:
    """How one sequence samples and when it ends."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()


@dataclass
class Event:
    """What one worker turn produced for a sequence: new text, and the reason when it ended."""

    seq: Generation
    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None


@dataclass(eq=False)
class Generation:
    """One sequence to generate: its prompt, parameters, progress and where events go.

    `on_event` is called from the worker thread; it must be quick and thread-safe (the server
    hands the event over to its event loop).
    """

    prompt_ids: list[int]
    params: SamplingParams
    tokenizer: Tokenizer
    stop_ids: frozenset[int]
    on_event: Callable[[Event], None]
    index: int = 0  # the choice index in the response
    rng_key: tuple[int, ...] = ()  # extra seed words: choice i of a seeded request
    completion_tokens: int = 0
    finish_reason: str | None = None
    slot: int | None = None
    prefilled: int = 0  # prompt tokens in the cache so far
    cancelled: bool = False
    _last: int = -1
    _history: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        seed = self.params.seed
        key = None if seed is None else [seed, *self.rng_key] if self.rng_key else seed
        self.rng = np.random.default_rng(key)
        decoder = IncrementalDecoder(self.tokenizer, skip_special_tokens=True)
        for token in self.prompt_ids[-4:]:  # context, so the first new token's leading space shows
            decoder.push(token)
        self.text = StopText(decoder, self.params.stop)
        if self.params.repetition_penalty != 1.0:
            self._history = list(self.prompt_ids)


class Batcher:
    """The scheduler: a bounded wait queue, the backend's slots, and the worker thread."""

    def __init__(self, backend: DecodeBackend, max_waiting: int = 64) -> None:
        self.backend = backend
        self.max_waiting = max_waiting
        self._waiting: deque[Generation] = deque()
        self._active: dict[int, Generation] = {}
        self._free = list(range(backend.num_slots - 1, -1, -1))  # pop() gives slot 0 first
        self._cond = threading.Condition()
        self._stopping = False
        self.steps = 0  # steps that decoded at least one sequence
        self.step_sequences = 0  # sequences decoded, summed over steps (mean batch = / steps)
        self.generated_tokens = 0
        self._thread = threading.Thread(target=self._loop, name="bitnet158-batcher", daemon=True)
        self._thread.start()

    # --- the server's side --------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    def submit(self, generations: Sequence[Generation]) -> None:
        """Queue all of `generations` (the choices of one request) or none: QueueFull."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("the batcher has been closed")
            # Sequences bound for a free slot are not queued for long: they do not count.
            queued = len(self._waiting) + len(generations) - len(self._free)
            if queued > self.max_waiting:
                raise QueueFull(
                    f"{len(self._waiting)} sequences are waiting (bound {self.max_waiting})"
                )
            self._waiting.extend(generations)
            self._cond.notify()

    def cancel(self, generation: Generation) -> None:
        """Stop `generation`; its slot is free before the next decode step."""
        with self._cond:
            if generation.finish_reason is None:
                generation.cancelled = True
                self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker after its current step; unfinished sequences end as cancelled."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # --- the worker thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._active):
                    self._cond.wait()
                if self._stopping:
                    for gen in [*self._waiting, *self._active.values()]:
                        self._finish(gen, "cancelled")
                    self._waiting.clear()
                    return
                self._drop_cancelled()
                while self._waiting and self._free:
                    gen = self._waiting.popleft()
                    gen.slot = self._free.pop()
                    self._active[gen.slot] = gen
                work = self._plan(list(self._active.values()))
            if work:
                self._run(work)

    def _plan(self, active: list[Generation]) -> list[tuple[Generation, list[int]]]:
        """This turn's step: every decoding sequence's last token, then prompt chunks in
        admission order, within the backend's tokens per step."""
        budget = self.backend.max_step_tokens
        work = [(g, [g._last]) for g in active if g.prefilled == len(g.prompt_ids)]
        budget -= len(work)
        for g in active:
            if g.prefilled < len(g.prompt_ids) and budget > 0:
                chunk = g.prompt_ids[g.prefilled : g.prefilled + budget]
                work.append((g, chunk))
                budget -= len(chunk)
        return work

    def _drop_cancelled(self) -> None:
        """(lock held) Finish cancelled sequences, waiting or active, and free their slots."""
        for gen in [g for g in self._waiting if g.cancelled]:
            self._waiting.remove(gen)
            self._finish(gen, "cancelled")
        for gen in [g for g in self._active.values() if g.cancelled]:
            self._finish(gen, "cancelled")

    def _run(self, work: list[tuple[Generation, list[int]]]) -> None:
        """Run one step and sample; an exception ends only the step's sequences, never the
        worker."""
        try:
            logits = self.backend.step([(g.slot, tokens) for g, tokens in work])
            decoding = sum(len(tokens) == 1 and g.prefilled == len(g.prompt_ids)
                           for g, tokens in work)  # fmt: skip
            if decoding:
                self.steps += 1
                self.step_sequences += decoding
            for (gen, tokens), row in zip(work, logits, strict=True):
                if gen.prefilled < len(gen.prompt_ids):
                    gen.prefilled += len(tokens)
                    if gen.prefilled < len(gen.prompt_ids):
                        continue  # a prompt chunk: nothing to sample yet
                self._advance(gen, row)
        except Exception as exc:  # noqa: BLE001 - reported to the requests, worker goes on
            with self._cond:
                for gen, _ in work:
                    if gen.finish_reason is None:
                        self._finish(gen, "error", f"{type(exc).__name__}: {exc}")

    def _advance(self, gen: Generation, logits: np.ndarray) -> None:
        """Sample the next token of `gen`, send its text, and end it if it is done."""
        if gen.cancelled:
            with self._cond:
                self._finish(gen, "cancelled")
            return
        p = gen.params
        token = sample(logits, gen.rng, p.temperature, p.top_k, p.top_p,
                       p.repetition_penalty, gen._history)  # fmt: skip
        if token in gen.stop_ids:
            delta, _ = gen.text.flush()
            return self._end(gen, "stop", delta)
        gen._last = token
        gen.completion_tokens += 1
        self.generated_tokens += 1
        if p.repetition_penalty != 1.0:
            gen._history.append(token)
        delta, stopped = gen.text.push(token)
        if stopped:
            return self._end(gen, "stop", delta)
        # The cache holds prompt + completion - 1 tokens: one more token fits only below max.
        full = len(gen.prompt_ids) + gen.completion_tokens - 1 >= self.backend.max_context
        if gen.completion_tokens >= p.max_tokens or full:
            rest, stopped = gen.text.flush()
            return self._end(gen, "stop" if stopped else "length", delta + rest)
        if delta:
            gen.on_event(Event(gen, delta))

    def _end(self, gen: Generation, reason: str, delta: str) -> None:
        with self._cond:
            self._finish(gen, reason, text=delta)

    def _finish(self, gen: Generation, reason: str, error: str | None = None, text: str = ""):
        """(lock held) Record the end of `gen`, free its slot, and tell its owner."""
        gen.finish_reason = reason
        if gen.slot is not None and self._active.get(gen.slot) is gen:
            del self._active[gen.slot]
            self.backend.release(gen.slot)
            self._free.append(gen.slot)
        gen.slot = None
        gen.on_event(Event(gen, text, reason, error))
