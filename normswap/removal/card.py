"""The model card's opening paragraph for a removal output: it must say plainly that the model is an approximation."""

from __future__ import annotations

import math

WHAT = {"none": "removed (each LayerNorm became a fixed per-norm scale: `(x − mean(x))·s·γ + β`)",
        "dyt": "replaced by Dynamic Tanh (`γ·tanh(α·x) + β`, Zhu et al. 2025)"}


def measured_gaps(meta: dict) -> list[str]:
    """The cross-entropy gaps to the original that normswap measured: naive (conversion) and healed (finetune)."""
    removal = meta.get("removal") or {}
    naive = removal.get("naive") or {}
    out = []
    if "ce_gap" in naive:
        out.append(f"{naive['ce_gap']:+.3f} nats/token right after conversion (calibration text)")
    after = (meta.get("finetune") or {}).get("after") or {}
    if after.get("student_perplexity") and after.get("teacher_perplexity"):
        gap = math.log(after["student_perplexity"]) - math.log(after["teacher_perplexity"])
        tokens = f"{after['tokens']:,} " if isinstance(after.get("tokens"), int) else ""
        out.append(f"{gap:+.3f} nats/token after fine-tuning (on the {tokens}held-out tokens of the fine-tuning "
                   "run's evaluation; measure on more text before relying on it)")
    return out


def removal_summary(meta: dict, source_name: str) -> str:
    removal = meta.get("removal") or {}
    target = removal.get("target", meta.get("target", "none"))
    gaps = measured_gaps(meta)
    return (f"`{source_name}` with its LayerNorms {WHAT.get(target, 'replaced')} by normswap (`--to {target}`"
            + (", then fine-tuned" if meta.get("finetune") else "") + "). **This is an approximation of the "
            "original, not an equivalent**: the per-token normalisation is gone, so outputs differ. Measured "
            "cross-entropy gap to the original: " + ("; ".join(gaps) if gaps else "not measured") + ". Load it "
            "with `trust_remote_code=True` or `normswap.load`, never with the stock class.")
