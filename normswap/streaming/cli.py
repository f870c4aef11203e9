"""The ``--streaming`` side of ``normswap convert``: flags, the automatic switch for big checkpoints, and the run.

Kept here so ``normswap/cli/convert.py`` only gains two calls; printing happens in this CLI layer, never below it.
"""

from __future__ import annotations

import argparse
import json
import sys

from normswap.cli import say
from normswap.errors import NormswapError
from normswap.streaming.converter import AUTO_STREAM_RAM_FRACTION, convert_streaming, streaming_reason
from normswap.streaming.output import DEFAULT_MAX_SHARD_SIZE, parse_size

#: argparse %-formats help strings, so the percent sign is written %% there (a bare % crashed `convert --help`).
AUTO_STREAM_RAM_PERCENT = round(100 * AUTO_STREAM_RAM_FRACTION)


def _size(text: str) -> str:
    try:
        parse_size(text)
    except NormswapError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_streaming_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("streaming (checkpoints larger than RAM)")
    g.add_argument("--streaming", action="store_true",
                   help="convert tensor by tensor from the safetensors shards without building the model (automatic "
                   f"when the checkpoint needs more than {AUTO_STREAM_RAM_PERCENT}%% of the available RAM)")
    g.add_argument("--max-shard-size", type=_size, default=DEFAULT_MAX_SHARD_SIZE,
                   help=f"largest output shard with --streaming, e.g. 2GB, 500MB (default {DEFAULT_MAX_SHARD_SIZE})")
    g.add_argument("--no-resume", action="store_true",
                   help="with --streaming, discard the finished shards of an interrupted run of the same conversion "
                   "instead of keeping them (by default, running an interrupted command again resumes it)")


def _unstreamable_flags(args: argparse.Namespace) -> list[str]:
    flags = [("--fold-gain", "fold_gain"), ("--fold-bias", "fold_bias"), ("--approximate", "approximate")]
    return [flag for flag, attr in flags if getattr(args, attr, False)]


def maybe_run_streaming(args: argparse.Namespace, src: str, out) -> int | None:
    """Run the streaming conversion when asked to (or when the checkpoint is too big); None: use the in-memory path."""
    blocked = _unstreamable_flags(args)
    if args.streaming:
        if blocked:
            raise NormswapError(
                f"{', '.join(blocked)} cannot stream: folding and the approximate path use a probe pass through the "
                "whole model. Drop --streaming (needs RAM for the model) or drop those flags"
            )
    else:
        reason = streaming_reason(src)
        if reason is None:
            return None
        if blocked:
            say(args, f"note: {reason}, but {', '.join(blocked)} need(s) the whole model in memory: converting in memory")
            return None
        say(args, f"{reason}: converting shard by shard (streaming mode)")

    say(args, f"streaming {src}")
    args.interrupted_hint = (" (the finished shards are kept: run the same command again to resume, or add "
                             "--no-resume to start over)")
    result = convert_streaming(src, out, dtype=args.dtype, max_shard_size=args.max_shard_size, force=args.force,
                               tolerance=args.tolerance, revision=args.revision, progress=sys.stderr.isatty(),
                               resume=not args.no_resume)
    say(args, result.report.summary())
    if not getattr(args, "no_eval", True):
        say(args, "note: no before/after perplexity and throughput report in streaming mode; run `normswap eval` on "
            "the output where it fits")
    say(args, f"saved {result.path}")
    if args.json:  # alone on stdout, like the in-memory path
        payload = {**result.report.to_dict(), "output": str(result.path),
                   "streaming": {**result.stats.__dict__, "verification": result.verification_scope}}
        print(json.dumps(payload, indent=2, default=str))
    return 0
