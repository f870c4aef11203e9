"""Fidelity of an encoder (ViT, sentence encoders) to its original: perplexity does not exist for them.

Both models see the same inputs (text lines, or seeded random pixels for vision models); we compare the mean-pooled
last hidden state of the base model, which is what sentence embeddings and classification heads read, and report
mean and minimum cosine similarity over the samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normswap.verify import model_device, model_dtype

DEFAULT_SAMPLES = 64
MAX_TEXT_TOKENS = 128


def encoder_inputs(
    model: nn.Module, tokenizer=None, lines: list[str] | None = None, samples: int = DEFAULT_SAMPLES,
    batch_size: int = 16, seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Batches of model inputs, built once so the original and the converted model see identical tensors."""
    main = getattr(model, "main_input_name", "input_ids")
    if main == "pixel_values":
        config = model.config
        size = getattr(config, "image_size", 224)
        channels = getattr(config, "num_channels", 3)
        gen = torch.Generator().manual_seed(seed)
        pixels = torch.randn(samples, channels, size, size, generator=gen)
        return [{"pixel_values": chunk} for chunk in pixels.split(batch_size)]
    if tokenizer is None or not lines:
        raise ValueError("a text encoder's fidelity needs a tokenizer and text lines")
    lines = lines[:samples]
    return [
        dict(tokenizer(lines[i:i + batch_size], padding=True, truncation=True, max_length=MAX_TEXT_TOKENS,
                       return_tensors="pt"))
        for i in range(0, len(lines), batch_size)
    ]


@torch.no_grad()
def pooled_features(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean-pooled ``last_hidden_state`` of the base model (after its final norm), float64 on CPU, one row a sample."""
    base = getattr(model, "base_model", model)
    device, dtype = model_device(model), model_dtype(model)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for batch in batches:
            inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}
            hidden = base(**inputs).last_hidden_state.double()
            mask = inputs.get("attention_mask")
            if mask is None:
                rows.append(hidden.mean(dim=1).cpu())
            else:
                m = mask.to(hidden.dtype).unsqueeze(-1)
                rows.append(((hidden * m).sum(1) / m.sum(1).clamp_min(1)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(rows)


def cosine_fidelity(features: torch.Tensor, reference: torch.Tensor) -> dict[str, float | int]:
    cos = F.cosine_similarity(features.double(), reference.double(), dim=-1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "samples": int(cos.numel())}
