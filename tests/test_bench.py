"""A smoke test of `bitnet158 bench`'s code path on a tiny random model (not a benchmark)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bitnet158 import bench
from bitnet158.config import ModelConfig
from bitnet158.formats.native import load_native, unpack_tensors

TINY = dict(
    family="llama-b158", vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2,
    num_heads=4, num_kv_heads=2, hidden_act="silu", max_position_embeddings=64,
)  # fmt: skip


@pytest.fixture
def tiny_shape(monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "tiny", TINY)
    return "tiny"


def test_random_model_is_ternary_and_loads(tmp_path, tiny_shape):
    cfg = bench.shape_config(tiny_shape)
    path = bench.write_random_model(cfg, tmp_path / "m.safetensors")
    ckpt = load_native(path)
    codes = unpack_tensors(cfg, ckpt.tensors)["layers.0.gate.codes"]
    assert set(np.unique(codes)) == {-1, 0, 1}  # 96 x 64: the padded (slow) packing path
    assert ckpt.tensors["embed.weight"].dtype == np.float16
    # q, k, v, o (64x64, 32x64, 32x64, 64x64), gate and up (96x64), down (64x96), 2 layers
    assert bench.multiply_adds_per_token(cfg) == 2 * 64 * (64 + 32 + 32 + 64 + 96 + 96 + 96)
    sizes = bench.decode_bytes_per_token(cfg, "float16")
    assert sizes["head"] == 300 * 64 * 2
    assert sizes["ternary"] == sum(
        v.nbytes for k, v in ckpt.tensors.items() if k.endswith(".packed")
    )


def test_run_and_report_without_peers(tmp_path, tiny_shape):
    results = bench.run(
        [tiny_shape], tmp_path, threads=1, prompt=8, decode=4, reps=1, peers=False,
        log=lambda s: None, probe_bytes=1 << 20,
    )  # fmt: skip
    runs = results["shapes"][tiny_shape]["runs"]
    assert [r["weights"] for r in runs] == [
        "2-bit ours + F16 head", "2-bit ours + int8 head", "2-bit ours + 4-bit head",
        "1.6-bit ours + F16 head", "1.6-bit ours + 4-bit head",
    ]  # fmt: skip
    for r in runs:
        assert "error" not in r, r
        assert r["prefill_tps"] > 0 and r["decode_tps"] > 0 and r["peak_rss"] > 0
        assert 0 < r["roofline_fraction"]
        assert r["multiply_adds_per_s"] > 0 or r["isa"] == "scalar"
        assert r.get("prefill_ceiling_fraction", 1) > 0
    assert [r["head"] for r in runs] == ["float16", "int8", "q4", "float16", "q4"]
    tq1 = load_native(tmp_path / f"{tiny_shape}-tq1.safetensors")  # the same model, 1.6-bit
    assert tq1.layout == "tq1"
    packed = sum(v.nbytes for k, v in tq1.tensors.items() if k.endswith(".packed"))
    assert bench.decode_bytes_per_token(tq1.config, "float16", "tq1")["ternary"] == packed
    runs.append(dict(engine="llama.cpp", weights="TQ2_0 + F16", prefill_tps=2.0, decode_tps=1.0))
    runs.append(dict(engine="transformers", weights="BitNetForCausalLM", error="not installed"))
    table = bench.markdown(results)
    assert "| bitnet158 | 2-bit ours + F16 head |" in table and "| prefill ceiling |" in table
    assert "not run: not installed" in table
    json.dumps(results)  # the JSON file holds all of it


def test_decode_at_a_depth_reads_its_context_first(tmp_path, tiny_shape, monkeypatch):
    """--depth: each timed decode starts after `depth` context tokens in the cache (as
    llama-bench -d), and the roofline counts their keys and values."""
    from bitnet158.engine.model import EngineModel

    cfg = bench.shape_config(tiny_shape)
    path = bench.write_random_model(cfg, tmp_path / "m.safetensors")
    seen = []  # (tokens in the call, positions in the cache before it)
    forward = EngineModel.forward

    def spy(self, tokens, cache, *args, **kwargs):
        seen.append((len(tokens), cache.length))
        return forward(self, tokens, cache, *args, **kwargs)

    monkeypatch.setattr(EngineModel, "forward", spy)
    args = dict(threads=1, prompt=8, decode=3, reps=2, depth=20, path=str(path),
                lm_head="exact", kv_dtype="float16")  # fmt: skip
    res = bench.worker_bitnet158(args)
    assert res["decode_tps"] > 0
    # warm-up, 2 prefills, then per decode: the context, then 3 steps from position 20
    assert seen[3:] == [(20, 0), (1, 20), (1, 21), (1, 22)] * 2
    sizes = bench.decode_bytes_per_token(cfg, "float16", keys=21.5)
    assert sizes["kv"] == 2 * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 21.5


def test_llama_cpp_decodes_greedily_after_its_context(tmp_path, monkeypatch):
    """The llama.cpp worker evaluates the `depth` context, then feeds each step the argmax of
    the last logits (llama-cpp-python keeps `scores` only with logits_all)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    cfg = ModelConfig(**dict(TINY, hidden_size=256, intermediate_size=512))
    ours = bench.write_random_model(cfg, tmp_path / "m.safetensors")
    path = bench.write_gguf_copy(ours, tmp_path / "m.gguf", "tq2_0")
    fed = []  # (tokens, argmax of the last logits after them)
    evaluate = llama_cpp.Llama.eval

    def spy(self, tokens):
        evaluate(self, tokens)
        logits = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        fed.append((list(tokens), int(np.argmax(np.ctypeslib.as_array(logits, (300,))))))

    monkeypatch.setattr(llama_cpp.Llama, "eval", spy)
    args = dict(threads=1, prompt=8, decode=4, reps=1, depth=20, path=str(path),
                flash_attn=False)  # fmt: skip
    assert bench.worker_llama_cpp(args)["decode_tps"] > 0
    steps = fed[-4:]
    assert len(fed[-5][0]) == 20  # the context, then one token per step
    assert [len(t) for t, _ in steps] == [1, 1, 1, 1] and steps[0][0] == [1]
    assert [t[0] for t, _ in steps[1:]] == [best for _, best in steps[:-1]]


def test_transformers_decodes_after_its_context(tiny_shape, monkeypatch):
    """The transformers worker runs the `depth` context first (untimed), then decodes one token
    per step on top of its past_key_values."""
    transformers = pytest.importorskip("transformers")
    seen = []  # (tokens in the call, positions already in the cache)
    forward = transformers.BitNetForCausalLM.forward

    def spy(self, input_ids=None, past_key_values=None, **kwargs):
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        seen.append((input_ids.shape[1], past))
        return forward(self, input_ids=input_ids, past_key_values=past_key_values, **kwargs)

    monkeypatch.setattr(transformers.BitNetForCausalLM, "forward", spy)
    cfg = bench.shape_config(tiny_shape)
    args = dict(threads=1, prompt=8, decode=3, reps=1, depth=20, config=cfg.to_dict(), layers=1)
    assert bench.worker_transformers(args)["decode_tps"] > 0
    assert seen[-4:] == [(20, 0), (1, 20), (1, 21), (1, 22)]


def test_depth_must_fit_the_shape(tiny_shape, capsys):
    assert bench.main(["--shapes", tiny_shape, "--depth", "62", "--decode", "4"]) == 2
    assert "must fit the tiny shape's 64 positions" in capsys.readouterr().err


def test_paired_table():
    ok = dict(prefill_tps=200.0, decode_tps=40.0)
    peer = dict(prefill_tps=50.0, decode_tps=20.0)
    rows = [
        dict(pair="F16 head vs TQ2_0 + F16", round=1, load_average=1.0, ours=ok, llama_cpp=peer,
             prefill_ratio=4.0, decode_ratio=2.0),
        dict(pair="F16 head vs TQ2_0 + F16", round=2, load_average=1.0, ours=ok,
             llama_cpp=dict(error="no llama_cpp")),
    ]  # fmt: skip
    table = bench.paired_markdown(rows)
    assert "| F16 head vs TQ2_0 + F16 | 1 | 1.0 | 200 / 50 | 4.00× | 40.0 / 20.0 | 2.00× |" in table
    assert "not run: no llama_cpp" in table
    assert "Warning" not in table  # no ISA recorded, nothing to compare
    assert "context tokens" not in table
    deep = bench.paired_markdown([dict(rows[0], depth=1500)])
    assert deep.startswith("Decode after 1500 context tokens (llama-bench -d 1500).")


@pytest.mark.parametrize(
    "ours,peer,warned",
    [("avx512", "avx2", True), ("avx512", "portable", True), ("avx512", "avx512_vnni", False),
     ("amx", "avx2", True), ("amx", "avx512_vnni", False), ("avx2", "avx2", False)],
)  # fmt: skip
def test_llama_cpp_without_avx512_is_flagged(ours, peer, warned):
    """A llama.cpp wheel built for a portable ISA (pip's cache reused the tests' build once)
    must not pass unnoticed as the peer of an AVX-512 run."""
    row = dict(pair="F16 head vs TQ2_0 + F16", round=1, load_average=1.0,
               ours=dict(prefill_tps=200.0, decode_tps=40.0, isa=ours),
               llama_cpp=dict(prefill_tps=50.0, decode_tps=20.0, isa=peer),
               prefill_ratio=4.0, decode_ratio=2.0)  # fmt: skip
    assert ("Warning" in bench.paired_markdown([row])) == warned
    runs = [dict(engine="bitnet158", weights="2-bit ours + F16 head", isa=ours),
            dict(engine="llama.cpp", weights="TQ2_0 + F16", isa=peer),
            dict(engine="transformers", weights="BitNetForCausalLM")]  # fmt: skip
    assert (bench.peer_isa_warning(runs) is not None) == warned
