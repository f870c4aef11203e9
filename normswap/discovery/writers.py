"""Which modules and parameters write a norm's stream, and whether the model can see their mean.

The test is the same for every architecture: add a random per-token multiple of the ones vector to a candidate's
output (or to a bare parameter such as a cls token) and run the model. If no output moves, except the tensors that
*are* the residual stream (``hidden_states``; a ``last_hidden_state`` that moves exactly along the ones vector), the
candidate's mean is invisible and it can be centred exactly. In the same pass, the norms whose input moved along the
ones vector are the norms this candidate feeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from normswap.discovery.capture import (
    Trace,
    along_ones,
    is_stream_field,
    run_model,
    same,
    shift_input,
    shift_output,
    shift_parameter,
    trace,
)

#: Output tolerance (relative) below which a perturbation "did not move" an output: float64 rounding is ~1e-15 and a
#: visible writer moves outputs by ~1e-2 or more. Norms that compute in float32 internally (Cohere, OLMo) leave
#: ~1e-7 at every norm, ~3e-7 at the logits: the engine uses :data:`REDUCED_TOL` for those models.
OUTPUT_TOL = 1e-8
REDUCED_TOL = 1e-4


def affine_layout(module: nn.Module) -> str | None:
    """The writer layout of an affine leaf whose weights can be centred, else None."""
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, (nn.Conv1d, nn.Conv3d)):
        return "conv"
    return None


def hidden_axis(module: nn.Module) -> int:
    """Axis of a module's output that indexes the hidden dimension (channels for convolutions)."""
    return 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1


@dataclass
class Effect:
    """What adding a per-token multiple of ones at one candidate did to the model."""

    name: str
    kind: str  # "module" | "param" | "input"
    visible: list[str] = field(default_factory=list)  # outputs that moved
    raw_outputs: list[str] = field(default_factory=list)  # stream outputs that moved along ones
    feeds: set[str] = field(default_factory=set)  # norms whose input moved along ones

    @property
    def invisible(self) -> bool:
        return not self.visible


def output_effect(ref: dict[str, torch.Tensor], new: dict[str, torch.Tensor],
                  tol: float = OUTPUT_TOL) -> tuple[list[str], list[str]]:
    """(outputs that moved, stream outputs that moved along ones) between two flattened model outputs."""
    visible, raw = [], []
    for name, r in ref.items():
        if is_stream_field(name):
            continue
        n = new.get(name)
        if n is None or n.shape != r.shape:
            visible.append(name)
            continue
        if same(n, r, tol):
            continue
        if name.split(".")[-1] == "last_hidden_state" and ones_axis(n - r, tol) is not None:
            raw.append(name)
        else:
            visible.append(name)
    return visible, raw


def ones_axis(diff: torch.Tensor, tol: float = OUTPUT_TOL) -> int | None:
    """The axis along which ``diff`` is a per-index multiple of ones: -1 (hidden last), 1 for a 4-d tensor laid out
    channels-first ([batch, hidden, h, w]: the stream VitDet returns), None when it is neither."""
    if along_ones(diff, -1, tol):
        return -1
    if diff.dim() == 4 and along_ones(diff, 1, tol):
        return 1
    return None


def fed_norms(ref: Trace, new: Trace, norms: list[str], tol: float = OUTPUT_TOL) -> set[str]:
    """Norms whose input moved, in every call that moved, by a per-token multiple of ones."""
    fed = set()
    for n in norms:
        moved = [(a, b) for a, b in zip(ref.calls.get(n, []), new.calls.get(n, []), strict=False)
                 if a.inp is not None and b.inp is not None and a.inp.shape == b.inp.shape and not same(a.inp, b.inp, tol)]
        if moved and all(along_ones(b.inp - a.inp, -1, 1e-7) for a, b in moved):
            fed.add(n)
    return fed


def module_candidates(model: nn.Module, ref: Trace, hidden: set[int], skip: set[str]) -> list[str]:
    """Called modules whose output's hidden axis has the size of some norm's input."""
    modules = dict(model.named_modules())
    out = []
    for name, calls in ref.calls.items():
        if not name or name in skip or not calls or calls[0].out is None:
            continue
        axis = hidden_axis(modules[name])
        t = calls[0].out
        if t.dim() >= (2 if axis == 1 else 1) and t.shape[axis] in hidden:
            out.append(name)
    return sorted(out, key=lambda n: ref.calls[n][0].start)


def wrapper_aliases(ref: Trace, candidates: list[str]) -> dict[str, str]:
    """{wrapper: innermost descendant} for candidates whose every output equals a descendant candidate's output.

    Perturbing ``attn`` or ``attn.resid_dropout`` or ``attn.c_proj`` is the same experiment when all three return
    the same tensor; only the innermost is run.
    """
    aliases: dict[str, str] = {}
    names = set(candidates)
    for name in candidates:
        outs = [c.out for c in ref.calls[name]]
        inner = [d for d in names if d.startswith(name + ".") and len(ref.calls[d]) == len(outs)
                 and all(o is not None and c.out is not None and o.shape == c.out.shape and torch.equal(o, c.out)
                         for o, c in zip(outs, ref.calls[d], strict=True))]
        if inner:
            aliases[name] = max(inner, key=lambda d: d.count("."))
    return aliases


def param_candidates(model: nn.Module, ref: Trace, hidden: set[int], norm_names: set[str]) -> list[str]:
    """Bare parameters with a hidden-sized last axis (cls/position/mask/register tokens, uncalled tables).

    Parameters of called affine leaves are tested through the leaf's output; parameters of norms never write.
    """
    called_affine = {id(p) for mname, module in model.named_modules()
                     if affine_layout(module) is not None and mname in ref.calls
                     for p in module.parameters(recurse=False)}
    out = []
    for mname, module in model.named_modules():
        if mname in norm_names:
            continue
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in called_affine:  # tested through the module's output (also when tied to an uncalled table)
                continue
            if p.is_floating_point() and p.dim() >= 1 and p.shape[-1] in hidden and p.numel() > 1:
                out.append(f"{mname}.{pname}" if mname else pname)
    return out


def measure(model: nn.Module, probes: dict, ref: Trace, names: list[str], kind: str, norms: list[str],
            seed: int = 1, tol: float = OUTPUT_TOL) -> dict[str, Effect]:
    """Perturb each candidate in turn (one forward pass each) and record what moved."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    norm_set = set(norms)
    effects = {}
    for i, name in enumerate(names):
        if kind == "module":
            ctx = shift_output(modules[name], hidden_axis(modules[name]), seed + i)
        elif kind == "param":
            ctx = shift_parameter(params[name], seed + i)
        else:
            ctx = shift_input(modules[name], seed + i)
        with ctx:
            new = trace(model, probes, names=norm_set)
        visible, raw = output_effect(ref.outputs, new.outputs, tol)
        effects[name] = Effect(name, kind, visible, raw, fed_norms(ref, new, norms, tol))
    return effects


def find_layer_scale(model: nn.Module, ref: Trace, name: str) -> list[tuple[str, str]]:
    """(affine leaf, scale parameter) for each call of module ``name`` whose output is ``s ⊙ A(x)``.

    LayerScale (DINOv2 ``layer_scale1.lambda1``; BEiT ``lambda_1``/``lambda_2`` applied inline before one
    ``drop_path`` module called twice) multiplies a writer's output elementwise by a learned vector; folding the
    vector into the writer makes it centrable.
    """
    found = []
    for call in ref.calls.get(name, []):
        if call.out is not None:
            pair = _layer_scale_of(model, ref, name, call.out)
            if pair is not None and pair not in found:
                found.append(pair)
    return found


def _layer_scale_of(model: nn.Module, ref: Trace, name: str, y: torch.Tensor) -> tuple[str, str] | None:
    modules = dict(model.named_modules())
    by_value = [(pn, p.detach().reshape(-1)) for pn, p in model.named_parameters() if p.numel() == y.shape[-1]]
    for aname, acalls in ref.calls.items():
        if affine_layout(modules[aname]) not in ("linear", "conv1d") or aname == name:
            continue
        for c in acalls:
            a = c.out
            if a is None or a.shape != y.shape:
                continue
            flat_a, flat_y = a.reshape(-1, a.shape[-1]), y.reshape(-1, y.shape[-1])
            mask = flat_a.abs() > 1e-6
            if not mask.all(dim=0).any():
                continue
            ratio = torch.where(mask, flat_y / torch.where(mask, flat_a, 1.0), torch.nan)
            s = torch.nanmean(ratio, dim=0)
            if not torch.isfinite(s).all() or same(s, torch.ones_like(s)):
                continue
            if not same(flat_a * s, flat_y, 1e-9):
                continue
            for pname, p in by_value:
                if same(p, s, 1e-9):
                    return aname, pname
    return None


def raw_readers(model: nn.Module, probes: dict, ref: Trace, effect: Effect, seed: int = 7,
                tol: float = OUTPUT_TOL) -> list[str]:
    """Leaf modules that see the mean of ``effect``'s candidate, earliest first: the readers that block it.

    Found by perturbing the candidate again with every leaf traced: a reader's input moved and its output moved in
    a direction other than the ones vector (a pass-through such as dropout only moves along ones; a per-token norm
    does not move at all; a norm over several concatenated tokens, as in Swin's patch merging, does).
    """
    modules = dict(model.named_modules())
    leaves = {n for n, m in modules.items() if n and not any(True for _ in m.children())}
    if effect.kind == "module":
        ctx = shift_output(modules[effect.name], hidden_axis(modules[effect.name]), seed)
    elif effect.kind == "param":
        ctx = shift_parameter(dict(model.named_parameters())[effect.name], seed)
    else:
        ctx = shift_input(modules[effect.name], seed)
    with ctx:
        new = trace(model, probes, names=leaves)
    readers = []
    for n in leaves:
        for a, b in zip(ref.calls.get(n, []), new.calls.get(n, []), strict=False):
            if a.inp is None or b.inp is None or a.out is None or b.out is None or a.inp.shape != b.inp.shape:
                continue
            if not same(a.inp, b.inp, tol) and b.out.shape == a.out.shape and not same(a.out, b.out, tol) \
                    and not along_ones(b.out - a.out, -1, 1e-7):
                readers.append(n)
                break
    return sorted(readers, key=lambda n: ref.calls[n][0].start)


def check_deterministic(model: nn.Module, probes: dict, ref: Trace) -> list[str]:
    """Outputs that differ between two identical runs (a stochastic forward cannot be measured)."""
    again = run_model(model, probes)
    return [n for n, t in ref.outputs.items() if n in again and not same(t, again[n], 1e-12)]
