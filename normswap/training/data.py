"""Training and evaluation examples, and batches that are a pure function of (seed, step).

Because the batch for optimizer step ``s`` (micro-batch ``m``, process ``r``) depends on nothing but the recipe
seed and those numbers, resuming from a checkpoint needs only the step counter to continue on exactly the same data,
and masking randomness (masked LMs) is drawn from a generator seeded the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from normswap.errors import NormswapError
from normswap.training.recipe import DataSpec, Recipe


class DataError(NormswapError):
    """Training or evaluation text is missing, empty, or unusable with this tokenizer."""


def read_lines(path: str | os.PathLike) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file (errors name the file)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"text file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"text file {p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"text file {p} is empty (no non-empty lines); give it some training text")
    return lines


def dataset_lines(spec: DataSpec) -> list[str]:
    """Lines of a ``datasets`` dataset (online use); errors say how to fall back to a text file."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.dataset={spec.dataset!r} needs the `datasets` package (pip install 'normswap[data]'); "
                        "or pass a local --text-file") from None
    try:
        ds = datasets.load_dataset(spec.dataset, spec.dataset_config, split=spec.dataset_split)
        texts = ds[spec.text_column]
    except Exception as exc:  # noqa: BLE001 - offline, missing column, bad id: one readable message
        raise DataError(f"could not load dataset {spec.dataset!r} ({type(exc).__name__}: {exc}); this machine may be "
                        "offline: pass a local --text-file instead") from None
    lines = [line.strip() for t in texts for line in str(t).splitlines() if line.strip()]
    if not lines:
        raise DataError(f"dataset {spec.dataset!r} column {spec.text_column!r} has no text")
    return lines


@dataclass
class Examples:
    """Tokenised examples: each a list of token ids (special tokens included, truncated to seq_len)."""

    ids: list[list[int]]
    pad_id: int
    source: str

    def __len__(self) -> int:
        return len(self.ids)


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _group_lines(lines: list[str], max_lines: int, seed: int) -> list[str]:
    """Consecutive lines joined into examples of 1..max_lines lines (lengths drawn from a seeded generator)."""
    if max_lines == 1:
        return list(lines)
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, max_lines + 1, (len(lines),), generator=gen).tolist()
    out, i, k = [], 0, 0
    while i < len(lines):
        n = sizes[k]
        out.append(" ".join(lines[i:i + n]))
        i, k = i + n, k + 1
    return out


def tokenize_lines(texts: list[str], tokenizer, seq_len: int, source: str) -> Examples:
    enc = tokenizer(texts, truncation=True, max_length=seq_len, add_special_tokens=True)
    ids = [x for x in enc["input_ids"] if len(x) > 0]
    return Examples(ids, _pad_id(tokenizer), source)


def tokenize_packed(lines: list[str], tokenizer, seq_len: int, source: str) -> Examples:
    """One token stream (lines joined by newlines) cut into full seq_len blocks; a short text gives one block."""
    stream: list[int] = []
    chunk = 2000
    for i in range(0, len(lines), chunk):
        text = "\n".join(lines[i:i + chunk]) + "\n"
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    blocks = [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    if not blocks:
        blocks = [stream[:seq_len]]
    return Examples(blocks, _pad_id(tokenizer), source)


def max_sequence_length(config, tokenizer) -> int | None:
    """The longest input the model accepts: its position table (RoBERTa-style tables start after padding_idx),
    or the tokenizer's declared limit when that is smaller."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    if limit and text.model_type in ("roberta", "xlm-roberta", "camembert"):
        limit -= (getattr(text, "pad_token_id", None) or 0) + 1
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if tok_limit and tok_limit < 1_000_000:
        limit = min(limit, tok_limit) if limit else tok_limit
    return int(limit) if limit else None


def build_examples(recipe: Recipe, tokenizer, text_file: str | os.PathLike | None = None,
                   eval_text_file: str | os.PathLike | None = None, max_len: int | None = None
                   ) -> tuple[Examples, Examples]:
    """Training and held-out examples; held-out text is never part of the training examples.

    Evaluation examples are single lines in ``lines`` mode (the unit a sentence encoder embeds) and seq_len blocks
    in ``packed`` mode. ``max_len`` (the model's limit) caps ``data.seq_len``.
    """
    spec = recipe.data
    seq_len = min(spec.seq_len, max_len) if max_len else spec.seq_len
    text_file = text_file or spec.text_file
    eval_text_file = eval_text_file or spec.eval_text_file
    if tokenizer is None:
        raise DataError("fine-tuning on text needs a tokenizer; the student folder and the teacher have none")
    if text_file:
        lines, source = read_lines(text_file), str(text_file)
    elif spec.dataset:
        lines, source = dataset_lines(spec), f"datasets:{spec.dataset}"
    else:
        raise DataError("no training text: pass --text-file F (or set data.text_file / data.dataset in the recipe)")
    if eval_text_file:
        eval_lines, eval_source = read_lines(eval_text_file), str(eval_text_file)
    else:
        n_eval = min(spec.eval_examples, len(lines) // 10) if spec.example == "lines" else None
        if spec.example == "packed":  # hold out the tail of the text: enough tokens for eval_examples blocks
            tail = max(1, len(lines) // 10)
            eval_lines, lines = lines[-tail:], lines[:-tail]
        elif n_eval:
            eval_lines, lines = lines[-n_eval:], lines[:-n_eval]
        else:
            raise DataError(f"{source} has only {len(lines)} lines: too few to hold out evaluation text; pass "
                            "--eval-text-file or more text")
        eval_source = f"{source} (last {len(eval_lines)} lines, held out)"
    if not lines:
        raise DataError(f"{source}: nothing left to train on after holding out evaluation text")

    if spec.example == "packed":
        train = tokenize_packed(lines, tokenizer, seq_len, source)
        held = tokenize_packed(eval_lines, tokenizer, seq_len, eval_source)
    else:
        train = tokenize_lines(_group_lines(lines, spec.max_lines_per_example, recipe.seed), tokenizer, seq_len,
                               source)
        held = tokenize_lines(eval_lines, tokenizer, seq_len, eval_source)
    held.ids = held.ids[: spec.eval_examples]
    if not train.ids:
        raise DataError(f"{source}: the tokenizer produced no tokens")
    return train, held


class BatchPlan:
    """Which examples form each micro-batch: an epoch-wise permutation seeded by (seed, epoch)."""

    def __init__(self, n_examples: int, batch_size: int, gradient_accumulation: int, seed: int):
        self.n = n_examples
        self.batch_size = batch_size
        self.accum = gradient_accumulation
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=gen).tolist()}
        return self._perms[epoch]

    def indices(self, step: int, micro: int) -> list[int]:
        """Example indices of micro-batch ``micro`` of optimizer step ``step`` (all processes together)."""
        start = (step * self.accum + micro) * self.batch_size
        return [self._perm(g // self.n)[g % self.n] for g in range(start, start + self.batch_size)]

    def epoch(self, step: int) -> float:
        return step * self.accum * self.batch_size / self.n


def collate(examples: Examples, indices: list[int]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` for the given examples."""
    seqs = [examples.ids[i] for i in indices]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), examples.pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def mask_tokens(batch: dict[str, torch.Tensor], tokenizer, probability: float, seed: int) -> dict[str, torch.Tensor]:
    """BERT-style masking (80% [MASK], 10% random, 10% kept) with its own seeded generator; adds ``labels``."""
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise DataError("data.mlm_probability > 0 needs a tokenizer with a mask token")
    ids = batch["input_ids"].clone()
    gen = torch.Generator().manual_seed(seed)
    special = torch.zeros_like(ids, dtype=torch.bool)
    for sid in set(getattr(tokenizer, "all_special_ids", []) or []):
        special |= ids == sid
    candidates = batch["attention_mask"].bool() & ~special
    chosen = (torch.rand(ids.shape, generator=gen) < probability) & candidates
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=gen)
    random_ids = torch.randint(0, len(tokenizer), ids.shape, generator=gen)
    ids = torch.where(chosen & (roll < 0.8), torch.full_like(ids, mask_id), ids)
    ids = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, ids)
    return {**batch, "input_ids": ids, "labels": labels}


def micro_batch(examples: Examples, plan: BatchPlan, step: int, micro: int, tokenizer, recipe: Recipe,
                rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """The exact micro-batch that step ``step`` trains on (same on every run and after a resume).

    The whole micro-batch is built and masked first, then process ``rank`` of ``world`` takes its rows, so the data
    (masks included) do not depend on how many processes share the work.
    """
    if plan.batch_size % world:
        raise DataError(f"batch_size {plan.batch_size} does not split evenly over {world} processes; choose a "
                        "multiple of the process count")
    batch = collate(examples, plan.indices(step, micro))
    if recipe.data.mlm_probability > 0:
        seed = recipe.seed * 1_000_003 + (step * plan.accum + micro) * 997
        batch = mask_tokens(batch, tokenizer, recipe.data.mlm_probability, seed)
    if world == 1:
        return batch
    per = plan.batch_size // world
    rows = {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}
    width = int(rows["attention_mask"].sum(1).max())  # right padding: trim to this slice's longest sequence
    return {k: v[:, :width] for k, v in rows.items()}


def eval_batches(examples: Examples, batch_size: int, tokenizer, recipe: Recipe) -> list[dict[str, torch.Tensor]]:
    """Fixed evaluation batches (masking seeded once, so before/after numbers compare the same inputs)."""
    batches = []
    for k, start in enumerate(range(0, len(examples), batch_size)):
        batch = collate(examples, list(range(start, min(start + batch_size, len(examples)))))
        if recipe.data.mlm_probability > 0:
            batch = mask_tokens(batch, tokenizer, recipe.data.mlm_probability, 7_919 + k)
        batches.append(batch)
    return batches
