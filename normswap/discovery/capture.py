"""Run a model once with hooks on every module and record what each call read and returned.

Discovery measures behaviour, so everything it knows comes from these records: a module's first floating input
(the tensor a norm normalises, the stream a block reads), its first floating output, and the order in which calls
started. Perturbations (adding a per-token multiple of the ones vector somewhere) are hooks too, so the model's own
code runs unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Call:
    """One call of one module: its positional/keyword arguments and its first floating input and output."""

    args: tuple
    kwargs: dict
    inp: torch.Tensor | None
    out: torch.Tensor | None
    start: int  # order in which the call started (a parent starts before its children)


@dataclass
class Trace:
    """Every call of every module in one forward pass, plus the model's flattened outputs."""

    calls: dict[str, list[Call]] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


def first_tensor(obj: object) -> torch.Tensor | None:
    """The first floating tensor in a module's output (a tensor, a tuple, or a ModelOutput)."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.is_floating_point() else None
    if hasattr(obj, "to_tuple"):
        obj = obj.to_tuple()
    if isinstance(obj, (tuple, list)):
        for item in obj:
            t = first_tensor(item)
            if t is not None:
                return t
    return None


def first_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The tensor a module reads as its main input: the first positional tensor, else ``hidden_states``."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0] if args[0].is_floating_point() else None
    t = kwargs.get("hidden_states")
    return t if isinstance(t, torch.Tensor) and t.is_floating_point() else None


def replace_first(obj: object, fn: Callable[[torch.Tensor], torch.Tensor]) -> object:
    """``obj`` with its first floating tensor replaced by ``fn(tensor)`` (same container type)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if hasattr(obj, "to_tuple") and hasattr(obj, "keys"):
        for key in obj.keys():
            value = obj[key]
            if first_tensor(value) is not None:
                obj[key] = replace_first(value, fn)
                return obj
        return obj
    if isinstance(obj, (tuple, list)):
        items = list(obj)
        for i, item in enumerate(items):
            if first_tensor(item) is not None:
                items[i] = replace_first(item, fn)
                return type(obj)(items) if isinstance(obj, list) else tuple(items)
    return obj


def flatten_outputs(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Named floating tensors of a model output (nested ModelOutputs and tuples); caches and ints are skipped."""
    found: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            found[prefix or "output"] = obj.detach()
        return found
    if hasattr(obj, "to_tuple") and hasattr(obj, "keys"):
        for key in obj.keys():
            found.update(flatten_outputs(obj[key], f"{prefix}.{key}" if prefix else key))
    elif isinstance(obj, (tuple, list)):
        for i, item in enumerate(obj):
            found.update(flatten_outputs(item, f"{prefix}.{i}" if prefix else str(i)))
    return found


def is_stream_field(name: str) -> bool:
    """Output fields that hold the residual stream of every layer: ignored by the invisibility test.

    Exactly the fields verification compares after mean removal (``STREAM_TUPLES``): a field that merely ends in
    ``hidden_states`` (SAM3's ``fpn_hidden_states``, computed from the stream by convolutions) is an output like
    any other, and a writer whose mean reaches it is visible.
    """
    from normswap.verification.figures import is_raw_stream

    return is_raw_stream(name, ())


def run_model(model: nn.Module, probes: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return flatten_outputs(model(**probes))


@torch.no_grad()
def trace(model: nn.Module, probes: dict, names: set[str] | None = None, keep_args: bool = False) -> Trace:
    """Run ``model`` on ``probes`` recording each (selected) module's calls; inputs/outputs are cloned."""
    result = Trace()
    counter = [0]
    handles = []
    pending: dict[int, list[int]] = {}
    for name, module in model.named_modules():
        if names is not None and name not in names:
            continue

        def pre(mod, args, kwargs, name=name):
            pending.setdefault(id(mod), []).append(counter[0])
            counter[0] += 1

        def post(mod, args, kwargs, output, name=name):
            start = pending[id(mod)].pop()
            inp = first_input(args, kwargs)
            out = first_tensor(output)
            result.calls.setdefault(name, []).append(Call(
                args if keep_args else (), kwargs if keep_args else {},
                None if inp is None else inp.detach().clone(),
                None if out is None else out.detach().clone(), start))

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        result.outputs = run_model(model, probes)
    finally:
        for h in handles:
            h.remove()
    return result


def ones_shift(t: torch.Tensor, axis: int, gen: torch.Generator) -> torch.Tensor:
    """A random multiple of the ones vector along ``axis`` for every other index (broadcastable to ``t``).

    Scaled to the tensor's own rms, so that a norm computing in float32 (Cohere, OLMo) sees a shift it can
    represent: a shift far larger than the signal would drown the signal in float32 rounding.
    """
    shape = list(t.shape)
    shape[axis] = 1
    rms = t.detach().to(torch.float64).pow(2).mean(dim=axis, keepdim=True).sqrt()
    rms = torch.where(rms > 0, rms, torch.ones_like(rms))
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * rms).to(t.dtype)


@contextlib.contextmanager
def shift_output(module: nn.Module, axis: int, seed: int) -> Iterator[None]:
    """While active, every call of ``module`` has a random per-token multiple of ones added to its output."""
    gen = torch.Generator().manual_seed(seed)

    def hook(_mod, _args, output):
        return replace_first(output, lambda t: t + ones_shift(t, axis, gen))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def shift_parameter(param: nn.Parameter, seed: int) -> Iterator[None]:
    """While active, ``param`` has a random multiple of ones added along its last axis for every other index."""
    gen = torch.Generator().manual_seed(seed)
    saved = param.detach().clone()
    with torch.no_grad():
        param.add_(ones_shift(param, -1, gen))
    try:
        yield
    finally:
        with torch.no_grad():
            param.copy_(saved)


@contextlib.contextmanager
def shift_input(module: nn.Module, seed: int) -> Iterator[None]:
    """While active, the first input of every call of ``module`` moves by a random per-token multiple of ones."""
    gen = torch.Generator().manual_seed(seed)

    def hook(_mod, args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            return (args[0] + ones_shift(args[0], -1, gen), *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            t = kwargs["hidden_states"]
            return args, {**kwargs, "hidden_states": t + ones_shift(t, -1, gen)}
        return None

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def along_ones(diff: torch.Tensor, axis: int = -1, tol: float = 1e-9) -> bool:
    """Whether ``diff`` is (numerically) a per-index multiple of the ones vector along ``axis``, and nonzero."""
    scale = float(diff.abs().max())
    if scale == 0.0:
        return False
    centred = diff - diff.mean(dim=axis, keepdim=True)
    return float(centred.abs().max()) <= tol * scale


def same(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> bool:
    """Equal up to float64 rounding, relative to the larger magnitude."""
    if a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-30)
    return float((a - b).abs().max()) <= tol * scale
