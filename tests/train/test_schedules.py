"""The two-stage schedules against their definition, checked at hand-picked steps."""

import math

import pytest

from bitnet158.train.schedules import TwoStageSchedule


def test_two_stage_learning_rate():
    s = TwoStageSchedule(
        total_steps=1000,
        lr_peak=1e-3,
        lr_cooldown=4e-4,
        lr_min=0.0,
        warmup_steps=100,
        drop_at=0.5,
        stage1_floor=0.5,
    )
    assert s.lr(0) == pytest.approx(1e-5)
    assert s.lr(99) == pytest.approx(1e-3)
    assert s.lr(100) == pytest.approx(1e-3)
    assert s.lr(300) == pytest.approx(5e-4 + 5e-4 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr(499) > 5e-4 > s.lr(500)  # the abrupt drop at half of the run
    assert s.lr(500) == pytest.approx(4e-4)
    assert s.lr(750) == pytest.approx(2e-4)
    assert s.lr(1000) == pytest.approx(0.0, abs=1e-12)


def test_two_stage_weight_decay():
    s = TwoStageSchedule(total_steps=200, drop_at=0.5, wd_peak=0.1)
    assert s.weight_decay(0) == pytest.approx(0.1)
    assert s.weight_decay(50) == pytest.approx(0.05)
    assert all(s.weight_decay(t) == 0.0 for t in range(100, 200))


def test_bad_schedule_is_an_error():
    with pytest.raises(ValueError):
        TwoStageSchedule(total_steps=0)
    with pytest.raises(ValueError):
        TwoStageSchedule(total_steps=10, drop_at=1.5)
