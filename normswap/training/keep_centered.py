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
from normswap.adapters import get_adapter
from normswap.errors import NormswapError
from normswap.surgery import _lookup, _prefix, _tied_head

#: Re-centre only when a writer's |mean|/rms exceeds this, so repeated forwards never touch weights in place that a
#: pending backward pass still needs.
RECENTER_THRESHOLD = 1e-6


@dataclass
class CenteredTensor:
    name: str
    param: nn.Parameter
    axis: int


def residual_writers(model: nn.Module) -> list[CenteredTensor]:
    """Every writer tensor (weights and biases) the model's adapter names, with the axis that indexes hidden."""
    adapter = get_adapter(model.config.model_type)
    base, prefix = _prefix(model)
    blocks = _lookup(base, adapter.blocks)
    found: list[CenteredTensor] = []

    def add(root: nn.Module, root_prefix: str, writer) -> None:
        if writer.unless_present and _lookup(root, writer.unless_present) is not None:
            return
        target = _lookup(root, writer.path)
        if target is None:
            if writer.optional:
                return
            raise NormswapError(f"{adapter.model_type} adapter: writer {root_prefix}{writer.path} not found")
        name = root_prefix + writer.path
        if isinstance(target, nn.Parameter):
            found.append(CenteredTensor(name, target, maths.HIDDEN_AXIS[writer.layout]))
            return
        found.append(CenteredTensor(f"{name}.weight", target.weight, maths.HIDDEN_AXIS[writer.layout]))
        if getattr(target, "bias", None) is not None:
            found.append(CenteredTensor(f"{name}.bias", target.bias, -1))

    for w in adapter.embeddings:
        add(base, prefix, w)
    for i, block in enumerate(blocks or []):
        for w in adapter.block_writers:
            add(block, f"{prefix}{adapter.blocks}.{i}.", w)
    return found


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

    def __init__(self, model: nn.Module, tensors: list[CenteredTensor]):
        self.model = model
        self.tensors = tensors
        self._handles: list = []

    @torch.no_grad()
    def recenter_(self, force: bool = False) -> int:
        """Project every writer back onto zero mean; returns how many tensors needed it."""
        moved = 0
        for t in self.tensors:
            if force or _ratio(t.param, t.axis) > _threshold(t.param):
                t.param.copy_(maths.center(t.param, t.axis).to(t.param.dtype))
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
    handle = CenteredWriters(model, tensors)
    for t in tensors:
        if t.param.requires_grad:
            handle._handles.append(t.param.register_hook(lambda g, axis=t.axis: g - g.mean(dim=axis, keepdim=True)))

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
