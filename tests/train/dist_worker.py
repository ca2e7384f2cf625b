"""Run by tests/train/test_distributed.py under torchrun (or imported): a few pretraining steps
of a tiny model, BitNet and its full-precision twin, with a global batch of 8; process 0 writes
the per-step losses and gradient norms to the JSON file argv[1]."""

import json
import sys

import numpy as np
import torch

from bitnet158.config import ModelConfig
from bitnet158.nn.model import Transformer
from bitnet158.train.distributed import process_group
from bitnet158.train.pretrain import TrainConfig, pretrain


def train_curve(
    strategy: str, grad_accum: int, ternary: bool, out_dir: str | None = None
) -> dict[str, list[float]]:
    torch.set_num_threads(1)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=2, num_kv_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg, ternary=ternary)
    tokens = np.random.default_rng(0).integers(0, 64, 4000).astype(np.uint16)
    tc = TrainConfig(steps=6, batch_size=8, seq_len=16, warmup_steps=2, lr_peak=3e-3,
                     grad_accum=grad_accum, strategy=strategy, log_every=100,
                     out_dir=out_dir)  # fmt: skip
    result = pretrain(model, tokens, None, tc, log=lambda s: None)
    return {"losses": result.losses, "grad_norms": result.grad_norms}


def fp_model() -> Transformer:
    """The fp twin as train_curve builds it (to load a checkpoint into)."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=2, num_kv_heads=2)  # fmt: skip
    return Transformer(cfg, ternary=False)


def main() -> None:
    out, strategy, accum = sys.argv[1], sys.argv[2], int(sys.argv[3])
    run_dir = out.removesuffix(".json") + "-fp-run"  # the fp run also writes a checkpoint
    with process_group() as info:
        curves = {kind: train_curve(strategy, accum, kind == "bitnet",
                                    run_dir if kind == "fp" else None)
                  for kind in ("fp", "bitnet")}  # fmt: skip
        if info.is_main:
            with open(out, "w") as f:
                json.dump({"world": info.world_size, **curves}, f)


if __name__ == "__main__":
    main()
