"""The fused CPU RMSNorm as registered PyTorch operators: ``normswap::rms_norm`` and ``normswap::rms_norm_backward``.

Registering the kernel with :func:`torch.library.custom_op` (a fake kernel for shape propagation, autograd through
the fused backward) is what lets tracers use it: ``torch.compile`` puts the op in its graph instead of breaking the
graph at an opaque extension call, ``torch.jit.trace`` records it instead of freezing its first output as a
constant, and ``torch.library.opcheck`` can check the registration. Gradients go through the op too, so there is
one autograd implementation of the fused kernel.

``normswap::rms_norm`` returns ``(y, rstd)``: ``rstd`` (one fp32 ``1/rms`` per row) is what the fused backward needs,
so training saves ``x`` and ``rstd`` instead of recomputing the reduction. Its CPU kernel builds the extension on
first use (see :mod:`normswap.kernels._build`) and raises if that is impossible; dispatch only routes here when the
extension is available.
"""

from __future__ import annotations

from typing import Any

import torch

from normswap.kernels import _build

__all__ = ["rms_norm_op"]


def _ext():
    ext = _build.load()
    if ext is None:
        raise RuntimeError(f"fused RMSNorm extension unavailable: {_build.load_error()}")
    return ext


def _rows(x: torch.Tensor) -> int:
    hidden = x.shape[-1]
    return 0 if hidden == 0 else x.numel() // hidden


@torch.library.custom_op("normswap::rms_norm", mutates_args=(), device_types="cpu")
def _rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: ``(x * rsqrt(mean(x**2) + eps) * weight + bias, rstd per row)``."""
    y, rstd = _ext().forward(x, weight, bias, eps, True)
    return y, rstd


@_rms_norm.register_fake
def _rms_norm_fake(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, x.new_empty((_rows(x),), dtype=torch.float32)


@torch.library.custom_op("normswap::rms_norm_backward", mutates_args=(), device_types="cpu")
def _rms_norm_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    need_dx: bool,
    need_dweight: bool,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward: ``(dx, dweight, dbias)`` in fp32 accumulation; an output not asked for is an empty tensor
    (an operator cannot return ``None``), and ``dbias`` is fp32 (the caller casts it to the bias dtype)."""
    dx, dw, db = _ext().backward(grad, x, weight, rstd, need_dx, need_dweight, need_dbias)
    empty = x.new_empty((0,))
    return (
        dx if dx is not None else empty,
        dw if dw is not None else empty.clone(),
        db if db is not None else empty.new_empty((0,), dtype=torch.float32),
    )


@_rms_norm_backward.register_fake
def _rms_norm_backward_fake(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    need_dx: bool,
    need_dweight: bool,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = x.shape[-1]
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty((0,))
    dw = weight.new_empty((hidden,)) if (need_dweight and weight is not None) else x.new_empty((0,))
    db = x.new_empty((hidden,) if need_dbias else (0,), dtype=torch.float32)
    return dx, dw, db


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, weight, bias, _eps = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.has_weight = weight is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(output[1])


def _backward(ctx: Any, grad: torch.Tensor, _grad_rstd: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    x, weight, rstd = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    dx, dw, db = torch.ops.normswap.rms_norm_backward(
        grad, x, weight, rstd, need_dx, bool(need_dw and ctx.has_weight), bool(need_db)
    )
    return (
        dx if need_dx else None,
        dw if (need_dw and ctx.has_weight) else None,
        db.to(ctx.bias_dtype) if (need_db and ctx.bias_dtype is not None) else None,
        None,
    )


_rms_norm.register_autograd(_backward, setup_context=_setup_context)


def rms_norm_op(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """The registered op's normalised output (what tracers record and what gradients flow through)."""
    return torch.ops.normswap.rms_norm(x, weight, bias, eps)[0]
