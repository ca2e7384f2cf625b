"""Our file format: round trip, zero-copy loading, compatibility, and rejection of bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bitnet158 import packing
from bitnet158.config import ModelConfig
from bitnet158.errors import FormatError
from bitnet158.formats.native import load_native, save_native, unpack_tensors
from bitnet158.nn.model import Transformer

CFG = ModelConfig(
    vocab_size=50,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    hidden_act="relu2",
    tie_word_embeddings=False,
)
TOKENIZER = '{"version": "1.0", "model": {"type": "WordLevel"}}'


@pytest.fixture(scope="module")
def tensors() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return Transformer(CFG).to_tensors()


@pytest.fixture
def saved(tmp_path, tensors):
    return save_native(tmp_path / "model.safetensors", CFG, tensors, TOKENIZER, "{{ x }}", "test")


def read_parts(path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_parts(path, header: dict, payload: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + payload)


def test_round_trip(saved, tensors):
    ckpt = load_native(saved)
    assert ckpt.config == CFG
    assert ckpt.tokenizer_json == TOKENIZER
    assert ckpt.chat_template == "{{ x }}" and ckpt.source == "test"
    assert ckpt.tensors["layers.0.q.packed"].dtype == np.uint8
    assert ckpt.tensors["layers.0.q.scale"].shape == (1,)
    back = unpack_tensors(CFG, ckpt.tensors)
    assert set(back) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_tensors_are_memory_mapped(saved):
    ckpt = load_native(saved)
    for value in ckpt.tensors.values():
        assert not value.flags.owndata and not value.flags.writeable
        base = value
        while base.base is not None and not isinstance(base, np.memmap):
            base = base.base
        assert isinstance(base, np.memmap)


def test_layout_is_plain_aligned_safetensors(saved):
    from safetensors import safe_open

    header, payload = read_parts(saved)
    assert (saved.stat().st_size - len(payload)) % 8 == 0  # the payload starts 8-byte aligned
    meta = header.pop("__metadata__")
    assert meta["format"] == "bitnet158" and meta["format_version"] == "1"
    assert ModelConfig.from_json(meta["config"]) == CFG
    for info in header.values():
        size = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1}[info["dtype"]]
        assert info["data_offsets"][0] % size == 0
    ckpt = load_native(saved)
    with safe_open(saved, "numpy") as f:  # the official reader accepts the file
        assert set(f.keys()) == set(ckpt.tensors)
        for name in f.keys():
            np.testing.assert_array_equal(f.get_tensor(name), ckpt.tensors[name])


def test_the_16_bit_layout_round_trips(tmp_path, tensors):
    """5 trits per byte (`--to bitnet158-tq1`): version 2 with the layout named, packed by
    packing.pack_ours_tq1, read back to the same codes, still plain safetensors."""
    from safetensors import safe_open

    path = save_native(tmp_path / "m.safetensors", CFG, tensors, TOKENIZER, layout="tq1")
    header, _ = read_parts(path)
    assert header["__metadata__"]["format_version"] == "2"
    assert header["__metadata__"]["layout"] == "tq1"
    ckpt = load_native(path)
    assert ckpt.layout == "tq1"
    n, k = CFG.intermediate_size, CFG.hidden_size
    assert ckpt.tensors["layers.0.up.packed"].shape == packing.ours_tq1_packed_shape(n, k)
    np.testing.assert_array_equal(
        ckpt.tensors["layers.0.up.packed"], packing.pack_ours_tq1(tensors["layers.0.up.codes"])
    )
    back = unpack_tensors(CFG, ckpt.tensors, ckpt.layout)
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    with safe_open(path, "numpy") as f:
        assert set(f.keys()) == set(ckpt.tensors)
    with pytest.raises(FormatError, match="layout 'tq2'"):
        save_native(tmp_path / "x.safetensors", CFG, tensors, TOKENIZER, layout="tq2")


def test_bf16_is_stored_as_bf16(tmp_path, tensors):
    bits = (tensors["embed.weight"].view(np.uint32) >> 16).astype(np.uint16)
    path = save_native(tmp_path / "m.safetensors", CFG, {**tensors, "embed.weight": bits}, "{}")
    header, _ = read_parts(path)
    assert header["embed.weight"]["dtype"] == "BF16"
    assert header["lm_head.weight"]["dtype"] == "F32"
    np.testing.assert_array_equal(load_native(path).tensors["embed.weight"], bits)


def test_save_is_atomic_and_overwrites(saved, tensors):
    save_native(saved, CFG, tensors, "{}")
    assert load_native(saved).tokenizer_json == "{}"
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # no temp file left


def test_save_rejects_incomplete_tensors(tmp_path, tensors):
    partial = {k: v for k, v in tensors.items() if k != "layers.1.down.codes"}
    with pytest.raises(FormatError, match="layers.1.down.packed"):
        save_native(tmp_path / "m.safetensors", CFG, partial, "{}")
    assert not list(tmp_path.iterdir())


def _corrupt(path, edit) -> None:
    header, payload = read_parts(path)
    payload = edit(header, payload)
    write_parts(path, header, payload)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda h, p: p[:-10], "layers.*truncated"),
        (lambda h, p: h["__metadata__"].update(format="pt") or p, "not a bitnet158 file"),
        (lambda h, p: h["__metadata__"].update(format_version="9") or p, "version"),
        (lambda h, p: h.pop("layers.1.up.scale") and p, "missing tensor.*layers.1.up.scale"),
        (lambda h, p: h["norm.weight"].update(shape=[31]) or p, "norm.weight.*bytes"),
        (lambda h, p: h["norm.weight"].update(dtype="F16") or p, "norm.weight"),
        (lambda h, p: h["norm.weight"].update(dtype="Q4") or p, "norm.weight.*dtype"),
        (lambda h, p: h["__metadata__"].update(config="{}") or p, "config"),
        # a 1.6-bit file is version 2 with its layout named; any other pairing is refused
        (lambda h, p: h["__metadata__"].update(layout="tq1") or p, "layout 'tq1'.*version '1'"),
        (lambda h, p: h["__metadata__"].update(format_version="2") or p, "layout '2bit'"),
        (lambda h, p: h["__metadata__"].update(layout="tq3", format_version="2") or p, "tq3"),
        (lambda h, p: h["__metadata__"].update(layout=["tq1"]) or p, "layout is not a string"),
    ],
)
def test_corrupt_files_raise_format_error(saved, edit, message):
    _corrupt(saved, edit)
    with pytest.raises(FormatError, match=message) as exc:
        load_native(saved)
    assert str(saved) in str(exc.value)


def test_overlapping_tensors_are_rejected(saved):
    def overlap(header, payload):
        a, b = header["layers.0.q.scale"], header["layers.0.k.scale"]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][1]]
        return payload

    _corrupt(saved, overlap)
    with pytest.raises(FormatError, match="overlap"):
        load_native(saved)


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "empty"),
        (b"\x01\x02", "too short"),
        ((10**9).to_bytes(8, "little") + b"{}", "header length"),
        ((8).to_bytes(8, "little") + b"not json", "JSON"),
    ],
)
def test_garbage_files_raise_format_error(tmp_path, data, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(FormatError, match=message):
        load_native(path)


def test_missing_file(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        load_native(tmp_path / "nope.safetensors")


def test_hf_directory_is_packed_on_the_fly(tmp_path, transformers_on_cpu):
    from hf_builders import make_bitnet_packed
    from tokenizers import Tokenizer, models

    import bitnet158
    from bitnet158.formats.convert import convert

    directory, _ = make_bitnet_packed(tmp_path / "bitnet")
    vocab = {f"w{i}": i for i in range(10)}
    (directory / "tokenizer.json").write_text(Tokenizer(models.WordLevel(vocab, "w0")).to_str())
    on_the_fly = bitnet158.load(directory)
    assert on_the_fly.path == directory
    converted = bitnet158.load(convert(directory, tmp_path / "m.safetensors")["path"])
    ids = [1, 5, 2, 7, 3]
    np.testing.assert_array_equal(on_the_fly.logits(ids), converted.logits(ids))
