"""normswap: convert pretrained transformers from LayerNorm to RMSNorm, exactly where the maths allows."""

__version__ = "0.1.0"

from normswap.checkpoint import load, load_source, save  # noqa: E402
from normswap.conversion import ConversionReport, convert_, plan_conversion  # noqa: E402
from normswap.finetune import finetune, keep_centered_  # noqa: E402  (binds the function over the subpackage name)
from normswap.norm import CenteredRMSNorm, RMSNorm  # noqa: E402

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
