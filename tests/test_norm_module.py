"""The public RMSNorm module: the LayerNorm identity on zero-mean inputs, parameter sharing, stock key names."""

import pytest
import torch
from torch import nn

import normswap
from normswap import CenteredRMSNorm, RMSNorm


def test_signature_and_defaults():
    n = RMSNorm(64, 1e-6, False, "cpu", torch.float64)
    assert n.eps == 1e-6 and n.bias is None and n.weight.dtype == torch.float64 and n.normalized_shape == (64,)
    assert set(dict(RMSNorm(8).named_parameters())) == {"weight", "bias"}


@pytest.mark.parametrize("bias", [True, False])
def test_equals_layernorm_on_zero_mean_input(bias):
    torch.manual_seed(0)
    ln = nn.LayerNorm(96, eps=1e-5, bias=bias).double()
    with torch.no_grad():
        ln.weight.copy_(1 + 0.3 * torch.randn(96))
        if bias:
            ln.bias.copy_(0.2 * torch.randn(96))
    x = torch.randn(3, 7, 96, dtype=torch.float64) * 2 + 0.5
    x = x - x.mean(-1, keepdim=True)
    rms = RMSNorm.from_layernorm(ln)
    torch.testing.assert_close(rms(x), ln(x), rtol=1e-12, atol=1e-12)
    # on a non-centred input the two differ: the identity really needs the zero mean
    assert float((rms(x + 1.0) - ln(x + 1.0)).detach().abs().max()) > 1e-2


def test_from_layernorm_shares_parameters_and_keys():
    ln = nn.LayerNorm(16)
    rms = RMSNorm.from_layernorm(ln)
    assert rms.weight is ln.weight and rms.bias is ln.bias
    assert list(rms.state_dict()) == list(ln.state_dict())
    no_affine = RMSNorm.from_layernorm(nn.LayerNorm(16, elementwise_affine=False))
    assert no_affine.weight is None
    x = torch.randn(4, 16)
    x = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(no_affine(x), nn.functional.layer_norm(x, (16,)), rtol=1e-5, atol=1e-5)


def test_centered_rmsnorm_output_is_zero_mean():
    ln = nn.LayerNorm(32)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.fill_(0.7)
    x = torch.randn(5, 32)
    y = CenteredRMSNorm.from_layernorm(ln)(x - x.mean(-1, keepdim=True))
    assert float(y.detach().mean(-1).abs().max()) < 1e-5
    assert normswap.RMSNorm is RMSNorm
