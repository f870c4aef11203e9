"""BatchNorm statistics far from identity, for measuring folds.

A freshly initialised BatchNorm has running mean 0, variance 1, γ 1 and β 0, so it computes (almost) the identity and
a fold that drops or misplaces it still passes every comparison. The census and the tests move every statistic away
from identity first, with one seeded draw, so that a wrong fold shows up as a large difference.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def perturb_batchnorms_(model: nn.Module, seed: int = 0) -> int:
    """Give every BatchNorm with running statistics a non-trivial mean, variance, γ and β; the count changed."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(0.3 * torch.randn(n, generator=gen) + 0.1)
                m.running_var.copy_(0.3 + 1.5 * torch.rand(n, generator=gen))
                if m.weight is not None:
                    m.weight.copy_(1 + 0.3 * torch.randn(n, generator=gen))
                    m.bias.copy_(0.1 + 0.2 * torch.randn(n, generator=gen))
                count += 1
    return count
