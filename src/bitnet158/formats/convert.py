"""Any supported checkpoint in, any supported format out; and a description of any model file.

`read_checkpoint` is the one entry point that turns a path (our file, a Hugging Face
checkpoint directory, a GGUF file, or the shipped model's short name) into a
`NativeCheckpoint`: packed ternary weights, config, tokenizer text and chat template. Loading,
converting, describing and the torch `BitNet.from_pretrained` all start here. `convert`
writes one to our file, a llama.cpp GGUF (TQ2_0 / TQ1_0) or a Hugging Face checkpoint
(packed, or the bf16 form), always atomically.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from ..errors import FormatError
from ..packing import pack_ours
from .native import (
    LAYOUTS,
    PROJECTIONS,
    NativeCheckpoint,
    load_native,
    pack_tensors,
    projection_shapes,
    save_native,
    unpack_tensors,
)
from .tokenizer import read_chat_template

SHIPPED_NAME = "shakespeare-b158"
SHIPPED_PATH = Path(__file__).resolve().parent.parent / "models" / f"{SHIPPED_NAME}.safetensors"
# `convert --to` targets: our file (2-bit or 1.6-bit layout), llama.cpp GGUF, Hugging Face
# packed / bf16 latent
TARGETS = ("bitnet158", "bitnet158-tq1", "gguf-tq2_0", "gguf-tq1_0", "hf", "hf-bf16")

Progress = Callable[[Iterable], Iterable]


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
    try:
        text = tok_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{tok_file}: cannot read it as UTF-8 text ({exc})") from None
    return text, read_chat_template(directory)


def source_kind(path: str | os.PathLike | None) -> str:
    """What a model path holds: "bitnet158", "gguf" or "hf" (a checkpoint directory)."""
    p = resolve_path(path)
    if p.is_dir():
        return "hf"
    if p.suffix == ".gguf":
        return "gguf"
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise FormatError(f"{p}: cannot read it ({exc.strerror or exc})") from None
    return "gguf" if head == b"GGUF" else "bitnet158"


def read_checkpoint(
    path: str | os.PathLike | None, progress: Progress | None = None
) -> NativeCheckpoint:
    """Load any supported model as packed tensors (memory-mapped when it is our file)."""
    p = resolve_path(path)
    kind = source_kind(p)
    if kind == "hf":
        from .hf import load_hf_checkpoint

        config, tensors = load_hf_checkpoint(p)
        tokenizer_json, template = _hf_tokenizer(p)
        return NativeCheckpoint(
            config=config,
            tensors=pack_tensors(config, _pack_layers(config, tensors, progress)),
            tokenizer_json=tokenizer_json,
            chat_template=template,
            path=p,
            source=f"hf:{p.name}",
        )
    if kind == "gguf":
        from .gguf import load_gguf

        return load_gguf(p, progress)
    if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise FormatError(
            f"{p}: pickle-based checkpoints are never loaded; use safetensors or GGUF"
        )
    return load_native(p)


class LazyCanonical(Mapping):
    """The canonical tensors of a packed checkpoint, each ternary matrix unpacked when read.

    Writers go layer by layer; unpacking everything first would hold a 2B model's int8 codes
    (2 GB) at once.
    """

    def __init__(self, config, packed: dict[str, np.ndarray], layout: str = "2bit") -> None:
        self.config, self.packed, self.layout = config, packed, layout
        self.names = {
            n.removesuffix(".packed") + ".codes" if n.endswith(".packed") else n: n for n in packed
        }

    def __getitem__(self, name: str) -> np.ndarray:
        stored = self.names[name]
        return unpack_tensors(self.config, {stored: self.packed[stored]}, self.layout)[name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _pack_layers(config, tensors: dict, progress: Progress | None) -> dict:
    """Canonical tensors with every layer's `.codes` packed into our layout, layer by layer."""
    if progress is None:
        return tensors
    out = dict(tensors)
    for i in progress(range(config.num_layers)):
        for name in [n for n in out if n.startswith(f"layers.{i}.") and n.endswith(".codes")]:
            out[name.removesuffix(".codes") + ".packed"] = pack_ours(out.pop(name))
    return out


def _repack(
    ckpt: NativeCheckpoint, canonical: LazyCanonical, layout: str, progress: Progress | None
) -> dict[str, np.ndarray]:
    """ckpt's tensors with every ternary matrix packed into `layout`, a layer at a time."""
    pack = LAYOUTS[layout][1]
    out = {n: v for n, v in ckpt.tensors.items() if not n.endswith(".packed")}
    layers = range(ckpt.config.num_layers)
    for i in progress(layers) if progress else layers:
        for proj in PROJECTIONS:
            out[f"layers.{i}.{proj}.packed"] = pack(canonical[f"layers.{i}.{proj}.codes"])
    return out


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    force: bool = False,
    to: str = "bitnet158",
    embedding_type: str = "f16",
    progress: Progress | None = None,
) -> dict:
    """Write `src` (any supported checkpoint) as `dst` in format `to`; returns a summary.

    `to` is one of TARGETS; `embedding_type` (f16, f32, q8_0) applies to GGUF output. The
    output is written under a temporary name and renamed into place, so a failed conversion
    leaves no partial file; an existing `dst` is replaced only with force=True.
    """
    if to not in TARGETS:
        raise FormatError(f"unknown output format {to!r}; choose one of {', '.join(TARGETS)}")
    dst = Path(dst)
    if dst.exists() and not force:
        raise FormatError(f"{dst} exists; pass --force (force=True) to overwrite it")
    src_path = resolve_path(src)
    if dst.exists() and dst.resolve() == src_path.resolve():
        raise FormatError(f"{dst} is the source itself; write to another path")
    kind = source_kind(src_path)
    ckpt = read_checkpoint(src_path, progress)
    source = ckpt.source or str(src)
    canonical = LazyCanonical(ckpt.config, ckpt.tensors, ckpt.layout)
    if to.startswith("bitnet158"):
        layout = "tq1" if to == "bitnet158-tq1" else "2bit"
        tensors = ckpt.tensors  # packed tensors pass through when the layout stays
        if layout != ckpt.layout:
            tensors = _repack(ckpt, canonical, layout, progress)
        save_native(dst, ckpt.config, tensors, ckpt.tokenizer_json, ckpt.chat_template, source,
                    layout)  # fmt: skip
    elif to.startswith("gguf-"):
        from .gguf import write_gguf

        write_gguf(dst, ckpt, canonical, to.removeprefix("gguf-"), embedding_type, progress)
    else:
        from .hf_export import save_hf

        save_hf(dst, ckpt, canonical, latent=to == "hf-bf16", progress=progress)
    return {"path": str(dst), "from": kind, "to": to, **output_summary(dst, ckpt, to)}


def output_summary(dst: Path, ckpt: NativeCheckpoint, to: str) -> dict:
    """Tensors, bytes and bits per ternary weight of a written file or directory."""
    cfg = ckpt.config
    ternary = cfg.num_layers * sum(n * k for n, k in projection_shapes(cfg).values())
    if to.startswith("gguf-"):
        from .gguf import read_gguf

        f = read_gguf(dst)
        names = list(f.tensors)
        ternary_bytes = sum(
            t.nbytes for t in f.tensors.values() if t.name.rsplit(".", 2)[-2] in _GGUF_PROJ
        )
        total = dst.stat().st_size
    elif to.startswith("hf"):
        from .native import read_header

        file = dst / "model.safetensors"
        header, _ = read_header(file, np.memmap(file, dtype=np.uint8, mode="r"))
        names = [n for n in header if n != "__metadata__"]
        ternary_bytes = sum(
            int(np.diff(header[n]["data_offsets"])[0])
            for n in names
            if n.endswith(("_proj.weight", "_proj.weight_scale"))
        )
        total = sum(f.stat().st_size for f in dst.iterdir())
    else:
        native = load_native(dst)
        names = list(native.tensors)
        ternary_bytes = sum(
            v.nbytes for n, v in native.tensors.items() if n.endswith((".packed", ".scale"))
        )
        total = dst.stat().st_size
    return {
        "tensors": len(names),
        "bytes": total,
        "ternary_parameters": ternary,
        "ternary_bits_per_weight": round(8 * ternary_bytes / ternary, 3) if ternary else 0.0,
    }


_GGUF_PROJ = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


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
    formats = {
        "hf": "Hugging Face checkpoint (converted on load)",
        "gguf": "GGUF (converted on load)",
        "bitnet158": "bitnet158 packed" + (" (1.6-bit layout)" if ckpt.layout == "tq1" else ""),
    }
    return {
        "path": str(p),
        "format": formats[source_kind(p)],
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
