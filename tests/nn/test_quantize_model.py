"""quantize_model on small random transformers models (Llama, Qwen2, Mistral, SmolLM-shaped)."""

import numpy as np
import pytest
import torch
import transformers
from torch import nn

from bitnet158 import quantize_model
from bitnet158.config import ModelConfig
from bitnet158.errors import ConfigError
from bitnet158.nn.bitlinear import BitLinear, set_lambda
from bitnet158.nn.model import Transformer

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "smollm": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=None)),
}  # fmt: skip


def hf_model(arch: str, seed: int = 0) -> nn.Module:
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    return model_cls(config_cls(**SMALL, **extra)).eval()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_conversion_keeps_the_pretrained_weights_and_the_boundary_layers(arch):
    model = hf_model(arch)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = {n: p for n, p in model.named_parameters()}
    expected = model(ids).logits
    assert quantize_model(model, lam=0.0) is model
    converted = [n for n, m in model.named_modules() if isinstance(m, BitLinear)]
    assert len(converted) == 7 * SMALL["num_hidden_layers"]  # q k v o gate up down per layer
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    for name, p in model.named_parameters():  # the same Parameter objects, the same values
        assert p is params[name] and torch.equal(p, before[name])
    if arch == "qwen2":  # q/k/v biases kept
        assert (
            model.model.layers[0].self_attn.q_proj.bias
            is params["model.layers.0.self_attn.q_proj.bias"]
        )
    # λ = 0: still the full-precision model
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    set_lambda(model, 1.0)
    assert not torch.allclose(model(ids).logits, expected, atol=1e-3)


def test_converted_layers_compute_the_ternary_formula():
    model = quantize_model(hf_model("llama"))
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(5, 64)
    w = layer.weight.detach().double()
    beta = w.abs().mean().clamp(min=1e-5)
    w_q = (w / beta).round().clamp(-1, 1) * beta
    s = 127 / x.double().abs().amax(-1, keepdim=True).clamp(min=1e-5)
    x_q = (x.double() * s).round().clamp(-128, 127) / s
    np.testing.assert_allclose(
        layer(x).detach().numpy(), (x_q @ w_q.T).numpy(), rtol=1e-5, atol=1e-6
    )


def test_transformers_bitnet_reload_computes_the_same_logits(tmp_path, transformers_quiet):
    """An independent implementation: transformers' own AutoBitLinear (online quantization)."""
    from bitnet158.train.models import export_hf

    model = quantize_model(hf_model("llama"))
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    ours = model(ids).logits
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(96)}, unk_token="t0"))
    export_hf(model, tmp_path / "hf", tok.to_str())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert "AutoBitLinear" in type(reloaded.model.layers[0].self_attn.q_proj).__name__
    torch.testing.assert_close(reloaded(ids).logits, ours, rtol=1e-4, atol=1e-5)


def test_tied_output_layer_and_own_fp_twin():
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=2, tie_word_embeddings=False)  # fmt: skip
    twin = quantize_model(Transformer(cfg, ternary=False))
    assert type(twin.lm_head) is nn.Linear
    assert sum(isinstance(m, BitLinear) for m in twin.modules()) == 7
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10))
    tied[2].weight = tied[0].weight  # an output head sharing the embedding matrix
    quantize_model(tied)
    assert isinstance(tied[1], BitLinear) and type(tied[2]) is nn.Linear


def test_modules_to_not_convert_and_bad_arguments():
    model = quantize_model(hf_model("llama"), modules_to_not_convert=["lm_head", "down_proj"])
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, BitLinear)
    for bits in (1, 2, 4, "ternary"):
        with pytest.raises(ConfigError, match="1.58"):
            quantize_model(hf_model("llama"), bits=bits)
    quantize_model(hf_model("llama"), bits="1.58")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(quantize_model(hf_model("llama")))


def test_import_bitnet158_stays_torch_free_and_quantize_model_is_lazy():
    import subprocess
    import sys

    code = ("import sys, bitnet158; assert 'torch' not in sys.modules; "
            "f = bitnet158.quantize_model; assert 'torch' in sys.modules; print(f.__name__)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "quantize_model"


def test_converted_model_fine_tunes_with_a_lambda_warm_up():
    """SmolLM-shaped model -> BitNet, λ from 0 to 1 over 10 steps, loss falls on structured text."""
    from bitnet158.train.pretrain import TrainConfig, pretrain

    model = quantize_model(hf_model("smollm"), lam=0.0)
    rng = np.random.default_rng(0)
    phrase = rng.integers(0, 96, 40)
    tokens = np.tile(phrase, 60).astype(np.uint16)  # text with structure to learn
    cfg = TrainConfig(steps=30, batch_size=4, seq_len=32, warmup_steps=3, lr_peak=3e-3,
                      lr_cooldown=1e-3, drop_at=1.0, wd_peak=0.0, lambda_schedule="min",
                      lambda_warmup=10, log_every=100)  # fmt: skip
    result = pretrain(model, tokens, None, cfg, log=lambda s: None)
    assert all(m.lam == 1.0 for m in model.modules() if isinstance(m, BitLinear))
    assert np.mean(result.losses[-5:]) < 0.75 * np.mean(result.losses[:3])


def test_unfreeze_scales_keeps_a_loaded_ternary_model_and_frees_its_scales():
    from bitnet158.nn.convert import unfreeze_scales

    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=2, num_kv_heads=2)  # fmt: skip
    torch.manual_seed(0)
    trained = Transformer(cfg)
    loaded = Transformer.from_tensors(cfg, trained.to_tensors())
    assert all(m.fixed_beta is not None for m in loaded.modules() if isinstance(m, BitLinear))
    unfreeze_scales(loaded)
    ids = torch.randint(0, 50, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), trained(ids), rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(
        loaded.to_tensors().items(), trained.to_tensors().values(), strict=True
    ):
        if name.endswith(".codes"):
            assert np.array_equal(a, b), name
    assert all(m.fixed_beta is None for m in loaded.modules() if isinstance(m, BitLinear))
