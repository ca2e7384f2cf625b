"""Hugging Face checkpoints (config.json + safetensors) -> canonical `ModelConfig` + tensors.

Families (each has ONE name table below, foreign name -> canonical name):

- microsoft/bitnet-b1.58-2B-4T (`BitNetForCausalLM`): transformers' packed uint8 weights plus
  `weight_scale`; its `quantization_config.linear_class` is `autobitlinear`, so the stored
  scale is a MULTIPLIER (beta = weight_scale). Its `-bf16` twin holds latent weights.
- 1bitLLM/bitnet_b1_58-* (`BitnetForCausalLM`, model_type llama): fp16 latent weights, SwiGLU,
  subln norms named `inner_attn_ln` / `ffn_layernorm` (their `modeling_bitnet.py`).
- plain Llama with `quantization_config.quant_method = bitnet` (Falcon3-*-1.58bit, Falcon-E,
  HF1BitLLM Llama3-8B-1.58): default `linear_class` `bitlinear`, whose stored scale is a
  DIVISOR (`y = x.W / weight_scale`), so beta = 1 / weight_scale. No subln.
- NousResearch/OLMo-Bitnet-1B (OLMo's own config format, `ternary: true`): fused `att_proj`
  (q|k|v) and `ff_proj` (up|gate) quantized with ONE scale each, parameter-free RMSNorm inside
  every BitLinear.

Float (latent) projection weights are quantized on load with `quant.quantize_weights`, unless a
matrix already holds exactly {-a, 0, a} (a dequantized ternary export such as Falcon-E's
`bfloat16` revision): then codes = sign(W) and beta = a, exactly. Only safetensors is read:
never a pickle (.bin/.pt), and no torch import.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError, FormatError
from ..packing import unpack_hf
from ..quant import quantize_weights
from .native import bf16_to_float32, projection_shapes, read_header

# --- name tables: foreign name -> canonical name -------------------------------------------------
# "{i}" is the layer index. A canonical name ending in ".weight" is a float tensor; otherwise the
# entry is a ternary projection: the foreign module prefix (".weight", and ".weight_scale" when
# packed, are appended) -> the canonical projection (".codes" and ".scale" are produced). A tuple
# splits a fused matrix along its rows, in that order, every piece keeping the fused scale.

LLAMA_NAMES: dict[str, str | tuple[str, ...]] = {
    "model.embed_tokens.weight": "embed.weight",
    "lm_head.weight": "lm_head.weight",
    "model.norm.weight": "norm.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.q_proj": "layers.{i}.q",
    "model.layers.{i}.self_attn.k_proj": "layers.{i}.k",
    "model.layers.{i}.self_attn.v_proj": "layers.{i}.v",
    "model.layers.{i}.self_attn.o_proj": "layers.{i}.o",
    "model.layers.{i}.mlp.gate_proj": "layers.{i}.gate",
    "model.layers.{i}.mlp.up_proj": "layers.{i}.up",
    "model.layers.{i}.mlp.down_proj": "layers.{i}.down",
}

# transformers models/bitnet/modeling_bitnet.py: subln inside attention and MLP.
BITNET_NAMES = {
    **LLAMA_NAMES,
    "model.layers.{i}.self_attn.attn_sub_norm.weight": "layers.{i}.attn_sub_norm.weight",
    "model.layers.{i}.mlp.ffn_sub_norm.weight": "layers.{i}.ffn_sub_norm.weight",
}

# 1bitLLM modeling_bitnet.py: the same norms under other names.
ONEBITLLM_NAMES = {
    **LLAMA_NAMES,
    "model.layers.{i}.self_attn.inner_attn_ln.weight": "layers.{i}.attn_sub_norm.weight",
    "model.layers.{i}.mlp.ffn_layernorm.weight": "layers.{i}.ffn_sub_norm.weight",
}

# OLMo (allenai/OLMo olmo/model.py) under hf_olmo's `model.` prefix (also read without it).
OLMO_NAMES: dict[str, str | tuple[str, ...]] = {
    "model.transformer.wte.weight": "embed.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",  # only when weight_tying is false
    "model.transformer.ln_f.weight": "norm.weight",
    "model.transformer.blocks.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",
    "model.transformer.blocks.{i}.ff_norm.weight": "layers.{i}.ffn_norm.weight",
    # q, k, v = att_proj(x).split((d_model, kv_dim, kv_dim), -1)
    "model.transformer.blocks.{i}.att_proj": ("layers.{i}.q", "layers.{i}.k", "layers.{i}.v"),
    "model.transformer.blocks.{i}.attn_out": "layers.{i}.o",
    # SwiGLU: `x, gate = ff_proj(x).chunk(2, -1); silu(gate) * x`: the up rows come first.
    "model.transformer.blocks.{i}.ff_proj": ("layers.{i}.up", "layers.{i}.gate"),
    "model.transformer.blocks.{i}.ff_out": "layers.{i}.down",
}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class _Family:
    """How one checkpoint family is read."""

    name: str  # ModelConfig.family
    names: dict[str, str | tuple[str, ...]]
    ternary_by_design: bool  # float weights are latent weights quantized in forward


# --- safetensors, without torch --------------------------------------------------------------------

# numpy dtype of each safetensors dtype; BF16 is read as raw uint16 bits and widened.
_ST_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


class _Checkpoint:
    """The tensors of one or more safetensors files, read lazily through memory maps."""

    def __init__(self, files: list[Path], where: Path) -> None:
        self.where = where  # the directory or index file, for messages
        self.entries: dict[str, _Entry] = {}
        self._maps: dict[Path, np.ndarray] = {}
        for file in files:
            for name, entry in self._scan(file).items():
                if name in self.entries:
                    raise FormatError(
                        f"{file}: tensor {name} is also in {self.entries[name].file.name}"
                    )
                self.entries[name] = entry

    def _scan(self, file: Path) -> dict[str, _Entry]:
        try:
            buf = np.memmap(file, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:  # ValueError: empty file
            raise FormatError(f"{file}: cannot read the safetensors file ({exc})") from None
        header, start = read_header(file, buf)
        size = buf.size
        out: dict[str, _Entry] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = str(info["dtype"])
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (start + int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                raise FormatError(
                    f"{file}: tensor {name}: malformed header entry ({exc!r})"
                ) from None
            if not start <= begin <= end or any(d < 0 for d in shape):
                raise FormatError(f"{file}: tensor {name}: bad shape {list(shape)} or offsets")
            if end > size:
                raise FormatError(
                    f"{file}: tensor {name} ends at byte {end} but the file has {size} bytes "
                    "(truncated or corrupt file)"
                )
            itemsize = np.dtype(_ST_DTYPES[dtype]).itemsize if dtype in _ST_DTYPES else None
            if itemsize is not None and end - begin != math.prod(shape) * itemsize:
                raise FormatError(
                    f"{file}: tensor {name}: {end - begin} bytes do not hold {dtype}{list(shape)}"
                )
            out[name] = _Entry(file, dtype, shape, begin, end)
        self._maps[file] = buf
        return out

    def find(self, name: str) -> str | None:
        """The stored name of `name`, accepting it without a leading `model.` prefix."""
        if name in self.entries:
            return name
        short = name.removeprefix("model.")
        return short if short in self.entries else None

    def read(self, name: str) -> np.ndarray:
        """The tensor as numpy (BF16 widened to float32); a view into the file where possible."""
        e = self.entries[name]
        if e.dtype not in _ST_DTYPES:
            raise FormatError(f"{e.file}: tensor {name} has unsupported dtype {e.dtype}")
        raw = np.asarray(self._maps[e.file][e.begin : e.end])
        arr = raw.view(np.dtype(_ST_DTYPES[e.dtype])).reshape(e.shape)
        return bf16_to_float32(arr) if e.dtype == "BF16" else arr


def _weight_files(directory: Path) -> tuple[list[Path], Path]:
    """The safetensors files of a checkpoint directory and the path to name in messages."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FormatError(f"{index}: not a valid safetensors index ({exc!r})") from None
        for shard in shards:  # a file of this directory: not a path that leaves it
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise FormatError(
                    f"{index}: shard {shard!r} is not a file name in {directory} (the weight map "
                    "may name only files next to the index)"
                )
        files = [directory / shard for shard in shards]
        for f in files:
            try:
                present = f.is_file()
            except OSError:  # a name the file system refuses (too long)
                present = False
            if not present:
                raise FormatError(f"{index}: shard {f.name[:100]} is missing from {directory}")
        return files, index
    single = directory / "model.safetensors"
    if single.is_file():
        return [single], single
    others = sorted(directory.glob("*.safetensors"))
    if others:
        return others, directory
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise FormatError(
            f"{directory}: holds only pickle weights ({', '.join(pickles[:3])}); bitnet158 loads "
            "only safetensors or GGUF (pickle files can run code). Convert them to "
            "model.safetensors in an environment you trust."
        )
    raise FormatError(f"{directory}: no model.safetensors or model.safetensors.index.json")


# --- config.json -----------------------------------------------------------------------------------


def _identify(cj: dict[str, Any], path: Path | str) -> _Family:
    """The family of a config.json, from `architectures` and `model_type`."""
    archs = cj.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    model_type = cj.get("model_type")
    if arch == "BitNetForCausalLM" or (arch is None and model_type == "bitnet"):
        return _Family("bitnet-2b4t", BITNET_NAMES, ternary_by_design=True)
    if arch == "BitnetForCausalLM":  # 1bitLLM: lower-case n, model_type llama
        return _Family("llama-b158", ONEBITLLM_NAMES, ternary_by_design=True)
    if model_type == "olmo" and "d_model" in cj:  # OLMo's own config format, not OlmoForCausalLM
        return _Family("olmo-bitnet", OLMO_NAMES, ternary_by_design=True)
    if arch == "LlamaForCausalLM" or (arch is None and model_type == "llama"):
        return _Family("llama", LLAMA_NAMES, ternary_by_design=False)
    raise FormatError(
        f"{path}: unsupported architecture {arch!r} (model_type {model_type!r}); bitnet158 reads "
        "BitNetForCausalLM, BitnetForCausalLM (1bitLLM), LlamaForCausalLM with BitNet weights "
        "and OLMo-Bitnet"
    )


def _quant_config(cj: dict[str, Any], path: Path | str) -> dict[str, Any]:
    """quantization_config if it is transformers' BitNet one, else {}; rejects what we cannot run."""
    qc = _mapping(cj, path, "quantization_config")
    if not qc:
        return {}
    if qc.get("quant_method") != "bitnet":
        raise FormatError(
            f"{path}: quantization_config.quant_method {qc.get('quant_method')!r} is not "
            "'bitnet'; only BitNet ternary checkpoints are supported"
        )
    if qc.get("use_rms_norm"):
        raise FormatError(
            f"{path}: quantization_config.use_rms_norm (an RMSNorm with weights inside every "
            "BitLinear) is not supported"
        )
    if qc.get("linear_class", "bitlinear") not in ("bitlinear", "autobitlinear"):
        raise FormatError(
            f"{path}: unknown quantization_config.linear_class {qc['linear_class']!r}"
        )
    return qc


def _require(cj: dict[str, Any], path: Path | str, *keys: str) -> list[int]:
    values = []
    for key in keys:
        value = cj.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or abs(value) >= 2**63:
            raise FormatError(f"{path}: config field {key!r} is missing or not an integer")
        values.append(value)
    return values


def _number(cj: dict[str, Any], path: Path | str, key: str, default: Any, integer: bool = False):
    """Config field `key` as a finite number (`default` when absent or null), or FormatError:
    a string, list or non-finite value where a number belongs is a corrupt config."""
    value = cj.get(key)
    if value is None:
        return default
    finite = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    if isinstance(value, bool) or not finite or (integer and value != int(value)):
        kind = "an integer" if integer else "a number"
        raise FormatError(f"{path}: config field {key!r} = {value!r} is not {kind}")
    return int(value) if integer else float(value)


def _mapping(cj: dict[str, Any], path: Path | str, key: str) -> dict[str, Any]:
    """Config field `key` as a JSON object ({} when absent or null)."""
    value = cj.get(key) or {}
    if not isinstance(value, dict):
        raise FormatError(f"{path}: config field {key!r} must be a JSON object, got {value!r}")
    return value


def _eos_list(value: Any) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _rope_theta(cj: dict[str, Any], path: Path | str, default: float) -> float:
    scaling = _mapping(cj, path, "rope_scaling")
    params = _mapping(cj, path, "rope_parameters")  # transformers v5 folds theta and scaling in
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type")
    if kind not in (None, "default"):
        raise FormatError(f"{path}: RoPE scaling {kind!r} is not supported (plain RoPE only)")
    return _number(cj, path, "rope_theta", _number(params, path, "rope_theta", default))


def _llama_config(cj: dict[str, Any], path: Path | str, family: _Family) -> dict[str, Any]:
    """ModelConfig fields of the Llama-shaped families (BitNet, 1bitLLM, plain Llama)."""
    V, H, inter, layers, heads = _require(
        cj, path, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads",
    )  # fmt: skip
    if cj.get("attention_bias") or cj.get("mlp_bias"):
        raise FormatError(f"{path}: linear biases (attention_bias / mlp_bias) are not supported")
    act = cj.get("hidden_act", "relu2" if family.name == "bitnet-2b4t" else "silu")
    if act not in ("relu2", "silu"):
        raise FormatError(f"{path}: hidden_act {act!r} is not supported (relu2 or silu)")
    return {
        "vocab_size": V,
        "hidden_size": H,
        "intermediate_size": inter,
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": cj.get("num_key_value_heads") or heads,
        "head_dim": cj.get("head_dim") or 0,
        "hidden_act": act,
        "subln": family.name != "llama",
        "rms_norm_eps": _number(cj, path, "rms_norm_eps", 1e-5 if family.name != "llama" else 1e-6),
        "rope_theta": _rope_theta(cj, path, 500000.0 if family.name == "bitnet-2b4t" else 10000.0),
        "max_position_embeddings": _number(cj, path, "max_position_embeddings", 2048, integer=True),
        # BitNetConfig and LlamaConfig both default to untied; 2B-4T and 1bitLLM set it true.
        "tie_word_embeddings": bool(cj.get("tie_word_embeddings", False)),
    }


def _olmo_config(cj: dict[str, Any], path: Path | str) -> dict[str, Any]:
    """ModelConfig fields of OLMo's own config format (allenai/OLMo olmo/config.py)."""
    if not cj.get("ternary"):
        raise FormatError(
            f'{path}: an OLMo config without `"ternary": true` is a full-precision OLMo model, '
            "not OLMo-Bitnet"
        )
    d, heads, layers = _require(cj, path, "d_model", "n_heads", "n_layers")
    # the embedding (and the tied output) has embedding_size rows, padded past vocab_size
    (vocab,) = _require(
        {"vocab_size": cj.get("embedding_size") or cj.get("vocab_size")}, path, "vocab_size"
    )
    unsupported = {
        "activation_type": ("swiglu", cj.get("activation_type", "swiglu")),
        "block_type": ("sequential", cj.get("block_type", "sequential")),
        "rope": (True, cj.get("rope", False)),
        "alibi": (False, bool(cj.get("alibi", False))),
        "clip_qkv": (None, cj.get("clip_qkv")),
        "attention_layer_norm": (False, bool(cj.get("attention_layer_norm", False))),
        "include_bias": (False, bool(cj.get("include_bias", False))),
        "scale_logits": (False, bool(cj.get("scale_logits", False))),
    }
    for key, (want, got) in unsupported.items():
        if got != want:
            raise FormatError(f"{path}: OLMo {key}={got!r} is not supported (only {want!r})")
    affine = bool(cj.get("layer_norm_with_affine", True))
    norm_bias = cj.get("bias_for_layer_norm")
    if affine and (norm_bias if norm_bias is not None else cj.get("include_bias")):
        raise FormatError(f"{path}: OLMo layer norms with a bias are not supported")
    norm_type = cj.get("layer_norm_type", "default")
    kinds = {"rms": "rmsnorm", "default": "layernorm", "low_precision": "layernorm"}
    if not isinstance(norm_type, str) or norm_type not in kinds:
        raise FormatError(f"{path}: OLMo layer_norm_type {norm_type!r} is not supported")
    if cj.get("multi_query_attention"):
        kv_heads = 1
    else:
        kv_heads = cj.get("n_kv_heads") or heads
    mlp_hidden = _number(cj, path, "mlp_hidden_size", 0, integer=True) or (
        _number(cj, path, "mlp_ratio", 4) * d
    )
    if isinstance(mlp_hidden, float) and not math.isfinite(mlp_hidden):  # ratio * d overflowed
        raise FormatError(f"{path}: the MLP width mlp_ratio * d_model = {mlp_hidden} is not finite")
    eps = _number(cj, path, "layer_norm_eps", 0.0) or 1e-5
    return {
        "vocab_size": vocab,
        "hidden_size": d,
        "intermediate_size": int(mlp_hidden) // 2,  # SwiGLU halves ff_proj's output
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "hidden_act": "silu",
        "subln": False,
        "inner_norm": True,  # BitLinear158: RMSLayerNorm(elementwise_affine=False), eps 1e-5
        "inner_norm_eps": 1e-5,
        "norm_kind": kinds[norm_type],
        "norm_affine": affine,
        "rms_norm_eps": eps,
        "rope_theta": _number(cj, path, "rope_theta", 10000.0),
        "max_position_embeddings": _number(cj, path, "max_sequence_length", 2048, integer=True),
        "tie_word_embeddings": bool(cj.get("weight_tying", True)),
    }


def config_from_hf(config_json: dict[str, Any], path: Path | str = "config.json") -> ModelConfig:
    """The ModelConfig of a Hugging Face / OLMo config.json (`path` is named in errors)."""
    if not isinstance(config_json, dict):
        raise FormatError(f"{path}: config.json must hold a JSON object")
    family = _identify(config_json, path)
    _quant_config(config_json, path)
    if family.name == "olmo-bitnet":
        fields = _olmo_config(config_json, path)
    else:
        fields = _llama_config(config_json, path, family)
    fields["family"] = family.name
    fields["bos_token_id"] = config_json.get("bos_token_id")
    fields["eos_token_ids"] = _eos_list(config_json.get("eos_token_id"))
    fields["pad_token_id"] = config_json.get("pad_token_id")
    try:
        return ModelConfig(**fields)
    except (ConfigError, TypeError, ValueError) as exc:
        raise FormatError(f"{path}: {exc}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(
            f"{path}: no such file (a Hugging Face checkpoint needs config.json)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: must hold a JSON object")
    return data


# --- tensors ---------------------------------------------------------------------------------------


def _canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical float tensor and projection (as its base name) of `cfg`, with its shape."""
    H, V = cfg.hidden_size, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (V, H)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    if cfg.norm_affine:
        shapes["norm.weight"] = (H,)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        if cfg.norm_affine:
            shapes[p + "attn_norm.weight"] = shapes[p + "ffn_norm.weight"] = (H,)
        if cfg.subln:
            shapes[p + "attn_sub_norm.weight"] = (cfg.q_size,)
            shapes[p + "ffn_sub_norm.weight"] = (cfg.intermediate_size,)
        for proj, nk in projection_shapes(cfg).items():
            shapes[p + proj] = nk
    return shapes


def _exact_ternary(w: np.ndarray) -> np.float32 | None:
    """a if every value of W is in {-a, 0, a} (a dequantized ternary matrix), else None."""
    a = np.float32(np.abs(w).max()) if w.size else np.float32(0)
    exact = a > 0 and np.isfinite(a) and bool(np.all((w == 0) | (np.abs(w) == a)))
    return a if exact else None


class _Reader:
    """Turns the foreign tensors of one checkpoint into canonical ones."""

    def __init__(
        self, ckpt: _Checkpoint, family: _Family, qc: dict[str, Any], latent: bool
    ) -> None:
        self.ckpt, self.family = ckpt, family
        self.multiplier = qc.get("linear_class", "bitlinear") == "autobitlinear"
        self.packed_ok = bool(qc)
        # float projections are latent weights to quantize, not a full-precision model
        self.latent_ok = family.ternary_by_design or bool(qc) or latent

    def _get(self, name: str, expect: str) -> tuple[str, _Entry]:
        stored = self.ckpt.find(name)
        if stored is None:
            raise FormatError(f"{self.ckpt.where}: tensor {name} is missing (expected {expect})")
        return stored, self.ckpt.entries[stored]

    def _bad_shape(self, e: _Entry, stored: str, expect: str) -> FormatError:
        return FormatError(
            f"{e.file}: tensor {stored} is {e.dtype}{list(e.shape)}, expected {expect}"
        )

    def float_tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        expect = f"float {list(shape)}"
        stored, e = self._get(name, expect)
        if e.dtype not in _FLOAT_DTYPES or e.shape != shape:
            raise self._bad_shape(e, stored, expect)
        return np.array(self.ckpt.read(stored), dtype=np.float32)  # an owned float32 copy

    def projection(self, prefix: str, rows: list[int], k: int) -> tuple[np.ndarray, np.float32]:
        """Codes int8[sum(rows), K] and beta of one (possibly fused) projection."""
        n = sum(rows)
        expect = f"uint8 {[-(-n // 4), k]} (packed) or float {[n, k]}"
        stored, e = self._get(prefix + ".weight", expect)
        if e.dtype == "U8" and e.shape == (-(-n // 4), k):  # transformers' packed layout
            if not self.packed_ok:
                raise FormatError(
                    f"{e.file}: tensor {stored} is packed, but config.json has no BitNet "
                    "quantization_config to say how its weight_scale applies"
                )
            try:
                codes = unpack_hf(self.ckpt.read(stored), n)
            except ValueError as exc:
                raise FormatError(f"{e.file}: tensor {stored}: {exc}") from None
            return codes, self._stored_scale(prefix)
        if e.dtype not in _FLOAT_DTYPES or e.shape != (n, k):
            raise self._bad_shape(e, stored, expect)
        w = np.asarray(self.ckpt.read(stored), dtype=np.float32)
        a = _exact_ternary(w)
        if a is not None:  # a dequantized export (Falcon-E `bfloat16`): its values are the model
            return np.sign(w).astype(np.int8), a
        if not self.latent_ok:
            raise FormatError(
                f"{e.file}: tensor {stored} holds full-precision weights and config.json marks "
                "no BitNet quantization: this is not a BitNet b1.58 checkpoint (make one with "
                "`bitnet158 quantize`, or pass latent=True for latent BitNet weights such as "
                "Falcon-E's `prequantized` revision)"
            )
        try:  # latent (master) weights, quantized as in their forward
            return quantize_weights(w)
        except ValueError as exc:  # NaN or inf: a corrupt file
            raise FormatError(f"{e.file}: tensor {stored}: {exc}") from None

    def _stored_scale(self, prefix: str) -> np.float32:
        stored, e = self._get(prefix + ".weight_scale", "float [1]")
        if e.dtype not in _FLOAT_DTYPES or math.prod(e.shape) != 1:
            raise self._bad_shape(e, stored, "float [1]")
        scale = np.float32(self.ckpt.read(stored).reshape(-1)[0])
        if not np.isfinite(scale) or scale <= 0:
            raise FormatError(f"{e.file}: tensor {stored} = {scale} is not a positive scale")
        # autobitlinear: y = (x.W) * weight_scale; bitlinear: y = (x.W) / weight_scale
        return scale if self.multiplier else np.float32(1.0) / scale

    def read_all(self, cfg: ModelConfig) -> dict[str, np.ndarray]:
        shapes = _canonical_shapes(cfg)
        out: dict[str, np.ndarray] = {}
        for foreign, canonical in self.family.names.items():
            targets = (canonical,) if isinstance(canonical, str) else canonical
            for i in range(cfg.num_layers) if "{i}" in foreign else [0]:
                names = [t.format(i=i) for t in targets]
                if not all(n in shapes for n in names):
                    continue  # e.g. lm_head of a tied model
                if names[0].endswith(".weight"):
                    out[names[0]] = self.float_tensor(foreign.format(i=i), shapes[names[0]])
                    continue
                rows = [shapes[n][0] for n in names]
                codes, beta = self.projection(foreign.format(i=i), rows, shapes[names[0]][1])
                for name, part in zip(names, np.split(codes, np.cumsum(rows)[:-1]), strict=True):
                    out[name + ".codes"] = np.ascontiguousarray(part)
                    out[name + ".scale"] = np.asarray(beta, dtype=np.float32)
        done = {n.removesuffix(".codes") for n in out}
        missing = sorted(set(shapes) - done)
        if missing:  # a gap in the name table, not in the file
            raise FormatError(f"{self.ckpt.where}: no source for canonical tensors {missing[:5]}")
        return out


def load_hf_checkpoint(
    directory: str | os.PathLike, *, latent: bool = False
) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read a Hugging Face checkpoint directory into a ModelConfig and canonical tensors.

    `latent=True` accepts full-precision projection weights of a plain Llama config as BitNet
    latent weights to quantize (checkpoints of the BitNet families are recognised without it).
    """
    path = Path(directory)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise FormatError(
                f"{path}: a pickle file; bitnet158 loads only safetensors or GGUF weights"
            )
        path = path.parent
    if not path.is_dir():
        raise FormatError(f"{path}: no such checkpoint directory")
    config_path = path / "config.json"
    cj = _read_json(config_path)
    cfg = config_from_hf(cj, config_path)
    gen = path / "generation_config.json"
    if gen.is_file():  # often lists more end-of-turn ids than config.json
        extra = _eos_list(_read_json(gen).get("eos_token_id"))
        cfg.eos_token_ids = list(dict.fromkeys(cfg.eos_token_ids + extra))
    files, where = _weight_files(path)
    ckpt = _Checkpoint(files, where)
    # Falcon3-1.58bit and Llama3-8B-1.58 also carry `is_bitnet_config: true`
    latent = latent or bool(cj.get("is_bitnet_config"))
    reader = _Reader(ckpt, _identify(cj, config_path), _quant_config(cj, config_path), latent)
    return cfg, reader.read_all(cfg)
