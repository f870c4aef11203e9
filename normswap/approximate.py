"""Lower the damage of an approximate (post-LN) swap before any training, without changing what LayerNorm computes.

In a post-LN block the norm reads ``previous norm output + sublayer output``. Centring the sublayer writers removes
the sublayer's mean, but the previous norm's output ``γ·x̂ + β`` still carries ``mean(β)`` (plus a per-token part
``mean(γ·x̂)`` that no weight change can remove). The constant part can go: subtract ``mean(β)`` from ``β`` and add
``W·1·mean(β)`` to the bias of every linear layer that reads the norm's output. Whatever else consumes that output
(the residual into the next LayerNorm) is blind to a constant shift, so the LayerNorm model computes the same
function; the RMSNorm that replaces the next LayerNorm now sees a much smaller mean. On all-MiniLM-L6-v2 this took
the approximate swap from mean cosine 0.974 to 0.998 (see docs/FINETUNE.md).

Which modules read a norm's output is observed on a probe forward pass, and each shift is kept only if the model,
still with its LayerNorms, gives the same output afterwards. That check rejects the norm whose output *is* the model
output (e.g. the last norm of ``BertModel``), or one read by something that is not shift-invariant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from normswap import maths
from normswap.surgery import Plan, ResolvedNorm
from normswap.verify import model_dtype, primary_output

#: Max relative output change (vs max |output|) that still counts as "same function", by model dtype.
INVARIANCE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


@dataclass
class BiasMeanResult:
    """Norms whose ``mean(β)`` moved into their readers, and why the others kept it."""

    folded: dict[str, float] = field(default_factory=dict)  # norm name -> the mean that moved
    skipped: dict[str, str] = field(default_factory=dict)


def _layout(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D":
        return "conv1d"
    return None


def candidate_norms(plan: Plan) -> list[ResolvedNorm]:
    """Norms whose output flows into the residual stream of an approximate model: every norm of a post-LN
    architecture (the embedding norm starts the stream), and every inexact norm of a config-post-LN model."""
    post = plan.adapter.norm_position == "post"
    return [n for n in plan.norms if post or not n.exact]


@torch.no_grad()
def _observed_readers(model: nn.Module, norms: list[ResolvedNorm], probes: dict) -> tuple[dict, set[str]]:
    """Linear/Conv1D modules whose input is exactly a norm's output tensor, and norms whose output is the model's."""
    # Outputs are kept alive (the tensor is stored) so the allocator cannot hand their address to another tensor,
    # which would make an unrelated layer look like a reader.
    produced: dict[tuple[int, int], tuple[str, torch.Tensor]] = {}
    readers: dict[str, list[tuple[str, nn.Module]]] = {n.name: [] for n in norms}
    handles = []

    def norm_hook(name):
        def hook(_m, _inp, out):
            produced[(out.data_ptr(), out.shape[-1])] = (name, out)
        return hook

    def reader_hook(name):
        def hook(module, inp):
            x = inp[0]
            hit = produced.get((x.data_ptr(), x.shape[-1]))
            if hit is not None and all(r is not module for _, r in readers[hit[0]]):
                readers[hit[0]].append((name, module))
        return hook

    for n in norms:
        handles.append(n.module.register_forward_hook(norm_hook(n.name)))
    for name, module in model.named_modules():
        if _layout(module) is not None:
            handles.append(module.register_forward_pre_hook(reader_hook(name)))
    try:
        out = primary_output(model(**probes))
    finally:
        for h in handles:
            h.remove()
    is_output = {name for key, (name, _) in produced.items() if key == (out.data_ptr(), out.shape[-1])}
    return readers, is_output


@torch.no_grad()
def _run(model: nn.Module, probes: dict) -> torch.Tensor:
    return primary_output(model(**probes)).detach().to(torch.float64)


@torch.no_grad()
def fold_bias_means_(model: nn.Module, plan: Plan, probes: dict) -> BiasMeanResult:
    """Move ``mean(β)`` of each stream-feeding norm into its readers' biases where that provably keeps the function.

    Must run while the norms are still LayerNorms (after centring the writers, before the swap).
    """
    result = BiasMeanResult()
    norms = [n for n in candidate_norms(plan) if getattr(n.module, "bias", None) is not None]
    if not norms:
        return result
    was_training = model.training
    model.eval()
    try:
        readers, is_output = _observed_readers(model, norms, probes)
        tol = INVARIANCE_TOLERANCE.get(model_dtype(model), 1e-5)
        for n in norms:
            outcome = _fold_one(model, n, readers[n.name], n.name in is_output, probes, tol)
            if isinstance(outcome, float):
                result.folded[n.name] = outcome
            else:
                result.skipped[n.name] = outcome
    finally:
        model.train(was_training)
    return result


def _fold_one(model: nn.Module, norm: ResolvedNorm, readers: list[tuple[str, nn.Module]], is_output: bool,
              probes: dict, tol: float) -> float | str:
    """Fold one norm's bias mean: the mean moved (LayerNorm function checked unchanged), or why it stayed."""
    if is_output:
        return "its output is the model's output, so a shift there would change it"
    if not readers:
        return "no linear layer reads its output"
    missing = [name for name, m in readers if getattr(m, "bias", None) is None]
    if missing:
        return f"reader(s) {', '.join(missing)} have no bias to absorb the shift (adding one would change key names)"
    beta = norm.module.bias
    shift = float(beta.detach().to(torch.float64).mean())
    if shift == 0.0:
        return "mean(β) is already zero"
    before = _run(model, probes)
    saved = [(beta, beta.detach().clone())] + [(m.bias, m.bias.detach().clone()) for _, m in readers]
    ones = torch.full_like(beta, shift, dtype=torch.float64)
    for _, m in readers:
        m.bias.copy_(maths.fold_bias_into_reader(m.weight, m.bias, ones, _layout(m)).to(m.bias.dtype))
    beta.copy_((beta.detach().to(torch.float64) - shift).to(beta.dtype))
    after = _run(model, probes)
    change = float((after - before).abs().max() / before.abs().max().clamp_min(1e-30))
    if change > tol:
        for param, value in saved:
            param.copy_(value)
        return f"shifting it changed the LayerNorm model's output (relative {change:.1e}); something else reads it"
    return shift
