"""Run by tests/train/test_checkpoint.py: a small pretraining run that checkpoints every step.

argv: run directory, seconds to sleep after each step (so that the test can kill it mid-way).
Prints "training" once its imports are done, so that the test can time kills from there.
"""

import sys
import time

import numpy as np
import torch
from train_fixtures import tiny_config

from bitnet158.nn.model import Transformer
from bitnet158.train.pretrain import TrainConfig, pretrain


def main() -> None:
    out, delay = sys.argv[1], float(sys.argv[2])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=64))
    tokens = np.random.default_rng(0).integers(0, 64, 3000).astype(np.uint16)
    cfg = TrainConfig(steps=12, batch_size=4, seq_len=16, warmup_steps=2, lr_peak=3e-3,
                      out_dir=out, checkpoint_every=1, keep_checkpoints=3, log_every=100)  # fmt: skip
    print("training", flush=True)
    pretrain(model, tokens, None, cfg, log=print, on_step=lambda step, loss: time.sleep(delay))


if __name__ == "__main__":
    main()
