"""``normswap verify CONVERTED --against ORIGINAL``: the block-by-block certificate for any converted folder.

A checkpoint downloaded from the Hub, converted by an older version or edited by hand is checked the way every
conversion checks itself: both models run on the same probes, the original also in float64, one module's weights
in memory at a time. Exit 0 when it holds, 1 when it does not (naming the first failing block and module), 2 for
input that cannot be verified.
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="check a converted folder against its original, block by block, with the float64 original as reference",
        description="Run a converted folder and its original on the same probe inputs, block by block, reading one "
        "module's weights at a time from the safetensors files: the original in float64 (the reference) and both "
        "models at the converted folder's dtype. Exit 0 when the conversion holds, 1 when it does not (the first "
        "failing block and module are named), 2 for input that cannot be verified.",
    )
    p.add_argument("converted", help="the converted folder (a normswap output)")
    p.add_argument("--against", required=True, metavar="ORIGINAL", help="the original (LayerNorm) model's folder")
    p.add_argument("--dtype", default=None,
                   help="dtype to run both models at (default: the converted folder's weight dtype)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="fixed max relative |Δoutput| against the float64 original, instead of the default bound "
                   "(no worse than 1.5× the original's own error at that dtype, or 8 ulps of the output)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from normswap.checkpoint import parse_dtype
    from normswap.verification.folder import verify_folder

    result = verify_folder(args.converted, args.against, dtype=parse_dtype(args.dtype), tolerance=args.tolerance)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print(f"{args.converted} against {args.against}: {result.scope}")
        if result.mode == "approximate" and result.passed:
            print(result.summary())
        elif result.passed:
            print(f"PASSED: {result.summary()}")
        else:
            print(f"FAILED: {result.first_failure or 'see the figures'}")
            print(f"  {result.summary()}")
    return 0 if result.passed else 1
