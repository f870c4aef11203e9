"""Put the three runs together into a :class:`~normswap.verify.VerificationResult`, in memory or from files.

:class:`TruthVerifier` is the in-memory path ``convert_`` uses: it runs the original in float64 and at the saved
dtype *before* the in-place conversion (module by module, so no copy of the model is made, whatever its size),
then the converted model after it, and judges.
"""

from __future__ import annotations

import torch
from torch import nn

from normswap.adapters import Adapter
from normswap.verification.figures import (
    ERROR_MARGIN,
    block_figures,
    centred_output,
    floor_for,
    is_raw_stream,
    mean_threshold,
    other_output_figures,
    output_figures,
)
from normswap.verification.runs import Run, capture, dtype_name
from normswap.verification.structure import Block, embedding_writers, resolve_blocks
from normswap.verify import NormInputStats, VerificationResult


def is_logits(model: nn.Module, out: torch.Tensor) -> bool:
    """Whether the primary output is a distribution over classes/tokens (KL, top-1) or a hidden state (cosine)."""
    hidden = getattr(model.config.get_text_config(), "hidden_size", None)
    get_out = getattr(model, "get_output_embeddings", None)
    try:
        has_head = get_out is not None and get_out() is not None
    except (NotImplementedError, AttributeError):
        has_head = False
    return has_head or out.shape[-1] != hidden


def judge(truth: Run, original: Run, converted: Run, *, blocks: list[Block], norms: dict[str, bool], mode: str,
          logits: bool, tolerance: float | None = None, probe: str = "", scope: str = "",
          raw_outputs: tuple[str, ...] = (), stream_axis: int = -1) -> VerificationResult:
    """The verdict: exact mode passes when the converted model is no further from the float64 original than the
    original at the same dtype (×1.5, or a floor of a few ulps), every exact norm input and every writer output
    is zero-mean, and every block's stream passes the same test. ``tolerance`` replaces the bound when given.

    ``raw_outputs`` are the adapter's ``raw_stream_outputs``: outputs that *are* the residual stream (CLIP vision's
    ``last_hidden_state``) come back mean-removed by design, so they are compared after removing each token's
    mean from every run; every other output the model returns is held to the same bound as the primary one.
    ``stream_axis`` is the stream's hidden axis (the adapter's: 1 for a channels-first stream such as VitDet's)."""
    exact = mode == "exact"
    raw = [n for n in [converted.output_name, *converted.others] if is_raw_stream(n, raw_outputs)]
    fig = output_figures(*(centred_output(r, raw, stream_axis) for r in (truth, original, converted)), logits)
    dtype = converted.dtype
    floor = floor_for(dtype)
    bound = tolerance if tolerance is not None else max(ERROR_MARGIN * fig["original_error"], floor)
    others = other_output_figures(truth, original, converted, raw, tolerance, stream_axis)
    limit = mean_threshold(dtype)
    norm_inputs = {n: NormInputStats(r, rms, norms[n]) for n, (r, rms) in converted.norms.items() if n in norms}
    uncentred_norms = [n for n, s in norm_inputs.items() if s.exact and s.max_mean_over_rms >= limit]
    uncentred_writers = [n for n, r in converted.writers.items() if exact and r >= limit]
    records, failure = block_figures(blocks, truth, original, converted, exact=exact, norms=norms, axis=stream_axis)
    if failure is None and uncentred_writers:
        failure = f"{uncentred_writers[0]} output not centred (|mean|/rms {converted.writers[uncentred_writers[0]]:.1e})"
    if failure is None and uncentred_norms:
        failure = f"{uncentred_norms[0]} input not zero-mean"
    if failure is None and exact and fig["converted_error"] > bound:
        failure = (f"output: {fig['converted_error']:.1e} from the float64 original, more than the bound "
                   f"{bound:.1e}")
    if failure is None and exact:
        failure = next((f"output {n}: {f['converted_error']:.1e} from the float64 original, more than the bound "
                        f"{f['bound']:.1e}" for n, f in others.items() if not f["passed"]), None)
    random = next((f"{what} draws random numbers in its forward ({r.random_draws})"
                   for what, r in (("the original", truth), ("the converted model", converted)) if r.random_draws), None)
    if random is not None:  # the runs compare different computations: whatever the figures, nothing is certified
        failure = (f"not verified: {random}, so its outputs depend on the draws and no run certifies another; pass "
                   "the random inputs explicitly (ViT-MAE: noise)")
    passed = not uncentred_norms and (not exact or failure is None) and random is None
    return VerificationResult(
        max_abs_diff=fig["max_abs_diff"], max_abs_reference=fig["max_abs_reference"],
        rel_max_abs_diff=fig["rel_max_abs_diff"], kl=fig["kl"], top1_agreement=fig["top1_agreement"],
        cosine_min=fig["cosine_min"], tolerance=bound, output_kind="logit" if logits else "hidden", probe=probe,
        norm_inputs=norm_inputs, uncentered_exact_norms=uncentred_norms, passed=passed,
        cosine_mean=fig["cosine_mean"], reference="float64", dtype=dtype_name(dtype),
        original_error=fig["original_error"], converted_error=fig["converted_error"], ratio=fig["ratio"],
        floor=floor, mode=mode, blocks=records, blocks_checked=len(records), first_failure=failure,
        uncentered_writers=uncentred_writers, scope=scope, output_name=converted.output_name,
        raw_stream_outputs=raw, outputs=others,
    )


def all_writers(model: nn.Module, adapter: Adapter, blocks: list[Block]) -> list[tuple[str, nn.Module]]:
    found = list(embedding_writers(model, adapter))
    for block in blocks:
        found += [(f"{block.name}.{path}", module) for path, module in block.writers]
    return found


class TruthVerifier:
    """Measure the original before an in-place conversion, the converted model after it, and judge.

    ``dtype`` is the dtype the model will be saved in (default: its current dtype). The runs cast one module at a
    time (:mod:`normswap.verification.casting`), so the float64 truth costs one module's weights in float64, not a
    float64 copy of the model.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, probes: dict, dtype: torch.dtype) -> None:
        self.adapter, self.probes, self.dtype = adapter, probes, dtype
        self.blocks = resolve_blocks(model, adapter)
        self.truth = capture(model, probes, torch.float64, self.blocks, what="the original")
        self.original = capture(model, probes, dtype, self.blocks, what="the original")

    @property
    def reference(self) -> torch.Tensor:
        """The original's output at the saved dtype (what the approximate path and folds compare against)."""
        return self.original.output

    def finish(self, model: nn.Module, norms: dict[str, bool], *, mode: str, tolerance: float | None = None,
               probe: str = "") -> VerificationResult:
        writers = all_writers(model, self.adapter, self.blocks)
        converted = capture(model, self.probes, self.dtype, self.blocks, writers=writers, norms=list(norms),
                            what="the converted model")
        scope = f"whole model in memory, run module by module in float64 and {dtype_name(self.dtype)}"
        return judge(self.truth, self.original, converted, blocks=self.blocks, norms=norms, mode=mode,
                     logits=is_logits(model, converted.output), tolerance=tolerance, probe=probe, scope=scope,
                     raw_outputs=self.adapter.raw_stream_outputs, stream_axis=self.adapter.stream_axis)
