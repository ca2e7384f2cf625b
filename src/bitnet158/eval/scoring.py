"""Log-probabilities of token sequences, on the native engine or on the torch reference model.

Both scorers tokenize with the same tokenizer (the engine's, torch-free) and reduce logits to
log-probabilities with the same numpy code, so the two differ only in their forward passes.

scorer = make_scorer("shakespeare-b158", backend="engine")
scores = scorer.score([[1, 17, 42, 9]])[0]   # scores.logprobs float64[3], scores.greedy bool[3]
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..formats.tokenizer import Tokenizer

BACKENDS = ("engine", "torch")
ROW_CHUNK = 256  # logit rows widened to float64 at a time (a [T, 128256] block is 1 GB)


@dataclass
class TokenScores:
    """Per-target scores of one sequence ids[T]: targets are ids[1:]."""

    logprobs: np.ndarray  # float64[T - 1]: log p(ids[t + 1] | ids[: t + 1])
    greedy: np.ndarray  # bool[T - 1]: ids[t + 1] is the argmax of that distribution


def target_scores(logits: np.ndarray, targets: np.ndarray) -> TokenScores:
    """Scores of targets int[T] under logits float32[T, V] (log-softmax in float64)."""
    targets = np.asarray(targets, dtype=np.int64)
    logprobs = np.empty(len(targets), dtype=np.float64)
    greedy = np.empty(len(targets), dtype=bool)
    for t0 in range(0, len(targets), ROW_CHUNK):
        block = np.asarray(logits[t0 : t0 + ROW_CHUNK], dtype=np.float64)
        tgt = targets[t0 : t0 + ROW_CHUNK]
        top = block.max(-1)
        lse = top + np.log(np.exp(block - top[:, None]).sum(-1))
        picked = block[np.arange(len(tgt)), tgt]
        logprobs[t0 : t0 + len(tgt)] = picked - lse
        greedy[t0 : t0 + len(tgt)] = picked >= top  # ties count as greedy
    return TokenScores(logprobs, greedy)


class Scorer:
    """Scores batches of token sequences; subclasses provide `_logits` of one batch."""

    backend = ""
    tokenizer: Tokenizer
    max_context: int  # the most tokens one forward may see
    vocab_size: int

    def _logits(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        raise NotImplementedError

    def generate(
        self,
        ids: Sequence[int],
        max_new_tokens: int,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> str:
        """The text that follows prompt ids, cut before the first stop string."""
        raise NotImplementedError

    def score(self, batch: Sequence[Sequence[int]]) -> list[TokenScores]:
        """Scores of every target of each sequence ids[T] (2 <= T <= max_context + 1)."""
        for ids in batch:
            if not 2 <= len(ids) <= self.max_context + 1:
                raise ValueError(
                    f"a scored sequence needs 2..{self.max_context + 1} tokens, got {len(ids)}"
                )
        logits = self._logits([list(ids[:-1]) for ids in batch])
        return [
            target_scores(lg, np.asarray(ids[1:])) for lg, ids in zip(logits, batch, strict=True)
        ]


class EngineScorer(Scorer):
    """The native engine (torch-free): a batch is one KV cache with a slot per sequence, run
    through the engine's multi-sequence step (a GEMM over the tokens of all sequences)."""

    backend = "engine"

    def __init__(
        self,
        path: str | os.PathLike | None,
        threads: int | None = None,
        max_context: int | None = None,
    ) -> None:
        from ..api import load

        self.model = load(path, threads=threads, max_context=max_context)
        self.tokenizer = self.model.tokenizer
        self.max_context = self.model.max_context
        self.vocab_size = self.model.config.vocab_size
        self.path = self.model.path

    def _logits(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        from ..engine.model import PREFILL_CHUNK

        engine = self.model.engine
        cache = engine.new_cache(  # one slot per sequence, in the model's KV dtype
            max(len(ids) for ids in batch), self.model.kv_cache_dtype, slots=len(batch)
        )
        tokens = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in batch])
        slots = np.concatenate([np.full(len(ids), i) for i, ids in enumerate(batch)])
        positions = np.concatenate([np.arange(len(ids)) for ids in batch])
        rows = [  # each sequence's tokens are in order, so any chunking keeps causality
            engine.step(
                tokens[c0 : c0 + PREFILL_CHUNK],
                slots[c0 : c0 + PREFILL_CHUNK],
                positions[c0 : c0 + PREFILL_CHUNK],
                cache,
                range(min(PREFILL_CHUNK, len(tokens) - c0)),
            )
            for c0 in range(0, len(tokens), PREFILL_CHUNK)
        ]
        logits = np.concatenate(rows)
        bounds = np.cumsum([0] + [len(ids) for ids in batch])
        return [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def generate(self, ids, max_new_tokens, stop=(), temperature=0.0, seed=None) -> str:
        return self.model.generate(
            list(ids), max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
            stop=list(stop),
        )  # fmt: skip


class TorchScorer(Scorer):
    """The torch reference model (`nn.model.Transformer`): one padded [B, T] forward per batch."""

    backend = "torch"

    def __init__(
        self,
        path: str | os.PathLike | None,
        threads: int | None = None,
        max_context: int | None = None,
    ) -> None:
        import torch

        from ..api import checkpoint_tokenizer
        from ..formats.convert import read_checkpoint
        from ..formats.native import unpack_tensors
        from ..nn.model import Transformer

        if threads is not None:
            torch.set_num_threads(threads)
        ckpt = read_checkpoint(path)
        cfg = ckpt.config
        with warnings.catch_warnings():  # torch warns about the read-only memory-mapped norms
            warnings.simplefilter("ignore", UserWarning)
            tensors = unpack_tensors(cfg, ckpt.tensors, ckpt.layout)
            self.model = Transformer.from_tensors(cfg, tensors).eval()
        self.tokenizer = checkpoint_tokenizer(ckpt)  # the engine's tokenizer: identical token ids
        self.max_context = max_context or cfg.max_position_embeddings
        self.vocab_size = cfg.vocab_size
        self.path = ckpt.path
        self._torch = torch

    def _logits(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        torch = self._torch
        width = max(len(ids) for ids in batch)
        idx = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):  # right padding: causal attention never sees it
            idx[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        with torch.no_grad():
            logits = self.model(idx).float().numpy()
        return [logits[row, : len(ids)] for row, ids in enumerate(batch)]

    def generate(self, ids, max_new_tokens, stop=(), temperature=0.0, seed=None) -> str:
        """Greedy only (the reference recomputes the whole sequence per token, no KV cache)."""
        if temperature > 0:
            raise ValueError("the torch reference backend generates greedily only (temperature 0)")
        ids, new = list(ids), []
        for _ in range(max_new_tokens):
            if len(ids) >= self.max_context:
                break
            token = int(self._logits([ids])[0][-1].argmax())
            if token in self.tokenizer.eos_token_ids:
                break
            ids.append(token)
            new.append(token)
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            cut = min((text.find(s) for s in stop if s and s in text), default=-1)
            if cut >= 0:
                return text[:cut]
        return self.tokenizer.decode(new, skip_special_tokens=True)


def make_scorer(
    path: str | os.PathLike | None,
    backend: str = "engine",
    threads: int | None = None,
    max_context: int | None = None,
) -> Scorer:
    """A scorer of the model at `path` (None: the shipped model) on `backend`."""
    if backend == "engine":
        return EngineScorer(path, threads, max_context)
    if backend == "torch":
        return TorchScorer(path, threads, max_context)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
