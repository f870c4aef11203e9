"""Norm-free replacements for LayerNorm: a fixed-scale affine map ("none") and Dynamic Tanh ("dyt").

This file imports only torch on purpose: normswap appends its source to the remote code of every removal output,
so a checkpoint published without normswap rebuilds exactly these modules (same op order, same numbers).

Both modules keep the replaced LayerNorm's ``weight`` (γ) and ``bias`` (β) under the stock key names and add one
scalar under a key LayerNorm never uses (``scale`` for :class:`FixedScaleNorm`, ``alpha`` for :class:`DyT`), so the
checkpoint's other keys load unchanged. ``blend`` (λ, not saved) mixes the real LayerNorm back in while a fine-tuning
schedule removes norms progressively: ``y = ((1-λ)·LN_hat(x) + λ·f(x))·γ + β``, with λ = 1 the converted model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _layer_norm_hat(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without its affine part (what the blend mixes back in)."""
    return F.layer_norm(x, (x.shape[-1],), None, None, eps)


class _Replacement(nn.Module):
    """Shared plumbing: hold the LayerNorm's parameters (same objects, no copy) and blend with it on demand."""

    kind = ""

    def __init__(self, layernorm: nn.Module) -> None:
        super().__init__()
        self.normalized_shape = tuple(layernorm.normalized_shape)
        self.eps = float(layernorm.eps)
        self.weight = getattr(layernorm, "weight", None)
        self.bias = getattr(layernorm, "bias", None)
        #: λ: 1 = the replacement alone (the converted model); 0 = the original LayerNorm. Not part of the state.
        self.blend = 1.0
        self.train(layernorm.training)

    def normalized(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lam = float(self.blend)
        if lam >= 1.0:
            y = self.normalized(x)
        elif lam <= 0.0:
            y = _layer_norm_hat(x, self.eps)
        else:
            y = (1.0 - lam) * _layer_norm_hat(x, self.eps) + lam * self.normalized(x)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, blend={self.blend:g}"


class FixedScaleNorm(_Replacement):
    """LayerNorm removed: ``y = (x - mean(x))·s·γ + β`` with ``s`` a fixed scalar (1 / typical std of the input).

    The per-token standard deviation, the only non-linear part of LayerNorm, is frozen at its typical value
    (Heimersheim 2024; Baroni et al. 2025). The mean subtraction is kept because it is linear: it folds into the
    readers' weights whenever wanted, so the module is an affine map and the model is norm-free.
    """

    kind = "none"

    def __init__(self, layernorm: nn.Module, scale: float) -> None:
        super().__init__(layernorm)
        ref = self.weight if self.weight is not None else torch.empty(())
        self.register_buffer("scale", torch.tensor(float(scale), dtype=ref.dtype, device=ref.device))

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(dim=-1, keepdim=True)) * self.scale


class DyT(_Replacement):
    """Dynamic Tanh (Zhu et al. 2025, "Transformers without Normalization"): ``y = γ·tanh(α·x) + β``.

    ``alpha`` is a learnable scalar, as in the paper; its initial value comes from calibration statistics.
    """

    kind = "dyt"

    def __init__(self, layernorm: nn.Module, alpha: float) -> None:
        super().__init__(layernorm)
        ref = self.weight if self.weight is not None else torch.empty(())
        self.alpha = nn.Parameter(torch.tensor(float(alpha), dtype=ref.dtype, device=ref.device))

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.alpha * x)


REPLACEMENTS = {"none": (FixedScaleNorm, "scale"), "dyt": (DyT, "alpha")}


def replace_removed_norms_(model: nn.Module, removal: dict) -> int:
    """Install the replacement recorded in ``removal`` (the ``normswap.removal`` metadata) at every listed norm.

    ``removal["norms"]`` maps each norm's module name to its scalar; a listed module must be a LayerNorm (or already
    the replacement). Returns how many modules were replaced. Used by ``normswap.load`` and the remote code, before
    or after the weights load (the scalar is a state-dict entry, so loaded weights override the recorded value).
    """
    target = removal.get("target")
    if target not in REPLACEMENTS:
        raise ValueError(f"normswap removal metadata names an unknown target {target!r}")
    cls, key = REPLACEMENTS[target]
    count = 0
    prefix = getattr(model, "base_model_prefix", "") or ""
    for recorded, values in (removal.get("norms") or {}).items():
        name = recorded
        if prefix and recorded.startswith(prefix + ".") and not hasattr(model, prefix):
            name = recorded[len(prefix) + 1:]  # the bare base model loading a head checkpoint
        try:
            module = model.get_submodule(name)
        except AttributeError:
            if name.startswith(prefix + ".") if prefix else True:
                raise ValueError(f"normswap metadata lists {recorded}, but {type(model).__name__} has no such module"
                                 ) from None
            continue  # a head norm absent from this head class
        if isinstance(module, cls):
            continue
        if not isinstance(module, nn.LayerNorm):
            raise ValueError(f"normswap metadata lists {name} as a LayerNorm to replace, but it is a "
                             f"{type(module).__name__}")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, cls(module, float(values[key])))
        count += 1
    return count
