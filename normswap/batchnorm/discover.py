"""Find, by running the model once, which BatchNorms read the untouched output of a convolution or linear layer.

Names say nothing reliable about data flow (a module called ``conv`` may feed a pooling layer before its norm), so
the structure is measured: forward hooks record every conv/linear output and every BatchNorm input, and the autograd
graph of one probe forward says who else consumes each tensor. A BatchNorm folds into its producer only when

* its input *is* the producer's output (same memory, same number of elements, not modified in place since), possibly
  through views that keep the channel axis (LeViT flattens ``(B, L, C)`` to ``(B·L, C)``);
* nothing else consumes the producer's output (or any view on the way): otherwise folding would change that reader;
* the producer and the BatchNorm each run exactly once per forward and the producer's weight belongs to it alone.

Every other BatchNorm is kept, with a reason a user can act on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

#: How many single-consumer view nodes may sit between a producer's output and the BatchNorm's input.
MAX_VIEW_DEPTH = 8


@dataclass(frozen=True)
class FoldPair:
    """A BatchNorm (full module name) that folds exactly into the conv/linear producing its input."""

    batchnorm: str
    into: str
    #: Class name of the layer folded into (``Conv2d``, ``Linear``, ...): for reports.
    into_type: str = ""


@dataclass
class Discovery:
    pairs: list[FoldPair] = field(default_factory=list)
    #: BatchNorm name -> why it cannot be folded.
    kept: dict[str, str] = field(default_factory=dict)


def is_producer(module: nn.Module) -> bool:
    """Layers whose output channels are rows of their weight (out, ...): Linear and non-transposed convolutions."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, _ConvNd) and not module.transposed


def batchnorm_modules(model: nn.Module) -> dict[str, _BatchNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}


def uses_batch_statistics(bn: _BatchNorm) -> bool:
    """Whether the BatchNorm normalises with the statistics of the batch even in eval mode (not an affine map)."""
    return not bn.track_running_stats or bn.running_mean is None or bn.running_var is None


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill ``numel`` consecutive slots of memory, in some dim order."""
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride(), strict=True) if s != 1),
                               key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_channels(out: torch.Tensor, channel_dim: int, x: torch.Tensor) -> bool:
    """``x`` (the BatchNorm input, channel axis 1) is ``out`` re-viewed with the producer's channel axis kept."""
    if x.dim() < 2 or out.data_ptr() != x.data_ptr() or out.numel() != x.numel():
        return False
    if not (_dense(out) and _dense(x)):
        return False
    return x.shape[1] == out.shape[channel_dim] and (x.shape[1] == 1 or x.stride(1) == out.stride(channel_dim))


def _graph_in_degree(roots: list) -> Counter:
    """How many edges of the autograd graph reach each node, from the outputs' grad_fns down."""
    degree: Counter = Counter()
    seen = set()
    stack = list(dict.fromkeys(r for r in roots if r is not None))  # a root listed twice is walked once
    for r in stack:
        seen.add(r)
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            degree[nxt] += 1
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return degree


def output_tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if hasattr(obj, "to_tuple"):
        obj = obj.to_tuple()
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in output_tensors(item)]
    return []


@dataclass
class _Record:
    calls: int = 0
    tensor: torch.Tensor | None = None
    version: int = 0
    node: object = None
    out_node: object = None  # BatchNorm: grad_fn of its output
    readers: list[str] = field(default_factory=list)  # BatchNorm: modules that received its output
    outputs: list[tuple[object, torch.Tensor, int]] = field(default_factory=list)  # producer: (node, output, version)


def _kind(node) -> str:
    return "the model input (or a tensor that needs no gradient)" if node is None else type(node).__name__.removesuffix(
        "Backward0").removesuffix("Backward1")


def _padded(module: nn.Module) -> bool:
    pad = getattr(module, "padding", 0)
    if isinstance(pad, str):
        return pad != "valid"
    return any(p != 0 for p in (pad if isinstance(pad, (tuple, list)) else (pad,)))


def discover(model: nn.Module, probes: dict) -> Discovery:
    """Run ``model`` once on ``probes`` (eval mode, gradients on) and decide, for every BatchNorm, fold or keep."""
    bns = batchnorm_modules(model)
    producers = {name: m for name, m in model.named_modules() if is_producer(m)}
    records: dict[str, _Record] = {name: _Record() for name in [*bns, *producers]}
    handles = []

    def after_producer(module, _inp, out, name=None):
        rec = records[name]
        rec.calls += 1
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            rec.outputs.append((out.grad_fn, out, out._version))

    def before_bn(module, inp, name=None):
        rec = records[name]
        rec.calls += 1
        x = inp[0] if inp else None
        if isinstance(x, torch.Tensor):
            rec.tensor, rec.version, rec.node = x, x._version, x.grad_fn

    bn_outputs: dict[object, str] = {}  # grad_fn of a BatchNorm's output -> its name

    def after_bn(module, _inp, out, name=None):
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            records[name].out_node = out.grad_fn
            bn_outputs[out.grad_fn] = name

    def reader(module, inp, name=None):
        for x in inp:
            if isinstance(x, torch.Tensor) and x.grad_fn is not None and x.grad_fn in bn_outputs:
                records[bn_outputs[x.grad_fn]].readers.append(name)

    for name, m in producers.items():
        handles.append(m.register_forward_hook(lambda mod, i, o, name=name: after_producer(mod, i, o, name)))
        handles.append(m.register_forward_pre_hook(lambda mod, i, name=name: reader(mod, i, name)))
    for name, m in bns.items():
        handles.append(m.register_forward_pre_hook(lambda mod, i, name=name: before_bn(mod, i, name)))
        handles.append(m.register_forward_hook(lambda mod, i, o, name=name: after_bn(mod, i, o, name)))

    params = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in params:
            if p.is_floating_point():
                p.requires_grad_(True)
        model.eval()
        with torch.enable_grad():
            outputs = model(**probes)
        # every BatchNorm output is a root too: a branch the outputs do not reach (an auxiliary head) still counts
        roots = [t.grad_fn for t in output_tensors(outputs)] + [records[name].out_node for name in bns]
        degree = _graph_in_degree(roots)
        return _decide(model, bns, producers, records, degree)
    finally:
        for h in handles:
            h.remove()
        _detach_caches(model)
        for p, flag in params.items():
            p.requires_grad_(flag)
        model.train(was_training)


def _detach_caches(model: nn.Module) -> None:
    """Detach tensors a forward cached on modules (LeViT's attention-bias cache) while gradients were on.

    They keep their values; left attached they would pin the probe's autograd graph and make the model impossible
    to deep-copy ("only graph leaves support deepcopy").
    """
    for m in model.modules():
        for key, value in list(vars(m).items()):
            if key in ("_parameters", "_buffers", "_modules"):
                continue
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                m.__dict__[key] = value.detach()
            elif isinstance(value, dict):
                for k, v in list(value.items()):
                    if isinstance(v, torch.Tensor) and v.grad_fn is not None:
                        value[k] = v.detach()


def _weight_owners(model: nn.Module) -> Counter:
    owners: Counter = Counter()
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] += 1
    return owners


def _decide(model, bns, producers, records, degree) -> Discovery:
    found = Discovery()
    owners = _weight_owners(model)
    nodes = {node: (name, out, version) for name in producers for node, out, version in records[name].outputs}
    claimed: dict[str, str] = {}
    for name, bn in bns.items():
        rec = records[name]
        reason = None
        if uses_batch_statistics(bn):
            reason = ("normalises with batch statistics (track_running_stats=False): not an affine map at inference, "
                      "so there is nothing fixed to fold")
        elif rec.calls == 0:
            reason = "not run by the probe forward (unused by this model class), so its input could not be measured"
        elif rec.calls > 1:
            reason = f"called {rec.calls} times per forward (shared): one fold cannot serve every call site"
        if reason:
            found.kept[name] = reason
            continue
        producer, why = _trace(rec, records, nodes, degree, producers)
        if producer is None:
            found.kept[name] = why + _forward_note(rec, model)
            continue
        prod = producers[producer]
        if records[producer].calls != 1:
            why = f"its producer {producer} runs {records[producer].calls} times per forward (shared)"
        elif any(owners[id(p)] > 1 for p in prod.parameters(recurse=False)):
            why = f"the weight of its producer {producer} is shared with another module (tied)"
        elif producer in claimed:
            why = f"its producer {producer} already folds {claimed[producer]}"
        elif prod.weight.shape[0] != bn.num_features:
            why = f"its producer {producer} has {prod.weight.shape[0]} output channels, the BatchNorm {bn.num_features}"
        else:
            why = None
        if why:
            found.kept[name] = why
        else:
            claimed[producer] = name
            found.pairs.append(FoldPair(name, producer, type(prod).__name__))
    return found


def _trace(rec: _Record, records, nodes, degree, producers) -> tuple[str | None, str]:
    """The producer whose output reaches this BatchNorm's input through single-consumer views only, or why not."""
    x = rec.tensor
    if x is None:
        return None, "its input is not a tensor"
    node, first = rec.node, None
    for _ in range(MAX_VIEW_DEPTH + 1):
        if node is None:
            break
        if node in nodes:
            producer, out, version = nodes[node]
            if degree[node] != 1:
                return None, (f"the output of {producer} is also read by {degree[node] - 1} other operation(s) "
                              "(e.g. a residual branch), which folding would change")
            if out._version != version:
                return None, f"the output of {producer} is modified in place"
            channel_dim = out.dim() - 1 if isinstance(producers[producer], nn.Linear) else 1
            if _same_channels(out, channel_dim, x):
                return producer, ""
            if first is not None:
                return None, (f"its input comes from {_kind(first)} applied to the output of {producer}, not "
                              "from the convolution or linear layer itself")
            return None, f"its input is the output of {producer} with another channel axis or layout"
        inputs = [n for n, _ in node.next_functions if n is not None]
        if degree[node] != 1 or len(inputs) != 1:
            break
        first = first or node
        node = inputs[0]
    kind = _kind(rec.node)
    if kind.startswith(("Convolution", "Addmm", "Mm")):
        return None, (f"its input comes from a {kind} that is not an nn.Linear/nn.ConvNd module folding supports "
                      "(a transposed convolution, or a functional call)")
    return None, f"its input comes from {kind}, not from a convolution or linear layer"


def _forward_note(rec: _Record, model: nn.Module) -> str:
    """Why the other direction (into the layer after) is not taken either: the padded-conv case."""
    for name in rec.readers:
        module = model.get_submodule(name)
        if is_producer(module):
            if isinstance(module, _ConvNd) and _padded(module):
                return (f"; folding it forward into {name} would be inexact: that convolution zero-pads its input, "
                        "and the padding zeros are not normalised")
            return f"; folding it forward into {name} is not implemented"
    return ""

