"""The pretraining loop: bf16 autocast, clipping, configuration errors, the evaluation history."""

import math

import numpy as np
import pytest
import torch
from train_fixtures import corpus_tokens, tiny_config

from bitnet158.errors import ConfigError
from bitnet158.nn.model import Transformer
from bitnet158.train import distributed
from bitnet158.train.loop import autocast_dtype
from bitnet158.train.pretrain import TrainConfig, pretrain, train

TOKENS = corpus_tokens()


def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config())


def cfg(**kw) -> TrainConfig:
    fields = dict(steps=12, batch_size=4, seq_len=32, warmup_steps=2, lr_peak=3e-3,
                  lr_cooldown=1e-3, log_every=100, eval_every=6, eval_tokens=512)  # fmt: skip
    return TrainConfig(**{**fields, **kw})


def test_bf16_autocast_follows_float32_and_learns():
    fp32 = pretrain(model(), TOKENS, None, cfg(), log=lambda s: None).losses
    bf16 = pretrain(model(), TOKENS, None, cfg(dtype="bfloat16"), log=lambda s: None).losses
    assert bf16[0] == pytest.approx(fp32[0], rel=1e-2)
    assert bf16[-1] == pytest.approx(fp32[-1], rel=0.03)
    assert bf16[-1] < bf16[0] - 0.3
    assert autocast_dtype("auto") == (torch.bfloat16 if distributed.bf16_supported() else None)
    assert autocast_dtype("float32") is None


def test_gradients_are_clipped_before_the_update(monkeypatch):
    seen = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    result = pretrain(model(), TOKENS, None, cfg(steps=3, grad_clip=0.05), log=lambda s: None)
    assert all(n > 0.05 for n in result.grad_norms)  # the norms before clipping
    assert seen == pytest.approx([0.05] * 3, rel=1e-4)


def test_train_returns_the_evaluation_history():
    history = train(model(), TOKENS[:-600], TOKENS[-600:], cfg(), log=lambda s: None)
    assert [h["step"] for h in history] == [6, 12]
    assert all(h["val_ppl"] == pytest.approx(math.exp(h["val_loss"])) for h in history)
    assert history[-1]["val_loss"] < history[0]["val_loss"]


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(batch_size=6, grad_accum=4), "split evenly"),
        (dict(dtype="float16"), "dtype"),
        (dict(strategy="zero3"), "strategy"),
        (dict(lambda_schedule="cosine"), "λ schedule"),
        (dict(steps=0), "steps must be positive"),
    ],
)
def test_bad_configurations_are_clear_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        pretrain(model(), TOKENS, None, cfg(**fields), log=lambda s: None)


def test_the_log_reports_loss_rate_and_lambda():
    lines = []
    pretrain(model(), TOKENS, None, cfg(steps=3, log_every=1, lambda_schedule="linear"),
             log=lines.append)  # fmt: skip
    assert len(lines) == 3 and all("loss" in s and "lr" in s and "λ" in s for s in lines)
    assert np.isfinite([float(s.split("loss ")[1].split()[0]) for s in lines]).all()
