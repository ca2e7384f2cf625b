"""The two-stage learning-rate and weight-decay schedules of the BitNet b1.58 2B4T report.

Stage 1 (high learning rate): linear warm-up to `lr_peak`, then cosine decay towards
`lr_peak * stage1_floor`. At `drop_at` (a fraction of the run) the rate drops abruptly to
`lr_cooldown` and follows a second cosine to `lr_min` ("cooldown"). Weight decay follows a
cosine from `wd_peak` (0.1) during stage 1 and is 0 in stage 2. (For the drop to be a drop,
`lr_cooldown` must be below `lr_peak * stage1_floor`.)

`LambdaSchedule` is the λ warm-up of quantization-aware fine-tuning of a converted fp16
model; `plot_schedules` draws all of them (`bitnet158 train --plot-schedule`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TwoStageSchedule:
    total_steps: int
    lr_peak: float = 1.5e-3
    lr_cooldown: float = 1e-3
    lr_min: float = 0.0
    warmup_steps: int = 100
    drop_at: float = 0.5
    stage1_floor: float = 0.5  # stage-1 cosine ends at lr_peak * stage1_floor
    wd_peak: float = 0.1

    def __post_init__(self) -> None:
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}")
        if not 0.0 < self.drop_at <= 1.0:
            raise ValueError(f"drop_at must be in (0, 1], got {self.drop_at}")

    @property
    def drop_step(self) -> int:
        return max(1, round(self.total_steps * self.drop_at))

    def lr(self, step: int) -> float:
        """Learning rate at `step` (0-based)."""
        if step < self.warmup_steps:
            return self.lr_peak * (step + 1) / self.warmup_steps
        if step < self.drop_step:
            t = (step - self.warmup_steps) / max(1, self.drop_step - self.warmup_steps)
            floor = self.lr_peak * self.stage1_floor
            return floor + (self.lr_peak - floor) * 0.5 * (1 + math.cos(math.pi * t))
        t = (step - self.drop_step) / max(1, self.total_steps - self.drop_step)
        return self.lr_min + (self.lr_cooldown - self.lr_min) * 0.5 * (
            1 + math.cos(math.pi * min(t, 1.0))
        )

    def weight_decay(self, step: int) -> float:
        """Weight decay at `step`: cosine from wd_peak in stage 1, zero in stage 2."""
        if step >= self.drop_step:
            return 0.0
        t = step / self.drop_step
        return self.wd_peak * 0.5 * (1 + math.cos(math.pi * t))


LAMBDA_KINDS = ("constant", "linear", "min", "sigmoid")


@dataclass(frozen=True)
class LambdaSchedule:
    """λ of the quantization warm-up (HF blog "Fine-tuning LLMs to 1.58bit"): the fraction of
    the quantization error applied in forward, `x + λ·(q(x) − x)`, from 0 (full precision) to 1.

    - "linear": λ = step / total_steps (the blog's first schedule, over the whole run);
    - "min": λ = min(step / warmup_steps, 1) (the blog's final choice, warmup_steps = 1000);
    - "sigmoid": λ = σ(k·(step / warmup_steps − 1/2)) rescaled to reach exactly 0 and 1;
    - "constant": λ = 1 always (training from scratch, or no warm-up).
    """

    kind: str = "constant"
    warmup_steps: int = 1000
    total_steps: int = 0  # for "linear"
    k: float = 100.0  # sharpness of "sigmoid"

    def __post_init__(self) -> None:
        if self.kind not in LAMBDA_KINDS:
            raise ValueError(f"λ schedule {self.kind!r} is not one of {LAMBDA_KINDS}")
        if self.kind == "linear" and self.total_steps <= 0:
            raise ValueError("the linear λ schedule needs total_steps > 0")
        if self.kind in ("min", "sigmoid") and self.warmup_steps <= 0:
            raise ValueError(f"the {self.kind} λ schedule needs warmup_steps > 0")

    def __call__(self, step: int) -> float:
        """λ at `step` (0-based), in [0, 1]."""
        if self.kind == "constant":
            return 1.0
        if self.kind == "linear":
            return min(step / self.total_steps, 1.0)
        t = min(step / self.warmup_steps, 1.0)
        if self.kind == "min":
            return t
        lo, hi = (1 / (1 + math.exp(self.k * 0.5)), 1 / (1 + math.exp(-self.k * 0.5)))
        return (1 / (1 + math.exp(-self.k * (t - 0.5))) - lo) / (hi - lo)


def plot_schedules(
    schedule: TwoStageSchedule,
    path: str,
    lam: LambdaSchedule | None = None,
    title: str | None = None,
) -> None:
    """Write a PNG of the learning rate, weight decay and (if given) λ against the step."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    steps = list(range(schedule.total_steps))
    panels = 3 if lam is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 3.2))
    axes[0].plot(steps, [schedule.lr(s) for s in steps])
    axes[0].axvline(schedule.drop_step, color="grey", linestyle=":", linewidth=1)
    axes[0].set(xlabel="step", ylabel="learning rate", title="two-stage learning rate")
    axes[1].plot(steps, [schedule.weight_decay(s) for s in steps], color="tab:orange")
    axes[1].set(xlabel="step", ylabel="weight decay", title="two-stage weight decay")
    if lam is not None:
        axes[2].plot(steps, [lam(s) for s in steps], color="tab:green")
        axes[2].set(xlabel="step", ylabel="λ", ylim=(-0.05, 1.05), title=f"λ warm-up ({lam.kind})")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
