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
#: Relative tolerance of the scale test: eps makes it approximate; inputs are first brought to a spread of 10.
SCALE_TOL = 1e-4


@dataclass(frozen=True)
class FoundNorm:
    name: str
    hidden: int  # size of the normalised (last) axis
    kind: str  # "layernorm" | "rmsnorm"
    #: Relative change under the shift test: ~1e-16 in float64, ~1e-7 for a class that computes in float32.
    noise: float = 0.0


def innermost_names(names: list[str]) -> list[str]:
    """The names no other name lies inside (``a.b`` hides ``a``), in their order: the module that owns the
    parameters, rather than a wrapper around it."""
    return [n for n in names if not any(o != n and o.startswith(n + ".") for o in names)]


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
    # Unit-free input, so that eps has no say in the scale test: each token is divided by its spread about its mean
    # (its rms where it has none). Dividing by the rms alone leaves the spread tiny where the mean dwarfs it (CvT's
    # wide stages: mean ~500, spread ~10), and eps then moved a LayerNorm's output enough to hide it.
    spread = (x - x.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True).sqrt()
    unit = torch.where(spread > 1e-6 * rms, spread, rms)
    try:
        base_x = x / unit * 10.0
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
    innermost = innermost_names(list(found))
    return sorted((found[n] for n in innermost), key=lambda f: ref.calls[f.name][0].start)



#: Why a LayerNorm the probe pass never ran is kept (or, when no LayerNorm ran at all, why the model is refused):
#: a composite's image/audio tower that the probe prompt does not reach would otherwise be silently skipped.
UNRUN_REASON = ("never ran on the probe inputs, so their stream could not be measured; the model cannot be "
                "converted exactly on a guess")

_OTHER_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
                nn.LocalResponseNorm)


def _norm_width(module: nn.Module) -> int | None:
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, int):
        return shape
    if isinstance(shape, (tuple, list, torch.Size)) and shape:
        return int(shape[-1])
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 1 and weight.shape[-1] >= 4:
        return int(weight.shape[-1])
    return None


def subtracts_mean(module: nn.Module, seed: int = 0) -> bool:
    """Whether a module that never ran computes a mean-subtracting norm, tested directly on a random input of its
    normalised width (``f(x + c·1) == f(x)``). ``nn.LayerNorm`` always does; a class named ``...LayerNorm`` whose
    behaviour cannot be tested (no known width, a forward that needs more arguments) counts as one: refusing is
    better than a silent "nothing to convert"."""
    if isinstance(module, nn.LayerNorm):
        return True
    name = type(module).__name__
    if not name.endswith("LayerNorm") or "rms" in name.lower():
        return False
    width = _norm_width(module)
    if width is None:
        return True
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float64
    gen = torch.Generator().manual_seed(seed)
    x = (10.0 * torch.randn(2, 3, width, generator=gen, dtype=torch.float64)).to(dtype)
    shift = (5.0 * torch.randn(2, 3, 1, generator=gen, dtype=torch.float64)).to(dtype)
    try:
        with torch.no_grad():
            base, shifted = first_tensor(module(x)), first_tensor(module(x + shift))
    except Exception:  # noqa: BLE001 - untestable on its own: named a LayerNorm, so not assumed harmless
        return True
    if base is None or shifted is None or base.shape != x.shape:
        return True
    return same(shifted, base, SHIFT_TOL)


def unrun_layernorms(model: nn.Module, ref: Trace, seed: int = 0) -> list[str]:
    """The mean-subtracting norms the probe pass never ran (innermost), in module order."""
    names = [name for name, m in model.named_modules()
             if name and not ref.calls.get(name) and subtracts_mean(m, seed)]
    return innermost_names(names)


def other_norm_counts(model: nn.Module) -> dict[str, int]:
    """Batch/group/instance norms by class name (``{"BatchNorm2d": 53}``): what a model without LayerNorm has."""
    counts: dict[str, int] = {}
    for m in model.modules():
        name = type(m).__name__
        if isinstance(m, _OTHER_NORMS) or any(k in name for k in ("BatchNorm", "GroupNorm", "InstanceNorm")):
            counts[name] = counts.get(name, 0) + 1
    return counts
