"""Writing planned shards: each output shard is written front to back, tensor after tensor, from the source bytes.

The bytes move through :mod:`.direct_io`: the source is read in aligned windows with the next one already in flight,
output chunks are written by a thread while the next fills, and both bypass the page cache where the filesystem
allows. The main thread's share is one copy per byte (window to output chunk) plus the float64 centring of the
writers, in bounded slabs on two threads with single-threaded ops (:mod:`.transform`). At most one writer tensor
(two when its dtype changes) is held whole, in a buffer reused from tensor to tensor.

Shards are written one at a time and fsync'd when complete, so a shard reported finished (``on_sealed``) is on disk:
that is what lets an interrupted conversion resume (:mod:`.resume`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from normswap.streaming import direct_io
from normswap.streaming.direct_io import ALIGN, ShardAppender, SourceReader
from normswap.streaming.output import OutputShard, OutputTensor
from normswap.streaming.safetensors_io import TORCH_DTYPES, Scratch
from normswap.streaming.transform import cast_into, center_into, check_finite, single_threaded

#: Elements per step when a tensor is only re-typed (16 MB of float32).
CAST_CHUNK = 4 * 2**20
#: Source files with an open reader (each holds two read windows); a tied head re-reads an earlier file.
OPEN_READERS = 2
#: Smallest I/O chunk: below ~1 MiB per request the device no longer streams at full speed.
MIN_CHUNK = 2**20


def io_chunk(largest_tensor_bytes: int) -> int:
    """Window/chunk size: the full :data:`direct_io.CHUNK` for big checkpoints, smaller for small ones.

    The seven buffers (two readers x two windows, three write chunks) then cost at most ~7/8 of the largest tensor,
    so peak memory stays within "twice the largest tensor + 0.5 GB" however small the checkpoint is.
    """
    scaled = max(MIN_CHUNK, largest_tensor_bytes // 8 // ALIGN * ALIGN)
    return min(direct_io.CHUNK, scaled)


@dataclass
class StreamingStats:
    source_bytes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    largest_tensor_bytes: int = 0
    shards: int = 0
    resumed_shards: int = 0  # finished by an interrupted earlier run and kept, not rewritten
    direct_io: bool = False  # whether the page cache was bypassed (O_DIRECT) for the output

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / max(self.seconds, 1e-9)

    def summary(self) -> str:
        resumed = f" ({self.resumed_shards} more kept from an interrupted run)" if self.resumed_shards else ""
        return (f"streamed {self.bytes_read / 1e9:.2f} GB in {self.seconds:.1f} s ({self.mb_per_s:.0f} MB/s) into "
                f"{self.shards - self.resumed_shards} shard(s){resumed}; peak RSS {self.peak_rss_bytes / 1e9:.2f} GB "
                f"(largest tensor {self.largest_tensor_bytes / 1e9:.2f} GB)")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


class ShardWriter:
    """Moves the bytes of every planned tensor from its source file into its output shard."""

    def __init__(self, stack: ExitStack, shards: list[OutputShard], progress: bool, skip: frozenset[str]):
        self.readers: dict[Path, SourceReader] = {}
        self.chunk = io_chunk(max((t.source.nbytes for s in shards for t in s.tensors), default=0))
        stack.callback(self._close_readers)
        self.stats = StreamingStats(shards=len(shards), resumed_shards=len(skip))
        self.inputs, self.outputs = Scratch(), Scratch()
        # Separate pools: a read waiting on the disk must not queue behind a write, nor the other way round.
        self.read_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="normswap-read")
        self.write_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="normswap-write")
        stack.callback(self.write_pool.shutdown, wait=True)
        stack.callback(self.read_pool.shutdown, wait=True)
        total = sum(t.source.nbytes for s in shards if s.name not in skip for t in s.tensors)
        from tqdm.auto import tqdm

        self.bar = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                            desc="streaming", disable=not progress, file=sys.stderr))

    def _reader(self, path: Path) -> SourceReader:
        if path not in self.readers:
            while len(self.readers) >= OPEN_READERS:
                self.readers.pop(next(iter(self.readers))).close()
            self.readers[path] = SourceReader(path, self.read_pool, self.chunk)
        return self.readers[path]

    def _close_readers(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self.readers = {}

    def write(self, t: OutputTensor, out: ShardAppender) -> None:
        entry = t.source
        reader = self._reader(entry.file)
        if t.action == "copy":  # straight from the read window into the output chunk
            done, item = 0, entry.nbytes // max(entry.numel, 1)
            while done < entry.nbytes:
                room = out.writable()
                n = min(room.numel(), entry.nbytes - done)
                reader.read_into(entry.offset + done, room[:n])
                if entry.torch_dtype.is_floating_point and done % item == 0 and n % item == 0:
                    check_finite(room[:n].view(entry.torch_dtype), entry.name)  # as the in-memory path, every tensor
                out.commit(n)
                done += n
        elif t.action == "ones":  # a LayerScale folded into its writer: its key stays, as ones
            out.append(_bytes(torch.ones(entry.shape, dtype=TORCH_DTYPES[t.dtype])))
        elif t.action == "cast":  # re-typing only (--dtype), in bounded pieces
            out_dtype, item, in_item = TORCH_DTYPES[t.dtype], t.nbytes // max(entry.numel, 1), entry.nbytes // max(
                entry.numel, 1)
            for start in range(0, entry.numel, CAST_CHUNK):
                count = min(CAST_CHUNK, entry.numel - start)
                raw = self.inputs.get(count * in_item)
                reader.read_into(entry.offset + start * in_item, raw)
                check_finite(raw.view(entry.torch_dtype), entry.name)
                converted = self.outputs.typed(count * item, out_dtype, (count,))
                cast_into(raw.view(entry.torch_dtype), converted)
                out.append(_bytes(converted))
        else:  # a writer: whole tensor in memory, centred in float64 slabs, then appended
            raw = self.inputs.get(entry.nbytes)
            reader.read_into(entry.offset, raw)
            weight = raw.view(entry.torch_dtype).view(entry.shape)
            out_dtype = TORCH_DTYPES[t.dtype]
            result = weight if out_dtype == weight.dtype else self.outputs.typed(t.nbytes, out_dtype, entry.shape)
            scale = None
            if t.scale is not None:  # a LayerScale is a few KB: read it whole
                buf = torch.empty(t.scale.nbytes, dtype=torch.uint8)
                self._reader(t.scale.file).read_into(t.scale.offset, buf)
                scale = buf.view(t.scale.torch_dtype).view(t.scale.shape)
            center_into(weight, t.layout, result, name=entry.name, scale=scale)
            out.append(_bytes(result))
        self.stats.bytes_read += entry.nbytes
        self.stats.bytes_written += t.nbytes
        self.stats.largest_tensor_bytes = max(self.stats.largest_tensor_bytes, entry.nbytes, t.nbytes)
        self.bar.update(entry.nbytes)

    def write_shard(self, folder: Path, shard: OutputShard) -> None:
        """Header, then every tensor at its planned offset (the plan lays them out in this order), then fsync."""
        out = ShardAppender(folder / shard.name, shard.size, self.write_pool, self.chunk)
        try:
            out.append(torch.frombuffer(bytearray(shard.header), dtype=torch.uint8))
            for t in shard.tensors:
                self.write(t, out)
        except BaseException:
            out.close(abort=True)  # waits for the writes in flight before their buffers go
            raise
        out.close()
        self.stats.direct_io = out.file.direct or self.stats.direct_io


def write_shards(folder: Path, shards: list[OutputShard], progress: bool = False, skip: frozenset[str] = frozenset(),
                 on_sealed: Callable[[str], None] | None = None) -> StreamingStats:
    """Write ``shards`` into ``folder`` one after the other, each front to back.

    Shards named in ``skip`` (finished by an earlier run) are left alone. ``on_sealed(name)`` is called once a shard is
    complete and fsync'd.
    """
    with ExitStack() as stack:
        stack.enter_context(single_threaded())
        writer = ShardWriter(stack, shards, progress, skip)
        for shard in shards:
            if shard.name in skip:
                continue
            writer.write_shard(folder, shard)
            if on_sealed is not None:
                on_sealed(shard.name)
        writer.inputs = writer.outputs = Scratch()
    return writer.stats
