"""Probe inputs for any model's main inputs, built from its config: what discovery and the census run it on.

Token ids avoid every special id (an image token without its image is an error in a VLM), pixel sizes come from the
(vision) config, audio gets features or raw samples of a length the encoder accepts, encoder-decoders get decoder
ids, and a VLM prompt holds as many image tokens as its vision tower yields for the probe image, so the tower is
exercised rather than skipped.
"""

from __future__ import annotations

import torch
from torch import nn

from normswap.discovery.probe_args import (
    _is_int,
    alternatives,
    embedding_layouts,
    first_runnable,
    forward_params,
    grid_patches,
    named_probes,
    num_frames,
    required_params,
)

#: Sizes shared with normswap.discovery.instance (the small instance is built to these).
VOCAB = 256
IMAGE = 32
PATCH = 8


def _special_ids(d: dict) -> list[tuple[str, int | list]]:
    """(key, value) of every token-id entry (bos/eos/pad/image tokens ...), so the vocab can stay above them."""
    out = []
    for k, v in d.items():
        if not isinstance(k, str) or not (k.endswith("token_id") or k.endswith("token_index") or k.endswith("token_ids")):
            continue
        if _is_int(v) or (isinstance(v, list) and v and all(_is_int(x) for x in v)):
            out.append((k, v))
    return out



def _forward_params(model: nn.Module) -> set[str]:
    return set(forward_params(model))


def _sub(config, *names: str):
    """The first nested sub-config among ``names`` (e.g. vision_config), else ``config`` itself."""
    for n in names:
        sub = getattr(config, n, None)
        if sub is not None and hasattr(sub, "to_dict"):
            return sub
    return config


def _all_special_ids(config) -> set[int]:
    ids: set[int] = set()
    stack = [config.to_dict()]
    while stack:
        d = stack.pop()
        for _, v in _special_ids(d):
            ids.update(v if isinstance(v, list) else [v])
        stack.extend(v for v in d.values() if isinstance(v, dict))
    return ids


def _text_ids(config, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """Random ordinary token ids: inside the vocab, none of them a special (bos/eos/pad/image ...) token."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None) or VOCAB
    special = _all_special_ids(config)
    allowed = torch.tensor([i for i in range(min(int(vocab), VOCAB)) if i not in special][: max(8, VOCAB - 40)])
    return allowed[torch.randint(0, len(allowed), (batch, seq), generator=gen)]


def _image_size(config) -> tuple[int, int, int]:
    vc = _sub(config, "vision_config", "backbone_config")
    size = getattr(vc, "image_size", None) or getattr(config, "image_size", None) or IMAGE
    if isinstance(size, (list, tuple)):
        h, w = int(size[0]), int(size[-1])
    elif isinstance(size, dict):
        h, w = int(size.get("height", IMAGE)), int(size.get("width", IMAGE))
    else:
        h = w = int(size)
    return int(getattr(vc, "num_channels", None) or 3), h, w


def _image_token_id(config) -> int | None:
    for k in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        v = getattr(config, k, None)
        if _is_int(v):
            return v
    return None


def _count_image_tokens(model: nn.Module, pixel_values: torch.Tensor, extra: dict | None = None) -> int | None:
    """How many image-token positions the language model expects for these pixels (from the vision features)."""
    get = getattr(model, "get_image_features", None) or getattr(model, "get_video_features", None)
    if get is None:
        return None
    try:
        with torch.no_grad():
            feats = get(pixel_values=pixel_values, **(extra or {}))
    except Exception:  # noqa: BLE001 - a composite we cannot introspect: the caller falls back to text only
        return None
    if hasattr(feats, "pooler_output") and feats.pooler_output is not None:
        feats = feats.pooler_output
    elif hasattr(feats, "to_tuple"):
        feats = feats.to_tuple()[0]
    tensors = list(feats) if isinstance(feats, (list, tuple)) else [feats]
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    images = len(extra["image_grid_thw"]) if extra and "image_grid_thw" in extra else pixel_values.shape[0]
    return sum(int(t.reshape(-1, t.shape[-1]).shape[0]) for t in tensors) // images


def _audio_features(config, batch: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Log-mel features: [batch, mel, 2·max_source_positions] (Whisper's encoder insists on that length), or
    [batch, frames, features] for Speech2Text-style encoders (``input_feat_per_channel``)."""
    ac = _sub(config, "audio_config", "encoder_config")
    per_channel = getattr(ac, "input_feat_per_channel", None)
    if _is_int(per_channel):
        feats = per_channel * int(getattr(ac, "input_channels", None) or 1)
        return torch.randn(batch, 64, feats, generator=gen, dtype=dtype)
    stacked = getattr(ac, "feature_projection_input_dim", None)
    if _is_int(stacked):  # stacked frames projected in (w2v-BERT): [batch, frames, that width]
        return torch.randn(batch, 64, stacked, generator=gen, dtype=dtype)
    bins = int(getattr(ac, "num_mel_bins", None) or getattr(ac, "feature_size", None) or 80)
    window = getattr(ac, "n_window", None)
    if _is_int(window) and window > 0:  # windowed encoders (Qwen3-ASR): frames a whole number of 2·n_window chunks
        return torch.randn(batch, bins, 2 * window, generator=gen, dtype=dtype)
    if not _is_int(getattr(ac, "max_source_positions", None)):  # conformer-style encoders: [batch, time, mel]
        return torch.randn(batch, 64, bins, generator=gen, dtype=dtype)
    frames = 2 * int(ac.max_source_positions)
    return torch.randn(batch, bins, frames, generator=gen, dtype=dtype)


@torch.no_grad()
def probe_inputs(model: nn.Module, config=None, *, batch: int = 2, seq_len: int = 16, seed: int = 0) -> dict:
    """Inputs for every main input the model takes: ids, pixels, audio features/samples, decoder ids, VLM prompts.

    Token ids avoid special ids (an image token without an image is an error in a VLM); a VLM prompt gets as many
    image tokens as its vision tower yields, so the tower is exercised; MAE-style random masking gets fixed noise so
    two runs see the same tokens.
    """
    config = config if config is not None else model.config
    gen = torch.Generator().manual_seed(seed)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    params = _forward_params(model)
    main = getattr(model, "main_input_name", "input_ids")
    probes: dict[str, torch.Tensor] = {}
    if main == "input_features" or (main not in params and "input_features" in params):
        probes["input_features"] = _audio_features(config, batch, gen, dtype)
    elif main == "input_values":
        ac = _sub(config, "audio_config")
        bins, length = getattr(ac, "num_mel_bins", None), getattr(ac, "max_length", None)
        if _is_int(bins) and _is_int(length):  # a spectrogram (AST): [batch, time, mel]
            probes["input_values"] = torch.randn(batch, length, bins, generator=gen, dtype=dtype)
        elif _is_int(getattr(ac, "audio_channels", None)):  # codecs (EnCodec): [batch, channels, samples]
            probes["input_values"] = torch.randn(batch, ac.audio_channels, 4000, generator=gen, dtype=dtype)
        else:  # raw samples (wav2vec2, HuBERT): 4000 samples = 12 frames after a 320x conv stem
            probes["input_values"] = torch.randn(batch, 4000, generator=gen, dtype=dtype)
    grid_key = next((k for k in ("image_grid_thw", "grid_thw") if k in params), None)
    pixel_key = next((k for k in ("pixel_values", "pixel_values_videos") if k in params),
                     "hidden_states" if grid_key == "grid_thw" and "hidden_states" in params else None)
    if main in ("pixel_values", "pixel_values_videos") and main not in params:
        pixel_key = main
    if pixel_key is not None:
        c, h, w = _image_size(config)
        frames = num_frames(config)
        if grid_key is not None:  # Qwen2-VL style: flattened patches of every image + each image's (t, h, w)
            probes[pixel_key], probes[grid_key] = grid_patches(config, batch, gen, dtype)
            if "merge_sizes" in params:
                merge = int(getattr(_sub(config, "vision_config"), "spatial_merge_size", 2) or 1)
                probes["merge_sizes"] = torch.full((batch,), merge, dtype=torch.long)
        elif "spatial_shapes" in params:  # NaFlex (SigLIP2): pre-patchified pixels with a mask and a grid shape
            patch = getattr(_sub(config, "vision_config"), "patch_size", PATCH)
            gh, gw = h // patch, w // patch
            probes[pixel_key] = torch.randn(batch, gh * gw, c * patch * patch, generator=gen, dtype=dtype)
            probes["pixel_attention_mask"] = torch.ones(batch, gh * gw, dtype=torch.long)
            probes["spatial_shapes"] = torch.tensor([[gh, gw]] * batch)
        elif frames is not None and (pixel_key == "pixel_values_videos" or _image_token_id(config) is None):
            probes[pixel_key] = torch.randn(batch, frames, c, h, w, generator=gen, dtype=dtype)  # a video clip
        else:
            probes[pixel_key] = torch.randn(batch, c, h, w, generator=gen, dtype=dtype)
    named = {n for n, p in forward_params(model).items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if "input_ids" in params or (main == "input_ids" and not named - {"self"}):
        ids = _text_ids(config, batch, seq_len, gen)
        image_token = _image_token_id(config)
        if image_token is not None and "pixel_values" in probes:
            extra = {k: probes[k] for k in ("image_grid_thw",) if k in probes}
            n = _count_image_tokens(model, probes["pixel_values"], extra)
            if not n and probes["pixel_values"].dim() == 4:  # one image (or frame) per sample: [batch, 1, C, H, W]
                n = _count_image_tokens(model, probes["pixel_values"][:, None], extra)
                if n:
                    probes["pixel_values"] = probes["pixel_values"][:, None]
            if n:
                ids = torch.cat([ids[:, :2], torch.full((batch, n), image_token), ids[:, 2:]], dim=1)
            elif "pixel_values" not in required_params(model):
                for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes", "image_grid_thw"):
                    probes.pop(k, None)
        probes["input_ids"] = ids
        if "mm_token_type_ids" in params and "image_grid_thw" in probes:  # M-RoPE: which positions are image
            probes["mm_token_type_ids"] = (ids == image_token).long()
    if "decoder_input_ids" in params and "decoder_input_ids" not in probes and getattr(config, "is_encoder_decoder", False):
        probes["decoder_input_ids"] = _text_ids(config, batch, max(4, seq_len // 2), gen)
    if "noise" in params and "pixel_values" in probes and hasattr(config, "mask_ratio"):
        _, h, w = _image_size(config)
        patch = getattr(config, "patch_size", PATCH)
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        probes["noise"] = torch.rand(batch, (h // patch) * (w // patch), generator=gen, dtype=dtype)
    probes.update(named_probes(model, config, probes, batch=batch, seq_len=seq_len, gen=gen, dtype=dtype))
    embedded = embedding_layouts(model, config, probes, batch=batch, seq_len=seq_len, gen=gen, dtype=dtype)
    candidates = [{**probes, **e} for e in embedded] or [probes]
    others = alternatives(candidates[0], config, params)
    return first_runnable(model, [*candidates, *others]) if len(candidates) + len(others) > 1 else probes
