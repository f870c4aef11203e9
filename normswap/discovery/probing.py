"""Probe inputs beyond the main input: the optional inputs that make optional writers run.

:func:`normswap.discovery.instance.probe_inputs` builds what every model needs (ids, pixels, audio features, decoder
ids); discovery adds inputs that exercise writers a plain forward skips, since a writer that never runs cannot be
measured.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from normswap.discovery.probe_args import runs


def optional_probes(model: nn.Module, probes: dict) -> dict:
    """Probes that also exercise optional writers: a mask (mask tokens) and encoder states (cross-attention).

    A writer the probe pass never runs cannot be measured, and would be left uncentred while it writes the stream
    whenever a user passes ``bool_masked_pos`` or encoder states. Each extra input is kept only if the model accepts
    it on these probes.
    """
    try:
        params = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return probes
    config = model.config
    extra: dict[str, torch.Tensor] = {}
    pixels = probes.get("pixel_values")
    if "bool_masked_pos" in params and isinstance(pixels, torch.Tensor):
        patch = getattr(config, "patch_size", None)
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        if isinstance(patch, int) and patch > 0:
            n = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
            extra["bool_masked_pos"] = (torch.arange(n) % 3 == 1).expand(pixels.shape[0], n).clone()
    ids = probes.get("input_ids")
    if "encoder_hidden_states" in params and not getattr(config, "is_encoder_decoder", False) \
            and isinstance(ids, torch.Tensor):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        width = getattr(text, "d_model", None) or getattr(text, "hidden_size", None)
        if isinstance(width, int):
            gen = torch.Generator().manual_seed(3)
            extra["encoder_hidden_states"] = torch.randn(ids.shape[0], 5, width, generator=gen, dtype=torch.float64)
    for key, value in extra.items():
        trial = {**probes, key: value}
        if runs(model, trial):  # else the model does not take this input in this configuration
            probes = trial
    return probes
