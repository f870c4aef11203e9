"""Rebuild a removal output's modules after the stock class has loaded its weights (``normswap.load``).

The stock class does not know the ``scale`` / ``alpha`` entries, so it skips them; they are read back from the
checkpoint files here (the fine-tuned α of a DyT model is only there). The value recorded in the metadata is the
fallback for a checkpoint that lacks them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from normswap.removal.modules import REPLACEMENTS, replace_removed_norms_


def _weight_files(path: str | os.PathLike) -> list[str]:
    """The safetensors files of a local folder or hub id (sharded or not); empty when none can be found."""
    from transformers.utils import cached_file

    def find(name: str) -> str | None:
        try:
            return cached_file(str(path), name, _raise_exceptions_for_missing_entries=False)
        except Exception:  # noqa: BLE001 - absent file or offline: fall back to the metadata
            return None

    index = find("model.safetensors.index.json")
    if index:
        shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        return [f for f in (find(s) for s in shards) if f]
    single = find("model.safetensors")
    return [single] if single else []


@torch.no_grad()
def load_removed_norms_(model: nn.Module, path: str | os.PathLike, removal: dict) -> int:
    """Replace the recorded LayerNorms of ``model`` and load their scalars from the checkpoint at ``path``."""
    from safetensors import safe_open

    count = replace_removed_norms_(model, removal)
    key = REPLACEMENTS[removal["target"]][1]
    wanted = {f"{name}.{key}": name for name in (removal.get("norms") or {})}
    found = 0
    for file in _weight_files(path):
        with safe_open(file, framework="pt") as fh:
            for k in set(fh.keys()) & set(wanted):
                module = model.get_submodule(wanted[k])
                getattr(module, key).copy_(fh.get_tensor(k).reshape(()))
                found += 1
    return count
