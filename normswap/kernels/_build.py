"""Build-on-first-use loader for the fused CPU RMSNorm extension (``csrc/rms_norm.cpp``).

JIT compilation (``torch.utils.cpp_extension.load``) keeps normswap a pure-Python wheel: nothing to build at install
time, and the kernel is compiled against whichever torch is actually installed. The first call costs a compile (tens
of seconds); later processes reuse the cached ``.so`` from the torch extensions directory (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``), which torch rebuilds by itself when the source or flags change and guards
with a file lock when several processes build at once.

Instruction-set flags are chosen from torch's own CPU capability probe (which honours ``ATEN_CPU_CAPABILITY``), never
``-march=native``, and the capability is part of the extension name: a cache directory shared between machines (NFS
home, container image) therefore holds one build per instruction set and never hands AVX-512 code to a CPU without it.

A failed build (no compiler, missing headers, sandbox) is not an error for the user: :func:`load` warns once and
returns ``None``, and dispatch falls back to the composite implementation. Where the kernel is part of what is being
checked (CI, ``.ci/run``), ``NORMSWAP_REQUIRE_KERNEL=1`` makes a failed build raise :class:`KernelBuildError`
instead, so a broken ``rms_norm.cpp`` fails the tests rather than skipping them.

The first build stalls for ~10-20 s, so it is announced through the ``normswap.kernels`` logger at WARNING level
(the CLI prints it; nothing here prints).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["REQUIRE_ENV", "KernelBuildError", "available", "cpu_capability", "extension_name", "load", "load_error"]

logger = logging.getLogger("normswap.kernels")

#: Set to 1 (CI does) to make a failed build of the fused kernel an error instead of a warning and a fallback.
REQUIRE_ENV = "NORMSWAP_REQUIRE_KERNEL"


class KernelBuildError(RuntimeError):
    """The fused kernel could not be built although ``NORMSWAP_REQUIRE_KERNEL`` asks for it."""

_SOURCE = Path(__file__).resolve().parent / "csrc" / "rms_norm.cpp"

# Compiler flags per torch CPU capability: the same ISA subsets ATen compiles its own AVX2/AVX512 kernels with, so
# the at::vec::Vectorized headers select the matching implementation and nothing newer is emitted.
_ISA_FLAGS: dict[str, list[str]] = {
    "AVX512BF16": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mavx512bf16"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": [],
}

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None  # set once a build has failed, so it is attempted (and warned about) only once per process


def cpu_capability() -> str:
    """The instruction-set level to build for: torch's own answer, reduced to the levels we have flags for.

    ``AVX512BF16`` is AVX512 plus the one-instruction fp32 -> bf16 rounding, which roughly halves the cost of the
    bf16 write pass; torch does not report it as a capability level of its own, so it is probed separately.
    """
    cap = torch.backends.cpu.get_cpu_capability().upper()
    if cap not in _ISA_FLAGS:
        return "DEFAULT"
    if cap == "AVX512" and _has_avx512_bf16():
        return "AVX512BF16"
    return cap


def _has_avx512_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # noqa: BLE001 - a private probe that changed shape just means "don't use it"
        return False


def extension_name() -> str:
    """Extension (and cache directory) name; includes the ISA level so shared caches stay safe across CPUs."""
    return f"normswap_rmsnorm_{cpu_capability().lower()}"


def _compile() -> ModuleType:
    """Compile (or reuse the cached build of) the extension. Raises on any failure."""
    from torch.utils.cpp_extension import load as load_extension

    cap = cpu_capability()
    aten_cap = "AVX512" if cap == "AVX512BF16" else cap  # the at::vec implementation to compile against
    cflags = ["-O3", "-fopenmp", f"-DCPU_CAPABILITY={aten_cap}", *_ISA_FLAGS[cap]]
    if aten_cap != "DEFAULT":
        cflags.append(f"-DCPU_CAPABILITY_{aten_cap}")
    name = extension_name()
    _wait_for_lock(name)
    fresh = not _cached(name)
    if fresh:
        logger.warning("building the fused RMSNorm kernel (once; ~10-20 s, cached for later runs)")
    start = time.perf_counter()
    # -fopenmp makes at::parallel_for (inline OpenMP in the ATen headers) actually parallel; the resulting
    # libgomp.so.1 dependency resolves to the copy torch has already loaded, so there is one OpenMP runtime.
    module = load_extension(
        name=name,
        sources=[str(_SOURCE)],
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )
    if fresh:
        logger.info("fused RMSNorm kernel built in %.1f s", time.perf_counter() - start)
    return module


#: A build lock older than this is a killed build's leftover (a build takes 10-20 s, ~5 min on a loaded machine).
STALE_LOCK_S = 600.0


def _wait_for_lock(name: str, stale_after: float = STALE_LOCK_S, poll: float = 0.5) -> None:
    """Wait for another process's build, but never forever: torch's lock has no owner, so a killed build leaves it.

    torch.utils.cpp_extension waits for as long as the ``lock`` file exists; one build killed mid-way would hang
    every later normswap run silently. A lock younger than ``stale_after`` is waited on (saying so once); an older
    one is removed with a warning, and the build goes ahead.
    """
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    except Exception:  # noqa: BLE001 - a private helper that changed: leave locking to torch
        return
    announced = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age >= stale_after:
            logger.warning("removing a stale kernel build lock left by a killed build (%s, %.0f s old)", lock, age)
            lock.unlink(missing_ok=True)
            return
        if not announced:
            logger.warning("waiting for another process's build of the fused RMSNorm kernel (%s)", lock)
            announced = True
        time.sleep(poll)


def _cached(name: str) -> bool:
    """Whether a build of ``name`` is already in the extensions cache (then loading it takes milliseconds)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").is_file()
    except Exception:  # noqa: BLE001 - a private helper that changed: just announce the build
        return False


def required() -> bool:
    """Whether ``NORMSWAP_REQUIRE_KERNEL`` makes a failed build an error."""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def load() -> ModuleType | None:
    """The compiled extension, building it on first use; ``None`` (after one warning) if it cannot be built.

    With ``NORMSWAP_REQUIRE_KERNEL`` set, a build that failed (now or earlier in this process) raises
    :class:`KernelBuildError` instead.
    """
    global _module, _error
    if _module is not None:
        return _module
    if _error is not None:
        if required():
            raise KernelBuildError(f"{REQUIRE_ENV} is set and the fused RMSNorm kernel could not be built: {_error}")
        return None
    with _lock:
        if _module is None and _error is None:
            try:
                _module = _compile()
            except Exception as exc:  # noqa: BLE001 - any build failure means "use the fallback", never a crash
                _error = f"{type(exc).__name__}: {exc}"
                if required():
                    raise KernelBuildError(
                        f"{REQUIRE_ENV} is set and the fused RMSNorm kernel could not be built: {_error}"
                    ) from exc
                warnings.warn(
                    "normswap: could not build the fused CPU RMSNorm kernel, falling back to the composite "
                    f"implementation (correct but ~3x slower). Cause: {_error}",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _module


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the fused kernel can run here (building it on first use).

    A constant for ``torch.compile``: dynamo calls it once while tracing instead of tracing the build and its lock.
    """
    return load() is not None


def load_error() -> str | None:
    """Why the build failed in this process, or ``None`` if it has not failed (yet)."""
    return _error


def _reset() -> None:
    """Forget the loaded module / recorded failure. For tests that simulate a failed build."""
    global _module, _error
    with _lock:
        _module = None
        _error = None
