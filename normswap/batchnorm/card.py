"""Model-card sections for a ``--to none`` BatchNorm fold: what was folded, what stayed and why, how to load it.

:func:`normswap.publish.card.render_model_card` builds the LayerNorm card and hands its sections here; for a folder
whose ``normswap`` block records ``batchnorm_folded`` the summary, the conversion section, the tags and the loading
section are replaced (verification and measurements are shared as they are).
"""

from __future__ import annotations

from pathlib import Path

from normswap.publish.remote_code import MODELING_FILE, primary_auto_class, stock_identity


def is_batchnorm_fold(meta: dict) -> bool:
    return isinstance(meta, dict) and meta.get("target") == "none" and "batchnorm_folded" in meta


def _summary(meta: dict, source_name: str) -> str:
    n = len(meta.get("batchnorm_folded") or [])
    return (f"`{source_name}` with {n} BatchNorm(s) folded into the convolution or linear layer before them by "
            "normswap, **exactly** (inference semantics: running statistics): it computes the same function as the "
            "original in eval mode, up to float rounding (see Verification).")


def _conversion(meta: dict, config: dict) -> list[str]:
    model_type, architectures = stock_identity(config)
    folded = meta.get("batchnorm_folded") or []
    kept = meta.get("batchnorm_kept") or {}
    into_linear = [p for p in folded if p.get("into_type") == "Linear"]
    lines = [
        "## What was converted", "",
        "At inference a BatchNorm is a fixed affine map per channel, `y·s + t` with `s = γ/√(var+eps)` and "
        "`t = β − μ·s`, and the layer before it is linear per output channel, so the pair is one layer with "
        "`W' = W·s` and `b' = b·s + t`, computed in float64 and cast back once. Which BatchNorms read the untouched "
        "output of a conv/linear was measured on a probe forward, not read from module names.", "",
        "The checkpoint keeps the stock keys: each folded BatchNorm is stored as `x + c` (running mean 0, running "
        "variance 1 − eps, weight 1, bias c), so the stock class computes the folded function; the shipped code and "
        "`normswap.load` remove those BatchNorms and run the convolution with a bias.", "",
        "| | |", "|---|---|",
        f"| Architecture | `{', '.join(architectures)}` (model type `{model_type}`) |",
        "| Mode | **exact** (inference semantics) |",
        f"| BatchNorms folded | {len(folded)}" + (f" ({len(into_linear)} into linear layers)" if into_linear else "") + " |",
        f"| BatchNorms kept | {len(kept)} |",
        f"| Saved dtype | `{meta.get('dtype') or 'as source'}` |",
        f"| normswap version | `{meta.get('version', 'unknown')}` |",
    ]
    if kept:
        lines += ["", "Kept BatchNorms and why:", ""] + [f"- `{name}`: {why}" for name, why in kept.items()]
    return lines


def _loading(config: dict, model_id: str) -> list[str]:
    model_type, architectures = stock_identity(config)
    auto = primary_auto_class(model_type, architectures) or "AutoModel"
    return [
        "## How to load", "",
        f"**With transformers and the code shipped in this repo** (`{MODELING_FILE}`, torch and transformers only): "
        "the folded BatchNorms are removed at load time.", "",
        "```python", f"from transformers import {auto}", "",
        f'model = {auto}.from_pretrained("{model_id}", trust_remote_code=True)', "```", "",
        "**With the stock class** (no remote code): the folded BatchNorms stay as per-channel additions, same outputs.",
        "", "```python", f'model = {auto}.from_pretrained("{model_id}")', "```", "",
        "**With normswap**:", "", "```python", "import normswap", "", f'model = normswap.load("{model_id}")', "```",
        "", "Keep the model in eval mode: training it further with batch statistics is a different function.",
    ]


def batchnorm_sections(config: dict, model_id: str, parts: list[list[str]]) -> list[list[str]]:
    """``parts`` (the card's sections) with the LayerNorm wording replaced for a BatchNorm fold; else unchanged."""
    meta = config.get("normswap") or {}
    if not is_batchnorm_fold(meta):
        return parts
    from normswap.publish.card import hub_model_id

    source = (meta.get("source") or {}).get("id") or "the source model"
    source_name = source if hub_model_id(source) else Path(source).name
    out = []
    for part in parts:
        if not part:
            out.append(part)
        elif part[0] == "---":  # front matter + title + summary
            part = [line.replace("\n- rmsnorm\n", "\n- batchnorm-folding\n") for line in part]  # YAML tags
            out.append([*part[:-1], _summary(meta, source_name)])
        elif part[0] == "## What was converted":
            out.append(_conversion(meta, config))
        elif part[0] == "## How to load":
            out.append(_loading(config, model_id))
        else:
            out.append(part)
    return out
