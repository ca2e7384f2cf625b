"""Direct Preference Optimization (Rafailov et al. 2023), the last stage of the 2B4T recipe.

For a prompt x with a preferred response y_w and a rejected one y_l, with the policy π and a
frozen reference model π_ref (the policy before DPO):

    loss = −log σ( β · [ (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x)) ] )

log π(y|x) is the sum of the log-probabilities of the response tokens; the loss is averaged
over the pairs of a batch. β defaults to 0.1 (the 2B4T report). Data: JSON lines with
`prompt` (a string, or a list of messages) and `chosen` / `rejected` (strings, or lists of
assistant messages, as TRL's conversational format).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FormatError
from ..formats.tokenizer import Tokenizer
from .data import read_jsonl
from .loop import Batch, FitResult, TrainConfig, fit, forward_logits
from .sft import IGNORE, RowSampler, encode_chat

Messages = list[dict[str, str]]


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """Per-pair DPO loss from sequence log-probabilities (each float[pairs])."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over positions of log p(target) where target != IGNORE: float32[rows]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = targets != IGNORE
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def _as_messages(value, role: str, where: str) -> Messages:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in value
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise FormatError(f"{where}: expected a string or a list of {{role, content}} messages")


def read_preferences(paths: Iterable[Path]) -> list[tuple[Messages, Messages, Messages]]:
    """(prompt, chosen, rejected) message lists of JSON-lines preference files."""
    out = []
    for path in paths:
        for lineno, obj in read_jsonl(Path(path)):
            where = f"{path}:{lineno}"
            missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
            if missing:
                raise FormatError(f"{where}: missing field(s) {missing}")
            out.append((
                _as_messages(obj["prompt"], "user", where),
                _as_messages(obj["chosen"], "assistant", where),
                _as_messages(obj["rejected"], "assistant", where),
            ))  # fmt: skip
    return out


@dataclass
class PreferenceStats:
    pairs: int = 0
    skipped_empty: int = 0
    skipped_too_long: int = 0

    def summary(self) -> str:
        return (
            f"{self.pairs} pairs; skipped {self.skipped_empty} with an empty response and "
            f"{self.skipped_too_long} over-long"
        )


def _encode_pair(tokenizer: Tokenizer, prompt: Messages, response: Messages):
    k = len(prompt)
    ids, mask = encode_chat(tokenizer, prompt + response, trainable=lambda i, m: i >= k)
    return ids, mask


def build_preference_dataset(
    tokenizer: Tokenizer, pairs: Iterable[tuple[Messages, Messages, Messages]], seq_len: int
) -> tuple[list[tuple], PreferenceStats]:
    """Tokenized (chosen ids, mask, rejected ids, mask) of each usable pair, and counts."""
    stats, kept = PreferenceStats(), []
    for prompt, chosen, rejected in pairs:
        if not all(any(m["content"].strip() for m in r) for r in (chosen, rejected)):
            stats.skipped_empty += 1
            continue
        c_ids, c_mask = _encode_pair(tokenizer, prompt, chosen)
        r_ids, r_mask = _encode_pair(tokenizer, prompt, rejected)
        if not any(c_mask[1:]) or not any(r_mask[1:]):
            stats.skipped_empty += 1
        elif max(len(c_ids), len(r_ids)) - 1 > seq_len:
            stats.skipped_too_long += 1
        else:
            kept.append((c_ids, c_mask, r_ids, r_mask))
    stats.pairs = len(kept)
    if not kept:
        raise FormatError(
            f"no usable preference pair: {stats.skipped_empty} with an empty response, "
            f"{stats.skipped_too_long} longer than seq_len={seq_len}"
        )
    return kept, stats


def _rows(examples: Sequence[tuple[list[int], list[bool]]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), width), pad, dtype=torch.long)
    y = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for r, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        x[r, :n] = torch.tensor(ids[:-1])
        y[r, :n] = torch.tensor(
            [t if m else IGNORE for t, m in zip(ids[1:], mask[1:], strict=True)]
        )
    return {"input": x, "target": y}


class DPOTask:
    """The DPO objective against a frozen copy of the initial policy."""

    def __init__(
        self,
        pairs: list[tuple],
        cfg: TrainConfig,
        ref_model: nn.Module,
        beta: float = 0.1,
        pad_id: int = 0,
    ) -> None:
        self.pairs, self.beta, self.pad = pairs, beta, pad_id
        self.ref = ref_model.eval().requires_grad_(False)
        self.sampler = RowSampler(len(pairs), cfg.batch_size, cfg.seed)

    def batch(self, step: int) -> Batch:
        chosen = [self.pairs[i][:2] for i in self.sampler.indices(step)]
        rejected = [self.pairs[i][2:] for i in self.sampler.indices(step)]
        both = _rows(chosen + rejected, self.pad)  # one width for the whole batch
        n = len(chosen)
        return {
            "chosen_input": both["input"][:n],
            "chosen_target": both["target"][:n],
            "rejected_input": both["input"][n:],
            "rejected_target": both["target"][n:],
        }

    def normalizer(self, batch: Batch) -> float:
        return float(len(batch["chosen_input"]))

    def count(self, batch: Batch) -> int:
        return len(batch["chosen_input"])

    def logps(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence log-probs of the chosen and of the rejected responses under `model`."""
        x = torch.cat([batch["chosen_input"], batch["rejected_input"]])
        y = torch.cat([batch["chosen_target"], batch["rejected_target"]])
        lp = sequence_logps(forward_logits(model, x), y)
        return lp[: len(lp) // 2], lp[len(lp) // 2 :]

    def loss_sum(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            ref_c, ref_r = self.logps(self.ref, batch)
        pol_c, pol_r = self.logps(model, batch)
        return dpo_loss(pol_c, pol_r, ref_c, ref_r, self.beta).sum()


def dpo(
    model: nn.Module,
    tokenizer: Tokenizer,
    pairs: Iterable[tuple[Messages, Messages, Messages]],
    cfg: TrainConfig,
    beta: float = 0.1,
    ref_model: nn.Module | None = None,
    log: Callable[[str], None] = print,
    state: dict | None = None,
) -> tuple[FitResult, PreferenceStats]:
    """Optimise `model` in place with DPO; the reference is a frozen copy of it unless given."""
    data, stats = build_preference_dataset(tokenizer, pairs, cfg.seq_len)
    log(f"DPO data: {stats.summary()}")
    ref = ref_model if ref_model is not None else copy.deepcopy(model)
    task = DPOTask(data, cfg, ref, beta, pad_id=tokenizer.eos_token_id or 0)
    return fit(model, task, cfg, log=log, state=state), stats
