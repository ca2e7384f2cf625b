"""The pretraining loop: AdamW with the two-stage LR / weight-decay schedules, gradient
clipping, periodic held-out evaluation. Single process; scale-out wraps the same step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import batch_at
from .schedules import TwoStageSchedule


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    seed: int = 0
    lr_peak: float = 1.5e-3
    lr_cooldown: float = 1e-3
    lr_min: float = 1e-5
    warmup_steps: int = 100
    drop_at: float = 0.5
    wd_peak: float = 0.1
    grad_clip: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    eval_every: int = 250
    eval_tokens: int = 65536
    log_every: int = 25

    def schedule(self) -> TwoStageSchedule:
        return TwoStageSchedule(
            total_steps=self.steps,
            lr_peak=self.lr_peak,
            lr_cooldown=self.lr_cooldown,
            lr_min=self.lr_min,
            warmup_steps=self.warmup_steps,
            drop_at=self.drop_at,
            wd_peak=self.wd_peak,
        )


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay applies to matrices of linear layers only, not to embeddings or norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.ndim == 2 and not name.startswith(("embed", "lm_head"))
        (decay if is_matrix else no_decay).append(p)
    return [
        {"params": decay, "decay": True},
        {"params": no_decay, "decay": False, "weight_decay": 0.0},
    ]


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
        logits = model(x[i : i + 8])
        total += F.cross_entropy(
            logits.flatten(0, 1), y[i : i + 8].flatten(), reduction="sum"
        ).item()
    model.train()
    return total / (n * seq_len)


def train(
    model: nn.Module,
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train `model` in place; returns the history of evaluations."""
    torch.manual_seed(cfg.seed)
    sched = cfg.schedule()
    opt = torch.optim.AdamW(param_groups(model), lr=sched.lr(0), betas=(cfg.beta1, cfg.beta2))
    history: list[dict] = []
    model.train()
    t0 = time.time()
    for step in range(cfg.steps):
        lr, wd = sched.lr(step), sched.weight_decay(step)
        for group in opt.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd if group["decay"] else 0.0
        x, y = batch_at(train_tokens, step, cfg.batch_size, cfg.seq_len, cfg.seed)
        logits = model(torch.from_numpy(x))
        loss = F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y).flatten())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            tok_s = (step + 1) * cfg.batch_size * cfg.seq_len / (time.time() - t0)
            log(
                f"step {step:5d}  loss {loss.item():.4f}  lr {lr:.2e}  wd {wd:.3f}  {tok_s:,.0f} tok/s"
            )
        if (step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1:
            val = evaluate_loss(model, val_tokens, cfg.seq_len, cfg.eval_tokens)
            history.append(
                {
                    "step": step + 1,
                    "train_loss": loss.item(),
                    "val_loss": val,
                    "val_ppl": math.exp(val),
                    "seconds": time.time() - t0,
                }
            )
            log(f"eval  step {step + 1}: held-out loss {val:.4f}  ppl {math.exp(val):.2f}")
    return history
