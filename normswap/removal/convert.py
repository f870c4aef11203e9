"""``convert_removal_``: replace a model's LayerNorms by a fixed scale ("none") or DyT ("dyt"), and measure the damage.

The result is an approximation by construction (LayerNorm's per-token division is what goes away), so the report
measures the naive gap on the calibration text and the model is meant to be healed with ``normswap finetune`` and
the ``remove-ln`` / ``dyt`` recipes. Before replacing, the residual writers are centred and the LM head untied (the
function-preserving steps of the exact RMSNorm path), so the stream the replacements read is zero-mean and a fixed
scale has only the per-token spread left to get wrong.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from normswap.adapters import adapter_for
from normswap.conversion import ConversionReport
from normswap.errors import NormswapError
from normswap.removal.calibrate import calibration_inputs, collect_stats, dyt_alpha, fixed_scale
from normswap.removal.modules import REPLACEMENTS, replace_removed_norms_
from normswap.surgery import build_plan, center_writers_, check_finite, ensure_has_layernorm, untie_head_
from normswap.verify import model_dtype, primary_output

logger = logging.getLogger(__name__)

TARGETS = tuple(REPLACEMENTS)
APPROXIMATION_NOTE = ("LayerNorm was removed, not converted: every replaced norm divides by a fixed number instead of "
                      "each token's own standard deviation, so this model is an approximation of the original; the "
                      "measured cross-entropy gap is in normswap.removal.naive (after conversion) and "
                      "normswap.finetune (after healing)")


class RemovalError(NormswapError):
    """A LayerNorm removal that cannot be done (unknown target, no LayerNorm, bad calibration text)."""


@dataclass
class RemovalReport(ConversionReport):
    """A :class:`ConversionReport` for ``--to none|dyt``: which norms were replaced, by what, and the naive gap."""

    target: str = "none"
    #: norm name -> {"scale": s} (none) or {"alpha": a} (dyt), as initialised from calibration.
    norms: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    #: Cross-entropy (nats/token) of the original and the converted model on the calibration text, and their KL.
    naive: dict = field(default_factory=dict)

    def removal_metadata(self) -> dict:
        return {"target": self.target, "norms": self.norms, "calibration": self.calibration, "naive": self.naive,
                "note": APPROXIMATION_NOTE}

    def metadata(self, source_id: str | None = None, revision: str | None = None, dtype: str | None = None) -> dict:
        meta = super().metadata(source_id, revision, dtype)
        meta["target"] = self.target
        meta["removal"] = self.removal_metadata()
        return meta

    def summary(self) -> str:
        what = "fixed per-norm scale (LayerNorm removed)" if self.target == "none" else "DyT: γ·tanh(α·x)+β"
        key = REPLACEMENTS[self.target][1]
        values = [v[key] for v in self.norms.values()]
        lines = [
            f"normswap {self.normswap_version}: {self.model_type}, approximate removal --to {self.target}",
            f"  replaced {len(self.norms)} LayerNorm(s) by {what}; {key} from {min(values):.4g} to {max(values):.4g}",
            f"  centred writers: {len(self.centered_writers)}"
            + ("   lm_head untied from the embedding" if self.untied_head else ""),
            f"  calibration: {self.calibration.get('source')}",
        ]
        if self.naive:
            lines.append(f"  naive gap on the calibration text: cross-entropy {self.naive['ce_original']:.4f} -> "
                         f"{self.naive['ce_converted']:.4f} nats (+{self.naive['ce_gap']:.4f}), KL "
                         f"{self.naive['kl']:.4f}, top-1 agreement {self.naive['top1_agreement']:.3f}")
        lines.append("  this is an approximation: heal it with `normswap finetune --recipe "
                     + ("remove-ln" if self.target == "none" else "dyt") + "`")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


@torch.no_grad()
def _set_blend(modules: list[nn.Module], value: float) -> None:
    for m in modules:
        m.blend = value


@torch.no_grad()
def naive_figures(model: nn.Module, modules: list[nn.Module], blocks: list[torch.Tensor], batch: int = 4) -> dict:
    """KL, top-1 agreement and cross-entropy of the converted model against the original, batch by batch.

    The original is the same model with every blend λ at 0 (the real LayerNorm on the centred stream: the same
    function), so no copy of the model and no stored logits are needed, whatever the vocabulary size.
    """
    device = next(model.parameters()).device
    causal = getattr(model, "get_output_embeddings", lambda: None)() is not None
    kl = top1 = ce_ref = ce_new = 0.0
    tokens = predicted = 0
    finite = True
    try:
        for i in range(0, len(blocks), batch):
            chunk = blocks[i:i + batch]
            width = min(len(b) for b in chunk)
            ids = torch.stack([b[:width] for b in chunk]).to(device)
            _set_blend(modules, 0.0)
            ref = primary_output(model(input_ids=ids)).detach().to(torch.float64)
            _set_blend(modules, 1.0)
            new = primary_output(model(input_ids=ids)).detach().to(torch.float64)
            finite = finite and bool(torch.isfinite(new).all())
            lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(new, -1)
            kl += float((lp.exp() * (lp - lq)).sum(-1).sum())
            top1 += float((ref.argmax(-1) == new.argmax(-1)).sum())
            tokens += ref.shape[0] * ref.shape[1]
            if causal and width > 1:
                target = ids[:, 1:, None]
                ce_ref -= float(lp[:, :-1].gather(-1, target).sum())
                ce_new -= float(lq[:, :-1].gather(-1, target).sum())
                predicted += target.numel()
    finally:
        _set_blend(modules, 1.0)
    out = {"kl": kl / max(tokens, 1), "top1_agreement": top1 / max(tokens, 1), "finite": finite, "tokens": tokens}
    if predicted:
        out.update(ce_original=ce_ref / predicted, ce_converted=ce_new / predicted,
                   ce_gap=(ce_new - ce_ref) / predicted)
    return out


def convert_removal_(model: nn.Module, target: str, *, tokenizer=None, calibration_text: str | None = None
                     ) -> RemovalReport:
    """Replace every LayerNorm the adapter knows by a norm-free module (``target`` "none" or "dyt"), in place.

    The scalars come from the norms' inputs on ``calibration_text`` (default: the embedded Macbeth excerpt). Sets
    ``model.config.normswap`` (mode "approximate", the target, every norm's scalar) so ``normswap.load`` and the
    remote code rebuild the modules, and returns a report with the naive (unhealed) gap.
    """
    if target not in TARGETS:
        raise RemovalError(f"unknown removal target {target!r}; known: {', '.join(TARGETS)}")
    ensure_has_layernorm(model)
    plan = build_plan(model, adapter_for(model), approximate=True)
    norms = {n.name: n.module for n in plan.norms if isinstance(n.module, nn.LayerNorm)}
    if not norms:
        raise RemovalError(f"this {plan.adapter.model_type} model has no LayerNorm the adapter can replace")
    check_finite(model)
    if calibration_text is None and tokenizer is not None:
        from normswap.assets import DEFAULT_TEXT, DEFAULT_TEXT_SOURCE

        calibration_text, text_source = DEFAULT_TEXT.read_text(encoding="utf-8"), DEFAULT_TEXT_SOURCE
    else:
        text_source = "user text" if calibration_text else None
    blocks, described = calibration_inputs(model, tokenizer, calibration_text)
    model.eval()
    untied = untie_head_(model)
    center_writers_(plan.writers)  # the LayerNorm model computes the same function; the replacements see mean 0
    stats = collect_stats(model, norms, blocks)
    key = REPLACEMENTS[target][1]
    values = {name: {key: fixed_scale(stats[name]) if target == "none" else dyt_alpha(stats[name], float(m.eps))}
              for name, m in norms.items()}
    removal = {"target": target, "norms": values}
    replace_removed_norms_(model, removal)
    naive = naive_figures(model, [model.get_submodule(name) for name in norms], blocks)
    notes = []
    if plan.unaccounted:
        notes.append(f"LayerNorms outside the adapter stay LayerNorm: {', '.join(plan.unaccounted)}")
    if not naive["finite"]:
        notes.append("the converted model produced non-finite outputs on the calibration text")
    report = RemovalReport(
        model_type=plan.adapter.model_type, mode="approximate", untied_head=untied,
        centered_writers=[w.name for w in plan.writers], swapped_norms=[], recentered_norms=[],
        approximate_norms=list(norms), kept_norms=plan.kept, unaccounted_norms=plan.unaccounted,
        folds={"gain": False, "bias": False}, notes=notes, target=target, norms=values,
        calibration={"source": f"{text_source or 'no text'}; {described}", "statistic":
                     "scale = 1/mean(std)" if target == "none" else "alpha = argmin Σ(tanh(αx) − LN_hat(x))²"},
        naive=naive,
    )
    source_id = getattr(model.config, "_name_or_path", None) or None
    model.config.normswap = report.metadata(source_id, getattr(model.config, "_commit_hash", None),
                                            str(model_dtype(model)).removeprefix("torch."))
    logger.info("removed %d LayerNorm(s) (--to %s)", len(norms), target)
    return report
