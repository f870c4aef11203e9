"""ResNet-50-shaped model: folded (``normswap convert --to none``, loaded with ``normswap.load``) vs the original.

Builds ``ResNetForImageClassification(ResNetConfig())`` (ResNet-50 shape, random weights with BatchNorm statistics
and affine parameters moved away from identity), folds and saves it with normswap, loads both folders back (the
original with the stock class, the folded one with ``normswap.load``: no BatchNorm modules), checks they agree,
and times forwards at batch 8, 224×224, fp32, eager, on CPU, interleaved (original, folded, folded-as-stored,
alternating which goes first each round) so drift from other processes on a shared machine hits all alike.

    python scripts/bench_batchnorm.py --rounds 30 --json docs/bench_batchnorm.json

Per round the ratio is t(original) / t(folded) (> 1: folded is faster); the script prints the median of the
per-round ratios and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as T
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normswap
from normswap.batchnorm import fold_batchnorms_
from normswap.evaluate.environment import cpu_busy_fraction, describe_machine, environment, wait_for_idle


def perturbed_resnet50(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = T.ResNetForImageClassification(T.ResNetConfig()).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
    model.config.architectures = ["ResNetForImageClassification"]
    return model


def time_forward(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(pixel_values=x)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=30, help="timed rounds (each times every model once)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to this long for the CPUs to go idle before timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "resnet50", Path(tmp) / "resnet50-none"
        perturbed_resnet50(args.seed).save_pretrained(src)
        model = T.ResNetForImageClassification.from_pretrained(src).eval()
        t0 = time.perf_counter()
        report = fold_batchnorms_(model)
        fold_s = time.perf_counter() - t0
        normswap.save(model, out)
        models = {
            "original": T.ResNetForImageClassification.from_pretrained(src).eval(),
            "folded (normswap.load)": normswap.load(out),
            "folded, stored form (stock class)": T.ResNetForImageClassification.from_pretrained(out).eval(),
        }
    bns = {k: sum(isinstance(m, _BatchNorm) for m in v.modules()) for k, v in models.items()}
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = models["original"](pixel_values=x).logits.double()
        rel = {k: float((m(pixel_values=x).logits.double() - ref).abs().max() / ref.abs().max())
               for k, m in models.items() if k != "original"}

    busy_before = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else cpu_busy_fraction(0.5)
    names = list(models)
    for _ in range(args.warmup):
        for k in names:
            time_forward(models[k], x)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for k in order:
            times[k].append(time_forward(models[k], x))
    busy_after = cpu_busy_fraction(0.5)

    orig = times["original"]
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": describe_machine(environment("cpu", torch.float32)),
        "threads": torch.get_num_threads(),
        "shape": {"batch": args.batch, "size": args.size, "dtype": "float32", "mode": "eager"},
        "folded": len(report.folded), "kept": report.kept, "fold_seconds": fold_s,
        "batchnorm_modules": bns,
        "relative_max_abs_diff_vs_original": rel,
        "verification": report.verification.summary() if report.verification else None,
        "cpu_busy_before": busy_before, "cpu_busy_after": busy_after,
        "rounds": args.rounds,
        "models": {},
    }
    for k in names:
        ratios = [o / t for o, t in zip(orig, times[k], strict=True)]
        result["models"][k] = {
            "median_s": statistics.median(times[k]), "min_s": min(times[k]), "max_s": max(times[k]),
            "images_per_s": args.batch / statistics.median(times[k]),
            "median_ratio": statistics.median(ratios),
            "ratio_of_medians": statistics.median(orig) / statistics.median(times[k]),
            "ratio_range": [min(ratios), max(ratios)],
        }
    print(f"{result['machine']}; {result['threads']} threads; batch {args.batch}, {args.size}×{args.size}, fp32, "
          f"eager; {args.rounds} interleaved rounds; CPU busy before/after: {busy_before}, {busy_after}")
    print(f"folded {len(report.folded)} BatchNorms in {fold_s:.2f} s (kept {len(report.kept)}); BatchNorm modules "
          f"at runtime: {bns}; relative max|Δlogit| vs original: {rel}")
    print("| model | median s/forward | images/s | median ratio (orig/this) | ratio of medians | ratio range |")
    print("|---|---:|---:|---:|---:|---|")
    for k, v in result["models"].items():
        print(f"| {k} | {v['median_s']:.4f} | {v['images_per_s']:.2f} | ×{v['median_ratio']:.3f} | "
              f"×{v['ratio_of_medians']:.3f} | ×{v['ratio_range'][0]:.3f}–×{v['ratio_range'][1]:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
