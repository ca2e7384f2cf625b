"""The training loop shared by pretraining, SFT and DPO.

One step: the task builds the global batch of the step (a pure function of the seed and the
step, so a resumed or re-launched run sees the same data); each process takes its rows, in
`grad_accum` micro-batches; the task returns the SUM of its per-item losses over a
micro-batch, which the loop divides by the task's normaliser of the whole global batch (the
number of target tokens for a mean, 1 for a summed loss, the number of pairs for DPO) and
multiplies by the number of processes, undoing DDP/FSDP's gradient averaging. So the gradient
of a step does not depend on how its batch is split across processes and micro-batches, and
one process with the same global batch follows the same loss curve (to float rounding).

Then: a NaN/Inf loss or gradient norm stops the run (`TrainingError`, with the step; the last
checkpoint stays the last good one), gradients are clipped, AdamW steps with the two-stage
learning rate and weight decay, and the λ warm-up of BitLinear advances.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import BitNetError, ConfigError
from ..nn.bitlinear import BitLinear, set_lambda
from . import distributed
from .checkpoint import latest_checkpoint, load_checkpoint, read_state, save_checkpoint
from .schedules import LambdaSchedule, TwoStageSchedule

DTYPES = ("float32", "bfloat16", "auto")


class TrainingError(BitNetError):
    """Training cannot go on: a NaN/Inf loss or gradient, an empty batch."""


@dataclass
class TrainConfig:
    """Hyperparameters of one run; `batch_size` is the GLOBAL batch (rows per optimizer step)."""

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    seed: int = 0
    lr_peak: float = 1.5e-3
    lr_cooldown: float = 5e-4  # below lr_peak * lr_stage1_floor: the drop at drop_at is a drop
    lr_min: float = 1e-5
    lr_stage1_floor: float = 0.5  # stage-1 cosine ends at lr_peak * this
    warmup_steps: int = 100
    drop_at: float = 0.5
    wd_peak: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    beta1: float = 0.9
    beta2: float = 0.95
    eval_every: int = 250
    eval_tokens: int = 65536
    log_every: int = 25
    grad_accum: int = 1  # micro-batches per process and step
    dtype: str = "float32"  # float32, bfloat16 (autocast), or auto (bfloat16 if the CPU has it)
    strategy: str = "ddp"  # ddp or fsdp, when launched with torchrun
    out_dir: str | None = None  # run directory for checkpoints
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the newest checkpoint in out_dir
    lambda_schedule: str = "constant"  # λ warm-up of BitLinear: constant, linear, min, sigmoid
    lambda_warmup: int = 1000
    progress: bool = False  # tqdm progress bar

    def schedule(self) -> TwoStageSchedule:
        return TwoStageSchedule(
            total_steps=self.steps,
            lr_peak=self.lr_peak,
            lr_cooldown=self.lr_cooldown,
            lr_min=self.lr_min,
            warmup_steps=self.warmup_steps,
            drop_at=self.drop_at,
            stage1_floor=self.lr_stage1_floor,
            wd_peak=self.wd_peak,
        )

    def lambda_sched(self) -> LambdaSchedule:
        return LambdaSchedule(
            self.lambda_schedule, warmup_steps=self.lambda_warmup, total_steps=self.steps
        )

    def validate(self, world_size: int = 1) -> None:
        """Raise ConfigError on values the loop cannot run."""
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not one of {DTYPES}")
        if self.strategy not in distributed.STRATEGIES:
            raise ConfigError(f"strategy {self.strategy!r} is not one of {distributed.STRATEGIES}")
        if self.batch_size % (world_size * self.grad_accum):
            raise ConfigError(
                f"the global batch ({self.batch_size}) must split evenly into {world_size} "
                f"process(es) x {self.grad_accum} micro-batch(es)"
            )
        try:
            self.schedule(), self.lambda_sched()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


Batch = dict[str, torch.Tensor]


class Task(Protocol):
    """What a training objective supplies to `fit`."""

    def batch(self, step: int) -> Batch:
        """The global batch of `step`: tensors whose first axis is the rows (deterministic)."""

    def normalizer(self, batch: Batch) -> float:
        """The divisor of the summed loss of the whole global batch."""

    def count(self, batch: Batch) -> int:
        """How many terms the summed loss of the global batch has (tokens, pairs), for logs."""

    def loss_sum(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The sum of the per-item losses of (part of) a batch, a scalar tensor with grad."""


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)  # evaluations
    losses: list[float] = field(default_factory=list)  # the objective at every step
    grad_norms: list[float] = field(default_factory=list)  # before clipping, every step
    steps_done: int = 0
    checkpoint: Path | None = None


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (FSDP2 wraps in place)."""
    return getattr(model, "module", model)


def forward_logits(
    model: nn.Module, idx: torch.Tensor, segment_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits [B, T, vocab] of bitnet158's Transformer or of a Hugging Face causal LM."""
    from ..nn.model import Transformer

    if isinstance(unwrap(model), Transformer):
        return model(idx) if segment_ids is None else model(idx, segment_ids=segment_ids)
    if segment_ids is not None:
        raise ConfigError("packed sequences need bitnet158's Transformer (use --no-packing)")
    return model(input_ids=idx, use_cache=False).logits


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay applies to matrices of linear layers only, not to embeddings, lm_head or norms."""
    decay_ids = {
        id(m.weight)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not name.endswith("lm_head")
    }
    decay_ids -= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}  # tied
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) in decay_ids], "decay": True},
        {"params": [p for p in params if id(p) not in decay_ids], "decay": False,
         "weight_decay": 0.0},
    ]  # fmt: skip


def autocast_dtype(dtype: str) -> torch.dtype | None:
    """The autocast dtype of a TrainConfig.dtype ("auto": bfloat16 where the CPU supports it)."""
    if dtype == "auto":
        return torch.bfloat16 if distributed.bf16_supported() else None
    return torch.bfloat16 if dtype == "bfloat16" else None


def _no_sync(wrapped: nn.Module, model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):  # DDP
        return wrapped.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)

        @contextlib.contextmanager
        def restore():
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return restore()
    return contextlib.nullcontext()


def _full(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _accumulate_gradients(
    task: Task,
    batch: Batch,
    wrapped: nn.Module,
    model: nn.Module,
    cfg: TrainConfig,
    info: distributed.DistInfo,
    amp: torch.dtype | None,
    denom: float,
) -> torch.Tensor:
    """Backward over this process's micro-batches; the summed loss of the whole global batch."""
    per_rank = cfg.batch_size // info.world_size
    micro = per_rank // cfg.grad_accum
    local = torch.zeros((), dtype=torch.float64)
    for m in range(cfg.grad_accum):
        lo = info.rank * per_rank + m * micro
        part = {k: v[lo : lo + micro] for k, v in batch.items()}
        with _no_sync(wrapped, model, m == cfg.grad_accum - 1):
            with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
                loss_sum = task.loss_sum(wrapped, part)
            # x world size: DDP / FSDP average the gradients of the processes, we want the sum
            (loss_sum.float() * (info.world_size / denom)).backward()
        local += loss_sum.detach().double()
    return distributed.all_reduce_sum(local)


def fit(
    model: nn.Module,
    task: Task,
    cfg: TrainConfig,
    evaluate: Callable[[nn.Module], float] | None = None,
    log: Callable[[str], None] = print,
    on_step: Callable[[int, float], None] | None = None,
    state: dict[str, Any] | None = None,
) -> FitResult:
    """Train `model` in place on `task` for cfg.steps optimizer steps (resuming from cfg.out_dir).

    Every process of a torchrun launch calls it. `evaluate(model) -> loss` runs every
    cfg.eval_every steps and at the end; `state` is stored in each checkpoint's state.json.
    """
    info = distributed.current()
    cfg.validate(info.world_size)
    torch.manual_seed(cfg.seed)
    wrapped = distributed.wrap_model(model, cfg.strategy, info)
    sched, lam_sched = cfg.schedule(), cfg.lambda_sched()
    opt = torch.optim.AdamW(param_groups(model), lr=sched.lr(0), betas=(cfg.beta1, cfg.beta2))
    amp = autocast_dtype(cfg.dtype)
    result = FitResult()
    ckpt_state = {"train_config": dataclasses.asdict(cfg), **(state or {})}
    bar = None
    if cfg.progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, unit="step", desc="train")
    say = (bar.write if bar is not None else log) if info.is_main else (lambda _msg: None)

    if cfg.out_dir and cfg.resume and (last := latest_checkpoint(cfg.out_dir)) is not None:
        _check_resumable(last, read_state(last).get("train_config", {}), cfg)
        meta = load_checkpoint(last, wrapped, opt)
        result.steps_done = meta["step"]
        result.history = meta.get("history", [])
        result.losses, result.grad_norms = meta.get("losses", []), meta.get("grad_norms", [])
        say(f"resumed from {last} (step {result.steps_done})")
        if bar is not None:
            bar.update(result.steps_done)

    has_bitlinear = any(isinstance(m, BitLinear) for m in model.modules())
    warmup = has_bitlinear and cfg.lambda_schedule != "constant"
    wrapped.train()
    t0, first = time.time(), result.steps_done
    for step in range(result.steps_done, cfg.steps):
        lr, wd, lam = sched.lr(step), sched.weight_decay(step), lam_sched(step)
        for group in opt.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd if group["decay"] else 0.0
        if warmup:
            set_lambda(model, lam)
        batch = task.batch(step)
        rows = next(iter(batch.values())).shape[0]
        if rows != cfg.batch_size:
            raise TrainingError(f"step {step}: the task built {rows} rows, not {cfg.batch_size}")
        denom = float(task.normalizer(batch))
        if not denom > 0:
            raise TrainingError(f"step {step}: nothing to learn from in the batch ({denom})")
        total = _accumulate_gradients(task, batch, wrapped, model, cfg, info, amp, denom)
        loss = (total / denom).item()
        if not math.isfinite(loss):
            raise TrainingError(_stopped("loss", loss, step, cfg))
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        gnorm = _full(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)).item()
        if not math.isfinite(gnorm):
            raise TrainingError(_stopped("gradient norm", gnorm, step, cfg))
        opt.step()
        opt.zero_grad(set_to_none=True)
        result.steps_done = step + 1
        result.losses.append(loss)
        result.grad_norms.append(gnorm)
        if on_step is not None:
            on_step(step, loss)
        per_item = (total / task.count(batch)).item()  # per token (or pair), whatever the sum
        if bar is not None:
            bar.set_postfix(loss=f"{per_item:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            rate = (step + 1 - first) / max(time.time() - t0, 1e-9)
            shown = f"loss {loss:.4f}" + (f" ({per_item:.4f}/item)" if per_item != loss else "")
            say(f"step {step:5d}  {shown}  lr {lr:.2e}  wd {wd:.3f}  |g| {gnorm:.3f}"
                + (f"  λ {lam:.3f}" if warmup else "") + f"  {rate:.2f} step/s")  # fmt: skip
        if evaluate is not None and ((step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1):
            val = evaluate(wrapped)
            wrapped.train()
            ppl = math.exp(min(val, 700))
            result.history.append({"step": step + 1, "train_loss": per_item, "val_loss": val,
                                   "val_ppl": ppl, "seconds": time.time() - t0})  # fmt: skip
            say(f"eval  step {step + 1}: held-out loss {val:.4f}  ppl {ppl:.2f}")
        every = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
        if cfg.out_dir and (every or step == cfg.steps - 1):
            result.checkpoint = save_checkpoint(
                cfg.out_dir, result.steps_done, wrapped, opt,
                {**ckpt_state, "history": result.history, "losses": result.losses,
                 "grad_norms": result.grad_norms},
                keep=cfg.keep_checkpoints,
            )  # fmt: skip
    if bar is not None:
        bar.close()
    if cfg.out_dir and result.checkpoint is None and result.steps_done:
        result.checkpoint = latest_checkpoint(cfg.out_dir)  # resumed at the end already
    return result


def _stopped(what: str, value: float, step: int, cfg: TrainConfig) -> str:
    last = latest_checkpoint(cfg.out_dir) if cfg.out_dir else None
    keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
    return (
        f"{what} is {value} at step {step}: training stopped ({keep}). Lower the learning "
        "rate, check the data, or resume from the checkpoint."
    )


def _check_resumable(where: Path, saved: dict, cfg: TrainConfig) -> None:
    """A checkpoint resumes only a run with the same data order and batch."""
    for key in ("seed", "batch_size", "seq_len"):
        if key in saved and saved[key] != getattr(cfg, key):
            raise ConfigError(
                f"{where}: written by a run with {key}={saved[key]}, this run has "
                f"{key}={getattr(cfg, key)}; use a new --out directory or the same settings"
            )
