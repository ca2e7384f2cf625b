"""Hugging Face export: transformers loads what we write and computes our logits.

Reference: transformers itself (BitNetForCausalLM / LlamaForCausalLM with its BitNet
quantizer), against our torch reference model of the same tensors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hf_builders import IDS, _as_float32, assert_logits_match
from test_gguf import GPT2_TOKENIZER, TEMPLATE, make_config, random_tensors
from tokenizers import Tokenizer

from bitnet158.errors import FormatError
from bitnet158.formats.convert import convert, read_checkpoint
from bitnet158.formats.native import bf16_to_float32, save_native, unpack_tensors
from bitnet158.nn.model import Transformer

VARIANTS = {
    "silu-subln": dict(hidden_size=64, intermediate_size=96, num_kv_heads=4),
    "relu2-subln-gqa": dict(
        hidden_size=64, intermediate_size=96, hidden_act="relu2", family="bitnet-2b4t"
    ),
    "llama-untied": dict(
        hidden_size=64,
        intermediate_size=96,
        subln=False,
        family="llama",
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    ),
}


@pytest.fixture(params=list(VARIANTS))
def model(request, tmp_path):
    cfg = make_config(**VARIANTS[request.param])
    tensors = random_tensors(cfg, seed=4)
    # embeddings in bf16, as 2B-4T ships them
    bits = (tensors["embed.weight"].view(np.uint32) >> 16).astype(np.uint16)
    tensors["embed.weight"] = bits
    path = save_native(tmp_path / "m.safetensors", cfg, tensors, GPT2_TOKENIZER, TEMPLATE)
    return path, cfg, tensors


def reference_logits(cfg, tensors) -> torch.Tensor:
    """Our torch reference model of the same tensors (BF16 embedding bits widened)."""
    widened = {**tensors, "embed.weight": bf16_to_float32(tensors["embed.weight"])}
    with torch.no_grad():
        return Transformer.from_tensors(cfg, widened).eval()(IDS)


def test_packed_export_loads_in_transformers_with_our_logits(tmp_path, model, transformers_on_cpu):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, cfg, tensors = model
    out = tmp_path / "hf"
    summary = convert(src, out, to="hf")
    assert summary["ternary_bits_per_weight"] == pytest.approx(2.0, abs=0.01)
    cj = json.loads((out / "config.json").read_text())
    assert cj["quantization_config"]["linear_class"] == "autobitlinear"
    assert cj["architectures"] == ["BitNetForCausalLM" if cfg.subln else "LlamaForCausalLM"]
    # transformers keeps a quantized model's stored dtypes; compare in float32
    hf = _as_float32(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
    layer = hf.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "AutoBitLinear"
    with torch.no_grad():
        theirs = hf(IDS).logits.float()
    assert_logits_match(reference_logits(cfg, tensors), theirs)
    tok = AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.from_str(GPT2_TOKENIZER)
    text = "ROMEO: But, soft! café ✓"
    assert tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text).ids
    assert (tok.bos_token, tok.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert tok.chat_template == TEMPLATE
    # and our reader gets back exactly what we wrote
    back = unpack_tensors(cfg, read_checkpoint(out).tensors)
    for name, value in tensors.items():
        if name == "embed.weight":  # our HF reader widens BF16 to float32
            value = bf16_to_float32(value)
        np.testing.assert_array_equal(np.asarray(back[name]), np.asarray(value), err_msg=name)
    assert read_checkpoint(out).config.hidden_act == cfg.hidden_act


def test_bf16_export_is_the_dequantized_model(tmp_path, model, transformers_on_cpu):
    from transformers import AutoModelForCausalLM

    src, cfg, tensors = model
    out = tmp_path / "hf-bf16"
    convert(src, out, to="hf-bf16")
    cj = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cj and cj["dtype"] == "bfloat16"
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    w = hf.model.layers[0].mlp.down_proj.weight.detach().numpy()
    beta = np.float32(tensors["layers.0.down.scale"])
    b16 = torch.tensor(float(beta)).bfloat16().float().item()
    np.testing.assert_array_equal(w, tensors["layers.0.down.codes"].astype(np.float32) * b16)
    back = unpack_tensors(cfg, read_checkpoint(out).tensors)
    for name, value in tensors.items():
        if name.endswith(".codes"):
            np.testing.assert_array_equal(back[name], value, err_msg=name)
        elif name.endswith(".scale"):
            assert back[name] == np.float32(torch.tensor(float(value)).bfloat16().item())


def test_olmo_bitnet_is_refused(tmp_path):
    cfg = make_config(
        hidden_size=64,
        intermediate_size=96,
        subln=False,
        inner_norm=True,
        norm_kind="layernorm",
        norm_affine=False,
        family="olmo-bitnet",
    )
    src = save_native(tmp_path / "m.safetensors", cfg, random_tensors(cfg), GPT2_TOKENIZER)
    with pytest.raises(FormatError, match="OLMo"):
        convert(src, tmp_path / "out", to="hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
