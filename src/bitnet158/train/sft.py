"""Supervised fine-tuning on conversations, the BitNet b1.58 2B4T recipe.

- Each conversation is rendered with the model's chat template (2B4T's
  `User: ...<|eot_id|>Assistant: ...<|eot_id|>` when the model has none) and tokenized once;
  only the tokens of assistant turns (their text and end-of-turn token) are targets.
- The loss is SUMMED over the target tokens of a batch, not averaged (the 2B4T report,
  §3.2); `loss_reduction="mean"` averages instead.
- Short conversations are packed into rows of `seq_len` tokens; inside a row each
  conversation attends only to itself and its positions restart at 0 (`packed_layout`), so
  packing changes speed, not the loss.
- Conversations without an assistant turn or longer than `seq_len` are skipped and counted.

Data: JSON lines with `{"messages": [{"role": ..., "content": ...}, ...]}`, or
`{"prompt": ..., "completion": ...}` (also `response`), one conversation per line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FormatError
from ..formats.tokenizer import Tokenizer
from .data import read_jsonl
from .loop import Batch, FitResult, TrainConfig, fit, forward_logits

IGNORE = -100
ROLES = ("system", "user", "assistant")
REDUCTIONS = ("sum", "mean")


def _messages(obj: dict, where: str) -> list[dict[str, str]]:
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in msgs
        ):
            raise FormatError(
                f"{where}: `messages` must be a list of {{role: system|user|assistant, "
                "content: string}}"
            )
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    prompt = obj.get("prompt")
    answer = obj.get("completion", obj.get("response"))
    if isinstance(prompt, str) and isinstance(answer, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    raise FormatError(
        f"{where}: expected `messages`, or `prompt` and `completion` strings (got {sorted(obj)[:6]})"
    )


def read_conversations(paths: Iterable[Path]) -> list[list[dict[str, str]]]:
    """The conversations of JSON-lines files (see the module docstring for the fields)."""
    out = []
    for path in paths:
        for lineno, obj in read_jsonl(Path(path)):
            out.append(_messages(obj, f"{path}:{lineno}"))
    return out


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[dict[str, str]],
    trainable: Callable[[int, dict], bool] | None = None,
) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and, per token, whether it is a target.

    Targets are the tokens overlapping the text an assistant turn adds to the rendered
    conversation (its content and end-of-turn marker); `trainable(index, message)` narrows
    which assistant turns count (DPO: the response only).
    """
    trainable = trainable or (lambda i, m: True)
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or not trainable(i, m):
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before)):
            raise FormatError(
                "the chat template does not render a conversation as an extension of its "
                "prefixes, so assistant tokens cannot be located"
            )
        spans.append((len(before), len(through)))
    enc = tokenizer.backend.encode(full, add_special_tokens=False)
    ids = list(enc.ids)
    mask = [any(a < e and s < b for a, b in spans) for s, e in enc.offsets]
    bos = tokenizer.bos_token_id
    if tokenizer.add_bos_token and bos is not None and (not ids or ids[0] != bos):
        ids, mask = [bos, *ids], [False, *mask]  # templates without {{ bos_token }}
    return ids, mask


@dataclass
class DatasetStats:
    examples: int = 0
    skipped_empty: int = 0  # no assistant turn, or nothing to learn
    skipped_too_long: int = 0
    rows: int = 0
    target_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.examples} examples in {self.rows} rows, {self.target_tokens} target tokens; "
            f"skipped {self.skipped_empty} empty and {self.skipped_too_long} over-long"
        )


def pack_examples(
    examples: Sequence[tuple[list[int], list[bool]]], seq_len: int, pad_id: int, packing: bool
) -> dict[str, np.ndarray]:
    """Rows of `seq_len` positions: inputs, targets (IGNORE where no loss), segment ids.

    An example of n tokens fills n - 1 positions (input i predicts token i + 1). Greedy packing
    in order: an example starts a new row when it does not fit in the current one.
    """
    rows: list[tuple[list[int], list[int], list[int]]] = []
    cur: tuple[list[int], list[int], list[int]] = ([], [], [])
    for ids, mask in examples:
        n = len(ids) - 1
        if cur[0] and (not packing or len(cur[0]) + n > seq_len):
            rows.append(cur)
            cur = ([], [], [])
        seg = len(set(cur[2]))
        cur[0].extend(ids[:-1])
        cur[1].extend(t if m else IGNORE for t, m in zip(ids[1:], mask[1:], strict=True))
        cur[2].extend([seg] * n)
    if cur[0]:
        rows.append(cur)
    inputs = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    targets = np.full((len(rows), seq_len), IGNORE, dtype=np.int64)
    segments = np.full((len(rows), seq_len), -1, dtype=np.int64)  # padding: its own segment
    for r, (x, y, s) in enumerate(rows):
        inputs[r, : len(x)], targets[r, : len(y)], segments[r, : len(s)] = x, y, s
    return {"input": inputs, "target": targets, "segments": segments}


def build_sft_dataset(
    tokenizer: Tokenizer,
    conversations: Iterable[Sequence[dict[str, str]]],
    seq_len: int,
    packing: bool = True,
) -> tuple[dict[str, np.ndarray], DatasetStats]:
    """Tokenized, masked and packed rows of conversations, and what was kept or skipped."""
    stats = DatasetStats()
    kept = []
    for messages in conversations:
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            stats.skipped_empty += 1
            continue
        ids, mask = encode_chat(tokenizer, messages)
        if not any(mask[1:]):
            stats.skipped_empty += 1
        elif len(ids) - 1 > seq_len:
            stats.skipped_too_long += 1
        else:
            kept.append((ids, mask))
            stats.target_tokens += sum(mask[1:])
    stats.examples = len(kept)
    if not kept:
        raise FormatError(
            f"no usable conversation: {stats.skipped_empty} without an assistant reply, "
            f"{stats.skipped_too_long} longer than seq_len={seq_len}"
        )
    pad = tokenizer.eos_token_id or 0
    rows = pack_examples(kept, seq_len, pad, packing)
    stats.rows = len(rows["input"])
    return rows, stats


class RowSampler:
    """The rows of step `step`: epochs of seeded permutations, a pure function of (seed, step)."""

    def __init__(self, n_rows: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n_rows, batch_size, seed

    def indices(self, step: int) -> np.ndarray:
        k = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs = k // self.n
        out = np.empty_like(k)
        for e in np.unique(epochs):
            perm = np.random.default_rng([self.seed, int(e)]).permutation(self.n)
            out[epochs == e] = perm[k[epochs == e] % self.n]
        return out


class SFTTask:
    """Cross-entropy on assistant tokens of packed conversations, summed (or averaged)."""

    def __init__(self, rows: dict[str, np.ndarray], cfg: TrainConfig, reduction: str = "sum"):
        if reduction not in REDUCTIONS:
            raise ValueError(f"loss reduction {reduction!r} is not one of {REDUCTIONS}")
        self.rows = {k: torch.from_numpy(v) for k, v in rows.items()}
        self.sampler = RowSampler(len(rows["input"]), cfg.batch_size, cfg.seed)
        self.reduction = reduction

    def batch(self, step: int) -> Batch:
        idx = torch.from_numpy(self.sampler.indices(step))
        return {k: v[idx] for k, v in self.rows.items()}

    def count(self, batch: Batch) -> int:
        return int((batch["target"] != IGNORE).sum())

    def normalizer(self, batch: Batch) -> float:
        return 1.0 if self.reduction == "sum" else float(self.count(batch))

    def loss_sum(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        packed = bool((batch["segments"].amax(dim=1) > 0).any())
        logits = forward_logits(model, batch["input"], batch["segments"] if packed else None)
        return F.cross_entropy(
            logits.flatten(0, 1).float(),
            batch["target"].flatten(),
            ignore_index=IGNORE,
            reduction="sum",
        )


def sft(
    model: nn.Module,
    tokenizer: Tokenizer,
    conversations: Iterable[Sequence[dict[str, str]]],
    cfg: TrainConfig,
    reduction: str = "sum",
    packing: bool = True,
    log: Callable[[str], None] = print,
    state: dict | None = None,
) -> tuple[FitResult, DatasetStats]:
    """Fine-tune `model` in place on conversations; the run's result and the data statistics."""
    rows, stats = build_sft_dataset(tokenizer, conversations, cfg.seq_len, packing)
    log(f"SFT data: {stats.summary()}")
    task = SFTTask(rows, cfg, reduction)
    return fit(model, task, cfg, log=log, state=state), stats
