"""Architecture adapters: declarative descriptions of residual writers and norms, one per model_type."""

from normswap.adapters import architectures as _architectures  # noqa: F401  (registers the built-in adapters)
from normswap.adapters.registry import (
    adapter_for,
    adapter_for_config,
    all_adapters,
    get_adapter,
    register,
    supported_model_types,
)
from normswap.adapters.spec import Adapter, Norm, PostLNCondition, Stack, Writer

__all__ = [
    "Adapter",
    "Norm",
    "PostLNCondition",
    "Stack",
    "Writer",
    "adapter_for",
    "adapter_for_config",
    "all_adapters",
    "get_adapter",
    "register",
    "supported_model_types",
]
