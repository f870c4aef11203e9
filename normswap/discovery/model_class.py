"""The model class a user would most likely load for a config: what the census and discovery build for it."""

from __future__ import annotations

from torch import nn

#: Auto mappings tried in order when picking the class to build for a model type (heads give logits to verify).
_ENC_DEC_ORDER = ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
                  "MODEL_MAPPING_NAMES")
_DEFAULT_ORDER = ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_MAPPING_NAMES")


def default_model_class(config) -> type | None:
    """The class a user would most likely load for this config: LM head for decoders, seq2seq for encoder-decoders,
    masked-LM for encoders, the VLM for image-text models, else the base model; None when transformers has none."""
    import transformers
    from transformers.models.auto import modeling_auto as ma

    mt = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        order: tuple[str, ...] = _ENC_DEC_ORDER
    elif mt in ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        order = ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", *_DEFAULT_ORDER)
    else:
        order = ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", *_DEFAULT_ORDER)
    rest = sorted(n for n in dir(ma) if n.startswith("MODEL_") and n.endswith("_MAPPING_NAMES") and n not in order)
    for mapping in (*order, *rest):
        names = getattr(ma, mapping, {}).get(mt)
        for name in (names,) if isinstance(names, str) else tuple(names or ()):
            cls = getattr(transformers, name, None)
            if cls is not None:
                return cls
    return _class_from_modeling_module(config)


def _class_from_modeling_module(config) -> type | None:
    """Sub-model configs (``align_vision_model``, ``blip_text_model``) have no auto mapping: take the model class of
    their own modeling module whose ``config_class`` is exactly this config's class (a bare ``...Model`` first)."""
    import importlib

    module_name = type(config).__module__.replace(".configuration_", ".modeling_")
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - no modeling module (or it needs an optional dependency)
        return None
    candidates = [obj for obj in vars(module).values()
                  if isinstance(obj, type) and issubclass(obj, nn.Module) and getattr(obj, "config_class", None)
                  is type(config) and not obj.__name__.endswith("PreTrainedModel")]
    candidates.sort(key=lambda c: (not c.__name__.endswith("Model"), len(c.__name__)))
    return candidates[0] if candidates else None
