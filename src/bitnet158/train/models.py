"""Models in and out of training: load a model to fine-tune (`load_trainable`), and export a
model being trained to bitnet158's packed file (runs in `bitnet158.load`) or to the Hugging
Face transformers format.

Export works at any point of a run, from the model in memory or from a checkpoint directory
(`load_for_export`). A bitnet158 `Transformer` goes through its canonical tensors; a Hugging
Face model converted by `quantize_model` is mapped to the same canonical names (Llama-shaped
models only: the engine runs no biases, no sliding window).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, FormatError
from ..formats.native import NativeCheckpoint, save_native, unpack_tensors
from ..formats.tokenizer import Tokenizer
from ..nn.bitlinear import BitLinear
from ..nn.model import Transformer
from .checkpoint import latest_checkpoint, load_model_weights, read_state


def canonical_tensors(model: nn.Module):
    """(ModelConfig, canonical tensors) of a ternary Transformer or a quantized HF model."""
    from ..nn.convert import hf_to_tensors

    if not any(isinstance(m, BitLinear) for m in model.modules()):
        raise ConfigError(
            "the model has no BitLinear layer (a full-precision twin or an unconverted model): "
            "there is nothing ternary to export"
        )
    if isinstance(model, Transformer):
        return model.config, model.to_tensors()
    return hf_to_tensors(model)


def export_native(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer_json: str,
    chat_template: str | None = None,
    source: str | None = None,
) -> Path:
    """Write the model's deployed form (packed ternary weights) to our .safetensors file."""
    cfg, tensors = canonical_tensors(model)
    return save_native(path, cfg, tensors, tokenizer_json, chat_template, source=source)


def export_hf(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer_json: str,
    chat_template: str | None = None,
) -> Path:
    """Write a transformers checkpoint directory.

    A quantized Hugging Face model is saved with `save_pretrained` and a BitNet
    quantization_config (`autobitlinear`, online: transformers quantizes the latent weights
    in forward, as BitLinear does). A bitnet158 Transformer goes through
    `bitnet158.formats.hf_export` (transformers' packed BitNet layout).
    """
    directory = Path(directory)
    if isinstance(model, Transformer):
        from ..formats.hf_export import save_hf

        cfg, tensors = canonical_tensors(model)
        ckpt = NativeCheckpoint(cfg, {}, tokenizer_json, chat_template, directory)
        return save_hf(directory, ckpt, tensors)
    info = getattr(model, "bitnet158_quantization", None)
    if info is None or not hasattr(model, "save_pretrained"):
        raise ConfigError(
            "export_hf takes a bitnet158 Transformer or a quantize_model()'d HF model"
        )
    if info.get("inner_norm"):
        raise ConfigError("transformers has no parameter-free RMSNorm inside its BitNet layers")
    model.config.quantization_config = {
        "quant_method": "bitnet",
        "linear_class": "autobitlinear",
        "quantization_mode": "online",
        "modules_to_not_convert": info["not_converted"],
    }
    try:
        model.save_pretrained(directory, safe_serialization=True)
    finally:
        del model.config.quantization_config  # the live model is not transformers-quantized
    (directory / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    if chat_template:
        (directory / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return directory


def gathered(model: nn.Module) -> nn.Module | None:
    """The whole model on process 0 of a distributed run (None elsewhere), the model otherwise.

    Under FSDP each process holds a shard: every process must call this (it gathers).
    """
    from .distributed import current

    if not current().enabled:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not current().is_main:
        return None
    if not isinstance(model, Transformer):
        raise ConfigError("exporting a distributed run works for bitnet158 Transformers only")
    copy = Transformer(model.config, ternary=any(isinstance(m, BitLinear) for m in model.modules()))
    copy.load_state_dict(full)
    return copy


def load_for_export(run_or_checkpoint: str | os.PathLike) -> tuple[Transformer, dict]:
    """The Transformer of a bitnet158 training checkpoint (or a run's newest one), and its state.json."""
    path = Path(run_or_checkpoint)
    ckpt = path if (path / "state.json").is_file() else latest_checkpoint(path)
    if ckpt is None:
        raise FormatError(f"{path}: neither a training checkpoint nor a run directory holding one")
    meta = read_state(ckpt)
    if "model_config" not in meta:
        raise FormatError(
            f"{ckpt}: this checkpoint holds no bitnet158 model config (a Hugging Face model "
            "run: export it with export_hf / export_native from the live model)"
        )
    cfg = ModelConfig.from_dict(meta["model_config"])
    model = Transformer(cfg, ternary=meta.get("ternary", True))
    missing, unexpected = model.load_state_dict(load_model_weights(ckpt), strict=False)
    if missing or unexpected:
        raise FormatError(
            f"{ckpt}: weights do not match its config ({missing[:3]} {unexpected[:3]})"
        )
    return model, meta


def tokenizer_of_run(meta: dict, run_dir: Path) -> tuple[str, str | None]:
    """tokenizer.json text and chat template a run stored beside its checkpoints."""
    tok = run_dir / "tokenizer.json"
    if not tok.is_file():
        raise FormatError(f"{run_dir}: no tokenizer.json beside the checkpoints")
    template = meta.get("chat_template")
    return tok.read_text(encoding="utf-8"), template if isinstance(template, str) else None


def load_trainable(path: str | os.PathLike | None) -> tuple[Transformer, Tokenizer, dict]:
    """A bitnet158 Transformer to fine-tune, its tokenizer, and a description of the source.

    `path`: a training run or checkpoint directory (latent weights, exact), or any model
    `bitnet158.load` reads (our file, a Hugging Face BitNet directory, the shipped model's
    name): its ternary weights become latent weights with a free scale (`unfreeze_scales`).
    """
    from ..formats.convert import read_checkpoint
    from ..nn.convert import unfreeze_scales

    p = Path(path) if path is not None else None
    if p is not None and p.is_dir() and ((p / "state.json").is_file() or latest_checkpoint(p)):
        model, meta = load_for_export(p)
        run_dir = p if latest_checkpoint(p) else p.parent
        tok_json, template = tokenizer_of_run(meta, run_dir)
        source = str(p)
    else:
        ckpt = read_checkpoint(path)
        model = Transformer.from_tensors(
            ckpt.config, unpack_tensors(ckpt.config, ckpt.tensors, ckpt.layout)
        )
        unfreeze_scales(model)
        tok_json, template, source = ckpt.tokenizer_json, ckpt.chat_template, str(ckpt.path)
    return model, make_tokenizer(tok_json, template, model.config), {
        "source": source, "tokenizer_json": tok_json, "chat_template": template,
    }  # fmt: skip


def make_tokenizer(tokenizer_json: str, chat_template: str | None, cfg: ModelConfig) -> Tokenizer:
    """The Tokenizer of a model, BOS/EOS taken from its config where it names them."""
    return Tokenizer.for_model(tokenizer_json, chat_template, cfg)
