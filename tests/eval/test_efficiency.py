"""The efficiency report: its memory model against real files, and one small run end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bitnet158.cli import main
from bitnet158.eval import efficiency
from bitnet158.eval.efficiency import (
    SIZES,
    kv_bytes_per_token,
    max_batch,
    parameter_count,
    size_config,
    weight_bytes,
    write_fp16_llama_gguf,
)
from bitnet158.formats.native import load_native

TINY = dict(hidden_size=256, intermediate_size=704, num_layers=2, num_heads=4)


@pytest.fixture
def tiny_size(monkeypatch):
    monkeypatch.setitem(SIZES, "tiny", TINY)
    return "tiny"


@pytest.mark.parametrize("size, nominal", [("700M", 0.7), ("1.3B", 1.3), ("3B", 3.0), ("7B", 6.7), ("13B", 13.0)])  # fmt: skip
def test_paper_sizes_have_their_parameter_counts(size, nominal):
    assert parameter_count(size_config(size)) / 1e9 == pytest.approx(nominal, rel=0.12)


def test_weight_bytes_match_the_files(tiny_size, tmp_path):
    from bitnet158.bench import write_random_model

    cfg = size_config(tiny_size)
    ours = write_random_model(cfg, tmp_path / "b.safetensors")
    tensors = load_native(ours).tensors
    assert weight_bytes(cfg, "BitNet b1.58") == sum(t.nbytes for t in tensors.values())
    gguf = pytest.importorskip("gguf")
    path = write_fp16_llama_gguf(cfg, tmp_path / "l.gguf", load_native(ours).tokenizer_json)
    reader = gguf.GGUFReader(path)
    assert weight_bytes(cfg, "LLaMA fp16") == sum(int(t.n_bytes) for t in reader.tensors)
    assert len(reader.tensors) == 2 + 9 * cfg.num_layers
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert np.asarray(embd.data).dtype == np.float16 and 0.015 < np.std(embd.data) < 0.025


def test_memory_arithmetic():
    cfg = size_config("700M")
    assert kv_bytes_per_token(cfg) == 2 * 24 * 1536 * 2
    assert max_batch(10e9, 6e9, 1e9, 0.5e9) == 6
    assert max_batch(1e9, 6e9, 1e9, 0.5e9) == 0
    # at 700M the ternary weights are more than 5x smaller than fp16 ones
    assert weight_bytes(cfg, "LLaMA fp16") / weight_bytes(cfg, "BitNet b1.58") > 5


def test_report_end_to_end(tiny_size, tmp_path, capsys):
    """`bitnet158 bench --report DIR` on a tiny size: both models measured, every file written."""
    try:
        import llama_cpp  # noqa: F401

        peers = []
    except ImportError:
        peers = ["--no-peers"]
    out = tmp_path / "report"
    argv = ["bench", "--report", str(out), "--sizes", tiny_size, "--prompt", "16",
            "--decode", "4", "--reps", "1", "--batch-seq", "32", "--batch-steps", "1",
            "--max-batch", "4", "--workdir", str(tmp_path / "work"), *peers]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "efficiency.json").read_text())
    assert (out / "efficiency.md").read_text() in printed
    for png in ("figure2_latency", "figure2_memory", "figure3_energy"):
        assert (out / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = results["sizes"][tiny_size]["runs"]
    bitnet = runs["BitNet b1.58"]
    assert bitnet["latency_ms"] > 0 and bitnet["prefill_tps"] > 0
    assert bitnet["peak_rss"] > bitnet["weight_bytes"]
    assert "Table 1" in printed and "71.4x" in printed
    energy = results["sizes"][tiny_size]["energy"]
    assert energy["LLaMA fp16"]["total_j"] > energy["BitNet b1.58"]["total_j"]
    if peers:
        assert "error" in runs["LLaMA fp16"] and "error" in results["throughput"]
        return
    assert runs["LLaMA fp16"]["latency_ms"] > 0
    table3 = results["throughput"]["models"]
    assert table3["LLaMA fp16"]["max_batch"] == 16  # the default budget: fp16 + 16 sequences
    for model in efficiency.MODELS:
        assert table3[model]["measured_batch"] == 4
        assert table3[model]["tokens_per_second"] > 0 and math.isfinite(table3[model]["seconds"])
    assert not list((tmp_path / "work").glob("*.gguf"))  # fp16 files are removed afterwards
