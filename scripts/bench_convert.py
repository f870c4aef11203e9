#!/usr/bin/env python
"""Before/after benchmark of a whole conversion: perplexity on unseen text and interleaved throughput.

Why this script exists: `normswap convert`'s built-in report is a few-second check; the numbers in docs/EVALUATION.md
and the README come from this longer run, which measures the *deployed* artefact (the converted model saved and
loaded back with ``normswap.load``) against the original, in one process, the two models interleaved per repeat
together with the "no-norm" upper bound. It prints the same Markdown table as the report (machine and command
included) and can keep the raw figures as JSON.

    python scripts/bench_convert.py                                  # shared model + valid.txt (the documented run)
    python scripts/bench_convert.py --model embedded --text embedded # offline: the embedded model and Macbeth
    python scripts/bench_convert.py --json-out /tmp/bench.json --repeats 9
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch

import normswap
from normswap.evaluate.corpus import load_corpus
from normswap.evaluate.environment import environment, wait_for_idle
from normswap.evaluate.measurement import throughput_section
from normswap.evaluate.perplexity import evaluate_perplexity
from normswap.evaluate.report import markdown_table, relative_change
from normswap.evaluate.throughput import BenchSettings, run_bench

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODEL = ROOT.parent / "shared" / "models" / "shakespeare-gpt2"
SHARED_TEXT = ROOT.parent / "shared" / "data" / "shakespeare" / "valid.txt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(SHARED_MODEL) if SHARED_MODEL.exists() else "embedded",
                   help="source model folder, 'embedded', or 'random:MODEL_TYPE' (e.g. random:gpt2 = a randomly "
                   "initialised GPT-2 small, for timing a realistic size offline; implies --skip-perplexity) "
                   "(default: ../shared/models/shakespeare-gpt2)")
    p.add_argument("--text", default=str(SHARED_TEXT) if SHARED_TEXT.exists() else "embedded",
                   help="UTF-8 text never trained on, or 'embedded' (default: ../shared/data/shakespeare/valid.txt)")
    p.add_argument("--limit", type=int, default=None, help="perplexity on the first N tokens only")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before timing, wait up to this long for other processes to leave the CPU idle")
    p.add_argument("--skip-perplexity", action="store_true", help="throughput only")
    p.add_argument("--skip-bench", action="store_true", help="perplexity only")
    p.add_argument("--json-out", default=None, help="also write the full report dict here")
    return p.parse_args(argv)


def random_model(model_type: str, path: Path) -> str:
    """Save a randomly initialised model of ``model_type``'s default (full) size; timings need sizes, not weights."""
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from normswap.assets import resolve_model

    corpus = load_corpus(text_file=None if args.text == "embedded" else args.text)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model.startswith("random:"):
            src = random_model(args.model.removeprefix("random:"), Path(tmp) / "random")
            args.skip_perplexity = True  # random weights have no meaningful perplexity
        else:
            src = resolve_model(None if args.model == "embedded" else args.model)
        source = normswap.load_source(src)
        out = Path(tmp) / "converted"
        converted = normswap.load_source(src)
        conversion = normswap.convert_(converted.model, tokenizer=converted.tokenizer)
        normswap.save(converted.model, out, tokenizer=converted.tokenizer, source_dir=converted.local_dir)
        deployed = normswap.load(out)  # what users run: RMSNorm modules swapped back in by normswap.load

    perplexity = None
    if not args.skip_perplexity:
        print(f"perplexity of the original on {corpus.source} ...", file=sys.stderr)
        kwargs = {"batch_size": args.eval_batch_size, "limit": args.limit}
        before = evaluate_perplexity(source.model, source.tokenizer, corpus, **kwargs).to_dict()
        print("perplexity of the converted model ...", file=sys.stderr)
        after = evaluate_perplexity(deployed, source.tokenizer, corpus, **kwargs).to_dict()
        perplexity = {"before": before, "after": after,
                      "relative_change": relative_change(before["perplexity"], after["perplexity"])}

    throughput, busy = None, None
    if not args.skip_bench:
        if args.wait_idle > 0:
            busy = wait_for_idle(args.wait_idle)
            print(f"CPU busy share before timing: {busy}", file=sys.stderr)
        print("throughput, interleaved ...", file=sys.stderr)
        settings = BenchSettings(prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                 batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
                                 warmup=args.warmup, repeats=args.repeats)
        bench = run_bench(deployed, source.model, settings=settings,
                          labels={"model": "after (converted)", "against": "before (original)"})
        throughput = throughput_section(bench, "against", "model")
    ver = conversion.verification.to_dict()
    ver.pop("norm_inputs", None)
    report = {
        "source": src,
        "command": "python " + shlex.join([str(Path(sys.argv[0])), *(argv if argv is not None else sys.argv[1:])]),
        "machine": {**environment("cpu", torch.float32), "cpu_busy_before_timing": busy},
        "conversion": {"model_type": conversion.model_type, "mode": conversion.mode},
        "perplexity": perplexity,
        "throughput": throughput,
        "verification": ver,
    }
    print(markdown_table(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
