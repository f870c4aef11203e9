"""``convert_``: the one entry point that turns a live LayerNorm model into an RMSNorm model and measures itself."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from normswap._version import __version__
from normswap.adapters.registry import adapter_for, declared_adapter, discovery_note
from normswap.approximate import fold_bias_means_
from normswap.errors import NotExactError
from normswap.folding import FoldResult, fold_
from normswap.surgery import (
    Plan,
    build_plan,
    center_writers_,
    check_finite,
    ensure_has_layernorm,
    swap_norms_,
    untie_head_,
)
from normswap.verification.engine import TruthVerifier
from normswap.verify import VerificationResult, make_probes, model_dtype

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


class VerifiedReport:
    """What every conversion report (LayerNorm swap, BatchNorm fold) shares: a dataclass with a ``verification``."""

    verification: VerificationResult | None

    @property
    def passed(self) -> bool:
        return self.verification is None or self.verification.passed

    def to_dict(self) -> dict:
        d = asdict(self)
        d["verification"] = self.verification.to_dict() if self.verification else None
        return d


@dataclass
class ConversionReport(VerifiedReport):
    """What ``convert_`` did and how well the result matches the original; also saved in the config."""

    model_type: str
    mode: str  # "exact" | "approximate"
    untied_head: bool
    centered_writers: list[str]
    swapped_norms: list[str]
    recentered_norms: list[str]
    approximate_norms: list[str]
    kept_norms: list[str]
    unaccounted_norms: list[str]
    folds: dict = field(default_factory=dict)
    #: Approximate mode: norms whose mean(β) moved into their readers' biases (name -> mean), and why others did not.
    bias_means: dict = field(default_factory=dict)
    #: Writers re-centred at run time ({module name: "output"|"input"}); normswap.load and the remote code
    #: re-install them (no weights change, so the stock class, whose LayerNorms ignore the mean, loads it as is).
    recentered_writers: dict = field(default_factory=dict)
    verification: VerificationResult | None = None
    notes: list[str] = field(default_factory=list)
    normswap_version: str = __version__

    def metadata(self, source_id: str | None = None, revision: str | None = None, dtype: str | None = None) -> dict:
        """The ``normswap`` block stored in config.json: enough for ``normswap.load`` and for a reader of the card."""
        d = self.to_dict()
        ver = d["verification"]
        return {
            "version": self.normswap_version,
            "source": {"id": source_id, "revision": revision},
            "model_type": self.model_type,
            "mode": self.mode,
            "folds": {k: d["folds"].get(k) for k in ("gain", "bias", "gain_folded", "bias_folded")},
            "untied_head": self.untied_head,
            "swapped_norms": self.swapped_norms,
            "recentered_norms": self.recentered_norms,
            "recentered_writers": self.recentered_writers,
            "approximate_norms": self.approximate_norms,
            "dtype": dtype,
            "verification": {k: v for k, v in ver.items() if k not in ("norm_inputs", "blocks")} if ver else None,
        }

    def summary(self) -> str:
        # A writer re-centred at run time (a hook; its weights are unchanged) is listed with the writers but is
        # not a centred writer: the count says how many had their weights centred.
        recentred = [w for w in self.centered_writers if w in self.recentered_writers]
        lines = [
            f"normswap {self.normswap_version}: {self.model_type}, {self.mode} conversion",
            f"  centred writers: {len(self.centered_writers) - len(recentred)}"
            + (f"   re-centred at run time: {len(recentred)}" if recentred else "")
            + f"   swapped norms: {len(self.swapped_norms)} "
            f"({len(self.approximate_norms)} approximate)   kept LayerNorms: {len(self.kept_norms)}"
            + ("   lm_head untied from the embedding" if self.untied_head else ""),
        ]
        if self.recentered_norms:
            lines.append(f"  re-centring RMSNorm (norm that writes the stream): {', '.join(self.recentered_norms)}")
        if self.folds.get("gain") or self.folds.get("bias"):
            lines.append(
                f"  folds: gain into {len(self.folds.get('gain_folded', []))} norm(s)' readers, bias into "
                f"{len(self.folds.get('bias_folded', []))}; skipped {len(self.folds.get('skipped', {}))}"
            )
        if self.unaccounted_norms:
            lines.append(f"  LayerNorms the adapter does not cover (left as LayerNorm): {', '.join(self.unaccounted_norms)}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.verification is not None:
            v = self.verification
            if v.reference == "float64" and v.mode == "approximate" and v.passed:
                lines.append(f"  verification: {v.summary()}")  # no bound was applied: no PASSED
            else:
                lines.append(f"  verification {'PASSED' if v.passed else 'FAILED'}: {v.summary()}")
            if self.verification.uncentered_exact_norms:
                lines.append(f"  not zero-mean at: {', '.join(self.verification.uncentered_exact_norms)}")
        return "\n".join(lines)


def plan_conversion(model: nn.Module, approximate: bool = False) -> Plan:
    """What ``convert_`` would do to ``model`` (no changes made); raises for unsupported or already-RMS models.

    A declared adapter wins; any other model type is discovered from its config (a small instance, measured), and
    discovery, not the class names, decides whether there is a LayerNorm at all (CohereLayerNorm, OlmoLayerNorm).
    """
    if declared_adapter(model.config.model_type) is not None:
        ensure_has_layernorm(model)
    adapter = adapter_for(model)
    return build_plan(model, adapter, approximate=approximate)


def not_exact_message(plan: Plan) -> str:
    reasons = "; ".join(plan.not_exact_reasons) or "some norms read a stream that is not a sum of centred writers"
    return (
        f"cannot convert this {plan.adapter.model_type} model exactly: {reasons}. "
        "Use the approximate path instead: `normswap convert SRC -o OUT --approximate` (or "
        "`normswap.convert_(model, approximate=True)`), then heal it with `normswap finetune`."
    )


@torch.no_grad()
def convert_(
    model: nn.Module,
    *,
    approximate: bool = False,
    fold_gain: bool = False,
    fold_bias: bool = False,
    verify_result: bool = True,
    tolerance: float | None = None,
    tokenizer=None,
    probes: dict | None = None,
    dtype: str | torch.dtype | None = None,
) -> ConversionReport:
    """Convert ``model``'s LayerNorms to RMSNorm in place and return a report with verification figures.

    Exact mode refuses (before touching anything) models whose norms cannot be swapped exactly. Verification runs
    the model on probe inputs before and after; a failed verification is recorded in the report (``report.passed``),
    and :func:`normswap.save` refuses to write such a model unless forced.

    The reference is the original run in float64; ``dtype`` is the dtype the model will be saved in (default: its
    current dtype), and both the original and the converted model are measured at it. An exact conversion passes
    when its error against the float64 original is no worse than 1.5× the original's own error at that dtype (or a
    few ulps), and every swapped norm's input and every writer's output is zero-mean; ``tolerance`` replaces that
    bound with a fixed relative one.
    """
    plan = plan_conversion(model, approximate=approximate)
    if plan.approximate_norms and not approximate:
        raise NotExactError(not_exact_message(plan))
    check_finite(model)

    if probes is None and (verify_result or fold_gain or fold_bias or (approximate and plan.approximate_norms)):
        probes = make_probes(model, tokenizer)
    verifier = None
    if verify_result:
        saved_dtype = _DTYPES.get(dtype, dtype) if dtype is not None else model_dtype(model)
        verifier = TruthVerifier(model, plan.adapter, probes, saved_dtype)

    untied = untie_head_(model)
    center_writers_(plan.writers)
    bias_means = fold_bias_means_(model, plan, probes) if approximate and plan.approximate_norms else None
    fold_result = FoldResult()
    if fold_gain or fold_bias:
        fold_result = fold_(model, plan.norms, probes, gain=fold_gain, bias=fold_bias)
    swap_norms_(model, plan.norms)

    notes = [discovery_note(plan.adapter)] if plan.adapter.origin == "discovered" else []
    if plan.unaccounted:
        notes.append("LayerNorms outside the adapter stay LayerNorm (they still remove the mean themselves)")
    if approximate and plan.approximate_norms:
        notes.append(
            f"{len(plan.approximate_norms)} norm(s) read a stream that is not zero-mean; their swap is approximate "
            "(see verification; heal with `normswap finetune`)"
        )
    if bias_means is not None and bias_means.folded:
        notes.append(
            f"moved mean(β) of {len(bias_means.folded)} norm(s) into the biases of the layers that read them "
            "(the LayerNorm model is unchanged; the RMSNorms downstream see a smaller mean)"
        )
    report = ConversionReport(
        model_type=plan.adapter.model_type,
        mode="approximate" if approximate and plan.approximate_norms else "exact",
        untied_head=untied,
        centered_writers=[w.name for w in plan.writers],
        swapped_norms=[n.name for n in plan.norms],
        recentered_norms=[n.name for n in plan.norms if n.spec.writes_stream],
        recentered_writers=plan.recentered_writers,
        approximate_norms=plan.approximate_norms,
        kept_norms=plan.kept,
        unaccounted_norms=plan.unaccounted,
        folds={"gain": fold_gain, "bias": fold_bias, **asdict(fold_result)},
        bias_means=asdict(bias_means) if bias_means is not None else {},
        notes=notes,
    )
    if verify_result:
        desc = "tokenizer text + random ids" if tokenizer is not None else "random inputs"
        report.verification = verifier.finish(model, {n.name: n.exact for n in plan.norms}, mode=report.mode,
                                              tolerance=tolerance, probe=desc)
        if not report.verification.passed:
            logger.warning("verification failed: %s", report.verification.summary())
    source_id = getattr(model.config, "_name_or_path", None) or None
    model.config.normswap = report.metadata(source_id, getattr(model.config, "_commit_hash", None),
                                            str(_DTYPES.get(dtype, dtype) if dtype is not None
                                                else model_dtype(model)).removeprefix("torch."))
    return report
