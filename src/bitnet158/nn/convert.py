"""`quantize_model`: turn a full-precision causal LM into a BitNet b1.58, in place.

    from transformers import AutoModelForCausalLM
    from bitnet158 import quantize_model
    model = quantize_model(AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM-135M"))

Every `nn.Linear` becomes a `BitLinear` that keeps the SAME weight (and bias) Parameter: the
pretrained weights are the latent weights of quantization-aware fine-tuning, and optimizers
or tied weights that refer to them keep working. The output projection (`lm_head`, or any
linear layer tied to the input embeddings) and the embeddings stay full precision unless
asked, as in every published BitNet checkpoint. Quantizing abruptly loses most of what the
model knew (the HF blog "Fine-tuning LLMs to 1.58bit" measures a loss like a random model's):
fine-tune with a λ warm-up (`lam=0` here, then `TrainConfig(lambda_schedule="min")`).

Works on any torch module built from nn.Linear: Hugging Face Llama, Qwen2, Mistral, SmolLM
(Llama-shaped) and bitnet158's own full-precision `Transformer(cfg, ternary=False)`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .bitlinear import BitLinear, set_lambda

SUPPORTED_BITS = (1.58,)
DEFAULT_NOT_CONVERTED = ("lm_head",)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """transformers-like matching: the module name, a dotted suffix of it, or a full regex."""
    for p in patterns:
        if name == p or name.endswith("." + p) or re.fullmatch(p, name):
            return True
    return False


def _tied_to_embeddings(model: nn.Module) -> set[int]:
    """ids of the weights of embedding modules (a linear layer sharing one is an output head)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def quantize_model(
    model: nn.Module,
    bits: float | str = 1.58,
    *,
    modules_to_not_convert: Iterable[str] | None = None,
    inner_norm: bool = False,
    lam: float = 1.0,
) -> nn.Module:
    """Replace the model's linear layers by BitLinear (ternary weights, int8 activations) in place.

    `modules_to_not_convert`: module names (or dotted suffixes, or regexes) kept full
    precision; default ("lm_head",), and linear layers tied to the embeddings are always kept.
    `inner_norm`: add the parameter-free RMSNorm of the Training-Tips PDF before the activation
    quantization (changes the function even at λ=0). `lam`: initial λ (0 = still full
    precision, for a warm-up). Returns the same model object.
    """
    try:
        ok = float(bits) in SUPPORTED_BITS
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(
            f"bits={bits!r} is not supported: bitnet158 makes BitNet b1.58 models (ternary "
            "weights, bits=1.58) only"
        )
    skip = tuple(
        DEFAULT_NOT_CONVERTED if modules_to_not_convert is None else modules_to_not_convert
    )
    tied = _tied_to_embeddings(model)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not _matches(name, skip) and id(module.weight) not in tied
    ]
    if not targets:
        already = any(isinstance(m, BitLinear) for m in model.modules())
        raise ConfigError(
            "the model is already quantized (it holds BitLinear layers)"
            if already
            else "the model has no nn.Linear layer to quantize"
        )
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.device("meta"):  # no throw-away initialisation of a second weight
            layer = BitLinear(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                inner_norm=inner_norm,
            )
        layer.weight = linear.weight  # the same Parameter: pretrained weights, tied references
        if linear.bias is not None:
            layer.bias = linear.bias
        setattr(parent, child, layer)
    set_lambda(model, lam)
    kept = sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)
    model.bitnet158_quantization = {"bits": 1.58, "inner_norm": inner_norm, "not_converted": kept}
    return model


def unfreeze_scales(model: nn.Module) -> nn.Module:
    """Make a model loaded from ternary weights trainable with a free scale, without changing it.

    `Transformer.from_tensors` stores W = codes * beta and pins beta (`fixed_beta`), since
    mean|W| of a ternary matrix is beta times its fraction of non-zero codes. Scaling W by
    1 / fraction makes mean|W| = beta again, and every |W| / beta >= 1 still rounds to the same
    code: the function is unchanged (up to the float rounding of beta) and beta can move.
    """
    for module in model.modules():
        if isinstance(module, BitLinear) and module.fixed_beta is not None:
            with torch.no_grad():
                codes, beta = module.ternary()
                nonzero = codes.ne(0).float().mean().clamp(min=1.0 / codes.numel())
                module.weight.copy_(codes.float() * (beta / nonzero))
            module.fixed_beta = None
    return model


# --- a converted Hugging Face model as bitnet158's canonical tensors ---------------------------

# Hugging Face module names (Llama, Mistral, SmolLM) -> canonical names of bitnet158.formats.
_HF_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
}
_ENGINE_TYPES = ("llama", "mistral")


def hf_model_config(model: nn.Module) -> ModelConfig:
    """The ModelConfig of a quantized Llama-shaped Hugging Face model, or ConfigError."""
    c = getattr(model, "config", None)
    model_type = getattr(c, "model_type", None)
    if model_type not in _ENGINE_TYPES:
        raise ConfigError(
            f"model_type {model_type!r}: the bitnet158 engine runs Llama-shaped models (llama, "
            "mistral, SmolLM); export this one to the transformers format instead"
            + (" (Qwen2 has q/k/v biases)" if model_type == "qwen2" else "")
        )
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ConfigError("linear biases cannot run in the bitnet158 engine")
    window = getattr(c, "sliding_window", None)
    if window and window < c.max_position_embeddings:
        raise ConfigError(
            f"sliding-window attention ({window} < {c.max_position_embeddings} positions) is not "
            "supported by the engine"
        )
    act = {"silu": "silu", "relu2": "relu2"}.get(c.hidden_act)
    if act is None:
        raise ConfigError(f"hidden_act {c.hidden_act!r} is not supported by the engine")
    # transformers v5 folds theta and scaling into rope_parameters; v4 has rope_scaling
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"RoPE scaling {kind!r} is not supported by the engine")
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    eos = c.eos_token_id if isinstance(c.eos_token_id, list) else [c.eos_token_id]
    return ModelConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads or c.num_attention_heads,
        head_dim=getattr(c, "head_dim", None) or 0,
        family="llama",
        hidden_act=act,
        subln=False,
        rms_norm_eps=float(c.rms_norm_eps),
        rope_theta=float(theta),
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=bool(c.tie_word_embeddings),
        bos_token_id=c.bos_token_id,
        eos_token_ids=[int(e) for e in eos if e is not None],
        pad_token_id=c.pad_token_id,
    )


@torch.no_grad()
def hf_to_tensors(model: nn.Module) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """ModelConfig and canonical tensors (ternary codes + scales) of a quantized HF model."""
    cfg = hf_model_config(model)
    if getattr(model, "bitnet158_quantization", {}).get("inner_norm"):
        raise ConfigError("a model quantized with inner_norm=True cannot run as a Llama model")

    def f32(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().cpu().numpy().copy()

    out = {
        "embed.weight": f32(model.model.embed_tokens.weight),
        "norm.weight": f32(model.model.norm.weight),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = f32(model.lm_head.weight)
    for i, layer in enumerate(model.model.layers):
        for foreign, name in _HF_LAYER.items():
            module = layer.get_submodule(foreign)
            key = f"layers.{i}.{name}"
            if isinstance(module, BitLinear):
                if module.bias is not None:
                    raise ConfigError(
                        f"{foreign} of layer {i} has a bias: not supported by the engine"
                    )
                codes, beta = module.ternary()
                out[key + ".codes"] = codes.cpu().numpy()
                out[key + ".scale"] = np.float32(beta.item())
            elif isinstance(module, nn.Linear):
                raise ConfigError(
                    f"layer {i} {foreign} was not quantized: the engine needs every projection ternary"
                )
            else:
                out[key + ".weight"] = f32(module.weight)
    return cfg, out
