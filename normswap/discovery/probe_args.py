"""Probe inputs keyed on forward-argument *names*: the inputs beyond ids/pixels/audio that some models require.

:func:`normswap.discovery.probes.probe_inputs` builds the main inputs; this module adds what a model's ``forward``
names and the config sizes: video clips (``pixel_values_videos``, or ``pixel_values`` of a config with frames),
Pix2Struct-style ``flattened_patches``, layout boxes (``bbox``), masks of the audio features, Q-Former prompts,
aspect-ratio tiles. No rule looks at the model's type or class name: a new architecture whose forward uses the
same argument names gets the same inputs.

Some inputs have more than one layout in the wild (raw audio as ``[batch, samples]`` or ``[batch, 1, samples]``,
flattened vision patches as rows or as ``[batch, patches, C, p, p]``); :func:`alternatives` lists the other
layouts, and the caller keeps the first one the model runs on.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _is_int(v: Any) -> bool:
    """An int that is not a bool (config values: ``True`` is not a size)."""
    return isinstance(v, int) and not isinstance(v, bool)


def forward_params(model: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {}


def required_params(model: nn.Module) -> list[str]:
    """The forward arguments without a default (the ones a call must pass)."""
    return [n for n, p in forward_params(model).items()
            if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def _first(config, *names: str, default=None):
    """The first int-valued attribute among ``names`` on ``config`` or its vision sub-config."""
    for c in (config, getattr(config, "vision_config", None)):
        for n in names:
            v = getattr(c, n, None) if c is not None else None
            if _is_int(v) and v > 0:
                return v
    return default


def num_frames(config) -> int | None:
    """Frames of a video config (``num_frames``/``frames_per_clip``), a multiple of its tubelet size, or None."""
    frames = _first(config, "num_frames", "frames_per_clip", "num_image_with_embedding")
    if frames is None:
        return None
    tubelet = _first(config, "tubelet_size", "temporal_patch_size", default=1)
    return max(tubelet, frames)


def _patch_sizes(vision_config) -> tuple[int, int]:
    """(spatial patch, temporal patch) of a Qwen2-VL-style tower: 14 and 2 when the config leaves them unset."""
    return (int(getattr(vision_config, "patch_size", 14) or 14),
            int(getattr(vision_config, "temporal_patch_size", 2) or 1))


def grid_patches(config, batch: int, gen: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL-style flattened patches of ``batch`` images (each ``2·merge`` patches a side) and their (t, h, w)."""
    vc = getattr(config, "vision_config", None) or config
    patch, tp = _patch_sizes(vc)
    cin = int(getattr(vc, "in_channels", None) or getattr(vc, "num_channels", None) or 3)
    merge = int(getattr(vc, "spatial_merge_size", 2) or 1)
    g = 2 * merge
    pixels = torch.randn(batch * g * g, cin * tp * patch * patch, generator=gen, dtype=dtype)
    return pixels, torch.tensor([[1, g, g]] * batch)


def _bbox(shape: tuple[int, int], coords: int, gen: torch.Generator) -> torch.Tensor:
    """Boxes in 0..1000 with x0 ≤ x1 and y0 ≤ y1 (``coords`` 4: x0 y0 x1 y1; 8: the four corners)."""
    lo = torch.randint(0, 500, (*shape, 2), generator=gen)
    hi = lo + torch.randint(1, 400, (*shape, 2), generator=gen)
    x0, y0, x1, y1 = lo[..., 0], lo[..., 1], hi[..., 0], hi[..., 1]
    if coords == 8:
        return torch.stack([x0, y0, x1, y0, x1, y1, x0, y1], dim=-1)
    return torch.stack([x0, y0, x1, y1], dim=-1)


def named_probes(model: nn.Module, config, probes: dict, *, batch: int, seq_len: int, gen: torch.Generator,
                 dtype: torch.dtype) -> dict:
    """Inputs for the forward arguments ``probes`` does not hold yet, synthesised from their names and the config."""
    params = forward_params(model)
    required = set(required_params(model))
    out: dict[str, torch.Tensor] = {}
    ids = probes.get("input_ids")
    seq = ids.shape[1] if isinstance(ids, torch.Tensor) else seq_len

    def want(name: str) -> bool:
        return name in params and name not in probes

    if want("bbox"):  # layout models: one box per token (LayoutLM, Bros, LiLT, UDOP)
        out["bbox"] = _bbox((batch, seq), int(getattr(config, "dim_bbox", None) or 4), gen)
    if want("flattened_patches"):  # Pix2Struct: [row, col, patch pixels...] per patch
        vc = getattr(config, "vision_config", None) or config
        width = getattr(vc, "patch_embed_hidden_size", None)
        if not _is_int(width):
            patch = int(getattr(vc, "patch_size", 16) or 16)
            width = patch * patch * int(getattr(vc, "num_channels", 3) or 3)
        rows = torch.arange(16) // 4
        pos = torch.stack([rows, torch.arange(16) % 4], dim=-1).to(dtype).expand(batch, 16, 2)
        out["flattened_patches"] = torch.cat([pos, torch.randn(batch, 16, width, generator=gen, dtype=dtype)], -1)
        out["attention_mask"] = torch.ones(batch, 16, dtype=torch.long)
    if want("qformer_input_ids") and ids is not None:  # InstructBLIP: the instruction the Q-Former reads
        out["qformer_input_ids"] = ids[:, :8].clone()
    if "input_features" in probes:
        feats = probes["input_features"]
        for name in ("input_features_mask", "feature_attention_mask"):
            if want(name) and name in required:
                frames = feats.shape[-1] if feats.dim() == 3 and feats.shape[-1] > feats.shape[-2] else feats.shape[1]
                out[name] = torch.ones(batch, frames, dtype=torch.long)
        if want("feature_lens") and feats.dim() == 3:  # every sample's frame count (Qwen2.5-Omni's audio tower)
            out["feature_lens"] = torch.full((batch,), max(feats.shape[1:]), dtype=torch.long)
    pixels = probes.get("pixel_values")
    if want("image_attention_mask") and "image_attention_mask" in required and isinstance(pixels, torch.Tensor):
        out.update(_with_image_attention_mask(pixels, batch, seq))  # optional: only an alternative layout (below)
    if want("image") and "image" in required and not isinstance(pixels, torch.Tensor):  # pixels by another name
        c = int(getattr(config, "num_channels", None) or 3)
        size = getattr(config, "image_size", None)
        size = size if _is_int(size) else 32
        out["image"] = torch.randn(batch, c, size, size, generator=gen, dtype=dtype)
    if isinstance(pixels, torch.Tensor):  # a visual prompt beside the image (SegGPT): the same shape
        for name in required:
            if name not in probes and name.startswith("prompt_") and ("pixel" in name or "mask" in name):
                out[name] = torch.rand(pixels.shape, generator=gen, dtype=dtype)
    if want("past_values") and "past_values" in required:  # time series: a context of whole patches
        length = _first(config, "context_length", default=32)
        patch = _first(config, "patch_length", default=1)
        length = max(patch, min(length, 4 * patch))
        channels = _first(config, "num_input_channels")
        shape = (batch, length, channels) if channels else (batch, length)
        out["past_values"] = torch.randn(*shape, generator=gen, dtype=dtype)
        if want("past_values_padding"):
            out["past_values_padding"] = torch.zeros(batch, length, dtype=torch.long)
        if want("freq"):
            out["freq"] = torch.zeros(batch, 1, dtype=torch.long)
    if want("input_values") and "input_values" in required:  # raw audio a multimodal forward also requires
        out["input_values"] = torch.randn(batch, 4000, generator=gen, dtype=dtype)
    if want("states") and _is_int(getattr(config, "state_dim", None)):  # trajectory models (Decision Transformer)
        out["states"] = torch.randn(batch, seq, config.state_dim, generator=gen, dtype=dtype)
        if want("actions") and _is_int(getattr(config, "act_dim", None)):
            out["actions"] = torch.randn(batch, seq, config.act_dim, generator=gen, dtype=dtype)
        for name in ("rewards", "returns_to_go"):
            if want(name):
                out[name] = torch.randn(batch, seq, 1, generator=gen, dtype=dtype)
        if want("timesteps"):
            out["timesteps"] = torch.arange(seq).expand(batch, seq).clone()
    if want("lang_ids") and ids is not None:  # X-MOD: which language adapter each sample uses
        out["lang_ids"] = torch.zeros(batch, dtype=torch.long)
    if want("visual_feats") and _is_int(getattr(config, "visual_feat_dim", None)):  # LXMERT: region features
        out["visual_feats"] = torch.randn(batch, 8, config.visual_feat_dim, generator=gen, dtype=dtype)
        if want("visual_pos"):
            out["visual_pos"] = torch.rand(batch, 8, int(getattr(config, "visual_pos_dim", 4)), generator=gen,
                                           dtype=dtype)
    latents = _first(config, "latent_query_num")
    if want("image_embeds_position_mask") and isinstance(pixels, torch.Tensor) and latents and seq > latents + 1:
        mask = torch.zeros(batch, seq, dtype=torch.long)  # Kosmos-2: where the image's latent queries go
        mask[:, 1:1 + latents] = 1
        out["image_embeds_position_mask"] = mask
    if want("aspect_ratio_ids") and "pixel_values" in probes:  # Mllama: one tile per image
        out["aspect_ratio_ids"] = torch.ones(batch, 1, dtype=torch.long)
        out["aspect_ratio_mask"] = torch.ones(batch, 1, 1, dtype=torch.long)
    return out


#: Forward arguments that take already-embedded rows when a sub-module is run on its own (a Q-Former's queries, an
#: encoder fed by another tower's features), and the config widths such rows may have, most specific first.
_EMBED_ARGS = ("hidden_states", "inputs_embeds", "query_embeds", "patch_embeds", "latents")
_EMBED_WIDTHS = ("input_dim", "input_size", "hidden_size", "hidden_dim", "d_model", "embed_dim")


def embedding_layouts(model: nn.Module, config, probes: dict, *, batch: int, seq_len: int, gen: torch.Generator,
                      dtype: torch.dtype) -> list[dict]:
    """For a forward that *requires* embedded rows (and got no ids or pixels to make them from): ``[batch, seq,
    width]`` for each width the config names, then channels-first frames, longer sequences, an image and a
    patch grid; a required ``mask`` covers the rows. The caller keeps the first layout the model runs on."""
    required = required_params(model)
    name = next((n for n in _EMBED_ARGS if n in required and n not in probes), None)
    if name is None:
        return []
    widths = list(dict.fromkeys(getattr(config, w) for w in _EMBED_WIDTHS if _is_int(getattr(config, w, None))))
    shapes = [(batch, seq_len, w) for w in widths]
    shapes.extend((batch, w, 4) for w in widths)  # channels first: a codec decoder's latent frames (upsampled ~1000x)
    shapes.extend((batch, 4 * seq_len, w) for w in widths)
    c = int(getattr(config, "in_channels", None) or getattr(config, "num_channels", None) or 3)
    size = getattr(config, "image_size", None)
    shapes.append((batch, c, *(2 * [size if _is_int(size) else 32])))
    shapes.extend((batch, w, 4, 4) for w in widths)  # a patch-embedding conv's output grid
    cross = getattr(config, "encoder_hidden_size", None)
    out = []
    for shape in shapes:
        layout = {name: torch.randn(*shape, generator=gen, dtype=dtype)}
        if "encoder_hidden_states" in forward_params(model) and "encoder_hidden_states" not in probes \
                and _is_int(cross):  # cross-attention layers read another tower's rows
            layout["encoder_hidden_states"] = torch.randn(batch, seq_len, cross, generator=gen, dtype=dtype)
        for mask in ("mask", "attention_mask"):
            if mask in required and mask not in probes and len(shape) == 3:
                layout[mask] = torch.ones(batch, shape[1], dtype=torch.bool)
        out.append(layout)
    return out


def _with_image_attention_mask(pixels: torch.Tensor, batch: int, seq: int) -> dict:
    """IDEFICS-style image inputs: ``[batch, images, C, H, W]`` pixels and which images each token may attend."""
    if pixels.dim() == 4:
        pixels = pixels[:, None]
    return {"pixel_values": pixels, "image_attention_mask": torch.ones(batch, seq, pixels.shape[1], dtype=torch.long)}


def _reshape(probes: dict, key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict | None:
    value = probes.get(key)
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return {**probes, key: fn(value)}
    except RuntimeError:
        return None


def alternatives(probes: dict, config, params: frozenset[str] | set[str] = frozenset()) -> list[dict]:
    """Other layouts of the same inputs, for models whose forward reads them differently (tried in order).

    ``params`` are the forward's argument names: an optional ``image_attention_mask`` is only tried here, since its
    meaning differs between models (IDEFICS: images per token, with 5-d pixels; FLAVA: a mask over patches)."""
    out: list[dict | None] = []
    pixels = probes.get("pixel_values")
    ids = probes.get("input_ids")
    if ("image_attention_mask" in params and "image_attention_mask" not in probes and isinstance(pixels, torch.Tensor)
            and isinstance(ids, torch.Tensor)):
        out.append({**probes, **_with_image_attention_mask(pixels, ids.shape[0], ids.shape[1])})
    values = probes.get("input_values")
    if isinstance(values, torch.Tensor) and values.dim() == 2:  # raw audio: mono channel first
        out.append(_reshape(probes, "input_values", lambda v: v[:, None, :]))
    feats = probes.get("input_features")
    if isinstance(feats, torch.Tensor) and feats.dim() == 3:  # spectrogram as a one-channel image
        out.append(_reshape(probes, "input_features", lambda v: v[:, None]))
        out.append(_reshape(probes, "input_features", lambda v: v.transpose(1, 2)))
        for name in ("input_features_mask", "feature_attention_mask"):  # an optional mask the forward still reads
            if name in params and name not in probes:
                frames = feats.shape[-1] if feats.shape[-1] > feats.shape[-2] else feats.shape[1]
                out.append({**probes, name: torch.ones(feats.shape[0], frames, dtype=torch.long)})
        if "feature_lens" in probes:  # every sample's frames side by side: [mel, total frames]
            out.append(_reshape(probes, "input_features", lambda v: v.permute(1, 0, 2).reshape(v.shape[1], -1)))
    grid = probes.get("grid_thw", probes.get("image_grid_thw"))
    if isinstance(pixels, torch.Tensor) and pixels.dim() == 4:  # one image per sample, as [batch, images, C, H, W]
        out.append(_reshape(probes, "pixel_values", lambda v: v[:, None]))
        out.append(_reshape(probes, "pixel_values", lambda v: torch.stack([v, v.flip(-1)], 1)))  # an image pair
    for key in ("pixel_values", "hidden_states"):
        if isinstance(probes.get(key), torch.Tensor) and probes[key].dim() == 2 and isinstance(grid, torch.Tensor):
            out.extend(_patch_layouts(probes, key, config, grid))
    return [p for p in out if p is not None]


def _patch_layouts(probes: dict, key: str, config, grid: torch.Tensor) -> list[dict | None]:
    """Flattened patches as rows without the temporal fold, one [C, p, p] image per patch, or [images, patches, C,
    p, p]; each with and without the temporal patch folded into the channels."""
    patch, tp = _patch_sizes(getattr(config, "vision_config", None) or config)
    b, n = len(grid), int(grid[0].prod())
    out = []
    for t in dict.fromkeys((tp, 1)):
        def cut(v, t=t):
            return v[:, : v.shape[1] * t // tp]
        if t != tp:
            out.append(_reshape(probes, key, cut))
        out.append(_reshape(probes, key, lambda v, cut=cut: cut(v).reshape(b * n, -1, patch, patch)))
        out.append(_reshape(probes, key, lambda v, cut=cut: cut(v).reshape(b, n, -1, patch, patch)))
    return out


def runs(model: nn.Module, probes: dict) -> bool:
    """Whether the model's forward accepts ``probes`` (any error means this input or layout is not the one it reads)."""
    try:
        with torch.no_grad():
            model(**probes)
    except Exception:  # noqa: BLE001
        return False
    return True


def first_runnable(model: nn.Module, candidates: list[dict]) -> dict:
    """The first candidate the model's forward accepts (float64 default dtype, as the callers run it), else the
    first candidate (the caller then reports the model's own error)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(next((p.dtype for p in model.parameters() if p.is_floating_point()), previous))
    try:
        for probes in candidates:
            if runs(model, probes):
                return probes
    finally:
        torch.set_default_dtype(previous)
    return candidates[0]
