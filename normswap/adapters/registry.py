"""One registry of adapters keyed by ``model_type``; lookup errors tell the user how to add one."""

from __future__ import annotations

from normswap.adapters.spec import Adapter
from normswap.errors import UnsupportedArchitectureError

_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    """Add an adapter; one per model_type, so a duplicate is a programming error."""
    if adapter.model_type in _REGISTRY:
        raise ValueError(f"an adapter for model_type {adapter.model_type!r} is already registered")
    _REGISTRY[adapter.model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def all_adapters() -> dict[str, Adapter]:
    return dict(_REGISTRY)


def get_adapter(model_type: str) -> Adapter:
    """The adapter for ``model_type``, or an error naming it, the supported list, and how to add one."""
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"normswap has no adapter for model_type {model_type!r}. Supported: {', '.join(supported_model_types())}. "
            "To add one, describe where the architecture's residual writers and norms are in a few lines in "
            "normswap/adapters/architectures.py (see the gpt2 entry), call register(), and add a row to "
            "tests/test_exact_conversion.py; `normswap inspect` then shows what it would convert."
        ) from None
