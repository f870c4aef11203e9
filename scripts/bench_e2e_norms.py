"""End-to-end: is a converted GPT-2-small-shaped model ever slower than the original? (issue 5 target)

Times a full forward (prefill) of the original (LayerNorm) and the exactly converted (normswap.RMSNorm) model,
interleaved A B A B in one process, for eager and torch.compile, fp32 and bf16, batch 1 and 4. Random weights of
GPT-2 small's shape (12 layers, hidden 768, vocab 50257): speed does not depend on the values.

Usage: python scripts/bench_e2e_norms.py [--seq 128] [--repeats 15] [--no-compile] [--layers 12]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
import transformers as T

import normswap
from normswap.kernels import selected_backend


def timed(model, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(ids)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--modes", default="eager,compiled", help="comma-separated subset of eager,compiled")
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=args.layers, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    base = T.GPT2LMHeadModel(cfg).eval()
    conv = copy.deepcopy(base)
    normswap.convert_(conv, verify_result=False)
    modes = [m for m in args.modes.split(",") if not (args.no_compile and m == "compiled")]
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__},"
          f" transformers {T.__version__}; GPT-2 small shape, {args.layers} layers, seq {args.seq}, "
          f"median of {args.repeats} interleaved")
    print("| mode | dtype | batch | LayerNorm ms | RMSNorm ms | speed-up (LN/RMS) | RMSNorm kernel |")
    print("|---|---|---|---:|---:|---:|---|")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        a, b = copy.deepcopy(base).to(dtype), copy.deepcopy(conv).to(dtype)
        for mode in modes:
            fa, fb = (a, b) if mode == "eager" else (torch.compile(a), torch.compile(b))
            for bs in (int(x) for x in args.batch_sizes.split(",")):
                ids = torch.randint(0, cfg.vocab_size, (bs, args.seq))
                with torch.inference_mode():
                    for _ in range(2):  # warmup (and compilation)
                        fa(ids)
                        fb(ids)
                    ta, tb = [], []
                    for _ in range(args.repeats):
                        ta.append(timed(fa, ids))
                        tb.append(timed(fb, ids))
                ma, mb = statistics.median(ta) * 1e3, statistics.median(tb) * 1e3
                kernel = selected_backend(torch.zeros(bs, args.seq, 768, dtype=dtype))
                if mode == "compiled":
                    kernel = "inductor (composite traced)"
                print(f"| {mode} | {dtype_name} | {bs} | {ma:.1f} | {mb:.1f} | ×{ma / mb:.3f} | {kernel} |", flush=True)


if __name__ == "__main__":
    main()
