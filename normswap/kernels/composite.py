"""Reference RMSNorm built from stock PyTorch ops: always available, autograd-correct, the fallback of last resort."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_composite(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """``F.rms_norm`` plus an optional bias.

    Low-precision inputs are normalised in float32 and cast back once, because rounding ``x / rms`` to bf16 before
    the gain multiply measurably loses accuracy against the float64 formula.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        y = F.rms_norm(x.float(), (x.shape[-1],), None, eps)
        if weight is not None:
            y = y * weight.float()
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)
    y = F.rms_norm(x, (x.shape[-1],), weight, eps)
    if bias is not None:
        y = y + bias
    return y
