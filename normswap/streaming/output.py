"""Layout of the converted checkpoint: which bytes go where, decided before any byte is written.

Each output tensor knows its source bytes and what to do with them (copy, cast, centre). Shards are packed in
source order up to ``max_shard_size``, and each shard's header (with every offset) is known in advance, so the
converter can write each tensor straight to its final place and never hold a shard in memory.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from normswap.errors import NormswapError
from normswap.streaming.plan import StreamPlan
from normswap.streaming.safetensors_io import CODES, FLOAT_CODES, ITEMSIZE, TensorEntry, encode_header
from normswap.streaming.source import INDEX_FILE, SINGLE_FILE, SourceCheckpoint

DEFAULT_MAX_SHARD_SIZE = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """Bytes in ``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1.5GB"`` or a plain integer (transformers' units: GB = 1e9)."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", size.upper())
        if not m:
            raise NormswapError(f"cannot read the size {size!r}; write it like 5GB, 500MB or 2GiB")
        value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise NormswapError(f"the shard size must be positive, got {size!r}")
    return value


@dataclass
class OutputTensor:
    key: str
    source: TensorEntry
    dtype: str  # safetensors code of the output
    action: str  # "copy" (same bytes), "cast" (re-typed only), "center" (a writer) or "ones" (a folded LayerScale)
    layout: str | None = None
    #: The LayerScale folded into this writer tensor before centring (its bytes are read alongside).
    scale: TensorEntry | None = None
    file: str = ""
    offset: int = 0  # absolute offset in the output file

    @property
    def nbytes(self) -> int:
        return self.source.numel * ITEMSIZE[self.dtype]


@dataclass
class OutputShard:
    name: str
    tensors: list[OutputTensor] = field(default_factory=list)
    header: bytes = b""

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


def output_code(entry: TensorEntry, out_dtype: torch.dtype | None) -> str:
    """The output dtype of one tensor: floats follow ``--dtype`` (like ``model.to(dtype)``), the rest are kept."""
    if out_dtype is None or entry.dtype not in FLOAT_CODES:
        return entry.dtype
    return CODES[out_dtype]


def plan_tensors(source: SourceCheckpoint, plan: StreamPlan, out_dtype: torch.dtype | None) -> list[OutputTensor]:
    """Every output tensor in source order (untied copies right after the tensor they are copied from)."""
    dropped = set(plan.dropped)
    out: list[OutputTensor] = []
    for key, entry in source.tensors.items():
        if key in dropped:
            continue
        code = output_code(entry, out_dtype)
        if key in plan.ones:
            action = "ones"
        elif key in plan.center:
            action = "center"
        else:
            action = "copy" if code == entry.dtype else "cast"
        scale = source.tensors[plan.scale_of[key]] if key in plan.scale_of else None
        out.append(OutputTensor(plan.names.output_key(key), entry, code, action, plan.center.get(key), scale))
        for target, source, layout in plan.tied_copies:  # untied copies right after their source
            if source == key:
                copy = "center" if layout else "copy" if code == entry.dtype else "cast"
                out.append(OutputTensor(target, entry, code, copy, layout))
    return out


def pack_shards(tensors: list[OutputTensor], max_shard_size: int, metadata: dict[str, str]) -> list[OutputShard]:
    """Group tensors into shards of at most ``max_shard_size`` data bytes (a bigger tensor gets a shard of its own)."""
    shards: list[OutputShard] = []
    size = 0
    for t in tensors:
        if not shards or (shards[-1].tensors and size + t.nbytes > max_shard_size):
            shards.append(OutputShard(""))
            size = 0
        shards[-1].tensors.append(t)
        size += t.nbytes
    for i, shard in enumerate(shards):
        shard.name = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        # Widest dtypes first keeps every tensor aligned to its element size (the reference writer does the same).
        shard.tensors.sort(key=lambda t: -ITEMSIZE[t.dtype])
        shard.header = encode_header(((t.key, t.dtype, t.source.shape, t.nbytes) for t in shard.tensors), metadata)
        pos = len(shard.header)
        for t in shard.tensors:
            t.file, t.offset = shard.name, pos
            pos += t.nbytes
    return shards


def write_index(folder: Path, shards: list[OutputShard]) -> None:
    """``model.safetensors.index.json`` in the form ``save_pretrained`` writes (only for more than one shard)."""
    if len(shards) < 2:
        return
    tensors = [t for s in shards for t in s.tensors]
    index = {
        "metadata": {"total_parameters": sum(t.source.numel for t in tensors),
                     "total_size": sum(t.nbytes for t in tensors)},
        "weight_map": {t.key: t.file for t in sorted(tensors, key=lambda t: t.key)},
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=False) + "\n")
