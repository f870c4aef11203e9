"""Loading sources, saving converted models atomically, and loading them back with RMSNorm modules.

Outputs are ordinary ``save_pretrained`` folders. The ``normswap`` key in ``config.json`` records what was done, so
``normswap.load`` can swap the same norms back in at runtime without needing the adapter.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from normswap.errors import CheckpointError, NormswapError
from normswap.outputs import (  # noqa: F401 - re-exported: streaming uses them from here
    WEIGHT_PATTERNS,
    atomic_output_dir,
    carry_over_files,
    check_output_not_source,
    check_output_target,
    replace_target,
)
from normswap.publish import load_output_config, write_publish_files
from normswap.surgery import swap_named_norms_

logger = logging.getLogger(__name__)

#: Files that belong to a tokenizer or processor; copied verbatim from a local source folder.
PREPROCESSING_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt", "merges.txt",
    "added_tokens.json", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model", "preprocessor_config.json",
    "processor_config.json", "image_processor_config.json", "chat_template.jinja", "chat_template.json",
)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise NormswapError(f"unknown dtype {name!r}; use one of {', '.join(sorted(DTYPES))}") from None


@dataclass
class Source:
    """A loaded source model with what is needed to save its converted copy faithfully."""

    model: nn.Module
    tokenizer: object | None
    id: str
    revision: str | None
    local_dir: Path | None


#: Task heads tried, in order, when a config names no ``architectures`` (the bare base model comes last).
_HEAD_AUTOS = ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForMaskedLM",
               "AutoModelForImageClassification", "AutoModelForSequenceClassification", "AutoModel")


def model_class_for(config, keys: set[str] | None = None) -> type:
    """The stock class named in ``config.architectures``; without one, the class that uses every checkpoint tensor.

    A config saved without ``architectures`` would otherwise load as the bare base model and silently drop the head
    (GPT-NeoX's ``embed_out.weight``). With the checkpoint's ``keys``, each task head the config type has is built
    on the meta device and asked (transformers' own key renaming) which file keys it loads; the first that loads
    them all wins. If none does, the conversion is refused naming the tensors it would lose.
    """
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    if not keys:
        return transformers.AutoModel
    from normswap.streaming.plan import loaded_names

    best: tuple[int, type, set[str]] | None = None
    complete: list[tuple[int, type]] = []  # (parameters the file lacks, class) of each class that uses every key
    for auto_name in _HEAD_AUTOS:
        mapping = getattr(transformers, auto_name)._model_mapping
        if type(config) not in mapping:
            continue
        cls = mapping[type(config)]
        with torch.device("meta"):
            model = cls._from_config(config)
        loaded = loaded_names(model, set(keys))
        unused = set(keys) - set(loaded.values())
        if not unused:  # a head the file does not hold would be initialised at random: prefer the fewest missing
            complete.append((sum(n not in loaded for n, _ in model.named_parameters()), cls))
            continue
        if best is None or len(unused) < best[0]:
            best = (len(unused), cls, unused)
    if complete:
        return min(complete, key=lambda c: c[0])[1]
    if best is None:
        return transformers.AutoModel
    lost = sorted(best[2])
    raise CheckpointError(
        f"config.json names no `architectures`, and no {type(config).__name__} class loads every tensor of the "
        f"checkpoint: {len(lost)} would be lost ({', '.join(lost[:4])}{', ...' if len(lost) > 4 else ''}). Add "
        '"architectures": ["<the class that saved it>"] to config.json'
    )


def checkpoint_keys(folder: str | os.PathLike) -> set[str]:
    """Tensor names of a local safetensors checkpoint (headers only; empty for other formats or Hub ids)."""
    from safetensors import safe_open

    keys: set[str] = set()
    for path in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []:
        with safe_open(str(path), "pt") as f:
            keys.update(f.keys())
    return keys


def _wrap_load_error(src: str, exc: Exception) -> CheckpointError:
    text = str(exc)
    lowered = text.lower()
    if any(k in lowered for k in ("safetensor", "header", "deserializ", "incomplete", "truncat", "unexpected eof")):
        hint = "the checkpoint file looks corrupt or truncated; re-download or re-save it"
    elif not Path(src).exists():
        hint = ("not a local folder, and the Hub could not provide it (this machine may be offline); "
                "pass a local save_pretrained folder")
    else:
        hint = "check that the folder is a complete save_pretrained output (config.json + weights)"
    return CheckpointError(f"could not load {src}: {hint}. ({type(exc).__name__}: {text.splitlines()[0] if text else ''})")


def load_source(
    src: str | os.PathLike, dtype: str | torch.dtype | None = "float32", device: str | None = None,
    revision: str | None = None,
) -> Source:
    """Load a source model (hub id or local folder) and its tokenizer/processor; errors say what to do."""
    src = str(src)
    kwargs = {"revision": revision} if revision else {}
    try:
        config = transformers.AutoConfig.from_pretrained(src, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one readable message
        raise _wrap_load_error(src, exc) from exc
    try:
        keys = checkpoint_keys(src) if not getattr(config, "architectures", None) else None
    except Exception as exc:  # noqa: BLE001 - an unreadable header is the corrupt-checkpoint message
        raise _wrap_load_error(src, exc) from exc
    cls = model_class_for(config, keys)
    try:
        model = cls.from_pretrained(src, dtype=parse_dtype(dtype), **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise _wrap_load_error(src, exc) from exc
    if device:
        model.to(device)
    model.eval()
    tokenizer = None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(src, **kwargs)
    except Exception:  # noqa: BLE001 - a missing tokenizer is reported, not fatal
        logger.info("no tokenizer found for %s", src)
    if tokenizer is not None and not usable_tokenizer(tokenizer):
        tokenizer = None
    local = Path(src) if Path(src).is_dir() else _hub_preprocessing_dir(src, revision)
    return Source(model, tokenizer, src, revision or getattr(config, "_commit_hash", None), local)


def usable_tokenizer(tokenizer) -> bool:
    """Whether a loaded tokenizer can tokenize text at all.

    transformers v5 builds an empty tokenizer (no vocabulary, at most its special tokens) for a folder without
    tokenizer files; treating that as a tokenizer makes every text "shorter than two tokens" instead of "no tokenizer".
    """
    try:
        return len(tokenizer) > 1 and len(tokenizer("The quick brown fox jumps.")["input_ids"]) > 1
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode is no tokenizer
        return False


def _hub_preprocessing_dir(repo_id: str, revision: str | None) -> Path | None:
    """Local snapshot of a hub model without its weights: tokenizer, processor and every other file the output
    carries over (sentence-transformers modules, ...); weights are loaded separately and replaced anyway."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, ignore_patterns=list(WEIGHT_PATTERNS)))
    except Exception:  # noqa: BLE001 - offline or no such files: the tokenizer object (if any) is saved instead
        return None


def skeleton_model(src: str | os.PathLike, revision: str | None = None) -> nn.Module:
    """The model's module tree on the meta device: enough to plan a conversion without reading any weights."""
    src = str(src)
    kwargs = {"revision": revision} if revision else {}
    try:
        config = transformers.AutoConfig.from_pretrained(src, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise _wrap_load_error(src, exc) from exc
    with torch.device("meta"):
        model = model_class_for(config)._from_config(config)
    return model


def copy_preprocessing_files(src_dir: Path | None, dst: Path) -> list[str]:
    """Copy tokenizer/processor files that exist in a local source folder; returns what was copied."""
    copied = []
    if src_dir is None:
        return copied
    for name in PREPROCESSING_FILES:
        f = src_dir / name
        if f.is_file() and not (dst / name).exists():
            shutil.copy2(f, dst / name)
            copied.append(name)
    return copied


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer=None,
    source_dir: str | os.PathLike | None = None,
    force: bool = False,
    dtype: str | torch.dtype | None = None,
    extra_files: dict[str, str | bytes] | None = None,
) -> Path:
    """Write a converted model as a ``save_pretrained`` folder, atomically.

    Refuses a model whose recorded verification failed, and an existing non-empty folder, unless ``force``.
    ``dtype`` casts the saved weights (e.g. bf16 output of an fp32 surgery); the in-memory model is cast too.
    """
    meta = getattr(model.config, "normswap", None)
    if isinstance(meta, dict) and meta.get("verification") and not meta["verification"].get("passed", True):
        if not force:
            raise NormswapError(
                "refusing to save: verification failed (the converted model does not match the original within "
                "tolerance). Inspect the report; pass --force / force=True to save anyway."
            )
    check_output_not_source(path, source_dir)
    out_dtype = parse_dtype(dtype)
    if out_dtype is not None:
        model.to(out_dtype)
    with atomic_output_dir(path, overwrite=force) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        copy_preprocessing_files(Path(source_dir) if source_dir else None, tmp)
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as fh:
                fh.write(content)
        write_publish_files(model, tmp, source_dir=source_dir, name=Path(path).name)  # card, remote code, auto_map
        carry_over_files(Path(source_dir) if source_dir else None, tmp)
    return Path(path).resolve()


def load(
    path: str | os.PathLike, dtype: str | torch.dtype | None = None, device: str | None = None
) -> nn.Module:
    """Load a normswap output and swap in ``normswap.RMSNorm`` at every norm the conversion swapped."""
    path = str(path)
    try:
        config = load_output_config(path)  # the stock config, also for outputs that name a normswap_<type>
    except Exception as exc:  # noqa: BLE001
        raise _wrap_load_error(path, exc) from exc
    meta = getattr(config, "normswap", None)
    if not isinstance(meta, dict) or "swapped_norms" not in meta:
        raise NormswapError(f"{path} is not a normswap output (config.json has no 'normswap' metadata); "
                            "convert it first with `normswap convert`")
    cls = model_class_for(config)
    try:
        model = cls.from_pretrained(path, config=config, dtype=parse_dtype(dtype) or "auto")
    except Exception as exc:  # noqa: BLE001
        raise _wrap_load_error(path, exc) from exc
    swap_named_norms_(model, meta["swapped_norms"], meta.get("recentered_norms", ()))
    if meta.get("batchnorm_folded"):  # --to none on a BatchNorm model: remove the folded BatchNorms
        from normswap.batchnorm import fold_saved_batchnorms_

        fold_saved_batchnorms_(model, meta["batchnorm_folded"])
    if isinstance(meta.get("removal"), dict):  # --to none|dyt: LayerNorm replaced (normswap.removal)
        from normswap.removal import load_removed_norms_

        load_removed_norms_(model, path, meta["removal"])
    if device:
        model.to(device)
    return model.eval()
