"""formats/hf.py: every checkpoint family loads to logits that match an independent reference."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hf_builders import (
    OLMO,
    _random_bitnet,
    assert_logits_match,
    config_json,
    corrupt,
    header_of,
    llama_model,
    make_bitnet_bf16,
    make_bitnet_packed,
    make_llama_bitlinear,
    make_llama_dequantized,
    make_olmo_bitnet,
    make_onebitllm,
    olmo_config_json,
    olmo_tensors,
    our_logits,
    save_checkpoint,
)

from bitnet158.errors import FormatError
from bitnet158.formats.hf import config_from_hf, load_hf_checkpoint

pytestmark = pytest.mark.usefixtures("transformers_on_cpu")


@pytest.fixture(scope="module")
def bitnet_packed(tmp_path_factory, transformers_on_cpu):
    return make_bitnet_packed(tmp_path_factory.mktemp("ckpt") / "bitnet-2b4t")


@pytest.fixture(scope="module")
def llama_bitlinear(tmp_path_factory, transformers_on_cpu):
    return make_llama_bitlinear(tmp_path_factory.mktemp("ckpt") / "falcon3-1.58bit")


def test_bitnet_2b4t_packed_autobitlinear(bitnet_packed):
    directory, ref = bitnet_packed
    cfg, tensors = load_hf_checkpoint(directory)
    assert cfg.family == "bitnet-2b4t" and cfg.hidden_act == "relu2" and cfg.subln
    assert cfg.tie_word_embeddings and "lm_head.weight" not in tensors
    assert cfg.rope_theta == 500000.0 and (cfg.num_heads, cfg.num_kv_heads) == (4, 2)
    assert tensors["layers.0.q.codes"].dtype == np.int8
    assert (
        tensors["layers.0.q.scale"].dtype == np.float32 and tensors["layers.0.q.scale"].shape == ()
    )
    assert tensors["embed.weight"].dtype == np.float32
    assert_logits_match(our_logits(directory), ref)


def test_bitnet_scale_is_a_multiplier(bitnet_packed):
    """autobitlinear stores beta = mean|W| itself (bf16 in the file)."""
    directory, _ = bitnet_packed
    from safetensors.torch import load_file

    raw = header_of(directory / "model.safetensors")
    assert raw["model.layers.0.self_attn.q_proj.weight"]["dtype"] == "U8"
    assert raw["model.layers.0.self_attn.q_proj.weight_scale"]["dtype"] == "BF16"
    _, tensors = load_hf_checkpoint(directory)
    stored = load_file(directory / "model.safetensors")["model.layers.0.mlp.down_proj.weight_scale"]
    assert tensors["layers.0.down.scale"] == stored.float().item()


def test_bitnet_bf16_twin_quantizes_on_load(tmp_path):
    directory, ref = make_bitnet_bf16(tmp_path / "bitnet-bf16")
    cfg, tensors = load_hf_checkpoint(directory)
    assert cfg.family == "bitnet-2b4t"
    assert set(np.unique(tensors["layers.1.gate.codes"])) <= {-1, 0, 1}
    assert_logits_match(our_logits(directory), ref)


def test_onebitllm_fp16_latent_with_subln_names(tmp_path):
    directory, ref = make_onebitllm(tmp_path / "bitnet_b1_58-large")
    cfg, tensors = load_hf_checkpoint(directory)
    assert (cfg.family, cfg.hidden_act, cfg.subln, cfg.rope_theta) == (
        "llama-b158",
        "silu",
        True,
        1e4,
    )
    assert tensors["layers.0.attn_sub_norm.weight"].shape == (cfg.q_size,)
    assert tensors["layers.0.ffn_sub_norm.weight"].shape == (cfg.intermediate_size,)
    assert_logits_match(our_logits(directory), ref)


def test_llama_bitlinear_scale_is_a_divisor(llama_bitlinear):
    directory, ref = llama_bitlinear
    cfg, tensors = load_hf_checkpoint(directory)
    assert cfg.family == "llama" and not cfg.subln and not cfg.tie_word_embeddings
    assert cfg.head_dim == 32 and cfg.q_size == 128 and cfg.rope_theta == 1000042.0
    assert tensors["lm_head.weight"].shape == (300, 64)
    assert tensors["layers.0.o.codes"].shape == (64, 128)
    assert_logits_match(our_logits(directory), ref)


def test_llama_dequantized_bf16_export_is_exact(tmp_path, llama_bitlinear):
    """A plain Llama whose matrices hold {-a, 0, a} keeps a as its scale, exactly."""
    directory, ref = make_llama_dequantized(tmp_path / "falcon-e-bfloat16")
    cfg, tensors = load_hf_checkpoint(directory)
    assert cfg.family == "llama"
    assert_logits_match(our_logits(directory), ref)


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_olmo_bitnet_fused_projections(tmp_path, prefix):
    directory, ref = make_olmo_bitnet(tmp_path / "olmo-bitnet", prefix)
    cfg, tensors = load_hf_checkpoint(directory)
    assert cfg.family == "olmo-bitnet" and cfg.inner_norm and not cfg.subln
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.num_kv_heads) == (OLMO["emb"], 128, 2)
    # one scale for the whole fused att_proj, shared by q, k and v (and by up and gate)
    assert tensors["layers.0.q.scale"] == tensors["layers.0.k.scale"] == tensors["layers.0.v.scale"]
    assert tensors["layers.1.up.scale"] == tensors["layers.1.gate.scale"]
    assert_logits_match(our_logits(directory), ref)


def test_olmo_swiglu_chunk_order(tmp_path):
    """ff_proj's first half is the up (linear) half, its second half the gate."""
    tensors = olmo_tensors(6)
    w = tensors["model.transformer.blocks.0.ff_proj.weight"]
    w[128:] = 0.0  # a zero gate half: only "up" rows are nonzero
    save_checkpoint(tmp_path, tensors, olmo_config_json())
    _, canon = load_hf_checkpoint(tmp_path)
    assert not canon["layers.0.gate.codes"].any() and canon["layers.0.up.codes"].any()


def test_sharded_checkpoint_matches_single_file(tmp_path, bitnet_packed):
    directory, ref = make_bitnet_packed(tmp_path / "sharded", shards=3)
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("model-*.safetensors"))) == 3
    _, single = load_hf_checkpoint(bitnet_packed[0])
    _, sharded = load_hf_checkpoint(directory)
    assert single.keys() == sharded.keys()
    for name in single:
        np.testing.assert_array_equal(single[name], sharded[name])
    assert_logits_match(our_logits(directory), ref)


def test_config_from_hf_reads_generation_eos(bitnet_packed, tmp_path):
    directory, _ = bitnet_packed
    cj = json.loads((directory / "config.json").read_text())
    cfg = config_from_hf(cj, directory / "config.json")
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == [2]
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    try:
        assert load_hf_checkpoint(directory)[0].eos_token_ids == [2, 7]
    finally:
        (directory / "generation_config.json").unlink()


# --- bad input: FormatError naming the file, the tensor and the expected shape -----------------


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _rewrite_config(directory, **changes):
    cj = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cj.pop(key, None)
        else:
            cj[key] = value
    (directory / "config.json").write_text(json.dumps(cj))


def _resave(directory, drop=(), replace=None):
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    for name in drop:
        del tensors[name]
    tensors.update(replace or {})
    save_file(tensors, directory / "model.safetensors")


def test_missing_config(tmp_path, bitnet_packed):
    d = _copy(bitnet_packed[0], tmp_path / "c")
    (d / "config.json").unlink()
    with pytest.raises(FormatError, match=r"config\.json: no such file"):
        load_hf_checkpoint(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"config\.json: cannot read it as JSON"):
        load_hf_checkpoint(d)


def test_unknown_architecture(tmp_path, bitnet_packed):
    d = _copy(bitnet_packed[0], tmp_path / "c")
    _rewrite_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(FormatError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_hf_checkpoint(d)


def test_missing_tensor(tmp_path, bitnet_packed):
    d = _copy(bitnet_packed[0], tmp_path / "c")
    _resave(d, drop=["model.layers.1.self_attn.k_proj.weight"])
    msg = re.escape(
        "tensor model.layers.1.self_attn.k_proj.weight is missing (expected uint8 [8, 64]"
    )
    with pytest.raises(FormatError, match=msg) as err:
        load_hf_checkpoint(d)
    assert "model.safetensors" in str(err.value)
    _copy(bitnet_packed[0], tmp_path / "s")
    _resave(tmp_path / "s", drop=["model.layers.0.mlp.up_proj.weight_scale"])
    with pytest.raises(
        FormatError, match=r"up_proj\.weight_scale is missing \(expected float \[1\]"
    ):
        load_hf_checkpoint(tmp_path / "s")


def test_wrong_shape(tmp_path, bitnet_packed):
    import torch

    d = _copy(bitnet_packed[0], tmp_path / "c")
    _resave(d, replace={"model.embed_tokens.weight": torch.zeros(299, 64, dtype=torch.bfloat16)})
    msg = re.escape(
        "model.safetensors: tensor model.embed_tokens.weight is BF16[299, 64], expected float [300, 64]"
    )
    with pytest.raises(FormatError, match=msg):
        load_hf_checkpoint(d)


def test_truncated_and_corrupt_files(tmp_path, bitnet_packed):
    d = _copy(bitnet_packed[0], tmp_path / "c")
    corrupt(d / "model.safetensors", -100)
    with pytest.raises(
        FormatError, match=r"model\.safetensors: tensor .* ends at byte .*truncated or corrupt"
    ):
        load_hf_checkpoint(d)
    corrupt(d / "model.safetensors", 5)
    with pytest.raises(FormatError, match=r"model\.safetensors"):
        load_hf_checkpoint(d)
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{this is not json")
    with pytest.raises(FormatError, match=r"model\.safetensors.*not valid JSON"):
        load_hf_checkpoint(d)
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(FormatError, match=r"model\.safetensors"):
        load_hf_checkpoint(d)


def test_pickle_weights_are_refused(tmp_path, bitnet_packed):
    d = _copy(bitnet_packed[0], tmp_path / "c")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(FormatError, match="only safetensors or GGUF"):
        load_hf_checkpoint(d)
    with pytest.raises(FormatError, match="only safetensors or GGUF"):
        load_hf_checkpoint(d / "pytorch_model.bin")
    (d / "pytorch_model.bin").unlink()
    with pytest.raises(FormatError, match="no model.safetensors"):
        load_hf_checkpoint(d)


def test_missing_shard(tmp_path):
    directory, _ = make_bitnet_packed(tmp_path / "sharded", shards=2)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        FormatError, match=r"index\.json: shard model-00002-of-00002\.safetensors is missing"
    ):
        load_hf_checkpoint(directory)


def test_full_precision_llama_is_not_bitnet(tmp_path):
    model = llama_model(7)
    save_checkpoint(
        tmp_path, dict(model.state_dict()), config_json(model.config, "LlamaForCausalLM")
    )
    with pytest.raises(FormatError, match="not a BitNet b1.58 checkpoint"):
        load_hf_checkpoint(tmp_path)
    cfg, tensors = load_hf_checkpoint(tmp_path, latent=True)  # Falcon-E `prequantized`
    assert set(np.unique(tensors["layers.0.q.codes"])) <= {-1, 0, 1}


def test_packed_without_quantization_config(tmp_path, llama_bitlinear):
    d = _copy(llama_bitlinear[0], tmp_path / "c")
    _rewrite_config(d, quantization_config=None)
    with pytest.raises(
        FormatError, match="is packed, but config.json has no BitNet quantization_config"
    ):
        load_hf_checkpoint(d)


def test_unsupported_configs(tmp_path, llama_bitlinear):
    d = _copy(llama_bitlinear[0], tmp_path / "c")
    _rewrite_config(d, quantization_config={"quant_method": "bitnet", "use_rms_norm": True})
    with pytest.raises(FormatError, match="use_rms_norm"):
        load_hf_checkpoint(d)
    _rewrite_config(d, quantization_config={"quant_method": "gptq"})
    with pytest.raises(FormatError, match="'gptq'"):
        load_hf_checkpoint(d)
    cj = olmo_config_json()
    with pytest.raises(FormatError, match="not OLMo-Bitnet"):
        config_from_hf({**cj, "ternary": False})
    with pytest.raises(FormatError, match="clip_qkv"):
        config_from_hf({**cj, "clip_qkv": 8.0})
    with pytest.raises(FormatError, match="'hidden_size' is missing"):
        config_from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 10})


def test_non_finite_latent_weights_are_a_format_error(tmp_path):
    """Latent weights with NaN or inf have no absmean scale: the tensor is named, not loaded."""
    import torch

    model = _random_bitnet(1)  # the -bf16 twin's layout, as make_bitnet_bf16 writes it
    tensors = {k: v.bfloat16() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    name = "model.layers.1.mlp.up_proj.weight"
    for bad in (float("nan"), float("inf")):
        tensors[name][3, 5] = bad
        save_checkpoint(tmp_path / "c", tensors, config_json(model.config, "BitNetForCausalLM"))
        with pytest.raises(FormatError, match=rf"tensor {re.escape(name)}: 1 of \d+ weights are"):
            load_hf_checkpoint(tmp_path / "c")
    # every weight +-inf: not taken for a dequantized ternary matrix of scale inf either
    tensors[name] = torch.full_like(tensors[name], float("inf"))
    tensors[name][::2] = -tensors[name][::2]
    save_checkpoint(tmp_path / "c", tensors, config_json(model.config, "BitNetForCausalLM"))
    with pytest.raises(FormatError, match=rf"tensor {re.escape(name)}: \d+ of \d+ weights"):
        load_hf_checkpoint(tmp_path / "c")
