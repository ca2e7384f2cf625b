"""`bitnet158 convert`: every source kind to every target, overwrite rules, atomicity, summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_gguf import GPT2_TOKENIZER, TEMPLATE, make_config, random_tensors

from bitnet158.cli import main
from bitnet158.errors import FormatError
from bitnet158.formats.convert import TARGETS, convert, describe, read_checkpoint, source_kind
from bitnet158.formats.native import save_native, unpack_tensors

OUTPUT_NAMES = {
    "bitnet158": "out.safetensors",
    "bitnet158-tq1": "out.safetensors",
    "gguf-tq2_0": "out.gguf",
    "gguf-tq1_0": "out.gguf",
    "hf": "out-hf",
    "hf-bf16": "out-hf-bf16",
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = make_config(num_layers=1)
    tensors = random_tensors(cfg, seed=9)
    path = tmp_path_factory.mktemp("src") / "m.safetensors"
    save_native(path, cfg, tensors, GPT2_TOKENIZER, TEMPLATE)
    return path, cfg, tensors


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("to", TARGETS)
def test_every_target_and_back(tmp_path, capsys, model, to):
    src, cfg, tensors = model
    dst = tmp_path / OUTPUT_NAMES[to]
    code, out, err = run(capsys, "convert", src, dst, "--to", to)
    assert code == 0, err
    assert f"wrote {dst} (bitnet158 -> {to})" in out
    assert "ternary weights at" in out and "bits per weight" in out
    if to != "bitnet158":  # our file to our file is a copy; everything else shows progress
        assert "layers" in err
    assert source_kind(dst) == ("hf" if to.startswith("hf") else to.split("-")[0])
    # whatever was written reads back to the same ternary model
    written = read_checkpoint(dst)
    assert written.layout == ("tq1" if to == "bitnet158-tq1" else "2bit")
    assert ("1.6-bit layout" in describe(dst)["format"]) == (to == "bitnet158-tq1")
    back = unpack_tensors(cfg, written.tensors, written.layout)
    for name, value in tensors.items():
        if name.endswith(".codes"):
            np.testing.assert_array_equal(back[name], value, err_msg=name)
    # and converts back to our file from there
    code, out, _ = run(capsys, "convert", dst, tmp_path / "again.safetensors", "--quiet")
    assert code == 0 and f"({source_kind(dst)} -> bitnet158)" in out


def test_bits_per_weight_in_the_summary(tmp_path, model):
    src, _, _ = model
    bits = {to: convert(src, tmp_path / to, to=to)["ternary_bits_per_weight"] for to in TARGETS}
    assert bits["gguf-tq2_0"] == pytest.approx(66 * 8 / 256, abs=1e-3)  # 2.0625
    assert bits["gguf-tq1_0"] == pytest.approx(54 * 8 / 256, abs=1e-3)  # 1.6875
    assert bits["hf"] == pytest.approx(2.0, abs=0.01)
    assert bits["hf-bf16"] == 16.0


def test_json_summary(tmp_path, capsys, model):
    src, cfg, _ = model
    code, out, _ = run(capsys, "convert", src, tmp_path / "m.gguf", "--to", "gguf-tq2_0",
                       "--json", "--quiet")  # fmt: skip
    assert code == 0
    summary = json.loads(out)
    assert summary["from"] == "bitnet158" and summary["to"] == "gguf-tq2_0"
    assert summary["tensors"] == 2 + 11 * cfg.num_layers
    assert summary["bytes"] == (tmp_path / "m.gguf").stat().st_size


def test_detects_gguf_by_content(tmp_path, model):
    src, cfg, _ = model
    convert(src, tmp_path / "model.bin.part", to="gguf-tq2_0")  # no .gguf suffix
    assert source_kind(tmp_path / "model.bin.part") == "gguf"
    assert read_checkpoint(tmp_path / "model.bin.part").config == cfg
    assert describe(tmp_path / "model.bin.part")["format"] == "GGUF (converted on load)"


@pytest.mark.parametrize("to", ["bitnet158", "gguf-tq2_0", "hf"])
def test_refuses_to_overwrite_without_force(tmp_path, capsys, model, to):
    src, _, _ = model
    dst = tmp_path / OUTPUT_NAMES[to]
    assert run(capsys, "convert", src, dst, "--to", to, "--quiet")[0] == 0
    stamp = sorted(p.stat().st_mtime_ns for p in [dst, *dst.glob("*")])
    code, _, err = run(capsys, "convert", src, dst, "--to", to, "--quiet")
    assert code == 1 and "exists; pass --force" in err and "Traceback" not in err
    assert sorted(p.stat().st_mtime_ns for p in [dst, *dst.glob("*")]) == stamp
    (dst / "stale-file").write_text("x") if dst.is_dir() else None
    assert run(capsys, "convert", src, dst, "--to", to, "--force", "--quiet")[0] == 0
    assert not (dst / "stale-file").exists()  # a directory is replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [dst.name]  # no temporaries left


def test_source_and_destination_must_differ(tmp_path, model):
    src, cfg, tensors = model
    copy = save_native(tmp_path / "m.safetensors", cfg, tensors, GPT2_TOKENIZER)
    with pytest.raises(FormatError, match="the source itself"):
        convert(copy, copy, force=True)


@pytest.mark.parametrize(
    ("overrides", "to", "message"),
    [
        (dict(hidden_act="relu2"), "gguf-tq2_0", "SiLU"),
        (dict(intermediate_size=704), "gguf-tq1_0", "K = 704"),
        (
            dict(inner_norm=True, subln=False, norm_kind="layernorm", norm_affine=False),
            "hf",
            "OLMo",
        ),  # fmt: skip
    ],
)
def test_failed_conversion_leaves_nothing(tmp_path, capsys, overrides, to, message):
    cfg = make_config(num_layers=1, **overrides)
    src = save_native(tmp_path / "src.safetensors", cfg, random_tensors(cfg), GPT2_TOKENIZER)
    code, out, err = run(capsys, "convert", src, tmp_path / "out", "--to", to, "--quiet")
    assert code == 1 and out == ""
    assert err.startswith("bitnet158: error: ") and message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors"]


def test_bad_input_is_one_line_error(tmp_path, capsys, model):
    src, _, _ = model
    convert(src, tmp_path / "m.gguf", to="gguf-tq2_0")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, "convert", tmp_path / "cut.gguf", tmp_path / "o.safetensors")
    assert code == 1 and str(tmp_path / "cut.gguf") in err and "truncated" in err
    assert not (tmp_path / "o.safetensors").exists()
    code, _, err = run(capsys, "info", tmp_path / "cut.gguf")
    assert code == 1 and "truncated" in err


def test_unknown_target_is_rejected(capsys, model, tmp_path):
    src, _, _ = model
    with pytest.raises(SystemExit) as info:
        main(["convert", str(src), str(tmp_path / "x"), "--to", "gguf-q4_k"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(FormatError, match="unknown output format"):
        convert(src, tmp_path / "x", to="gguf-q4_k")


def test_info_describes_a_gguf_file(tmp_path, capsys, model):
    src, cfg, _ = model
    convert(src, tmp_path / "m.gguf", to="gguf-tq1_0")
    code, out, _ = run(capsys, "info", tmp_path / "m.gguf", "--json")
    info = json.loads(out)
    assert code == 0 and info["format"] == "GGUF (converted on load)"
    assert info["layers"] == cfg.num_layers and info["embedding_dtype"] == "float16"
