"""quant.py (numpy) against hand-computed cases and against the torch twins, bit for bit."""

import numpy as np
import pytest
import torch

from bitnet158 import quant
from bitnet158.nn import bitlinear


def test_weight_quant_hand_computed():
    w = np.array([[0.5, -1.0, 0.0], [2.0, -0.25, 0.25]], dtype=np.float32)
    codes, beta = quant.quantize_weights(w)
    assert beta == np.float32(4.0 / 6.0)  # mean |W|
    # W / beta = [0.75, -1.5, 0, 3, -0.375, 0.375] -> round, clip
    assert codes.tolist() == [[1, -1, 0], [1, 0, 0]]
    assert codes.dtype == np.int8


def test_round_half_to_even_and_floors():
    # beta = 1 -> codes = round(W): 0.5 -> 0 and -0.5 -> 0 (half to even), 1.5 -> 2 -> clipped to 1
    w = np.array([[0.5, -0.5, 1.5, -1.5, 1.0, -1.0, 1.0, 1.0]], dtype=np.float32)
    codes, beta = quant.quantize_weights(w)
    assert beta == 1.0
    assert codes.tolist() == [[0, 0, 1, -1, 1, -1, 1, 1]]
    zero_codes, zero_beta = quant.quantize_weights(np.zeros((2, 2), np.float32))
    assert zero_beta == np.float32(1e-5) and not zero_codes.any()
    x_q, s = quant.quantize_activations(np.zeros((1, 4), np.float32))
    assert s[0] == np.float32(1 / np.float32(1e-5)) * np.float32(127) and not x_q.any()


def test_activation_quant_hand_computed():
    x = np.array([[1.0, -2.0, 0.5, 127 / 254 * 2]], dtype=np.float32)
    x_q, s = quant.quantize_activations(x)
    assert s[0] == np.float32(127 / 2)
    assert x_q.tolist() == [[64, -127, 32, 64]]  # 63.5 -> 64 (even), 31.75 -> 32, 63.5 -> 64


@pytest.mark.parametrize("shape", [(7, 13), (64, 300), (3, 4097)])
def test_numpy_and_torch_agree_exactly(shape):
    rng = np.random.default_rng(sum(shape))
    w = rng.standard_normal(shape).astype(np.float32) * 0.02
    x = rng.standard_normal(shape).astype(np.float32) * 3
    codes, beta = quant.quantize_weights(w)
    t_codes, t_beta = bitlinear.quantize_weights(torch.from_numpy(w))
    assert np.float32(t_beta.item()) == beta
    np.testing.assert_array_equal(t_codes.numpy().astype(np.int8), codes)
    x_q, s = quant.quantize_activations(x)
    t_xq, t_s = bitlinear.quantize_activations(torch.from_numpy(x))
    np.testing.assert_array_equal(t_xq.numpy().astype(np.int8), x_q)
    np.testing.assert_array_equal(t_s.numpy()[:, 0], s)


def test_ternary_linear_reference_matches_dequantized_float_math():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((33, 70)).astype(np.float32)
    x = rng.standard_normal((5, 70)).astype(np.float32)
    codes, beta = quant.quantize_weights(w)
    x_q, s = quant.quantize_activations(x)
    expected = (x_q.astype(np.float64) / s[:, None]) @ (codes.astype(np.float64) * beta).T
    got = quant.ternary_linear_reference(x, codes, beta)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_non_finite_weights_have_no_scale():
    for bad in (np.nan, np.inf, -np.inf):
        w = np.ones((3, 4), np.float32)
        w[1, 2] = bad
        with pytest.raises(ValueError, match="1 of 12 weights are NaN or infinite"):
            quant.quantize_weights(w)


def test_non_finite_activations_hand_computed():
    """The definition the native kernels share: a row holding a NaN gets s = NaN (torch's absmax
    propagates it) and codes -128, an inf makes the row's scale 0 (finite values -> 0, the inf
    -> -128)."""
    nan, inf = np.float32(np.nan), np.float32(np.inf)
    x = np.array(
        [[1.0, nan, -2.0, 0.5], [inf, 1.0, -1.0, 0.0], [nan, nan, nan, nan], [-inf, 2, 0, 0]],
        dtype=np.float32,
    )
    x_q, s = quant.quantize_activations(x)
    assert np.isnan(s[0]) and np.isnan(s[2]) and s[[1, 3]].tolist() == [0.0, 0.0]
    assert x_q.tolist() == [[-128] * 4, [-128, 0, 0, 0], [-128] * 4, [-128, 0, 0, 0]]
    y = quant.ternary_linear_reference(x, np.array([[1, 0, 0, 0], [0, 1, 0, 0]], np.int8), 0.5)
    # NaN rows are NaN everywhere; an inf row divides by s = 0: -128/0 = -inf, 0/0 = NaN
    assert np.isnan(y[[0, 2]]).all() and y[1, 0] == -np.inf and np.isnan(y[1, 1])


def test_nan_rows_are_nan_as_in_torch():
    """The torch twin (training) and numpy agree on which outputs a NaN makes NaN: its row's."""
    x = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    x[1, 7] = np.nan
    codes = np.random.default_rng(1).integers(-1, 2, (5, 40)).astype(np.int8)
    y = quant.ternary_linear_reference(x, codes, 0.7)
    x_t = torch.from_numpy(x)
    s = 127.0 / x_t.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    want = ((x_t * s).round().clamp(-128, 127) / s) @ (torch.from_numpy(codes).float() * 0.7).T
    np.testing.assert_array_equal(np.isnan(y), np.isnan(want.numpy()))
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()
