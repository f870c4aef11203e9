"""The removal modules as remote code: appended to an output's ``modeling_normswap.py`` when it has removed norms.

The shipped code must import only torch and transformers, and :mod:`normswap.removal.modules` is written that way,
so its own source is what gets shipped (one implementation, identical numbers). A subclass of the template's
``NormswapMixin`` installs the replacements right after the stock ``__init__``, before the weights load, so the
checkpoint's ``scale`` / ``alpha`` entries load into them like any other parameter.
"""

from __future__ import annotations

from importlib import resources

MIXIN = '''

_NormswapMixinBase = NormswapMixin


class NormswapMixin(_NormswapMixinBase):
    """The template's mixin, plus the LayerNorm replacements recorded in ``config.normswap["removal"]``."""

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        removal = (getattr(config, "normswap", None) or {}).get("removal")
        if isinstance(removal, dict) and removal.get("norms"):
            replace_removed_norms_(self, removal)
'''


def removal_code() -> str:
    """The modules' source without its ``from __future__`` line (only legal at the top of a file)."""
    text = resources.files("normswap.removal").joinpath("modules.py").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.startswith("from __future__")]
    return "\n".join(lines).strip("\n") + "\n" + MIXIN


def with_removal_code(source: str, template: str) -> str:
    """``source`` (template + generated classes) with the removal code inserted before the generated classes."""
    head = template.rstrip("\n")
    if not source.startswith(head):
        raise ValueError("the modeling file does not start with its template; cannot add the removal modules")
    return head + "\n\n\n# normswap LayerNorm removal (--to none|dyt)\n" + removal_code() + source[len(head):]
