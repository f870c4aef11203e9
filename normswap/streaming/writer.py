"""Writing planned shards: every output tensor goes once, straight to its final offset, from its source bytes.

Two things run at once: the main thread reads a writer and centres it, while one I/O thread writes the previous
writer out and copies the pass-through tensors between them (both release the GIL). Writers alternate between two
reusable buffers, so at most two tensors are in memory, and reusing the buffers avoids faulting in fresh pages for
every tensor (which costs as much as the copy itself). A second I/O thread was measured and was slower: the kernel's
page-cache copies contend with each other on two CPUs.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from normswap.streaming.output import OutputShard, OutputTensor
from normswap.streaming.safetensors_io import (
    TORCH_DTYPES,
    Scratch,
    copy_range,
    pwrite_all,
    read_tensor,
    release_pages,
    tensor_bytes,
)
from normswap.streaming.transform import cast_into, center_into, single_threaded

#: Elements per read when a tensor is only re-typed (16 MB of float32).
CAST_CHUNK = 4 * 2**20
#: Threads moving bytes (writes of centred writers, file-to-file copies, per-shard fsync).
IO_THREADS = 1


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

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / max(self.seconds, 1e-9)

    def summary(self) -> str:
        resumed = f" ({self.resumed_shards} more kept from an interrupted run)" if self.resumed_shards else ""
        return (f"streamed {self.bytes_read / 1e9:.2f} GB in {self.seconds:.1f} s ({self.mb_per_s:.0f} MB/s) into "
                f"{self.shards - self.resumed_shards} shard(s){resumed}; peak RSS {self.peak_rss_bytes / 1e9:.2f} GB (largest tensor "
                f"{self.largest_tensor_bytes / 1e9:.2f} GB)")


class ShardWriter:
    """Moves the bytes: one open descriptor per file, each output tensor written once at its final offset."""

    def __init__(self, stack: ExitStack, folder: Path, shards: list[OutputShard], progress: bool,
                 skip: frozenset[str] = frozenset(), on_sealed: Callable[[str], None] | None = None):
        self.src_fds: dict[Path, int] = {}
        self.out_fds: dict[str, int] = {}
        self.on_sealed = on_sealed
        stack.callback(self._close_sources)
        self.stats = StreamingStats(shards=len(shards), resumed_shards=len(skip))
        for shard in shards:
            if shard.name in skip:
                continue
            fd = os.open(folder / shard.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            stack.callback(os.close, fd)
            pwrite_all(fd, memoryview(shard.header), 0)
            self.out_fds[shard.name] = fd
        self.inputs, self.outputs = [Scratch(), Scratch()], [Scratch(), Scratch()]
        self.in_flight: list[Future | None] = [None, None]  # the write still reading each buffer
        self.turn = 0
        self.futures: deque[Future] = deque()
        self.shard_futures: dict[str, list[Future]] = {}  # per shard: its writes, which its seal waits for
        self.io = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="normswap-io")
        stack.callback(self.io.shutdown, wait=True)  # registered after every fd: pending I/O ends before they close
        total = sum(t.source.nbytes for s in shards if s.name not in skip for t in s.tensors)
        from tqdm.auto import tqdm

        self.bar = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                            desc="streaming", disable=not progress, file=sys.stderr))

    def _src(self, path: Path) -> int:
        if path not in self.src_fds:
            self.src_fds[path] = os.open(path, os.O_RDONLY)
        return self.src_fds[path]

    def _close_sources(self) -> None:
        for fd in self.src_fds.values():
            os.close(fd)

    def _submit(self, shard: str, fn, *args) -> Future:
        while self.futures and self.futures[0].done():
            self.futures.popleft().result()  # re-raises an I/O error here, in the main thread
        future = self.io.submit(fn, *args)
        self.futures.append(future)
        self.shard_futures.setdefault(shard, []).append(future)
        return future

    def drain(self) -> None:
        while self.futures:
            self.futures.popleft().result()

    @staticmethod
    def _copy(src_fd: int, src_offset: int, out_fd: int, out_offset: int, nbytes: int) -> None:
        copy_range(src_fd, src_offset, out_fd, out_offset, nbytes)
        release_pages(src_fd, src_offset, nbytes)
        release_pages(out_fd, out_offset, nbytes)

    @staticmethod
    def _write(out_fd: int, data, offset: int, nbytes: int) -> None:
        pwrite_all(out_fd, data, offset)
        release_pages(out_fd, offset, nbytes)

    def write(self, t: OutputTensor) -> None:
        entry, out_fd = t.source, self.out_fds[t.file]
        src_fd = self._src(entry.file)
        if t.action == "copy":
            self._submit(t.file, self._copy, src_fd, entry.offset, out_fd, t.offset, entry.nbytes)
        elif t.action == "cast":  # re-typing only (--dtype): rare, done in order without overlap
            self.drain()
            out_dtype, item = TORCH_DTYPES[t.dtype], t.nbytes // max(entry.numel, 1)
            for start in range(0, entry.numel, CAST_CHUNK):
                count = min(CAST_CHUNK, entry.numel - start)
                piece = read_tensor(src_fd, entry, start, count, buffer=self.inputs[0].get(count * 8))
                converted = self.outputs[0].typed(count * item, out_dtype, (count,))
                cast_into(piece.reshape(-1), converted)
                self._write(out_fd, tensor_bytes(converted), t.offset + start * item, count * item)
            release_pages(src_fd, entry.offset, entry.nbytes)
        else:
            slot, self.turn = self.turn, 1 - self.turn
            if self.in_flight[slot] is not None:
                self.in_flight[slot].result()  # the buffer's previous tensor is on its way to disk
            weight = read_tensor(src_fd, entry, buffer=self.inputs[slot].get(entry.nbytes))
            release_pages(src_fd, entry.offset, entry.nbytes)
            out_dtype = TORCH_DTYPES[t.dtype]
            result = weight if out_dtype == weight.dtype else self.outputs[slot].typed(t.nbytes, out_dtype, entry.shape)
            center_into(weight, t.layout, result, name=entry.name)
            self.in_flight[slot] = self._submit(t.file, self._write, out_fd, tensor_bytes(result), t.offset, t.nbytes)
        self.stats.bytes_read += entry.nbytes
        self.stats.bytes_written += t.nbytes
        self.stats.largest_tensor_bytes = max(self.stats.largest_tensor_bytes, entry.nbytes, t.nbytes)
        self.bar.update(entry.nbytes)

    def _seal_now(self, name: str, writes: list[Future]) -> None:
        for w in writes:
            w.result()
        os.fsync(self.out_fds[name])
        if self.on_sealed is not None:
            self.on_sealed(name)

    def seal(self, name: str) -> None:
        """Flush a shard whose tensors have all been handed over, then report it finished.

        The seal waits for the shard's own writes and only then fsyncs, so the shard is durable before anyone is told
        it is done. It cannot deadlock: the pool starts tasks in submission order, so every write it waits for has
        already started on another thread (or finished) by the time the seal starts.
        """
        self._submit(name, self._seal_now, name, self.shard_futures.pop(name, []))

    def finish(self) -> None:
        """Wait for every write and seal: all shards are on disk before the folder is renamed into place."""
        self.drain()
        self.inputs = self.outputs = [Scratch(), Scratch()]


def write_shards(folder: Path, shards: list[OutputShard], tensors: list[OutputTensor], progress: bool = False,
                 skip: frozenset[str] = frozenset(), on_sealed: Callable[[str], None] | None = None
                 ) -> StreamingStats:
    """Write ``tensors`` (in this order: source order reads each source file sequentially) into ``shards``.

    Shards named in ``skip`` (finished by an earlier run) are left alone. ``on_sealed(name)`` is called, from the I/O
    thread, once a shard is complete and fsync'd. Shards are packed from consecutive runs of ``tensors``, so each one
    is sealed as soon as its last tensor is written, not at the end.
    """
    last = {t.file: i for i, t in enumerate(tensors)}
    with ExitStack() as stack:
        stack.enter_context(single_threaded())
        writer = ShardWriter(stack, folder, shards, progress, skip, on_sealed)
        for i, t in enumerate(tensors):
            if t.file in skip:
                continue
            writer.write(t)
            if last[t.file] == i:
                writer.seal(t.file)
        writer.finish()
    return writer.stats
