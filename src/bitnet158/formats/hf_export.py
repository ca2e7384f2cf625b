"""Hugging Face checkpoints out: transformers' packed BitNet, and the bf16 form for fine-tuning.

- packed (`latent=False`): what microsoft/bitnet-b1.58-2B-4T ships and
  `transformers.BitNetForCausalLM.from_pretrained` loads: projections as transformers' packed
  uint8 (`packing.pack_hf`), `weight_scale` float32 [1] = beta, and a quantization_config with
  `linear_class: autobitlinear` (its weight_scale is a MULTIPLIER, y = (x.W) * weight_scale)
  and `quantization_mode: offline`. Models with sub-norms are `BitNetForCausalLM` (its
  `hidden_act` picks relu2 or SiLU); plain Llama BitNets (Falcon-E style) `LlamaForCausalLM`.
- bf16 (`latent=True`): every projection as the dequantized ternary matrix codes * beta in
  bf16, no quantization_config: the form Falcon-E's `bfloat16` revision and onebitllms'
  `convert_to_bf16` use to start quantization-aware fine-tuning elsewhere. An online BitNet
  quantizer re-derives each scale as mean|W|, which is beta times the fraction of nonzero
  weights; bitnet158 reads the file back exactly (codes, and beta rounded to bf16).

numpy + our own safetensors writer (BF16 as raw uint16 bits): no torch.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import FormatError
from ..packing import pack_hf
from .atomic import replace_directory, temporary_sibling
from .native import NativeCheckpoint

# canonical name -> transformers name ("{i}" the layer); sub-norms only for BitNetForCausalLM
HF_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "lm_head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.attn_sub_norm.weight": "model.layers.{i}.self_attn.attn_sub_norm.weight",
    "layers.{i}.ffn_sub_norm.weight": "model.layers.{i}.mlp.ffn_sub_norm.weight",
    "layers.{i}.q": "model.layers.{i}.self_attn.q_proj",
    "layers.{i}.k": "model.layers.{i}.self_attn.k_proj",
    "layers.{i}.v": "model.layers.{i}.self_attn.v_proj",
    "layers.{i}.o": "model.layers.{i}.self_attn.o_proj",
    "layers.{i}.gate": "model.layers.{i}.mlp.gate_proj",
    "layers.{i}.up": "model.layers.{i}.mlp.up_proj",
    "layers.{i}.down": "model.layers.{i}.mlp.down_proj",
}
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
QUANTIZATION_CONFIG = {
    "quant_method": "bitnet",
    "linear_class": "autobitlinear",
    "quantization_mode": "offline",
}

_ST_NAMES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("u1"): "U8"}


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> BF16 raw bits (uint16), rounding to nearest even as torch does."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def _as_float32(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == np.uint16:  # BF16 bits, as our canonical dicts hold them
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32)


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """A plain safetensors file: name -> (dtype name, array); BF16 arrays are uint16 bits."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, value) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": list(value.shape),
            "data_offsets": [offset, offset + value.nbytes],
        }
        offset += value.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for _, value in tensors.values():
            f.write(np.ascontiguousarray(value).data)
        f.flush()
        os.fsync(f.fileno())


def check_exportable(cfg: ModelConfig) -> str:
    """The transformers architecture that computes this model, or FormatError."""
    if cfg.inner_norm or cfg.norm_kind != "rmsnorm" or not cfg.norm_affine:
        raise FormatError(
            "cannot write a transformers checkpoint: OLMo-Bitnet's norms (layer norms, a "
            "parameter-free RMSNorm inside every BitLinear) have no transformers BitNet class"
        )
    if cfg.subln:
        return "BitNetForCausalLM"
    if cfg.hidden_act != "silu":
        raise FormatError(
            f"cannot write a transformers checkpoint: without sub-norms the model is a "
            f"LlamaForCausalLM, whose FFN gates with SiLU, not {cfg.hidden_act}"
        )
    return "LlamaForCausalLM"


def _float_dtype(embed: np.ndarray) -> str:
    return {np.uint16: "bfloat16", np.float16: "float16"}.get(embed.dtype.type, "float32")


def config_json(cfg: ModelConfig, arch: str, dtype: str, packed: bool) -> dict:
    """transformers config.json of our config."""
    data = {
        "architectures": [arch],
        "model_type": "bitnet" if arch == "BitNetForCausalLM" else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else cfg.eos_token_ids,
        "pad_token_id": cfg.pad_token_id,
        "dtype": dtype,
    }
    if packed:
        data["quantization_config"] = dict(QUANTIZATION_CONFIG)
    return data


def _tokenizer_files(ckpt: NativeCheckpoint, cfg: ModelConfig, directory: Path) -> None:
    (directory / "tokenizer.json").write_text(ckpt.tokenizer_json, encoding="utf-8")
    try:
        vocab = {i: t for t, i in json.loads(ckpt.tokenizer_json)["model"]["vocab"].items()}
        added = json.loads(ckpt.tokenizer_json).get("added_tokens") or []
        vocab.update({t["id"]: t["content"] for t in added})
    except (ValueError, KeyError, TypeError):
        vocab = {}
    tok_cfg: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    if cfg.bos_token_id in vocab:
        tok_cfg["bos_token"] = vocab[cfg.bos_token_id]
        tok_cfg["add_bos_token"] = True
    if cfg.eos_token_ids and cfg.eos_token_ids[0] in vocab:
        tok_cfg["eos_token"] = vocab[cfg.eos_token_ids[0]]
    if cfg.pad_token_id in vocab:
        tok_cfg["pad_token"] = vocab[cfg.pad_token_id]
    if ckpt.chat_template:
        tok_cfg["chat_template"] = ckpt.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids}
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2))


def hf_tensors(
    cfg: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    latent: bool,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict[str, tuple[str, np.ndarray]]:
    """transformers-named tensors (dtype name, array) of canonical tensors."""

    def matrix(x: np.ndarray) -> tuple[str, np.ndarray]:
        """embed / lm_head: kept in their own dtype (BF16 for the bf16 form)."""
        x = np.asarray(x)
        if x.dtype == np.uint16:
            return "BF16", x
        if latent:
            return "BF16", _bf16_bits(x.astype(np.float32))
        return ("F16", x) if x.dtype == np.float16 else ("F32", x.astype(np.float32))

    def vector(x: np.ndarray) -> tuple[str, np.ndarray]:
        x = _as_float32(x)
        return ("BF16", _bf16_bits(x)) if latent else ("F32", x)

    out = {HF_NAMES["embed.weight"]: matrix(tensors["embed.weight"])}
    if "lm_head.weight" in tensors:
        out[HF_NAMES["lm_head.weight"]] = matrix(tensors["lm_head.weight"])
    out[HF_NAMES["norm.weight"]] = vector(tensors["norm.weight"])
    layers = range(cfg.num_layers)
    for i in progress(layers) if progress else layers:
        for norm in ("attn_norm", "ffn_norm", "attn_sub_norm", "ffn_sub_norm"):
            name = f"layers.{i}.{norm}.weight"
            if name in tensors:
                out[HF_NAMES[f"layers.{{i}}.{norm}.weight"].format(i=i)] = vector(tensors[name])
        for proj in PROJECTIONS:
            prefix = HF_NAMES[f"layers.{{i}}.{proj}"].format(i=i)
            codes = np.asarray(tensors[f"layers.{i}.{proj}.codes"])
            beta = np.float32(np.asarray(tensors[f"layers.{i}.{proj}.scale"]).reshape(-1)[0])
            if latent:
                b = _bf16_bits(np.array([beta]))  # the bf16 scale, so that W is exactly {-b, 0, b}
                w = codes.astype(np.float32) * (b.astype(np.uint32) << 16).view(np.float32)
                out[prefix + ".weight"] = ("BF16", _bf16_bits(w))
            else:
                out[prefix + ".weight"] = ("U8", pack_hf(codes))
                out[prefix + ".weight_scale"] = ("F32", np.array([beta], dtype=np.float32))
    return out


def save_hf(
    directory: str | os.PathLike,
    ckpt: NativeCheckpoint,
    tensors: Mapping[str, np.ndarray],
    latent: bool = False,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> Path:
    """Write a Hugging Face checkpoint directory (config, safetensors, tokenizer), atomically.

    The directory is built under a temporary name beside `directory` and renamed into place;
    an existing `directory` is replaced only after the new one is complete.
    """
    cfg = ckpt.config
    arch = check_exportable(cfg)
    directory = Path(directory)
    tmp = temporary_sibling(directory, directory=True)
    try:
        named = hf_tensors(cfg, tensors, latent, progress)
        write_safetensors(tmp / "model.safetensors", named)
        dtype = "bfloat16" if latent else _float_dtype(np.asarray(tensors["embed.weight"]))
        cj = config_json(cfg, arch, dtype, packed=not latent)
        (tmp / "config.json").write_text(json.dumps(cj, indent=2))
        _tokenizer_files(ckpt, cfg, tmp)
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
