"""Kernel dispatch for RMSNorm: one function, one place that decides which implementation runs.

Every RMSNorm in normswap goes through :func:`rms_norm`, so a faster kernel only has to be registered here.
``NORMSWAP_KERNEL`` (``composite`` | ``fused`` | ...) forces a backend for debugging and benchmarks.
"""

from __future__ import annotations

import os

import torch

from normswap.kernels.composite import rms_norm_composite

__all__ = ["rms_norm", "rms_norm_composite", "selected_backend"]


def selected_backend(x: torch.Tensor) -> str:
    """Name of the backend :func:`rms_norm` would use for ``x`` (for reports and benchmarks)."""
    forced = os.environ.get("NORMSWAP_KERNEL", "").strip().lower()
    if forced:
        return forced
    return "composite"


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """RMSNorm over the last dimension: ``x / sqrt(mean(x**2) + eps) * weight + bias``."""
    return rms_norm_composite(x, weight, bias, eps)
