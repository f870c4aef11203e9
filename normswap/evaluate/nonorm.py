"""The "no-norm" model: every norm replaced by identity, the runtime floor that any norm change can approach.

Its outputs are meaningless; only its speed matters. The gap between it and the real model is the most that a
faster norm (LayerNorm → RMSNorm, or a fused kernel) could ever save on this hardware.
"""

from __future__ import annotations

import copy

from torch import nn

from normswap.norm import RMSNorm

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, RMSNorm)


def is_norm(module: nn.Module) -> bool:
    """torch/normswap norms, plus architecture-specific ones (``LlamaRMSNorm``, ...) recognised by class name."""
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def without_norms(model: nn.Module) -> tuple[nn.Module, int]:
    """A deep copy of ``model`` with every norm swapped for ``nn.Identity``, and how many were swapped."""
    clone = copy.deepcopy(model)
    targets = [name for name, m in clone.named_modules() if is_norm(m)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = clone.get_submodule(parent_name) if parent_name else clone
        setattr(parent, child, nn.Identity())
    return clone.eval(), len(targets)
