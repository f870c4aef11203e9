"""Training checkpoints: written atomically, found only when complete, resumed only with the recipe that made them.

A checkpoint folder is written under a temporary name and renamed into place after a ``COMPLETE`` marker, so a run
killed mid-write never leaves a folder that ``--resume`` would trust; resuming compares the recipe's fingerprint so a
changed hyper-parameter is named instead of silently continuing a different run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from normswap.errors import NormswapError
from normswap.training.recipe import Recipe

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
COMPLETE_MARKER = "COMPLETE"


class ResumeError(NormswapError):
    """No usable checkpoint, or the checkpoint belongs to a different recipe."""


def list_checkpoints(work_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder without the COMPLETE marker was cut off mid-write)."""
    if not work_dir.is_dir():
        return []
    found = [p for p in work_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def save_checkpoint(accelerator, work_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write model/optimizer/scheduler/RNG + trainer state into a temp folder, then rename it into place."""
    final = work_dir / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = work_dir / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)  # torch.save: tied/shared tensors are fine
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        (tmp / COMPLETE_MARKER).write_text("")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(work_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, work_dir: Path, recipe: Recipe) -> dict:
    found = list_checkpoints(work_dir)
    if not found:
        raise ResumeError(f"--resume: no complete checkpoint in {work_dir}; start without --resume")
    latest = found[-1]
    state = json.loads((latest / STATE_FILE).read_text())
    if state.get("recipe_fingerprint") != recipe.fingerprint():
        old = state.get("recipe", {})
        changed = _changed_keys(old, recipe.to_dict())
        raise ResumeError(f"--resume: {latest} was made with a different recipe (changed: {', '.join(changed) or '?'}); "
                          "resume with the same recipe, or start over with --force")
    accelerator.load_state(str(latest))
    return state


def _changed_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _changed_keys(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(prefix + k)
    return out
