"""The training commands as library calls: what `bitnet158 tokenize / train / sft / dpo /
quantize / export` do, so that a script can do the same without the CLI.

A run directory (`out`) holds `tokenizer.json`, `config.json` (the ModelConfig), the
checkpoints `step-NNNNNN/`, and `tokens/` when text was tokenized for it. Running the same
command again with the same `out` resumes from the newest checkpoint.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import ConfigError, FormatError
from ..formats.tokenizer import Tokenizer
from ..nn.model import Transformer
from .data import TokenizeStats, TokenShards, split_holdout, tokenize_to_shards
from .distributed import barrier, current
from .loop import TrainConfig
from .models import (
    export_hf,
    export_native,
    gathered,
    load_for_export,
    load_trainable,
    make_tokenizer,
)

Log = Callable[[str], None]


def _main_log(log: Log) -> Log:
    """`log` on process 0, silence on the others (each process of torchrun runs the command)."""
    return log if current().is_main else (lambda _msg: None)


def read_tokenizer(path: str | os.PathLike | None) -> tuple[str, str | None]:
    """tokenizer.json text and chat template: of a tokenizer.json file, a directory holding one,
    a bitnet158 run, or any model (None: the shipped model's)."""
    from ..formats.convert import read_checkpoint

    p = Path(path) if path is not None else None
    if p is not None and p.is_file() and p.suffix == ".json":
        return p.read_text(encoding="utf-8"), None
    if p is not None and p.is_dir() and (p / "tokenizer.json").is_file():
        template = p / "chat_template.jinja"
        return (p / "tokenizer.json").read_text(encoding="utf-8"), (
            template.read_text(encoding="utf-8") if template.is_file() else None
        )
    ckpt = read_checkpoint(path)
    return ckpt.tokenizer_json, ckpt.chat_template


def tokenize(
    files: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    field: str = "text",
    shard_tokens: int = 1 << 24,
    progress: bool = True,
) -> TokenizeStats:
    """Tokenize text / JSON-lines files into token shards in `out` (tokenizer.json copied there)."""
    return _tokenize(files, out, read_tokenizer(tokenizer)[0], field, shard_tokens, progress)


def _tokenize(files, out, tok_json: str, field="text", shard_tokens=1 << 24, progress=True):
    tok = Tokenizer.from_json(tok_json)
    out = Path(out)
    stats = tokenize_to_shards(
        [Path(f) for f in files],
        lambda text: tok.encode(text, add_bos=False),
        tok.vocab_size,
        tok.eos_token_id,
        out,
        field=field,
        shard_tokens=shard_tokens,
        progress=progress,
    )
    (out / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    return stats


def _main_first(work: Callable[[], object]) -> None:
    """Run `work` on process 0 only, the others waiting for it (files shared by the processes)."""
    if current().is_main:
        work()
    barrier()


def _token_data(paths: Sequence[str | os.PathLike], run: Path, tok_json: str, name: str):
    """Token shards of token directories or of text/JSON-lines files (tokenized into the run)."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1 and paths[0].is_dir():
        return TokenShards(paths[0])
    if any(p.is_dir() for p in paths):
        raise ConfigError("give one token directory, or text / JSON-lines files")
    _main_first(lambda: _tokenize(paths, run / name, tok_json))
    return TokenShards(run / name)


def _write_run_files(run: Path, cfg: ModelConfig, tok_json: str) -> None:
    """The run's config.json and tokenizer.json; a resumed run must have the same config."""
    cfg_path = run / "config.json"
    if cfg_path.is_file() and ModelConfig.from_json(cfg_path.read_text()) != cfg:
        raise ConfigError(
            f"{run} holds a run of another model configuration; use a new --out directory"
        )
    barrier()  # every process has read the old file before process 0 rewrites it

    def write() -> None:
        run.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(cfg.to_json())
        (run / "tokenizer.json").write_text(tok_json, encoding="utf-8")

    _main_first(write)


def _finish(model, result, tcfg: TrainConfig, tok_json: str, template, export, export_hf_dir, log):
    summary = {"steps": result.steps_done, "checkpoint": str(result.checkpoint or "")}
    if result.losses:
        summary["final_loss"] = result.losses[-1]
    if result.history:
        summary["val_loss"] = result.history[-1]["val_loss"]
        summary["val_ppl"] = math.exp(min(summary["val_loss"], 700))
    model = gathered(model)  # collective: every process takes part
    if current().is_main:
        if export:
            summary["export"] = str(export_native(model, export, tok_json, template))
            log(f"wrote {summary['export']} (bitnet158 packed format)")
        if export_hf_dir:
            summary["export_hf"] = str(export_hf(model, export_hf_dir, tok_json, template))
            log(f"wrote {summary['export_hf']} (transformers format)")
    return summary


def run_pretraining(
    data: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    tcfg: TrainConfig,
    *,
    model_config: ModelConfig | None = None,
    init: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    val_data: Sequence[str | os.PathLike] | None = None,
    val_tokens: int = 65536,
    ternary: bool = True,
    export: str | os.PathLike | None = None,
    export_hf_dir: str | os.PathLike | None = None,
    log: Log = print,
) -> dict:
    """Pretrain (or continue pretraining) a bitnet158 Transformer on token data; a summary."""
    log = _main_log(log)
    from .pretrain import pretrain

    run = Path(out)
    tcfg.out_dir = str(run)
    if init is not None:
        model, tok, info = load_trainable(init)
        tok_json, template = info["tokenizer_json"], info["chat_template"]
        if not ternary:
            raise ConfigError("--fp trains a new full-precision model; it cannot start from --init")
    else:
        if model_config is None:
            raise ConfigError("give a model configuration (config file or sizes) or --init MODEL")
        if tokenizer is None and len(data) == 1 and (Path(data[0]) / "tokenizer.json").is_file():
            tokenizer = data[0]  # the tokenizer `bitnet158 tokenize` used for these tokens
        tok_json, template = read_tokenizer(tokenizer)
        tok = Tokenizer.from_json(tok_json)
        if model_config.vocab_size < tok.vocab_size:
            raise ConfigError(
                f"vocab_size {model_config.vocab_size} is smaller than the tokenizer's "
                f"({tok.vocab_size})"
            )
        torch.manual_seed(tcfg.seed)
        model = Transformer(model_config, ternary=ternary)
    _write_run_files(run, model.config, tok_json)
    train_tokens = _token_data(data, run, tok_json, "tokens")
    if getattr(train_tokens, "vocab_size", 0) > model.config.vocab_size:
        raise ConfigError(
            f"the token data was made with a vocabulary of {train_tokens.vocab_size}, larger "
            f"than the model's {model.config.vocab_size}"
        )
    if val_data:
        held_out = _token_data(val_data, run, tok_json, "val_tokens")
    else:
        n_val = min(val_tokens, len(train_tokens) // 10)
        train_tokens, held_out = split_holdout(train_tokens, n_val)
    if len(held_out) <= tcfg.seq_len:
        held_out = None
        log("note: no held-out evaluation (the held-out set is shorter than one sequence)")
    log(
        f"{model.num_parameters():,} non-embedding parameters, {len(train_tokens):,} training tokens"
    )
    state = {"model_config": model.config.to_dict(), "ternary": ternary, "chat_template": template}
    result = pretrain(model, train_tokens, held_out, tcfg, log=log, state=state)
    return _finish(model, result, tcfg, tok_json, template, export, export_hf_dir, log)


def run_sft(
    model_path: str | os.PathLike | None,
    data: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    tcfg: TrainConfig,
    *,
    reduction: str = "sum",
    packing: bool = True,
    export: str | os.PathLike | None = None,
    export_hf_dir: str | os.PathLike | None = None,
    log: Log = print,
) -> dict:
    """Supervised fine-tuning of a model on JSON-lines conversations; a summary."""
    log = _main_log(log)
    from .sft import read_conversations, sft

    tcfg.out_dir = str(out)
    model, tok, info = load_trainable(model_path)
    _write_run_files(Path(out), model.config, info["tokenizer_json"])
    state = {"model_config": model.config.to_dict(), "ternary": True,
             "chat_template": info["chat_template"], "source": info["source"]}  # fmt: skip
    result, stats = sft(model, tok, read_conversations(data), tcfg, reduction, packing, log, state)
    summary = _finish(model, result, tcfg, info["tokenizer_json"], info["chat_template"],
                      export, export_hf_dir, log)  # fmt: skip
    summary["data"] = stats.summary()
    return summary


def run_dpo(
    model_path: str | os.PathLike | None,
    data: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    tcfg: TrainConfig,
    *,
    beta: float = 0.1,
    ref_model: str | os.PathLike | None = None,
    export: str | os.PathLike | None = None,
    export_hf_dir: str | os.PathLike | None = None,
    log: Log = print,
) -> dict:
    """DPO of a model on JSON-lines preference pairs against a frozen reference; a summary."""
    log = _main_log(log)
    from .dpo import dpo, read_preferences

    tcfg.out_dir = str(out)
    model, tok, info = load_trainable(model_path)
    ref = load_trainable(ref_model)[0] if ref_model is not None else None
    _write_run_files(Path(out), model.config, info["tokenizer_json"])
    state = {"model_config": model.config.to_dict(), "ternary": True, "beta": beta,
             "chat_template": info["chat_template"], "source": info["source"]}  # fmt: skip
    result, stats = dpo(model, tok, read_preferences(data), tcfg, beta, ref, log, state)
    summary = _finish(model, result, tcfg, info["tokenizer_json"], info["chat_template"],
                      export, export_hf_dir, log)  # fmt: skip
    summary["data"] = stats.summary()
    return summary


def run_quantize(
    src: str | os.PathLike,
    out: str | os.PathLike,
    tcfg: TrainConfig | None = None,
    *,
    data: Sequence[str | os.PathLike] | None = None,
    inner_norm: bool = False,
    native: str | os.PathLike | None = None,
    log: Log = print,
) -> dict:
    """A Hugging Face causal LM (directory) -> BitNet b1.58: convert, optionally fine-tune on
    text with a λ warm-up, and save as a transformers directory `out` (+ our file `native`)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ConfigError(
            "quantize reads Hugging Face models with transformers: pip install transformers"
        ) from None
    from ..nn.convert import quantize_model
    from .pretrain import pretrain

    src = Path(src)
    if not (src / "config.json").is_file():
        raise FormatError(f"{src}: not a Hugging Face model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, use_safetensors=True)
    tok_json, template = read_tokenizer(src)
    warmup = tcfg is not None and data and tcfg.lambda_schedule != "constant"
    quantize_model(model, inner_norm=inner_norm, lam=0.0 if warmup else 1.0)
    n = sum(1 for m in model.modules() if type(m).__name__ == "BitLinear")
    log(f"converted {n} linear layers of {src.name} to BitLinear")
    summary: dict = {"converted_layers": n}
    if data:
        if tcfg is None:
            raise ConfigError("fine-tuning needs a TrainConfig")
        work = Path(out).with_name(Path(out).name + ".run")
        tcfg.out_dir = str(work)
        tokens = _token_data(data, work, tok_json, "tokens")
        result = pretrain(model, tokens, None, tcfg, log=log)
        summary["final_loss"] = result.losses[-1] if result.losses else None
        lam = tcfg.lambda_sched()(max(tcfg.steps - 1, 0))
        if lam < 1.0:
            log(f"warning: λ is {lam:.2f} < 1 at the end of fine-tuning; the saved model is fully "
                "quantized and computes something else (use more steps or a shorter warm-up)")  # fmt: skip
    summary["hf"] = str(export_hf(model, out, tok_json, template))
    log(f"wrote {summary['hf']} (transformers format, BitNet quantization_config)")
    if native:
        summary["native"] = str(export_native(model, native, tok_json, template))
        log(f"wrote {summary['native']} (bitnet158 packed format)")
    return summary


def export_run(
    run_or_checkpoint: str | os.PathLike,
    dst: str | os.PathLike,
    hf: bool = False,
) -> Path:
    """Export a training checkpoint (or a run's newest) to our packed file, or a transformers dir."""
    from .models import tokenizer_of_run

    model, meta = load_for_export(run_or_checkpoint)
    p = Path(run_or_checkpoint)
    run = p if (p / "tokenizer.json").is_file() else p.parent
    tok_json, template = tokenizer_of_run(meta, run)
    make_tokenizer(tok_json, template, model.config)  # fails early on a broken tokenizer
    if hf:
        return export_hf(model, dst, tok_json, template)
    source = f"bitnet158 training checkpoint, step {meta['step']}"
    return export_native(model, dst, tok_json, template, source=source)
