"""Optional folds of a norm's gain and bias into the modules that read its output.

Folding is only correct when every declared reader really consumes the norm's output and nothing else does, so the
readers an adapter declares are checked against one probe forward pass before any weight changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from normswap import maths
from normswap.surgery import ResolvedNorm

_LAYOUTS_BY_CLASS = {"Conv1D": "conv1d"}


def _reader_layout(module: nn.Module) -> str | None:
    if type(module).__name__ in _LAYOUTS_BY_CLASS:
        return _LAYOUTS_BY_CLASS[type(module).__name__]
    if isinstance(module, nn.Linear):
        return "linear"
    return None


@dataclass
class FoldResult:
    gain_folded: list[str] = field(default_factory=list)
    bias_folded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


@torch.no_grad()
def observed_readers(model: nn.Module, norms: list[ResolvedNorm], probes: dict) -> dict[str, list[str]]:
    """For each norm, the declared readers that actually received its output in a probe forward pass."""
    outputs: dict[str, tuple[int, int]] = {}
    seen: dict[str, set[str]] = {n.name: set() for n in norms}
    reader_of: dict[int, list[tuple[str, str]]] = {}
    handles = []

    def norm_hook(name):
        def hook(_m, _inp, out):
            outputs[name] = (out.data_ptr(), out.shape[-1])
        return hook

    def reader_hook(_m, inp):
        x = inp[0]
        for norm_name, reader_name in reader_of.get(id(_m), []):
            if outputs.get(norm_name) == (x.data_ptr(), x.shape[-1]):
                seen[norm_name].add(reader_name)

    for n in norms:
        handles.append(n.module.register_forward_hook(norm_hook(n.name)))
        for rname, rmod in n.readers:
            if id(rmod) not in reader_of:
                handles.append(rmod.register_forward_pre_hook(reader_hook))
            reader_of.setdefault(id(rmod), []).append((n.name, rname))
    try:
        model(**probes)
    finally:
        for h in handles:
            h.remove()
    return {k: sorted(v) for k, v in seen.items()}


@torch.no_grad()
def fold_(model: nn.Module, norms: list[ResolvedNorm], probes: dict, gain: bool, bias: bool) -> FoldResult:
    """Fold β into reader biases and/or γ into reader weights, norm by norm, where it is exactly possible."""
    result = FoldResult()
    observed = observed_readers(model, norms, probes)
    for n in norms:
        ln = n.module
        readers = [(name, mod) for name, mod in n.readers if name in observed[n.name]]
        if not readers:
            result.skipped[n.name] = "no declared reader consumes this norm's output (model output or untracked use)"
            continue
        if any(_reader_layout(m) is None for _, m in readers):
            result.skipped[n.name] = "a reader is neither nn.Linear nor Conv1D"
            continue
        if bias and getattr(ln, "bias", None) is not None:
            missing = [name for name, m in readers if getattr(m, "bias", None) is None]
            if missing:
                result.skipped[n.name + ".bias"] = (
                    f"reader(s) {', '.join(missing)} have no bias; adding one would make the checkpoint unloadable "
                    "by the stock class, so β stays in the norm"
                )
            else:
                for _, m in readers:
                    new_b = maths.fold_bias_into_reader(m.weight, m.bias, ln.bias, _reader_layout(m))
                    m.bias.copy_(new_b.to(m.bias.dtype))
                ln.bias.zero_()
                result.bias_folded.append(n.name)
        if gain and getattr(ln, "weight", None) is not None:
            gamma = ln.weight.detach().to(torch.float64)
            if getattr(ln, "bias", None) is not None and bool((ln.bias != 0).any()) and bool((gamma.abs() < 1e-12).any()):
                result.skipped[n.name + ".weight"] = "γ has zeros, so β/γ is undefined; γ stays in the norm"
                continue
            for _, m in readers:
                new_w = maths.fold_gain_into_reader(m.weight, ln.weight, _reader_layout(m))
                m.weight.copy_(new_w.to(m.weight.dtype))
            if getattr(ln, "bias", None) is not None:
                ln.bias.copy_((ln.bias.detach().to(torch.float64) / gamma).nan_to_num(0.0).to(ln.bias.dtype))
            ln.weight.fill_(1.0)
            result.gain_folded.append(n.name)
    return result
