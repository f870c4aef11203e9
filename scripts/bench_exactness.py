"""Why verification compares with the original in float64, measured on a GPT-NeoX checkpoint with massive means.

    python scripts/bench_exactness.py                         # the issue's checkpoint: 12 layers, hidden 2048, 2.9 GB
    python scripts/bench_exactness.py --layers 4 --hidden 512 --vocab 8192    # a quick run
    python scripts/bench_exactness.py --tied-only / --untied-only

For each of an untied and a tied checkpoint (random weights; the embeddings and every writer add a large common
mean to the stream, as real models' massive activations do), this script

1. writes the checkpoint shard by shard (no model in memory);
2. runs ``normswap convert SRC -o OUT --no-eval`` (in memory) and ``normswap convert SRC -o OUT --streaming
   --no-eval`` in child processes under GNU ``time -v`` (whole-process peak RSS), and a streaming child that also
   reports how long its verification took;
3. prints the table of issue 12 from the in-memory output's recorded figures: the original in fp32 against the
   original in float64 (the truth), the converted model against the truth, and the converted model against the
   original in fp32 (what verification checked before issue 12, with its 1e-4 tolerance);
4. checks that both outputs hold identical tensors, and compares the streaming peak RSS with the budget
   2 × largest tensor + 0.5 GB + 2 × one block at the checkpoint's dtype.

Everything is deleted afterwards unless ``--keep``. Print ``--json`` for the raw figures.
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
OLD_TOLERANCE = 1e-4


def specs(layers: int, hidden: int, inter: int, vocab: int, tied: bool, mean: float) -> list[tuple]:
    """(file key, shape, std, mean) of every tensor; writers (embeddings, attention.dense, dense_4h_to_h) get a mean."""
    h = hidden
    out = [("gpt_neox.embed_in.weight", (vocab, h), 0.02, mean)]
    for i in range(layers):
        p = f"gpt_neox.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,), 0.1, 1.0), (p + "input_layernorm.bias", (h,), 0.1, 0.0),
            (p + "post_attention_layernorm.weight", (h,), 0.1, 1.0),
            (p + "post_attention_layernorm.bias", (h,), 0.1, 0.0),
            (p + "attention.query_key_value.weight", (3 * h, h), 0.02, 0.0),
            (p + "attention.query_key_value.bias", (3 * h,), 0.02, 0.0),
            (p + "attention.dense.weight", (h, h), 0.02, 0.002), (p + "attention.dense.bias", (h,), 0.02, mean),
            (p + "mlp.dense_h_to_4h.weight", (inter, h), 0.02, 0.0), (p + "mlp.dense_h_to_4h.bias", (inter,), 0.02, 0.0),
            (p + "mlp.dense_4h_to_h.weight", (h, inter), 0.02, 0.002), (p + "mlp.dense_4h_to_h.bias", (h,), 0.02, mean),
        ]
    out += [("gpt_neox.final_layer_norm.weight", (h,), 0.1, 1.0), ("gpt_neox.final_layer_norm.bias", (h,), 0.1, 0.0)]
    if not tied:
        out.append(("embed_out.weight", (vocab, h), 0.02, 0.0))
    return out


def write_checkpoint(folder: Path, args: argparse.Namespace, tied: bool) -> dict:
    """Shards of at most ``--shard-gb``, one in memory at a time; returns sizes for the RSS budget."""
    import torch
    import transformers
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    transformers.GPTNeoXConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 128, 1),
        intermediate_size=args.inter, vocab_size=args.vocab, max_position_embeddings=2048, tie_word_embeddings=tied,
        architectures=["GPTNeoXForCausalLM"], bos_token_id=0, eos_token_id=0,
    ).save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    todo = specs(args.layers, args.hidden, args.inter, args.vocab, tied, args.mean)
    groups, size = [[]], 0
    for spec in todo:
        nbytes = 4 * torch.Size(spec[1]).numel()
        if groups[-1] and size + nbytes > args.shard_gb * GB:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: torch.randn(*shape, generator=gen) * std + mean for name, shape, std, mean in group}
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        del shard
        weight_map.update({name: fname for name, *_ in group})
    total = sum(4 * torch.Size(s[1]).numel() for s in todo)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    block = sum(4 * torch.Size(s[1]).numel() for s in todo if s[0].startswith("gpt_neox.layers.0."))
    largest = max(4 * torch.Size(s[1]).numel() for s in todo)
    return {"bytes": total, "largest_tensor": largest, "block": block}


def gnu_time(cmd: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, int | None, float]:
    """Run ``cmd`` under GNU time -v when present; (process, peak RSS in bytes, wall seconds)."""
    prefix = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    start = time.perf_counter()
    proc = subprocess.run(prefix + cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    rss = None
    for line in proc.stderr.splitlines():
        if "Maximum resident set size" in line:
            rss = int(line.rsplit(":", 1)[1]) * 1024
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc, rss, wall


def child(src: str, out: str) -> None:
    """The measured streaming run: figures and the verification's share of wall time as JSON on stdout."""
    from normswap.streaming import convert_streaming

    start = time.perf_counter()
    result = convert_streaming(src, out, verify="full", progress=False)
    total = time.perf_counter() - start
    v = result.report.verification
    print(json.dumps({"total_seconds": total, "conversion_seconds": result.stats.seconds,
                      "verification_seconds": result.verification_seconds, "passed": v.passed,
                      "original_error": v.original_error, "converted_error": v.converted_error,
                      "blocks_checked": v.blocks_checked}))


def same_tensors(a: Path, b: Path) -> bool:
    """Both outputs hold the same keys with bit-identical values (read one tensor at a time)."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        found = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                found.update({k: f for k in h.keys()})
        return found

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return False
    import torch

    for key in ia:
        with safe_open(str(ia[key]), framework="pt") as ha, safe_open(str(ib[key]), framework="pt") as hb:
            if not torch.equal(ha.get_tensor(key), hb.get_tensor(key)):
                return False
    return True


def run_one(args: argparse.Namespace, work: Path, tied: bool) -> dict:
    name = "tied" if tied else "untied"
    src = work / f"src-{name}"
    sizes = write_checkpoint(src, args, tied)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    mem_out, stream_out = work / f"mem-{name}", work / f"stream-{name}"
    _, mem_rss, mem_wall = gnu_time([sys.executable, "-m", "normswap", "convert", str(src), "-o", str(mem_out),
                                     "--no-eval", "--force"], env)
    proc, stream_rss, stream_wall = gnu_time([sys.executable, __file__, "--child", str(src), str(stream_out)], env)
    streamed = json.loads(proc.stdout.strip().splitlines()[-1])
    ver = json.loads((mem_out / "config.json").read_text())["normswap"]["verification"]
    budget = 2 * sizes["largest_tensor"] + 0.5 * GB + 2 * sizes["block"]
    return {
        "checkpoint": name, **sizes, "budget_bytes": budget,
        "original_error": ver["original_error"], "converted_error": ver["converted_error"],
        "converted_vs_original_fp32": ver["rel_max_abs_diff"], "in_memory_passed": ver["passed"],
        "in_memory_peak_rss": mem_rss, "in_memory_wall_seconds": mem_wall,
        "streaming": streamed, "streaming_peak_rss": stream_rss, "streaming_wall_seconds": stream_wall,
        "outputs_identical": same_tensors(mem_out, stream_out),
    }


def table(r: dict) -> str:
    old = r["converted_vs_original_fp32"]
    verdict = "refused" if old > OLD_TOLERANCE else "accepted"
    s = r["streaming"]
    rss = r["streaming_peak_rss"]
    lines = [
        f"{r['checkpoint']} checkpoint: {r['bytes'] / GB:.2f} GB fp32, largest tensor {r['largest_tensor'] / GB:.2f} GB, "
        f"one block {r['block'] / GB:.2f} GB",
        "",
        "| | relative max \\|Δlogit\\| |",
        "|---|---|",
        f"| original fp32 vs original float64 (the truth) | {r['original_error']:.2e} |",
        f"| converted fp32 vs the truth | **{r['converted_error']:.2e}** |",
        f"| converted fp32 vs original fp32 (the check before issue 12, tolerance 1e-4) | {old:.2e} → {verdict} |",
        "",
        f"in memory: {'PASSED' if r['in_memory_passed'] else 'FAILED'}, peak RSS "
        f"{(r['in_memory_peak_rss'] or 0) / GB:.2f} GB, {r['in_memory_wall_seconds']:.1f} s",
        f"streaming: {'PASSED' if s['passed'] else 'FAILED'} ({s['blocks_checked']} blocks checked), whole-process peak "
        f"RSS {(rss or 0) / GB:.2f} GB (budget 2 × largest + 0.5 GB + 2 × block = {r['budget_bytes'] / GB:.2f} GB: "
        f"{'within' if rss is not None and rss <= r['budget_bytes'] else 'OVER'}), conversion "
        f"{s['conversion_seconds']:.1f} s + verification {s['verification_seconds']:.1f} s "
        f"(+{100 * s['verification_seconds'] / s['conversion_seconds']:.0f}%)",
        f"in-memory and streamed outputs identical: {r['outputs_identical']}",
    ]
    return "\n".join(lines)


def tiny_table(seeds: int) -> str:
    """Both errors against the float64 original for every registered tiny row, at fp32, bf16 and fp16."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_models import EXACT_ROWS, make

    import normswap

    dtypes = [(torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")]
    lines = ["| row | " + " | ".join(f"{n}: original / converted (ratio)" for _, n in dtypes) + " |",
             "|---|" + "---|" * len(dtypes)]
    for row in sorted(EXACT_ROWS):
        cells = []
        for dtype, _ in dtypes:
            o = c = 0.0
            for seed in range(seeds):  # worst over the seeds
                v = normswap.convert_(make(row, seed), dtype=dtype).verification
                o, c = max(o, v.original_error), max(c, v.converted_error)
            cells.append(f"{o:.1e} / {c:.1e} ({c / o:.2f})")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=None, help="MLP width (default 4 × hidden)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--mean", type=float, default=1.0, help="mean of the writers' biases and embeddings")
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary folder under /tmp)")
    ap.add_argument("--tied-only", action="store_true")
    ap.add_argument("--untied-only", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--tiny-table", type=int, metavar="SEEDS", default=0,
                    help="instead: print both errors for every registered tiny test model (worst of SEEDS seeds)")
    ap.add_argument("--child", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return 0
    if args.tiny_table:
        print(tiny_table(args.tiny_table))
        return 0
    args.inter = args.inter or 4 * args.hidden
    work = Path(tempfile.mkdtemp(prefix="normswap-exactness-", dir=args.dir))
    variants = [False] if args.untied_only else [True] if args.tied_only else [False, True]
    try:
        results = [run_one(args, work, tied) for tied in variants]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"GPT-NeoX, {args.layers} layers, hidden {args.hidden}, MLP {args.inter}, vocab {args.vocab}, writer mean "
          f"{args.mean}; {os.cpu_count()} CPU(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    for r in results:
        print()
        print(table(r))
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
