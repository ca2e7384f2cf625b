"""GGUF in and out: llama.cpp `bitnet` files (TQ1_0/TQ2_0) and bitnet.cpp's I2_S files.

References: gguf-py (the gguf package: GGUFReader, quants.dequantize) for what we write; a
small GGUF writer written here from the format spec for the files gguf-py cannot write
(I2_S, unknown types, corrupt offsets); the original tokenizer for the rebuilt one.
"""

from __future__ import annotations

import json
import struct

import gguf
import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

import bitnet158
from bitnet158.config import ModelConfig
from bitnet158.errors import FormatError
from bitnet158.formats.convert import convert, read_checkpoint
from bitnet158.formats.gguf import (
    PROJ_NAMES,
    check_exportable,
    load_gguf,
    read_gguf,
    write_gguf,
)
from bitnet158.formats.gguf_vocab import LLAMA3_REGEX
from bitnet158.formats.native import NativeCheckpoint, save_native, unpack_tensors
from bitnet158.packing import pack_i2_s

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
CORPUS = [
    "ROMEO: But, soft! what light through yonder window breaks? It is the east.",
    "JULIET: O Romeo, Romeo! wherefore art thou Romeo? 1234 5678 don't won't I'll",
    "Café, naïve, smörgåsbord ✓ 日本語のテキスト\n\n  indented   spaces\ttab",
] * 10
SAMPLES = [
    "ROMEO: But, soft!",
    "  leading spaces and trailing  ",
    "numbers 1234567 and 3.14, don't I'll WE'VE",
    "unicode: café ✓ 日本 🦙🦙",
    "line\nbreaks\r\n\n and\ttabs",
    "<|begin_of_text|>User: hi<|eot_id|>",
]
TEMPLATE = "{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}"


def train_tokenizer(llama3: bool) -> str:
    """A byte-level BPE tokenizer.json: GPT-2 style (ByteLevel regex) or Llama 3 style (Split)."""
    tok = Tokenizer(models.BPE(ignore_merges=llama3))
    if llama3:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


GPT2_TOKENIZER = train_tokenizer(llama3=False)
VOCAB = Tokenizer.from_str(GPT2_TOKENIZER).get_vocab_size()


def make_config(**overrides) -> ModelConfig:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        hidden_act="silu",
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_ids=[1, 2],
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def random_tensors(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Canonical tensors of a random ternary model (norm weights away from 1)."""
    from bitnet158.formats.native import projection_shapes

    rng = np.random.default_rng(seed)
    H = cfg.hidden_size
    t = {
        "embed.weight": (rng.standard_normal((cfg.vocab_size, H)) * 0.5).astype(np.float32),
    }
    if cfg.norm_affine:
        t["norm.weight"] = (1 + 0.2 * rng.standard_normal(H)).astype(np.float32)
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = (rng.standard_normal((cfg.vocab_size, H)) * 0.5).astype(np.float32)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        sizes = {"attn_norm": H, "ffn_norm": H} if cfg.norm_affine else {}
        if cfg.subln:
            sizes |= {"attn_sub_norm": cfg.q_size, "ffn_sub_norm": cfg.intermediate_size}
        for norm, n in sizes.items():
            t[p + norm + ".weight"] = (1 + 0.2 * rng.standard_normal(n)).astype(np.float32)
        for proj, (n, k) in projection_shapes(cfg).items():
            t[p + proj + ".codes"] = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
            t[p + proj + ".scale"] = np.float32(rng.uniform(0.01, 0.05))
    return t


def checkpoint(cfg, tensors, tokenizer=GPT2_TOKENIZER) -> NativeCheckpoint:
    from bitnet158.formats.native import pack_tensors

    return NativeCheckpoint(cfg, pack_tensors(cfg, tensors), tokenizer, TEMPLATE, path=None)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(our file, config, canonical tensors) of a random SwiGLU + subln model."""
    cfg = make_config()
    tensors = random_tensors(cfg)
    path = tmp_path_factory.mktemp("gguf") / "model.safetensors"
    save_native(path, cfg, tensors, GPT2_TOKENIZER, TEMPLATE)
    return path, cfg, tensors


def reader_fields(path) -> dict:
    r = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in r.fields.items()}


# --- the writer, checked with gguf-py -----------------------------------------------------------


@pytest.mark.parametrize("ttype", ["tq2_0", "tq1_0"])
def test_writer_matches_gguf_py(tmp_path, model, ttype):
    src, cfg, tensors = model
    dst = tmp_path / "m.gguf"
    convert(src, dst, to=f"gguf-{ttype}")
    fields = reader_fields(dst)
    assert fields["general.architecture"] == "bitnet"
    assert fields["general.file_type"] == {"tq1_0": 36, "tq2_0": 37}[ttype]
    expected = {
        "bitnet.embedding_length": 256,
        "bitnet.feed_forward_length": 512,
        "bitnet.block_count": 2,
        "bitnet.attention.head_count": 4,
        "bitnet.attention.head_count_kv": 2,
        "bitnet.rope.dimension_count": 64,
        "bitnet.context_length": 128,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.eot_token_id": 2,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": TEMPLATE,
    }
    for key, value in expected.items():
        assert fields[key] == value, key
    assert fields["bitnet.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert fields["bitnet.rope.freq_base"] == pytest.approx(10000.0)
    assert len(fields["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert fields["tokenizer.ggml.token_type"][:3] == [3, 3, 3]  # CONTROL
    assert len(fields["tokenizer.ggml.merges"]) == len(
        json.loads(GPT2_TOKENIZER)["model"]["merges"]
    )

    r = gguf.GGUFReader(dst)
    by_name = {t.name: t for t in r.tensors}
    assert len(by_name) == 2 + 11 * cfg.num_layers  # no output.weight: llama.cpp ties
    assert by_name["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert by_name["blk.1.ffn_sub_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    qtype = gguf.GGMLQuantizationType[ttype.upper()]
    for i in range(cfg.num_layers):
        for proj, theirs in PROJ_NAMES.items():
            t = by_name[f"blk.{i}.{theirs}.weight"]
            assert t.tensor_type == qtype
            codes = tensors[f"layers.{i}.{proj}.codes"]
            assert list(t.shape) == [codes.shape[1], codes.shape[0]]  # ne[0] = K first
            w = gguf.quants.dequantize(t.data, qtype)
            beta = np.float16(tensors[f"layers.{i}.{proj}.scale"]).astype(np.float32)
            np.testing.assert_array_equal(w, codes.astype(np.float32) * beta)
    # our packing is gguf-py's own quantizer, byte for byte, on the dequantized matrix
    codes = tensors["layers.0.down.codes"]
    w = codes.astype(np.float32) * np.float16(tensors["layers.0.down.scale"]).astype(np.float32)
    np.testing.assert_array_equal(
        by_name["blk.0.ffn_down.weight"].data.reshape(-1),
        gguf.quants.quantize(w, qtype).reshape(-1),
    )


@pytest.mark.parametrize("ttype", ["tq2_0", "tq1_0"])
def test_round_trip_is_bit_identical(tmp_path, model, ttype):
    src, cfg, tensors = model
    convert(src, tmp_path / "m.gguf", to=f"gguf-{ttype}")
    ckpt = read_checkpoint(tmp_path / "m.gguf")
    assert ckpt.config == cfg
    assert ckpt.chat_template == TEMPLATE
    back = unpack_tensors(cfg, ckpt.tensors)
    assert set(back) == set(tensors)
    for name, value in tensors.items():
        if name.endswith(".codes"):
            np.testing.assert_array_equal(back[name], value, err_msg=name)
        elif name.endswith(".scale"):  # the block scale d is fp16
            assert back[name] == np.float16(value).astype(np.float32), name
        elif name == "embed.weight":
            np.testing.assert_array_equal(back[name], value.astype(np.float16))
        else:
            np.testing.assert_array_equal(back[name], value, err_msg=name)
    # and once in GGUF, the round trip GGUF -> ours -> GGUF -> ours changes nothing
    convert(tmp_path / "m.gguf", tmp_path / "again.gguf", to=f"gguf-{ttype}")
    again = unpack_tensors(cfg, read_checkpoint(tmp_path / "again.gguf").tensors)
    for name in back:
        np.testing.assert_array_equal(np.asarray(again[name]), np.asarray(back[name]))


def test_gguf_model_runs_like_ours(tmp_path, model):
    """Same codes, scales rounded to fp16, F16 embedding: the logits barely move."""
    src, _, _ = model
    convert(src, tmp_path / "m.gguf", to="gguf-tq2_0")
    ids = [0, 5, 17, 42, 99, 250, 3, 7]
    ours = bitnet158.load(src).logits(ids)
    theirs = bitnet158.load(tmp_path / "m.gguf").logits(ids)
    assert np.abs(ours - theirs).max() < 0.02 * np.abs(ours).max()
    assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))


LLAMA_BITNET = dict(
    subln=False, family="llama", tie_word_embeddings=False, num_kv_heads=2, rms_norm_eps=1e-6
)  # Falcon-E / Falcon3-1.58bit style


@pytest.mark.parametrize("ttype", ["tq2_0", "tq1_0"])
def test_plain_llama_bitnet_is_a_llama_gguf(tmp_path, ttype):
    """No sub-norms: llama.cpp's `llama` graph, q/k rows in its RoPE pair order, output.weight."""
    cfg = make_config(**LLAMA_BITNET)
    tensors = random_tensors(cfg, seed=3)
    src = save_native(tmp_path / "m.safetensors", cfg, tensors, GPT2_TOKENIZER, TEMPLATE)
    convert(src, tmp_path / "m.gguf", to=f"gguf-{ttype}")
    fields = reader_fields(tmp_path / "m.gguf")
    assert fields["general.architecture"] == "llama"
    r = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert "output.weight" in r and "blk.0.attn_sub_norm.weight" not in r
    # q rows as llama.cpp's converter permutes them: head h, pair i -> rows (i, half + i)
    q = gguf.quants.dequantize(r["blk.0.attn_q.weight"].data, r["blk.0.attn_q.weight"].tensor_type)
    codes = tensors["layers.0.q.codes"]
    half = cfg.head_dim // 2
    np.testing.assert_array_equal(np.sign(q[1]), codes[half])  # head 0: rows 0, half, 1, ...
    np.testing.assert_array_equal(np.sign(q[2]), codes[1])
    ckpt = read_checkpoint(tmp_path / "m.gguf")
    assert ckpt.config == cfg
    back = unpack_tensors(cfg, ckpt.tensors)
    for name, value in tensors.items():
        if name.endswith(".codes"):
            np.testing.assert_array_equal(back[name], value, err_msg=name)
    ids = [0, 5, 17, 42, 99, 250, 3, 7]
    ours, theirs = bitnet158.load(src).logits(ids), bitnet158.load(tmp_path / "m.gguf").logits(ids)
    assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("etype", ["q8_0", "q6_k", "f32"])
def test_embedding_types(tmp_path, model, etype):
    src, cfg, tensors = model
    convert(src, tmp_path / "m.gguf", to="gguf-tq2_0", embedding_type=etype)
    t = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}["token_embd.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType[etype.upper()]
    back = unpack_tensors(cfg, read_checkpoint(tmp_path / "m.gguf").tensors)["embed.weight"]
    ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(back.shape)
    np.testing.assert_array_equal(back, ref)
    np.testing.assert_allclose(back, tensors["embed.weight"], atol={"q6_k": 0.1}.get(etype, 0.02))


# --- what llama.cpp's bitnet graph cannot compute is refused --------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(hidden_act="relu2", family="bitnet-2b4t"), "gates with SiLU"),
        (dict(tie_word_embeddings=False), "not tied"),
        (dict(intermediate_size=704), "K = 704"),
        (dict(inner_norm=True, subln=False), "not affine RMSNorms"),
    ],
)
def test_refuses_models_llama_cpp_would_compute_differently(tmp_path, overrides, message):
    cfg = make_config(**overrides)
    with pytest.raises(FormatError, match=message):
        check_exportable(cfg)
    ckpt = checkpoint(cfg, random_tensors(cfg))
    with pytest.raises(FormatError, match=message):
        write_gguf(tmp_path / "x.gguf", ckpt, random_tensors(cfg))
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left behind


# --- the tokenizer rebuilt from GGUF metadata ----------------------------------------------------


@pytest.mark.parametrize("llama3", [False, True], ids=["gpt-2", "llama-bpe"])
def test_tokenizer_rebuilt_from_gguf_encodes_like_the_original(tmp_path, llama3):
    text = train_tokenizer(llama3)
    cfg = make_config(vocab_size=Tokenizer.from_str(text).get_vocab_size())
    tensors = random_tensors(cfg)
    write_gguf(tmp_path / "m.gguf", checkpoint(cfg, tensors, text), tensors)
    assert reader_fields(tmp_path / "m.gguf")["tokenizer.ggml.pre"] == (
        "llama-bpe" if llama3 else "gpt-2"
    )
    original = Tokenizer.from_str(text)
    rebuilt = Tokenizer.from_str(load_gguf(tmp_path / "m.gguf").tokenizer_json)
    assert rebuilt.get_vocab(with_added_tokens=True) == original.get_vocab(with_added_tokens=True)
    for sample in SAMPLES + CORPUS[:3]:
        want = original.encode(sample, add_special_tokens=False).ids
        assert rebuilt.encode(sample, add_special_tokens=False).ids == want, sample
        assert rebuilt.decode(want, skip_special_tokens=False) == original.decode(
            want, skip_special_tokens=False
        )
        # like llama.cpp with tokenizer.ggml.add_bos_token, special tokens mean a leading BOS
        assert rebuilt.encode(sample).ids == [0, *want]


def test_tokenizer_with_a_normalizer_is_refused(tmp_path):
    spec = json.loads(GPT2_TOKENIZER)
    spec["normalizer"] = {"type": "NFC"}
    cfg = make_config()
    tensors = random_tensors(cfg)
    with pytest.raises(FormatError, match="normalizer"):
        write_gguf(tmp_path / "m.gguf", checkpoint(cfg, tensors, json.dumps(spec)), tensors)


# --- GGUF files written here from the spec: I2_S, float ternary tensors, corrupt files -----------

_VALUE_TYPES = {int: 4, float: 6, bool: 7, str: 8}  # u32, f32, bool, string


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _value(v) -> tuple[int, bytes]:
    if isinstance(v, bool):
        return 7, struct.pack("<?", v)
    if isinstance(v, int):
        return 4, struct.pack("<I", v)
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, str):
        return 8, _string(v)
    if isinstance(v, list):  # arrays of str, float32 or int32
        if v and isinstance(v[0], str):
            return 9, struct.pack("<IQ", 8, len(v)) + b"".join(_string(s) for s in v)
        if v and isinstance(v[0], float):
            return 9, struct.pack("<IQ", 6, len(v)) + np.asarray(v, dtype="<f4").tobytes()
        return 9, struct.pack("<IQ", 5, len(v)) + np.asarray(v, dtype="<i4").tobytes()
    raise TypeError(v)


def write_raw_gguf(path, metadata: dict, tensors: list[tuple[str, tuple, int, bytes]]) -> None:
    """A GGUF v3 file: metadata, then (name, numpy shape, ggml type, data) tensors, aligned."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, v in metadata.items():
        vtype, data = _value(v)
        out += _string(key) + struct.pack("<I", vtype) + data
    offset = 0
    for name, shape, ggml_type, data in tensors:
        ne = tuple(reversed(shape))
        out += _string(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        out += struct.pack("<IQ", ggml_type, offset)
        offset += -(-len(data) // 32) * 32
    out += b"\0" * (-len(out) % 32)
    for _, _, _, data in tensors:
        out += data + b"\0" * (-len(data) % 32)
    path.write_bytes(bytes(out))


def gpt2_vocab_meta(tokenizer: str, vocab_size: int) -> dict:
    from bitnet158.formats.gguf_vocab import vocab_from_tokenizer_json

    vocab = vocab_from_tokenizer_json(tokenizer, vocab_size)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": vocab.pre,
        "tokenizer.ggml.tokens": vocab.tokens,
        "tokenizer.ggml.token_type": vocab.types,
        "tokenizer.ggml.merges": vocab.merges,
    }


def bitnet_cpp_file(
    path, cfg, tensors, arch="bitnet-b1.58", proj=None, vocab_meta=None, extra=()
):  # fmt: skip
    """A bitnet.cpp-style GGUF (2B-4T layout): I2_S projections, F16 embedding, arch metadata.

    `proj(codes, scale) -> (ggml type, bytes)` overrides how projections are stored;
    `vocab_meta` the tokenizer.ggml.* keys (default: the GPT-2 style test tokenizer).
    """
    a = arch + "."
    meta = {
        "general.architecture": arch,
        "general.name": "bitnet2b",
        a + "vocab_size": cfg.vocab_size,
        a + "context_length": cfg.max_position_embeddings,
        a + "embedding_length": cfg.hidden_size,
        a + "block_count": cfg.num_layers,
        a + "feed_forward_length": cfg.intermediate_size,
        a + "rope.dimension_count": cfg.head_dim,
        a + "attention.head_count": cfg.num_heads,
        a + "attention.head_count_kv": cfg.num_kv_heads,
        "tokenizer.ggml.add_bos_token": True,
        a + "attention.layer_norm_rms_epsilon": cfg.rms_norm_eps,
        a + "rope.freq_base": cfg.rope_theta,
        "general.file_type": 40,
        **(vocab_meta or gpt2_vocab_meta(GPT2_TOKENIZER, cfg.vocab_size)),
        "tokenizer.ggml.bos_token_id": cfg.bos_token_id,
        "tokenizer.ggml.eos_token_id": cfg.eos_token_ids[0],
        "tokenizer.ggml.eot_token_id": cfg.eos_token_ids[-1],
    }
    proj = proj or (lambda codes, scale: (36, pack_i2_s(codes, scale).tobytes()))
    f32 = lambda x: np.asarray(x, dtype="<f4").tobytes()  # noqa: E731
    items = [
        (
            "token_embd.weight",
            tensors["embed.weight"].shape,
            1,
            tensors["embed.weight"].astype("<f2").tobytes(),
        ),  # fmt: skip
        ("output_norm.weight", (cfg.hidden_size,), 0, f32(tensors["norm.weight"])),
    ]
    for i in range(cfg.num_layers):
        for norm in ("attn_norm", "ffn_norm", "attn_sub_norm", "ffn_sub_norm"):
            w = tensors[f"layers.{i}.{norm}.weight"]
            items.append((f"blk.{i}.{norm}.weight", w.shape, 0, f32(w)))
        for ours, theirs in PROJ_NAMES.items():
            codes = tensors[f"layers.{i}.{ours}.codes"]
            ggml_type, data = proj(codes, tensors[f"layers.{i}.{ours}.scale"])
            items.append((f"blk.{i}.{theirs}.weight", codes.shape, ggml_type, data))
    write_raw_gguf(path, meta, items + list(extra))
    return path


def test_i2s_2b4t_file_keeps_relu2_and_exact_weights(tmp_path):
    cfg = make_config(hidden_act="relu2", family="bitnet-2b4t", rope_theta=500000.0)
    tensors = random_tensors(cfg, seed=1)
    path = bitnet_cpp_file(tmp_path / "ggml-model-i2_s.gguf", cfg, tensors)
    ckpt = read_checkpoint(path)
    assert ckpt.config.hidden_act == "relu2"  # what 2B-4T was trained with (BitNet #588)
    assert ckpt.config == cfg
    back = unpack_tensors(cfg, ckpt.tensors)
    for name, value in tensors.items():
        if name.endswith((".codes", ".scale")):  # I2_S keeps the fp32 scale: exact
            np.testing.assert_array_equal(back[name], value, err_msg=name)
    # it runs here as the relu2 model it is: the same logits as our file of that model
    f16 = {**tensors, "embed.weight": tensors["embed.weight"].astype(np.float16)}
    native = save_native(tmp_path / "ref.safetensors", cfg, f16, GPT2_TOKENIZER)
    ids = [0, 3, 9, 27, 81, 243]
    ref, got = bitnet158.load(native).logits(ids), bitnet158.load(path).logits(ids)
    np.testing.assert_array_equal(got, ref)
    # and refusing to export it to llama.cpp's SiLU graph is the right thing
    with pytest.raises(FormatError, match="SiLU"):
        convert(path, tmp_path / "out.gguf", to="gguf-tq2_0")


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0"])
def test_float_ternary_projections_are_read_exactly(tmp_path, kind):
    """convert_hf_to_gguf --outtype f32/f16/bf16/q8_0 stores W = codes * beta as floats."""
    cfg = make_config()
    tensors = random_tensors(cfg, seed=2)

    def store(codes, scale):
        w = codes.astype(np.float32) * np.float32(scale)
        qtype = gguf.GGMLQuantizationType[kind]
        data = (
            gguf.quants.quantize(w, qtype)
            if kind in ("BF16", "Q8_0")
            else w.astype({"F32": "<f4", "F16": "<f2"}[kind])
        )
        return int(qtype), data.tobytes()

    path = bitnet_cpp_file(tmp_path / "m.gguf", cfg, tensors, arch="bitnet", proj=store)
    back = unpack_tensors(cfg, read_checkpoint(path).tensors)
    assert read_checkpoint(path).config.hidden_act == "silu"
    for name, value in tensors.items():
        if name.endswith(".codes"):
            np.testing.assert_array_equal(back[name], value, err_msg=name)
        elif name.endswith(".scale"):
            assert back[name] == pytest.approx(float(value), rel=1e-2), name


# --- bad files: a FormatError naming the file and the problem -------------------------------------


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory, model):
    src, _, _ = model
    path = tmp_path_factory.mktemp("bad") / "good.gguf"
    convert(src, path, to="gguf-tq2_0")
    return path


def _expect_error(path, *fragments):
    with pytest.raises(FormatError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("keep", [3, 10, 200, 5000, -1000, -1])
def test_truncated_file(tmp_path, good_gguf, keep):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good_gguf.read_bytes()[:keep])
    _expect_error(bad, "truncated" if keep != 3 else "GGUF")


def _tensor_info_offset(path, name: str) -> int:
    """Byte offset of the `type` field of tensor `name`'s entry in the tensor table."""
    data = path.read_bytes()
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key) + len(key)
    n_dims = struct.unpack_from("<I", data, at)[0]
    return at + 4 + 8 * n_dims


def test_tensor_beyond_end_of_file(tmp_path, good_gguf):
    data = bytearray(good_gguf.read_bytes())
    at = _tensor_info_offset(good_gguf, "blk.1.ffn_down.weight") + 4
    struct.pack_into("<Q", data, at, len(data) * 2 // 32 * 32)  # offset far past the end
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    _expect_error(bad, "blk.1.ffn_down.weight", "truncated or corrupt")


def test_unknown_tensor_type(tmp_path, good_gguf):
    data = bytearray(good_gguf.read_bytes())
    struct.pack_into("<I", data, _tensor_info_offset(good_gguf, "blk.0.attn_q.weight"), 12)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    _expect_error(bad, "blk.0.attn_q.weight", "Q4_K", "does not read")
    struct.pack_into("<I", data, _tensor_info_offset(good_gguf, "blk.0.attn_q.weight"), 77)
    bad.write_bytes(bytes(data))
    _expect_error(bad, "unknown type 77")


def test_mismatched_shapes(tmp_path):
    cfg = make_config()
    tensors = random_tensors(cfg)
    path = bitnet_cpp_file(tmp_path / "m.gguf", cfg, tensors, arch="bitnet")
    wrong = make_config(intermediate_size=768)  # metadata says 768, tensors hold 512
    bad = bitnet_cpp_file(tmp_path / "bad.gguf", wrong, tensors, arch="bitnet")
    read_checkpoint(path)
    _expect_error(bad, "blk.0.ffn_sub_norm.weight", "[512]", "expected [768]")


def test_unexpected_tensor(tmp_path):
    cfg = make_config()
    extra = [("rope_freqs.weight", (32,), 0, np.ones(32, dtype="<f4").tobytes())]
    bad = bitnet_cpp_file(tmp_path / "m.gguf", cfg, random_tensors(cfg), "bitnet", extra=extra)
    _expect_error(bad, "unexpected tensor rope_freqs.weight")


def test_non_ternary_values(tmp_path):
    cfg = make_config()
    tensors = random_tensors(cfg)
    rng = np.random.default_rng(0)

    def store(codes, scale):  # a full-precision matrix, not ternary
        return 0, rng.standard_normal(codes.shape).astype("<f4").tobytes()

    bad = bitnet_cpp_file(tmp_path / "fp.gguf", cfg, tensors, arch="bitnet", proj=store)
    _expect_error(bad, "blk.0.attn_q.weight", "not a ternary matrix")

    def mixed_scales(codes, scale):  # TQ2_0 blocks with different scales
        d = np.full((codes.shape[0], codes.shape[1] // 256), scale, dtype=np.float32)
        d[0, 0] *= 2
        from bitnet158.packing import pack_tq2_0

        return 35, pack_tq2_0(codes, d).tobytes()

    bad = bitnet_cpp_file(tmp_path / "tq.gguf", cfg, tensors, arch="bitnet", proj=mixed_scales)
    _expect_error(bad, "blk.0.attn_q.weight", "different scales")

    def code_three(codes, scale):  # the unused 2-bit code 3 in I2_S data
        data = bytearray(pack_i2_s(codes, scale).tobytes())
        data[0] = 0xFF
        return 36, bytes(data)

    bad = bitnet_cpp_file(tmp_path / "i2s.gguf", cfg, tensors, proj=code_three)
    _expect_error(bad, "blk.0.attn_q.weight", "code 3")


def test_other_bad_headers(tmp_path, good_gguf):
    data = good_gguf.read_bytes()
    cases = {
        "magic.gguf": (b"GGML" + data[4:], "not a GGUF file"),
        "version.gguf": (data[:4] + struct.pack("<I", 1) + data[8:], "version 1"),
        "count.gguf": (data[:8] + struct.pack("<Q", 2**60) + data[16:], "corrupt header"),
        "empty.gguf": (b"", "empty"),
    }
    for name, (content, fragment) in cases.items():
        (tmp_path / name).write_bytes(content)
        _expect_error(tmp_path / name, fragment)
    other = tmp_path / "llama.gguf"
    write_raw_gguf(other, {"general.architecture": "gptneox"}, [])
    _expect_error(other, "'gptneox' is not a BitNet one")


def test_read_gguf_reports_tensors(good_gguf, model):
    _, cfg, _ = model
    f = read_gguf(good_gguf)
    assert f.version == 3
    assert f.tensors["blk.0.ffn_down.weight"].shape == (cfg.hidden_size, cfg.intermediate_size)
    assert f.tensors["blk.0.ffn_down.weight"].type_name == "TQ2_0"


def test_reading_gguf_needs_no_torch(good_gguf):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'gguf'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from bitnet158.formats.convert import read_checkpoint\n"
        "read_checkpoint(sys.argv[1])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(good_gguf)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# --- SentencePiece (tokenizer.ggml.model = "llama": Llama 2, 1bitLLM) -----------------------------


def train_sentencepiece():
    """A SentencePiece BPE model with byte fallback, trained like Llama 2's (the reference)."""
    import io

    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=420, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["<|eot_id|>"], normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, num_threads=1, minloglevel=2,
    )  # fmt: skip
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def spm_vocab_meta(sp) -> dict:
    """tokenizer.ggml.* of a SentencePiece model, as llama.cpp's converter writes them."""
    n = sp.get_piece_size()

    def kind(i):
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_byte(i):
            return 6
        return 4 if sp.id_to_piece(i) == "<|eot_id|>" else 1

    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [float(sp.get_score(i)) for i in range(n)],
        "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
    }


SPM_SAMPLES = [s for s in SAMPLES if "<|" not in s] + CORPUS[:3]


def tq2_0(codes, scale):
    from bitnet158.packing import pack_tq2_0

    return 35, pack_tq2_0(codes, scale).tobytes()


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    """(sentencepiece processor, a GGUF file whose vocabulary is that model's)."""
    sp = train_sentencepiece()
    cfg = make_config(vocab_size=sp.get_piece_size(), bos_token_id=1, eos_token_ids=[2])
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    bitnet_cpp_file(path, cfg, random_tensors(cfg), "bitnet", tq2_0, spm_vocab_meta(sp))
    return sp, path


def test_sentencepiece_vocab_rebuilt_encodes_like_sentencepiece(spm_gguf):
    sp, path = spm_gguf
    rebuilt = Tokenizer.from_str(load_gguf(path).tokenizer_json)
    for sample in SPM_SAMPLES:
        want = sp.encode(sample)
        assert rebuilt.encode(sample, add_special_tokens=False).ids == want, sample
        assert rebuilt.decode(want) == sp.decode(want)
    assert rebuilt.encode("ROMEO").ids[0] == 1  # add BOS, as llama.cpp does


def test_sentencepiece_vocab_written_back(tmp_path, spm_gguf):
    """Our SentencePiece-style tokenizer.json -> GGUF 'llama' vocab -> the same encodings."""
    sp, path = spm_gguf
    ckpt = load_gguf(path)
    tensors = unpack_tensors(ckpt.config, ckpt.tensors)
    write_gguf(tmp_path / "again.gguf", ckpt, tensors)
    fields = reader_fields(tmp_path / "again.gguf")
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    types = fields["tokenizer.ggml.token_type"]
    assert (types[0], types[1], types[3], types[4]) == (2, 3, 4, 6)  # unk, control, user, byte
    again = Tokenizer.from_str(load_gguf(tmp_path / "again.gguf").tokenizer_json)
    for sample in SPM_SAMPLES:
        assert again.encode(sample, add_special_tokens=False).ids == sp.encode(sample), sample
