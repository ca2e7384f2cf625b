"""The engine's forward pass against the torch reference model (nn/model.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_fixtures import TOKENIZER_JSON, make_config, random_tensors

import bitnet158
from bitnet158.engine import kernels
from bitnet158.engine.generate import decode_one, prefill
from bitnet158.engine.kv_cache import KVCache
from bitnet158.errors import GenerationError
from bitnet158.formats.native import save_native
from bitnet158.nn.model import Transformer
from bitnet158.packing import pack_ours
from bitnet158.quant import quantize_weights, ternary_linear_reference

IDS = np.random.default_rng(2).integers(3, 300, size=16)


def torch_logits(cfg, tensors, ids) -> np.ndarray:
    model = Transformer.from_tensors(cfg, tensors)
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids))[None])[0].numpy()


def assert_close_logits(got: np.ndarray, want: np.ndarray) -> None:
    # Seeds are fixed: a 1-ulp difference can flip one int8 activation code (a discrete
    # ~0.4% change of the logits), so these models were checked to have no such near-tie.
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


def test_logits_match_torch_reference(variant):
    path, cfg, tensors = variant
    model = bitnet158.load(path)
    assert_close_logits(model.logits(IDS), torch_logits(cfg, tensors, IDS))


def test_cached_decode_matches_whole_sequence(variant):
    path, cfg, tensors = variant
    model = bitnet158.load(path)
    whole = model.logits(IDS)
    cache = model.engine.new_cache()
    steps = [prefill(model.engine, cache, IDS[:5])]
    steps += [decode_one(model.engine, cache, int(t)) for t in IDS[5:]]
    assert cache.length == len(IDS)
    np.testing.assert_allclose(np.stack(steps), whole[4:], rtol=0, atol=1e-5 * np.abs(whole).max())
    assert np.array_equal(np.stack(steps).argmax(-1), whole[4:].argmax(-1))


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_precision_embeddings(tmp_path, dtype):
    cfg = make_config("relu2-subln-gqa-tied", tie_word_embeddings=False)
    tensors = random_tensors(cfg)
    exact = {}
    for name in ("embed.weight", "lm_head.weight"):
        w = tensors[name]
        if dtype == "F16":
            tensors[name] = w.astype(np.float16)
            exact[name] = tensors[name].astype(np.float32)
        else:  # BF16 bits by truncation; the reference sees the same values widened
            tensors[name] = (w.view(np.uint32) >> 16).astype(np.uint16)
            exact[name] = (tensors[name].astype(np.uint32) << 16).view(np.float32)
    path = save_native(tmp_path / "m.safetensors", cfg, tensors, TOKENIZER_JSON)
    model = bitnet158.load(path)
    assert_close_logits(model.logits(IDS), torch_logits(cfg, {**tensors, **exact}, IDS))


@pytest.mark.parametrize("n,k,t", [(8, 256, 1), (13, 100, 3), (64, 520, 7)])
def test_ternary_linear_matches_numpy_reference(n, k, t):
    rng = np.random.default_rng(n * k)
    codes, beta = quantize_weights(rng.standard_normal((n, k)).astype(np.float32))
    x = rng.standard_normal((t, k)).astype(np.float32)
    lin = kernels.TernaryLinear(pack_ours(codes), beta, n, k)
    np.testing.assert_array_equal(lin(x), ternary_linear_reference(x, codes, beta))


def test_context_overflow_is_an_error(tiny_path):
    model = bitnet158.load(tiny_path, max_context=8)
    with pytest.raises(GenerationError, match="context"):
        model.logits(list(range(9)))
    cache = KVCache(num_layers=1, max_context=4, num_kv_heads=1, head_dim=2)
    cache.length = 3
    with pytest.raises(GenerationError, match="context overflow"):
        cache.reserve(2)
    engine_cache = model.engine.new_cache(4)
    prefill(model.engine, engine_cache, [5, 6, 7, 8])
    with pytest.raises(GenerationError, match="context overflow"):
        decode_one(model.engine, engine_cache, 9)


def test_long_prefill_runs_in_chunks(tiny_path, monkeypatch):
    from bitnet158.engine import model as engine_model

    model = bitnet158.load(tiny_path)
    whole = model.logits(IDS)
    monkeypatch.setattr(engine_model, "PREFILL_CHUNK", 3)
    np.testing.assert_allclose(model.logits(IDS), whole, rtol=0, atol=1e-5 * np.abs(whole).max())
