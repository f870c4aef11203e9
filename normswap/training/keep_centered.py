"""Keep the residual-stream writers zero-mean while a converted model trains.

An exact conversion is exact because every writer's output is zero-mean; an ordinary optimizer step breaks that (an
Adam update is not zero-mean), after which the checkpoint no longer computes the same thing in the stock LayerNorm
class. :func:`keep_centered_` constrains the writers to the zero-mean subspace:

* gradients of writer weights are projected onto it (the gradient of the constrained problem), and
* the weights are re-centred after each optimizer step (when given the optimizer) and before any forward pass that
  would otherwise see them uncentred (a projection, so plain SGD/Adam become projected SGD/Adam).

This is the same optimisation as a ``torch.nn.utils.parametrize`` parametrization ``W = C·W₀`` but leaves the
parameters under their stock names, so ``save_pretrained`` and HF Trainer checkpoints stay loadable by the stock
class at every step. :class:`KeepCenteredCallback` does the same inside ``transformers.Trainer``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import TrainerCallback

from normswap import maths
from normswap.adapters import adapter_for
from normswap.errors import CheckpointError, NormswapError
from normswap.structure import resolve
from normswap.surgery import _tied_head

#: Re-centre only when a writer's |mean|/rms exceeds this, so repeated forwards never touch weights in place that a
#: pending backward pass still needs.
RECENTER_THRESHOLD = 1e-6


@dataclass
class CenteredTensor:
    name: str
    param: nn.Parameter
    axis: int


def residual_writers(model: nn.Module) -> list[CenteredTensor]:
    """Every writer tensor (weights and biases) the model's adapter names, with the axis that indexes hidden.

    Resolved by :func:`normswap.structure.resolve`, like the conversion itself. Writers re-centred at run time
    have no weights to constrain and are left out.
    """
    adapter = adapter_for(model)  # declared, else discovered
    try:
        structure = resolve(model, adapter)
    except CheckpointError as exc:
        raise NormswapError(str(exc)) from None
    found: list[CenteredTensor] = []
    for w in structure.centred_writers:
        axis = maths.HIDDEN_AXIS[w.layout]
        if w.is_parameter:
            found.append(CenteredTensor(w.name, model.get_parameter(w.name), axis))
            continue
        target = model.get_submodule(w.name)
        found.append(CenteredTensor(f"{w.name}.weight", target.weight, axis))
        if getattr(target, "bias", None) is not None:
            found.append(CenteredTensor(f"{w.name}.bias", target.bias, -1))
    return found


def folded_scales(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The LayerScale parameters the conversion folded into writers: they must stay ones while training."""
    structure = resolve(model, adapter_for(model))
    return [(name, model.get_parameter(name)) for name in structure.scales]


def _ratio(p: torch.Tensor, axis: int) -> float:
    """max |mean along the hidden axis| / rms of the tensor, accumulated in float64 without copying the tensor."""
    x = p.detach()
    mean = x.mean(dim=axis, dtype=torch.float64).abs().max()
    rms = torch.linalg.vector_norm(x, dtype=torch.float64) / x.numel() ** 0.5
    return float(mean / rms.clamp_min(1e-30))


def _threshold(p: torch.Tensor) -> float:
    """The |mean|/rms worth re-centring: above the dtype's own rounding of a centred tensor."""
    return max(RECENTER_THRESHOLD, 4 * torch.finfo(p.dtype).eps)


class CenteredWriters:
    """Handle returned by :func:`keep_centered_`: re-centre on demand, measure, or remove the constraint."""

    def __init__(self, model: nn.Module, tensors: list[CenteredTensor],
                 scales: list[tuple[str, nn.Parameter]] | None = None):
        self.model = model
        self.tensors = tensors
        #: LayerScales folded into their writers: held at ones (an update would undo the centring of the fold).
        self.scales = scales or []
        self._handles: list = []

    @torch.no_grad()
    def recenter_(self, force: bool = False) -> int:
        """Project every writer back onto zero mean; returns how many tensors needed it."""
        moved = 0
        for t in self.tensors:
            if force or _ratio(t.param, t.axis) > _threshold(t.param):
                t.param.copy_(maths.center(t.param, t.axis).to(t.param.dtype))
                moved += 1
        for _, scale in self.scales:
            if force or bool((scale != 1).any()):
                scale.fill_(1.0)
                moved += 1
        return moved

    def max_mean_ratio(self) -> float:
        """Largest |mean|/rms over the writers (≈1e-8 when centred in fp32)."""
        return max((_ratio(t.param, t.axis) for t in self.tensors), default=0.0)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def keep_centered_(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> CenteredWriters:
    """Constrain ``model``'s residual writers to stay zero-mean during training (in place; returns a handle).

    Call it after conversion and before creating the training loop. With ``optimizer`` the writers are re-centred
    right after every ``optimizer.step()``; without it, before every forward pass (call ``handle.recenter_()`` before
    saving in that case). Refuses a model whose head is still tied to a writer: centring would change its logits.
    """
    if _tied_head(model):
        raise NormswapError("the model's output head is tied to its input embedding, so centring the embedding would "
                            "change the logits; convert it first (normswap.convert_ unties the head)")
    tensors = residual_writers(model)
    if not tensors:
        raise NormswapError(f"no residual writers found for model_type {model.config.model_type!r}")
    handle = CenteredWriters(model, tensors, folded_scales(model))
    for t in tensors:
        if t.param.requires_grad:
            handle._handles.append(t.param.register_hook(lambda g, axis=t.axis: g - g.mean(dim=axis, keepdim=True)))
    for _, scale in handle.scales:
        if scale.requires_grad:
            handle._handles.append(scale.register_hook(torch.zeros_like))

    def recenter_hook(*_args) -> None:  # hooks must return None (a forward pre-hook's return replaces the inputs)
        handle.recenter_()

    handle._handles.append(model.register_forward_pre_hook(recenter_hook))
    if optimizer is not None:
        handle._handles.append(optimizer.register_step_post_hook(recenter_hook))
    handle.recenter_()
    return handle


class KeepCenteredCallback(TrainerCallback):
    """``transformers.Trainer`` callback: ``Trainer(..., callbacks=[KeepCenteredCallback()])``.

    Installs :func:`keep_centered_` when training starts and re-centres after every optimizer step, before the
    Trainer logs, evaluates or saves, so every checkpoint it writes loads in the stock LayerNorm class.
    """

    def __init__(self) -> None:
        self.handle: CenteredWriters | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and self.handle is None:
            self.handle = keep_centered_(model)

    def on_step_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.recenter_()

    def on_train_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.recenter_()
            self.handle.remove()
            self.handle = None
