"""The float64 arithmetic of folding an inference-mode BatchNorm into the conv/linear that produces its input.

At inference ``BN(y) = (y − μ)·s + β`` with ``s = γ/√(var + eps)``, an affine map per channel, and ``y = W·x + b``
is linear per output channel, so ``BN(conv(x)) = conv'(x)`` with ``W' = W·s`` (row by row) and
``b' = (b − μ)·s + β``. Nothing is approximated; only the final cast back to the model's dtype rounds.

The *stored* form keeps every key a stock class expects: the BatchNorm stays, turned into ``BN(x) = x + c`` by
``running_mean = 0, running_var = 1 − eps, weight = 1``, so the stock class loads the checkpoint and computes the
folded function. The shift ``b'`` goes into the producer's bias when it has one (``c = 0``), else the BatchNorm
carries it (``c = b'``; with ``affine=False`` it has no bias, so ``running_mean = −b'`` carries it). The *runtime*
form (:func:`normswap.publish.modeling_normswap.fold_saved_batchnorms_`) then removes the BatchNorm altogether.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def unit_running_var(eps: float, dtype: torch.dtype) -> torch.Tensor:
    """``1 − eps`` in ``dtype``, nudged so that ``var + eps`` rounds to exactly 1 there (so BN's ``1/√`` is 1)."""
    v = torch.tensor(1.0 - eps, dtype=torch.float64).to(dtype)
    for _ in range(4):
        total = v + torch.tensor(eps, dtype=dtype)
        if total == 1:
            break
        v = torch.nextafter(v, torch.tensor(0.0 if total > 1 else 2.0, dtype=dtype))
    return v


def batchnorm_affine(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` in float64 with ``BN(y) = y·s + t`` per channel (inference semantics: running statistics)."""
    mean = bn.running_mean.detach().double()
    var = bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    s = gamma / torch.sqrt(var + bn.eps)
    return s, beta - mean * s


def _scaled_weight(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Scale output channel ``o`` (dim 0 for Linear and non-transposed convs, groups included) by ``s[o]``."""
    return weight.detach().double() * s.view(-1, *([1] * (weight.dim() - 1)))


@torch.no_grad()
def fold_into_stored_form_(producer: nn.Module, bn: _BatchNorm) -> None:
    """Fold ``bn`` into ``producer`` and leave ``bn`` as ``x + c`` (stock keys, stock class computes the same)."""
    s, t = batchnorm_affine(bn)
    bias = producer.bias.detach().double() if producer.bias is not None else torch.zeros_like(s)
    shift = bias * s + t
    producer.weight.copy_(_scaled_weight(producer.weight, s).to(producer.weight.dtype))
    carried = torch.zeros_like(shift)
    if producer.bias is not None:
        producer.bias.copy_(shift.to(producer.bias.dtype))
    else:
        carried = shift
    dtype = bn.running_var.dtype
    bn.running_var.fill_(unit_running_var(bn.eps, dtype).item())
    if bn.weight is not None:
        bn.weight.fill_(1.0)
    if bn.bias is not None:
        bn.running_mean.zero_()
        bn.bias.copy_(carried.to(bn.bias.dtype))
    else:
        bn.running_mean.copy_((-carried).to(bn.running_mean.dtype))
