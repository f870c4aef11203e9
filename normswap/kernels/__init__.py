"""Kernel dispatch for RMSNorm: one function, one place that decides which implementation runs.

Every RMSNorm in normswap goes through :func:`rms_norm`, so a faster kernel only has to be registered here.

Backends (the names :func:`selected_backend` reports):

* ``fused``: the C++ CPU kernel (``csrc/rms_norm.cpp``), built on first use. One read of each row for the sum of
  squares, one write pass while the row is still in cache, fp32 accumulation, bias fused; with a fused backward.
  Swapping LayerNorm for RMSNorm must never make a model slower, and on CPU ``F.rms_norm`` is a ~7-op composite that
  runs ~3x slower than ``F.layer_norm``; this kernel runs at copy bandwidth instead. It is registered as the operator
  ``normswap::rms_norm`` (:mod:`normswap.kernels.ops`: fake kernel, autograd), so ``torch.compile`` and
  ``torch.jit.trace`` record it like any stock op when ``NORMSWAP_KERNEL=fused`` asks for it.
* ``torch_cuda``: on CUDA, ``torch.nn.functional.rms_norm`` is already a single fused kernel; bias is one add.
* ``composite``: ``F.rms_norm`` plus bias from stock ops (:mod:`normswap.kernels.composite`). Used for other devices
  and dtypes, when the extension cannot be built (after one warning; an error with ``NORMSWAP_REQUIRE_KERNEL=1``),
  and by default while ``torch.compile`` or ``torch.jit.trace`` traces: inductor fuses it with the residual add in
  front of it, which beats an opaque call to the fused kernel (numbers in :func:`_choose`), and a TorchScript
  artifact of stock ops runs without normswap (or Python) installed.

``NORMSWAP_KERNEL=composite|fused`` forces a backend (``auto`` or unset: choose as above). ``fused`` means "the fused
kernel for this device": the C++ kernel on CPU, ``torch_cuda`` on CUDA; inputs it cannot take (float64, other
devices) still run the composite, and :func:`selected_backend` says so; under ``torch.compile`` and
``torch.jit.trace`` it puts the ``normswap::rms_norm`` operator in the graph. ``composite`` is also the way to take a double backward (the fused
backward is once-differentiable).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from normswap.kernels import _build
from normswap.kernels.composite import rms_norm_composite
from normswap.kernels.fused import FUSED_DTYPES, rms_norm_fused

__all__ = ["BACKENDS", "rms_norm", "rms_norm_composite", "selected_backend"]

#: Values accepted by the ``NORMSWAP_KERNEL`` environment variable.
BACKENDS = ("auto", "composite", "fused")

_ENV = "NORMSWAP_KERNEL"


# os.environ.get costs ~0.6 us (key encoding, several Python calls), a quarter of a one-token norm. The mapping's
# backing dict gives the same answer for ~0.05 us and stays in sync with os.environ / monkeypatch.setenv writes;
# where it is not there (other platforms, a replaced os.environ), fall back to the public API.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY: object = None
if isinstance(_ENV_DATA, dict):
    try:
        _ENV_KEY = os.environ.encodekey(_ENV)  # type: ignore[attr-defined]
    except AttributeError:
        _ENV_DATA = None


def _env_value() -> str | None:
    if _ENV_DATA is not None and getattr(os.environ, "_data", None) is _ENV_DATA:
        raw = _ENV_DATA.get(_ENV_KEY)
        return None if raw is None else os.environ.decodevalue(raw)  # type: ignore[attr-defined]
    return os.environ.get(_ENV)


def _forced() -> str:
    raw = _env_value()
    if not raw:  # the common case
        return "auto"
    value = raw.strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{_ENV}={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


def _choose(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> str:
    """The dispatch rule, shared by :func:`rms_norm` and :func:`selected_backend` so they can never disagree.

    Runs on every norm call, so it sticks to attribute checks (``is_cpu``, ``dtype``): under 1 us.
    """
    forced = _forced()
    if forced == "composite" or (forced == "auto" and (torch.compiler.is_compiling() or torch.jit.is_tracing())):
        # Tracers get stock ops by default. Under torch.compile, inductor fuses the composite with its neighbours (the
        # residual add before every norm); the registered fused op is an opaque call it cannot fuse. Compiled
        # add+norm, median of 7 on 2 cores: fp32 4096x768 3.1 ms composite vs 8.5 ms op (compiled LayerNorm 4.5),
        # 4x768 45 vs 84 us; bf16 about even. A torch.jit.trace artifact holding stock ops runs wherever TorchScript
        # runs (C++ included), which a Python-registered op does not. NORMSWAP_KERNEL=fused records the op instead.
        return "composite"
    if x.is_cpu:
        if (
            x.dtype in FUSED_DTYPES
            and (weight is None or weight.is_cpu)
            and (bias is None or bias.is_cpu)  # else let the stock ops raise their usual device-mismatch error
            and x.dim() >= 1
            and _build.available()
        ):
            return "fused"
        return "composite"
    if x.is_cuda:
        # F.rms_norm's CUDA kernel needs matching dtypes; mixed precision goes through the composite's fp32 math.
        if x.dtype in FUSED_DTYPES and all(
            p is None or (p.dtype == x.dtype and p.device == x.device) for p in (weight, bias)
        ):
            return "torch_cuda"
    return "composite"


def selected_backend(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> str:
    """Name of the backend :func:`rms_norm` would use for ``x`` (for reports and benchmarks).

    May build the CPU extension, because whether that build succeeds is part of the answer.
    """
    return _choose(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension: ``x / sqrt(mean(x**2) + eps) * weight + bias``."""
    backend = _choose(x, weight, bias)
    if backend == "fused":
        return rms_norm_fused(x, weight, bias, eps, _build.load())
    if backend == "torch_cuda":
        y = F.rms_norm(x, (x.shape[-1],), weight, eps)
        return y + bias if bias is not None else y
    return rms_norm_composite(x, weight, bias, eps)
