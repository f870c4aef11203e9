"""The RMSNorm module that converted models run with.

Parameters are named ``weight`` and ``bias`` exactly like ``nn.LayerNorm`` so a converted model's state_dict keeps
the stock key names and an exact conversion reloads in the stock transformers class.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from normswap.kernels import rms_norm

#: Attribute names a LayerNorm-like class may keep its epsilon under (nn.LayerNorm, Cohere, TF ports).
EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps")
#: F.layer_norm's default, used by parameter-free classes that hard-code it (OlmoLayerNorm).
DEFAULT_EPS = 1e-5


def norm_eps(norm: nn.Module) -> float:
    """The epsilon of a LayerNorm-like module, whatever attribute its class keeps it under."""
    for attr in EPS_ATTRIBUTES:
        value = getattr(norm, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return DEFAULT_EPS


def norm_shape(norm: nn.Module) -> tuple[int, ...]:
    """The normalised shape of a LayerNorm-like module (attribute, else its gain's shape)."""
    shape = getattr(norm, "normalized_shape", None)
    if shape is None:
        weight = getattr(norm, "weight", None)
        if weight is None:
            raise ValueError(f"cannot tell the normalised size of a {type(norm).__name__}: no normalized_shape, "
                             "no weight")
        shape = tuple(weight.shape)
    return (int(shape),) if isinstance(shape, numbers.Integral) else tuple(int(d) for d in shape)


def is_rmsnorm_like(module: nn.Module) -> bool:
    """Already an RMSNorm (normswap's or a model's own ``*RMSNorm`` class): nothing to swap."""
    return isinstance(module, RMSNorm) or "rmsnorm" in type(module).__name__.lower()


def is_layernorm_like(module: nn.Module) -> bool:
    """A mean-subtracting norm over the last dimension: ``nn.LayerNorm`` or a model's own ``*LayerNorm`` class.

    Channels-first variants (ConvNeXt's ``data_format="channels_first"``) normalise another axis and are not.
    """
    if is_rmsnorm_like(module):
        return False
    if getattr(module, "data_format", "channels_last") != "channels_last":
        return False
    if isinstance(module, nn.LayerNorm):
        return True
    if not type(module).__name__.endswith("LayerNorm"):
        return False
    try:
        shape = norm_shape(module)
    except ValueError:
        return False
    return _subtracts_mean(module, shape)


@torch.no_grad()
def _subtracts_mean(module: nn.Module, shape: tuple[int, ...]) -> bool:
    """Measured, not guessed from the name: T5's ``T5LayerNorm`` is an RMSNorm. Adding a constant to the input
    leaves a LayerNorm's output unchanged. A meta-device module (a skeleton) cannot run and is taken by its name."""
    param = next(module.parameters(), None)
    if param is not None and param.device.type == "meta":
        return True
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype if param.is_floating_point() else x.dtype)
    try:
        a, b = module(x), module(x + 3.0)
    except Exception:  # noqa: BLE001 - a module that cannot run on a plain tensor is not a drop-in norm
        return False
    if not isinstance(a, torch.Tensor):
        return False
    return bool(torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2))


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
    def from_norm(cls, norm: nn.Module) -> RMSNorm:
        """An RMSNorm sharing the parameters of a LayerNorm-like module of any class (no copy).

        Reads what it needs by attribute, so it takes ``nn.LayerNorm`` and the models' own classes alike:
        ``CohereLayerNorm`` (weight only, ``variance_epsilon``), ``OlmoLayerNorm`` (no parameters at all, eps fixed
        at 1e-5), bias-free LayerNorms. Parameters keep the names ``weight``/``bias``, so the stock keys stay.
        """
        weight = getattr(norm, "weight", None)
        bias = getattr(norm, "bias", None)
        weight = weight if isinstance(weight, nn.Parameter) else None
        bias = bias if isinstance(bias, nn.Parameter) else None
        shape = norm_shape(norm)
        new = cls(
            shape,
            eps=norm_eps(norm),
            bias=bias is not None,
            elementwise_affine=weight is not None,
            device=weight.device if weight is not None else None,
            dtype=weight.dtype if weight is not None else None,
        )
        if weight is not None:
            new.weight = weight
            if bias is not None:
                new.bias = bias
        elif bias is not None:  # a bias without a gain: keep it under its own name
            new.bias = bias
        new.train(norm.training)
        return new

    @classmethod
    def from_layernorm(cls, ln: nn.Module) -> RMSNorm:
        """Alias of :meth:`from_norm` (kept for callers written before norms of other classes were supported)."""
        return cls.from_norm(ln)

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
