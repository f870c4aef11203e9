"""``normswap eval MODEL``: perplexity of a causal LM, or an encoder's fidelity to its original (``--against``).

Also holds the evaluation flags of ``normswap convert`` so both commands spell them the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

from normswap.errors import NormswapError


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def batch_sizes_arg(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,8; got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers; got {text!r}")
    return sizes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity of a causal LM (or an encoder's cosine fidelity to its original)",
        description="Perplexity of a causal LM on a text (sliding-window protocol of the transformers guide), with "
        "bits-per-byte, byte and word perplexity. Encoders get the cosine of their outputs to --against ORIGINAL. "
        "Works offline on the embedded model and text.",
    )
    p.add_argument("model", nargs="?", default=None,
                   help="hub id or local folder, original or normswap output (default: embedded shakespeare-gpt2)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--dataset", choices=["wikitext2"], default=None,
                      help="wikitext-2-raw-v1 test split via the `datasets` library (needs network)")
    data.add_argument("--text-file", default=None, help="any UTF-8 text file (default: embedded macbeth.txt)")
    p.add_argument("--against", default=None,
                   help="the original model: encoders report cosine fidelity to it; causal LMs report both perplexities")
    p.add_argument("--protocol", choices=["hf-stride"], default="hf-stride", help="evaluation protocol")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="window length in tokens (default: the model's context, at most 1024)")
    p.add_argument("--stride", type=positive_int, default=None, help="window step in tokens (default: max-length/2)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows (or encoder samples) per forward")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N tokens of the text")
    p.add_argument("--samples", type=positive_int, default=64, help="encoders: text lines / random images compared")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    p.add_argument("--device", default=None, help="cpu (default), cuda, ...")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    """The before/after measurement flags of ``normswap convert``."""
    g = p.add_argument_group("before/after report (perplexity and throughput, written into the output folder)")
    g.add_argument("--no-eval", action="store_true", help="skip the before/after perplexity and throughput report")
    g.add_argument("--eval-text", default=None, help="UTF-8 text for the perplexity (default: embedded macbeth.txt)")
    g.add_argument("--eval-limit", type=positive_int, default=None, help="perplexity on the first N tokens only")
    g.add_argument("--eval-batch-size", type=positive_int, default=4, help="perplexity windows per forward")
    g.add_argument("--bench-prompt-len", type=positive_int, default=32, help="bench prompt length in tokens")
    g.add_argument("--bench-new-tokens", type=int, default=16, help="bench tokens generated per decode run")
    g.add_argument("--bench-batch-sizes", type=batch_sizes_arg, default=(1,), help="bench batch sizes, e.g. 1,8")
    g.add_argument("--bench-repeats", type=positive_int, default=3, help="timed runs per model and batch size")
    g.add_argument("--bench-warmup", type=int, default=1, help="untimed runs before timing")
    g.add_argument("--no-bench", action="store_true", help="measure perplexity only, no throughput")


def convert_measure_options(args: argparse.Namespace):
    """``MeasureOptions`` from ``normswap convert``'s flags (``None`` with ``--no-eval``)."""
    from normswap.evaluate.corpus import load_corpus
    from normswap.evaluate.measurement import MeasureOptions
    from normswap.evaluate.throughput import BenchSettings

    if getattr(args, "no_eval", False):
        return None
    bench = None if args.no_bench else BenchSettings(
        prompt_len=args.bench_prompt_len, new_tokens=args.bench_new_tokens, batch_sizes=tuple(args.bench_batch_sizes),
        warmup=args.bench_warmup, repeats=args.bench_repeats)
    return MeasureOptions(corpus=load_corpus(text_file=args.eval_text), batch_size=args.eval_batch_size,
                          limit=args.eval_limit, bench=bench)


def invoked_command(fallback: str = "normswap (called from Python)") -> str:
    """The command line as typed, for reports: only when this process is the ``normswap`` CLI itself."""
    entry = Path(sys.argv[0])
    if entry.name == "normswap" or (entry.name == "__main__.py" and entry.parent.name == "normswap"):
        return "normswap " + shlex.join(sys.argv[1:])
    return fallback


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _num(x: float) -> str:
    return f"{x:,.4f}" if math.isfinite(x) else str(x)


def _perplexity_text(results: dict[str, dict], labels: dict[str, str]) -> str:
    first = next(iter(results.values()))
    rows = [(k, labels[k]) for k in results]
    rows += [
        ("corpus", first["corpus"]),
        ("protocol", f"{first['protocol']}, max-length {first['max_length']}, stride {first['stride']}, "
                     f"{first['windows']} windows, batch {first['batch_size']}"),
        ("counted", f"{first['tokens']} scored tokens (of {first['text_tokens']}), {first['bytes']} bytes, "
                    f"{first['words']} words"),
        ("dtype / device", f"{first['dtype']} / {first['device']}"),
    ]
    out = [_table(rows), ""]
    names = list(results)
    header = f"{'':<18}" + "".join(f"{n:>16}" for n in names) + ("        Δ relative" if len(names) == 2 else "")
    out.append(header)
    for key, label in (("perplexity", "perplexity"), ("bits_per_byte", "bits per byte"),
                       ("byte_perplexity", "byte perplexity"), ("word_perplexity", "word perplexity")):
        values = [results[n][key] for n in names]
        line = f"{label:<18}" + "".join(f"{_num(v):>16}" for v in values)
        if len(values) == 2:
            line += f"  {(values[0] - values[1]) / values[1]:+16.3e}"
        out.append(line)
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    from normswap.evaluate.corpus import load_corpus, text_lines
    from normswap.evaluate.fidelity import cosine_fidelity, encoder_inputs, pooled_features
    from normswap.evaluate.loading import is_causal_lm, load_for_eval
    from normswap.evaluate.perplexity import evaluate_perplexity

    corpus = load_corpus(dataset=args.dataset, text_file=args.text_file)
    target = load_for_eval(args.model, dtype=args.dtype, device=args.device)
    other = load_for_eval(args.against, dtype=args.dtype, device=args.device) if args.against else None

    if not is_causal_lm(target.model):
        if other is None:
            raise NormswapError("this model is not a causal LM, so it has no perplexity; measure its fidelity to the "
                                "original instead: normswap eval CONVERTED --against ORIGINAL")
        tokenizer = target.tokenizer or other.tokenizer
        try:
            batches = encoder_inputs(target.model, tokenizer, text_lines(corpus.text, args.samples),
                                     samples=args.samples, batch_size=args.batch_size)
        except ValueError as exc:
            raise NormswapError(f"cannot build encoder inputs: {exc}") from None
        fid = cosine_fidelity(pooled_features(target.model, batches), pooled_features(other.model, batches))
        result = {"metric": "cosine of mean-pooled last hidden states", **fid,
                  "input": "random pixels" if "pixel_values" in batches[0] else f"text lines of {corpus.source}",
                  "model": target.label, "against": other.label, "dtype": args.dtype,
                  "device": str(args.device or "cpu")}
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(_table([("model", target.label), ("against", other.label), ("inputs", result["input"]),
                          ("samples", str(fid["samples"])), ("cosine mean", f"{fid['cosine_mean']:.8f}"),
                          ("cosine min", f"{fid['cosine_min']:.8f}")]))
        return 0

    if target.tokenizer is None:
        raise NormswapError(f"{target.path} has no tokenizer files; perplexity needs the model's tokenizer")
    kwargs = {"max_length": args.max_length, "stride": args.stride, "batch_size": args.batch_size, "limit": args.limit}
    try:
        result = evaluate_perplexity(target.model, target.tokenizer, corpus, **kwargs).to_dict()
        result["model"] = target.label
        results, labels = {"model": result}, {"model": target.label}
        if other is not None:
            if other.tokenizer is None or not is_causal_lm(other.model):
                raise NormswapError(f"--against {other.path} must be a causal LM with a tokenizer")
            against = evaluate_perplexity(other.model, other.tokenizer, corpus, **kwargs).to_dict()
            against["model"] = other.label
            result["against"] = against
            result["relative_delta_perplexity"] = (result["perplexity"] - against["perplexity"]) / against["perplexity"]
            results["against"], labels["against"] = against, other.label
    except ValueError as exc:
        raise NormswapError(str(exc)) from None
    warnings = short_text_warnings(results)
    for warning in warnings:
        print(f"normswap: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps({**result, "warnings": warnings}, indent=2))
    else:
        print(_perplexity_text(results, labels))
    return 0


#: Fewer scored tokens than this make a perplexity mostly noise (a few tokens decide it): warn, still report it.
MIN_SCORED_TOKENS = 64


def short_text_warnings(results: dict[str, dict]) -> list[str]:
    scored = min(r["tokens"] for r in results.values())
    if scored >= MIN_SCORED_TOKENS:
        return []
    return [f"the perplexity rests on only {scored} scored token(s), so it is mostly noise; use a text of at least "
            f"{MIN_SCORED_TOKENS} tokens"]


class ConvertEvaluation:
    """The before/after report of ``normswap convert``: "before" is measured at construction, on the unconverted
    model, because ``convert_`` works in place; :meth:`finish` measures "after" and renders the report files."""

    def __init__(self, args: argparse.Namespace, source, out: Path) -> None:
        from normswap.cli import say
        from normswap.evaluate.measurement import BeforeAfter

        _fail_fast(args, source, out)
        self.args = args
        say(args, "measuring the original before conversion (skip with --no-eval)")
        try:
            self.measurement = BeforeAfter(source.model, source.tokenizer, convert_measure_options(args))
        except ValueError as exc:  # text too short, bench longer than the context, ...
            raise NormswapError(f"cannot measure the model before conversion: {exc} (or pass --no-eval)") from None

    def finish(self, conversion, src: str, out: Path) -> dict[str, str | bytes]:
        """Measure the converted model and return ``{file name: content}`` for ``normswap.save(extra_files=...)``."""
        from normswap.cli import say
        from normswap.evaluate.report import markdown_table, report_files

        say(self.args, "measuring the converted model (throughput interleaved with a copy of the original)")
        command = invoked_command(f"normswap convert {shlex.quote(src)} -o {shlex.quote(str(out))} (called from Python)")
        report = self.measurement.finish(conversion, source=src, output=str(out), command=command)
        say(self.args, markdown_table(report))
        for note in report["notes"]:
            say(self.args, f"note: {note}")
        return report_files(report)


def _fail_fast(args: argparse.Namespace, source, out: Path) -> None:
    """Raise the errors ``convert_``/``save`` would raise later, before minutes of measuring are spent."""
    from normswap.conversion import not_exact_message, plan_conversion
    from normswap.errors import NotExactError, OutputExistsError

    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise OutputExistsError(f"output folder {out.resolve()} exists and is not empty; choose another path or pass "
                                "--force to replace it")
    plan = plan_conversion(source.model, approximate=args.approximate)
    if plan.approximate_norms and not args.approximate:
        raise NotExactError(not_exact_message(plan))


def start_convert_evaluation(args: argparse.Namespace, source, out: Path) -> ConvertEvaluation | None:
    """``None`` with ``--no-eval``; otherwise the evaluation with "before" already measured."""
    if getattr(args, "no_eval", False):
        return None
    return ConvertEvaluation(args, source, out)
