"""Per-tensor work of the streaming converter, in bounded memory: the same float64 maths, one slab at a time.

Centring a writer removes the mean along its hidden axis, so slabs cut along any *other* axis are independent and
their results are exactly :func:`normswap.maths.center_weight` of the whole tensor. Slabs keep the float64
temporaries at a few tens of MB whatever the tensor size, and results go straight back into the input buffer when
the output dtype allows, so a writer costs about its own size in memory.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from normswap import maths
from normswap.errors import CheckpointError

#: Elements per slab (2 MB as float64): the slab's float64 temporaries stay in cache and come from reused heap
#: memory. Measured single-threaded on 2 shared vCPUs: 1.0-1.5 GB of fp32 weights per CPU-second, against
#: 0.5 GB/CPU-s with 32 MB slabs (every temporary a fresh mmap, faulted in page by page).
SLAB_ELEMENTS = 2**18


#: Threads that centre the slabs of one writer side by side (each op single-threaded; the ops release the GIL).
#: Slabs are independent, so the result is bit-identical whatever the thread count.
SLAB_THREADS = max(1, min(2, os.cpu_count() or 1))
_slab_pool: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _slab_pool
    if _slab_pool is None:
        _slab_pool = ThreadPoolExecutor(max_workers=SLAB_THREADS, thread_name_prefix="normswap-centre")
    return _slab_pool


@contextlib.contextmanager
def single_threaded():
    """Run torch ops on one thread for the duration (restored afterwards).

    Slab-sized ops are too small to split: with two intra-op threads on a busy machine each op waits for the other
    thread to be scheduled, and throughput fell 20-50x in measurements. The I/O thread gives the overlap instead.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def stage_dtype(src: torch.dtype) -> torch.dtype:
    """The dtype the in-memory path holds a weight in before saving: it loads 16/32-bit floats as float32.

    Casting float64 results through this dtype first reproduces that path's rounding, including the double rounding
    of a bf16 output (float64 -> float32 -> bf16). float64 sources stay float64 here (more exact than the in-memory
    path, which narrows them to float32 on load).
    """
    return torch.float64 if src == torch.float64 else torch.float32


def _store(result: torch.Tensor, out: torch.Tensor, stage: torch.dtype) -> None:
    """``out[:] = result`` rounded as the in-memory path rounds it (through ``stage``), in one pass when it can."""
    out.copy_(result if out.dtype == stage else result.to(stage))


def _check_finite(result: torch.Tensor, hidden: int, name: str) -> None:
    """Refuse non-finite weights, at almost no cost.

    A NaN/Inf anywhere in a hidden-axis slice makes that slice's mean, and so every element of the centred slice,
    non-finite; one index along the hidden axis therefore sees every bad input (1/hidden of the elements).
    """
    if not bool(torch.isfinite(result.narrow(hidden, 0, 1)).all()):
        raise CheckpointError(
            f"tensor {name} contains NaN/Inf value(s); the source checkpoint is damaged or was saved mid-divergence. "
            "Fix or re-download it; normswap will not convert non-finite weights."
        )


def check_finite(t: torch.Tensor, name: str) -> None:
    """Refuse a tensor with NaN/Inf (copied and re-typed tensors too, as the in-memory path checks every one)."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        raise CheckpointError(
            f"tensor {name} contains NaN/Inf value(s); the source checkpoint is damaged or was saved mid-divergence. "
            "Fix or re-download it; normswap will not convert non-finite weights."
        )


@torch.no_grad()
def center_into(src: torch.Tensor, layout: str, out: torch.Tensor, name: str = "tensor",
                slab_elements: int = SLAB_ELEMENTS, scale: torch.Tensor | None = None) -> None:
    """Write the centred ``src`` into ``out`` (same shape; ``out`` may be ``src`` itself), slab by slab.

    ``layout`` is a :data:`normswap.maths.HIDDEN_AXIS` key, or ``"bias"`` for a writer's bias. ``scale`` is a
    LayerScale (indexed along the hidden axis) folded in before centring, as :func:`normswap.maths.center_scaled`.
    """
    if out.shape != src.shape:
        raise ValueError(f"{name}: output shape {tuple(out.shape)} differs from input {tuple(src.shape)}")
    stage = stage_dtype(src.dtype)
    if scale is not None:
        check_finite(scale, name + " (its LayerScale)")
    if layout == "bias" or src.dim() < 2 or src.numel() <= slab_elements:
        axis = -1 if layout == "bias" else maths.HIDDEN_AXIS[layout] % max(src.dim(), 1)
        result = maths.center_scaled(src, axis, scale)
        _check_finite(result, axis, name)
        _store(result, out, stage)
        return
    hidden = maths.HIDDEN_AXIS[layout] % src.dim()
    axis = 0 if hidden != 0 else 1  # any non-hidden axis gives independent slabs
    per_index = src.numel() // src.shape[axis]
    step = max(1, slab_elements // max(per_index, 1))

    def slab(start: int) -> None:
        length = min(step, src.shape[axis] - start)
        result = maths.center_scaled(src.narrow(axis, start, length), hidden, scale)
        _check_finite(result, hidden, name)
        _store(result, out.narrow(axis, start, length), stage)

    starts = range(0, src.shape[axis], step)
    if SLAB_THREADS == 1 or len(starts) < 2 * SLAB_THREADS:
        for start in starts:
            slab(start)
        return
    # The slab of each thread is read and written in place (``out`` may be ``src``): slabs never overlap.
    futures = [_pool().submit(slab, start) for start in starts]
    wait(futures)  # all of them, even after a failure: none may still write into a buffer the caller reuses
    for future in futures:
        future.result()  # re-raises the first damaged slab's error


@torch.no_grad()
def cast_into(src: torch.Tensor, out: torch.Tensor) -> None:
    """``out[:] = src`` through the in-memory path's staging dtype (float32), for tensors that are only re-typed."""
    stage = stage_dtype(src.dtype)
    out.copy_(src if stage in (src.dtype, out.dtype) else src.to(stage))
