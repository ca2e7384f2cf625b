"""Structure-aware mutations for the fuzz targets, used half of the time next to libFuzzer's
byte mutations (which rarely turn valid JSON into other valid JSON).

- JSON (config.json, tokenizer_config.json, the safetensors headers and our metadata's config
  and tokenizer): a value somewhere in the document is replaced by one of another type or an
  extreme one (-1, 2^64, NaN, "", [], {}, a long string), deleted, or a known key is added.
- GGUF: the header is parsed into metadata entries and tensor infos; an entry gets another
  value type or an extreme value, an array is cut or extended, a tensor's dimensions, type or
  offset change; the header is written back before the original tensor data.

Inputs stay in the targets' formats (fuzz_targets.py), so a crashing input re-runs alone.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from typing import Any

from fuzz_targets import HF_FILES, pack_files, unpack_files

EXTREMES: list[Any] = [
    "x", "", "default", "<s>", "x" * 5000, -1, 0, 1, 2, 7, 2**31 - 1, 2**31, 2**32, 2**63,
    2**64, 10**30, -(2**63), 0.5, -0.0, 1e-300, 1e308, float("nan"), float("inf"), None, True,
    False, [], {}, [1, 2], [-1], ["x"], [[1]], {"a": 1}, {"type": "BPE"},
]  # fmt: skip
KEYS = [
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "max_position_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "rms_norm_eps",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act",
    "quantization_config", "linear_class", "chat_template", "weight_map", "dtype", "shape",
    "data_offsets", "__metadata__", "num_layers", "num_heads", "num_kv_heads", "subln",
    "inner_norm", "norm_kind", "norm_affine", "family", "eos_token_ids", "add_bos_token",
    "bos_token", "eos_token", "added_tokens", "post_processor", "pre_tokenizer", "decoder",
]  # fmt: skip


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON document: tuples of keys / indices."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:64]):  # long lists (vocabularies): the head is enough
            out += _paths(v, (*prefix, i))
    return out


def mutate_json(doc: Any, rng: random.Random) -> Any:
    """`doc` with one value replaced, deleted or added (doc itself is not modified)."""
    doc = json.loads(json.dumps(doc))
    path = rng.choice(_paths(doc))
    if not path:
        return rng.choice(EXTREMES)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key, action = path[-1], rng.random()
    if action < 0.7:
        parent[key] = rng.choice(EXTREMES)
    elif action < 0.85:
        del parent[key]
    elif isinstance(parent, dict):
        parent[rng.choice(KEYS)] = rng.choice(EXTREMES)
    else:
        parent.insert(key, rng.choice(EXTREMES))
    return doc


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _mutate_json_bytes(text: bytes, rng: random.Random) -> bytes | None:
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return _dumps(mutate_json(doc, rng))


def _mutate_safetensors(content: bytes, rng: random.Random, header_only: bool = False) -> bytes | None:  # fmt: skip
    """A safetensors file (or its bare header) with its JSON header mutated: a tensor entry,
    or inside our metadata the config / tokenizer JSON strings."""
    if header_only:
        header, payload = content, b""
    else:
        n = int.from_bytes(content[:8], "little")
        header, payload = content[8 : 8 + n], content[8 + n :]
    try:
        doc = json.loads(header)
    except ValueError:
        return None
    meta = doc.get("__metadata__") if isinstance(doc, dict) else None
    if isinstance(meta, dict) and rng.random() < 0.5:
        key = rng.choice([k for k in ("config", "tokenizer", "chat_template") if k in meta] or ["config"])  # fmt: skip
        inner = meta.get(key)
        text = inner.encode("utf-8", "surrogatepass") if isinstance(inner, str) else None
        mutated = _mutate_json_bytes(text, rng) if text is not None else None
        meta[key] = mutated.decode("utf-8", "surrogatepass") if mutated else rng.choice(EXTREMES)
    else:
        doc = mutate_json(doc, rng)
    text = _dumps(doc)
    return text if header_only else len(text).to_bytes(8, "little") + text + payload


# --- GGUF headers ----------------------------------------------------------------------------

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
_STRING, _ARRAY = 8, 9


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> bytes:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("truncated")
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if count > len(self.buf):
                raise ValueError("too long")
            return etype, [self.value(etype) for _ in range(count)]
        raise ValueError("type")


def parse_gguf_header(buf: bytes) -> tuple[int, list, list, int] | None:
    """(version, [(key, type, value)], [(name, dims, type, offset)], end) or None."""
    try:
        r = _Reader(buf)
        if buf[:4] != b"GGUF":
            return None
        r.pos = 4
        version, n_tensors, n_kv = r.unpack("<I"), r.unpack("<Q"), r.unpack("<Q")
        if n_kv > 100_000 or n_tensors > 100_000:
            return None
        kvs = []
        for _ in range(n_kv):
            key = r.string()
            vtype = r.unpack("<I")
            kvs.append((key, vtype, r.value(vtype)))
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            dims = [r.unpack("<Q") for _ in range(r.unpack("<I"))]
            tensors.append((name, dims, r.unpack("<I"), r.unpack("<Q")))
        return version, kvs, tensors, r.pos
    except (struct.error, ValueError, IndexError):
        return None


def _pack_value(vtype: int, value) -> bytes:
    if vtype in _SCALAR:
        return struct.pack(_SCALAR[vtype], value)
    if vtype == _STRING:
        return len(value).to_bytes(8, "little") + value
    etype, items = value
    head = struct.pack("<IQ", etype, len(items))
    return head + b"".join(_pack_value(etype, v) for v in items)


def dump_gguf_header(version: int, kvs: list, tensors: list) -> bytes:
    out = [b"GGUF", struct.pack("<IQQ", version, len(tensors), len(kvs))]
    for key, vtype, value in kvs:
        out += [_pack_value(_STRING, key), struct.pack("<I", vtype), _pack_value(vtype, value)]
    for name, dims, ttype, offset in tensors:
        out += [_pack_value(_STRING, name), struct.pack("<I", len(dims))]
        u64 = 2**64 - 1  # mutated sizes wrap as the file's 64-bit fields would
        out += [struct.pack("<Q", d & u64) for d in dims] + [
            struct.pack("<IQ", ttype, offset & u64)
        ]
    return b"".join(out)


def _extreme_scalar(vtype: int, rng: random.Random):
    if vtype in (6, 12):
        return rng.choice([0.0, -1.0, 1e-30, 3e38, float("nan"), float("inf"), -float("inf")])
    if vtype == 7:
        return rng.choice([True, False])
    bits = struct.calcsize(_SCALAR[vtype]) * 8
    signed = _SCALAR[vtype][1].islower()
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return rng.choice([v for v in (lo, hi, 0, 1, 2, 3, 31, 32, 256, 65537) if lo <= v <= hi])


def _random_value(rng: random.Random) -> tuple[int, Any]:
    vtype = rng.choice([*_SCALAR, _STRING, _STRING, _ARRAY, _ARRAY])
    if vtype == _STRING:
        return vtype, rng.choice([b"", b"x", b"bitnet", b"gpt2", b"llama", b"\xff\xfe", b"a b"])
    if vtype == _ARRAY:
        etype = rng.choice([*_SCALAR, _STRING])
        items = [_random_value_of(etype, rng) for _ in range(rng.choice([0, 1, 3]))]
        return vtype, (etype, items)
    return vtype, _extreme_scalar(vtype, rng)


def _random_value_of(vtype: int, rng: random.Random):
    if vtype == _STRING:
        return rng.choice([b"", b"x", b"a b", b"\xff"])
    return _extreme_scalar(vtype, rng)


def _mutate_gguf_header(buf: bytes, rng: random.Random) -> tuple[bytes, int] | None:
    """A mutated header for the GGUF file (or header) `buf`, and where the old header ended."""
    parsed = parse_gguf_header(buf)
    if parsed is None:
        return None
    version, kvs, tensors, end = parsed
    if kvs and (not tensors or rng.random() < 0.6):
        i = rng.randrange(len(kvs))
        key, vtype, value = kvs[i]
        action = rng.random()
        if action < 0.35:
            kvs[i] = (key, *_random_value(rng))
        elif action < 0.55 and vtype in _SCALAR:
            kvs[i] = (key, vtype, _extreme_scalar(vtype, rng))
        elif action < 0.75 and vtype == _ARRAY:
            etype, items = value
            cut = rng.choice([0, 1, len(items) // 2, max(len(items) - 1, 0)])
            extra = [_random_value_of(etype, rng)] if rng.random() < 0.5 else []
            kvs[i] = (key, vtype, (etype, items[:cut] + extra + items[cut + 1 :]))
        elif action < 0.85:
            del kvs[i]
        else:
            kvs.insert(i, (key, *_random_value(rng)))  # a duplicate key
    elif tensors:
        i = rng.randrange(len(tensors))
        name, dims, ttype, offset = tensors[i]
        action = rng.random()
        if action < 0.4 and dims:
            dims = list(dims)
            dims[rng.randrange(len(dims))] = rng.choice([0, 1, 3, 255, 257, 2**31, 2**63, 2**64 - 1])  # fmt: skip
        elif action < 0.55:
            dims = rng.choice([[], [*dims, 1], dims[:1], [1, 1, 1, 1, 1]])
        elif action < 0.8:
            ttype = rng.choice([0, 1, 8, 14, 30, 34, 35, 36, 2, 39, 1000, 2**32 - 1])
        elif action < 0.95:
            offset = rng.choice([0, offset + 1, offset + 32, 2**63, 2**64 - 1])
        else:
            name = rng.choice([tensors[0][0], b"", b"blk.0.attn_q.weight", b"x.weight"])
        tensors[i] = (name, dims, ttype, offset)
    return dump_gguf_header(version, kvs, tensors), end


# --- per target ------------------------------------------------------------------------------


def _gguf(data: bytes, rng: random.Random) -> bytes | None:
    if not data:
        return None
    body = data[1:]
    mutated = _mutate_gguf_header(body, rng)
    if mutated is None:
        return None
    header, end = mutated
    if data[0] % 2:  # header mode: the target appends the tensor data
        return data[:1] + header + body[end:]
    start = -(-end // 32) * 32  # the tensor data starts 32-aligned after the header
    return data[:1] + header + bytes(-len(header) % 32) + body[start:]


def _native(data: bytes, rng: random.Random) -> bytes | None:
    if not data:
        return None
    mutated = _mutate_safetensors(data[1:], rng, header_only=bool(data[0] % 2))
    return None if mutated is None else data[:1] + mutated


def _hf(data: bytes, rng: random.Random) -> bytes | None:
    files = unpack_files(data)
    if not files:
        return None
    name = rng.choice(sorted(files))
    content = files[name]
    if name.endswith(".safetensors"):
        mutated = _mutate_safetensors(content, rng)
    elif name.endswith(".json") and (name != "tokenizer.json" or rng.random() < 0.3):
        mutated = _mutate_json_bytes(content, rng)
    else:
        return None
    if mutated is None:
        return None
    files[name] = mutated
    if rng.random() < 0.05:  # sometimes a file of the directory appears or goes
        extra = rng.choice(HF_FILES)
        files.pop(extra, None) if extra in files else files.setdefault(extra, b"{}")
    return pack_files(files)


def _serve(data: bytes, rng: random.Random) -> bytes | None:
    if not data:
        return None
    mutated = _mutate_json_bytes(data[1:], rng)
    return None if mutated is None else data[:1] + mutated


STRUCTURED: dict[str, Callable[[bytes, random.Random], bytes | None]] = {
    "gguf": _gguf,
    "native": _native,
    "hf": _hf,
    "serve": _serve,
}


def custom_mutator(target: str, byte_mutator: Callable[[bytes, int], bytes]):
    """libFuzzer's custom mutator: a structured mutation half of the time (when the input
    still parses), libFuzzer's own byte mutation otherwise."""
    structured = STRUCTURED[target]

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.5:
            out = structured(data, rng)
            if out is not None and len(out) <= max_size:
                return out
        return byte_mutator(data, max_size)

    return mutate
