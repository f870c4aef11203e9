"""Statistics of each LayerNorm's input on calibration text, and the replacement scalars derived from them.

A norm-free replacement can only be right on average: LayerNorm divides each token by its own standard deviation,
the replacement by one number per norm. That number is measured, not guessed, by running the original model on
real text (default: the embedded Macbeth excerpt) and recording every norm's input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

#: DyT: α is searched as k / mean-std for k on this log grid (k ≈ 1: tanh in its linear range at one std).
ALPHA_GRID = torch.logspace(math.log10(0.05), math.log10(5.0), 81, dtype=torch.float64)
#: Tokens per norm kept for the DyT fit (a random subsample, fixed seed): enough for a 1-D least-squares fit.
FIT_TOKENS = 2048


@dataclass
class NormStats:
    """What one norm saw: per-token standard deviations and a fixed subsample of its raw inputs."""

    sigmas: list[torch.Tensor] = field(default_factory=list)
    samples: list[torch.Tensor] = field(default_factory=list)

    def sigma(self) -> torch.Tensor:
        return torch.cat(self.sigmas)

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples)


def calibration_inputs(model: nn.Module, tokenizer, text: str | None, max_tokens: int = 8192,
                       seq_len: int = 256) -> tuple[list[torch.Tensor], str]:
    """Token blocks of ``text`` (packed, like the causal-LM recipes) or, without a tokenizer, seeded random ids."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or seq_len
    seq_len = int(min(seq_len, limit))
    if tokenizer is not None and text:
        ids = [t for t in tokenizer(text)["input_ids"] if 0 <= t < config.vocab_size][:max_tokens]
        source = "calibration text"
    else:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (min(max_tokens, 4 * seq_len),), generator=gen).tolist()
        source = "random token ids (no tokenizer or text)"
    blocks = [torch.tensor(ids[i:i + seq_len]) for i in range(0, len(ids) - seq_len + 1, seq_len)]
    if not blocks:
        blocks = [torch.tensor(ids)]
    return blocks, f"{source}: {sum(len(b) for b in blocks)} tokens in blocks of {len(blocks[0])}"


@torch.no_grad()
def collect_stats(model: nn.Module, norms: dict[str, nn.Module], blocks: list[torch.Tensor], batch: int = 4
                  ) -> dict[str, NormStats]:
    """Run ``model`` (still with its LayerNorms) on ``blocks`` and record every listed norm's input."""
    stats = {name: NormStats() for name in norms}
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device

    def hook(name: str, eps: float):
        def record(_module, inputs):
            x = inputs[0].detach().to(torch.float64).reshape(-1, inputs[0].shape[-1])
            var = x.var(dim=-1, unbiased=False)
            stats[name].sigmas.append((var + eps).sqrt().cpu())
            keep = torch.randperm(x.shape[0], generator=gen)[: max(1, FIT_TOKENS // max(1, len(blocks) // batch))]
            stats[name].samples.append(x[keep.to(x.device)].cpu())
        return record

    handles = [m.register_forward_pre_hook(hook(name, float(m.eps))) for name, m in norms.items()]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(blocks), batch):
            chunk = blocks[i:i + batch]
            width = min(len(b) for b in chunk)
            model(input_ids=torch.stack([b[:width] for b in chunk]).to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


def fixed_scale(stats: NormStats) -> float:
    """``1 / mean(std)``: LayerNorm's divisor frozen at its average over the calibration tokens (Heimersheim 2024)."""
    return float(1.0 / stats.sigma().mean())


def dyt_alpha(stats: NormStats, eps: float) -> float:
    """α minimising ``Σ (tanh(α·x) − LN_hat(x))²`` over the calibration sample (γ, β unchanged).

    A grid search is enough for one scalar and, unlike gradient steps, cannot diverge.
    """
    x = stats.sample()
    target = torch.nn.functional.layer_norm(x, (x.shape[-1],), None, None, eps)
    base = 1.0 / float(stats.sigma().mean())
    errors = torch.stack([(torch.tanh(k * base * x) - target).pow(2).mean() for k in ALPHA_GRID])
    return float(ALPHA_GRID[int(errors.argmin())] * base)
