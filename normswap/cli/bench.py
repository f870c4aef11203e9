"""``normswap bench MODEL [--against OTHER]``: prefill/decode throughput, interleaved, with a no-norm upper bound."""

from __future__ import annotations

import argparse
import json

from normswap.cli.eval import batch_sizes_arg, positive_int
from normswap.errors import NormswapError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="prefill and decode throughput (optionally against another model, interleaved)",
        description="Throughput with optimum-benchmark definitions. With --against, both models run interleaved "
        "(A B A B ...) in one process so drift hits both. Also times MODEL with every norm replaced by identity: "
        "the most any norm change could save on this hardware.",
    )
    p.add_argument("model", nargs="?", default=None, help="hub id or local folder (default: embedded shakespeare-gpt2)")
    p.add_argument("--against", default=None, help="a second model to compare with (ratio = MODEL / OTHER)")
    p.add_argument("--prompt-len", type=positive_int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=positive_int, default=64, help="tokens generated per decode run (default 64)")
    p.add_argument("--batch-sizes", type=batch_sizes_arg, default=(1, 8), help="comma-separated (default 1,8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per model and batch size (default 2)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs per model and batch size (default 5)")
    p.add_argument("--no-norm-bound", dest="no_norm", action="store_false",
                   help="skip the 'norms replaced by identity' upper bound")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    p.add_argument("--device", default=None, help="cpu (default), cuda, ...")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="on a shared machine, wait up to this long for the CPUs to go idle before timing")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:,.1f}"


def format_bench(result: dict) -> str:
    """A readable table: median [min–max] tokens/s per model and batch size, then ratios and the norm share."""
    env, settings, models = result["environment"], result["settings"], result["models"]
    lines = [
        f"machine   {env['cpu']} ({env['cpu_count']} cores), {env['threads']} threads, {env['device']}, "
        f"{env['dtype']}, torch {env['torch']}, transformers {env['transformers']}, load average "
        f"{env.get('load_average_1m')}" + (f", CPU busy before timing {100 * env['cpu_busy_before_timing']:.0f}%"
                                          if env.get("cpu_busy_before_timing") is not None else ""),
        f"settings  prompt {settings['prompt_len']} tokens, {settings['new_tokens']} new tokens, warmup "
        f"{settings['warmup']}, {settings['repeats']} repeats{', interleaved' if settings['interleaved'] else ''}",
    ]
    for name, fig in models.items():
        kernel = f" [RMSNorm kernel: {fig['rms_norm_kernel']}]" if fig.get("rms_norm_kernel") else ""
        lines.append(f"{name:<9} {fig.get('label', '')}{kernel}")
    lines.append("")
    lines.append(f"{'tokens/s (median [min–max])':<32}" + "".join(f"{n:>30}" for n in models))
    for metric, label in (("prefill_tokens_per_s", "prefill"), ("decode_tokens_per_s", "decode")):
        for bs in settings["batch_sizes"]:
            key = str(bs)
            cells = []
            for fig in models.values():
                s = (fig["stats"].get(metric) or {}).get(key)
                cells.append(f"{_fmt(s['median'])} [{_fmt(s['min'])}–{_fmt(s['max'])}]" if s else "–")
            if any(c != "–" for c in cells):
                lines.append(f"{label + ', batch ' + key:<32}" + "".join(f"{c:>30}" for c in cells))
    for bs in settings["batch_sizes"]:
        cells = []
        for fig in models.values():
            mem = (fig.get("peak_memory") or {}).get(str(bs))
            cells.append(f"{_fmt(mem['peak_mb'])} (+{_fmt(mem['delta_mb'])})" if mem and mem["peak_mb"] else "–")
        lines.append(f"{'peak memory MB, batch ' + str(bs):<32}" + "".join(f"{c:>30}" for c in cells))
    if result.get("ratios"):
        lines.append("")
        lines.append(f"ratio {result['ratio_definition']}:")
        for metric, values in result["ratios"].items():
            lines.append("  " + metric + ": " + ", ".join(f"batch {bs} ×{v:.3f}" for bs, v in values.items()))
    if result.get("norm_share"):
        lines.append("")
        lines.append("norms' share of model's runtime (1 − tokens/s ÷ tokens/s with identity norms):")
        for metric, values in result["norm_share"].items():
            lines.append("  " + metric + ": " + ", ".join(f"batch {bs} {100 * v:+.1f}%" for bs, v in values.items()))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from normswap.evaluate.loading import load_for_eval
    from normswap.evaluate.throughput import BenchSettings, run_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = BenchSettings(prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                             batch_sizes=tuple(args.batch_sizes), warmup=args.warmup, repeats=args.repeats,
                             seed=args.seed)
    target = load_for_eval(args.model, dtype=args.dtype, device=args.device)
    other = load_for_eval(args.against, dtype=args.dtype, device=args.device) if args.against else None
    labels = {"model": target.label}
    if other is not None:
        labels["against"] = other.label
    busy = None
    if args.wait_idle > 0:
        from normswap.evaluate.environment import wait_for_idle

        busy = wait_for_idle(args.wait_idle)
    try:
        result = run_bench(target.model, other.model if other else None, settings=settings, no_norm=args.no_norm,
                           labels=labels)
    except ValueError as exc:
        raise NormswapError(str(exc)) from None
    result["environment"]["cpu_busy_before_timing"] = busy
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0
