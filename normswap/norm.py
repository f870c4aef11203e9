"""The RMSNorm module that converted models run with.

Parameters are named ``weight`` and ``bias`` exactly like ``nn.LayerNorm`` so a converted model's state_dict keeps
the stock key names and an exact conversion reloads in the stock transformers class.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from normswap.kernels import rms_norm


class RMSNorm(nn.Module):
    """RMSNorm with an optional bias: ``y = x / sqrt(mean(x**2) + eps) * weight + bias``.

    On a zero-mean input this equals ``nn.LayerNorm`` with the same gain, bias and eps, which is the identity
    normswap's exact conversions rely on.
    """

    def __init__(
        self,
        normalized_shape: int | tuple[int, ...],
        eps: float = 1e-5,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        elementwise_affine: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (int(normalized_shape),)
        self.normalized_shape = tuple(normalized_shape)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"RMSNorm normalises over the last dimension only; got shape {self.normalized_shape}")
        self.eps = float(eps)
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, **factory))
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_layernorm(cls, ln: nn.LayerNorm) -> RMSNorm:
        """An RMSNorm sharing ``ln``'s parameters (no copy), so swapping modules never duplicates memory."""
        shape = tuple(ln.normalized_shape)
        weight = getattr(ln, "weight", None)
        bias = getattr(ln, "bias", None)
        ref = weight if weight is not None else None
        new = cls(
            shape,
            eps=ln.eps,
            bias=bias is not None,
            elementwise_affine=weight is not None,
            device=ref.device if ref is not None else None,
            dtype=ref.dtype if ref is not None else None,
        )
        if weight is not None:
            new.weight = weight
        if bias is not None:
            new.bias = bias
        new.train(ln.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, bias={self.bias is not None}"


class CenteredRMSNorm(RMSNorm):
    """RMSNorm whose output is re-centred to zero mean.

    Used for a norm that *writes* into the residual stream (BLOOM's ``word_embeddings_layernorm``): its output
    ``γ·x̂ + β`` is not zero-mean, and every later RMSNorm needs a zero-mean stream. Subtracting the output mean
    keeps the stock LayerNorm keys (so the stock class still loads the checkpoint, where downstream LayerNorms
    remove that mean anyway) at the cost of one mean over the hidden dim per token, once per forward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y - y.mean(dim=-1, keepdim=True)
