"""Our own checkpoint file: one memory-mappable `.safetensors` file with packed ternary weights.

Tensors are the canonical names of `bitnet158.formats` with `.codes` replaced by `.packed`
(uint8, `packing.pack_ours`), every `.scale` as float32[1], norms float32, and `embed.weight` /
`lm_head.weight` in their source dtype (F32, F16 or BF16). The header's `__metadata__` holds
`format` = "bitnet158", `format_version` = "1", `config` (ModelConfig JSON), `tokenizer`
(tokenizer.json text) and optionally `chat_template` and `source`. A file in the 1.6-bit layout
(`pack_ours_tq1`, 5 trits per byte) has `format_version` = "2" and `layout` = "tq1".

The file is plain safetensors (the official library reads it too): an 8-byte little-endian
header length, a JSON header padded with spaces so the payload starts 8-byte aligned, then the
tensors back to back, largest element size first so every tensor is aligned to its own size.
numpy has no bfloat16: a BF16 tensor is a uint16 array of its raw bits, here and in the
canonical dicts (`bf16_to_float32` widens it).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError, FormatError
from ..packing import (
    ours_packed_shape,
    ours_tq1_packed_shape,
    pack_ours,
    pack_ours_tq1,
    unpack_ours,
    unpack_ours_tq1,
)
from .atomic import replace_file, temporary_sibling
from .pages import map_file

FORMAT = "bitnet158"
# How the ternary matrices are packed: (packed shape, pack, unpack) of each layout. A 1.6-bit
# file says so in its metadata ("layout") and has format version 2, which earlier readers
# refuse by name instead of failing on its shapes.
LAYOUTS = {
    "2bit": (ours_packed_shape, pack_ours, unpack_ours),
    "tq1": (ours_tq1_packed_shape, pack_ours_tq1, unpack_ours_tq1),
}
FORMAT_VERSIONS = {"2bit": "1", "tq1": "2"}
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
FLOAT_MATRICES = ("embed.weight", "lm_head.weight")  # kept in their source dtype
MAX_HEADER = 100 << 20  # the official reader's limit too

# safetensors dtype name <-> numpy dtype; BF16 is held as its raw uint16 bits.
_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
}


@dataclass
class NativeCheckpoint:
    """A loaded native file: config, memory-mapped tensors (`.packed` names), tokenizer text."""

    config: ModelConfig
    tensors: dict[str, np.ndarray]
    tokenizer_json: str
    chat_template: str | None
    path: Path
    source: str | None = None
    layout: str = "2bit"  # of the `.packed` tensors: a key of LAYOUTS


def check_finite(ckpt: NativeCheckpoint) -> None:
    """FormatError naming the first norm weight or projection scale that holds NaN or inf.

    The activation quantizer turns a NaN into a finite code (see quant.py), so a NaN in one of
    these small tensors would give wrong but finite logits rather than an error. The large float
    matrices (embedding, output layer) are not read here: a NaN there reaches the logits, which
    generation refuses (engine.sampling).
    """
    for name, value in ckpt.tensors.items():
        if name.endswith(".packed") or name in FLOAT_MATRICES:
            continue
        bad = np.size(value) - np.count_nonzero(np.isfinite(np.asarray(value, np.float32)))
        if bad:
            raise FormatError(f"{ckpt.path}: tensor {name} holds {bad} NaN or infinite values")


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen raw BF16 bits (uint16) to float32 exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(N, K) of each ternary projection of one layer."""
    H, inter, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    return {
        "q": (q, H),
        "k": (kv, H),
        "v": (kv, H),
        "o": (H, q),
        "gate": (inter, H),
        "up": (inter, H),
        "down": (H, inter),
    }


def expected_shapes(config: ModelConfig, layout: str = "2bit") -> dict[str, tuple[int, ...]]:
    """Every tensor name a native file of this config (and layout) holds, with its shape."""
    packed_shape = LAYOUTS[layout][0]
    H, V = config.hidden_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (V, H)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    if config.norm_affine:
        shapes["norm.weight"] = (H,)
    for i in range(config.num_layers):
        p = f"layers.{i}."
        if config.norm_affine:
            shapes[p + "attn_norm.weight"] = (H,)
            shapes[p + "ffn_norm.weight"] = (H,)
        if config.subln:
            shapes[p + "attn_sub_norm.weight"] = (config.q_size,)
            shapes[p + "ffn_sub_norm.weight"] = (config.intermediate_size,)
        for proj, (n, k) in projection_shapes(config).items():
            shapes[p + proj + ".packed"] = packed_shape(n, k)
            shapes[p + proj + ".scale"] = (1,)
    return shapes


def _float_matrix(name: str, value: np.ndarray) -> np.ndarray:
    """embed/lm_head in a storable dtype: float32, float16, or BF16 bits (uint16)."""
    value = np.asarray(value)
    if value.dtype.name == "bfloat16":  # ml_dtypes, if a caller uses it
        return value.view(np.uint16)
    if value.dtype in (np.float32, np.float16, np.uint16):
        return value
    if value.dtype == np.float64:
        return value.astype(np.float32)
    raise FormatError(f"tensor {name}: unsupported dtype {value.dtype} (want F32, F16 or BF16)")


def pack_tensors(
    config: ModelConfig, tensors: dict[str, np.ndarray], layout: str = "2bit"
) -> dict[str, np.ndarray]:
    """Canonical tensors (`.codes`) -> native tensors (`.packed` in `layout`, scales
    float32[1]).

    Tensors already packed (in `layout`) pass through, so a loaded native checkpoint can be
    re-saved.
    """
    pack = LAYOUTS[layout][1]
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if name.endswith(".codes"):
            out[name[: -len(".codes")] + ".packed"] = pack(np.asarray(value, dtype=np.int8))
        elif name.endswith(".packed"):
            out[name] = np.asarray(value, dtype=np.uint8)
        elif name.endswith(".scale"):
            out[name] = np.asarray(value, dtype=np.float32).reshape(1)
        elif name in FLOAT_MATRICES:
            out[name] = _float_matrix(name, value)
        else:
            out[name] = np.asarray(value, dtype=np.float32)
    _check_names(config, out, "tensors to save", layout)
    return out


def unpack_tensors(
    config: ModelConfig, tensors: dict[str, np.ndarray], layout: str = "2bit"
) -> dict[str, np.ndarray]:
    """Native tensors (`.packed` in `layout`) -> canonical tensors (`.codes` int8, scalar
    float32 scales)."""
    unpack = LAYOUTS[layout][2]
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if name.endswith(".packed"):
            n, k = projection_shapes(config)[name.rsplit(".", 2)[1]]
            out[name[: -len(".packed")] + ".codes"] = unpack(value, n, k)
        elif name.endswith(".scale"):
            out[name] = np.float32(np.asarray(value).reshape(-1)[0])
        else:
            out[name] = value
    return out


def _check_names(
    config: ModelConfig, tensors: dict[str, np.ndarray], where: str, layout: str
) -> None:
    if config.num_layers * len(PROJECTIONS) > len(tensors):  # before sizing anything by it
        raise FormatError(
            f"{where}: the config declares {config.num_layers} layers but there are only "
            f"{len(tensors)} tensors"
        )
    expected = expected_shapes(config, layout)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise FormatError(f"{where}: missing tensor(s) {', '.join(missing[:5])}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise FormatError(f"{where}: unexpected tensor(s) {', '.join(unexpected[:5])}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise FormatError(
                f"{where}: tensor {name} has shape {list(tensors[name].shape)}, expected {list(shape)}"
            )


def _dtype_name(name: str, value: np.ndarray) -> str:
    if value.dtype == np.uint16 and name in FLOAT_MATRICES:
        return "BF16"
    for key, dtype in _DTYPES.items():
        if value.dtype == dtype and key != "BF16":
            return key
    raise FormatError(f"tensor {name}: dtype {value.dtype} cannot be stored in a native file")


def save_native(
    path: str | os.PathLike,
    config: ModelConfig,
    tensors: dict[str, np.ndarray],
    tokenizer_json: str,
    chat_template: str | None = None,
    source: str | None = None,
    layout: str = "2bit",
) -> Path:
    """Write canonical (or already packed, in `layout`) tensors to our `.safetensors` file,
    atomically, with the ternary matrices in `layout` (a key of LAYOUTS)."""
    if layout not in LAYOUTS:
        raise FormatError(f"unknown weight layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    path = Path(path)
    native = pack_tensors(config, tensors, layout)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSIONS[layout],
        "config": config.to_json(),
        "tokenizer": tokenizer_json,
    }
    if layout != "2bit":
        metadata["layout"] = layout
    if chat_template is not None:
        metadata["chat_template"] = chat_template
    if source is not None:
        metadata["source"] = source

    # Largest element size first, back to back: each tensor stays aligned to its element size
    # and the payload has no holes (the official reader rejects holes).
    order = sorted(native, key=lambda n: (-native[n].dtype.itemsize, n))
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        value = native[name]
        header[name] = {
            "dtype": _dtype_name(name, value),
            "shape": list(value.shape),
            "data_offsets": [offset, offset + value.nbytes],
        }
        offset += value.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # payload starts 8-byte aligned

    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for name in order:
                value = native[name]
                f.write(np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).data)
        replace_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_header(path: Path, buf: np.ndarray) -> tuple[dict, int]:
    """The parsed JSON header and the absolute offset of the payload."""
    if buf.size < 8:
        raise FormatError(f"{path}: {buf.size} bytes is too short for a safetensors file")
    n = int.from_bytes(buf[:8].tobytes(), "little")
    if n > MAX_HEADER or 8 + n > buf.size:
        raise FormatError(
            f"{path}: header length {n} runs past the end of the file ({buf.size} bytes); "
            "the file is truncated or not a safetensors file"
        )
    try:
        header = json.loads(buf[8 : 8 + n].tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: the safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the safetensors header is not a JSON object")
    return header, 8 + n


def _tensor_views(path: Path, buf: np.ndarray, header: dict, start: int) -> dict[str, np.ndarray]:
    """Validated zero-copy views of every tensor in the header."""
    size = buf.size - start
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype_name = info.get("dtype") if isinstance(info, dict) else None
        if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
            raise FormatError(f"{path}: tensor {name}: unsupported or missing dtype")
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise FormatError(f"{path}: tensor {name}: malformed header entry ({exc!r})") from None
        if any(d < 0 for d in shape) or not 0 <= begin <= end:
            raise FormatError(f"{path}: tensor {name}: bad shape {list(shape)} or offsets")
        if end > size:
            raise FormatError(
                f"{path}: tensor {name}: data ends at byte {end} but the payload has {size} bytes "
                "(truncated file?)"
            )
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise FormatError(
                f"{path}: tensor {name}: {end - begin} bytes do not hold "
                f"{info['dtype']}{list(shape)} ({math.prod(shape) * dtype.itemsize} bytes)"
            )
        spans.append((begin, end, name))
        tensors[name] = np.asarray(buf[start + begin : start + end]).view(dtype).reshape(shape)
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise FormatError(f"{path}: tensors {a} and {b} overlap")
    return tensors


def load_native(path: str | os.PathLike) -> NativeCheckpoint:
    """Memory-map our `.safetensors` file and validate it against its config."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise FormatError(f"{path}: the file is empty")
    buf = map_file(path)  # tensors are views: nothing is copied
    header, start = read_header(path, buf)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: the safetensors __metadata__ is not a JSON object")
    if meta.get("format") != FORMAT:
        raise FormatError(
            f"{path}: not a bitnet158 file (metadata format is {meta.get('format')!r} "
            f"if any); convert it first with `bitnet158 convert`"
        )
    for key in ("config", "tokenizer", "chat_template", "source", "layout"):  # all strings
        if key in meta and not isinstance(meta[key], str):
            raise FormatError(f"{path}: metadata {key} is not a string")
    version, layout = meta.get("format_version"), meta.get("layout", "2bit")
    if version not in FORMAT_VERSIONS.values():
        raise FormatError(
            f"{path}: bitnet158 format version {version!r} is not supported (this version "
            f"reads {', '.join(map(repr, FORMAT_VERSIONS.values()))})"
        )
    if FORMAT_VERSIONS.get(layout) != version:
        known = ", ".join(f"{k} in version {v}" for k, v in FORMAT_VERSIONS.items())
        raise FormatError(
            f"{path}: weight layout {layout!r} does not go with format version {version!r} "
            f"(known layouts: {known})"
        )
    if "tokenizer" not in meta or "config" not in meta:
        raise FormatError(f"{path}: the metadata lacks the config or the tokenizer")
    try:
        config = ModelConfig.from_json(meta["config"])
    except ConfigError as exc:
        raise FormatError(f"{path}: bad config in the metadata: {exc}") from None
    tensors = _tensor_views(path, buf, header, start)
    _check_names(config, tensors, str(path), layout)
    for name in tensors:
        got = tensors[name].dtype
        want = (
            (np.float32, np.float16, np.uint16)
            if name in FLOAT_MATRICES
            else (np.uint8,)
            if name.endswith(".packed")
            else (np.float32,)
        )
        if got not in want:
            raise FormatError(f"{path}: tensor {name} has dtype {got}, expected one of {want}")
    return NativeCheckpoint(
        config=config,
        tensors=tensors,
        tokenizer_json=meta["tokenizer"],
        chat_template=meta.get("chat_template"),
        path=path,
        source=meta.get("source"),
        layout=layout,
    )
