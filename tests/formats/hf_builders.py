"""Builders for the format tests: small random checkpoints in the real Hugging Face formats.

Each builder writes config.json + safetensors as the real checkpoint has them and returns the
reference logits of an independent implementation: transformers itself (BitNet, Llama with
BitLinear) or a small torch model written here from the published code (OLMo-Bitnet).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

IDS = torch.tensor([[1, 5, 17, 42, 99, 250, 3, 7, 64, 128, 200, 11]])


def ternarize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean codes and beta, as the BitNet b1.58 papers define them."""
    beta = w.float().abs().mean().clamp(min=1e-5)
    return (w.float() / beta).round().clamp(-1, 1), beta


def save_checkpoint(
    directory: Path, tensors: dict[str, torch.Tensor], config: dict, shards: int = 1
) -> Path:
    """config.json plus model.safetensors, or `shards` files and model.safetensors.index.json."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return directory
    names = sorted(tensors)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s * per : (s + 1) * per]}
        save_file(part, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def _as_float32(model: torch.nn.Module) -> torch.nn.Module:
    """transformers refuses `.float()` on quantized models; cast the float tensors directly."""
    torch.nn.Module.float(model)
    return model.eval()


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(IDS).logits.float()


# --- microsoft/bitnet-b1.58-2B-4T and its -bf16 twin ------------------------------------------


def _bitnet_config(**overrides):
    from transformers import BitNetConfig

    fields = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.05,
    )
    fields.update(overrides)
    return BitNetConfig(**fields)


def _randomize_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Norm weights start at 1; make them differ so that a swapped norm name shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def _random_bitnet(seed: int, **overrides):
    from transformers import BitNetForCausalLM

    torch.manual_seed(seed)
    return _randomize_norms(BitNetForCausalLM(_bitnet_config(**overrides)))


def config_json(config, arch: str, **extra) -> dict:
    data = config.to_dict()
    data["architectures"] = [arch]
    data.update(extra)
    return data


AUTOBITLINEAR_OFFLINE = {
    "quant_method": "bitnet",
    "linear_class": "autobitlinear",
    "quantization_mode": "offline",
}
AUTOBITLINEAR_ONLINE = {
    "quant_method": "bitnet",
    "linear_class": "autobitlinear",
    "quantization_mode": "online",
}


def make_bitnet_packed(directory: Path, shards: int = 1) -> tuple[Path, torch.Tensor]:
    """The 2B-4T layout: bf16 tensors, packed uint8 projections, bf16 weight_scale = beta."""
    from transformers import BitNetForCausalLM
    from transformers.integrations.bitnet import pack_weights

    model = _random_bitnet(0)
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        if name.endswith("_proj.weight"):
            codes, beta = ternarize(t)
            tensors[name] = pack_weights(codes.clone())
            tensors[name[: -len("weight")] + "weight_scale"] = beta.reshape(1).bfloat16()
        else:
            tensors[name] = t.bfloat16()
    config = config_json(
        model.config, "BitNetForCausalLM", quantization_config=AUTOBITLINEAR_OFFLINE
    )
    save_checkpoint(directory, tensors, config, shards)
    ref = _as_float32(BitNetForCausalLM.from_pretrained(directory, dtype=torch.float32))
    return directory, _logits(ref)


def _online_reference(directory: Path, tensors: dict[str, torch.Tensor], config) -> torch.Tensor:
    """Logits of transformers' BitNet with online AutoBitLinear (absmean weights in forward)."""
    from transformers import BitNetForCausalLM

    ref_dir = directory.parent / (directory.name + "-reference")
    data = config_json(config, "BitNetForCausalLM", quantization_config=AUTOBITLINEAR_ONLINE)
    save_checkpoint(ref_dir, tensors, data)
    return _logits(_as_float32(BitNetForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)))


def make_bitnet_bf16(directory: Path) -> tuple[Path, torch.Tensor]:
    """The -bf16 twin: bf16 master weights, no packing, quantized on load."""
    model = _random_bitnet(1)
    tensors = {k: v.bfloat16() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_checkpoint(directory, tensors, config_json(model.config, "BitNetForCausalLM"))
    return directory, _online_reference(directory, tensors, model.config)


# --- 1bitLLM/bitnet_b1_58-* -------------------------------------------------------------------

# 1bitLLM modeling_bitnet.py names its subln norms differently from transformers' BitNet.
ONEBITLLM_RENAMES = {
    "self_attn.attn_sub_norm.": "self_attn.inner_attn_ln.",
    "mlp.ffn_sub_norm.": "mlp.ffn_layernorm.",
}


def make_onebitllm(directory: Path) -> tuple[Path, torch.Tensor]:
    """fp16 latent weights, SwiGLU, subln as inner_attn_ln / ffn_layernorm, tied lm_head.

    The reference is transformers' BitNet with hidden_act silu and online absmean weights:
    the same math as 1bitLLM's BitLinear (fp32 per-token absmax activations, absmean weights,
    RMSNorm outside the layer), under transformers' names.
    """
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    model = _random_bitnet(2, hidden_act="silu", num_key_value_heads=4, rope_parameters=rope)
    ours_tensors, ref_tensors = {}, {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        ref_tensors[name] = t.half()
        for old, new in ONEBITLLM_RENAMES.items():
            name = name.replace(old, new)
        ours_tensors[name] = t.half()
    c = model.config
    config = {  # as 1bitLLM/bitnet_b1_58-large/config.json
        "architectures": ["BitnetForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "input_bits": 8,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings,
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "float16",
        "vocab_size": c.vocab_size,
        "weight_bits": 1,
    }
    save_checkpoint(directory, ours_tensors, config)
    return directory, _online_reference(directory, ref_tensors, c)


# --- Llama + quant_method bitnet (Falcon3-1.58bit, Falcon-E, Llama3-8B-1.58) --------------------


def llama_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # q_size 128 != hidden 64, as Falcon3 sets head_dim explicitly
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000042.0},
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.05,
    )
    return _randomize_norms(LlamaForCausalLM(config))


LLAMA_BITNET_QC = {"modules_to_not_convert": ["lm_head"], "quant_method": "bitnet"}


def make_llama_bitlinear(directory: Path) -> tuple[Path, torch.Tensor]:
    """onebitllms' `quantize_to_1bit` layout: packed uint8 and weight_scale = 1/beta (a divisor)."""
    from transformers import LlamaForCausalLM
    from transformers.integrations.bitnet import pack_weights

    model = llama_model(3)
    tensors = {}
    for name, t in model.state_dict().items():
        if name.endswith("_proj.weight"):
            codes, beta = ternarize(t)
            tensors[name] = pack_weights(codes.clone())
            tensors[name[: -len("weight")] + "weight_scale"] = (1.0 / beta).reshape(1).bfloat16()
        else:
            tensors[name] = t.bfloat16()
    config = config_json(
        model.config, "LlamaForCausalLM", quantization_config=LLAMA_BITNET_QC, is_bitnet_config=True
    )
    save_checkpoint(directory, tensors, config)
    ref = _as_float32(LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32))
    return directory, _logits(ref)


def make_llama_dequantized(directory: Path) -> tuple[Path, torch.Tensor]:
    """onebitllms' `convert_to_bf16` layout (Falcon-E `bfloat16`): plain Llama, W = codes * beta.

    The reference is transformers' plain LlamaForCausalLM run with activation quantization
    patched in: the dequantized weights are exactly the ternary model's.
    """
    from transformers import LlamaForCausalLM

    model = llama_model(4)
    tensors = {}
    for name, t in model.state_dict().items():
        if name.endswith("_proj.weight"):
            codes, beta = ternarize(t)
            tensors[name] = (codes * beta.bfloat16().float()).bfloat16()
        else:
            tensors[name] = t.bfloat16()
    save_checkpoint(directory, tensors, config_json(model.config, "LlamaForCausalLM"))
    ref = _as_float32(LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32))
    for name, module in ref.named_modules():
        if name.endswith("_proj"):
            module.register_forward_pre_hook(lambda m, args: (_act_quant(args[0]),))
    return directory, _logits(ref)


def _act_quant(x: torch.Tensor) -> torch.Tensor:
    s = 127.0 / x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x.float() * s).round().clamp(-128, 127) / s


# --- NousResearch/OLMo-Bitnet-1B --------------------------------------------------------------

OLMO = dict(d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, mlp_ratio=4, vocab=300, emb=320)


def olmo_config_json() -> dict:
    """OLMo's own config format, as NousResearch/OLMo-Bitnet-1B/config.json (scaled down)."""
    return {
        "activation_type": "swiglu",
        "alibi": False,
        "architectures": ["OLMoModelForCausalLM"],
        "attention_layer_norm": False,
        "bias_for_layer_norm": False,
        "block_type": "sequential",
        "clip_qkv": None,
        "d_model": OLMO["d_model"],
        "embedding_size": OLMO["emb"],
        "eos_token_id": 2,
        "flash_attention": True,
        "include_bias": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "max_sequence_length": 128,
        "mlp_hidden_size": None,
        "mlp_ratio": OLMO["mlp_ratio"],
        "model_type": "olmo",
        "multi_query_attention": False,
        "n_heads": OLMO["n_heads"],
        "n_kv_heads": OLMO["n_kv_heads"],
        "n_layers": OLMO["n_layers"],
        "pad_token_id": 1,
        "rope": True,
        "rope_full_precision": True,
        "scale_logits": False,
        "ternary": True,
        "vocab_size": OLMO["vocab"],
        "weight_tying": True,
    }


def olmo_tensors(seed: int, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Random OLMo-Bitnet weights under OLMo's names (fp32, as its pytorch_model.bin)."""
    g = torch.Generator().manual_seed(seed)
    d, hd = OLMO["d_model"], OLMO["d_model"] // OLMO["n_heads"]
    kv, hidden = OLMO["n_kv_heads"] * hd, OLMO["mlp_ratio"] * OLMO["d_model"]

    def rnd(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    p = prefix + "transformer."
    t = {p + "wte.weight": rnd(OLMO["emb"], d, std=0.5), p + "ln_f.weight": 1 + rnd(d)}
    for i in range(OLMO["n_layers"]):
        b = f"{p}blocks.{i}."
        t[b + "attn_norm.weight"] = 1 + rnd(d)
        t[b + "ff_norm.weight"] = 1 + rnd(d)
        t[b + "att_proj.weight"] = rnd(d + 2 * kv, d)
        t[b + "attn_out.weight"] = rnd(d, d)
        t[b + "ff_proj.weight"] = rnd(hidden, d)
        t[b + "ff_out.weight"] = rnd(d, hidden // 2)
    return t


@torch.no_grad()
def olmo_bitnet_reference(t: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """OLMo-Bitnet's forward: allenai/OLMo olmo/model.py OLMoSequentialBlock with every block
    linear a NousResearch BitLinear158 (parameter-free RMSLayerNorm, eps 1e-5, then
    `activation_quant` / `weight_quant` of the Training-Tips code, one scale per fused matrix)."""
    d, nh, nkv = OLMO["d_model"], OLMO["n_heads"], OLMO["n_kv_heads"]
    hs = d // nh
    t = {k.removeprefix("model.").removeprefix("transformer."): v for k, v in t.items()}

    def rms_layer_norm(x, weight=None):
        x = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
        return x if weight is None else weight * x

    def activation_quant(x):
        scale = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
        return (x * scale).round().clamp_(-128, 127) / scale

    def weight_quant(w):
        scale = 1.0 / w.abs().mean().clamp_(min=1e-5)
        return (w * scale).round().clamp_(-1, 1) / scale

    def bitlinear158(x, w):
        return F.linear(activation_quant(rms_layer_norm(x)), weight_quant(w))

    def rotate_half(x):
        B, n, T, h = x.size()
        x1, x2 = x.view(B, n, T, 2, h // 2).unbind(dim=-2)
        return torch.cat((-x2, x1), dim=-1)

    B, T = ids.shape
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hs, 2, dtype=torch.float) / hs))
    freqs = torch.einsum("i , j -> i j", torch.arange(T, dtype=torch.float), inv_freq)
    positions = torch.cat((freqs, freqs), dim=-1)
    sin, cos = positions.sin()[None, None], positions.cos()[None, None]

    x = F.embedding(ids, t["wte.weight"])
    for i in range(OLMO["n_layers"]):
        b = f"blocks.{i}."
        qkv = bitlinear158(rms_layer_norm(x, t[b + "attn_norm.weight"]), t[b + "att_proj.weight"])
        q, k, v = qkv.split((d, nkv * hs, nkv * hs), dim=-1)
        q = q.view(B, T, nh, hs).transpose(1, 2)
        k = k.view(B, T, nkv, hs).transpose(1, 2)
        v = v.view(B, T, nkv, hs).transpose(1, 2)
        q, k = (u * cos + rotate_half(u) * sin for u in (q, k))
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        att = att.transpose(1, 2).contiguous().view(B, T, d)
        x = x + bitlinear158(att, t[b + "attn_out.weight"])
        h = bitlinear158(rms_layer_norm(x, t[b + "ff_norm.weight"]), t[b + "ff_proj.weight"])
        h, gate = h.chunk(2, dim=-1)
        x = x + bitlinear158(F.silu(gate) * h, t[b + "ff_out.weight"])
    x = rms_layer_norm(x, t["ln_f.weight"])
    return F.linear(x, t["wte.weight"])


def make_olmo_bitnet(directory: Path, prefix: str = "model.") -> tuple[Path, torch.Tensor]:
    tensors = olmo_tensors(5, prefix)
    save_checkpoint(directory, tensors, olmo_config_json())
    return directory, olmo_bitnet_reference(tensors, IDS)


# --- comparison -------------------------------------------------------------------------------


def our_logits(directory: Path) -> torch.Tensor:
    from bitnet158.formats.hf import load_hf_checkpoint
    from bitnet158.nn.model import Transformer

    cfg, tensors = load_hf_checkpoint(directory)
    with torch.no_grad():
        return Transformer.from_tensors(cfg, tensors).eval()(IDS)


def assert_logits_match(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """float32 logits agree to 1e-4 of their range and pick the same tokens."""
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4 * scale, f"max |diff| {diff:.3g} > 1e-4 * max|logit| ({scale:.3g})"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def corrupt(path: Path, keep: int) -> None:
    """Truncate a file to its first `keep` bytes (negative: drop that many from the end)."""
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def header_of(path: Path) -> dict:
    n = int(np.frombuffer(path.read_bytes()[:8], dtype="<u8")[0])
    return json.loads(path.read_bytes()[8 : 8 + n])
