"""Proof that a conversion is harmless: perplexity (or encoder fidelity) and throughput, before and after.

* :mod:`~normswap.evaluate.corpus` — evaluation text and its byte/word counts
* :mod:`~normswap.evaluate.perplexity` — sliding-window perplexity (``hf-stride``)
* :mod:`~normswap.evaluate.fidelity` — encoders: cosine of pooled outputs to the original
* :mod:`~normswap.evaluate.throughput` — prefill/decode tokens/s, interleaved, with a no-norm upper bound
* :mod:`~normswap.evaluate.measurement` — before/after around an in-place conversion
* :mod:`~normswap.evaluate.report` — the report as JSON, Markdown (:func:`markdown_table`) and PNG
"""

from normswap.evaluate.corpus import Corpus, count_bytes, count_words, load_corpus
from normswap.evaluate.perplexity import PerplexityResult, evaluate_perplexity
from normswap.evaluate.report import markdown_table
from normswap.evaluate.throughput import BenchSettings, run_bench

__all__ = [
    "BenchSettings",
    "Corpus",
    "PerplexityResult",
    "count_bytes",
    "count_words",
    "evaluate_perplexity",
    "load_corpus",
    "markdown_table",
    "run_bench",
]
