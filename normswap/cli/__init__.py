"""The ``normswap`` command. Each subcommand lives in its own module here and exposes ``register(subparsers)``.

Modules are discovered, so adding a subcommand is adding a file. The contract every subcommand keeps: bad input
exits 2 with one stderr line starting ``normswap: error:`` (what happened, what to do), never a traceback. That holds
for argument errors too (:class:`Parser`), a full disk, an unwritable output, a closed pipe (exits quietly) and
Ctrl-C, also while the heavy libraries are still importing (they are imported inside :func:`main`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import signal
import sys
import threading
from typing import NoReturn, TextIO

from normswap._version import __version__
from normswap.errors import AlreadyRMSNormError, NormswapError

logger = logging.getLogger(__name__)

#: Exit status of a command killed by SIGPIPE in a shell (128 + 13): what ``yes | head`` reports for ``yes``.
BROKEN_PIPE_EXIT = 141


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors keep the CLI contract: one ``normswap: error:`` line, exit 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("normswap").strip() if self.prog.startswith("normswap") else ""
        where = f"{command}: " if command else ""
        hint = f"{self.prog} --help"
        self.exit(2, f"normswap: error: {where}{message} (see `{hint}`)\n")


def console(args: argparse.Namespace) -> TextIO:
    """Where progress and summary lines go: stderr when ``--json`` owns stdout (so it stays pure JSON)."""
    return sys.stderr if getattr(args, "json", False) else sys.stdout


def say(args: argparse.Namespace, *parts: object) -> None:
    print(*parts, file=console(args))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="normswap",
        description="Convert transformers from LayerNorm to RMSNorm, exactly where the maths allows, and prove it.",
    )
    parser.add_argument("--version", action="version", version=f"normswap {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug information")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    for subparser in sub.choices.values():  # -v after the subcommand too; SUPPRESS keeps a -v given before it
        flags = [f for f in ("-v", "--verbose") if f not in subparser._option_string_actions]
        if "--verbose" in flags:
            subparser.add_argument(*flags, action="store_true", default=argparse.SUPPRESS,
                                   help="log debug information")
    return parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """``{name: parser}`` of every registered subcommand (the tests walk it, so a new command is covered at once)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def run_command(args: argparse.Namespace) -> int:
    """Run ``args.func`` and turn normswap's errors into one line and an exit code (shared by every entry point).

    A subcommand may set ``interrupted_hint`` (via ``set_defaults``) to tell the user how to continue after Ctrl-C.
    """
    from normswap.outputs import disk_error

    try:
        return int(args.func(args) or 0)
    except AlreadyRMSNormError as exc:
        print(f"normswap: {exc}; nothing written.", file=console(args))
        if getattr(args, "json", False):  # exit 0 with --json: stdout is still one JSON document
            import json

            print(json.dumps({"mode": "nothing_to_convert", "written": False, "message": str(exc)}, indent=2))
        return 0
    except NormswapError as exc:
        return _error(exc)
    except KeyboardInterrupt:
        return _interrupted(getattr(args, "interrupted_hint", ""))
    except BrokenPipeError:
        raise  # handled in main: the reader went away, which is not an error to report
    except Exception as exc:
        if caused_by_ctrl_c(exc):
            return _interrupted(getattr(args, "interrupted_hint", ""))
        full = disk_error(exc)  # a full disk or `ulimit -f` wherever it struck (streaming writes, reports, ...)
        if full is None and isinstance(exc, OSError) and exc.filename is not None:
            full = NormswapError(f"{exc.strerror or exc}: {exc.filename}")
        if full is None:
            raise  # a bug: the traceback is what a report needs
        logger.debug("original error", exc_info=True)
        hint = getattr(args, "interrupted_hint", "").strip().strip("()")
        return _error(NormswapError(f"{full}; {hint}" if hint else str(full)))


#: Set by the SIGINT handler :func:`main` installs: an import cut short by Ctrl-C can leave a module half
#: initialised, and the error that surfaces later (a RecursionError, a ModuleNotFoundError) may not carry the
#: KeyboardInterrupt in its chain at all.
_CTRL_C = threading.Event()


def _on_sigint(signum: int, frame) -> None:
    _CTRL_C.set()
    raise KeyboardInterrupt


def caused_by_ctrl_c(exc: BaseException) -> bool:
    """Whether Ctrl-C is behind ``exc``: transformers' lazy imports re-raise an interrupted import as
    ``ModuleNotFoundError`` (the KeyboardInterrupt is its cause), or the user pressed Ctrl-C during this run."""
    if _CTRL_C.is_set():
        return True
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _interrupted(hint: str = "") -> int:
    print(f"normswap: interrupted; no output was written{hint}.", file=sys.stderr)
    return 130


def _error(exc: BaseException) -> int:
    text = " ".join(str(exc).split())  # one line, whatever the message holds
    print(f"normswap: error: {text}", file=sys.stderr)
    return 2


def _quiet_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush cannot complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured in tests)
        pass


class _PrintedElsewhere(logging.Filter):
    """Drop records that a library's own handler already printed (huggingface_hub adds one lazily, on first use)."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        while name:
            if logging.getLogger(name).handlers:
                return False
            name = name.rpartition(".")[0]
        return True


def _configure_logging(verbose: bool) -> None:
    """One handler for normswap's own logs, which skips what libraries print through their own handler
    (huggingface_hub, transformers), so each warning is printed once, not twice."""
    if not _interactive():
        _no_library_progress_bars()
    root = logging.getLogger()
    if root.handlers:  # configured by whoever called main() (a test runner, an application): theirs to decide
        return
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    for handler in root.handlers:
        handler.addFilter(_PrintedElsewhere())


def _interactive() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _no_library_progress_bars() -> None:
    """Loading/saving bars are for a person at a terminal; in a log or a pipe they are noise around the one line
    that matters (an error, or the result)."""
    # No ``except ImportError`` here: both ship with transformers, and transformers re-raises an import cut short
    # by Ctrl-C as an ImportError, which swallowing let the command run on to exit 0 after the user interrupted it.
    import transformers.utils.logging as tf_logging
    from huggingface_hub.utils import disable_progress_bars

    tf_logging.disable_progress_bar()
    disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    _CTRL_C.clear()
    own_handler = (threading.current_thread() is threading.main_thread()
                   and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if own_handler:  # an application's own handler is left alone
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        code = _main(argv)
        if code == 0 and _CTRL_C.is_set():  # a library swallowed the interrupt and the command ran on
            print("normswap: interrupted (Ctrl-C was pressed during the run; check what it wrote)", file=sys.stderr)
            return 130
        return code
    finally:
        if own_handler:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _main(argv: list[str] | None) -> int:
    try:
        parser = build_parser()  # imports torch and transformers: Ctrl-C here is still caught below
        args = parser.parse_args(argv)
        _configure_logging(args.verbose)
        code = run_command(args)
        sys.stdout.flush()  # a closed pipe shows up here, not at exit where it would print a traceback
        return code
    except KeyboardInterrupt:
        return _interrupted()
    except BrokenPipeError:  # `normswap inspect --json | head`: the reader has what it wanted
        _quiet_stdout()
        return BROKEN_PIPE_EXIT
    except Exception as exc:
        if caused_by_ctrl_c(exc):  # interrupted inside a library import that re-raised it as another error
            return _interrupted()
        raise


if __name__ == "__main__":
    sys.exit(main())
