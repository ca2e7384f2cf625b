"""BitLinear: forward equals the quantized math, gradients follow the straight-through estimator."""

import numpy as np
import torch

from bitnet158 import quant
from bitnet158.nn.bitlinear import BitLinear


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
