"""Structural discovery: find a model's LayerNorms, the writers of their streams and their readers by measurement.

Hand-written adapters stay as reviewed pins; for every other model type, :func:`discover_from_config` builds a
small float64 instance of the same structure and measures the wiring (see :mod:`normswap.discovery.engine`). The
result is an ordinary :class:`~normswap.adapters.spec.Adapter` with ``origin="discovered"``, resolved by the same
surgery and streaming code as the declared ones.
"""

from __future__ import annotations

import json
from typing import Any

from torch import nn

from normswap.discovery.engine import Discovery, DiscoveryError, NormFinding, discover
from normswap.discovery.template import render_adapter

__all__ = ["Discovery", "DiscoveryError", "NormFinding", "discover", "discover_from_config", "render_adapter"]

_CACHE: dict[tuple[str, str], Discovery] = {}


def _config_key(config: Any) -> str:
    try:
        d = config.to_dict()
    except Exception:  # noqa: BLE001
        return repr(config)
    for k in ("_name_or_path", "transformers_version", "normswap", "_commit_hash", "dtype", "torch_dtype"):
        d.pop(k, None)
    return json.dumps(d, sort_keys=True, default=str)


def instance_from_config(config: Any, model_cls: type | None = None, seed: int = 0) -> nn.Module:
    """A small random float64 instance of ``model_cls`` built from a shrunk copy of ``config`` (no weights read)."""
    from normswap.checkpoint import model_class_for
    from normswap.discovery.instance import tiny_instance

    cls = model_cls or model_class_for(config)
    try:
        return tiny_instance(cls, config, seed=seed)
    except Exception as exc:  # noqa: BLE001 - the modelling code refused the shrunk config: say what is missing
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DiscoveryError(f"cannot build a small {getattr(config, 'model_type', '?')} instance offline to "
                             f"discover its structure ({cls.__name__}): {type(exc).__name__}: {first}") from exc


def discover_from_config(config: Any, model_cls: type | None = None, *, seed: int = 0) -> Discovery:
    """Discover the structure of ``model_cls`` (default: the config's architecture) from its config alone.

    Works for any size of config: the instance is shrunk to a few layers and a small width first. Results are cached
    per (class, config) for the life of the process, so planning a conversion twice costs one discovery.
    """
    from normswap.checkpoint import model_class_for

    cls = model_cls or model_class_for(config)
    key = (f"{cls.__module__}.{cls.__qualname__}", _config_key(config))
    if key not in _CACHE:
        _CACHE[key] = discover(instance_from_config(config, cls, seed), seed=seed)
    return _CACHE[key]
