"""Apply a candidate set of writers to a float64 copy of the instance and measure every norm's input mean.

This is the claim check: discovery never says a norm is exact on the strength of the invisibility tests alone; it
centres the writers (folding LayerScale first, re-centring nonlinear producers with hooks) in a deep copy and
requires |mean|/rms < 1e-6 at the norm's input, and that the model's outputs did not move.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from normswap import maths
from normswap.discovery.capture import Trace, replace_first, trace


@dataclass(frozen=True)
class Fix:
    """One writer as discovery will declare it (full names in the instance)."""

    name: str
    layout: str  # a spec Layout, or "writes_stream" for a norm whose output is the stream
    scale: str | None = None


def _untie(model: nn.Module, params: list[nn.Parameter], writers: set[int]) -> None:
    """Give every module that is not a writer its own copy of a shared writer parameter (the tied LM head)."""
    wanted = {id(p) for p in params}
    for module in model.modules():
        if id(module) in writers:
            continue
        for pname, p in list(module._parameters.items()):
            if p is not None and id(p) in wanted:
                setattr(module, pname, nn.Parameter(p.detach().clone()))


@torch.no_grad()
def _fold_scale(writer: nn.Module, layout: str, scale: nn.Parameter) -> None:
    s = scale.detach().reshape(-1).to(torch.float64)
    w = writer.weight.detach().to(torch.float64)
    writer.weight.copy_((w * s[:, None] if layout == "linear" else w * s[None, :]).to(writer.weight.dtype))
    if getattr(writer, "bias", None) is not None:
        writer.bias.copy_((writer.bias.detach().to(torch.float64) * s).to(writer.bias.dtype))
    scale.fill_(1.0)


def _recenter_output(axis: int):
    def hook(_mod, _args, output):
        return replace_first(output, lambda t: t - t.mean(dim=axis, keepdim=True))
    return hook


def _recenter_input(_mod, args, kwargs):
    if args and isinstance(args[0], torch.Tensor):
        return (args[0] - args[0].mean(-1, keepdim=True), *args[1:]), kwargs
    t = kwargs.get("hidden_states")
    if isinstance(t, torch.Tensor):
        return args, {**kwargs, "hidden_states": t - t.mean(-1, keepdim=True)}
    return None


@torch.no_grad()
def centred_copy(model: nn.Module, fixes: list[Fix]) -> nn.Module:
    """A deep copy of ``model`` with every fix applied (weights centred in float64; hooks for re-centring)."""
    sim = copy.deepcopy(model)
    modules = dict(sim.named_modules())
    params = dict(sim.named_parameters())
    shared, writer_ids = [], set()
    for f in fixes:
        if f.name in params:
            shared.append(params[f.name])
        elif f.layout not in ("recenter", "recenter_input", "writes_stream"):
            shared.extend(p for p in modules[f.name].parameters(recurse=False))
            writer_ids.add(id(modules[f.name]))
    _untie(sim, shared, writer_ids)
    modules = dict(sim.named_modules())
    params = dict(sim.named_parameters())
    for f in fixes:
        if f.layout == "param":
            p = params[f.name]
            p.copy_(maths.center(p, -1).to(p.dtype))
        elif f.layout in ("recenter", "writes_stream"):
            axis = 1 if isinstance(modules[f.name], (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1
            modules[f.name].register_forward_hook(_recenter_output(axis))
        elif f.layout == "recenter_input":
            modules[f.name].register_forward_pre_hook(_recenter_input, with_kwargs=True)
        else:
            module = modules[f.name]
            if f.scale is not None:
                _fold_scale(module, f.layout, params[f.scale])
            module.weight.copy_(maths.center_weight(module.weight, f.layout).to(module.weight.dtype))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(maths.center_bias(module.bias).to(module.bias.dtype))
    return sim


def norm_ratios(tr: Trace, norms: list[str]) -> dict[str, float]:
    """Worst |mean|/rms over all calls at each norm's input (inf when the norm was not called)."""
    out = {}
    for n in norms:
        ratios = [float(maths.hidden_mean_ratio(c.inp).max()) for c in tr.calls.get(n, []) if c.inp is not None]
        out[n] = max(ratios) if ratios else float("inf")
    return out


def measure_fixes(model: nn.Module, probes: dict, fixes: list[Fix]) -> tuple[nn.Module, Trace]:
    sim = centred_copy(model, fixes)
    return sim, trace(sim, probes)
