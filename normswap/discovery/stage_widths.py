"""Widths of stage-structured configs that the plain hidden-size shrink does not reach (issue 13: discovery ≤ 10 s).

:func:`normswap.discovery.instance.tiny_config` shrinks a transformer's one ``hidden_size`` to 64, and a
hierarchical backbone (``depths`` plus a base or per-stage width: Swin, ConvNeXt, PVT) to two small stages. Two
layouts fall between the two and used to keep their full width, which made discovery (a forward pass per candidate
writer, in float64) take tens of seconds:

* stages that all share one width (GroupViT's vision tower: ``depths`` [6, 3, 3] and a single ``hidden_size``): the
  hidden size shrinks like a plain transformer's;
* per-stage widths next to a per-stage depth *list* under a layer key (CvT: ``depth`` [1, 2, 10], ``embed_dim``
  [64, 192, 384], ``num_heads`` [1, 3, 6]): the widths are divided by one common factor, so every stage keeps its
  heads and the ratios between stage widths (and so between a stage's MLP width and the next stage's width) stay
  what they were. Stages and depths are kept: such a model's roles are measured per stage and per layer index
  (CvT's last stage alone has a cls token), so a shallower instance would describe a different model.

Dense-prediction heads (DPT, ZoeDepth, CHMv2) are stage-like too: one neck width per backbone tap, and fusion
convolutions run at up to twice the image resolution. Their fusion width is capped and the neck's per-level widths
halved until the widest is at most 512 (a 768-wide 3x3 neck convolution cost more than the whole backbone).
"""

from __future__ import annotations

from math import gcd
from typing import Any

from normswap.discovery.probe_args import _is_int

#: Keys that give a stage model a base or per-stage width (its stages differ in width): not a uniform-width model.
_STAGE_WIDTH_KEYS = ("embed_dim", "hidden_sizes", "embedding_size", "patch_embeds_hidden_size")
_PER_STAGE_WIDTHS = ("embed_dim", "hidden_sizes")
_PER_STAGE_HEADS = ("num_heads", "num_attention_heads")
#: Widths of a dense-prediction head's fusion stage, capped at :data:`FUSION`; its per-level neck widths.
_FUSION_KEYS = ("fusion_hidden_size", "bottleneck_features")
_NECK_KEYS = ("neck_hidden_sizes", "post_process_channels")
FUSION = 32
NECK = 512


def _int_list(v: Any, n: int | None = None) -> bool:
    return isinstance(v, list) and bool(v) and all(_is_int(x) and x > 0 for x in v) and (n is None or len(v) == n)


def uniform_width_stages(d: dict) -> bool:
    """Whether a stage config (``depths``) has one width for all its stages, to be shrunk as a plain hidden size."""
    return isinstance(d.get("depths"), list) and not any(k in d for k in _STAGE_WIDTH_KEYS)


def shrink_stage_widths(d: dict, layer_keys: tuple[str, ...], target: int) -> None:
    """Divide the per-stage widths of a config whose stage depths are a list under a layer key by the smallest
    common factor that brings the widest stage to ``target`` or below (every stage's width still a multiple of its
    head count); depths, stage count and heads are kept."""
    if "depths" in d:
        return
    depth = next((d[k] for k in layer_keys if _int_list(d.get(k))), None)
    if depth is None:
        return
    n = len(depth)
    heads = next((d[k] for k in _PER_STAGE_HEADS if _int_list(d.get(k), n)), [1] * n)
    for key in _PER_STAGE_WIDTHS:
        widths = d.get(key)
        if not _int_list(widths, n):
            continue
        common = gcd(*widths)
        factors = [f for f in range(1, common + 1)
                   if common % f == 0 and all((w // f) % h == 0 for w, h in zip(widths, heads, strict=True))]
        if not factors:
            continue
        f = next((f for f in factors if max(widths) // f <= target), factors[-1])
        d[key] = [w // f for w in widths]


def shrink_head_widths(d: dict) -> None:
    """Cap a dense-prediction head's fusion widths at :data:`FUSION` and halve its per-level neck widths until the
    widest is at most :data:`NECK` (every level keeps its share of the width)."""
    for k in _FUSION_KEYS:
        if _is_int(d.get(k)) and d[k] > FUSION:
            d[k] = FUSION
    for k in _NECK_KEYS:
        widths = d.get(k)
        if not _int_list(widths):
            continue
        while max(widths) > NECK and all(w % 2 == 0 for w in widths):
            widths = [w // 2 for w in widths]
        d[k] = widths
