"""LayerNorm removal: replace norms by a fixed scale ("none") or Dynamic Tanh ("dyt"), then heal by fine-tuning.

``convert_removal_(model, "none"|"dyt", tokenizer=...)`` does the replacement in place and measures the naive gap;
``normswap finetune --recipe remove-ln`` (or ``dyt``) heals it, removing the norms progressively (see
docs/REMOVAL.md); ``normswap.load`` and the shipped remote code rebuild the modules from the config's metadata.
"""

from normswap.removal.convert import TARGETS, RemovalError, RemovalReport, convert_removal_
from normswap.removal.loading import load_removed_norms_
from normswap.removal.modules import DyT, FixedScaleNorm, replace_removed_norms_

__all__ = [
    "TARGETS",
    "DyT",
    "FixedScaleNorm",
    "RemovalError",
    "RemovalReport",
    "convert_removal_",
    "load_removed_norms_",
    "replace_removed_norms_",
]
