"""Pretraining: next-token prediction on a token stream, the recipe of the BitNet b1.58 papers.

`train(model, train_tokens, val_tokens, cfg)` runs `loop.fit` with `LMTask` (random windows
of the token stream, chosen by (seed, step)) and evaluates held-out loss on the way; with
`cfg.out_dir` it checkpoints and resumes, under torchrun it runs on every process.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import batch_at
from .loop import Batch, FitResult, TrainConfig, fit, forward_logits, param_groups

__all__ = ["LMTask", "TrainConfig", "evaluate_loss", "param_groups", "pretrain", "train"]


class LMTask:
    """Mean next-token cross-entropy over random windows of a token stream."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int) -> None:
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed

    def batch(self, step: int) -> Batch:
        x, y = batch_at(self.tokens, step, self.batch_size, self.seq_len, self.seed)
        return {"input": torch.from_numpy(x), "target": torch.from_numpy(y)}

    def normalizer(self, batch: Batch) -> float:
        return float(batch["target"].numel())

    def count(self, batch: Batch) -> int:
        return batch["target"].numel()

    def loss_sum(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = forward_logits(model, batch["input"])
        return F.cross_entropy(
            logits.flatten(0, 1).float(), batch["target"].flatten(), reduction="sum"
        )


@torch.no_grad()
def evaluate_loss(model: nn.Module, tokens: np.ndarray, seq_len: int, max_tokens: int) -> float:
    """Mean next-token cross-entropy over consecutive windows of held-out tokens."""
    model.eval()
    n = min(len(tokens) - 1, max_tokens) // seq_len
    if n == 0:
        raise ValueError(
            f"held-out set of {len(tokens)} tokens is shorter than one sequence of {seq_len}"
        )
    window = np.asarray(tokens[: n * seq_len + 1], dtype=np.int64)
    x = torch.from_numpy(window[:-1].reshape(n, seq_len))
    y = torch.from_numpy(window[1:].reshape(n, seq_len))
    total = 0.0
    for i in range(0, n, 8):
        logits = forward_logits(model, x[i : i + 8])
        total += F.cross_entropy(
            logits.flatten(0, 1).float(), y[i : i + 8].flatten(), reduction="sum"
        ).item()
    model.train()
    return total / (n * seq_len)


def pretrain(
    model: nn.Module,
    train_tokens: np.ndarray,
    val_tokens: np.ndarray | None,
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
    on_step: Callable[[int, float], None] | None = None,
    state: dict | None = None,
) -> FitResult:
    """Pretrain `model` in place; the full result (per-step losses, evaluations, checkpoint)."""
    task = LMTask(train_tokens, cfg.batch_size, cfg.seq_len, cfg.seed)
    evaluate = None
    if val_tokens is not None:

        def evaluate(m: nn.Module) -> float:
            return evaluate_loss(m, val_tokens, cfg.seq_len, cfg.eval_tokens)

    return fit(model, task, cfg, evaluate=evaluate, log=log, on_step=on_step, state=state)


def train(
    model: nn.Module,
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train `model` in place; returns the history of evaluations."""
    return pretrain(model, train_tokens, val_tokens, cfg, log=log).history
