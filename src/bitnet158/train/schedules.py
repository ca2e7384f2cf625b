"""The two-stage learning-rate and weight-decay schedules of the BitNet b1.58 2B4T report.

Stage 1 (high learning rate): linear warm-up to `lr_peak`, then cosine decay towards
`lr_peak * stage1_floor`. At `drop_at` (a fraction of the run) the rate drops abruptly to
`lr_cooldown` and follows a second cosine to `lr_min` ("cooldown"). Weight decay follows a
cosine from `wd_peak` (0.1) during stage 1 and is 0 in stage 2.
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
