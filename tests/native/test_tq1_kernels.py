"""The 1.6-bit ternary GEMM (`_native.ternary_gemm_tq1_i32`) against numpy and the 2-bit kernel.

References: an exact integer matmul of the original ternary codes (float64 BLAS: every partial
sum is an integer far below 2^53) and `_native.ternary_gemm_i32` over `packing.pack_ours` of the
same codes. Every ISA this CPU runs must give both, bit for bit.
"""

import functools

import numpy as np
import pytest
from native_fixtures import exact_matmul

from bitnet158 import _native, packing

ISAS = _native.available_isas()


@functools.lru_cache(maxsize=4)
def weights(n, k):
    codes = np.random.default_rng(n * 31 + k).integers(-1, 2, size=(n, k)).astype(np.int8)
    return codes, packing.pack_ours_tq1(codes), packing.pack_ours(codes)


def int8_activations(t, k, seed):
    x = np.random.default_rng(seed).integers(-128, 128, size=(t, k)).astype(np.int8)
    x[0, :5] = [-128, 127, -128, 127, 0]
    return x


@pytest.mark.parametrize("k", [100, 300, 2560, 6912])
@pytest.mark.parametrize("n", [1, 3, 4, 4097])
def test_tq1_gemm_equals_numpy_and_the_2bit_kernel(n, k):
    codes, packed, packed_2bit = weights(n, k)
    _native.set_num_threads(2)
    # every tile: one token, two, 4 + 3; from 8 tokens the AVX-512 kernel decodes each group
    # once (tails of 2 and 3 tokens at 10 and 11); 37 tokens: the AMX GEMM's tiles (16 + 16 + 5)
    for t in (1, 2, 7, 10, 11, 37) if n * k <= 4 << 20 else (1, 2, 7, 11):
        x_q = int8_activations(t, k, seed=t)
        expected = exact_matmul(x_q, codes)
        for isa in ISAS:
            got = _native.ternary_gemm_tq1_i32(x_q, packed, n, k, isa=isa)
            assert got.dtype == np.int32 and got.shape == (t, n)
            np.testing.assert_array_equal(got, expected, err_msg=f"{isa} T={t}")
            two_bit = _native.ternary_gemm_i32(x_q, packed_2bit, n, k, isa=isa)
            np.testing.assert_array_equal(got, two_bit, err_msg=f"{isa} T={t}")


@pytest.mark.parametrize("isa", ISAS)
def test_tq1_extreme_values_do_not_overflow(isa):
    """All-(-128) and all-127 activations against rows of +1, -1 and 0 on the longest K: the
    accumulators of 4x and 16x scaled products stay exact (5 tokens: tiles of the packed bytes;
    9: the decoded codes, k in slices)."""
    n, k = 8, 6912
    codes = np.ones((n, k), dtype=np.int8)
    codes[1::2] = -1
    codes[4] = 0
    x_q = np.full((9, k), -128, dtype=np.int8)
    x_q[1::3] = 127
    x_q[2::3, ::2] = 127
    for t in (5, 9):
        got = _native.ternary_gemm_tq1_i32(x_q[:t], packing.pack_ours_tq1(codes), n, k, isa=isa)
        np.testing.assert_array_equal(got, exact_matmul(x_q[:t], codes))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_tq1_threads_do_not_change_results(threads):
    n, k = 4097, 2560
    codes, packed, _ = weights(n, k)
    x_q = int8_activations(9, k, seed=5)
    _native.set_num_threads(threads)
    np.testing.assert_array_equal(
        _native.ternary_gemm_tq1_i32(x_q, packed, n, k), exact_matmul(x_q, codes)
    )


def test_tq1_bytes_the_packer_never_writes_give_the_same_result_on_every_isa():
    """Arbitrary bytes (the 13 unused codes included) are decoded alike by every kernel."""
    rng = np.random.default_rng(7)
    n, k = 9, 650
    packed = rng.integers(0, 256, size=packing.ours_tq1_packed_shape(n, k), dtype=np.uint8)
    packed[0, :256] = np.arange(256)
    x_q = int8_activations(5, k, seed=8)
    results = [_native.ternary_gemm_tq1_i32(x_q, packed, n, k, isa=isa) for isa in ISAS]
    for isa, got in zip(ISAS, results, strict=True):
        np.testing.assert_array_equal(got, results[0], err_msg=isa)


def test_tq1_kernel_follows_the_cpu():
    flags = open("/proc/cpuinfo").read().split() if "avx512" in ISAS else []
    assert _native.tq1_kernel("scalar") == "scalar"
    if "avx2" in ISAS:
        assert _native.tq1_kernel("avx2") == "scalar"  # no AVX2 kernel of its own
    if "avx512" in ISAS:
        assert _native.tq1_kernel("avx512") == ("avx512" if "avx512vbmi" in flags else "scalar")


def bad_arguments(n=5, k=300):
    """(description, x_q, packed_tq1, packed_2bit, n, k) that both GEMM bindings must refuse."""
    codes, packed, packed_2bit = weights(n, k)
    x_q = int8_activations(2, k, seed=0)
    wide = np.zeros((2, 2 * k), dtype=np.int8)
    return [
        ("float activations", x_q.astype(np.float32), packed, packed_2bit, n, k),
        ("int16 weights", x_q, packed.astype(np.int16), packed_2bit.astype(np.int16), n, k),
        ("1-D activations", x_q[0], packed, packed_2bit, n, k),
        ("strided activations", wide[:, ::2], packed, packed_2bit, n, k),
        ("strided weights", x_q, packed[::-1], packed_2bit[::-1], n, k),
        ("k not x_q's width", x_q, packed, packed_2bit, n, k + 1),
        ("weights of another n", x_q, packed, packed_2bit, n + 4, k),
        ("n = 0", x_q, packed, packed_2bit, 0, k),
    ]


@pytest.mark.parametrize("case", range(8))
def test_tq1_refuses_what_the_2bit_binding_refuses(case):
    what, x_q, packed, packed_2bit, n, k = bad_arguments()[case]
    with pytest.raises((TypeError, ValueError)) as theirs:
        _native.ternary_gemm_i32(x_q, packed_2bit, n, k)
    with pytest.raises(type(theirs.value)) as ours:
        _native.ternary_gemm_tq1_i32(x_q, packed, n, k)
    assert type(ours.value) is type(theirs.value), what
    names = {"x_q", "packed", "n and k"}
    assert any(name in str(ours.value) for name in names), (what, str(ours.value))


def test_tq1_refuses_2bit_weights_and_unknown_isas():
    _, _, packed_2bit = weights(5, 300)
    x_q = int8_activations(1, 300, seed=1)
    with pytest.raises(ValueError, match=r"packed \(1.6-bit weights.*\(2, 256\)"):
        _native.ternary_gemm_tq1_i32(x_q, packed_2bit, 5, 300)
    with pytest.raises(ValueError, match="ISA"):
        _native.ternary_gemm_tq1_i32(x_q, packed_2bit, 5, 300, isa="neon")
