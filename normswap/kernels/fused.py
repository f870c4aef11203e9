"""Fused CPU RMSNorm: Python face of the C++ kernels in ``csrc/rms_norm.cpp``.

Two ways into the same kernels:

* eagerly, directly: inference calls the forward kernel (no autograd bookkeeping, no saved tensors, ~1 µs of
  overhead); when a gradient is needed, :class:`FusedRMSNormFunction` runs the same forward kernel, saves only ``x``
  and one fp32 ``rstd`` per row, and computes ``dx``, ``dweight`` and ``dbias`` in one fused backward kernel;
* while ``torch.compile`` or ``torch.jit.trace`` records the model with ``NORMSWAP_KERNEL=fused`` (by default they
  get the composite, see :func:`normswap.kernels._choose`), through the registered operators ``normswap::rms_norm``
  / ``normswap::rms_norm_backward`` (:mod:`normswap.kernels.ops`), because a tracer must see an operator, not an
  extension call (dynamo would break the graph there; jit.trace would freeze the first output).

Why not the operator everywhere: its Python dispatch adds ~6 µs per inference call (more than the kernel itself at
one-token decode sizes) and ~150 µs per forward+backward (1×768 on 2 shared cores, best of 5 interleaved loops:
142 µs through this autograd.Function, 290 µs through the operator), for the same kernels.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from normswap.kernels import _build
from normswap.kernels.ops import rms_norm_op

__all__ = ["FUSED_DTYPES", "FusedRMSNormFunction", "rms_norm_fused"]

#: Input dtypes the C++ kernel handles; anything else (float64, ints) stays on the composite path.
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class FusedRMSNormFunction(torch.autograd.Function):
    """Eager autograd wrapper: fused forward that also returns ``rstd``, fused backward.

    Once-differentiable: fine-tuning needs first derivatives only, and the composite path remains available for
    anything that needs double backward (``NORMSWAP_KERNEL=composite``).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        ext: ModuleType,
    ) -> torch.Tensor:
        y, rstd = ext.forward(x, weight, bias, eps, True)
        ctx.save_for_backward(x, weight, rstd)
        ctx.ext = ext
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dw, db = ctx.ext.backward(grad_out, x, weight, rstd, need_dx, need_dw, need_db)
        if db is not None and ctx.bias_dtype is not None:
            db = db.to(ctx.bias_dtype)
        return dx, dw, db, None, None


def rms_norm_fused(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    ext: ModuleType | None = None,
) -> torch.Tensor:
    """Fused RMSNorm on CPU: the registered operator under a tracer, the kernel itself otherwise.

    ``ext`` is the loaded extension (dispatch passes it to skip a second lookup); loaded on demand otherwise.
    Raises ``RuntimeError`` if the extension cannot be built, since a caller asking for this backend by name should
    hear about it; :func:`normswap.kernels.rms_norm` is the entry point that falls back instead.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return rms_norm_op(x, weight, bias, eps)
    if ext is None:
        ext = _build.load()
        if ext is None:
            raise RuntimeError(f"fused RMSNorm extension unavailable: {_build.load_error()}")
    if torch.is_grad_enabled() and (
        x.requires_grad or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)
    ):
        return FusedRMSNormFunction.apply(x, weight, bias, eps, ext)
    return ext.forward(x, weight, bias, eps, False)[0]
