"""Training BitNet b1.58 models (needs torch: `pip install bitnet158[train]`).

    from bitnet158.train import TrainConfig, pretrain, sft, dpo
    from bitnet158 import quantize_model

Pretraining (`pretrain`), supervised fine-tuning (`sft`) and DPO (`dpo`) share one loop
(`loop.fit`): two-stage schedules, gradient accumulation, bf16 autocast, clipping, DDP/FSDP2
under torchrun, atomic checkpoints with bit-identical resume. `commands` holds what the
`bitnet158 tokenize / train / sft / dpo / quantize / export` commands run.
"""

from .dpo import dpo
from .loop import FitResult, TrainConfig, TrainingError, fit
from .models import export_hf, export_native, load_trainable
from .pretrain import evaluate_loss, pretrain, train
from .sft import sft

__all__ = [
    "FitResult",
    "TrainConfig",
    "TrainingError",
    "dpo",
    "evaluate_loss",
    "export_hf",
    "export_native",
    "fit",
    "load_trainable",
    "pretrain",
    "sft",
    "train",
]
