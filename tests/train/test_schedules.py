"""The two-stage schedules against their definition, checked at hand-picked steps."""

import math

import pytest

from bitnet158.train.schedules import LambdaSchedule, TwoStageSchedule, plot_schedules


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


def test_lambda_schedules_against_their_definitions():
    assert LambdaSchedule("constant")(0) == 1.0
    lin = LambdaSchedule("linear", total_steps=200)
    assert [lin(s) for s in (0, 50, 200, 300)] == [0.0, 0.25, 1.0, 1.0]
    warm = LambdaSchedule("min", warmup_steps=1000)  # the HF blog's λ = min(step / 1000, 1)
    assert [warm(s) for s in (0, 1, 500, 1000, 5000)] == [0.0, 0.001, 0.5, 1.0, 1.0]
    sig = LambdaSchedule("sigmoid", warmup_steps=100, k=10)
    assert sig(0) == pytest.approx(0.0, abs=1e-12) and sig(100) == pytest.approx(1.0)
    assert sig(50) == pytest.approx(0.5)
    assert all(sig(s) <= sig(s + 1) for s in range(120))
    with pytest.raises(ValueError):
        LambdaSchedule("cosine")
    with pytest.raises(ValueError):
        LambdaSchedule("linear")  # no total_steps


def test_plot_schedules_writes_a_png(tmp_path):
    path = tmp_path / "schedule.png"
    plot_schedules(TwoStageSchedule(total_steps=300), str(path), LambdaSchedule("min", 100))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plots_the_schedule(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "s.png"
    args = ["train", "--plot-schedule", str(path), "--steps", "400", "--lambda-schedule", "min"]
    out = subprocess.run([sys.executable, "-m", "bitnet158.cli", *args], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert path.read_bytes()[:4] == b"\x89PNG"
