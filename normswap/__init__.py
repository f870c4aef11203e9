"""normswap: convert pretrained transformers from LayerNorm to RMSNorm, exactly where the maths allows.

The public names are imported on first use (PEP 562), so ``import normswap.cli`` starts without torch: the
``normswap`` command imports the heavy libraries inside its error handling, where Ctrl-C is caught.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from normswap._version import __version__

#: public name -> the module that defines it
_EXPORTS = {
    "load": "normswap.checkpoint",
    "load_source": "normswap.checkpoint",
    "save": "normswap.checkpoint",
    "ConversionReport": "normswap.conversion",
    "convert_": "normswap.conversion",
    "plan_conversion": "normswap.conversion",
    "CenteredRMSNorm": "normswap.norm",
    "RMSNorm": "normswap.norm",
    "finetune": "normswap.training",
    "keep_centered_": "normswap.training",
}

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

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from normswap.checkpoint import load, load_source, save
    from normswap.conversion import ConversionReport, convert_, plan_conversion
    from normswap.norm import CenteredRMSNorm, RMSNorm
    from normswap.training import finetune, keep_centered_


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        try:  # `import normswap; normswap.errors...` keeps working for submodules
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
