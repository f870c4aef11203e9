"""One registry of adapters keyed by ``model_type``: declared adapters win, every other type is discovered.

Declared adapters (``normswap/adapters/architectures.py``) are the reviewed pins. For a model type without one,
:func:`adapter_for` measures the structure on a small instance built from the config
(:mod:`normswap.discovery`) and returns the same data type with ``origin="discovered"``.
"""

from __future__ import annotations

from typing import Any

from normswap.adapters.spec import Adapter
from normswap.errors import AlreadyRMSNormError, UnsupportedArchitectureError, and_more

_REGISTRY: dict[str, Adapter] = {}

_HOW_TO_ADD = (
    "To pin one, describe where the architecture's residual writers and norms are in a few lines in "
    "normswap/adapters/architectures.py (`normswap inspect --discover MODEL` prints a draft), call register(), and "
    "add a row to EXACT_ROWS in tests/tiny_models.py; `normswap inspect` then shows what it would convert."
)


def register(adapter: Adapter) -> Adapter:
    """Add an adapter; one per model_type, so a duplicate is a programming error."""
    if adapter.model_type in _REGISTRY:
        raise ValueError(f"an adapter for model_type {adapter.model_type!r} is already registered")
    _REGISTRY[adapter.model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    """The model types with a declared (reviewed) adapter; others may still be discovered."""
    return sorted(_REGISTRY)


def all_adapters() -> dict[str, Adapter]:
    return dict(_REGISTRY)


def get_adapter(model_type: str) -> Adapter:
    """The *declared* adapter for ``model_type``, or an error naming it, the declared list, and how to add one."""
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"normswap has no declared adapter for model_type {model_type!r}. Declared: "
            f"{', '.join(supported_model_types())}. `normswap convert` discovers one from the model itself. "
            + _HOW_TO_ADD
        ) from None


def declared_adapter(model_type: str) -> Adapter | None:
    return _REGISTRY.get(model_type)


def discovered_adapter(config: Any, model_cls: type | None = None) -> Adapter:
    """The adapter discovery measures for ``model_cls`` built from ``config``; raises when there is nothing to swap.

    No LayerNorm-like module at all (measured, whatever the classes are called) is AlreadyRMSNormError, its message
    naming the norms the model does have; LayerNorms that exist but none of which can be swapped (including ones the
    probe never ran) is UnsupportedArchitectureError naming them and why: never "nothing to convert" for those.
    """
    from normswap.discovery import DiscoveryError, discover_from_config

    model_type = getattr(config, "model_type", "?")
    try:
        found = discover_from_config(config, model_cls)
    except DiscoveryError as exc:
        raise UnsupportedArchitectureError(
            f"normswap has no declared adapter for model_type {model_type!r} and could not discover one: {exc}. "
            + _HOW_TO_ADD
        ) from exc
    if found.adapter is None:
        if found.unrun_norms:
            raise UnsupportedArchitectureError(unrun_message(model_type, found.unrun_norms))
        if found.rms_norms:
            raise AlreadyRMSNormError(
                f"this {model_type} model already uses RMSNorm (measured: {len(found.rms_norms)} scale-only norm(s), "
                f"e.g. {found.rms_norms[0]}, and no mean-subtracting one); there is nothing to convert")
        raise AlreadyRMSNormError(no_layernorm_message(model_type, found.other_norms))
    if not found.swapped:
        reasons = "; ".join(f"{name}: {why}" for name, why in list(found.kept.items())[:3])
        more = and_more(len(found.kept), 3)
        raise UnsupportedArchitectureError(
            f"this {model_type} model has {len(found.kept)} LayerNorm(s), but discovery found none that can be "
            f"swapped: {reasons}{more}")
    return found.adapter


def unrun_message(model_type: str, names: list[str]) -> str:
    """The refusal for LayerNorms the probe never ran: named (first few + count) with the reason."""
    from normswap.discovery.norms import UNRUN_REASON

    more = and_more(len(names), 3)
    return (f"this {model_type} model has {len(names)} LayerNorm(s) that {UNRUN_REASON}: "
            f"{', '.join(names[:3])}{more}")


def no_layernorm_message(model_type: str, other: dict[str, int]) -> str:
    """"No LayerNorm" that says which norms the model does have (BatchNorm/GroupNorm are not RMSNorm)."""
    if not other:
        return (f"this {model_type} model has no LayerNorm-like module (measured on a small instance: nothing "
                "subtracts a mean); there is nothing to convert")
    kinds = ", ".join(f"{k} (x{v})" for k, v in sorted(other.items(), key=lambda kv: -kv[1]))
    hint = "; for BatchNorm try `--to none`" if any("BatchNorm" in k for k in other) else ""
    return f"this {model_type} model has no LayerNorm: its norms are {kinds}{hint}; there is nothing to convert"


def adapter_for_config(config: Any, model_cls: type | None = None) -> Adapter:
    """The declared adapter for ``config.model_type``, else one discovered from the config alone."""
    declared = _REGISTRY.get(getattr(config, "model_type", None) or "")
    return declared if declared is not None else discovered_adapter(config, model_cls)


def adapter_for(model: Any) -> Adapter:
    """The adapter for a live (or meta-device) model: declared when there is one, else discovered.

    A discovered template is checked against the model: roles measured per stage of a hierarchical backbone
    (``encoder.layers.1.blocks``) only transfer when the model has as many stages as the instance had.
    """
    adapter = adapter_for_config(model.config, type(model))
    if adapter.origin == "discovered":
        _check_stages(adapter, model)
    return adapter


def _check_stages(adapter: Adapter, model: Any) -> None:
    from normswap.discovery import discover_from_config
    from normswap.discovery.template import base_prefix, module_lists

    measured = discover_from_config(model.config, type(model)).list_lengths
    real = module_lists(model)
    prefix = base_prefix(model)
    paths = [adapter.blocks, *(s.blocks for s in adapter.stacks), *(w.path for w in adapter.embeddings),
             *(n.path for n in adapter.other_norms)]
    for path in paths:
        parts = (prefix + path).split(".")
        for k in range(1, len(parts)):
            outer = ".".join(parts[:k])
            if parts[k].isdigit() and parts[k] != "0" and outer in measured and real.get(outer) != measured[outer]:
                raise UnsupportedArchitectureError(
                    f"discovery measured this {adapter.model_type} model on a small instance whose {outer} has "
                    f"{measured[outer]} entries, and the roles differ from one entry to the next ({path}); this "
                    f"model has {real.get(outer, 0)}, so the measured structure does not transfer and nothing is "
                    "converted on a guess. " + _HOW_TO_ADD)


def discovery_note(adapter: Adapter) -> str:
    """The one line a conversion prints when it used a discovered adapter."""
    swapped = len(adapter.block_norms) + len(adapter.other_norms) + sum(len(s.block_norms) for s in adapter.stacks)
    return (f"no declared adapter for {adapter.model_type}: discovered its structure by measurement "
            f"({swapped} norm role(s), {len(adapter.kept_norms)} kept); `normswap inspect --discover` prints it")
