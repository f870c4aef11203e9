"""Small random instances of any transformers architecture, built from its config alone.

Discovery and the coverage census measure *structure* (which modules write the residual stream, which norms read
it), and structure does not depend on width or depth: a 70B config and a 2-layer, 64-wide copy of it wire their
modules the same way. So we shrink the config (every nested sub-config too) while keeping the divisibility rules the
modelling code checks (heads × head_dim = hidden, kv heads dividing heads, one layer-type entry per layer, patch
grids that fit the image), build the model on CPU in float64, and perturb it so that an uncentred writer or a
misplaced norm shows up as a large difference instead of hiding behind a near-identity init.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from normswap.discovery.model_class import default_model_class
from normswap.discovery.probes import IMAGE, PATCH, VOCAB, _is_int, _special_ids, probe_inputs
from normswap.discovery.size_caps import cap_sizes
from normswap.discovery.stage_widths import shrink_head_widths, shrink_stage_widths, uniform_width_stages
from normswap.discovery.taps import backbone_taps, follow_widths, retap, stages_to_keep

__all__ = ["IMAGE", "PATCH", "VOCAB", "default_model_class", "perturb_", "probe_inputs", "tiny_config",
           "tiny_instance"]

#: Target sizes of the small instance.
HIDDEN = 64
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 96
LAYERS = 2
EXPERTS = 4

_LAYER_KEYS = (
    "num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
    "num_encoder_layers", "num_decoder_layers", "vision_layers", "text_layers", "depth", "n_layers_text",
    "num_text_layers", "num_vision_layers", "encoder_num_layers", "decoder_num_layers", "num_blocks", "layers",
    "pred_num_hidden_layers",  # V-JEPA 2's predictor: a second transformer with its own sizes
    "num_self_attends_per_block",  # Perceiver's latent transformer
    "l_layers", "x_layers", "r_layers",  # LXMERT: language, cross-modality and vision (region) encoders
)
_HIDDEN_KEYS = (
    "hidden_size", "d_model", "n_embd", "embed_dim", "dim", "hidden_dim", "width", "model_dim", "d_embed",
    "encoder_hidden_size", "decoder_hidden_size", "text_embed_dim", "vision_embed_dim", "embedding_size",
    "word_embed_proj_dim", "projection_dim", "proj_dim", "emb_dim", "pred_hidden_size",
    "d_latents",
)
_HEAD_KEYS = (
    "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads", "decoder_attention_heads",
    "n_heads", "attention_heads", "encoder_num_attention_heads", "decoder_num_attention_heads", "linear_num_heads",
    "pred_num_attention_heads",
)
_KV_KEYS = ("num_key_value_heads", "n_head_kv", "num_kv_heads", "n_kv_heads", "multi_query_group_num",
            "num_key_value_groups", "encoder_num_key_value_heads", "decoder_num_key_value_heads")
_HEAD_DIM_KEYS = ("head_dim", "attention_head_dim", "kv_channels", "d_kv", "attention_head_size", "qk_head_dim",
                  "linear_head_dim", "d_head", "dim_head")
#: Widths a sub-config holds of *another* tower (the text model a vision merger projects to, the backbone a head reads):
#: every tower is shrunk to HIDDEN, so these are too (cross-config validations check that they match).
_PEER_WIDTH_KEYS = ("out_hidden_size", "text_hidden_size", "audio_hidden_size", "condition_dim")
_FFN_KEYS = (
    "intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner", "d_ff", "mlp_dim",
    "inner_dim", "moe_intermediate_size", "shared_expert_intermediate_size", "intermediate_size_mlp",
    "ffn_hidden_size", "decoder_intermediate_size", "encoder_intermediate_size", "d_inner", "dim_feedforward",
    "encoder_ffn_embed_dim", "decoder_ffn_embed_dim", "expert_intermediate_size", "ff_dim", "projection_intermediate_dim",
    "moe_shared_expert_intermediate_size",
)
_VOCAB_KEYS = ("vocab_size", "n_vocab", "text_vocab_size", "entity_vocab_size")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_total")
_TOPK_KEYS = ("num_experts_per_tok", "moe_top_k", "top_k", "moe_topk", "num_selected_experts")
_STAGE_KEYS = ("num_stages", "num_encoder_blocks")


def _pick_layers(values: list, n: int) -> list:
    """``n`` entries of a per-layer list that keep its variety: the first, then the first of each new kind."""
    picked = [0]
    for i, v in enumerate(values):
        if len(picked) >= n:
            break
        if i not in picked and all(v != values[j] for j in picked):
            picked.append(i)
    i = 0
    while len(picked) < n and i < len(values):
        if i not in picked:
            picked.append(i)
        i += 1
    return [values[i] for i in sorted(picked)]


def _shrink_stages(d: dict, keep: int = 2) -> None:
    """Hierarchical backbones (Swin, PVT, SegFormer, ConvNeXt): two stages (or one per tap), one block each."""
    depths = d.get("depths")
    if not (isinstance(depths, list) and depths and all(_is_int(x) for x in depths)):
        return
    n_old, n_new = len(depths), min(len(depths), keep)
    for k, v in list(d.items()):
        if isinstance(v, list) and len(v) == n_old and k != "depths" and k not in ("out_features", "out_indices"):
            d[k] = v[:n_new]
    d["depths"] = [min(x, 1) if x else x for x in depths[:n_new]]
    for k in _STAGE_KEYS:
        if _is_int(d.get(k)):
            d[k] = n_new
    if _is_int(d.get("num_query_pool")):  # Hiera: pooling between stages, fewer than the stages
        d["num_query_pool"] = min(d["num_query_pool"], n_new - 1)
    for k in ("num_heads", "num_attention_heads"):
        if isinstance(d.get(k), list):
            d[k] = [2 * 2**i for i in range(n_new)]
    if isinstance(d.get("hidden_sizes"), list):
        old = d["hidden_sizes"]
        base = max(32, 4 * d["num_groups"]) if _is_int(d.get("num_groups")) else 32  # GroupNorm + bottlenecks
        d["hidden_sizes"] = [base * 2**i for i in range(len(old))]
        factor = old[-1] // d["hidden_sizes"][-1] if old and _is_int(old[-1]) else 1
        for k, v in list(d.items()):  # explicit stage/stem channel lists (HGNetV2) narrow by the same factor
            if factor > 1 and k.startswith(("stage_", "stem_")) and k.endswith("channels") and isinstance(v, list) \
                    and all(_is_int(x) for x in v):
                d[k] = [x if (k.startswith("stem_") and i == 0) else max(1, x // factor) for i, x in enumerate(v)]
    if _is_int(d.get("embed_dim")):
        d["embed_dim"] = 16
    if isinstance(d.get("embed_dim"), list):
        d["embed_dim"] = [16 * 2**i for i in range(len(d["embed_dim"]))]


def _shrink_one(d: dict, remap: dict[int, int], level: int = 2) -> None:
    """Shrink one (flat) config dict in place; nested sub-config dicts are handled by the caller."""
    layer_olds = {d[k] for k in _LAYER_KEYS if _is_int(d.get(k)) and d[k] > 0}
    taps = backbone_taps(d)
    keep = stages_to_keep(d, taps, LAYERS)
    for k in _LAYER_KEYS:
        if _is_int(d.get(k)) and d[k] > keep:
            d[k] = keep
    # Per-layer lists (layer_types, attention_layers, block patterns): one entry per kept layer.
    for k, v in list(d.items()):
        if isinstance(v, list) and len(v) in layer_olds and len(v) > LAYERS and k != "depths" \
                and not all(isinstance(x, (dict, list)) for x in v):
            d[k] = _pick_layers(v, LAYERS)
    if not layer_olds:  # the layer count is only the length of a per-layer kind list (Nemotron-H layers_block_type)
        for k, v in list(d.items()):
            if isinstance(k, str) and k.endswith(("layer_types", "layers_block_type")) and isinstance(v, list) \
                    and v and all(isinstance(x, str) for x in v) and len(v) > LAYERS:
                d[k] = _pick_layers(v, max(LAYERS, len(set(v))))
    if "attention_types" in d and isinstance(d["attention_types"], list):  # GPT-Neo: [[[kinds], repeat]]
        kinds = sorted({kind for group in d["attention_types"] for kind in group[0]})
        d["attention_types"] = [[kinds, 1]] if len(kinds) == LAYERS else [[kinds, LAYERS // max(len(kinds), 1)]]
        d.pop("attention_layers", None)
    stages = isinstance(d.get("depths"), list)
    if layer_olds or stages:  # backbone stage selections name the old layers: renumbered onto the kept ones
        retap(d, taps, min(keep, len(d["depths"])) if stages else min(keep, max(layer_olds)))
    if stages:
        _shrink_stages(d, keep)

    heads_old = next((d[k] for k in _HEAD_KEYS if _is_int(d.get(k)) and d[k] > 0), None)
    for k in _HEAD_KEYS:
        if _is_int(d.get(k)) and d[k] > 0:
            d[k] = HEADS
    for k in _KV_KEYS:
        v = d.get(k)
        if _is_int(v) and v > 0:
            d[k] = 1 if v == 1 else (HEADS if heads_old is not None and v >= heads_old else 2)
    for k in _HEAD_DIM_KEYS:
        if _is_int(d.get(k)) and d[k] > 0:
            d[k] = HEAD_DIM
    if "head_dim" in d and d["head_dim"] is None and heads_old is not None:  # "derive it" = hidden / heads anyway
        d["head_dim"] = HEAD_DIM
    for k, v in list(d.items()):  # per-layer overrides keyed by layer index (Gemma 4 per_layer_config)
        if isinstance(v, dict) and k.startswith("per_layer") and v and all(str(i).isdigit() for i in v):
            d[k] = {i: c for i, c in v.items() if int(i) < LAYERS}
    for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):  # MLA (DeepSeek)
        if _is_int(d.get(k)) and d[k] > 0:
            d[k] = HEAD_DIM
    for k in ("q_lora_rank", "kv_lora_rank"):
        if _is_int(d.get(k)) and d[k] > 0:
            d[k] = 32
    if _is_int(d.get("rotary_dim")):
        d["rotary_dim"] = min(d["rotary_dim"], HEAD_DIM // 2)
    shrink_stage_widths(d, _LAYER_KEYS, HIDDEN)
    shrink_head_widths(d)
    if not stages or uniform_width_stages(d):
        hidden_old = next((d[k] for k in _HIDDEN_KEYS if _is_int(d.get(k)) and d[k] > HIDDEN), None)
        for k in _HIDDEN_KEYS:
            if _is_int(d.get(k)) and d[k] > HIDDEN:
                d[k] = HIDDEN
        if hidden_old is not None:  # other widths tied to the hidden size (projection_size, text_hidden_size ...)
            for k, v in list(d.items()):
                if isinstance(k, str) and ("size" in k or "dim" in k or "channels" in k or k.endswith("groups")) \
                        and not any(w in k for w in ("vocab", "position", "image", "patch", "max_", "seq")):
                    if v == hidden_old and _is_int(v) and "channels" not in k:
                        d[k] = HIDDEN
                    elif isinstance(v, list) and v and all(x == hidden_old and _is_int(x) for x in v):
                        d[k] = [HIDDEN] * len(v)  # one width per level, all the model width (decoder_in_channels)
                    elif isinstance(v, list) and len(v) > 1 and all(_is_int(x) for x in v) and sum(v) == hidden_old:
                        d[k] = [x * HIDDEN // hidden_old for x in v]  # parts of the width (Reformer's axial dims)
                        d[k][-1] += HIDDEN - sum(d[k])
    for k in _PEER_WIDTH_KEYS:
        if _is_int(d.get(k)) and d[k] > HIDDEN:
            d[k] = HIDDEN
    for k in _FFN_KEYS:
        if _is_int(d.get(k)) and d[k] > INTERMEDIATE:
            d[k] = INTERMEDIATE
    for k in _EXPERT_KEYS:
        if _is_int(d.get(k)) and d[k] > EXPERTS:
            d[k] = EXPERTS
    for k in _TOPK_KEYS:
        if _is_int(d.get(k)) and d[k] > 2:
            d[k] = 2
    for k in ("n_group", "topk_group"):
        if _is_int(d.get(k)) and d[k] > 1:
            d[k] = 1
    for k in ("n_shared_experts", "num_shared_experts"):
        if _is_int(d.get(k)) and d[k] > 1:
            d[k] = 1
    cap_sizes(d)
    for k in ("use_pretrained_backbone", "use_timm_backbone"):  # no weights may be fetched
        if d.get(k) is True:
            d[k] = False
    if level >= 2:
        _shrink_vocab(d, remap)
    if level >= 1:
        _shrink_vision(d)
        _shrink_rope(d)


def _shrink_vocab(d: dict, remap: dict[int, int]) -> None:
    """A small vocab that still holds every special token id (ids above it are moved down, each to its own id).

    ``remap`` is shared by the whole config tree, so an image token id on a composite's top level and the same id in
    its text sub-config land on the same new id.
    """
    for k, v in _special_ids(d):
        ids = v if isinstance(v, list) else [v]
        new = []
        for x in ids:
            if x >= VOCAB - 32:  # keep the low range free for ordinary probe tokens
                if x not in remap:
                    remap[x] = VOCAB - 1 - len(remap)
                x = remap[x]
            new.append(x)
        d[k] = new if isinstance(v, list) else new[0]
    for k in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        # a VLM whose default config leaves its image (or video) placeholder id unset
        if k in d and d[k] is None and any(_is_config_dict(v) and "vision" in str(n) for n, v in d.items()):
            d[k] = remap.setdefault(-1, VOCAB - 1 - len(remap))
    for k in _VOCAB_KEYS:
        if _is_int(d.get(k)) and d[k] > VOCAB:
            d[k] = VOCAB


def _shrink_vision(d: dict) -> None:
    """Image and patch sizes that still tile each other (32-pixel images of 8-pixel patches: a 4×4 grid)."""
    img, patch = d.get("image_size"), d.get("patch_size")
    if _is_int(img) and img > IMAGE:
        d["image_size"] = IMAGE
        if _is_int(patch) and patch > 2:
            d["patch_size"] = min(patch, PATCH) if IMAGE % min(patch, PATCH) == 0 else 4
    elif isinstance(img, list) and len(img) == 2 and all(_is_int(x) for x in img) and max(img) > IMAGE:
        d["image_size"] = [IMAGE, IMAGE]
        if isinstance(patch, list):
            d["patch_size"] = [PATCH, PATCH]
        elif _is_int(patch) and patch > 2:
            d["patch_size"] = min(patch, PATCH)
    for k in ("vision_feature_layer", "vision_feature_layers", "deepstack_visual_indexes"):  # layer indices
        v = d.get(k)
        top = LAYERS - 1 if k == "deepstack_visual_indexes" else LAYERS
        fix = (lambda i, top=top: max(i, -(LAYERS + 1)) if i < 0 else min(i, top))  # noqa: E731
        if _is_int(v):
            d[k] = fix(v)
        elif isinstance(v, list) and all(_is_int(i) for i in v):
            d[k] = [fix(i) for i in v]
    if isinstance(d.get("patch_to_query_dict"), dict):  # Aria: queries per number of patches of the image
        d["patch_to_query_dict"] = {(IMAGE // PATCH) ** 2: 4}
    if _is_int(d.get("mm_tokens_per_image")) and d["mm_tokens_per_image"] > 4:  # Gemma 3: pooled to 2×2 tokens
        d["mm_tokens_per_image"] = 4
    if _is_int(d.get("window_size")) and d["window_size"] > 4 and "depths" in d:
        d["window_size"] = 4


#: Model types whose modelling code defaults to a multimodal-RoPE split of head_dim/2 (checked in transformers 5.24).
_MROPE_TYPES = ("cohere_compass", "cosmos3_edge", "ernie4_5_vl", "glm4v", "glm_image", "glm_ocr", "hunyuan_vl",
                "hy_v4_vl", "paddleocr_vl", "qwen2_5_omni", "qwen2_5_vl", "qwen2_vl", "qwen3_5", "qwen3_omni",
                "qwen3_vl", "qwen4_exp")


def _shrink_rope(d: dict) -> None:
    """Multimodal RoPE splits head_dim/2 into sections (Qwen2-VL: [16, 24, 24]); scale them to the new head dim."""
    rope = d.get("rope_parameters") or d.get("rope_scaling")
    if not isinstance(rope, dict):
        return
    section = rope.get("mrope_section")
    if section is None and str(d.get("model_type", "")).startswith(_MROPE_TYPES):
        section = [16, 24, 24]  # the modelling code's default, in the proportions it is scaled from
    if isinstance(section, list) and section and all(_is_int(x) for x in section):
        half, total = HEAD_DIM // 2, sum(section)
        new = [max(1, x * half // total) for x in section]
        new[-1] += half - sum(new)
        rope["mrope_section"] = new


def _is_config_dict(v: Any) -> bool:
    return isinstance(v, dict) and ("model_type" in v or "architectures" in v or "hidden_size" in v)


def _shrink_tree(d: dict, remap: dict[int, int], level: int) -> None:
    _shrink_one(d, remap, level)
    for v in d.values():
        if _is_config_dict(v):
            old = copy.deepcopy(v)
            _shrink_tree(v, remap, level)
            follow_widths(d, old, v)


def tiny_config(config, *, level: int = 2):
    """A small copy of ``config`` (a ``PreTrainedConfig``) with the same structure: 2 layers, hidden ≈ 64.

    The copy is rebuilt through the config class so that derived fields (per-layer lists, head dims) are recomputed
    and its own validation runs; nested sub-configs (text/vision/audio, encoder/decoder) are shrunk the same way.
    ``level`` 2 shrinks everything; 1 keeps the vocabulary and token ids (some models tie token-id *ranges* to the
    vocab in fields we cannot know); 0 also keeps image/patch sizes and RoPE sections: only depth and width shrink.
    """
    d = copy.deepcopy(config.to_dict())
    _shrink_tree(d, {}, level)
    d.pop("transformers_version", None)
    d.pop("_name_or_path", None)
    d["architectures"] = None
    small = type(config).from_dict(d)
    small._experts_implementation = "eager"  # grouped_mm has no float64 kernel; the eager loop is the same maths
    return small


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() and not any(True for _ in module.children())


def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Norm gains/biases far from 1/0, every other parameter given a nonzero mean (as tests/tiny_models.py does).

    A norm is recognised here by its class name only because this is perturbation, not classification: a norm we
    miss still gets a random nonzero-mean offset, which is just as good for exposing bugs.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = _is_norm(module)
            for name, p in module.named_parameters(recurse=False):
                if not p.is_floating_point():
                    continue
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
                if is_norm and name == "weight":
                    p.copy_(1.0 + 0.3 * noise)
                elif is_norm and name == "bias":
                    p.copy_(0.1 + 0.2 * noise)
                else:
                    p.add_(0.03 * noise + 0.02)
            if is_norm:
                for name, b in module.named_buffers(recurse=False):
                    if name == "running_mean":
                        b.add_(0.1 * torch.randn(b.shape, generator=gen, dtype=torch.float64).to(b.dtype))
                    elif name == "running_var":
                        b.copy_(1.0 + 0.3 * torch.rand(b.shape, generator=gen, dtype=torch.float64).to(b.dtype))
    return model.eval()


def tiny_instance(model_cls, config, *, seed: int = 0, dtype: torch.dtype = torch.float64,
                  shrink: bool = True) -> nn.Module:
    """Build ``model_cls`` from a small copy of ``config`` on CPU (no downloads, no weights), perturbed, in eval mode.

    ``model_cls`` may be a concrete class (``CLIPModel``) or an auto class (``AutoModelForCausalLM``).
    """
    first_error: Exception | None = None
    for level in (2, 1, 0) if shrink else (None,):
        try:
            cfg = tiny_config(config, level=level) if level is not None else copy.deepcopy(config)
            model = _build(model_cls, cfg, seed, dtype)
        except Exception as exc:  # noqa: BLE001 - a milder shrink may satisfy the modelling code's own checks
            first_error = first_error or exc
            continue
        return perturb_(model, seed)
    assert first_error is not None
    raise first_error


def _build(model_cls, cfg, seed: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if hasattr(model_cls, "_from_config"):
            model = model_cls._from_config(cfg, dtype=dtype)
        else:
            model = model_cls.from_config(cfg, dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype=dtype)
