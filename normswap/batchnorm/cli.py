"""``normswap convert SRC -o OUT --to none`` on a BatchNorm model: fold, verify, measure before/after, save.

Called by :mod:`normswap.targets` with the source already loaded. The before/after report reuses the LayerNorm
path's machinery (:class:`~normswap.evaluate.measurement.BeforeAfter`); the "after" model it times is the one
``normswap.load`` gives (BatchNorms removed), interleaved with the original, because that is what users deploy.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
from pathlib import Path

from normswap.batchnorm.convert import NothingToFoldError, fold_batchnorms_, nothing_to_fold_message
from normswap.batchnorm.discover import discover
from normswap.errors import NormswapError, VerificationError
from normswap.publish.modeling_normswap import fold_saved_batchnorms_
from normswap.verify import make_probes


def run_fold(args: argparse.Namespace, source, out: Path) -> int:
    """Fold every BatchNorm that follows a conv/linear of ``source.model`` and save it to ``out``."""
    import normswap
    from normswap.checkpoint import parse_dtype
    from normswap.cli.eval import convert_measure_options, invoked_command

    model = source.model
    out_dtype = parse_dtype(args.dtype or "float32")
    try:
        probes = make_probes(model, source.tokenizer)
    except ValueError as exc:
        raise NormswapError(f"cannot build probe inputs to trace this model: {exc}") from None
    found = discover(model, probes)  # before minutes of measuring: refuse early if nothing folds
    if not found.pairs:
        raise NothingToFoldError(nothing_to_fold_message(model, found.kept))

    measurement = None
    options = convert_measure_options(args)
    if options is not None:
        from normswap.evaluate.measurement import BeforeAfter

        say(args, "measuring the original before folding (skip with --no-eval)")
        try:
            measurement = BeforeAfter(model, source.tokenizer, options)
        except ValueError as exc:
            raise NormswapError(f"cannot measure the model before folding: {exc} (or pass --no-eval)") from None

    report = fold_batchnorms_(model, tolerance=args.tolerance, tokenizer=source.tokenizer, probes=probes,
                              discovery=found)
    model.config.normswap = report.metadata(source.id, source.revision, str(out_dtype).removeprefix("torch."))
    say(args, report.summary())
    if not report.passed and not args.force:
        raise VerificationError(
            "verification failed, so nothing was saved: the folded model does not match the original within "
            f"tolerance ({report.verification.summary()}). Pass --force to save it anyway."
        )
    extra_files = None
    if measurement is not None:
        from normswap.evaluate.report import markdown_table, report_files

        runtime = copy.deepcopy(model)  # what normswap.load runs: no BatchNorm modules at all
        fold_saved_batchnorms_(runtime, model.config.normswap["batchnorm_folded"])
        measurement.model = runtime
        say(args, "measuring the folded model (throughput interleaved with a copy of the original)")
        command = invoked_command(f"normswap convert {shlex.quote(source.id)} -o {shlex.quote(str(out))} --to none")
        result = measurement.finish(report, source=source.id, output=str(out), command=command)
        say(args, markdown_table(result))
        for note in result["notes"]:
            say(args, f"note: {note}")
        extra_files = report_files(result)
        del runtime, measurement
    path = normswap.save(model, out, tokenizer=source.tokenizer, source_dir=source.local_dir, force=args.force,
                         dtype=out_dtype, extra_files=extra_files)
    say(args, f"saved {path}")
    if args.json:  # last and alone on stdout, so `... --json | python -m json.tool` works
        print(json.dumps({**report.to_dict(), "output": str(path)}, indent=2, default=str))
    return 0


def say(args: argparse.Namespace, text: str) -> None:
    """Progress and summaries: stderr when ``--json`` owns stdout."""
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout)
