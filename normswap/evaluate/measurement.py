"""Before/after measurements around an in-place conversion, and the report that ``normswap convert`` saves.

``convert_`` changes the model in place, so quality ("before" perplexity, or an encoder's pooled outputs for the
cosine comparison) is measured on the loaded source first and "after" on the same object afterwards.

Throughput is different: timings taken minutes apart on a shared machine differ by more than any norm could save.
So when a copy of the model is cheap (``COPY_LIMIT_BYTES``), the untouched original is kept and benchmarked
interleaved with the converted model (A B A B …); otherwise the two are timed one after the other and the report
says so.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from normswap.evaluate.corpus import Corpus, default_corpus, text_lines
from normswap.evaluate.environment import environment
from normswap.evaluate.fidelity import cosine_fidelity, encoder_inputs, pooled_features
from normswap.evaluate.loading import is_causal_lm
from normswap.evaluate.perplexity import evaluate_perplexity
from normswap.evaluate.report import relative_change
from normswap.evaluate.throughput import NO_NORM, BenchSettings, norm_share, ratios, run_bench
from normswap.verify import model_device, model_dtype

#: A few seconds of bench on the embedded model: enough to see a regression, not a publication-grade benchmark.
CONVERT_BENCH = BenchSettings(prompt_len=32, new_tokens=16, batch_sizes=(1,), warmup=1, repeats=3)

#: |Δppl|/ppl an exact conversion must stay within in float32 (the issue's acceptance criterion).
EXACT_PPL_TOLERANCE = 1e-4

#: Keep a copy of the original for interleaved timing only up to this size; larger models are timed sequentially.
COPY_LIMIT_BYTES = 2 * 2**30


@dataclass
class MeasureOptions:
    corpus: Corpus = field(default_factory=default_corpus)
    batch_size: int = 4
    max_length: int | None = None
    stride: int | None = None
    limit: int | None = None
    bench: BenchSettings | None = field(default_factory=lambda: replace(CONVERT_BENCH))
    no_norm: bool = True
    encoder_samples: int = 64


@dataclass
class Measurement:
    perplexity: dict | None = None
    features: torch.Tensor | None = None
    fidelity: dict | None = None
    notes: list[str] = field(default_factory=list)


def _encoder_batches(model: nn.Module, tokenizer, options: MeasureOptions) -> list[dict]:
    lines = text_lines(options.corpus.text, options.encoder_samples)
    return encoder_inputs(model, tokenizer, lines, samples=options.encoder_samples, batch_size=options.batch_size)


def measure_quality(model: nn.Module, tokenizer, options: MeasureOptions,
                    before: Measurement | None = None) -> Measurement:
    """Perplexity of a causal LM; for an encoder, its pooled outputs (and their cosine to ``before``'s)."""
    result = Measurement()
    if is_causal_lm(model):
        if tokenizer is None:
            result.notes.append("no tokenizer next to the model, so no perplexity was measured")
            return result
        ppl = evaluate_perplexity(model, tokenizer, options.corpus, max_length=options.max_length,
                                  stride=options.stride, batch_size=options.batch_size, limit=options.limit)
        result.perplexity = ppl.to_dict()
        return result
    try:
        batches = _encoder_batches(model, tokenizer, options)
    except ValueError as exc:
        result.notes.append(f"no fidelity measured: {exc}")
        return result
    result.features = pooled_features(model, batches)
    if before is not None and before.features is not None:
        kind = "images of random pixels" if "pixel_values" in batches[0] else "text lines"
        result.fidelity = {**cosine_fidelity(result.features, before.features), "input": kind}
    return result


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def throughput_section(bench: dict, before_key: str, after_key: str, before_bench: dict | None = None) -> dict:
    """Reshape ``run_bench`` output(s) into ``{"before", "after", "no_norm", "ratios", "norm_share", ...}``."""
    source = before_bench or bench
    before, after = source["models"][before_key], bench["models"][after_key]
    no_norm = source["models"].get(NO_NORM)
    section = {
        "interleaved": before_bench is None,
        "environment": bench["environment"],
        "settings": {k: v for k, v in bench["settings"].items() if k != "interleaved"},
        "before": before,
        "after": after,
        "no_norm": no_norm,
        "ratios": ratios(after, before),
        "ratio_definition": "after / before, median tokens/s (> 1: the converted model is faster)",
    }
    if no_norm is not None:
        section["norm_share"] = {"before": norm_share(before, no_norm)}
        if before_bench is None:
            section["norm_share"]["after"] = norm_share(after, no_norm)
    return section


class BeforeAfter:
    """Measure a model before its in-place conversion (at construction) and after it (:meth:`finish`)."""

    def __init__(self, model: nn.Module, tokenizer, options: MeasureOptions,
                 copy_limit_bytes: int = COPY_LIMIT_BYTES) -> None:
        self.model, self.tokenizer, self.options = model, tokenizer, options
        if options.bench is not None:
            options.bench.validate(model)  # fail before the long perplexity run, not after it
        self.before = measure_quality(model, tokenizer, options)
        self.original: nn.Module | None = None
        self.before_bench: dict | None = None
        if options.bench is not None:
            if parameter_bytes(model) <= copy_limit_bytes:
                self.original = copy.deepcopy(model)
            else:
                self.before_bench = run_bench(model, settings=options.bench, no_norm=options.no_norm,
                                              labels={"model": "before (original)"})

    def finish(self, conversion, *, source: str, output: str, command: str) -> dict:
        """Measure the converted model and return the report dict (see :func:`conversion_report`)."""
        after = measure_quality(self.model, self.tokenizer, self.options, before=self.before)
        throughput = None
        if self.original is not None:
            bench = run_bench(self.model, self.original, settings=self.options.bench, no_norm=self.options.no_norm,
                              labels={"model": "after (converted)", "against": "before (original)"})
            self.original = None
            throughput = throughput_section(bench, "against", "model")
        elif self.before_bench is not None:
            bench = run_bench(self.model, settings=self.options.bench, no_norm=False,
                              labels={"model": "after (converted)"})
            throughput = throughput_section(bench, "model", "model", before_bench=self.before_bench)
            after.notes.append("before and after throughput were timed one after the other (the model is too large "
                               "to keep a copy for interleaving); compare with `normswap bench` for an interleaved run")
        return conversion_report(self.before, after, conversion, throughput, source=source, output=output,
                                 command=command, model=self.model)


def conversion_report(
    before: Measurement, after: Measurement, conversion, throughput: dict | None = None, *, source: str,
    output: str, command: str, model: nn.Module | None = None,
) -> dict:
    """The ``normswap_report.json`` dict (``conversion`` is the :class:`~normswap.ConversionReport`)."""
    from normswap._version import __version__

    ver = conversion.verification.to_dict() if conversion.verification is not None else None
    if ver:
        ver.pop("norm_inputs", None)
    report: dict = {
        "normswap_version": __version__,
        "source": source,
        "output": output,
        "command": command,
        "machine": environment(model_device(model), model_dtype(model)) if model is not None else environment(),
        "conversion": {"model_type": conversion.model_type, "mode": conversion.mode,
                       "target": getattr(conversion, "target", "rmsnorm"),
                       "swapped_norms": len(conversion.swapped_norms), "folds": conversion.folds},
        "perplexity": None,
        "fidelity": after.fidelity,
        "throughput": throughput,
        "verification": ver,
        "notes": sorted(set(before.notes + after.notes)),
    }
    if before.perplexity and after.perplexity:
        change = relative_change(before.perplexity["perplexity"], after.perplexity["perplexity"])
        report["perplexity"] = {"before": before.perplexity, "after": after.perplexity, "relative_change": change}
        if conversion.mode == "exact" and abs(change) > EXACT_PPL_TOLERANCE:
            report["notes"].append(f"exact conversion changed perplexity by {change:+.2e} (relative), more than "
                                   f"{EXACT_PPL_TOLERANCE:.0e}: check the verification figures")
    return report
