"""GGUF: llama.cpp files (`bitnet`, ternary `llama`) with TQ1_0 / TQ2_0 weights out and in;
bitnet.cpp's I2_S files in. Embeddings F16 (F32, Q8_0, Q6_K on request).

Facts this module depends on (checked in the llama.cpp that llama-cpp-python 0.3.36 bundles,
in gguf-py 0.19 and in microsoft/BitNet's converters):

- llama.cpp's architecture `bitnet` (src/models/bitnet.cpp) is a Llama block with the two
  sub-norms: `blk.N.attn_sub_norm` [n_embd] before `attn_output`, `blk.N.ffn_sub_norm` [n_ff]
  before `ffn_down`. Its FFN is `ffn_down(silu(ffn_gate(x)) * ffn_up(x))`, SiLU hard-coded,
  so it runs SwiGLU BitNets (1bitLLM, ours) exactly and ReLU² ones (2B4T) wrongly: we refuse
  to write those. It has no `output` tensor (the logits use `token_embd`), RoPE type NEOX
  (rotate-half, so q/k rows are stored as Hugging Face orders them), and optional F32 [1]
  `blk.N.<proj>.scale` tensors that multiply a projection's output.
- Plain Llama BitNets (no sub-norms, Falcon-E style) are llama.cpp's `llama` architecture:
  RoPE type NORM (adjacent pairs), so q/k rows are permuted as llama.cpp's LlamaModel
  converter does (conversion/llama.py `permute`), and an untied lm_head is `output.weight`.
- TQ1_0 / TQ2_0 (packing.py) hold blocks of 256 weights with an fp16 `d`; ggml's gguf loader
  rejects a tensor whose row length K is not a multiple of the block size, and tensor shapes
  are fixed by the architecture, so such a matrix cannot be padded: we refuse it.
- bitnet.cpp's GGUFs of microsoft/bitnet-b1.58-2B-4T name the architecture `bitnet-b1.58`
  (earlier `bitnet-25`), store the ternary projections as I2_S (ggml type 36: N*K/4 bytes
  then a 32-byte tail whose first float is the tensor scale) and were trained with ReLU²:
  we read them as relu2 whatever the fork's graph does (microsoft/BitNet #588).
- Tensor shapes in GGUF list ne[0] (the row length) first: [K, N] for a [N, K] matrix.

Tokenizers travel as `tokenizer.ggml.*` (gguf_vocab.py: byte-level BPE and SentencePiece BPE,
rebuilt as a `tokenizers` tokenizer.json on reading).

The reader is our own (no gguf package at run time): it bounds-checks every offset, so a
truncated or corrupt file is a FormatError naming the file, never a crash. The writer uses
gguf-py's GGUFWriter (`pip install bitnet158[gguf]`).
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError, FormatError
from ..packing import (
    QK_K,
    pack_tq1_0,
    pack_tq2_0,
    unpack_i2_s,
    unpack_tq1_0,
    unpack_tq2_0,
)
from ..quant import EPS
from .atomic import replace_file, temporary_sibling
from .gguf_vocab import GGUFVocab, tokenizer_json_from_gguf, vocab_from_tokenizer_json
from .native import NativeCheckpoint, pack_tensors, projection_shapes

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
BITNET_ARCH = "bitnet"  # llama.cpp: SiLU-gated FFN, sub-norms
LLAMA_ARCH = "llama"  # plain Llama BitNets (Falcon-E, Falcon3-1.58bit, Llama3-8B-1.58)
BITNET_CPP_ARCHS = ("bitnet-b1.58", "bitnet-25")  # bitnet.cpp's 2B-4T: ReLU²

# GGUF tensor names of one layer's ternary projections (llama.cpp src/llama-arch.cpp).
PROJ_NAMES = {
    "q": "attn_q",
    "k": "attn_k",
    "v": "attn_v",
    "o": "attn_output",
    "gate": "ffn_gate",
    "up": "ffn_up",
    "down": "ffn_down",
}
NORM_NAMES = {
    "attn_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
    "attn_sub_norm": "attn_sub_norm",
    "ffn_sub_norm": "ffn_sub_norm",
}

# ggml type id -> name, for messages; the ones we read have a size rule in _nbytes.
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 36: "I2_S (bitnet.cpp)", 39: "MXFP4",
}  # fmt: skip
F32, F16, Q8_0, Q6_K, BF16, TQ1_0, TQ2_0, I2_S = 0, 1, 8, 14, 30, 34, 35, 36
# type -> (values per block, bytes per block); I2_S has its own rule
_BLOCKS = {
    F32: (1, 4),
    F16: (1, 2),
    BF16: (1, 2),
    Q8_0: (32, 34),
    Q6_K: (256, 210),
    TQ1_0: (256, 54),
    TQ2_0: (256, 66),
}
TERNARY_TYPES = {"tq1_0": TQ1_0, "tq2_0": TQ2_0}
FILE_TYPES = {TQ1_0: 36, TQ2_0: 37}  # llama_ftype MOSTLY_TQ1_0 / MOSTLY_TQ2_0
EMBEDDING_TYPES = ("f16", "f32", "q8_0", "q6_k")

# GGUF metadata value types (gguf.h): id -> struct format of a scalar
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
_NUMPY_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}  # fmt: skip
_STRING, _ARRAY = 8, 9


# --- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's entry: numpy-order shape ([N, K] for a matrix), ggml type, byte span."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    begin: int  # absolute offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPE_NAMES.get(self.ggml_type, f"unknown type {self.ggml_type}")


def _nbytes(ggml_type: int, ne: tuple[int, ...]) -> int | None:
    """Bytes of a tensor of ggml type with dims ne (ne[0] = row length); None if unknown."""
    count = math.prod(ne)
    if ggml_type == I2_S:  # bitnet.cpp: 2 bits per weight, then the 32-byte scale tail
        return count // 4 + 32
    if ggml_type not in _BLOCKS:
        return None
    per, size = _BLOCKS[ggml_type]
    if ne and ne[0] % per:
        return -1
    return count // per * size


class _Cursor:
    """Bounds-checked little-endian reads from a memory-mapped file."""

    def __init__(self, path: Path, buf: np.ndarray) -> None:
        self.path, self.buf, self.pos = path, buf, 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.buf.size:
            raise FormatError(
                f"{self.path}: truncated GGUF file: {what} at byte {self.pos} needs {n} bytes "
                f"but the file has {self.buf.size}"
            )
        out = memoryview(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        try:
            return bytes(self.take(n, what)).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.path}: {what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY and depth == 0:
            etype, count = self.scalar("<I", what), self.scalar("<Q", what)
            if etype in _NUMPY_SCALARS:  # numeric arrays (scores, token types) in one read
                dtype = np.dtype(_NUMPY_SCALARS[etype])
                if count > self.buf.size:
                    raise FormatError(f"{self.path}: {what}: array of {count} items is too long")
                return np.frombuffer(self.take(count * dtype.itemsize, what), dtype=dtype).copy()
            if count > self.buf.size:  # every item takes at least one byte
                raise FormatError(f"{self.path}: {what}: array of {count} items is too long")
            return [self.value(etype, what, depth + 1) for _ in range(count)]
        raise FormatError(f"{self.path}: {what} has unknown GGUF value type {vtype}")


@dataclass
class GGUFFile:
    """A parsed GGUF file: metadata and tensor entries, the data memory-mapped."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    buf: np.ndarray

    def raw(self, name: str) -> np.ndarray:
        """The bytes of one tensor (a view into the file)."""
        t = self.tensors[name]
        return self.buf[t.begin : t.begin + t.nbytes]


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse and validate a GGUF file's header, metadata and tensor table."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise FormatError(f"{path}: the file is empty")
        buf = np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as exc:
        raise FormatError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    cur = _Cursor(path, buf)
    if bytes(cur.take(4, "the magic number")) != MAGIC:
        raise FormatError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
    version = cur.scalar("<I", "the version")
    if version not in (2, 3):
        raise FormatError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors = cur.scalar("<Q", "the tensor count")
    n_kv = cur.scalar("<Q", "the metadata count")
    if n_tensors > buf.size or n_kv > buf.size:
        raise FormatError(f"{path}: corrupt header ({n_tensors} tensors, {n_kv} metadata keys)")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        vtype = cur.scalar("<I", f"the type of {key}")
        metadata[key] = cur.value(vtype, f"metadata {key}")
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise FormatError(f"{path}: general.alignment {alignment!r} is not a power of two")
    entries = []
    for i in range(n_tensors):
        name = cur.string(f"the name of tensor {i}")
        n_dims = cur.scalar("<I", f"tensor {name}")
        if not 1 <= n_dims <= 4:
            raise FormatError(f"{path}: tensor {name} has {n_dims} dimensions (1 to 4)")
        ne = tuple(cur.scalar("<Q", f"tensor {name}") for _ in range(n_dims))
        ggml_type = cur.scalar("<I", f"tensor {name}")
        offset = cur.scalar("<Q", f"tensor {name}")
        entries.append((name, ne, ggml_type, offset))
    data_start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, GGUFTensor] = {}
    for name, ne, ggml_type, offset in entries:
        nbytes = _nbytes(ggml_type, ne)
        kind = GGML_TYPE_NAMES.get(ggml_type, f"unknown type {ggml_type}")
        if nbytes is None:
            raise FormatError(
                f"{path}: tensor {name} has GGML type {ggml_type} ({kind}), which bitnet158 "
                "does not read (it reads F32, F16, BF16, Q8_0, Q6_K, TQ1_0, TQ2_0 and I2_S)"
            )
        if nbytes < 0:
            raise FormatError(
                f"{path}: tensor {name} ({kind}) has rows of {ne[0]} values, not a whole "
                "number of blocks"
            )
        begin = data_start + offset
        if offset % alignment or begin + nbytes > buf.size:
            raise FormatError(
                f"{path}: tensor {name} ({kind}, {list(ne)}) spans bytes {begin}..{begin + nbytes}"
                f" but the file has {buf.size} bytes (truncated or corrupt file)"
                if begin + nbytes > buf.size
                else f"{path}: tensor {name} offset {offset} is not aligned to {alignment}"
            )
        if name in tensors:
            raise FormatError(f"{path}: tensor {name} appears twice")
        tensors[name] = GGUFTensor(name, tuple(reversed(ne)), ggml_type, begin, nbytes)
    return GGUFFile(path, version, metadata, tensors, buf)


# --- tensors -> canonical ------------------------------------------------------------------------


def _floats(f: GGUFFile, t: GGUFTensor) -> np.ndarray:
    """A float tensor as float32 (F32/F16/BF16 zero-copy views widened, Q8_0/Q6_K dequantized)."""
    raw = f.raw(t.name)
    if t.ggml_type == F32:
        return raw.view("<f4").reshape(t.shape)
    if t.ggml_type == F16:
        return raw.view("<f2").reshape(t.shape).astype(np.float32)
    if t.ggml_type == BF16:
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(t.shape)
    if t.ggml_type == Q8_0:
        blocks = np.asarray(raw).reshape(-1, 34)
        d = blocks[:, :2].copy().view("<f2").astype(np.float32)
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
        return (q * d).reshape(t.shape)
    if t.ggml_type == Q6_K:
        return dequantize_q6_k(np.asarray(raw)).reshape(t.shape)
    raise FormatError(f"{f.path}: tensor {t.name} is {t.type_name}, expected a float tensor")


# Q6_K (ggml-common.h block_q6_K, 210 bytes per 256 values): ql[128] low 4 bits, qh[64] high
# 2 bits, int8 scales[16] (one per 16 values), fp16 d. In each half h of 128 values, value v
# has its low nibble in ql[64h + v % 64] (v < 64: bits 0-3, else 4-7) and its high bits in
# qh[32h + v % 32] at shift 2 * (v // 32); q = (high << 4 | low) - 32, x = d * scale * q.


def dequantize_q6_k(data: np.ndarray) -> np.ndarray:
    """Q6_K bytes -> float32 values (a multiple of 256)."""
    b = data.reshape(-1, 210)
    nb = b.shape[0]
    ql, qh = b[:, :128].reshape(nb, 2, 64), b[:, 128:192].reshape(nb, 2, 32)
    scales = b[:, 192:208].view(np.int8).astype(np.float32)
    d = b[:, 208:210].copy().view("<f2").astype(np.float32)
    low = np.concatenate([ql & 0xF, ql >> 4], axis=-1)  # [nb, 2, 128]
    high = (qh[:, :, None, :] >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3  # [nb, 2, 4, 32]
    q = (low | (high.reshape(nb, 2, 128) << 4)).astype(np.float32) - 32
    return (q.reshape(nb, 16, 16) * (d * scales)[:, :, None]).reshape(-1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """float32 values (a multiple of 256) -> Q6_K bytes uint8[n/256, 210].

    Scales as ggml's quantizer starts them: in each 16 values the one of largest magnitude
    maps to -32; the 16 scales share d, the largest maps to -128 (without ggml's scale search,
    so the error is somewhat larger than llama-quantize's, never the format).
    """
    sub = np.asarray(x, dtype=np.float32).reshape(-1, 16, 16)
    nb = sub.shape[0]
    pick = np.take_along_axis(sub, np.abs(sub).argmax(-1)[..., None], -1)[..., 0]
    scale = pick / -32
    big = np.take_along_axis(scale, np.abs(scale).argmax(-1)[:, None], -1)[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(big != 0, -128 / big, 0).astype(np.float32)
        sc = np.clip(np.round(iscale[:, None] * scale), -128, 127).astype(np.int8)
        d = np.where(iscale != 0, 1 / iscale, 0).astype(np.float16)
        step = d.astype(np.float32)[:, None] * sc
        q = np.where(step[..., None] != 0, np.round(sub / step[..., None]), 0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(nb, 2, 128)
    low, high = q & 0xF, q >> 4
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(nb, 128)
    hb = high.reshape(nb, 2, 4, 32) << np.array([0, 2, 4, 6], np.uint8)[:, None]
    qh = np.bitwise_or.reduce(hb, axis=2).reshape(nb, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d[:, None].view(np.uint8)], axis=1)


def _embedding(f: GGUFFile, t: GGUFTensor) -> np.ndarray:
    """embed / lm_head in a dtype our file keeps: F16 and BF16 as they are, others float32."""
    if t.ggml_type == F16:
        return f.raw(t.name).view("<f2").reshape(t.shape)
    if t.ggml_type == BF16:
        return f.raw(t.name).view("<u2").reshape(t.shape)
    return _floats(f, t)


def _ternary(f: GGUFFile, t: GGUFTensor) -> tuple[np.ndarray, np.float32]:
    """Codes int8[N, K] and beta of one projection, whatever its type."""
    n, k = t.shape
    where = f"{f.path}: tensor {t.name} ({t.type_name})"
    try:
        if t.ggml_type == I2_S:
            codes, beta = unpack_i2_s(f.raw(t.name), n, k)
            return codes, np.float32(beta)
        if t.ggml_type in (TQ1_0, TQ2_0):
            unpack = unpack_tq1_0 if t.ggml_type == TQ1_0 else unpack_tq2_0
            codes, d = unpack(f.raw(t.name), n, k)
            return codes, _common_scale(d, codes, where)
    except ValueError as exc:
        raise FormatError(f"{where}: {exc}") from None
    w = _floats(f, t)  # F32/F16/BF16/Q8_0: a dequantized ternary matrix {-a, 0, a}
    a = np.float32(np.abs(w).max()) if w.size else np.float32(0)
    if not np.all((w == 0) | (np.abs(w) == a)):
        raise FormatError(
            f"{where}: holds {np.unique(np.abs(w)).size} distinct magnitudes, so it is not a "
            "ternary matrix {-a, 0, a}; bitnet158 reads BitNet b1.58 models only"
        )
    return np.sign(w).astype(np.int8), (a if a > 0 else np.float32(EPS))


def _common_scale(d: np.ndarray, codes: np.ndarray, where: str) -> np.float32:
    """The one scale of a TQ matrix: every block holding a nonzero weight has the same d."""
    nonzero = np.any(codes.reshape(d.shape[0], d.shape[1], QK_K) != 0, axis=-1)
    used = np.unique(d[nonzero])
    if used.size == 0:
        return np.float32(EPS)
    if used.size > 1 or not np.isfinite(used[0]) or used[0] <= 0:
        raise FormatError(
            f"{where}: its blocks use {used.size} different scales ({used[:3].tolist()}...); "
            "bitnet158 needs one positive scale per matrix (absmean ternary weights)"
        )
    return np.float32(used[0])


def _meta(f: GGUFFile, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """Metadata value `key` of the given Python type (or `default` when absent)."""
    value = f.metadata.get(key, default)
    if value is ...:
        raise FormatError(f"{f.path}: metadata {key} is missing")
    if isinstance(value, np.generic):
        value = value.item()
    kinds = kind if isinstance(kind, tuple) else (kind,)
    wrong = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
    if value is not default and wrong:
        raise FormatError(f"{f.path}: metadata {key} = {value!r} has the wrong type")
    return value


def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def _config(f: GGUFFile, arch: str) -> ModelConfig:
    p = arch + "."
    hidden = _meta(f, p + "embedding_length", int)
    heads = _meta(f, p + "attention.head_count", int)
    head_dim = _meta(f, p + "attention.key_length", int, None) or hidden // max(heads, 1)
    rot = _meta(f, p + "rope.dimension_count", int, head_dim)
    if rot != head_dim:
        raise FormatError(f"{f.path}: partial RoPE ({rot} of {head_dim} dims) is not supported")
    scaling = _meta(f, p + "rope.scaling.type", str, "none")
    factor = _meta(f, p + "rope.scaling.factor", (int, float), 1.0)
    if scaling not in ("none", "linear") or float(factor) != 1.0:
        raise FormatError(f"{f.path}: RoPE scaling {scaling} x{factor} is not supported")
    embd = f.tensors.get("token_embd.weight")
    if embd is None:
        raise FormatError(f"{f.path}: tensor token_embd.weight is missing")
    vocab = _meta(f, p + "vocab_size", int, None) or embd.shape[0]
    eos = [
        v
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
        if isinstance(v := _meta(f, key, int, None), int)
    ]
    relu2 = arch in BITNET_CPP_ARCHS
    llama = arch == LLAMA_ARCH
    try:
        return ModelConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=_meta(f, p + "feed_forward_length", int),
            num_layers=_meta(f, p + "block_count", int),
            num_heads=heads,
            num_kv_heads=_meta(f, p + "attention.head_count_kv", int, heads),
            head_dim=head_dim,
            family="bitnet-2b4t" if relu2 else "llama" if llama else "llama-b158",
            hidden_act="relu2" if relu2 else "silu",
            subln=not llama,
            rms_norm_eps=_f32(_meta(f, p + "attention.layer_norm_rms_epsilon", (int, float))),
            rope_theta=_f32(_meta(f, p + "rope.freq_base", (int, float), 10000.0)),
            max_position_embeddings=_meta(f, p + "context_length", int, 2048),
            tie_word_embeddings="output.weight" not in f.tensors,
            bos_token_id=_meta(f, "tokenizer.ggml.bos_token_id", int, None),
            eos_token_ids=list(dict.fromkeys(eos)),
            pad_token_id=_meta(f, "tokenizer.ggml.padding_token_id", int, None),
        )
    except ConfigError as exc:
        raise FormatError(f"{f.path}: {exc}") from None


def _expect(f: GGUFFile, name: str, shape: tuple[int, ...]) -> GGUFTensor:
    t = f.tensors.get(name)
    if t is None:
        raise FormatError(f"{f.path}: tensor {name} is missing")
    if t.shape != shape:
        raise FormatError(
            f"{f.path}: tensor {name} has shape {list(t.shape)}, expected {list(shape)} "
            "for the model the metadata describes"
        )
    return t


def _check_names(f: GGUFFile) -> None:
    """Refuse tensors the bitnet graph does not have (a file of another model, or extras)."""
    known = {"token_embd.weight", "output_norm.weight", "output.weight"}
    layer = {*PROJ_NAMES.values(), *NORM_NAMES.values()}
    for name in f.tensors:
        parts = name.split(".")
        if name in known or (
            len(parts) == 4
            and parts[0] == "blk"
            and parts[1].isdigit()
            and parts[2] in layer
            and parts[3] in ("weight", "scale")
        ):
            continue
        raise FormatError(f"{f.path}: unexpected tensor {name} for a BitNet model")


def _norm_shapes(cfg: ModelConfig) -> dict[str, tuple[int]]:
    shapes = {"attn_norm": (cfg.hidden_size,), "ffn_norm": (cfg.hidden_size,)}
    if cfg.subln:
        shapes |= {"attn_sub_norm": (cfg.q_size,), "ffn_sub_norm": (cfg.intermediate_size,)}
    return shapes


def _rope_heads(cfg: ModelConfig) -> dict[str, int]:
    """Heads of the q/k rows a `llama` file stores in llama.cpp's pair order ({} for bitnet)."""
    return {} if cfg.subln else {"q": cfg.num_heads, "k": cfg.num_kv_heads}


def _pairs_from_halves(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from rotate-half order (HF) to adjacent pairs (llama.cpp NORM RoPE)."""
    n, k = w.shape
    return w.reshape(heads, 2, n // heads // 2, k).swapaxes(1, 2).reshape(n, k)


def _halves_from_pairs(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of `_pairs_from_halves`."""
    n, k = w.shape
    return np.ascontiguousarray(
        w.reshape(heads, n // heads // 2, 2, k).swapaxes(1, 2).reshape(n, k)
    )


def gguf_tensors(
    f: GGUFFile, cfg: ModelConfig, progress: Callable[[Iterable], Iterable] | None = None
) -> dict[str, np.ndarray]:
    """The canonical tensors (`.codes` / `.scale`) of a bitnet GGUF file."""
    _check_names(f)
    H, V = cfg.hidden_size, cfg.vocab_size
    out: dict[str, np.ndarray] = {
        "embed.weight": _embedding(f, _expect(f, "token_embd.weight", (V, H))),
        "norm.weight": _floats(f, _expect(f, "output_norm.weight", (H,))),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = _embedding(f, _expect(f, "output.weight", (V, H)))
    norm_shapes = _norm_shapes(cfg)
    heads = _rope_heads(cfg)
    layers = range(cfg.num_layers)
    for i in progress(layers) if progress else layers:
        for ours, shape in norm_shapes.items():
            t = _expect(f, f"blk.{i}.{NORM_NAMES[ours]}.weight", shape)
            out[f"layers.{i}.{ours}.weight"] = _floats(f, t)
        for proj, (n, k) in projection_shapes(cfg).items():
            t = _expect(f, f"blk.{i}.{PROJ_NAMES[proj]}.weight", (n, k))
            codes, beta = _ternary(f, t)
            if proj in heads:
                codes = _halves_from_pairs(codes, heads[proj])
            scale = f.tensors.get(f"blk.{i}.{PROJ_NAMES[proj]}.scale")
            if scale is not None:  # llama.cpp's optional per-projection output multiplier
                s = _floats(f, scale).reshape(-1)
                if s.size != 1 or not np.isfinite(s[0]) or s[0] <= 0:
                    raise FormatError(f"{f.path}: tensor {scale.name} is not one positive scale")
                beta = np.float32(beta * s[0])
            out[f"layers.{i}.{proj}.codes"] = codes
            out[f"layers.{i}.{proj}.scale"] = np.asarray(beta, dtype=np.float32)
    return out


def load_gguf(
    path: str | os.PathLike, progress: Callable[[Iterable], Iterable] | None = None
) -> NativeCheckpoint:
    """A BitNet GGUF file (llama.cpp `bitnet` / ternary `llama`, bitnet.cpp) as our checkpoint."""
    f = read_gguf(path)
    arch = f.metadata.get("general.architecture")
    if not isinstance(arch, str) or arch not in (BITNET_ARCH, LLAMA_ARCH, *BITNET_CPP_ARCHS):
        raise FormatError(
            f"{f.path}: GGUF architecture {arch!r} is not a BitNet one; bitnet158 reads "
            f"'{BITNET_ARCH}' and ternary '{LLAMA_ARCH}' (llama.cpp), and "
            f"{', '.join(map(repr, BITNET_CPP_ARCHS))} (bitnet.cpp)"
        )
    cfg = _config(f, arch)
    tensors = gguf_tensors(f, cfg, progress)
    tokenizer_json = tokenizer_json_from_gguf(f.metadata, str(f.path))
    template = f.metadata.get("tokenizer.chat_template")
    return NativeCheckpoint(
        config=cfg,
        tensors=pack_tensors(cfg, tensors),
        tokenizer_json=tokenizer_json,
        chat_template=template if isinstance(template, str) else None,
        path=f.path,
        source=f"gguf:{f.path.name}",
    )


# --- writing ------------------------------------------------------------------------------------


def check_exportable(cfg: ModelConfig, ternary_type: str = "tq2_0") -> str:
    """The llama.cpp architecture that computes exactly this model, or FormatError.

    `bitnet` for models with sub-norms, `llama` for plain Llama BitNets.
    """
    arch = BITNET_ARCH if cfg.subln else LLAMA_ARCH
    problems = []
    if cfg.hidden_act != "silu":
        problems.append(
            f"its FFN uses {cfg.hidden_act} but llama.cpp's {arch} graph gates with SiLU "
            f"(src/models/{arch}.cpp), so the file would silently compute a different model; "
            "ReLU² BitNets (2B-4T) run in bitnet158 itself or in bitnet.cpp (I2_S)"
        )
    if cfg.inner_norm or cfg.norm_kind != "rmsnorm" or not cfg.norm_affine:
        problems.append("its norms are not affine RMSNorms (OLMo-Bitnet's are not)")
    if arch == BITNET_ARCH and not cfg.tie_word_embeddings:
        problems.append("its lm_head is not tied to the embedding (llama.cpp's bitnet uses token_embd)")  # fmt: skip
    if arch == BITNET_ARCH and cfg.q_size != cfg.hidden_size:
        problems.append("heads * head_dim differs from hidden_size (bitnet's shapes are fixed)")
    for proj, (_, k) in projection_shapes(cfg).items():
        if k % QK_K:
            problems.append(
                f"projection {proj} has K = {k} columns, not a multiple of {QK_K}: "
                f"{ternary_type.upper()} stores blocks of {QK_K} and llama.cpp rejects other "
                "row lengths (the tensor shape is fixed, so it cannot be padded)"
            )
    if problems:
        raise FormatError(f"cannot write a llama.cpp {arch} GGUF: " + "; ".join(problems))
    return arch


def write_gguf(
    path: str | os.PathLike,
    ckpt: NativeCheckpoint,
    tensors: Mapping[str, np.ndarray],
    ternary_type: str = "tq2_0",
    embedding_type: str = "f16",
    progress: Callable[[Iterable], Iterable] | None = None,
) -> Path:
    """Write canonical tensors of `ckpt` as a llama.cpp GGUF file (`bitnet` or `llama`), atomically."""
    try:
        import gguf
    except ImportError:
        raise FormatError(
            "writing GGUF needs the gguf package: pip install 'bitnet158[gguf]'"
        ) from None
    if ternary_type not in TERNARY_TYPES:
        raise FormatError(f"unknown ternary type {ternary_type!r} (one of {list(TERNARY_TYPES)})")
    if embedding_type not in EMBEDDING_TYPES:
        raise FormatError(f"unknown embedding type {embedding_type!r} (one of {EMBEDDING_TYPES})")
    cfg = ckpt.config
    arch = check_exportable(cfg, ternary_type)
    block = {"q8_0": 32, "q6_k": 256}.get(embedding_type, 1)
    if cfg.hidden_size % block:
        raise FormatError(
            f"{embedding_type.upper()} embeddings need hidden_size % {block} == 0, got "
            f"{cfg.hidden_size}"
        )
    vocab = vocab_from_tokenizer_json(ckpt.tokenizer_json, cfg.vocab_size)
    qtype = TERNARY_TYPES[ternary_type]
    pack = pack_tq1_0 if qtype == TQ1_0 else pack_tq2_0

    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        write_metadata(w, gguf, cfg, ckpt, vocab, FILE_TYPES[qtype])
        _add_matrix(w, gguf, "token_embd.weight", tensors["embed.weight"], embedding_type)
        if not cfg.tie_word_embeddings:
            _add_matrix(w, gguf, "output.weight", tensors["lm_head.weight"], embedding_type)
        w.add_tensor("output_norm.weight", np.asarray(tensors["norm.weight"], dtype=np.float32))
        heads = _rope_heads(cfg)
        layers = range(cfg.num_layers)
        for i in progress(layers) if progress else layers:
            for ours in _norm_shapes(cfg):
                value = np.asarray(tensors[f"layers.{i}.{ours}.weight"], dtype=np.float32)
                w.add_tensor(f"blk.{i}.{NORM_NAMES[ours]}.weight", value)
            for proj, theirs in PROJ_NAMES.items():
                codes = np.asarray(tensors[f"layers.{i}.{proj}.codes"])
                if proj in heads:  # llama's RoPE rotates adjacent pairs
                    codes = _pairs_from_halves(codes, heads[proj])
                beta = np.float32(np.asarray(tensors[f"layers.{i}.{proj}.scale"]).reshape(-1)[0])
                try:
                    data = pack(codes, beta)  # every nonzero block's d = fp16(beta)
                except ValueError as exc:
                    raise FormatError(f"layers.{i}.{proj}: {exc}") from None
                w.add_tensor(f"blk.{i}.{theirs}.weight", data, raw_dtype=gguf.GGMLQuantizationType(qtype))  # fmt: skip
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        replace_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _add_matrix(w, gguf, name: str, value: np.ndarray, kind: str) -> None:
    """token_embd / output in F16, F32, Q8_0 or Q6_K (an F16 source is written without a copy)."""
    value = np.asarray(value)
    if value.dtype == np.uint16:  # BF16 bits
        value = (value.astype(np.uint32) << 16).view(np.float32)
    if kind == "q6_k":
        q = quantize_q6_k(value).reshape(value.shape[0], -1)
        w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q6_K)
    elif kind == "q8_0":
        q = gguf.quants.quantize(value.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        w.add_tensor(name, value.astype({"f16": np.float16, "f32": np.float32}[kind], copy=False))


def write_metadata(w, gguf, cfg: ModelConfig, ckpt: NativeCheckpoint, vocab: GGUFVocab, file_type: int) -> None:  # fmt: skip
    """The keys llama.cpp's model loader and vocabulary read (names as gguf-py writes them)."""
    name = Path(str(ckpt.path)).stem if ckpt.path else "bitnet158"
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.q_size != cfg.hidden_size:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)

    w.add_tokenizer_model(vocab.model)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.model == "gpt2":
        w.add_tokenizer_pre(vocab.pre)
        w.add_token_merges(vocab.merges)
    else:
        w.add_token_scores(vocab.scores)
        w.add_add_space_prefix(vocab.add_space_prefix)
    if cfg.bos_token_id is not None:
        w.add_bos_token_id(cfg.bos_token_id)
    w.add_add_bos_token(cfg.bos_token_id is not None)
    w.add_add_eos_token(False)
    if cfg.eos_token_ids:
        w.add_eos_token_id(cfg.eos_token_ids[0])
    eot = vocab.tokens.index("<|eot_id|>") if "<|eot_id|>" in vocab.tokens else None
    if eot is not None:
        w.add_eot_token_id(eot)
    if cfg.pad_token_id is not None:
        w.add_pad_token_id(cfg.pad_token_id)
    if ckpt.chat_template:
        w.add_chat_template(ckpt.chat_template)
