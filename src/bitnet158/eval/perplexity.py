"""Perplexity of text files with a strided sliding window.

Each file is one token stream (BOS first when the model uses one). A window shows the model
up to `context` tokens and scores the tokens that follow them; consecutive windows start
`stride` tokens apart and each scores only the targets no earlier window scored, so every
target after the first window is predicted from at least `context - stride` tokens of
history. stride == context gives disjoint windows (fast, pessimistic); a small stride
approaches true left-to-right perplexity (slow).

result = perplexity(make_scorer(path), ["valid.txt"], context=256, stride=128)
print(result.ppl)
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .scoring import Scorer

Progress = Callable[[int], Callable[[int], None]]  # total windows -> advance(n)


@dataclass(frozen=True)
class Window:
    """ids[begin:end] goes through the model; the targets ids[first:end] are scored."""

    begin: int
    end: int
    first: int  # first scored target, begin < first < end


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """Windows that score targets 1..n_tokens-1 exactly once, each seeing <= context tokens."""
    if context < 1 or not 1 <= stride <= context:
        raise ValueError(f"need context >= 1 and 1 <= stride <= context, got {context}, {stride}")
    windows: list[Window] = []
    scored = 1  # token 0 has no prediction; the targets before `scored` are done
    begin = 0
    while scored < n_tokens:
        end = min(begin + context + 1, n_tokens)
        windows.append(Window(begin, end, scored))
        scored = end
        begin += stride
    return windows


@dataclass
class FileResult:
    """Perplexity of one file."""

    path: str
    tokens: int  # tokens in the stream (BOS included)
    scored: int  # targets scored: tokens - 1
    nll: float  # summed negative log-likelihood, nats
    ppl: float
    bytes: int  # UTF-8 bytes of the text
    bits_per_byte: float
    windows: int


@dataclass
class PerplexityResult:
    """Perplexity of a model over files: per file and pooled over all scored tokens."""

    model: str
    backend: str
    context: int
    stride: int
    files: list[FileResult] = field(default_factory=list)
    scored: int = 0
    nll: float = 0.0
    ppl: float = float("nan")
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"tokens_per_second": self.tokens_per_second}


def score_stream(
    scorer: Scorer,
    ids: Sequence[int],
    context: int,
    stride: int,
    batch_size: int = 1,
    advance: Callable[[int], None] | None = None,
) -> tuple[float, int, int]:
    """Summed NLL (nats), scored targets and windows of one token stream."""
    windows = sliding_windows(len(ids), context, stride)
    nll, scored = 0.0, 0
    for b0 in range(0, len(windows), batch_size):
        batch = windows[b0 : b0 + batch_size]
        scores = scorer.score([ids[w.begin : w.end] for w in batch])
        for w, s in zip(batch, scores, strict=True):
            new = s.logprobs[w.first - w.begin - 1 :]  # logprobs[j] scores ids[begin + j + 1]
            nll -= float(new.sum())
            scored += len(new)
        if advance:
            advance(len(batch))
    return nll, scored, len(windows)


def perplexity(
    scorer: Scorer,
    files: Iterable[str | os.PathLike],
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    progress: Progress | None = None,
) -> PerplexityResult:
    """Perplexity of each text file and of all of them (default context: the model's
    maximum; default stride: half the context)."""
    context = scorer.max_context if context is None else context
    if not 1 <= context <= scorer.max_context:
        raise ValueError(
            f"context must be in 1..{scorer.max_context} for this model, got {context}"
        )
    stride = max(1, context // 2) if stride is None else stride
    texts = {str(f): Path(f).read_text(encoding="utf-8") for f in files}
    streams = {name: scorer.tokenizer.encode(text, add_bos=True) for name, text in texts.items()}
    for name, ids in streams.items():
        if len(ids) < 2:
            raise ValueError(f"{name}: fewer than 2 tokens, nothing to score")
        sliding_windows(len(ids), context, stride)  # validate before any work
    total = sum(len(sliding_windows(len(ids), context, stride)) for ids in streams.values())
    advance = progress(total) if progress else None

    result = PerplexityResult(str(scorer.path), scorer.backend, context, stride)
    t0 = time.perf_counter()
    for name, ids in streams.items():
        nll, scored, n_windows = score_stream(scorer, ids, context, stride, batch_size, advance)
        n_bytes = len(texts[name].encode("utf-8"))
        result.files.append(
            FileResult(
                path=name,
                tokens=len(ids),
                scored=scored,
                nll=nll,
                ppl=math.exp(nll / scored),
                bytes=n_bytes,
                bits_per_byte=nll / math.log(2) / max(n_bytes, 1),
                windows=n_windows,
            )
        )
        result.nll += nll
        result.scored += scored
    result.seconds = time.perf_counter() - t0
    result.ppl = math.exp(result.nll / result.scored)
    return result


def relative_difference(a: float, b: float) -> float:
    """|a - b| / |b| (the agreement measure of engine vs reference)."""
    return abs(a - b) / abs(b) if b else float(np.inf)
