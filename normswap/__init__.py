"""normswap: convert pretrained transformers from LayerNorm to RMSNorm, exactly where the maths allows."""

__version__ = "0.1.0"

from normswap.checkpoint import load, load_source, save  # noqa: E402
from normswap.conversion import ConversionReport, convert_, plan_conversion  # noqa: E402
from normswap.norm import CenteredRMSNorm, RMSNorm  # noqa: E402

__all__ = [
    "CenteredRMSNorm",
    "ConversionReport",
    "RMSNorm",
    "__version__",
    "convert_",
    "load",
    "load_source",
    "plan_conversion",
    "save",
]
