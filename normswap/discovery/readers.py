"""The readers of a norm: the affine layers a gain/bias fold may move the norm's γ/β into.

A fold is exact only when *everything* that sees the norm's output goes through the readers (a norm whose output is
also the residual, as in post-LN, or a model output, cannot be folded). So the readers found by value (modules whose
input is the norm's output tensor) are checked: add random noise δ to the norm's output and subtract it again at the
readers' inputs; if no output moves, the readers are complete.
"""

from __future__ import annotations

import torch
from torch import nn

from normswap.discovery.capture import Trace, replace_first, run_model, same
from normswap.discovery.writers import affine_layout, output_effect

FOLDABLE = ("linear", "conv1d")


def candidate_readers(model: nn.Module, ref: Trace, norm: str) -> list[str]:
    """Affine leaves whose input equals (one call of) the norm's output."""
    outs = [c.out for c in ref.calls.get(norm, []) if c.out is not None]
    modules = dict(model.named_modules())
    found = []
    for name, calls in ref.calls.items():
        if affine_layout(modules[name]) not in FOLDABLE or name.startswith(norm + "."):
            continue
        if any(c.inp is not None and any(same(c.inp, o, 1e-12) for o in outs) for c in calls):
            found.append(name)
    return sorted(found, key=lambda n: ref.calls[n][0].start)


@torch.no_grad()
def complete(model: nn.Module, probes: dict, ref: Trace, norm: str, readers: list[str], seed: int = 11,
             tol: float = 1e-8) -> bool:
    """Whether the readers see all of the norm's output: noise added at the norm and removed at them is invisible."""
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    noise: list[torch.Tensor] = []

    def add(_mod, _args, output):
        def f(t: torch.Tensor) -> torch.Tensor:
            noise.append(torch.randn(t.shape, generator=gen, dtype=t.dtype))
            return t + noise[-1]
        return replace_first(output, f)

    def remove(_mod, args):
        if noise and args and isinstance(args[0], torch.Tensor) and args[0].shape == noise[-1].shape:
            return (args[0] - noise[-1], *args[1:])
        return None

    handles = [modules[norm].register_forward_hook(add)]
    handles += [modules[r].register_forward_pre_hook(remove) for r in readers]
    try:
        new = run_model(model, probes)
    finally:
        for h in handles:
            h.remove()
    visible, raw = output_effect(ref.outputs, new, tol)
    return not visible and not raw


def fold_readers(model: nn.Module, probes: dict, ref: Trace, norm: str, tol: float = 1e-8) -> list[str]:
    """The norm's foldable readers when they are complete, else [] (no fold rather than a partial one)."""
    readers = candidate_readers(model, ref, norm)
    if not readers:
        return []
    layouts = {affine_layout(dict(model.named_modules())[r]) for r in readers}
    if len(layouts) != 1 or not complete(model, probes, ref, norm, readers, tol=tol):
        return []
    return readers


def reader_layout(modules: dict[str, nn.Module], readers: list[str]) -> str:
    layouts = {affine_layout(modules[r]) for r in readers}
    return layouts.pop() if len(layouts) == 1 else "linear"
