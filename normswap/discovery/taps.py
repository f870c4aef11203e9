"""Backbone taps through shrinking: a backbone whose ``out_indices`` feed a neck keeps one output per tap.

A DPT neck (Depth Anything, ZoeDepth) reassembles four backbone outputs, an RT-DETR encoder projects three stages;
the heads' per-level lists (``neck_hidden_sizes``, ``encoder_in_channels``) have one entry per tap. Dropping the taps
with the layers they named (what shrinking to two layers would do) leaves the backbone with fewer outputs than the
neck has levels. So a tapped backbone keeps as many layers (or stages) as it has taps, the taps are renumbered onto
the kept ones, and the parent's per-tap channel lists follow the backbone's new stage widths.
"""

from __future__ import annotations

from normswap.discovery.probe_args import _is_int


def backbone_taps(d: dict) -> list[int] | None:
    """The ``out_indices`` of a backbone config dict (ascending positive stage indices), else None. A single tap
    is every backbone config's default (its last stage), which nothing downstream counts on: None too."""
    taps = d.get("out_indices")
    if isinstance(taps, (list, tuple)) and len(taps) > 1 and all(_is_int(i) and i > 0 for i in taps) \
            and list(taps) == sorted(set(taps)):
        return list(taps)
    return None


def stages_to_keep(d: dict, taps: list[int] | None, default: int) -> int:
    """How many layers/stages to keep: ``default``, or one per tap (for a stage model: up to the last tap)."""
    if not taps:
        return default
    if isinstance(d.get("depths"), list):
        return max(default, taps[-1])
    return max(default, len(taps))


def retap(d: dict, taps: list[int] | None, kept: int) -> None:
    """Renumber ``taps`` onto ``kept`` layers (the last ones; a stage model keeps its stage numbers) or drop them."""
    d.pop("stage_names", None)  # recomputed by the config from the new depth
    if not taps or (isinstance(d.get("depths"), list) and taps[-1] > kept):
        d.pop("out_features", None)
        d.pop("out_indices", None)
        return
    new = taps if isinstance(d.get("depths"), list) else list(range(kept - len(taps) + 1, kept + 1))
    d["out_indices"] = new
    d["out_features"] = [f"stage{i}" for i in new]


def follow_widths(parent: dict, old: dict, new: dict) -> None:
    """Channel lists of ``parent`` that were the backbone's tapped stage widths become its new tapped widths, and a
    patch size the parent shares with its backbone follows the backbone's new one."""
    old_taps, new_taps = backbone_taps(old), backbone_taps(new)
    for k in ("patch_size",):
        if k in parent and parent[k] == old.get(k) and new.get(k) != old.get(k):
            parent[k] = new[k]
    width, new_width = old.get("hidden_size"), new.get("hidden_size")
    if _is_int(width) and _is_int(new_width) and width != new_width:  # DPT's reassemble_hidden_size
        for k, v in list(parent.items()):
            if isinstance(k, str) and k.endswith("hidden_size") and k != "hidden_size" and v == width:
                parent[k] = new_width
    if not (old_taps and new_taps):
        return
    for width in ("stage_out_channels", "hidden_sizes"):  # the stage output widths, most specific name first
        old_w, new_w = old.get(width), new.get(width)
        if not (isinstance(old_w, list) and isinstance(new_w, list)):
            continue
        try:
            before = [old_w[i - 1] for i in old_taps]
            after = [new_w[i - 1] for i in new_taps]
        except IndexError:
            continue
        hits = [k for k, v in parent.items() if isinstance(v, list) and v == before]
        for k in hits:
            parent[k] = list(after)
        if hits:
            return
