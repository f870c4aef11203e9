"""Perplexity of a causal LM with the sliding-window protocol of the transformers perplexity guide (``hf-stride``).

The whole text is tokenized once. Windows of ``max_length`` tokens start every ``stride`` tokens; each window scores
only the tokens that no earlier window scored, with everything before them in the window as context (labelled -100
in the guide's formulation). A token needs a predecessor inside its window to be scored, so the text's first token,
and with ``stride == max_length`` each window's first token, are never scored, as in the guide.

Alongside token perplexity we report bits-per-byte, byte perplexity and word perplexity with lm-evaluation-harness
definitions, because token perplexity cannot be compared across tokenizers and those can.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from normswap.evaluate.corpus import Corpus, count_bytes, count_words
from normswap.verify import model_device, model_dtype

PROTOCOL = "hf-stride"

#: Default window when the model's context is longer: keeps CPU runs tractable and matches GPT-2's evaluations.
DEFAULT_MAX_LENGTH_CAP = 1024


@dataclass(frozen=True)
class Window:
    """Token span ``[begin, end)`` fed to the model; tokens ``[score_from, end)`` are the ones it scores."""

    begin: int
    end: int
    score_from: int

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def scored(self) -> int:
        return self.end - self.score_from


def plan_windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The guide's windows: start every ``stride`` tokens, stop at the first window that reaches the end."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one context token and one scored token); got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be between 1 and max_length ({max_length}); got {stride}")
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + max_length, n_tokens)
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def nll_metrics(total_nll: float, tokens: int, n_bytes: int, words: int) -> dict[str, float]:
    """Token perplexity plus the harness's tokenizer-independent figures, all from one summed NLL (in nats)."""
    return {
        "perplexity": math.exp(total_nll / tokens),
        "bits_per_byte": total_nll / n_bytes / math.log(2),
        "byte_perplexity": math.exp(total_nll / n_bytes),
        "word_perplexity": math.exp(total_nll / words),
    }


@torch.no_grad()
def window_nll(model: nn.Module, ids: torch.Tensor, score_from: list[int]) -> torch.Tensor:
    """Summed NLL (float64, nats) per row of ``ids`` over positions ``>= score_from[row]`` (window-relative).

    Logits are upcast to float32 before the log-softmax so half-precision models are scored, not rounded.
    """
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    targets = ids[:, 1:].clone()
    positions = torch.arange(1, ids.shape[1], device=ids.device)
    starts = torch.tensor(score_from, device=ids.device).unsqueeze(1)
    targets[positions.unsqueeze(0) < starts] = -100
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return nll.double().sum(dim=1).cpu()


def _batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of equal length, ``batch_size`` at a time (only the last window can be shorter)."""
    out: list[list[Window]] = []
    for w in windows:
        if out and len(out[-1]) < batch_size and out[-1][0].length == w.length:
            out[-1].append(w)
        else:
            out.append([w])
    return out


@torch.no_grad()
def stride_nll(
    model: nn.Module, input_ids: torch.Tensor, max_length: int, stride: int, batch_size: int = 1,
    progress: bool | None = None,
) -> tuple[float, int, int]:
    """Total NLL (nats), scored tokens and window count of ``input_ids`` (1-D) under the ``hf-stride`` protocol."""
    from tqdm.auto import tqdm

    windows = plan_windows(int(input_ids.numel()), max_length, stride)
    batches = _batches(windows, max(1, batch_size))
    device = model_device(model)
    was_training = model.training
    model.eval()
    total, scored = 0.0, 0
    show = progress if progress is not None else len(batches) > 8
    try:
        for batch in tqdm(batches, desc="perplexity", unit="batch", disable=None if show else True, leave=False):
            ids = torch.stack([input_ids[w.begin:w.end] for w in batch]).to(device)
            nll = window_nll(model, ids, [w.score_from - w.begin for w in batch])
            total += float(nll.sum())
            scored += sum(w.scored for w in batch)
    finally:
        model.train(was_training)
    return total, scored, len(windows)


@dataclass
class PerplexityResult:
    """Everything a reader needs to reproduce or compare a perplexity figure (the ``--json`` object)."""

    perplexity: float
    bits_per_byte: float
    byte_perplexity: float
    word_perplexity: float
    nll: float
    tokens: int
    bytes: int
    words: int
    text_tokens: int
    windows: int
    protocol: str
    max_length: int
    stride: int
    batch_size: int
    dtype: str
    device: str
    corpus: str
    limit: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def model_context_length(model: nn.Module) -> int | None:
    config = model.config.get_text_config()
    for key in ("n_positions", "max_position_embeddings", "seq_length", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_max_length(model: nn.Module) -> int:
    context = model_context_length(model)
    return min(context, DEFAULT_MAX_LENGTH_CAP) if context else DEFAULT_MAX_LENGTH_CAP


def tokenize_corpus(tokenizer, text: str, limit: int | None = None) -> tuple[torch.Tensor, str, int]:
    """Token ids of ``text`` (first ``limit`` tokens if given), the text those ids cover, and the full token count.

    With a limit, byte and word counts must describe only the covered text; fast tokenizers give exact character
    offsets for that, slow ones fall back to decoding the kept ids.
    """
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(text, verbose=False, return_offsets_mapping=fast and limit is not None)
    ids = list(enc["input_ids"])
    n_all = len(ids)
    covered = text
    if limit is not None and limit < n_all:
        ids = ids[:limit]
        if fast:
            end = max((e for _, e in enc["offset_mapping"][:limit]), default=0)
            covered = text[:end]
        else:
            covered = tokenizer.decode(ids, skip_special_tokens=True)
    return torch.tensor(ids, dtype=torch.long), covered, n_all


def evaluate_perplexity(
    model: nn.Module,
    tokenizer,
    corpus: Corpus,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    limit: int | None = None,
    progress: bool | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``corpus`` (``hf-stride``); the same arguments give the same tokens to any model."""
    context = model_context_length(model)
    max_length = max_length or default_max_length(model)
    if context and max_length > context:
        raise ValueError(f"--max-length {max_length} exceeds the model's context of {context} tokens")
    stride = stride or max(1, max_length // 2)
    ids, covered, _ = tokenize_corpus(tokenizer, corpus.text, limit)
    if ids.numel() < 2:
        raise ValueError("the text is shorter than two tokens; perplexity needs at least one scored token")
    total, scored, n_windows = stride_nll(model, ids, max_length, stride, batch_size, progress)
    n_bytes, words = count_bytes(covered), count_words(covered)
    return PerplexityResult(
        **nll_metrics(total, scored, n_bytes, words),
        nll=total,
        tokens=scored,
        bytes=n_bytes,
        words=words,
        text_tokens=int(ids.numel()),
        windows=n_windows,
        protocol=PROTOCOL,
        max_length=max_length,
        stride=stride,
        batch_size=batch_size,
        dtype=str(model_dtype(model)).removeprefix("torch."),
        device=str(model_device(model)),
        corpus=corpus.source,
        limit=limit,
    )
