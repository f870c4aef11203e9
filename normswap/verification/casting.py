"""Run a model at another dtype, or from weights that are not in memory, one module at a time.

Verification needs three forwards of the same architecture: the original in float64 (the truth), the original at
the saved dtype and the converted model at the saved dtype. Holding three copies of a model is what made the old
verification fail on big models. Instead, a forward pre-hook on every module that owns floating tensors swaps that
module's own parameters and buffers for their value at the requested dtype (cast from memory, or read from a
safetensors file) just before it runs, and a forward hook puts the originals back as soon as it returns. Only one
module's tensors exist at the run's dtype at any time, whatever the model size.

This is exactly the whole model cast to that dtype: on every registered architecture the outputs are bit-identical
to ``copy.deepcopy(model).to(dtype)`` (tests/test_verify_truth.py checks it). A model that touches another module's
weights outside that module's forward cannot run this way; the error names the module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

#: (full tensor name, the tensor currently held by the module, target dtype) -> the tensor to run with.
Provider = Callable[[str, torch.Tensor, torch.dtype], torch.Tensor]
#: (module name, module) -> a replacement forward for this run, or None (the head chunked by vocabulary rows).
ForwardOverride = Callable[[str, nn.Module], Callable | None]


def memory_provider(_name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The in-memory weights at ``dtype`` (a copy only when the dtype differs)."""
    return tensor.to(dtype)


def _whole(module: nn.Module) -> bool:
    """A torch.nn module with children whose forward reads the children's weights itself (``nn.MultiheadAttention``
    passes ``out_proj.weight`` to a functional call; SigLIP's pooling head uses one): its children never run, so
    the whole subtree's tensors are cast in its own hook."""
    kind = type(module).__module__
    return (kind.startswith("torch.nn.") and kind != "torch.nn.modules.container"  # containers run their children
            and next(module.children(), None) is not None)


def _own_tensors(module: nn.Module) -> list[tuple[str, str, dict]]:
    """(name relative to ``module``, key, the dict that holds it) of each floating parameter and buffer the module
    owns directly, or of its whole subtree for a :func:`_whole` module."""
    found = []
    subtree = module.named_modules() if _whole(module) else [("", module)]
    for path, owner in subtree:
        for store in (owner._parameters, owner._buffers):
            for key, t in store.items():
                if t is not None and t.is_floating_point():
                    found.append((f"{path}.{key}" if path else key, key, store))
    return found


def _cast_value(value, dtype: torch.dtype):
    if torch.is_tensor(value) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    if isinstance(value, tuple) and value and all(torch.is_tensor(v) for v in value):
        return tuple(_cast_value(v, dtype) for v in value)
    return value


class RunTrace:
    """Which module ran last (to name it when the forward fails) and the first one whose output was non-finite."""

    def __init__(self) -> None:
        self.last: str = ""
        self.first_nonfinite: str | None = None


def _first_tensor(out):
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    return None


@contextmanager
def run_at(model: nn.Module, dtype: torch.dtype, provider: Provider = memory_provider,
           override: ForwardOverride | None = None) -> Iterator[RunTrace]:
    """Inside the block, ``model(...)`` computes as if every weight were ``provider``'s value at ``dtype``.

    Floating inputs of each module are cast to ``dtype`` too (a model that casts its pixel values to the dtype of
    its first weight does so before that weight's hook has run). Nothing is left changed afterwards.
    """
    trace = RunTrace()
    handles = []
    saved: dict[int, list] = {}
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}

    def pre(module: nn.Module, args, kwargs):
        prefix = names.get(id(module), "")
        trace.last = prefix or type(module).__name__
        held = []
        for name, key, store in _own_tensors(module):
            current = store[key]
            value = provider(f"{prefix}.{name}" if prefix else name, current.data, dtype)
            held.append((current, current.data))
            current.data = value
        saved.setdefault(id(module), []).append(held)
        return tuple(_cast_value(a, dtype) for a in args), {k: _cast_value(v, dtype) for k, v in kwargs.items()}

    def post(module: nn.Module, _args, _kwargs, out):
        stack = saved.get(id(module))
        if not stack:  # the forward failed before this module's pre-hook ran
            return
        for tensor, data in stack.pop():
            tensor.data = data
        first = _first_tensor(out)
        if trace.first_nonfinite is None and first is not None and first.is_floating_point() \
                and not bool(torch.isfinite(first).all()):
            trace.first_nonfinite = names.get(id(module), "") or type(module).__name__

    replaced = []
    inside_whole: tuple[str, ...] = ()
    try:
        for name, module in model.named_modules():
            if inside_whole and name.startswith(inside_whole):
                continue  # cast by the enclosing whole module's hook
            if override is not None and (fwd := override(name, module)) is not None:
                replaced.append(module)
                module.forward = fwd
                continue
            if _whole(module):
                inside_whole = (*inside_whole, name + ".")
            if _own_tensors(module):
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
                handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))
        yield trace
    finally:
        for h in handles:
            h.remove()
        for module in replaced:
            del module.forward  # the instance attribute; the class's forward is back
        for stack in saved.values():  # a forward that raised inside a module: restore what it held
            while stack:
                for tensor, data in stack.pop():
                    tensor.data = data
