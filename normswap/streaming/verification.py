"""Checking a streamed output against its source: the whole model when both fit, else a few layers of it.

A model cut down to some of its layers is still a model whose norms read a sum of centred writers, so comparing the
truncated source with the same truncation of the output checks the same identity (LN(x) == RMSNorm(x) on centred
streams) on real weights: embeddings, the sampled blocks, the final norm and the head. The cut-down checkpoints are
written with the streaming writer and loaded with the stock loaders, exactly like the full comparison.
"""

from __future__ import annotations

import gc
import re
import tempfile
from pathlib import Path

import torch
import transformers

from normswap.checkpoint import copy_preprocessing_files, load, load_source
from normswap.streaming.output import OutputTensor, pack_shards
from normswap.streaming.plan import NameMap, StreamPlan
from normswap.streaming.safetensors_io import TORCH_DTYPES
from normswap.streaming.source import SourceCheckpoint, available_ram, open_checkpoint
from normswap.streaming.writer import write_shards
from normswap.verify import DEFAULT_TOLERANCE, VerificationResult, make_probes, reference_outputs, verify

VERIFY_MODES = ("auto", "full", "sample", "none")
#: Verification loads the source and the output in float32; "auto" does so only within this share of free RAM.
VERIFY_RAM_FRACTION = 0.25


def sample_layers(num_layers: int) -> list[int]:
    """First and last block: the first reads the embeddings, the last feeds the final norm and the head."""
    return sorted({0, max(num_layers - 1, 0)})


#: |mean|/rms a 16-bit output still shows at a norm input: its centred weights were rounded after centring, which
#: leaves a mean of about the dtype's epsilon / sqrt(hidden). A writer left uncentred shows ≥ 2e-2.
ROUNDED_MEAN_RATIO = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _narrow_dtypes(out: SourceCheckpoint) -> set[torch.dtype]:
    return {TORCH_DTYPES[e.dtype] for e in out.tensors.values() if e.dtype in ("F16", "BF16")}


def _tolerance(tolerance: float | None, out: SourceCheckpoint) -> float | None:
    """Output weights rounded to 16 bits after centring differ from the source at that precision: judge them so."""
    if tolerance is not None:
        return tolerance
    return max((DEFAULT_TOLERANCE[d] for d in _narrow_dtypes(out)), default=None)


def _judge_rounded(result: VerificationResult, out: SourceCheckpoint) -> VerificationResult:
    """Re-judge the zero-mean check of a 16-bit output at the precision it was stored in.

    The in-memory path verifies before casting to 16 bits, so its check never sees the rounding; the streamed
    output is verified as written, where a 1e-4 threshold would fail every bf16 checkpoint.
    """
    threshold = max((ROUNDED_MEAN_RATIO[d] for d in _narrow_dtypes(out)), default=None)
    if threshold is None:
        return result
    result.uncentered_exact_norms = [n for n, s in result.norm_inputs.items()
                                     if s.exact and s.max_mean_over_rms >= threshold]
    exact_claimed = all(s.exact for s in result.norm_inputs.values())
    result.passed = not result.uncentered_exact_norms and (result.rel_max_abs_diff <= result.tolerance
                                                          or not exact_claimed)
    result.probe += f"; zero-mean check at {threshold:.0e} (weights stored in 16 bits)"
    return result


def _compare(src_dir: Path, out_dir: Path, norms: dict[str, bool], tolerance: float | None, scope: str,
             output: SourceCheckpoint) -> VerificationResult:
    source = load_source(src_dir, dtype="float32")
    probes = make_probes(source.model, source.tokenizer)
    reference = reference_outputs(source.model, probes)
    desc = "tokenizer text + random ids" if source.tokenizer is not None else "random inputs"
    del source
    gc.collect()
    model = load(out_dir, dtype="float32")
    try:
        result = verify(model, probes, reference, norms, tolerance=tolerance, probe_desc=f"{desc}; {scope}")
        return _judge_rounded(result, output)
    finally:
        del model
        gc.collect()


def _renumber(name: str, pattern: re.Pattern, layers: list[int]) -> str | None:
    """``name`` with its block index mapped into the truncated model (None: a block that was left out)."""
    m = pattern.match(name)
    if not m:
        return name
    i = int(m.group(1))
    if i not in layers:
        return None
    return name[: m.start(1)] + str(layers.index(i)) + name[m.end(1):]


def _truncated_config(folder: Path, layers: list[int], num_layers: int, loaded_block: re.Pattern):
    config = transformers.AutoConfig.from_pretrained(str(folder))
    text = config.get_text_config()
    for attr in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(getattr(text, attr, None), int):
            setattr(text, attr, len(layers))
            break
    for key, value in list(vars(text).items()):  # per-layer settings (layer_types, attention_layers, ...)
        if isinstance(value, list) and len(value) == num_layers and num_layers != len(layers):
            setattr(text, key, [value[i] for i in layers])
    meta = getattr(config, "normswap", None)
    if isinstance(meta, dict):
        meta = dict(meta)
        for key in ("swapped_norms", "recentered_norms", "approximate_norms"):
            renamed = (_renumber(n, loaded_block, layers) for n in meta.get(key) or [])
            meta[key] = [n for n in renamed if n is not None]
        config.normswap = meta
    return config


def _write_truncated(folder: Path, checkpoint: SourceCheckpoint, block: re.Pattern, loaded_block: re.Pattern,
                     layers: list[int], num_layers: int, dest: Path) -> None:
    tensors = []
    for key, entry in checkpoint.tensors.items():
        new = _renumber(key, block, layers)
        if new is not None:
            tensors.append(OutputTensor(new, entry, entry.dtype, "copy"))
    shards = pack_shards(tensors, 2**62, {"format": "pt"})
    dest.mkdir()
    write_shards(dest, shards)
    _truncated_config(folder, layers, num_layers, loaded_block).save_pretrained(dest)
    copy_preprocessing_files(folder, dest)


def _sample_bytes(checkpoint: SourceCheckpoint, block: re.Pattern, layers: list[int]) -> int:
    kept = [e for k, e in checkpoint.tensors.items() if (m := block.match(k)) is None or int(m.group(1)) in layers]
    return sum(e.numel * 4 if e.dtype in ("F16", "BF16", "F32") else e.nbytes for e in kept)


def verify_streamed(
    src_dir: Path, out_dir: Path, plan: StreamPlan, source: SourceCheckpoint, *, mode: str = "auto",
    tolerance: float | None = None,
) -> tuple[VerificationResult | None, str]:
    """Verify ``out_dir`` against ``src_dir``; returns the result (None when skipped) and what was verified."""
    if mode == "none":
        return None, "skipped (not requested)"
    output = open_checkpoint(out_dir)
    tolerance = _tolerance(tolerance, output)
    norms = {n.name: n.exact for n in plan.norms}
    have = available_ram()
    full_need = source.fp32_bytes + output.fp32_bytes
    if mode == "full" or (mode == "auto" and full_need <= VERIFY_RAM_FRACTION * have):
        scope = "full model, source and output compared in float32"
        return _compare(src_dir, out_dir, norms, tolerance, scope, output), scope

    layers = sample_layers(plan.num_layers)
    src_block = plan.names.block_pattern(plan.adapter.blocks)
    out_names = NameMap(plan.adapter, plan.names.prefix, set(output.tensors))
    out_block = out_names.block_pattern(plan.adapter.blocks)
    loaded_block = re.compile(rf"^{re.escape(plan.names.prefix + plan.adapter.blocks)}\.(\d+)\.")
    sample_need = _sample_bytes(source, src_block, layers) + _sample_bytes(output, out_block, layers)
    why = f"the full model needs {full_need / 1e9:.1f} GB to verify, more than {VERIFY_RAM_FRACTION:.0%} of the " \
          f"available RAM ({have / 1e9:.1f} GB)" if mode == "auto" else "requested"
    if mode == "auto" and sample_need > VERIFY_RAM_FRACTION * have:
        return None, (f"skipped: {why}, and even a {len(layers)}-layer sample needs {sample_need / 1e9:.1f} GB; "
                      "verify on a larger machine with `normswap convert` or evaluate the output directly")
    scope = (f"sampled: a truncated model of layers {', '.join(map(str, layers))} of {plan.num_layers} "
             f"(embeddings, those blocks, final norm and head), because {why}")
    with tempfile.TemporaryDirectory(prefix=".normswap-verify-", dir=out_dir.parent) as work:
        work = Path(work)
        _write_truncated(src_dir, source, src_block, loaded_block, layers, plan.num_layers, work / "source")
        _write_truncated(out_dir, output, out_block, loaded_block, layers, plan.num_layers, work / "output")
        kept = {_renumber(n, loaded_block, layers): exact for n, exact in norms.items()}
        kept.pop(None, None)
        return _compare(work / "source", work / "output", kept, tolerance, scope, output), scope
