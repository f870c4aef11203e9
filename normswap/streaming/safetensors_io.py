"""Byte-level safetensors metadata for the streaming converter: headers in, headers out, small tensors read.

``safe_open`` validates each source file (a truncated shard or a corrupt header fails there, with its own message),
but tensors are then read at their offsets rather than through ``safe_open``'s memory map: every page a mapped tensor
touches stays resident (and counts in RSS) until the whole file is closed, so reading a 5 GB shard through the map
costs 5 GB of RSS. The bulk of the bytes moves through :mod:`.direct_io`; here only the header layout
(:func:`encode_header`: every offset known before a byte is written) and small reads (norm parameters) live.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from normswap.errors import CheckpointError

#: safetensors dtype code -> torch dtype. Codes absent here are still copied verbatim; they just cannot be cast.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
CODES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
#: Bytes per element of every code the format defines (needed to size tensors we only copy).
ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8, "F8_E8M0": 1,
}
#: Codes whose tensors are weights that follow ``--dtype`` (the in-memory path's ``model.to(dtype)`` casts these).
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})

#: Largest single read request: Linux caps one call near 2 GiB, and smaller pieces keep copies cheap.
IO_CHUNK = 256 * 2**20


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie in a safetensors file."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in ``file``
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return TORCH_DTYPES[self.dtype]
        except KeyError:
            raise CheckpointError(f"tensor {self.name} in {self.file.name} has dtype {self.dtype}, which normswap "
                                  "cannot compute with") from None


def read_header(path: Path) -> tuple[dict[str, str], list[TensorEntry]]:
    """The metadata and tensor entries of one safetensors file, sorted by offset; damaged files raise CheckpointError."""
    try:
        with safe_open(str(path), framework="pt") as handle:  # validates the header and that the data covers the file
            metadata = handle.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - every failure becomes one readable message
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); the shard looks truncated or corrupt: re-download or "
            "re-save the checkpoint"
        ) from exc
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    header.pop("__metadata__", None)
    start = 8 + length
    entries = [
        TensorEntry(name, info["dtype"], tuple(info["shape"]), path, start + info["data_offsets"][0],
                    info["data_offsets"][1] - info["data_offsets"][0])
        for name, info in header.items()
    ]
    entries.sort(key=lambda e: e.offset)
    return metadata, entries


def encode_header(tensors: Iterable[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """A safetensors header for tensors laid out back to back in the given order: ``(name, code, shape, nbytes)``."""
    header: dict[str, object] = {"__metadata__": metadata}
    pos = 0
    for name, code, shape, nbytes in tensors:
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keeps the data 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(blob)) + blob


def pread_into(fd: int, buffer: memoryview, offset: int) -> None:
    """Fill ``buffer`` from ``fd`` at ``offset``; a short file is a truncated checkpoint."""
    pos = 0
    while pos < len(buffer):
        n = os.preadv(fd, [buffer[pos:pos + IO_CHUNK]], offset + pos)
        if n == 0:
            raise CheckpointError(f"unexpected end of file while reading {len(buffer)} bytes at offset {offset}: the "
                                  "shard was truncated while being read")
        pos += n


def read_tensor(fd: int, entry: TensorEntry, start: int = 0, count: int | None = None,
                buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Elements ``[start, start+count)`` of ``entry`` (flat order); the whole tensor, shaped, by default.

    ``buffer`` (uint8, large enough) is filled instead of allocating: reusing one buffer avoids faulting in fresh
    pages for every tensor, which costs as much as the copy itself.
    """
    item = ITEMSIZE[entry.dtype]
    count = entry.numel - start if count is None else count
    raw = torch.empty(count * item, dtype=torch.uint8) if buffer is None else buffer[: count * item]
    pread_into(fd, memoryview(raw.numpy()), entry.offset + start * item)
    flat = raw.view(entry.torch_dtype)
    return flat.view(entry.shape) if start == 0 and count == entry.numel else flat


class Scratch:
    """A reusable byte buffer that only grows; the streaming loop holds one per role (input, output)."""

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def get(self, nbytes: int) -> torch.Tensor:
        if self._buffer.numel() < nbytes:
            self._buffer = torch.empty(0, dtype=torch.uint8)  # free the old one before allocating the new one
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffer[:nbytes]

    def typed(self, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return self.get(nbytes).view(dtype).view(shape)
