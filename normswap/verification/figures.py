"""Judge a conversion from three runs: the original in float64 (the truth) and both models at the saved dtype.

The question verification answers is "does the converted model compute what the original computes?", and the
original itself only approximates that at fp32/bf16/fp16. A LayerNorm reading a stream with a large mean loses
digits to cancellation that the centred model keeps, so comparing the converted model with the original at the
same dtype blames the original's rounding on the conversion. Both are therefore measured against the original
run in float64, and an exact conversion passes when it is no further from that truth than the original at the
same dtype is (with a 1.5× margin), or than a few units in the last place of the output: the bound below which
no model at that dtype can be, whatever it computes.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from normswap.verification.runs import Run, dtype_name
from normswap.verification.structure import Block

#: The converted error may exceed the original's by this factor before it counts as worse (run-to-run spread of
#: the ratio on the registered architectures' tiny models: 0.09–1.33, 3 seeds × 19 configurations × 3 dtypes).
ERROR_MARGIN = 1.5
#: Absolute floor of the bound, in units of the dtype's epsilon relative to max |output|. Centring changes every
#: writer weight, so at fp32/bf16/fp16 the converted model is the same exact model rounded *differently*: its
#: error against the truth is a new draw from the distribution the original's is drawn from, and the ratio of two
#: draws exceeds 1.5 by chance where centring gains nothing (writers with little mean). Measured on the 30 tiny
#: rows × 3 seeds (scripts/bench_exactness.py --tiny-table 3, docs/EXACTNESS.md): converted errors 1.3–4.6 ulps
#: in fp32, 0.5–6.6 in bf16/fp16, ratios up to 1.60 (CLIP in fp16). Below 8 ulps of the output scale no model
#: stored at that dtype can be told apart from another rounding of itself; bugs (an uncentred writer) are caught
#: by the zero-mean checks, which do not depend on this bound.
FLOOR_ULPS = 8
#: |mean|/rms of a writer's output or a swapped norm's input above which it is "not centred", by run dtype. fp32:
#: centred streams show 1e-8–1e-7, uncentred ≥ 2e-2. 16-bit runs round every sum to 8/11 bits, which leaves a
#: mean of about the dtype's epsilon / sqrt(hidden).
MEAN_THRESHOLD = {torch.float64: 1e-4, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def floor_for(dtype: torch.dtype) -> float:
    return FLOOR_ULPS * torch.finfo(dtype).eps


def mean_threshold(dtype: torch.dtype) -> float:
    return MEAN_THRESHOLD.get(dtype, 1e-2)


def rel_error(x: torch.Tensor, truth: torch.Tensor) -> float:
    return float((x - truth).abs().max()) / max(float(truth.abs().max()), 1e-300)


def _centre(x: torch.Tensor, axis: int = -1) -> torch.Tensor:
    return x - x.mean(axis, keepdim=True)


#: Output fields that hold the stream after each block in every transformers model (issue 13: they come back
#: mean-removed after an exact conversion), whatever the adapter lists.
STREAM_TUPLES = ("hidden_states", "encoder_hidden_states", "decoder_hidden_states")


def is_raw_stream(name: str, raw_outputs: tuple[str, ...] | list[str]) -> bool:
    """Whether output field ``name`` ("last_hidden_state", "hidden_states.3") is one of the raw stream outputs."""
    if any(part in STREAM_TUPLES for part in name.split(".")):
        return True
    return any(name == r or name.startswith(r + ".") for r in raw_outputs)


def centred_output(run: Run, raw: list[str], axis: int = -1) -> Run:
    """``run`` with its primary output mean-removed per token when that output is the raw residual stream (over
    ``axis``, the stream's hidden axis)."""
    return replace(run, output=_centre(run.output, axis)) if run.output_name in raw else run


def other_output_figures(truth: Run, original: Run, converted: Run, raw: list[str],
                         tolerance: float | None, axis: int = -1) -> dict[str, dict]:
    """Every output besides the primary one (pooler_output, the towers' outputs of a dual encoder), each held to
    its own bound; raw stream outputs are compared after removing each token's mean (in every run)."""
    floor = floor_for(converted.dtype)
    found = {}
    for name, c in converted.others.items():
        t, o = truth.others.get(name), original.others.get(name)
        if t is None or o is None or t.shape != c.shape or o.shape != c.shape:
            continue
        if name in raw:
            t, o, c = _centre(t, axis), _centre(o, axis), _centre(c, axis)
        o_err, c_err = rel_error(o, t), rel_error(c, t)
        bound = tolerance if tolerance is not None else max(ERROR_MARGIN * o_err, floor)
        found[name] = {"original_error": o_err, "converted_error": c_err, "bound": bound, "passed": c_err <= bound,
                       "mean_removed": name in raw}
    return found


def output_figures(truth: Run, original: Run, converted: Run, is_logits: bool) -> dict:
    """Errors of both models against the truth, and the distribution figures of the converted one."""
    t, o, c = truth.output, original.output, converted.output
    figures = {
        "original_error": rel_error(o, t),
        "converted_error": rel_error(c, t),
        "max_abs_diff": float((c - o).abs().max()),
        "max_abs_reference": float(o.abs().max()),
        "rel_max_abs_diff": rel_error(c, o),
        "kl": None, "top1_agreement": None, "cosine_min": None, "cosine_mean": None,
    }
    if is_logits:
        logp_t, logp_c = torch.log_softmax(t, -1), torch.log_softmax(c, -1)
        figures["kl"] = float((logp_t.exp() * (logp_t - logp_c)).sum(-1).mean())
        figures["top1_agreement"] = float((t.argmax(-1) == c.argmax(-1)).double().mean())
    else:
        cos = torch.nn.functional.cosine_similarity(c, t, dim=-1)
        figures["cosine_min"], figures["cosine_mean"] = float(cos.min()), float(cos.mean())
    o_err = figures["original_error"]
    figures["ratio"] = figures["converted_error"] / o_err if o_err > 0 else None
    return figures


def block_figures(blocks: list[Block], truth: Run, original: Run, converted: Run, *, exact: bool,
                  norms: dict[str, bool], axis: int = -1) -> tuple[list[dict], str | None]:
    """Per block: both streams' errors against the truth after centring, and what failed first (None: nothing).

    The converted stream is zero-mean by construction; the original's carries the mean its writers add, which
    LayerNorm removes. Centring both before comparing compares what the next norm sees.
    """
    dtype = converted.dtype
    limit = mean_threshold(dtype)
    floor = floor_for(dtype)
    records, failure = [], None
    for i, block in enumerate(blocks):
        t, o, c = truth.blocks[i], original.blocks[i], converted.blocks[i]
        record: dict = {"block": block.label, "name": block.name}
        problems = []
        for path, _module in block.writers:
            ratio = converted.writers.get(f"{block.name}.{path}")
            if ratio is not None and exact and ratio >= limit:
                problems.append(f"{path} output not centred (|mean|/rms {ratio:.1e})")
        for name, (ratio, _rms) in converted.norms.items():
            if name.startswith(block.name + ".") and norms.get(name) and ratio >= limit:
                problems.append(f"{name[len(block.name) + 1:]} input not zero-mean (|mean|/rms {ratio:.1e})")
        if t is not None and o is not None and c is not None and t.shape == c.shape:
            tc = _centre(t, axis)
            scale = max(float(tc.abs().max()), 1e-300)
            o_err = float((_centre(o, axis) - tc).abs().max()) / scale
            c_err = float((_centre(c, axis) - tc).abs().max()) / scale
            record.update(original_error=o_err, converted_error=c_err,
                          mean_ratio=float((c.mean(axis).abs() / c.pow(2).mean(axis).sqrt().clamp_min(1e-300)).max()))
            if exact and not problems and c_err > max(ERROR_MARGIN * o_err, floor):
                problems.append(f"output stream {c_err:.1e} from the float64 original after centring, the original "
                                f"in {dtype_name(dtype)}: {o_err:.1e}")
        record["passed"] = not problems
        if problems:
            record["problems"] = problems
            if failure is None:
                failure = f"{block.label}: {problems[0]}"
        records.append(record)
    return records, failure
