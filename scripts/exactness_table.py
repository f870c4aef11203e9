"""Print max relative |Δlogit| of the exact conversion for every adapter test row (tiny perturbed models, fp32).

Usage: python scripts/exactness_table.py [--seeds 3]
The stock model's own float32 rounding noise is the same order, so these numbers are the floor, not an error.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_models import EXACT_ROWS, make  # noqa: E402

import normswap  # noqa: E402
from normswap.verify import make_probes, primary_output  # noqa: E402


def fp64_noise(model: torch.nn.Module, probes: dict) -> float:
    """The unconverted model's own fp32-vs-fp64 relative difference: the floor any conversion sits on."""
    with torch.no_grad():
        out32 = primary_output(model(**probes)).double()
        out64 = primary_output(copy.deepcopy(model).double()(**probes))
    return float((out32 - out64).abs().max() / out64.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print("| row | model_type | max rel |Δ| (converted vs original, fp32) | stock fp32 vs fp64 | top-1 |")
    print("|---|---|---|---|---|")
    for row, (model_type, _) in sorted(EXACT_ROWS.items()):
        worst, noise, top1 = 0.0, 0.0, 1.0
        for seed in range(args.seeds):
            model = make(row, seed)
            probes = make_probes(model, seq_len=32, seed=seed)
            noise = max(noise, fp64_noise(model, probes))
            v = normswap.convert_(model, probes=probes).verification
            worst = max(worst, v.rel_max_abs_diff)
            top1 = min(top1, v.top1_agreement if v.top1_agreement is not None else 1.0)
        print(f"| {row} | {model_type} | {worst:.2e} | {noise:.2e} | {100 * top1:.1f}% |")


if __name__ == "__main__":
    main()
