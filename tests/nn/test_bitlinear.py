"""BitLinear: forward equals the quantized math, gradients follow the straight-through estimator."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitnet158 import quant
from bitnet158.nn import bitlinear
from bitnet158.nn.bitlinear import BitLinear, set_lambda


def test_forward_matches_numpy_integer_reference():
    torch.manual_seed(0)
    layer = BitLinear(48, 20)
    x = torch.randn(3, 5, 48)
    y = layer(x).detach().numpy()
    codes, beta = quant.quantize_weights(layer.weight.detach().numpy())
    ref = quant.ternary_linear_reference(x.numpy().reshape(15, 48), codes, beta).reshape(3, 5, 20)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_straight_through_gradients_hand_derived():
    """With the STE, dL/dx = dL/dy @ W_q and dL/dW = dL/dy^T @ x_q (quantized values, identity Jacobian)."""
    torch.manual_seed(1)
    layer = BitLinear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    g = torch.randn(4, 8)
    layer(x).backward(g)
    codes, beta = quant.quantize_weights(layer.weight.detach().numpy())
    x_q, s = quant.quantize_activations(x.detach().numpy())
    w_q = codes.astype(np.float32) * beta
    xd = x_q.astype(np.float32) / s[:, None]
    np.testing.assert_allclose(x.grad.numpy(), g.numpy() @ w_q, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.weight.grad.numpy(), g.numpy().T @ xd, rtol=1e-5, atol=1e-6)


def test_lambda_zero_is_full_precision_and_inner_norm():
    torch.manual_seed(2)
    layer = BitLinear(16, 8, inner_norm=True)
    layer.lam = 0.0
    x = torch.randn(2, 16) * 5
    xn = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(layer(x), xn @ layer.weight.T)


def test_fixed_beta_keeps_a_stored_scale():
    layer = BitLinear(8, 4)
    codes = torch.tensor([[1, 0, -1, 0, 0, 0, 1, 0]] * 4, dtype=torch.float32)
    with torch.no_grad():
        layer.weight.copy_(codes * 0.7)
    layer.fixed_beta = torch.tensor(0.7)
    got_codes, got_beta = layer.ternary()
    assert torch.equal(got_codes, codes.to(torch.int8)) and got_beta.item() == np.float32(0.7)


def _autograd_reference(layer: BitLinear, x: torch.Tensor) -> torch.Tensor:
    """BitLinear written as plain autograd (the STE through `.detach()`), as the papers print it."""
    x = x.float()
    codes, s = bitlinear.quantize_activations(x)
    x_q = x + layer.lam * (codes / s - x).detach()
    w = layer.weight.float()
    w_codes, beta = bitlinear.quantize_weights(w)
    w_q = w + layer.lam * (w_codes * beta - w).detach()
    return F.linear(x_q, w_q)


@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_fused_forward_and_backward_equal_the_autograd_formulation_bit_for_bit(lam):
    torch.manual_seed(3)
    layer = BitLinear(40, 24)
    layer.lam = lam
    x1 = torch.randn(2, 7, 40, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = torch.randn(2, 7, 24)
    y1 = layer(x1)
    y1.backward(g)
    grad_w = layer.weight.grad.clone()
    layer.weight.grad = None
    y2 = _autograd_reference(layer, x2)
    y2.backward(g)
    assert torch.equal(y1, y2)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(grad_w, layer.weight.grad)


def test_lambda_mixes_the_quantization_error_and_keeps_straight_through_gradients():
    """y = (x + λ(q_a(x) − x)) · (W + λ(q_w(W) − W))^T; dL/dx, dL/dW use those mixed operands."""
    torch.manual_seed(4)
    layer = BitLinear(16, 8)
    layer.lam = 0.25
    x = torch.randn(5, 16, requires_grad=True)
    g = torch.randn(5, 8)
    y = layer(x)
    y.backward(g)
    w = layer.weight.detach().numpy()
    codes, beta = quant.quantize_weights(w)
    x_q, s = quant.quantize_activations(x.detach().numpy())
    xm = x.detach().numpy() + 0.25 * (x_q / s[:, None] - x.detach().numpy())
    wm = w + 0.25 * (codes * beta - w)
    np.testing.assert_allclose(y.detach().numpy(), xm @ wm.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x.grad.numpy(), g.numpy() @ wm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.weight.grad.numpy(), g.numpy().T @ xm, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_multiplies_the_quantized_operands_in_bf16():
    torch.manual_seed(5)
    layer = BitLinear(32, 16)
    x = torch.randn(3, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        ref = _autograd_reference(layer, x)  # F.linear under autocast casts both operands
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32


def test_a_bf16_input_gives_a_bf16_output_outside_autocast():
    layer = BitLinear(8, 4).to(torch.bfloat16)
    y = layer(torch.randn(2, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_set_lambda_reaches_every_bitlinear_and_checks_its_range():
    model = torch.nn.Sequential(BitLinear(4, 4), torch.nn.ReLU(), BitLinear(4, 2))
    set_lambda(model, 0.5)
    assert [m.lam for m in model if isinstance(m, BitLinear)] == [0.5, 0.5]
    with pytest.raises(ValueError):
        set_lambda(model, 1.5)
