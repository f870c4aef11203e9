"""Pure tensor maths of the conversion, in float64. No modules, no files: tensors in, tensors out.

Centring removes, from every vector a writer adds to the residual stream, its mean over the hidden dimension.
Which axis is the hidden one depends on the weight layout, so every function takes the layout name.
"""

from __future__ import annotations

import torch

#: Axis of the hidden (residual-stream) dimension in each writer layout's weight tensor.
HIDDEN_AXIS = {"linear": 0, "conv1d": -1, "embedding": -1, "conv2d": 0, "conv": 0, "param": -1}


def center(t: torch.Tensor, axis: int) -> torch.Tensor:
    """``t`` minus its mean along ``axis``, computed in float64 and returned in float64."""
    t64 = t.detach().to(torch.float64)
    return t64 - t64.mean(dim=axis, keepdim=True)


def center_scaled(t: torch.Tensor, axis: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` times a LayerScale ``scale`` (indexed along ``axis``, the hidden one), then centred along ``axis``.

    Folding the scale first matters: ``λ ⊙ centre(W)`` is not zero-mean, ``centre(λ ⊙ W)`` is. float64 in and out.
    """
    t64 = t.detach().to(torch.float64)
    if scale is not None:
        shape = [1] * t64.dim()
        shape[axis] = -1
        t64 = t64 * scale.detach().to(torch.float64).reshape(shape)
    return t64 - t64.mean(dim=axis, keepdim=True)


def center_weight(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """A writer weight whose every output vector is zero-mean along the hidden dimension (float64)."""
    try:
        axis = HIDDEN_AXIS[layout]
    except KeyError:
        raise ValueError(f"unknown weight layout {layout!r}; expected one of {sorted(HIDDEN_AXIS)}") from None
    return center(weight, axis)


def center_bias(bias: torch.Tensor) -> torch.Tensor:
    """A writer bias (shape [hidden]) made zero-mean (float64)."""
    return center(bias, -1)


def hidden_mean_ratio(x: torch.Tensor) -> torch.Tensor:
    """Per-vector |mean| / rms along the last dimension: ~1e-8 for a centred stream, ≥1e-2 for a raw one."""
    x64 = x.detach().to(torch.float64)
    mean = x64.mean(dim=-1)
    rms = x64.pow(2).mean(dim=-1).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    return mean.abs() / rms


def fold_bias_into_reader(
    reader_weight: torch.Tensor, reader_bias: torch.Tensor, norm_bias: torch.Tensor, layout: str
) -> torch.Tensor:
    """New reader bias ``b + W·β`` so the norm's bias β can be set to zero (float64)."""
    w = reader_weight.detach().to(torch.float64)
    beta = norm_bias.detach().to(torch.float64)
    b = reader_bias.detach().to(torch.float64)
    if layout == "linear":  # W [out, in]
        return b + w @ beta
    if layout == "conv1d":  # W [in, out]
        return b + beta @ w
    raise ValueError(f"cannot fold into a reader with layout {layout!r}")


def fold_gain_into_reader(reader_weight: torch.Tensor, norm_weight: torch.Tensor, layout: str) -> torch.Tensor:
    """New reader weight ``W·diag(γ)`` so the norm's gain γ can be set to one (float64)."""
    w = reader_weight.detach().to(torch.float64)
    gamma = norm_weight.detach().to(torch.float64)
    if layout == "linear":
        return w * gamma[None, :]
    if layout == "conv1d":
        return w * gamma[:, None]
    raise ValueError(f"cannot fold into a reader with layout {layout!r}")


def ln_as_rms_error_bound(x: torch.Tensor, eps: float) -> float:
    """Max relative difference between LayerNorm and RMSNorm on ``x`` (both without affine), float64.

    Used by inspect/verify to express how far a norm input is from the zero-mean case the swap assumes.
    """
    x64 = x.detach().to(torch.float64)
    ln = torch.nn.functional.layer_norm(x64, (x64.shape[-1],), eps=eps)
    rms = torch.nn.functional.rms_norm(x64, (x64.shape[-1],), eps=eps)
    return float((ln - rms).abs().max() / ln.abs().max().clamp_min(1e-30))
