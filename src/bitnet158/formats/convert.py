"""Any supported checkpoint in, our packed file out; and a description of any model file.

`read_checkpoint` is the one entry point that turns a path (our file, a Hugging Face
checkpoint directory, or the shipped model's short name) into a `NativeCheckpoint`: packed
ternary weights, config, tokenizer text and chat template. Loading, converting, describing
and the torch `BitNet.from_pretrained` all start here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import FormatError
from .native import NativeCheckpoint, load_native, pack_tensors, save_native

SHIPPED_NAME = "shakespeare-b158"
SHIPPED_PATH = Path(__file__).resolve().parent.parent / "models" / f"{SHIPPED_NAME}.safetensors"


def resolve_path(path: str | os.PathLike | None) -> Path:
    """The file or directory a model argument names: None or the shipped name -> the shipped file."""
    if path is None or str(path) == SHIPPED_NAME:
        if not SHIPPED_PATH.exists():
            raise FormatError(f"the shipped model is missing from the installation: {SHIPPED_PATH}")
        return SHIPPED_PATH
    p = Path(path).expanduser()
    if not p.exists():
        raise FormatError(
            f"{p}: no such file or directory (give one of our .safetensors files, a "
            f"Hugging Face checkpoint directory, or '{SHIPPED_NAME}')"
        )
    return p


def _hf_tokenizer(directory: Path) -> tuple[str, str | None]:
    """tokenizer.json text and the chat template of a Hugging Face checkpoint directory."""
    tok_file = directory / "tokenizer.json"
    if not tok_file.is_file():
        raise FormatError(f"{tok_file}: missing (bitnet158 reads tokenizers from tokenizer.json)")
    template = None
    jinja_file = directory / "chat_template.jinja"
    config_file = directory / "tokenizer_config.json"
    if jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    elif config_file.is_file():
        try:
            template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
        except json.JSONDecodeError as exc:
            raise FormatError(f"{config_file}: not valid JSON ({exc})") from None
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
    return tok_file.read_text(encoding="utf-8"), template


def read_checkpoint(path: str | os.PathLike | None) -> NativeCheckpoint:
    """Load any supported model as packed tensors (memory-mapped when it is our file)."""
    p = resolve_path(path)
    if p.is_dir():
        from .hf import load_hf_checkpoint

        config, tensors = load_hf_checkpoint(p)
        tokenizer_json, template = _hf_tokenizer(p)
        return NativeCheckpoint(
            config=config,
            tensors=pack_tensors(config, tensors),
            tokenizer_json=tokenizer_json,
            chat_template=template,
            path=p,
            source=f"hf:{p.name}",
        )
    if p.suffix == ".gguf":
        raise FormatError(
            f"{p}: GGUF input is not supported yet; convert it with llama.cpp's tools "
            "to Hugging Face safetensors first"
        )
    if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise FormatError(
            f"{p}: pickle-based checkpoints are never loaded; use safetensors or GGUF"
        )
    return load_native(p)


def convert(src: str | os.PathLike, dst: str | os.PathLike, force: bool = False) -> dict:
    """Write `src` (any supported checkpoint) as our packed file `dst`; returns a summary."""
    dst = Path(dst)
    if dst.exists() and not force:
        raise FormatError(f"{dst} exists; pass --force (force=True) to overwrite it")
    ckpt = read_checkpoint(src)
    save_native(
        dst,
        ckpt.config,
        ckpt.tensors,
        ckpt.tokenizer_json,
        ckpt.chat_template,
        source=ckpt.source or str(src),
    )
    summary = describe(dst)
    return {
        "path": str(dst),
        "tensors": summary["tensors"],
        "bytes": summary["file_bytes"],
        "ternary_bits_per_weight": summary["ternary_bits_per_weight"],
    }


def describe(path: str | os.PathLike | None) -> dict:
    """Architecture, sizes, bits per weight and format of a model, as a flat dict."""
    ckpt = read_checkpoint(path)
    cfg = ckpt.config
    ternary = packed_bytes = other = 0
    for name, value in ckpt.tensors.items():
        if name.endswith(".packed"):
            packed_bytes += value.nbytes
        elif not name.endswith(".scale"):
            other += value.size
    per_layer = (
        cfg.hidden_size * (2 * cfg.q_size + 2 * cfg.kv_size)
        + 3 * cfg.hidden_size * cfg.intermediate_size
    )
    ternary = per_layer * cfg.num_layers
    p = Path(ckpt.path)
    file_bytes = (
        sum(f.stat().st_size for f in p.glob("*.safetensors")) if p.is_dir() else p.stat().st_size
    )
    return {
        "path": str(p),
        "format": "Hugging Face checkpoint (converted on load)"
        if p.is_dir()
        else "bitnet158 packed",
        "source": ckpt.source or "",
        "family": cfg.family,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "heads": f"{cfg.num_heads} query / {cfg.num_kv_heads} key-value, head_dim {cfg.head_dim}",
        "vocab_size": cfg.vocab_size,
        "ffn": f"{cfg.hidden_act} gated" + (", subln" if cfg.subln else ""),
        "tied_embeddings": cfg.tie_word_embeddings,
        "max_context": cfg.max_position_embeddings,
        "ternary_parameters": ternary,
        "other_parameters": int(other),
        "tensors": len(ckpt.tensors),
        "file_bytes": file_bytes,
        "ternary_bits_per_weight": round(8 * packed_bytes / ternary, 3) if ternary else 0.0,
        "embedding_dtype": str(np.asarray(ckpt.tensors["embed.weight"]).dtype).replace(
            "uint16", "bfloat16"
        ),
    }
