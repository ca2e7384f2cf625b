"""Every array the Python side hands to bitnet158._native is checked before C++ reads it.

Each exposed function and method gets, for each array argument, a wrong dtype, a wrong number
of dimensions, a strided (non-C-contiguous) view, a view at an odd byte offset and a wrong
shape; the expected answer is a TypeError / ValueError naming that argument, and a model that
refused a call is left as it was (its logits before and after are equal). Index arguments
(layer, token, slot, position, logits row) out of range are refused the same way. The engine's
wrappers copy a misaligned tensor (a file may store one at any offset) instead of failing.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from bitnet158 import _native, packing, quant
from bitnet158.config import ModelConfig
from bitnet158.engine.kernels import TernaryLinear
from bitnet158.engine.kv_cache import aligned_zeros
from bitnet158.engine.model import EngineModel, rope_inv_freq
from bitnet158.formats.native import expected_shapes, projection_shapes

CFG = ModelConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_layers=1,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=16)  # fmt: skip
PROJ = list(projection_shapes(CFG))


def misaligned(a: np.ndarray, offset: int = 1) -> np.ndarray:
    """A C-contiguous copy of `a` whose data starts `offset` bytes past an aligned address."""
    raw = np.zeros(a.nbytes + 64 + offset, np.uint8)
    start = -raw.ctypes.data % 64 + offset
    out = raw[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def strided(a: np.ndarray) -> np.ndarray:
    """A view with `a`'s shape and values that is not C-contiguous (every other column)."""
    wide = np.zeros((*a.shape[:-1], 2 * a.shape[-1]), a.dtype)
    wide[..., ::2] = a
    return wide[..., ::2]


def other_dtype(a: np.ndarray) -> np.ndarray:
    return a.astype({1: np.int16, 2: np.int32, 4: np.float64, 8: np.float32}[a.itemsize])


def wrong_shape(a: np.ndarray) -> np.ndarray:
    """One more column, 64-byte aligned (so that only the shape is wrong)."""
    return aligned_zeros((*a.shape[:-1], a.shape[-1] + 1), a.dtype)


def extra_dim(a: np.ndarray) -> np.ndarray:
    return a[None]


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Native tensors (`.packed`) of a random 1-layer model of CFG."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(CFG).items():
        if name.endswith(".packed"):
            n, k = projection_shapes(CFG)[name.rsplit(".", 2)[1]]
            out[name] = packing.pack_ours(rng.integers(-1, 2, (n, k)).astype(np.int8))
        elif name.endswith(".scale"):
            out[name] = np.array([rng.uniform(0.5, 1.5)], np.float32)
        else:
            out[name] = (1 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    return out


W = weights()


def new_model(**overrides) -> _native.Model:
    shape = dict(hidden=CFG.hidden_size, inter=CFG.intermediate_size, heads=CFG.num_heads,
                 kv_heads=CFG.num_kv_heads, head_dim=CFG.head_dim, vocab=CFG.vocab_size,
                 layers=1, relu2=False, subln=True, inner_norm=False, layernorm=False, eps=1e-5,
                 inner_eps=1e-5, inv_freq=rope_inv_freq(CFG.head_dim, 10000.0))  # fmt: skip
    return _native.Model(**{**shape, **overrides})


def layer_args() -> dict:
    p = "layers.0."
    return {
        "i": 0,
        "attn_norm": W[p + "attn_norm.weight"],
        "ffn_norm": W[p + "ffn_norm.weight"],
        "attn_sub_norm": W[p + "attn_sub_norm.weight"],
        "ffn_sub_norm": W[p + "ffn_sub_norm.weight"],
        "packed": [W[f"{p}{proj}.packed"] for proj in PROJ],
        "betas": [float(W[f"{p}{proj}.scale"][0]) for proj in PROJ],
    }


def ready_model() -> _native.Model:
    m = new_model()
    m.set_layer(**layer_args())
    m.set_embedding(W["embed.weight"])
    m.set_output(W["norm.weight"], None)
    return m


def cache(slots: int = 1, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    shape = (slots, 1, CFG.num_kv_heads, CFG.max_position_embeddings, CFG.head_dim)
    return aligned_zeros(shape, dtype), aligned_zeros(shape, dtype)


def step_args() -> dict:
    k, v = cache()
    return {
        "tokens": np.array([3, 7], np.int32),
        "slots": np.zeros(2, np.int32),
        "positions": np.array([0, 1], np.int32),
        "k_cache": k,
        "v_cache": v,
        "out_rows": np.array([0, 1], np.int64),
    }


def logits(m: _native.Model) -> np.ndarray:
    return m.forward(**step_args())


REFERENCE = logits(ready_model())
X = np.random.default_rng(1).standard_normal((3, 300)).astype(np.float32)
CODES = np.random.default_rng(2).integers(-1, 2, (5, 300)).astype(np.int8)
PACKED = packing.pack_ours(CODES)
X_Q = quant.quantize_activations(X)[0]
HEAD = np.random.default_rng(3).standard_normal((CFG.vocab_size, CFG.hidden_size)).astype(np.float32)  # fmt: skip


def _with(args: dict, name: str, value) -> dict:
    out = dict(args)
    if name.startswith("packed["):  # one matrix of set_layer's list
        j = int(name[7])
        out["packed"] = [value if i == j else p for i, p in enumerate(args["packed"])]
    else:
        out[name] = value
    return out


def _call_set_output_int8(**kw):
    m = ready_model()
    m.set_output_int8(**kw)
    return m


def _call_set_output_q4(**kw):
    m = ready_model()
    m.set_output_q4(**kw)
    return m


def _call_set_embedding(**kw):
    new_model().set_embedding(**kw)


def _call_set_output(**kw):
    m = new_model()
    m.set_embedding(W["embed.weight"])
    m.set_output(**kw)


_INT8_HEAD = _native.quantize_rows_int8(HEAD)
_Q4_HEAD = _native.quantize_rows_q4(HEAD)

# function, its good arguments, the array arguments to spoil (name as the message says it).
CALLS = {
    "quantize_activations": (_native.quantize_activations, {"x": X}, ["x"]),
    "ternary_gemm_i32": (
        _native.ternary_gemm_i32, {"x_q": X_Q, "packed": PACKED, "n": 5, "k": 300},
        ["x_q", "packed"],
    ),
    "bitlinear": (
        _native.bitlinear, {"x": X, "packed": PACKED, "beta": 1.5, "n": 5, "k": 300},
        ["x", "packed"],
    ),
    "quantize_rows_int8": (_native.quantize_rows_int8, {"w": HEAD}, ["w"]),
    "quantize_rows_q4": (_native.quantize_rows_q4, {"w": HEAD}, ["w"]),
    "read_bytes": (_native.read_bytes, {"buf": PACKED.reshape(-1)}, ["buf"]),
    "Model": (new_model, {"inv_freq": rope_inv_freq(CFG.head_dim, 10000.0)}, ["inv_freq"]),
    "set_layer": (
        lambda **kw: new_model().set_layer(**kw), layer_args(),
        ["attn_norm", "ffn_norm", "attn_sub_norm", "ffn_sub_norm", *(f"packed[{j}]" for j in range(7))],
    ),
    "set_embedding": (_call_set_embedding, {"embed": W["embed.weight"]}, ["embed"]),
    "set_output": (_call_set_output, {"final_norm": W["norm.weight"], "head": HEAD},
                   ["final_norm", "head"]),
    "set_output_int8": (
        _call_set_output_int8,
        dict(zip(("q", "row_scale", "row_sum"), _INT8_HEAD, strict=True)),
        ["q", "row_scale", "row_sum"],
    ),
    "set_output_q4": (
        _call_set_output_q4, dict(zip(("nibbles", "d"), _Q4_HEAD, strict=True)), ["nibbles", "d"]
    ),
    "forward": (
        lambda **kw: ready_model().forward(**kw), step_args(),
        ["tokens", "slots", "positions", "k_cache", "v_cache", "out_rows"],
    ),
}  # fmt: skip

# How the messages name an argument.
MESSAGE_NAMES = {f"packed[{j}]": f"packed {proj}" for j, proj in enumerate(PROJ)}
MESSAGE_NAMES |= {"q": "int8 lm_head", "nibbles": "4-bit lm_head", "d": "4-bit lm_head scales",
                  "head": "lm_head", "final_norm": "final norm"}  # fmt: skip

SPOILERS = {
    "dtype": (other_dtype, TypeError),
    "ndim": (extra_dim, TypeError),
    "strided": (strided, TypeError),
    "misaligned": (misaligned, ValueError),
    "shape": (wrong_shape, ValueError),
}


def _good_value(args: dict, arg: str):
    return args["packed"][int(arg[7])] if arg.startswith("packed[") else args[arg]


def _applies(call: str, arg: str, kind: str) -> bool:
    """Whether the spoiler makes the argument wrong: a byte array has no alignment to get
    wrong unless the kernel asks for 64 (the output layer's rows); some take any shape."""
    if kind == "misaligned":
        return _good_value(CALLS[call][1], arg).itemsize > 1 or arg in ("q", "nibbles")
    if kind == "shape":
        return call not in ("quantize_activations", "quantize_rows_int8", "quantize_rows_q4",
                            "read_bytes") and arg != "out_rows"  # fmt: skip
    return True


CASES = [
    (call, arg, kind)
    for call, (_, _, args) in CALLS.items()
    for arg in args
    for kind in SPOILERS
    if _applies(call, arg, kind)
]


@pytest.mark.parametrize("call, arg, kind", CASES, ids=["-".join(c) for c in CASES])
def test_a_spoiled_array_is_refused_by_name(call, arg, kind):
    fn, args, _ = CALLS[call]
    fn(**args)  # the good arguments pass
    good = _good_value(args, arg)
    spoil, error = SPOILERS[kind]
    bad = spoil(good)
    assert np.array_equal(bad, good) or kind in ("dtype", "shape", "ndim")  # same values
    name = MESSAGE_NAMES.get(arg, arg)
    with pytest.raises(error, match=r"(^|\W)" + re.escape(name) + r"\W"):
        fn(**_with(args, arg, bad))


def test_the_process_and_the_kernels_work_after_every_refusal():
    model = ready_model()
    refused = 0
    for call, arg, kind in CASES:
        fn, args, _ = CALLS[call]
        try:
            fn(**_with(args, arg, SPOILERS[kind][0](_good_value(args, arg))))
        except (TypeError, ValueError):
            refused += 1
    assert refused == len(CASES)
    np.testing.assert_array_equal(logits(model), REFERENCE)
    np.testing.assert_array_equal(
        _native.bitlinear(X, PACKED, 1.5, 5, 300), quant.ternary_linear_reference(X, CODES, 1.5)
    )


def test_a_refused_call_does_not_change_the_model():
    m = ready_model()
    with pytest.raises(ValueError, match="lm_head"):
        m.set_output(2 * W["norm.weight"], wrong_shape(HEAD))  # the norm is fine, the head not
    args = layer_args()
    args["attn_norm"], args["ffn_sub_norm"] = 2 * args["attn_norm"], 3 * args["ffn_sub_norm"]
    args["packed"][0] = np.ascontiguousarray(args["packed"][0][::-1])
    with pytest.raises(ValueError, match="packed down"):
        m.set_layer(**_with(args, "packed[6]", wrong_shape(args["packed"][6])))
    with pytest.raises(TypeError, match="embed"):
        m.set_embedding(W["embed.weight"].astype(np.float16)[None])
    with pytest.raises(ValueError, match="row_sum"):
        m.set_output_int8(_INT8_HEAD[0], _INT8_HEAD[1], wrong_shape(_INT8_HEAD[2]))
    np.testing.assert_array_equal(logits(m), REFERENCE)
    assert m.head_kind == "float32"


def test_indices_out_of_range():
    m = new_model()
    for i in (-1, 1, 2**40):
        with pytest.raises(IndexError, match=f"layer index {i}"):
            m.set_layer(**{**layer_args(), "i": i})
    with pytest.raises(ValueError, match="7 packed"):
        m.set_layer(**{**layer_args(), "packed": layer_args()["packed"][:6]})
    m = ready_model()
    good = step_args()
    before = good["k_cache"].copy()
    bad = {
        "vocabulary": {"tokens": np.array([3, CFG.vocab_size], np.int32)},
        "outside": {"tokens": np.array([-1, 3], np.int32)},
        "slot 1 does not exist": {"slots": np.array([0, 1], np.int32)},
        "slot -1": {"slots": np.array([0, -1], np.int32)},
        "negative position": {"positions": np.array([0, -5], np.int32)},
        "context overflow": {"positions": np.array([0, CFG.max_position_embeddings], np.int32)},
        "twice": {"positions": np.array([1, 1], np.int32)},
        "logits row 2": {"out_rows": np.array([0, 2], np.int64)},
        "logits row -1": {"out_rows": np.array([-1], np.int64)},
        "same length": {"slots": np.zeros(3, np.int32)},
    }
    for message, change in bad.items():
        with pytest.raises(ValueError, match=message):
            m.forward(**{**good, **change})
    np.testing.assert_array_equal(good["k_cache"], before)  # nothing was written
    np.testing.assert_array_equal(logits(m), REFERENCE)


def test_the_kv_cache_must_be_writable_and_two_arrays():
    m = ready_model()
    args = step_args()
    read_only = args["k_cache"].copy()
    read_only.setflags(write=False)
    with pytest.raises(TypeError, match="k_cache must be a writable"):
        m.forward(**{**args, "k_cache": read_only})
    with pytest.raises(ValueError, match="must not share memory"):
        m.forward(**{**args, "v_cache": args["k_cache"]})
    with pytest.raises(TypeError, match="k_cache must be float32 or float16, got int32"):
        m.forward(**{**args, "k_cache": args["k_cache"].view(np.int32)})
    with pytest.raises(TypeError, match=r"v_cache must have the same dtype as k_cache \(float32\)"):
        m.forward(**{**args, "v_cache": cache(dtype=np.float16)[1]})
    k16, v16 = cache(dtype=np.float16)
    assert m.forward(**{**args, "k_cache": k16, "v_cache": v16}).shape == REFERENCE.shape
    # keys are kept in tiles of 16 positions: the capacity must be a whole number of tiles
    shape = (1, 1, CFG.num_kv_heads, 8, CFG.head_dim)
    short = aligned_zeros(shape, np.float32), aligned_zeros(shape, np.float32)
    with pytest.raises(ValueError, match="multiple of 16 positions, got 8"):
        m.forward(**{**args, "k_cache": short[0], "v_cache": short[1]})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"heads": 3}, "inconsistent model shape"),  # not a multiple of kv_heads
        ({"head_dim": 15}, "inconsistent model shape"),
        ({"layers": 0}, "inconsistent model shape"),
        ({"vocab": -1}, "inconsistent model shape"),
        ({"hidden": 2**40}, "wider than the supported maximum"),
        ({"heads": 2**40, "kv_heads": 1}, "wider than the supported maximum"),  # no overflow
        ({"layers": 2**40}, "layers be at most"),
        ({"vocab": 2**31}, "int32"),
    ],
)
def test_model_shapes_are_checked(change, message):
    with pytest.raises(ValueError, match=message):
        new_model(**change)


def test_order_of_setup_and_other_arguments():
    m = new_model()
    with pytest.raises(ValueError, match="set_embedding first"):
        m.set_output(W["norm.weight"], None)
    with pytest.raises(ValueError, match="layer 0 is not set"):
        m.forward(**step_args())
    m.set_embedding(W["embed.weight"])
    with pytest.raises(ValueError, match="set_output first"):
        m.set_output_int8(*_INT8_HEAD)
    with pytest.raises(TypeError, match="bfloat16"):
        m.set_embedding(W["embed.weight"], bf16=True)  # float32 is not BF16 bits
    with pytest.raises(ValueError, match="required"):
        new_model().set_layer(**{**layer_args(), "attn_sub_norm": None})  # subln model
    with pytest.raises(ValueError, match="unknown ISA"):
        ready_model().forward(**step_args(), isa="neon")
    before = _native.get_num_threads()
    for n in (0, -1, 1025):
        with pytest.raises(ValueError, match="number of threads"):
            _native.set_num_threads(n)
    with pytest.raises(TypeError):
        _native.set_num_threads(2**40)  # not a C int
    assert _native.get_num_threads() == before


def test_the_engine_copies_misaligned_tensors():
    """A file may store a tensor at any offset; the engine then hands C++ an aligned copy."""
    odd = {name: misaligned(t) if t.itemsize > 1 else t for name, t in W.items()}
    assert not any(t.flags.aligned for t in odd.values() if t.itemsize > 1)
    engine = EngineModel(CFG, odd)
    ids = np.array([3, 7])
    got = engine.forward(ids, engine.new_cache(4))
    np.testing.assert_array_equal(got, EngineModel(CFG, W).forward(ids, engine.new_cache(4)))
    np.testing.assert_array_equal(got, REFERENCE)
    linear = TernaryLinear(misaligned(PACKED), 1.5, 5, 300)
    np.testing.assert_array_equal(
        linear(misaligned(X, 2)), quant.ternary_linear_reference(X, CODES, 1.5)
    )
