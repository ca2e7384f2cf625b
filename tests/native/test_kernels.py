"""bitnet158._native against numpy references, bit for bit, on every ISA this CPU runs.

References: `quant.quantize_activations` / `quant.ternary_linear_reference` (numpy) and an exact
integer matmul of the original ternary codes (float64 BLAS: every partial sum is an integer far
below 2^53, so it is exact). The packed weights come from `packing.pack_ours`.
"""

import functools
import os
import subprocess
import sys

import numpy as np
import pytest
from native_fixtures import exact_matmul

from bitnet158 import _native, packing, quant

ISAS = _native.available_isas()


@functools.lru_cache(maxsize=4)
def weights(n, k):
    codes = np.random.default_rng(n * 7919 + k).integers(-1, 2, size=(n, k)).astype(np.int8)
    return codes, packing.pack_ours(codes)


def activations(t, k, seed=0):
    x = np.random.default_rng(seed).standard_normal((t, k)).astype(np.float32)
    x[:, ::7] *= 4  # outliers, as real activations have
    return x


def test_isa_reporting():
    assert ISAS[0] == "scalar" and set(ISAS) <= {"scalar", "avx2", "avx512", "amx"}
    assert _native.isa() == os.environ.get("BITNET158_ISA", ISAS[-1])  # best unless forced
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    if "avx512" in ISAS and {"amx_tile", "amx_int8", "amx_bf16"} <= set(flags):
        assert "amx" in ISAS  # Linux grants the tile state since 5.16


@pytest.mark.parametrize("k", [100, 300, 2560, 3200, 6912])
@pytest.mark.parametrize("n", [1, 3, 4, 4097])
def test_gemm_and_bitlinear_bit_exact(n, k):
    codes, packed = weights(n, k)
    _native.set_num_threads(2)
    # every tile shape: 1, 2, 3 (7 = 4 + 3) and 4 tokens; AMX (12 or more): one 16-token tile,
    # 37 = two whole tiles and one of 5 tokens, and 100 = 4 tiles and 3 (with k up to 3200 in
    # one call, the second group of tiles reusing the codes the first unpacked; 6912: two calls)
    for t in (1, 2, 7, 16, 37, 100):
        x = activations(t, k, seed=t)
        x_q, _ = quant.quantize_activations(x)
        expected = exact_matmul(x_q, codes)
        y_expected = quant.ternary_linear_reference(x, codes, 1.555)
        for isa in ISAS:
            got = _native.ternary_gemm_i32(x_q, packed, n, k, isa=isa)
            assert got.dtype == np.int32 and got.shape == (t, n)
            np.testing.assert_array_equal(got, expected, err_msg=f"{isa} T={t}")
            y = _native.bitlinear(x, packed, 1.555, n, k, isa=isa)
            assert y.dtype == np.float32
            np.testing.assert_array_equal(y, y_expected, err_msg=f"{isa} T={t}")


@pytest.mark.parametrize("isa", ISAS)
def test_gemm_extreme_values_do_not_overflow(isa):
    """All-(-128) activations against all-(+1) and all-(-1) rows: the int16 sums of the AVX2
    path and the int32 sums everywhere stay exact."""
    n, k = 8, 6912
    codes = np.ones((n, k), dtype=np.int8)
    codes[1::2] = -1
    codes[4] = 0
    packed = packing.pack_ours(codes)
    x_q = np.full((5, k), -128, dtype=np.int8)
    x_q[1] = 127
    x_q[2, ::2] = 127
    np.testing.assert_array_equal(
        _native.ternary_gemm_i32(x_q, packed, n, k, isa=isa), exact_matmul(x_q, codes)
    )


@pytest.mark.parametrize("n,k", [(3, 300), (37, 2560), (100, 6912)])
def test_gated_bitlinear_bit_exact(n, k):
    """A feed-forward's gate act(x W_g^T) * (x W_u^T): on AMX (12 tokens or more) fused into the
    GEMM's store, elsewhere two GEMMs and a pass. ReLU² against numpy on every ISA; SwiGLU (its
    exp is the ISA's) on AMX against the AVX-512 pass, bit for bit, and numpy within 1e-6. n 3
    and 37: a partial 16-row pass (SwiGLU's scalar tail); 100 tokens: groups of token tiles that
    reuse the unpacked codes."""
    gate_codes, gate = weights(n, k)
    up_codes = weights(n + 1, k)[0][:n]  # other codes than the gate's
    up = packing.pack_ours(up_codes)
    for t in (5, 12, 37, 100):
        x = activations(t, k, seed=t)
        y_g = quant.ternary_linear_reference(x, gate_codes, 0.8)
        y_u = quant.ternary_linear_reference(x, up_codes, 1.3)
        r = np.maximum(y_g, np.float32(0))
        for isa in ISAS:
            got = _native.bitlinear(x, gate, 0.8, n, k, isa=isa, up=up, up_beta=1.3)
            np.testing.assert_array_equal(got, (r * r) * y_u, err_msg=f"{isa} T={t}")
        silu = y_g / (1 + np.exp(-y_g.astype(np.float64))) * y_u
        for isa in ISAS:
            got = _native.bitlinear(x, gate, 0.8, n, k, isa=isa, up=up, up_beta=1.3, gate="silu")
            np.testing.assert_allclose(got, silu, rtol=1e-6, atol=1e-6 * np.abs(silu).max())
        if "amx" in ISAS:
            np.testing.assert_array_equal(
                _native.bitlinear(x, gate, 0.8, n, k, isa="amx", up=up, up_beta=1.3, gate="silu"),
                _native.bitlinear(
                    x, gate, 0.8, n, k, isa="avx512", up=up, up_beta=1.3, gate="silu"
                ),
                err_msg=f"T={t}",
            )
    with pytest.raises(ValueError, match="gate must be"):
        _native.bitlinear(x, gate, 0.8, n, k, up=up, gate="gelu")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_do_not_change_results(threads):
    n, k = 4097, 2560
    codes, packed = weights(n, k)
    x = activations(9, k)
    _native.set_num_threads(threads)
    assert _native.get_num_threads() == threads
    np.testing.assert_array_equal(
        _native.bitlinear(x, packed, 0.75, n, k), quant.ternary_linear_reference(x, codes, 0.75)
    )


@pytest.mark.parametrize("k", [1, 15, 16, 17, 31, 32, 33, 100, 2560, 6913])
def test_quantize_activations_bit_exact(k):
    x = activations(6, k, seed=k)
    x[1] = 0  # all-zero row: s = 127 / 1e-5
    x[2] *= 1e-7  # amax below the 1e-5 floor
    expected_q, expected_s = quant.quantize_activations(x)
    for isa in ISAS:
        x_q, s = _native.quantize_activations(x, isa=isa)
        assert x_q.dtype == np.int8 and s.dtype == np.float32
        np.testing.assert_array_equal(x_q, expected_q, err_msg=isa)
        np.testing.assert_array_equal(s, expected_s, err_msg=isa)


def test_quantize_rounds_half_to_even():
    # amax 127 gives s = 1 exactly, so every .5 below is a tie; 40 values reach the SIMD body
    ties = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5], dtype=np.float32)
    x = np.concatenate([[127.0], np.tile(ties, 5)]).astype(np.float32)[None, :]
    expected = np.concatenate([[127], np.tile([0, 2, 2, 0, -2, -2, 126, -126], 5)])
    for isa in ISAS:
        x_q, s = _native.quantize_activations(x, isa=isa)
        assert s[0] == 1.0
        np.testing.assert_array_equal(x_q[0], expected, err_msg=isa)


@pytest.mark.parametrize("n", [1, 7, 8, 15, 16, 17, 1000])
def test_float_to_half_bit_exact(n):
    """The float16 KV cache's conversion against numpy's (round to nearest even): normals, ties,
    subnormals, underflow to zero, overflow to inf, signed zeros; lengths around both SIMD widths."""
    rng = np.random.default_rng(n)
    special = np.array(
        [0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, -1e9, np.inf, -np.inf, 6.1e-5, 6.0e-8,
         2.9e-8, 3.0e-8, 1e-40, 1.0 + 2**-11, 1.0 + 3 * 2**-11, -(2**-24) * 1.5],
        dtype=np.float32,
    )  # fmt: skip
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-9, 6, n)).astype(np.float32)
    x[: min(n, len(special))] = special[:n]
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    for isa in ISAS:
        got = _native.float_to_half(x, isa=isa)
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, want, err_msg=isa)


def test_float_to_half_nan_is_the_same_quiet_nan_on_every_isa():
    """NaN payloads (which numpy's conversion keeps differently) agree across ISAs: quieted, the
    top payload bits kept, sign kept."""
    bits = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFE000, 0xFFFFFFFF] * 4, np.uint32)
    x = bits.view(np.float32)
    want = (bits >> 16 & 0x8000) | 0x7E00 | (bits >> 13 & 0x1FF)
    for isa in ISAS:
        np.testing.assert_array_equal(_native.float_to_half(x, isa=isa), want, err_msg=isa)


def test_quantize_non_finite_agrees_across_isas():
    """numpy's int8 cast of NaN is unspecified; ours is -128 on every ISA, and a row holding a
    NaN has the scale NaN."""
    x = activations(3, 100)
    x[0, 5] = np.nan
    x[1, 40] = np.inf
    results = [_native.quantize_activations(x, isa=isa) for isa in ISAS]
    assert results[0][0][0, 5] == -128 and np.isnan(results[0][1][0])
    ref_q, ref_s = quant.quantize_activations(x[2:])
    for x_q, s in results:
        np.testing.assert_array_equal(x_q, results[0][0])
        np.testing.assert_array_equal(s, results[0][1])
        np.testing.assert_array_equal(x_q[2:], ref_q)
        np.testing.assert_array_equal(s[2:], ref_s)


def test_empty_batch_and_read_only_weights():
    codes, packed = weights(3, 300)
    read_only = packed.copy()
    read_only.setflags(write=False)  # as memory-mapped weights are
    x = activations(2, 300)
    np.testing.assert_array_equal(
        _native.bitlinear(x, read_only, 1.0, 3, 300),
        quant.ternary_linear_reference(x, codes, 1.0),
    )
    assert _native.ternary_gemm_i32(np.zeros((0, 300), np.int8), read_only, 3, 300).shape == (0, 3)
    assert _native.bitlinear(np.zeros((0, 300), np.float32), read_only, 1.0, 3, 300).shape == (0, 3)


def test_bad_inputs_raise():
    codes, packed = weights(3, 300)
    x = activations(2, 300)
    x_q, _ = quant.quantize_activations(x)
    with pytest.raises(TypeError):
        _native.bitlinear(x.astype(np.float64), packed, 1.0, 3, 300)
    with pytest.raises(TypeError):
        _native.ternary_gemm_i32(x_q.astype(np.int32), packed, 3, 300)
    with pytest.raises(TypeError):
        _native.ternary_gemm_i32(x_q, packed.view(np.int8), 3, 300)
    with pytest.raises(TypeError):  # not C-contiguous
        _native.quantize_activations(activations(2, 600)[:, ::2])
    with pytest.raises(TypeError):  # 1-D
        _native.quantize_activations(x[0])
    with pytest.raises(ValueError, match=r"shape \(2, 512\), got \(1, 512\)"):
        _native.ternary_gemm_i32(x_q, packed, 5, 300)  # 5 rows need 2 groups of 4
    with pytest.raises(ValueError, match="must have shape"):
        _native.bitlinear(x, packed[:, :256], 1.0, 3, 300)
    with pytest.raises(ValueError, match="columns"):
        _native.bitlinear(x[:, :200].copy(), packed, 1.0, 3, 300)
    with pytest.raises(ValueError, match=">= 1"):
        _native.ternary_gemm_i32(x_q, packed, 0, 300)
    with pytest.raises(ValueError, match="unknown ISA"):
        _native.bitlinear(x, packed, 1.0, 3, 300, isa="neon")
    with pytest.raises(ValueError):
        _native.set_num_threads(0)


def attention_reference(q, keys, values, n0, scale):
    """Causal softmax(q k^T * scale) v in float64: position i attends to the first n0 + i keys."""
    out = np.empty(q.shape)
    for i in range(q.shape[0]):
        s = q[i].astype(np.float64) @ keys[: n0 + i].astype(np.float64).T * scale
        p = np.exp(s - s.max(-1, keepdims=True))
        out[i] = (p / p.sum(-1, keepdims=True)) @ values[: n0 + i].astype(np.float64)
    return out


def attention_case(npos, group, d, n0, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((npos, group, d)).astype(np.float32)
    keys, values = rng.standard_normal((2, n0 + npos - 1, d)).astype(dtype)
    return q, keys, values


# (positions, heads per KV head, head dim, n0): one-token steps, runs that fill 16-row tiles or
# not, head dims off every vector and tile width, a run that starts mid-context
ATTENTION_SHAPES = [(1, 4, 128, 1), (1, 4, 128, 300), (3, 4, 64, 1), (16, 4, 128, 1),
                    (37, 1, 136, 5), (64, 3, 40, 100), (70, 8, 100, 33), (128, 4, 128, 1)]  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("npos,group,d,n0", ATTENTION_SHAPES)
def test_attention_matches_float64_reference(npos, group, d, n0, dtype):
    """Every ISA's attention within float32 rounding of a float64 reference; AMX's bf16 tiles
    (f16 caches, calls of 16 rows or more) within ~2^-16: queries and softmax weights carry 16
    significant bits there. Those calls differ from the FMA kernels' bits (the tiles ran)."""
    q, keys, values = attention_case(npos, group, d, n0, dtype)
    scale = 1 / np.sqrt(d)
    want = attention_reference(q, keys, values, n0, scale)
    tiles = dtype == np.float16 and npos * group >= 16
    for isa in ISAS:
        got = _native.attention(q, keys, values, n0, scale, isa=isa)
        tol = 3e-5 if isa == "amx" and tiles else 3e-6
        assert np.abs(got - want).max() <= tol * np.abs(want).max(), isa
    if "amx" in ISAS and tiles:
        fma = _native.attention(q, keys, values, n0, scale, isa="avx512")
        assert not np.array_equal(_native.attention(q, keys, values, n0, scale, isa="amx"), fma)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("npos,group", [(40, 4), (20, 1)])
def test_attention_keeps_a_non_finite_position_from_earlier_ones(npos, group, bad):
    """A NaN or infinite key and value at one position reach only the positions that attend to
    it, on every ISA (AMX's tiles multiply later positions' values by zero weights)."""
    n0, at = 3, 20  # key and value 20: query i attends to n0 + i keys, so from i = 18 on
    q, keys, values = attention_case(npos, group, 64, n0, np.float16, seed=1)
    keys[at, 5] = values[at, 7] = bad
    for isa in ISAS:
        out = _native.attention(q, keys, values, n0, 0.125, isa=isa)
        first = at - n0 + 1  # the first position whose n0 + i keys include it
        assert np.isfinite(out[:first]).all(), isa
        assert not np.isfinite(out[first:]).all(), isa


def test_attention_bad_inputs_raise():
    q, keys, values = attention_case(4, 2, 32, 3, np.float16)
    with pytest.raises(ValueError, match="must have shape"):
        _native.attention(q, keys[:-1], values, 3, 0.1)
    with pytest.raises(TypeError, match="same dtype"):
        _native.attention(q, keys, values.astype(np.float32), 3, 0.1)
    with pytest.raises(ValueError, match="n0 >= 1"):
        _native.attention(q, keys, values, 0, 0.1)
    with pytest.raises(TypeError):
        _native.attention(q.astype(np.float64), keys, values, 3, 0.1)


def run_with_isa(value):
    env = {**os.environ, "BITNET158_ISA": value}
    code = "from bitnet158 import _native; print(_native.isa())"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("isa", ISAS)
def test_env_var_forces_isa(isa):
    result = run_with_isa(isa)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == isa


def test_env_var_rejects_unknown_isa():
    result = run_with_isa("sse9")
    assert result.returncode != 0
    assert "BITNET158_ISA=sse9" in result.stderr


def test_threads_work_in_a_forked_child():
    """fork() copies only the calling thread: the child must build its own workers, not hang."""
    codes, packed = weights(4097, 2560)
    x = activations(3, 2560)
    _native.set_num_threads(2)
    expected = _native.bitlinear(x, packed, 1.0, 4097, 2560)
    pid = os.fork()
    if pid == 0:  # child: report through the exit status only
        ok = np.array_equal(_native.bitlinear(x, packed, 1.0, 4097, 2560), expected)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_concurrent_python_threads():
    """The GIL is released during compute; concurrent calls share the pool safely."""
    from concurrent.futures import ThreadPoolExecutor

    codes, packed = weights(4097, 2560)
    inputs = [activations(t, 2560, seed=t) for t in (1, 2, 5, 8)]
    expected = [quant.ternary_linear_reference(x, codes, 0.5) for x in inputs]
    _native.set_num_threads(2)
    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(lambda x: _native.bitlinear(x, packed, 0.5, 4097, 2560), inputs * 5)
        )
    for got, want in zip(results, expected * 5, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("isa", ISAS)
def test_multiply_add_rate_bounds_the_gemm(isa):
    """The prefill ceiling `bitnet158 bench` prints: the ISA's GEMM, timed on a prefill-sized
    batch, never multiplies faster than its multiply instruction runs alone from registers
    (the faster of two probes, and a 1.5x margin for a shared machine's minute); the scalar ISA
    has no ceiling (0)."""
    import time

    _native.set_num_threads(2)
    rate = _native.multiply_add_rate(0.1, isa=isa)
    if isa == "scalar":
        assert rate == 0.0
        return
    n, k, t = 3072, 2560, 64
    _, packed = weights(n, k)
    x_q = np.random.default_rng(1).integers(-128, 128, size=(t, k)).astype(np.int8)
    _native.ternary_gemm_i32(x_q, packed, n, k, isa=isa)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        _native.ternary_gemm_i32(x_q, packed, n, k, isa=isa)
        times.append(time.perf_counter() - t0)
    rate = max(rate, _native.multiply_add_rate(0.1, isa=isa))  # the faster of two minutes
    assert 0 < t * n * k / min(times) < 1.5 * rate


def test_multiply_add_rate_refuses_bad_durations():
    for seconds in (0.0, -1.0, float("nan"), 61.0):
        with pytest.raises(ValueError, match="seconds"):
            _native.multiply_add_rate(seconds)
