"""Numerical and input edge cases of the engine: zero rows and matrices, NaN and inf, prompts
longer than the context, empty prompts. Each has a defined result, checked against numpy, the
torch reference model or a hand-computed case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_fixtures import CHAT_TEMPLATE, TOKENIZER_JSON, make_config, random_tensors
from test_engine_model import assert_close_logits

import bitnet158
from bitnet158 import _native, quant
from bitnet158.engine.sampling import sample
from bitnet158.errors import FormatError, GenerationError
from bitnet158.formats.native import save_native
from bitnet158.nn import bitlinear
from bitnet158.nn.model import Transformer
from bitnet158.packing import pack_ours

ISAS = _native.available_isas()
IDS = np.random.default_rng(5).integers(3, 300, size=12)


@pytest.mark.parametrize("isa", ISAS)
def test_zero_rows_and_a_zero_matrix_give_exact_zeros(isa):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 300)).astype(np.float32)
    x[[0, 2]] = 0.0
    x_q, s = _native.quantize_activations(x, isa=isa)
    floor = (np.float32(1) / np.float32(quant.EPS)) * np.float32(127)  # s of an all-zero row
    assert s[0] == s[2] == floor and not x_q[[0, 2]].any()
    codes = rng.integers(-1, 2, size=(7, 300)).astype(np.int8)
    y = _native.bitlinear(x, pack_ours(codes), 0.5, 7, 300, isa=isa)
    assert np.array_equal(y, quant.ternary_linear_reference(x, codes, 0.5))
    assert (y[[0, 2]] == 0).all() and np.isfinite(y).all()
    # an all-zero weight matrix: beta is the floor (numpy and torch agree), codes and outputs 0
    zero_codes, beta = quant.quantize_weights(np.zeros((7, 300), np.float32))
    t_codes, t_beta = bitlinear.quantize_weights(torch.zeros(7, 300))
    assert beta == np.float32(quant.EPS) == np.float32(t_beta.item()) and not t_codes.any()
    y = _native.bitlinear(x, pack_ours(zero_codes), beta, 7, 300, isa=isa)
    assert (y == 0).all()


@pytest.mark.parametrize("isa", ISAS)
def test_nan_and_inf_activations_quantize_as_numpy_defines(isa):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 300)).astype(np.float32)
    x[0, 5], x[1, 7], x[4, 299] = np.nan, np.inf, -np.inf
    x[3] = np.nan
    x[5, ::3] = np.nan
    x_q, s = _native.quantize_activations(x, isa=isa)
    want_q, want_s = quant.quantize_activations(x)
    assert np.array_equal(x_q, want_q) and np.array_equal(s, want_s, equal_nan=True)
    codes = rng.integers(-1, 2, size=(5, 300)).astype(np.int8)
    y = _native.bitlinear(x, pack_ours(codes), 0.5, 5, 300, isa=isa)
    want = quant.ternary_linear_reference(x, codes, 0.5)
    assert np.array_equal(y, want, equal_nan=True)
    assert not np.isfinite(y[[1, 4]]).all()  # an inf reaches the output
    assert np.isnan(y[[0, 3, 5]]).all() and np.isfinite(y[2]).all()  # a NaN spoils its row only


def zero_weights_model(cfg) -> Transformer:
    """A random model with layer 0's q projection all zero and token 7's embedding all zero."""
    torch.manual_seed(4)
    model = Transformer(cfg)
    with torch.no_grad():
        model.layers[0].q.weight.zero_()
        model.embed.weight[7].zero_()
    return model


def test_zero_projection_and_zero_embedding_row_match_the_torch_reference(tmp_path):
    cfg = make_config("silu-subln-mha")
    reference = zero_weights_model(cfg)
    tensors = reference.to_tensors()
    assert tensors["layers.0.q.scale"] == np.float32(quant.EPS)
    assert not tensors["layers.0.q.codes"].any()
    path = save_native(tmp_path / "zero.safetensors", cfg, tensors, TOKENIZER_JSON, CHAT_TEMPLATE)
    ids = np.concatenate([[7], IDS, [7]])
    got = bitnet158.load(path).logits(ids)
    with torch.no_grad():
        want = reference(torch.from_numpy(ids)[None])[0].numpy()
    assert np.isfinite(got).all()
    assert_close_logits(got, want)


def test_nan_in_norm_weights_or_scales_is_a_format_error(tmp_path):
    """NaN in a norm weight or a scale would make every logit NaN: refused at load instead."""
    cfg = make_config("relu2-subln-gqa-tied")
    for name, value in [("layers.0.attn_norm.weight", np.nan), ("layers.1.down.scale", np.inf)]:
        tensors = random_tensors(cfg)
        tensors[name] = np.array(tensors[name], np.float32)
        tensors[name].reshape(-1)[-1] = value
        path = save_native(tmp_path / "bad.safetensors", cfg, tensors, TOKENIZER_JSON)
        with pytest.raises(FormatError, match=rf"tensor {name} holds 1 NaN or infinite values"):
            bitnet158.load(path)


def test_nan_logits_are_a_generation_error(tmp_path):
    cfg = make_config("relu2-subln-gqa-tied")
    tensors = random_tensors(cfg)
    tensors["embed.weight"][9, 3] = np.nan  # tied: token 9's logit is NaN at every position
    path = save_native(tmp_path / "nan.safetensors", cfg, tensors, TOKENIZER_JSON, CHAT_TEMPLATE)
    model = bitnet158.load(path)
    assert np.isnan(model.logits(IDS)[:, 9]).all()  # raw logits are returned as they are
    for temperature in (0.0, 0.8):
        with pytest.raises(GenerationError, match="1 non-finite logits"):
            model.generate("ROMEO:", max_new_tokens=4, temperature=temperature, seed=0)
    with pytest.raises(GenerationError, match="non-finite logits"):
        list(model.generate("ROMEO:", max_new_tokens=4, stream=True))
    rng = np.random.default_rng(0)
    for bad in (np.nan, np.inf, -np.inf):
        logits = np.zeros(10, np.float32)
        logits[4] = bad
        with pytest.raises(GenerationError, match="1 non-finite logits"):
            sample(logits, rng, temperature=0)


def test_prompts_longer_than_the_context(tiny_path):
    model = bitnet158.load(tiny_path, max_context=32)
    with pytest.raises(GenerationError, match=r"prompt has \d+ tokens, more than the context"):
        model.generate("ROMEO: But, soft! " * 20_000)  # ~120k tokens
    with pytest.raises(GenerationError, match="33 tokens, more than the context length of 32"):
        model.generate(list(range(3, 36)))
    with pytest.raises(GenerationError, match="context"):
        model.chat([{"role": "user", "content": "Wherefore? " * 100}])
    with pytest.raises(GenerationError, match="exceed the context length"):
        model.logits(list(range(3, 36)))
    # exactly the context: the prompt's last logits give one token, then the context is full
    out = model.generate(list(range(3, 35)), max_new_tokens=5, temperature=0)
    assert model.last_stats.new_tokens == 1 and model.last_stats.finish_reason == "context"
    roomy = bitnet158.load(tiny_path)  # the model's own context, 64
    assert out == roomy.generate(list(range(3, 35)), max_new_tokens=1, temperature=0)


def test_empty_prompt_is_the_bos_token_alone_or_an_error(tiny_path, tmp_path):
    model = bitnet158.load(tiny_path)  # its config has BOS = 0
    assert model.generate("", max_new_tokens=6, temperature=0) == model.generate(
        [0], max_new_tokens=6, temperature=0
    )
    assert model.last_stats.prompt_tokens == 1
    cfg = make_config("relu2-subln-gqa-tied", bos_token_id=None)
    path = save_native(tmp_path / "no-bos.safetensors", cfg, random_tensors(cfg), TOKENIZER_JSON)
    no_bos = bitnet158.load(path)
    with pytest.raises(GenerationError, match="empty prompt"):
        no_bos.generate("")
    with pytest.raises(GenerationError, match="empty prompt"):
        no_bos.generate([], stream=True)
