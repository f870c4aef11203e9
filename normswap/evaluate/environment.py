"""The machine and software a measurement ran on: numbers without these are not reproducible."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch


def cpu_model_name() -> str:
    """``lscpu``'s "Model name" (read from /proc/cpuinfo on Linux); the platform string elsewhere."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> dict:
    import transformers

    from normswap._version import __version__

    device = str(device or "cpu")
    info = {
        "device": device,
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "normswap": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        # other processes competing for the cores move CPU timings more than any norm does; record how busy it was
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def describe_machine(env: dict) -> str:
    """One line for tables: what a reader needs to judge whether the numbers apply to their hardware."""
    where = env.get("gpu") or f"{env.get('cpu')} ({env.get('cpu_count')} cores, {env.get('threads')} threads)"
    return (f"{where}, {env.get('device')}, {env.get('dtype')}, torch {env.get('torch')}, "
            f"transformers {env.get('transformers')}")


def _cpu_times() -> tuple[int, int] | None:
    stat = Path("/proc/stat")
    if not stat.exists():
        return None
    fields = [int(v) for v in stat.read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields), idle


def cpu_busy_fraction(interval_s: float = 1.0) -> float | None:
    """Share of all cores' time spent busy over ``interval_s`` (Linux ``/proc/stat``; ``None`` elsewhere)."""
    import time

    first = _cpu_times()
    if first is None:
        return None
    time.sleep(interval_s)
    second = _cpu_times()
    total, idle = second[0] - first[0], second[1] - first[1]
    return 1 - idle / total if total > 0 else None


def wait_for_idle(max_wait_s: float, threshold: float = 0.2, interval_s: float = 1.0) -> float | None:
    """Block until other processes leave the cores alone (busy share < ``threshold``), at most ``max_wait_s``.

    On a shared 2-core machine one busy neighbour stalls every parallel region, and CPU timings taken then say more
    about the neighbour than about the model. Returns the last busy share seen, so reports can state it.
    """
    import time

    deadline = time.monotonic() + max_wait_s
    busy = cpu_busy_fraction(interval_s)
    while busy is not None and busy >= threshold and time.monotonic() < deadline:
        busy = cpu_busy_fraction(interval_s)
    return busy
