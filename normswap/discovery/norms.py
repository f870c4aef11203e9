"""Find the norms by what they compute, whatever their class.

A module is LayerNorm-like when, on the very input it saw in the probe pass, its output ignores a per-token multiple
of the ones vector (``f(x + c·1) == f(x)``: it subtracts the mean) and a positive rescaling (``f(a·x) ≈ f(x)``: it
divides by a spread). That is what makes the RMSNorm swap exact on a zero-mean input, and it holds for
``nn.LayerNorm``, bias-free ``CohereLayerNorm``, parameter-free ``OlmoLayerNorm`` and anything else that computes
the same function. RMSNorm-like modules (scale-invariant, not shift-invariant) are recorded and left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from normswap.discovery.capture import Call, Trace, first_tensor, same

#: Relative tolerance of the shift test. A float64 LayerNorm ignores a shift up to rounding (~1e-15), but some
#: classes compute in float32 whatever their input (CohereLayerNorm, OlmoLayerNorm: ~1e-7); an RMSNorm moves by O(1).
SHIFT_TOL = 1e-5
#: Relative tolerance of the scale test: eps makes it approximate; inputs are first brought to rms 10.
SCALE_TOL = 1e-4


@dataclass(frozen=True)
class FoundNorm:
    name: str
    hidden: int  # size of the normalised (last) axis
    kind: str  # "layernorm" | "rmsnorm"
    #: Relative change under the shift test: ~1e-16 in float64, ~1e-7 for a class that computes in float32.
    noise: float = 0.0


def _rerun(module: nn.Module, call: Call, x: torch.Tensor) -> torch.Tensor | None:
    """The module's first output on input ``x`` in place of the recorded first input (other arguments kept)."""
    if call.args and isinstance(call.args[0], torch.Tensor):
        args, kwargs = (x, *call.args[1:]), call.kwargs
    elif isinstance(call.kwargs.get("hidden_states"), torch.Tensor):
        args, kwargs = call.args, {**call.kwargs, "hidden_states": x}
    else:
        return None
    with torch.no_grad():
        return first_tensor(module(*args, **kwargs))


def classify_call(module: nn.Module, call: Call, gen: torch.Generator) -> tuple[str, float] | None:
    """('layernorm' | 'rmsnorm', shift-test noise) or None for one recorded call, by the shift and scale tests."""
    x, y = call.inp, call.out
    if x is None or y is None or x.shape != y.shape or x.dim() < 1 or x.shape[-1] < 4:
        return None
    if x.numel() == 0 or not torch.isfinite(x).all():
        return None
    rms = x.pow(2).mean(-1, keepdim=True).sqrt()
    if float(rms.min()) == 0.0:
        return None
    try:
        base_x = x / rms * 10.0  # unit-free input: eps has no say in the scale test
        base = _rerun(module, call, base_x)
        if base is None or base.shape != x.shape:
            return None
        moved = _rerun(module, call, base_x + torch.randn(x.shape, generator=gen, dtype=x.dtype))
        shifted = _rerun(module, call, base_x + 5.0 * torch.randn((*x.shape[:-1], 1), generator=gen, dtype=x.dtype))
        scaled = _rerun(module, call, 2.5 * base_x)
    except Exception:  # noqa: BLE001 - a module that cannot be re-run on its own input is not a norm we can swap
        return None
    if moved is None or same(moved, base, 1e-6):  # ignores its input (constant, or not elementwise-sensitive)
        return None
    if scaled is None or not same(scaled, base, SCALE_TOL):
        return None
    if shifted is not None and same(shifted, base, SHIFT_TOL):
        noise = float((shifted - base).abs().max() / base.abs().max().clamp_min(1e-30))
        return "layernorm", noise
    return "rmsnorm", 0.0


def find_norms(model: nn.Module, ref: Trace, seed: int = 0) -> list[FoundNorm]:
    """Every module that computes a LayerNorm-like or RMSNorm-like function, innermost first-class.

    A wrapper whose whole function is a norm (a Sequential holding one LayerNorm) passes the tests too; the innermost
    passing module is the one reported, so swaps and folds touch the module that owns the parameters.
    """
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    found: dict[str, FoundNorm] = {}
    for name, calls in ref.calls.items():
        if not name or not calls or calls[0].inp is None:
            continue
        # A norm owns at most a gain and a bias per feature; re-running a mixer or an attention block (d² weights)
        # four times would only cost time (a Mamba mixer in float64 takes seconds).
        if sum(p.numel() for p in modules[name].parameters()) > 4 * calls[0].inp.shape[-1]:
            continue
        results = [classify_call(modules[name], c, gen) for c in calls[:2]]
        kinds = {r[0] if r else None for r in results}
        if len(kinds) == 1 and None not in kinds:
            noise = max(r[1] for r in results if r)
            found[name] = FoundNorm(name, int(calls[0].inp.shape[-1]), kinds.pop(), noise)
    names = set(found)
    innermost = [n for n in found if not any(o != n and o.startswith(n + ".") for o in names)]
    return sorted((found[n] for n in innermost), key=lambda f: ref.calls[f.name][0].start)

