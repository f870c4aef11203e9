"""Benchmark streaming conversion on a synthetic multi-GB sharded checkpoint (no model is ever instantiated).

    python scripts/bench_streaming.py                     # GPT-NeoX shape, ~3.2 GB fp32, under /tmp
    python scripts/bench_streaming.py --layers 4 --hidden 1024 --vocab 16384   # quick run

Steps: write a GPT-NeoX-shaped fp32 checkpoint in 1 GB shards straight from random tensors (writers get a non-zero
mean so centring does real work); flush it and drop it from the page cache (``posix_fadvise(DONTNEED)``, no root
needed); time one sequential read of the same files (the disk's read speed) and one sequential write + fsync of the
same size (the bound for a durable output); then, with the source dropped from the cache each time, run the
conversion in a child process (``normswap.streaming.convert_streaming``), output on the same disk (fsync'd before the
atomic rename; verified as ``--verify`` says), once as shipped (``O_DIRECT`` where the filesystem has it) and once
with ``NORMSWAP_DIRECT_IO=0`` (through the page cache), so the two I/O modes are compared in one run; ``--tmpfs`` adds
a run with the output on ``/dev/shm``. The disk's read speed is the faster of a buffered and an ``O_DIRECT``
sequential read, so the conversion is compared with the best the device does. Reports time, MB/s and peak RSS (the conversion phase, recorded before
verification, and the whole child including verification, cross-checked by GNU ``time -v`` when present), and the
load average, since the CPU may be shared. Everything is deleted afterwards unless ``--keep``.

Caveat: on a VM the "disk" may be backed by the host's page cache, and DONTNEED only empties the guest's, so the
cold read speed is what this machine sees, not the physical device's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9


def drop_from_page_cache(paths: list[Path]) -> None:
    """Write back and evict the files' pages so the next read comes from the device."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_read_seconds(paths: list[Path], block: int = 16 * 2**20) -> float:
    buf = bytearray(block)
    view = memoryview(buf)
    start = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - start


def direct_read_seconds(paths: list[Path], block: int = 32 * 2**20) -> float | None:
    """Sequential read with O_DIRECT (no page cache), as the converter reads; None where the filesystem refuses it."""
    import mmap

    buf = mmap.mmap(-1, block)
    start = time.perf_counter()
    try:
        for p in paths:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
            try:
                offset = 0
                while (n := os.preadv(fd, [buf], offset)) > 0:
                    offset += n
            finally:
                os.close(fd)
    except OSError:
        return None
    return time.perf_counter() - start


def direct_write_seconds(path: Path, nbytes: int, block: int = 32 * 2**20) -> float | None:
    """Write + fsync with O_DIRECT, as the converter writes; None where the filesystem refuses it."""
    import mmap

    buf = mmap.mmap(-1, block)
    buf.write(os.urandom(block))
    nbytes -= nbytes % 4096
    start = time.perf_counter()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT)
        try:
            done = 0
            while done < nbytes:
                done += os.pwrite(fd, memoryview(buf)[: min(block, nbytes - done)], done)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        return None
    finally:
        path.unlink(missing_ok=True)
    return time.perf_counter() - start


def durable_write_seconds(path: Path, nbytes: int, block: int = 16 * 2**20) -> float:
    """Time to write ``nbytes`` sequentially and fsync them: the bound for a conversion whose output must be durable."""
    buf = os.urandom(block)
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        done = 0
        while done < nbytes:
            done += fh.write(buf[: min(block, nbytes - done)])
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def write_checkpoint(folder: Path, layers: int, hidden: int, vocab: int, shard_bytes: int) -> list[Path]:
    """A GPT-NeoX checkpoint written tensor list by tensor list, one shard in memory at a time."""
    import torch
    import transformers
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    transformers.GPTNeoXConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(hidden // 128, 1),
        intermediate_size=4 * hidden, vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False,
        architectures=["GPTNeoXForCausalLM"],
    ).save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    h, v = hidden, vocab
    # (name, shape, offset of the values): writers get a non-zero mean, norm gains sit around 1
    specs = [("gpt_neox.embed_in.weight", (v, h), 0.01)]
    for i in range(layers):
        p = f"gpt_neox.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,), 1.0), (p + "input_layernorm.bias", (h,), 0.0),
            (p + "post_attention_layernorm.weight", (h,), 1.0), (p + "post_attention_layernorm.bias", (h,), 0.0),
            (p + "attention.query_key_value.weight", (3 * h, h), 0.0), (p + "attention.query_key_value.bias", (3 * h,), 0.0),
            (p + "attention.dense.weight", (h, h), 0.005), (p + "attention.dense.bias", (h,), 0.01),
            (p + "mlp.dense_h_to_4h.weight", (4 * h, h), 0.0), (p + "mlp.dense_h_to_4h.bias", (4 * h,), 0.0),
            (p + "mlp.dense_4h_to_h.weight", (h, 4 * h), 0.005), (p + "mlp.dense_4h_to_h.bias", (h,), 0.01),
        ]
    specs += [("gpt_neox.final_layer_norm.weight", (h,), 1.0), ("gpt_neox.final_layer_norm.bias", (h,), 0.0),
              ("embed_out.weight", (v, h), 0.0)]

    groups: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = 4 * torch.Size(spec[1]).numel()
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
    files, weight_map = [], {}
    for i, group in enumerate(groups):  # one shard in memory at a time
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: torch.randn(*shape, generator=gen) * 0.02 + mean for name, shape, mean in group}
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        del shard
        weight_map.update({name: fname for name, _, _ in group})
        files.append(folder / fname)
    total = sum(f.stat().st_size for f in files)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return files


def child(args: argparse.Namespace) -> None:
    """The measured process: one conversion, stats as JSON on the last line of stdout."""
    import resource

    from normswap.streaming import convert_streaming

    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    result = convert_streaming(args.src, args.out, max_shard_size=args.max_shard_size, verify=args.verify,
                               progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF)
    v = result.report.verification
    print(json.dumps({
        "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        **result.stats.__dict__, "mb_per_s": result.stats.mb_per_s,
        "total_seconds": time.perf_counter() - start,
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "verification_scope": result.verification_scope,
        "verification": None if v is None else {"passed": v.passed, "rel_max_abs_diff": v.rel_max_abs_diff},
    }))


def parse_gnu_time(stderr: str) -> int | None:
    for line in stderr.splitlines():
        if "Maximum resident set size" in line:
            return int(line.rsplit(":", 1)[1]) * 1024
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--source-shard-size", default="1GB", help="shard size of the synthetic source")
    ap.add_argument("--max-shard-size", default="2GB", help="shard size of the converted output")
    ap.add_argument("--verify", default="auto", choices=("auto", "full", "sample", "none"))
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    ap.add_argument("--tmpfs", action="store_true", help="add a run with the output on /dev/shm (on a VM, tmpfs page "
                    "allocation can cost more CPU than a disk write)")
    ap.add_argument("--no-buffered", action="store_true", help="skip the comparison run through the page cache")
    ap.add_argument("--child", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.src, args.out = args.child
        child(args)
        return 0

    from normswap.streaming import parse_size

    work = Path(tempfile.mkdtemp(prefix="normswap-bench-streaming-", dir=args.workdir))
    src, out = work / "src", work / "out"
    try:
        t0 = time.perf_counter()
        files = write_checkpoint(src, args.layers, args.hidden, args.vocab, parse_size(args.source_shard_size))
        nbytes = sum(f.stat().st_size for f in files)
        print(f"wrote {nbytes / GB:.2f} GB in {len(files)} shards in {time.perf_counter() - t0:.1f} s", flush=True)

        drop_from_page_cache(files)
        buffered_cold = sequential_read_seconds(files)
        warm = sequential_read_seconds(files)
        drop_from_page_cache(files)
        direct = direct_read_seconds(files)
        cold = min(buffered_cold, direct or buffered_cold)  # the faster way of reading is "the disk's read speed"
        print(f"sequential read: cold {nbytes / buffered_cold / 1e6:.0f} MB/s buffered, "
              + (f"{nbytes / direct / 1e6:.0f} MB/s O_DIRECT" if direct else "no O_DIRECT")
              + f"; page cache {nbytes / warm / 1e6:.0f} MB/s", flush=True)

        buffered_write = durable_write_seconds(work / "write-test.bin", nbytes)
        direct_write = direct_write_seconds(work / "write-test.bin", nbytes)
        write_s = min(buffered_write, direct_write or buffered_write)
        print(f"sequential write + fsync: {nbytes / buffered_write / 1e6:.0f} MB/s buffered, "
              + (f"{nbytes / direct_write / 1e6:.0f} MB/s O_DIRECT" if direct_write else "no O_DIRECT"), flush=True)

        runs = {"disk": (out, args.verify, "1")}
        if not args.no_buffered:
            runs["disk, page cache"] = (work / "out-buffered", "none", "0")
        shm = Path("/dev/shm")
        if args.tmpfs and shm.is_dir() and shutil.disk_usage(shm).free > 1.5 * nbytes:
            runs["tmpfs"] = (Path(tempfile.mkdtemp(prefix="normswap-bench-out-", dir=shm)) / "out", "none", "1")
        stats: dict[str, dict] = {}
        gnu_rss: dict[str, int | None] = {}
        try:
            for label, (dest, verify, direct_io) in runs.items():
                drop_from_page_cache(files)
                cmd = [sys.executable, __file__, "--child", str(src), str(dest), "--max-shard-size",
                       args.max_shard_size, "--verify", verify]
                gnu_time = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
                if gnu_time:
                    cmd = [gnu_time, "-v", *cmd]
                load = os.getloadavg()[0]
                proc = subprocess.run(cmd, capture_output=True, text=True,
                                      env={**os.environ, "NORMSWAP_DIRECT_IO": direct_io})
                if proc.returncode != 0:
                    print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
                    return proc.returncode
                stats[label] = json.loads(proc.stdout.strip().splitlines()[-1])
                stats[label]["load_average_before"] = load
                gnu_rss[label] = parse_gnu_time(proc.stderr) if gnu_time else None
                shutil.rmtree(dest, ignore_errors=True)
        finally:
            if "tmpfs" in runs:
                shutil.rmtree(runs["tmpfs"][0].parent, ignore_errors=True)

        largest = max(args.vocab * args.hidden, 4 * args.hidden * args.hidden) * 4
        budget = 2 * largest + 0.5 * GB
        read_mb, write_mb = nbytes / cold / 1e6, nbytes / write_s / 1e6
        both_mb = 1 / (1 / read_mb + 1 / write_mb)  # every byte is read once and written once on the same device
        disk = stats["disk"]
        result = {
            "checkpoint": {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab, "bytes": nbytes,
                           "shards": len(files), "largest_tensor_bytes": largest},
            "disk_mb_per_s": {"cold_read": read_mb, "cold_read_buffered": nbytes / buffered_cold / 1e6,
                              "cold_read_direct": nbytes / direct / 1e6 if direct else None,
                              "page_cache_read": nbytes / warm / 1e6, "write_fsync": write_mb},
            "conversion": stats,
            "gnu_time_max_rss_bytes": gnu_rss,
            "throughput_vs_cold_read": {k: v["mb_per_s"] / read_mb for k, v in stats.items()},
            "throughput_vs_read_write_bound": disk["mb_per_s"] / both_mb,
            "rss_budget_bytes": budget,
            "conversion_rss_within_budget": {k: v["peak_rss_bytes"] <= budget for k, v in stats.items()},
            "cpus": os.cpu_count(),
        }
        print(json.dumps(result, indent=2))
        rows = [
            ("checkpoint", f"{nbytes / GB:.2f} GB fp32 GPT-NeoX ({args.layers} layers, hidden {args.hidden}, vocab "
                           f"{args.vocab}), {len(files)} shards; largest tensor {largest / GB:.2f} GB"),
            ("disk: sequential read, cold: buffered / O_DIRECT; page cache",
             f"{nbytes / buffered_cold / 1e6:.0f} / " + (f"{nbytes / direct / 1e6:.0f}" if direct else "n/a")
             + f"; {nbytes / warm / 1e6:.0f} MB/s"),
            ("disk: sequential write + fsync: buffered / O_DIRECT", f"{nbytes / buffered_write / 1e6:.0f} / "
             + (f"{nbytes / direct_write / 1e6:.0f}" if direct_write else "n/a") + " MB/s"),
            ("bound for reading and writing the same disk, 1/(1/read + 1/write), faster modes", f"{both_mb:.0f} MB/s"),
        ]
        for label, st in stats.items():
            where = {"disk": "output on the same disk, fsync'd, O_DIRECT" if st.get("direct_io") else
                     "output on the same disk, fsync'd", "disk, page cache": "same, through the page cache "
                     "(NORMSWAP_DIRECT_IO=0)", "tmpfs": "output on tmpfs"}[label]
            rows.append((f"conversion, {where}", f"{st['seconds']:.1f} s = {st['mb_per_s']:.0f} MB/s "
                         f"({100 * st['mb_per_s'] / read_mb:.0f}% of the cold read"
                         + (f", {100 * st['mb_per_s'] / both_mb:.0f}% of the read+write bound" if label != "tmpfs"
                            else "")
                         + f"); load average {st['load_average_before']:.1f} on {os.cpu_count()} CPUs"))
            if st["verification"] is None:  # CPU time of the conversion alone (the verifying run includes its own)
                rows.append((f"CPU time of the conversion ({label})",
                             f"{st['cpu_seconds']:.1f} s = {nbytes / st['cpu_seconds'] / 1e6:.0f} MB per CPU-second"))
            rows.append((f"peak RSS, conversion phase ({label})",
                         f"{st['peak_rss_bytes'] / GB:.2f} GB (budget 2 x largest + 0.5 GB = {budget / GB:.2f} GB)"))
        rows.append(("peak RSS, whole process incl. verification",
                     f"{disk['process_peak_rss_bytes'] / GB:.2f} GB"
                     + (f" (GNU time: {gnu_rss['disk'] / GB:.2f} GB)" if gnu_rss.get("disk") else "")))
        rows.append(("verification", f"{disk['verification_scope']}: {disk['verification']} "
                                     f"({disk['total_seconds'] - disk['seconds']:.1f} s)"))
        print("\n| measure | value |\n|---|---|")
        for k, v in rows:
            print(f"| {k} | {v} |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
