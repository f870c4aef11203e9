"""``convert_streaming``: convert a checkpoint tensor by tensor, never holding more than one writer in memory.

Exact conversion is per-tensor work: centre each writer, give a tied head a copy of the embedding before it is
centred, keep every norm's parameters (BLOOM's embedding norm becomes a re-centring RMSNorm at load time, from the
metadata). So the model is never built: the adapter's roles are resolved to file keys (:mod:`.plan`), every
output byte is placed up front (:mod:`.output`), and the tensors are streamed from the source shards to the output
shards inside a resumable work folder that is renamed into place at the end. Folding gains/biases needs a probe forward pass through the whole model,
so it stays with the in-memory path.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers

from normswap.adapters import adapter_for_config
from normswap.adapters.registry import discovery_note
from normswap.checkpoint import (
    carry_over_files,
    check_output_not_source,
    copy_preprocessing_files,
    model_class_for,
    parse_dtype,
)
from normswap.conversion import ConversionReport
from normswap.errors import AlreadyRMSNormError, CheckpointError, NormswapError, NotExactError, VerificationError
from normswap.folding import FoldResult
from normswap.publish import write_publish_files
from normswap.streaming.direct_io import fsync_path
from normswap.streaming.output import (
    DEFAULT_MAX_SHARD_SIZE,
    pack_shards,
    parse_size,
    plan_tensors,
    write_index,
)
from normswap.streaming.plan import StreamPlan, plan_streaming
from normswap.streaming.resume import fingerprint, partial_folder, resumable_output_dir
from normswap.streaming.safetensors_io import TORCH_DTYPES, read_tensor
from normswap.streaming.source import SourceCheckpoint, available_ram, open_checkpoint
from normswap.streaming.writer import StreamingStats, write_shards

logger = logging.getLogger(__name__)

#: Stream automatically when the model, loaded in float32 as the in-memory path does, exceeds this share of RAM.
AUTO_STREAM_RAM_FRACTION = 0.5
#: Files besides weights and tokenizer that a save_pretrained folder carries and the output should keep.
EXTRA_FILES = ("generation_config.json",)


@dataclass
class StreamingResult:
    report: ConversionReport
    path: Path
    stats: StreamingStats
    verification_scope: str = ""
    #: Wall time of the verification alone (the conversion's own time is ``stats.seconds``).
    verification_seconds: float = 0.0


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def local_folder(src: str | os.PathLike, revision: str | None = None) -> Path:
    """``src`` as a local folder; a hub id is fetched (safetensors, config, tokenizer only) into the HF cache."""
    path = Path(src)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(src), revision=revision, allow_patterns=[
            "*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]))
    except Exception as exc:  # noqa: BLE001 - every failure becomes one readable message
        raise CheckpointError(
            f"could not load {src}: not a local folder, and the Hub could not provide it (this machine may be "
            f"offline); pass a local save_pretrained folder. ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from exc


def load_config(folder: Path):
    try:
        return transformers.AutoConfig.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"could not read {folder / 'config.json'}: {type(exc).__name__}: {exc}") from exc


def streaming_reason(src: str | os.PathLike, fraction: float = AUTO_STREAM_RAM_FRACTION) -> str | None:
    """Why ``src`` should be converted by streaming (None when it fits in memory or is not a local safetensors folder)."""
    try:
        source = open_checkpoint(src)
    except NormswapError:
        return None
    need, have = source.fp32_bytes, available_ram()
    if need <= fraction * have:
        return None
    return (f"the checkpoint needs {need / 1e9:.1f} GB in float32, more than {fraction:.0%} of the available RAM "
            f"({have / 1e9:.1f} GB)")


def _stale_temp_folders(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.normswap-tmp-*")) if target.parent.is_dir() else []


def build_report(plan: StreamPlan) -> ConversionReport:
    """The same report ``convert_`` returns for this checkpoint, from the plan instead of a live model."""
    notes = ["streaming conversion: LayerNorms outside the adapter are copied unchanged and not listed (no model is "
             "built to find them)"]
    return ConversionReport(
        model_type=plan.adapter.model_type,
        mode="exact",
        untied_head=plan.tied_head is not None,
        centered_writers=list(plan.centered_writers),
        swapped_norms=[n.name for n in plan.norms],
        recentered_norms=[n.name for n in plan.norms if n.writes_stream],
        recentered_writers=dict(plan.recentered_writers),
        approximate_norms=plan.approximate_norms,
        kept_norms=list(plan.kept_norms),
        unaccounted_norms=[],
        folds={"gain": False, "bias": False, **FoldResult().__dict__},
        notes=notes,
    )


def output_config(folder: Path, plan: StreamPlan, metadata: dict, out_dtype: torch.dtype | None,
                  model_cls: type | None = None) -> dict:
    """The source config.json with the conversion recorded, the head untied and the dtype updated (as JSON, so every
    other field stays exactly as the source wrote it). A config without ``architectures`` gets the class the
    conversion inferred from the tensors, as ``save_pretrained`` of the in-memory path writes it."""
    config = json.loads((folder / "config.json").read_text())
    if not config.get("architectures") and model_cls is not None and not model_cls.__name__.startswith("Auto"):
        config["architectures"] = [model_cls.__name__]
    if plan.untie_config:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
    if out_dtype is not None:
        name = str(out_dtype).removeprefix("torch.")
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    config["normswap"] = metadata
    return config


def _dominant_dtype(source: SourceCheckpoint) -> str:
    sizes: dict[str, int] = {}
    for e in source.tensors.values():
        if e.dtype in TORCH_DTYPES and TORCH_DTYPES[e.dtype].is_floating_point:
            sizes[e.dtype] = sizes.get(e.dtype, 0) + e.nbytes
    code = max(sizes, key=sizes.get) if sizes else "F32"
    return str(TORCH_DTYPES[code]).removeprefix("torch.")


def _check_norms_finite(source: SourceCheckpoint, plan: StreamPlan) -> None:
    """Norm parameters are tiny; reading them catches a damaged checkpoint before any output exists."""
    with ExitStack() as stack:
        fds: dict[Path, int] = {}
        for key in plan.norm_keys:
            entry = source.tensors[key]
            if entry.file not in fds:
                fds[entry.file] = os.open(entry.file, os.O_RDONLY)
                stack.callback(os.close, fds[entry.file])
            t = read_tensor(fds[entry.file], entry)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"tensor {key} contains NaN/Inf value(s); the source checkpoint is damaged. "
                                      "Fix or re-download it; normswap will not convert non-finite weights.")


def _fsync_small_files(folder: Path) -> None:
    """Config, index and tokenizer files reach the disk before the rename (the shards already did)."""
    for path in folder.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors"):
            fsync_path(path)


def convert_streaming(
    src: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    verify: str = "auto",
    tolerance: float | None = None,
    revision: str | None = None,
    progress: bool = True,
    resume: bool = True,
) -> StreamingResult:
    """Convert a safetensors checkpoint shard by shard into ``output`` (atomically) and verify it (exact mode only).

    ``dtype`` casts floating tensors (default: keep each tensor's dtype). ``verify``: ``"auto"`` (or ``"full"``,
    ``"sample"``) verifies every block against the source run in float64, reading one module's weights at a time
    (:mod:`normswap.streaming.verification`); ``"none"`` skips it.
    A failed verification leaves no output unless ``force``. The work happens in ``.NAME.normswap-partial`` beside
    the output; if a run is interrupted, running it again keeps the shards it finished (``resume=False`` starts
    over), see :mod:`normswap.streaming.resume`. Peak memory is the largest writer tensor (twice when ``dtype``
    changes it), ~0.2 GB of aligned I/O buffers and ~0.45 GB of Python/torch/transformers, whatever the checkpoint
    size; the verification adds one module's weights in float64 (the head in chunks of rows) on top of that.
    """
    from normswap.streaming.verification import VERIFY_MODES, verify_streamed

    if verify not in VERIFY_MODES:
        raise NormswapError(f"unknown verification mode {verify!r}; use one of {', '.join(VERIFY_MODES)}")
    folder = local_folder(src, revision)
    target = Path(output).resolve()
    check_output_not_source(output, src, folder)  # is, contains or lies inside the source: refused
    out_dtype = parse_dtype(dtype)
    shard_limit = parse_size(max_shard_size)

    config = load_config(folder)
    if isinstance(getattr(config, "normswap", None), dict):
        raise AlreadyRMSNormError(f"{folder} is already a normswap output (its config.json has 'normswap' metadata)")
    source = open_checkpoint(folder)
    model_cls = model_class_for(config, set(source.tensors.keys()))  # no `architectures`: the class using them all
    adapter = adapter_for_config(config, model_cls)  # declared, else discovered on a small instance
    plan = plan_streaming(config, model_cls, adapter, source.tensors.keys())
    if plan.approximate_norms:
        reasons = "; ".join(plan.not_exact_reasons) or "some norms read a stream that is not a sum of centred writers"
        raise NotExactError(
            f"cannot convert this {adapter.model_type} model exactly: {reasons}. The approximate path moves norm "
            "biases into their readers using a probe pass through the whole model, so it does not stream: run "
            "`normswap convert SRC -o OUT --approximate` (in memory), then heal it with `normswap finetune`."
        )
    _check_norms_finite(source, plan)

    tensors = plan_tensors(source, plan, out_dtype)
    shards = pack_shards(tensors, shard_limit, {"format": "pt"})
    partial = partial_folder(target)
    out_bytes = sum(s.size for s in shards if not (resume and (partial / s.name).is_file()))  # kept when resuming
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if out_bytes > free:
        raise NormswapError(f"the output needs {out_bytes / 1e9:.1f} GB but only {free / 1e9:.1f} GB are free on "
                            f"{target.parent}; free some space or write elsewhere")
    stale = _stale_temp_folders(target)
    if stale:
        logger.warning("leftover temporary folder(s) from an interrupted run beside the output (safe to delete): %s",
                       ", ".join(str(p) for p in stale))

    report = build_report(plan)
    if adapter.origin == "discovered":
        report.notes.insert(0, discovery_note(adapter))
    out_dtype_name = str(out_dtype).removeprefix("torch.") if out_dtype is not None else _dominant_dtype(source)
    source_id = str(src)

    def metadata() -> dict:
        return report.metadata(source_id, revision, out_dtype_name)

    options = {"dtype": str(out_dtype), "max_shard_size": shard_limit}
    expected = fingerprint(source, shards, options)
    started = time.perf_counter()
    with resumable_output_dir(target, expected=expected, shards=shards, overwrite=force, resume=resume) as state:
        tmp = state.folder
        stats = write_shards(tmp, shards, progress, skip=frozenset(state.resumed), on_sealed=state.mark_done)
        stats.source_bytes = source.nbytes
        stats.seconds = time.perf_counter() - started
        stats.peak_rss_bytes = peak_rss()
        write_index(tmp, shards)
        config_json = output_config(folder, plan, metadata(), out_dtype, model_cls)
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        for name in EXTRA_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, tmp / name)
        copy_preprocessing_files(folder, tmp)
        carry_over_files(folder, tmp)  # every other file of the source (sentence-transformers modules, ...)
        report.notes.append(stats.summary())

        verify_started = time.perf_counter()
        verification, scope = verify_streamed(folder, tmp, plan, source, mode=verify, tolerance=tolerance)
        verify_seconds = time.perf_counter() - verify_started
        report.verification = verification
        report.notes.append(f"verification: {scope}")
        if verification is not None and not verification.passed and not force:
            raise VerificationError(
                f"verification failed, so nothing was saved: {verification.first_failure or 'see the figures'} "
                f"({verification.summary()}). Pass --force to save it anyway."
            )
        config_json["normswap"] = metadata()
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        write_publish_files(SimpleNamespace(config=SimpleNamespace(normswap=config_json["normswap"])), tmp,
                            source_dir=folder, name=target.name)  # card, remote code, auto_map: as normswap.save
        _fsync_small_files(tmp)
    return StreamingResult(report, target, stats, scope, verify_seconds)
