"""``fold_batchnorms_``: fold every BatchNorm that follows a conv/linear into it, verify, and report what stayed.

The model keeps its stock module tree and keys (see :mod:`normswap.batchnorm.fold`), so ``normswap.save`` writes a
checkpoint the stock class loads with the folded function; ``normswap.load`` and the shipped remote code then
remove the BatchNorms (``batchnorm_folded`` in the config's ``normswap`` block says which, and into what).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from normswap._version import __version__
from normswap.batchnorm.discover import Discovery, FoldPair, batchnorm_modules, discover, output_tensors
from normswap.batchnorm.fold import fold_into_stored_form_
from normswap.conversion import VerifiedReport
from normswap.errors import NormswapError, and_more
from normswap.surgery import check_finite
from normswap.verify import (
    VerificationResult,
    make_probes,
    model_dtype,
    primary_output,
    reference_outputs,
    verify,
)

logger = logging.getLogger(__name__)

#: Max relative |Δoutput| accepted for a fold, by dtype: folding only re-rounds, so fp32 is held to 1e-5.
FOLD_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}

SEMANTICS = ("inference: each BatchNorm used its running statistics (eval mode); a model trained further with "
             "batch statistics is a different function")


class NothingToFoldError(NormswapError):
    """``--to none`` found no BatchNorm that follows a conv/linear layer."""


class BatchStatisticsError(NormswapError):
    """Folding was asked of a BatchNorm whose batch statistics must be kept (training-mode semantics)."""


@dataclass
class BatchNormReport(VerifiedReport):
    """What ``fold_batchnorms_`` folded, what it kept and why, and how well the result matches the original."""

    model_type: str
    folded: list[FoldPair]
    kept: dict[str, str]
    verification: VerificationResult | None = None
    notes: list[str] = field(default_factory=list)
    semantics: str = SEMANTICS
    mode: str = "exact"
    target: str = "none"
    normswap_version: str = __version__

    # The fields the before/after report and model card read from a LayerNorm ConversionReport.
    @property
    def swapped_norms(self) -> list[str]:
        return [p.batchnorm for p in self.folded]

    @property
    def folds(self) -> dict:
        return {"batchnorm_folded": len(self.folded), "batchnorm_kept": len(self.kept)}

    def metadata(self, source_id: str | None = None, revision: str | None = None, dtype: str | None = None) -> dict:
        """The config's ``normswap`` block: ``batchnorm_folded`` drives ``normswap.load`` and the remote code."""
        ver = self.verification.to_dict() if self.verification else None
        return {
            "version": self.normswap_version,
            "source": {"id": source_id, "revision": revision},
            "model_type": self.model_type,
            "mode": self.mode,
            "target": self.target,
            "semantics": self.semantics,
            "batchnorm_folded": [asdict(p) for p in self.folded],
            "batchnorm_kept": dict(self.kept),
            # LayerNorm fields, empty: readers of the block (load, card) need not special-case this target.
            "swapped_norms": [],
            "recentered_norms": [],
            "approximate_norms": [],
            "folds": {"gain": False, "bias": False},
            "untied_head": False,
            "dtype": dtype,
            "verification": {k: v for k, v in ver.items() if k != "norm_inputs"} if ver else None,
        }

    def summary(self) -> str:
        lines = [
            f"normswap {self.normswap_version}: {self.model_type}, BatchNorm → none ({self.mode}, inference semantics)",
            f"  folded BatchNorms: {len(self.folded)}   kept: {len(self.kept)}",
        ]
        for name, reason in self.kept.items():
            lines.append(f"  kept {name}: {reason}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.verification is not None:
            status = "PASSED" if self.verification.passed else "FAILED"
            lines.append(f"  verification {status}: {self.verification.summary()}")
        return "\n".join(lines)


class _AllOutputs(nn.Module):
    """A model whose first output is not one tensor (a backbone's tuple of feature maps), seen as one that returns
    all its floating-point outputs flattened into one row: what verification then compares."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.train(model.training)  # a new Module is in training mode; restoring that would put BatchNorms there

    def forward(self, **inputs) -> tuple[torch.Tensor]:
        tensors = [t for t in output_tensors(self.model(**inputs)) if t.is_floating_point()]
        return (torch.cat([t.reshape(-1).to(tensors[0].dtype) for t in tensors])[None],)


def verifiable(model: nn.Module, probes: dict) -> nn.Module:
    """``model`` itself when its primary output is a tensor, else a view of it whose output is (see _AllOutputs)."""
    with torch.no_grad():
        out = primary_output(model.eval()(**probes))
    return model if isinstance(out, torch.Tensor) else _AllOutputs(model)


def float64_outputs(model: nn.Module, probes: dict) -> torch.Tensor | None:
    """The primary output of a float64 copy of ``model`` (the reference both fp32 models are measured against);
    ``None`` when the model cannot run in float64 (some build fp32 tensors inside their forward)."""
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        twin = copy.deepcopy(model).double().eval()
        inputs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in probes.items()}
        return primary_output(twin(**inputs)).detach().double().cpu()
    except (RuntimeError, TypeError, ValueError) as exc:
        logger.info("no float64 reference: %s", exc)
        return None
    finally:
        torch.set_default_dtype(previous)


def check_inference_semantics(model: nn.Module, keep_batch_stats: bool = False) -> None:
    """Refuse, with the reason, any request whose BatchNorms must go on using batch statistics."""
    if keep_batch_stats:
        raise BatchStatisticsError(
            "cannot fold BatchNorm while keeping batch statistics: folding replaces each BatchNorm by the fixed "
            "affine map of its running statistics (inference semantics); a model that normalises with the "
            "statistics of each batch (training mode) has no fixed map to fold. Drop --keep-batch-stats"
        )
    if model.training:
        raise BatchStatisticsError(
            "the model is in training mode, where BatchNorm normalises with the statistics of each batch; folding "
            "uses the running statistics (inference semantics). Call model.eval() first if that is what you want"
        )


def nothing_to_fold_message(model: nn.Module, kept: dict[str, str]) -> str:
    """What was found instead of a foldable BatchNorm, in one line."""
    kind = getattr(model.config, "model_type", type(model).__name__)
    if not kept:
        norms = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
        found = f"norm modules: {', '.join(norms)}" if norms else "no norm modules at all"
        return f"--to none found no BatchNorm in this {kind} model ({found}), so there is nothing to fold"
    first = "; ".join(f"{n}: {r}" for n, r in list(kept.items())[:2])
    more = and_more(len(kept), 2)
    return (f"--to none found {len(kept)} BatchNorm(s) in this {kind} model and none can be folded exactly: "
            f"{first}{more}")


@torch.no_grad()
def fold_batchnorms_(
    model: nn.Module,
    *,
    keep_batch_stats: bool = False,
    verify_result: bool = True,
    tolerance: float | None = None,
    tokenizer=None,
    probes: dict | None = None,
    discovery: Discovery | None = None,
) -> BatchNormReport:
    """Fold, in place and in float64, every BatchNorm that reads the output of a conv/linear layer alone.

    Structure is measured on one probe forward (:func:`normswap.batchnorm.discover.discover`), never read from
    names. The model stays loadable by its stock class; the report lists every kept BatchNorm with its reason and
    the verification figures (outputs before and after on the same probes). Raises :class:`NothingToFoldError`
    when nothing folds and :class:`BatchStatisticsError` for training-mode semantics, before touching anything.
    ``discovery`` reuses a :func:`discover` result measured on the same ``probes`` (the CLI measures first).
    """
    check_inference_semantics(model, keep_batch_stats)
    bns = batchnorm_modules(model)
    if not bns:
        raise NothingToFoldError(nothing_to_fold_message(model, {}))
    check_finite(model)
    if probes is None:
        try:
            probes = make_probes(model, tokenizer)
        except ValueError as exc:
            raise NormswapError(f"cannot build probe inputs to trace this model: {exc}") from None
    found = discovery if discovery is not None else discover(model, probes)
    if not found.pairs:
        raise NothingToFoldError(nothing_to_fold_message(model, found.kept))
    target = verifiable(model, probes) if verify_result else model
    reference = reference_outputs(target, probes) if verify_result else None
    truth = float64_outputs(target, probes) if verify_result else None
    for pair in found.pairs:
        fold_into_stored_form_(model.get_submodule(pair.into), model.get_submodule(pair.batchnorm))
    report = BatchNormReport(model_type=getattr(model.config, "model_type", type(model).__name__),
                             folded=found.pairs, kept=found.kept)
    if found.kept:
        report.notes.append(f"{len(found.kept)} BatchNorm(s) stay BatchNorm (reasons above)")
    if verify_result:
        if tolerance is None:
            tolerance = FOLD_TOLERANCE.get(model_dtype(model), 1e-4)
        desc = "tokenizer text + random ids" if tokenizer is not None else "random inputs"
        report.verification = ver = verify(target, probes, reference, {}, tolerance=tolerance, probe_desc=desc)
        ver.dtype = str(model_dtype(model)).removeprefix("torch.")
        if truth is not None:
            scale = float(truth.abs().max()) or 1.0
            ver.original_error = float((reference - truth).abs().max()) / scale
            ver.converted_error = float((primary_output(target(**probes)).double().cpu() - truth).abs().max()) / scale
            ver.ratio = ver.converted_error / ver.original_error if ver.original_error else None
            report.notes.append(
                f"against the original run in float64: folded {ver.converted_error:.1e}, original in {ver.dtype} "
                f"{ver.original_error:.1e} (relative max |Δ|)")
        if not report.verification.passed:
            logger.warning("verification failed: %s", report.verification.summary())
    source_id = getattr(model.config, "_name_or_path", None) or None
    model.config.normswap = report.metadata(source_id, getattr(model.config, "_commit_hash", None),
                                            str(model_dtype(model)).removeprefix("torch."))
    return report
