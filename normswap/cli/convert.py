"""``normswap convert SRC -o OUT``: convert, verify, save (and, by default, measure before/after)."""

from __future__ import annotations

import argparse
from pathlib import Path

from normswap.assets import resolve_model
from normswap.cli.eval import add_convert_arguments, start_convert_evaluation
from normswap.streaming.cli import add_streaming_arguments, maybe_run_streaming
from normswap.targets import add_target_arguments, run_target


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a model's LayerNorms to RMSNorm and save it",
        description="Convert a model (hub id or local folder; default: the embedded Shakespeare GPT-2) from LayerNorm "
        "to RMSNorm, verify it against the original, and save a standard save_pretrained folder.",
    )
    p.add_argument("src", nargs="?", default=None, help="hub id or local folder (default: embedded shakespeare-gpt2)")
    p.add_argument("-o", "--output", help="output folder (default: ./<source name>-rms)")
    p.add_argument("--approximate", action="store_true",
                   help="also swap norms that cannot be exact (post-LN); measures the damage, heal with finetune")
    p.add_argument("--fold-bias", action="store_true", help="fold each norm's bias into its readers' biases")
    p.add_argument("--fold-gain", action="store_true", help="fold each norm's gain into its readers' weights")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output folder and save even if verification fails")
    p.add_argument("--dtype", default=None,
                   help="dtype of the saved weights (surgery always runs in float64/float32): float32, bfloat16, float16 "
                   "(default: float32; with --streaming: each tensor's own dtype)")
    p.add_argument("--device", default=None, help="device for loading and verification (e.g. cpu, cuda)")
    p.add_argument("--revision", default=None, help="hub revision of the source")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max relative |Δlogit| accepted for an exact conversion (default 1e-4 in fp32)")
    p.add_argument("--json", action="store_true", help="print the conversion report as JSON")
    add_convert_arguments(p)
    add_streaming_arguments(p)
    add_target_arguments(p)  # --to rmsnorm|none|dyt: normswap/targets.py
    p.set_defaults(func=run)


def default_output(src: str) -> Path:
    """``./<source name>-rms``; a local source is named by its real folder, so ``normswap convert .`` gets a name."""
    local = Path(src)
    name = local.resolve().name if local.exists() else Path(src.rstrip("/")).name
    return Path.cwd() / f"{name}-rms"


def run(args: argparse.Namespace) -> int:
    targeted = run_target(args)  # --to none|dyt run their own path; None: LayerNorm → RMSNorm below
    if targeted is not None:
        return targeted
    import json

    import normswap
    from normswap.checkpoint import load_source, parse_dtype
    from normswap.cli import say
    from normswap.outputs import check_output_not_source, check_output_target, probe_output_location

    src = resolve_model(args.src, args.revision)
    out = Path(args.output).expanduser() if args.output else default_output(src)
    check_output_not_source(out, src)  # before anything runs: the in-memory and streaming paths alike
    check_output_target(out.resolve(), args.force)
    probe_output_location(out)
    streamed = maybe_run_streaming(args, src, out)  # --streaming, or automatic for checkpoints too big for RAM
    if streamed is not None:
        return streamed
    out_dtype = parse_dtype(args.dtype or "float32")

    say(args, f"loading {src}")
    source = load_source(src, dtype="float32", device=args.device, revision=args.revision)
    check_output_not_source(out, source.local_dir)  # a Hub id's snapshot in the local cache is a source too
    if source.tokenizer is None:
        say(args, "note: no tokenizer found next to the model; converting anyway (probes use random token ids)")
    evaluation = start_convert_evaluation(args, source, out)  # "before" must be measured before the in-place convert_
    report = normswap.convert_(
        source.model, approximate=args.approximate, fold_gain=args.fold_gain, fold_bias=args.fold_bias,
        tolerance=args.tolerance, tokenizer=source.tokenizer, dtype=out_dtype,
    )
    source.model.config.normswap = report.metadata(
        source.id, source.revision, str(out_dtype).removeprefix("torch.")
    )
    say(args, report.summary())
    if not report.passed and not args.force:
        raise normswap.errors.VerificationError(
            "verification failed, so nothing was saved: the converted model does not match the original within "
            f"tolerance ({report.verification.summary()}). Pass --force to save it anyway."
        )
    extra_files = evaluation.finish(report, src, out) if evaluation is not None else None
    path = normswap.save(source.model, out, tokenizer=source.tokenizer, source_dir=source.local_dir,
                         force=args.force, dtype=out_dtype, extra_files=extra_files)
    say(args, f"saved {path}")
    if args.json:  # last, and alone on stdout: `normswap convert ... --json | python -m json.tool` works
        print(json.dumps({**report.to_dict(), "output": str(path)}, indent=2, default=str))
    return 0
