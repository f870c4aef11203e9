"""Evaluation text: where it comes from, and the byte/word counts that make perplexity comparable across tokenizers.

Byte and word counts follow lm-evaluation-harness (``preprocess_wikitext.process_results``): bytes are the UTF-8
length of the text, words are ``len(re.split(r"\\s+", text))`` (no strip, so leading/trailing whitespace each add
an empty "word", exactly as the harness counts them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from normswap.assets import DEFAULT_TEXT, DEFAULT_TEXT_SOURCE
from normswap.errors import NormswapError

#: The datasets the ``--dataset`` flag knows, mapped to ``datasets.load_dataset`` arguments.
DATASETS = {"wikitext2": ("wikitext", "wikitext-2-raw-v1", "test")}

_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Corpus:
    """A text to evaluate on, with a human-readable name of where it came from (goes into every report)."""

    text: str
    source: str

    @property
    def bytes(self) -> int:
        return count_bytes(self.text)

    @property
    def words(self) -> int:
        return count_words(self.text)


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def count_words(text: str) -> int:
    """Whitespace-separated chunks as lm-evaluation-harness counts them (its word_perplexity denominator)."""
    return len(_WHITESPACE.split(text))


def default_corpus() -> Corpus:
    """The embedded Macbeth opening: works offline, and the embedded model never trained on it."""
    return Corpus(DEFAULT_TEXT.read_text(encoding="utf-8"), f"embedded macbeth.txt ({DEFAULT_TEXT_SOURCE})")


def text_file_corpus(path: str | Path) -> Corpus:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NormswapError(f"text file {p} does not exist; pass an existing UTF-8 text file to --text-file") from None
    except UnicodeDecodeError as exc:
        raise NormswapError(f"text file {p} is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                            "convert it to UTF-8 first") from None
    if not text.strip():
        raise NormswapError(f"text file {p} is empty; perplexity needs some text")
    return Corpus(text, str(p))


def dataset_corpus(name: str) -> Corpus:
    """A standard benchmark text via the ``datasets`` library, joined the way the transformers guide joins it."""
    if name not in DATASETS:
        raise NormswapError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (or pass --text-file F)")
    path, config, split = DATASETS[name]
    try:
        import datasets
    except ImportError:
        raise NormswapError(
            f"--dataset {name} needs the `datasets` library: pip install 'normswap[data]' (or pass --text-file F, "
            "or nothing for the embedded offline text)"
        ) from None
    try:
        rows = datasets.load_dataset(path, config, split=split)
    except Exception as exc:  # noqa: BLE001 - offline/hub failures all mean the same thing to the user
        raise NormswapError(
            f"could not load {path}/{config} ({type(exc).__name__}); the Hugging Face Hub is probably unreachable "
            "from this machine. Use --text-file F with a local copy, or no flag for the embedded offline text"
        ) from exc
    return Corpus("\n\n".join(rows["text"]), f"{path} {config} {split} (datasets)")


def load_corpus(dataset: str | None = None, text_file: str | Path | None = None) -> Corpus:
    """The corpus a command asked for; the embedded text when it asked for none."""
    if dataset and text_file:
        raise NormswapError("pass either --dataset or --text-file, not both")
    if dataset:
        return dataset_corpus(dataset)
    if text_file:
        return text_file_corpus(text_file)
    return default_corpus()


def text_lines(text: str, limit: int | None = None, min_chars: int = 16) -> list[str]:
    """Non-trivial lines of a text, for encoder fidelity checks (speaker names and blank lines say little)."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if len(line) >= min_chars]
    return lines[:limit] if limit else lines
