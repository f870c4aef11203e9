"""normswap: convert pretrained transformers from LayerNorm to RMSNorm, exactly where the maths allows."""

from normswap._version import __version__
from normswap.checkpoint import load, load_source, save
from normswap.conversion import ConversionReport, convert_, plan_conversion
from normswap.norm import CenteredRMSNorm, RMSNorm
from normswap.training import finetune, keep_centered_

__all__ = [
    "CenteredRMSNorm",
    "ConversionReport",
    "RMSNorm",
    "__version__",
    "convert_",
    "finetune",
    "keep_centered_",
    "load",
    "load_source",
    "plan_conversion",
    "save",
]
