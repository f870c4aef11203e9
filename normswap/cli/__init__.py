"""The ``normswap`` command. Each subcommand lives in its own module here and exposes ``register(subparsers)``.

Modules are discovered, so adding a subcommand is adding a file. Errors derived from :class:`NormswapError` are
printed as one line (what happened, what to do) instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from normswap._version import __version__
from normswap.errors import AlreadyRMSNormError, NormswapError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normswap",
        description="Convert transformers from LayerNorm to RMSNorm, exactly where the maths allows, and prove it.",
    )
    parser.add_argument("--version", action="version", version=f"normswap {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug information")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run ``args.func`` and turn normswap's errors into one line and an exit code (shared by every entry point).

    A subcommand may set ``interrupted_hint`` (via ``set_defaults``) to tell the user how to continue after Ctrl-C.
    """
    try:
        return int(args.func(args) or 0)
    except AlreadyRMSNormError as exc:
        print(f"normswap: {exc}; nothing written.")
        return 0
    except NormswapError as exc:
        print(f"normswap: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = getattr(args, "interrupted_hint", "")
        print(f"normswap: interrupted; no output was written{hint}.", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
