"""``normswap convert --to NAME``: the registry of target norms, and the dispatch from the CLI to each.

* ``rmsnorm`` (default): LayerNorm → RMSNorm, today's path (exact where possible, ``--approximate`` otherwise).
* ``none``: on a BatchNorm model, fold every BatchNorm that follows a conv/linear into it, exactly
  (:mod:`normswap.batchnorm`); on a LayerNorm model with ``--approximate``, remove the LayerNorms
  (:mod:`normswap.removal`, healed by ``normswap finetune``).
* ``dyt``: LayerNorm → Dynamic Tanh, ``--approximate`` only (:mod:`normswap.removal`).

The choice between folding and removal is made from what the loaded model contains, never from its name.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from normswap.errors import NormswapError


class UnknownTargetError(NormswapError):
    """``--to`` names a target norm normswap does not know."""


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    #: ``handler(args)`` runs the whole conversion and returns the exit code; ``None`` for the default path.
    handler: Callable[[argparse.Namespace], int] | None


def _remove_or_fold(args: argparse.Namespace) -> int:
    return run_removal_target(args)


TARGETS: dict[str, Target] = {
    "rmsnorm": Target("rmsnorm", "LayerNorm → RMSNorm (default; exact where the maths allows)", None),
    "none": Target("none", "BatchNorm folded into the conv/linear before it (exact); LayerNorm removed with "
                   "--approximate", _remove_or_fold),
    "dyt": Target("dyt", "LayerNorm → Dynamic Tanh γ·tanh(αx)+β (--approximate, then normswap finetune)",
                  _remove_or_fold),
}


def get_target(name: str) -> Target:
    """The registered target ``name``; an unknown name raises one line that lists the known ones."""
    try:
        return TARGETS[name]
    except KeyError:
        raise UnknownTargetError(f"unknown --to target {name!r}; known targets: {', '.join(TARGETS)}") from None


def add_target_arguments(p: argparse.ArgumentParser) -> None:
    """``--to`` and ``--keep-batch-stats`` for ``normswap convert`` (validated by :func:`get_target`, not argparse,
    so an unknown name gets the one-line error that lists the known ones)."""
    p.add_argument("--to", default="rmsnorm", metavar="NORM",
                   help=f"target norm: {', '.join(TARGETS)} (default rmsnorm). none: fold BatchNorms exactly, or "
                   "remove LayerNorms with --approximate; dyt: LayerNorm → DyT with --approximate")
    p.add_argument("--keep-batch-stats", action="store_true",
                   help="the BatchNorms must keep normalising with batch statistics (training semantics): folding "
                   "is then refused, since only inference-mode BatchNorm is a fixed affine map")


def run_target(args: argparse.Namespace) -> int | None:
    """Run the conversion ``args.to`` names; ``None`` means the default (rmsnorm) path should run as before."""
    target = get_target(getattr(args, "to", None) or "rmsnorm")
    if target.handler is None:
        if getattr(args, "keep_batch_stats", False):
            raise NormswapError("--keep-batch-stats only applies to --to none (BatchNorm folding)")
        return None
    return target.handler(args)


def count_layernorms(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("LayerNorm"))


def _output_folder(args: argparse.Namespace, src: str) -> Path:
    """The same output checks as the default path: not the source, not an existing folder, writable."""
    from normswap.outputs import check_output_not_source, check_output_target, probe_output_location

    out = Path(args.output).expanduser() if args.output else Path.cwd() / f"{Path(src.rstrip('/')).name}-{args.to}"
    check_output_not_source(out, src)
    check_output_target(out.resolve(), args.force)
    probe_output_location(out)
    return out


def run_removal_target(args: argparse.Namespace) -> int:
    """``--to none|dyt``: BatchNorm folding or LayerNorm removal, chosen from what the model contains."""
    from normswap.assets import resolve_model
    from normswap.batchnorm import BatchStatisticsError, NothingToFoldError, batchnorm_modules
    from normswap.batchnorm.cli import say
    from normswap.checkpoint import load_source
    from normswap.outputs import check_output_not_source

    if getattr(args, "streaming", False):
        raise NormswapError(f"--streaming converts LayerNorm → RMSNorm only; drop it for --to {args.to}")
    if getattr(args, "keep_batch_stats", False) and not args.approximate:
        raise BatchStatisticsError(
            "cannot fold BatchNorm while keeping batch statistics: folding replaces each BatchNorm by the fixed "
            "affine map of its running statistics (inference semantics), and a BatchNorm that normalises with "
            "each batch's statistics has no fixed map to fold; drop --keep-batch-stats"
        )
    if args.to == "dyt" and not args.approximate:
        raise NormswapError("--to dyt replaces LayerNorm by Dynamic Tanh, which is an approximation: pass "
                            "--approximate (then heal it with `normswap finetune --recipe recipes/dyt.yaml`)")
    src = resolve_model(args.src, args.revision)
    out = _output_folder(args, src)
    say(args, f"loading {src}")
    source = load_source(src, dtype="float32", device=args.device, revision=args.revision)
    check_output_not_source(out, source.local_dir)  # a Hub id's snapshot in the local cache is a source too
    if args.approximate:
        return _run_removal(args, source, out)
    if not batchnorm_modules(source.model):
        kind = getattr(source.model.config, "model_type", type(source.model).__name__)
        n_ln = count_layernorms(source.model)
        if n_ln:
            raise NothingToFoldError(
                f"--to none found no BatchNorm to fold in this {kind} model, but {n_ln} LayerNorm(s); removing "
                "LayerNorm is an approximation: pass --approximate (then heal it with `normswap finetune "
                "--recipe recipes/remove-ln.yaml`)")
        from normswap.batchnorm.convert import nothing_to_fold_message

        raise NothingToFoldError(nothing_to_fold_message(source.model, {}))
    from normswap.batchnorm.cli import run_fold

    return run_fold(args, source, out)


def _run_removal(args: argparse.Namespace, source, out: Path) -> int:
    """LayerNorm → none/dyt by :func:`normswap.removal.convert_removal_`, saved like any other conversion."""
    import normswap
    from normswap.batchnorm.cli import say
    from normswap.checkpoint import parse_dtype

    try:
        from normswap.removal import convert_removal_
    except ImportError:
        raise NormswapError(f"LayerNorm removal (--to {args.to} --approximate) is not available in this normswap "
                            "build") from None
    if not count_layernorms(source.model):
        raise NormswapError(f"--to {args.to} --approximate removes LayerNorms, and this model has none"
                            + ("; for its BatchNorms drop --approximate (folding is exact)"
                               if args.to == "none" else ""))
    calibration = Path(args.eval_text).read_text(encoding="utf-8") if getattr(args, "eval_text", None) else None
    report = convert_removal_(source.model, args.to, tokenizer=source.tokenizer, calibration_text=calibration)
    say(args, report.summary())
    out_dtype = parse_dtype(args.dtype or "float32")
    path = normswap.save(source.model, out, tokenizer=source.tokenizer, source_dir=source.local_dir,
                         force=args.force, dtype=out_dtype)
    say(args, f"saved {path}")
    return 0
