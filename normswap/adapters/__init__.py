"""Architecture adapters: declarative descriptions of residual writers and norms, one per model_type."""

from normswap.adapters import architectures as _architectures  # noqa: F401  (registers the built-in adapters)
from normswap.adapters.registry import all_adapters, get_adapter, register, supported_model_types
from normswap.adapters.spec import Adapter, Norm, PostLNCondition, Stack, Writer

__all__ = [
    "Adapter",
    "Norm",
    "PostLNCondition",
    "Stack",
    "Writer",
    "all_adapters",
    "get_adapter",
    "register",
    "supported_model_types",
]
