"""Make an output folder loadable by plain transformers with RMSNorm modules: modeling file + ``config.json`` patch.

Exact conversions keep the stock ``model_type`` and ``architectures``, so loading without ``trust_remote_code`` still
gives the stock class (LayerNorm on a centred stream: the same function). Outputs that are only correct with RMSNorm
(approximate or fine-tuned) get ``model_type: normswap_<stock>`` and ``Normswap<Arch>`` architectures, which
transformers resolves only through ``auto_map`` and the shipped code, so the Auto classes refuse loudly instead of
computing something else; a guard sub-config (see :func:`_guard`) makes a stock class called directly refuse too.
``normswap.load`` reads every output through :func:`load_output_config`, which restores the stock names.
"""

from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources
from pathlib import Path

import transformers

from normswap.errors import CheckpointError

MODELING_FILE = "modeling_normswap.py"
CLASS_PREFIX = "Normswap"
MODEL_TYPE_PREFIX = "normswap_"
#: config.json key of the sub-config that makes a direct stock-class load of a remote-only output fail (see _guard).
GUARD_KEY = "normswap_requires_rmsnorm"
GUARD_MESSAGE = ("normswap: these weights are only correct with RMSNorm; load them with "
                 "AutoModel...from_pretrained(path, trust_remote_code=True) or normswap.load(path)")

#: Auto classes a user may load an output with, and the transformers mapping that names their stock class.
AUTO_CLASSES: tuple[tuple[str, str], ...] = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("AutoModelForMultipleChoice", "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)


def template_text() -> str:
    """The self-contained part of the modeling file (shipped as package data)."""
    return resources.files("normswap.publish").joinpath(MODELING_FILE).read_text(encoding="utf-8")


def requires_remote_code(meta: dict) -> bool:
    """Whether the weights are only correct with RMSNorm, so the stock (LayerNorm) class must not load them.

    Exact conversions are LayerNorm-equivalent. Approximate ones are not, and neither is a fine-tuned model unless its
    training kept the stream centred (``finetune.keep_centered``).
    """
    if meta.get("mode", "exact") != "exact":
        return True
    finetune = meta.get("finetune")
    if finetune:
        return not (isinstance(finetune, dict) and finetune.get("keep_centered") is True)
    return False


def stock_identity(config: dict) -> tuple[str, list[str]]:
    """The stock ``model_type`` and ``architectures`` behind a config that may already carry the normswap names."""
    recorded = (config.get("normswap") or {}).get("remote_code") or {}
    model_type = recorded.get("stock_model_type") or config.get("model_type", "")
    architectures = recorded.get("stock_architectures") or config.get("architectures") or []
    model_type = model_type.removeprefix(MODEL_TYPE_PREFIX)
    architectures = [a.removeprefix(CLASS_PREFIX) if not hasattr(transformers, a) else a for a in architectures]
    return model_type, architectures


def _mapped_class(mapping_name: str, model_type: str, prefer: list[str]) -> str | None:
    from transformers.models.auto import modeling_auto

    value = getattr(modeling_auto, mapping_name, {}).get(model_type)
    if value is None:
        return None
    names = [value] if isinstance(value, str) else list(value)
    chosen = next((n for n in names if n in prefer), names[0])
    return chosen if hasattr(transformers, chosen) else None


def auto_classes_for(model_type: str, architectures: list[str]) -> dict[str, str]:
    """``{auto class: stock class}`` for every auto class transformers maps ``model_type`` to."""
    found = {}
    for auto, mapping_name in AUTO_CLASSES:
        stock = _mapped_class(mapping_name, model_type, architectures)
        if stock is not None:
            found[auto] = stock
    return found


def primary_auto_class(model_type: str, architectures: list[str]) -> str | None:
    """The auto class that loads the saved architecture itself (first match in :data:`AUTO_CLASSES` order)."""
    for auto, stock in auto_classes_for(model_type, architectures).items():
        if stock in architectures:
            return auto
    return None


def config_class_name(model_type: str) -> str:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    name = CONFIG_MAPPING_NAMES.get(model_type)
    if name is None or not hasattr(transformers, name):
        raise CheckpointError(f"transformers has no config class for model type {model_type!r}")
    return name


def _guard(model_type: str, config: dict) -> dict | None:
    """A sub-config that stops ``<StockClass>.from_pretrained(path)`` from silently loading LayerNorm.

    Auto classes refuse a ``normswap_<type>`` config without remote code, but a stock class called directly only warns
    about the model type and then, looking for a sub-dict whose ``model_type`` is its own, builds its config from that.
    This sub-dict is the last such one (keys are sorted) and holds a message where an int field belongs, so the
    stock config's strict validation raises with the message; the Auto path and the remote code never read it.
    """
    try:
        config_cls = transformers.CONFIG_MAPPING[model_type]
    except KeyError:
        return None
    if not dataclasses.is_dataclass(config_cls):
        return None
    for field in dataclasses.fields(config_cls):
        if field.type in (int, "int") and isinstance(config.get(field.name), int):
            return {"model_type": model_type, field.name: GUARD_MESSAGE}
    return None


def render_modeling_file(model_type: str, stock_classes: list[str], remote_only: bool, version: str) -> str:
    """Template + one small subclass per stock class (+ a config class with its own model_type if ``remote_only``)."""
    lines = [
        f"# normswap {version}: stock model type {json.dumps(model_type)}; "
        + ("only correct with RMSNorm, so the config names its own model type."
           if remote_only else "exact conversion: the stock classes load it too."),
    ]
    config_cls = None
    if remote_only:
        stock_config = config_class_name(model_type)
        config_cls = CLASS_PREFIX + stock_config
        lines += ["", "", f"class {config_cls}(transformers.{stock_config}):",
                  f"    model_type = {json.dumps(MODEL_TYPE_PREFIX + model_type)}"]
    classes = {}
    for stock in dict.fromkeys(stock_classes):
        custom = CLASS_PREFIX + stock
        classes[custom] = stock
        lines += ["", "", f"class {custom}(NormswapMixin, transformers.{stock}):"]
        lines.append(f"    config_class = {config_cls}" if config_cls else "    pass")
    custom_type = json.dumps(MODEL_TYPE_PREFIX + model_type) if remote_only else "None"
    lines += ["", "", f"share_weight_conversions({json.dumps(model_type)}, {json.dumps(classes)}, {custom_type})", ""]
    return template_text().rstrip("\n") + "\n" + "\n".join(lines)


def patch_config(config: dict, version: str) -> tuple[dict, str]:
    """Return ``config`` with ``auto_map`` (and, when needed, the normswap model type) set, plus the modeling source.

    Entries of an existing ``auto_map`` that are not model classes (a tokenizer's, say) are kept.
    """
    meta = config.get("normswap")
    if not isinstance(meta, dict):
        raise CheckpointError("config.json has no 'normswap' metadata: this is not a normswap output")
    model_type, architectures = stock_identity(config)
    remote_only = requires_remote_code(meta)
    autos = auto_classes_for(model_type, architectures)
    extra = [a for a in architectures if a not in autos.values() and hasattr(transformers, a)]
    stock_classes = [*autos.values(), *extra]
    if not stock_classes:
        raise CheckpointError(f"transformers has no model class for model type {model_type!r}")
    source = render_modeling_file(model_type, stock_classes, remote_only, version)
    if isinstance(meta.get("removal"), dict):  # --to none|dyt: the replacement modules (normswap.removal)
        from normswap.removal.remote import with_removal_code

        source = with_removal_code(source, template_text())

    module = MODELING_FILE.removesuffix(".py")
    auto_map = {k: v for k, v in (config.get("auto_map") or {}).items()
                if not (k == "AutoConfig" or k.startswith("AutoModel"))}
    if remote_only:
        auto_map["AutoConfig"] = f"{module}.{CLASS_PREFIX}{config_class_name(model_type)}"
    auto_map.update({auto: f"{module}.{CLASS_PREFIX}{stock}" for auto, stock in autos.items()})

    patched = dict(config)
    patched.pop(GUARD_KEY, None)
    guard = _guard(model_type, config) if remote_only else None
    if guard:
        patched[GUARD_KEY] = guard
    patched["auto_map"] = auto_map
    patched["model_type"] = MODEL_TYPE_PREFIX + model_type if remote_only else model_type
    patched["architectures"] = [CLASS_PREFIX + a if remote_only else a for a in architectures]
    patched["normswap"] = {**meta, "remote_code": {
        "file": MODELING_FILE, "stock_model_type": model_type, "stock_architectures": architectures,
        "required": remote_only,
    }}
    return patched, source


def write_remote_code(out_dir: str | os.PathLike, version: str) -> dict:
    """Write the modeling file into ``out_dir`` and patch its ``config.json``; returns the patched config."""
    out = Path(out_dir)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    patched, source = patch_config(config, version)
    (out / MODELING_FILE).write_text(source, encoding="utf-8")
    config_path.write_text(json.dumps(patched, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return patched


def load_output_config(path: str | os.PathLike) -> transformers.PretrainedConfig:
    """The stock config of a normswap output (local folder or hub id), whatever names it carries for remote code.

    ``normswap.load`` builds the stock class and swaps norms itself, so the ``normswap_<type>`` model type and the
    ``auto_map`` (which would point a later plain ``save_pretrained`` at a modeling file it does not write) are
    dropped here.
    """
    from transformers.utils import cached_file

    config_file = cached_file(str(path), "config.json")
    with open(config_file, encoding="utf-8") as fh:
        data = json.load(fh)
    model_type, architectures = stock_identity(data)
    data["model_type"] = model_type
    if architectures:
        data["architectures"] = architectures
    data.pop("auto_map", None)
    data.pop(GUARD_KEY, None)
    try:
        config_cls = transformers.CONFIG_MAPPING[model_type]
    except KeyError:
        raise CheckpointError(f"{path}: transformers does not know model type {model_type!r}") from None
    config = config_cls.from_dict(data)
    config._name_or_path = str(path)
    return config
