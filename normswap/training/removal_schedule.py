"""Progressive LayerNorm removal while fine-tuning: which replaced norm leaves at which step, and how fast.

Each replaced norm (``normswap.removal`` FixedScaleNorm / DyT) blends the real LayerNorm with its replacement,
``λ·replacement + (1-λ)·LayerNorm``. The schedule starts every norm at λ = 0 (the original model) and takes them
away one at a time, in groups — by default the MLP-input norms of every block, then the attention-input norms,
then the final norm (the order of Heimersheim 2024 and Baroni et al. 2025) — each one ramping λ linearly from 0 to 1
over ``ramp_steps``, ``gap_steps`` after the previous one started. λ is a pure function of the step, so a resumed
run sets exactly the same values (nothing to checkpoint). See docs/REMOVAL.md for why this order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from normswap.errors import NormswapError

_BLOCK = re.compile(r"^(?P<stack>.*?)\.(?P<index>\d+)\.(?P<local>.+)$")


def removed_norms(model: nn.Module) -> dict[str, nn.Module]:
    """The model's norm replacements (modules with a ``blend``), by name, in module order."""
    from normswap.removal.modules import DyT, FixedScaleNorm

    return {name: m for name, m in model.named_modules() if isinstance(m, (FixedScaleNorm, DyT))}


def group_of(name: str) -> str:
    """A norm's group: its name inside its block (``ln_2`` for ``transformer.h.3.ln_2``), or its own last part."""
    match = _BLOCK.match(name)
    return match["local"] if match else name.rsplit(".", 1)[-1]


def _layer(name: str) -> int:
    match = _BLOCK.match(name)
    return int(match["index"]) if match else -1


def auto_order(names: list[str]) -> list[str]:
    """Groups in removal order: in-block norms latest-in-block first (the MLP's before the attention's), then the
    norms outside the blocks (the final norm) last, as in Heimersheim 2024."""
    in_block = [n for n in names if _BLOCK.match(n)]
    first_seen = list(dict.fromkeys(group_of(n) for n in in_block))
    outside = list(dict.fromkeys(group_of(n) for n in names if not _BLOCK.match(n)))
    return list(reversed(first_seen)) + outside


@dataclass(frozen=True)
class RemovalSchedule:
    """Start step of every replaced norm; λ at any step follows from it."""

    starts: dict[str, int]
    ramp_steps: int

    @classmethod
    def build(cls, names: list[str], order: tuple[str, ...], start_step: int, gap_steps: int, ramp_steps: int
              ) -> RemovalSchedule:
        groups = list(order) if order else auto_order(names)
        known = {group_of(n) for n in names}
        unknown = [g for g in groups if g not in known]
        missing = sorted(known - set(groups))
        if unknown or missing:
            raise NormswapError(
                "removal.order must list every group of replaced norms exactly: "
                + (f"not in this model: {', '.join(unknown)}; " if unknown else "")
                + (f"not listed: {', '.join(missing)}; " if missing else "")
                + f"this model's groups: {', '.join(sorted(known))}")
        ordered = [n for g in groups for n in sorted((n for n in names if group_of(n) == g), key=_layer)]
        return cls({n: start_step + i * gap_steps for i, n in enumerate(ordered)}, max(1, ramp_steps))

    @property
    def end_step(self) -> int:
        """The first step at which every norm is fully removed."""
        return max(self.starts.values(), default=0) + self.ramp_steps

    def blend(self, name: str, step: int) -> float:
        """λ of norm ``name`` during optimizer step ``step`` (0-based): 0 before its start, 1 after its ramp."""
        done = step - self.starts[name] + 1
        return min(1.0, max(0.0, done / self.ramp_steps))

    def apply(self, modules: dict[str, nn.Module], step: int) -> None:
        for name, module in modules.items():
            module.blend = self.blend(name, step)


def make_schedule(model: nn.Module, spec, steps: int) -> tuple[RemovalSchedule | None, dict[str, nn.Module]]:
    """The schedule a recipe's ``removal`` block asks for on ``model`` (None when not progressive)."""
    modules = removed_norms(model)
    if not spec.progressive:
        return None, modules
    if not modules:
        raise NormswapError("the recipe removes norms progressively (removal.progressive: true), but this model has "
                            "no replaced norm; convert it first with `normswap convert SRC -o OUT --to none "
                            "--approximate` (or --to dyt)")
    schedule = RemovalSchedule.build(list(modules), spec.order, spec.start_step, spec.gap_steps, spec.ramp_steps)
    if schedule.end_step > steps:
        raise NormswapError(
            f"the removal schedule needs {schedule.end_step} steps for {len(modules)} norms (start_step "
            f"{spec.start_step} + {len(modules) - 1} x gap_steps {spec.gap_steps} + ramp_steps {spec.ramp_steps}) "
            f"but the recipe has steps: {steps}; raise steps or lower gap_steps/ramp_steps")
    return schedule, modules


def removal_summary(model: nn.Module, replaced: dict[str, nn.Module], schedule: RemovalSchedule | None) -> dict | None:
    """Record the schedule, and refresh the metadata's per-norm scalars with the trained ones (DyT's α learns)."""
    if not replaced:
        return None
    meta = getattr(model.config, "normswap", None)
    recorded = (meta.get("removal") or {}).get("norms") if isinstance(meta, dict) else None
    if isinstance(recorded, dict):  # updated in place: the CLI keeps a shallow copy of this metadata
        for name, module in replaced.items():
            key = "alpha" if hasattr(module, "alpha") else "scale"
            if name in recorded:
                recorded[name][key] = float(getattr(module, key).detach())
    return {"progressive": schedule is not None,
            "starts": dict(schedule.starts) if schedule is not None else {},
            "ramp_steps": schedule.ramp_steps if schedule is not None else 0,
            "end_step": schedule.end_step if schedule is not None else 0}
