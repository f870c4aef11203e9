"""Which tensors of a checkpoint file each adapter role names, without building the model.

The adapters describe roles as module paths of the *loaded* model (relative to the base model or to one block). A
file may spell them differently: the base-model prefix can be absent (checkpoints saved from the bare base class,
e.g. the original GPT-2 files), and some names are saved under legacy spellings (GPT-NeoX ``embed_out``, ViT
``encoder.layer.N.attention.output.dense``) that the adapter lists in ``disk_aliases``. :class:`NameMap` turns a
loaded name into the names it may have on disk and a file key into the name the in-memory path would save, and
:func:`plan_streaming` resolves every role the way :func:`normswap.surgery.build_plan` does on a live model, in
the same order, so the metadata both paths write is the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import transformers
from torch import nn

from normswap.adapters import Adapter
from normswap.errors import CheckpointError
from normswap.structure import resolve

#: Stand-in block index used to find how the blocks ModuleList is spelled on disk.
_PROBE_INDEX = "987654321"


def loaded_prefix(model_cls: type, config: object) -> str:
    """The base model's name inside ``model_cls`` plus a dot ('' when ``model_cls`` is the base model itself)."""
    prefix = getattr(model_cls, "base_model_prefix", "") or ""
    try:
        base_cls = transformers.AutoModel._model_mapping[type(config)]
    except (KeyError, AttributeError):
        base_cls = None
    if not prefix or model_cls is base_cls:
        return ""
    return prefix + "."


class NameMap:
    """Loaded-model names <-> file keys <-> the keys the in-memory path would save."""

    def __init__(self, adapter: Adapter, prefix: str, keys: set[str], base_prefix: str = ""):
        self.keys = keys
        self.prefix = prefix
        #: Prefix the file actually uses: '' for a checkpoint saved from the bare base class; the base model's
        #: ``base_prefix`` (e.g. ``gpt_neox.``) for a head checkpoint read as the bare base class (a config without
        #: ``architectures``), which transformers strips on load, as it adds a missing one (its prefix inference).
        if prefix:
            self.file_prefix = prefix if any(k.startswith(prefix) for k in keys) else ""
        else:
            self.file_prefix = base_prefix if base_prefix and any(k.startswith(base_prefix) for k in keys) else ""
        self.aliases = dict(adapter.disk_aliases)
        #: {loaded name: file key} as transformers renames the file's keys on load (see :func:`loaded_names`).
        self.renamed: dict[str, str] = {}
        fragments = sorted(self.aliases, key=len, reverse=True)
        # A fragment matches whole dotted components only, and the substitution is one pass (no cascading).
        self._alias_re = re.compile(r"(?<![^.])(" + "|".join(map(re.escape, fragments)) + r")(?![^.])") if fragments \
            else None

    def _alias(self, name: str) -> str:
        return self._alias_re.sub(lambda m: self.aliases[m.group(1)], name) if self._alias_re else name

    def _split(self, loaded: str) -> tuple[bool, str]:
        if not self.prefix:
            return True, loaded
        if loaded.startswith(self.prefix):
            return True, loaded[len(self.prefix):]
        return False, loaded

    def outside_base(self, file_key: str) -> bool:
        """A key the loaded (bare base) class ignores: it lies outside the base-model prefix the file uses."""
        return not self.prefix and bool(self.file_prefix) and not file_key.startswith(self.file_prefix)

    def candidates(self, loaded: str) -> list[str]:
        """File keys ``loaded`` may be stored under: the aliased (saved) spelling first, then the loaded one."""
        in_base, rest = self._split(loaded)
        pre = self.file_prefix if in_base else ""
        return list(dict.fromkeys([pre + self._alias(rest), pre + rest]))

    def find(self, loaded: str) -> str | None:
        """The file key holding the loaded tensor ``loaded``: transformers' own renaming of the file's keys first
        (:func:`loaded_names`), then the adapter's ``disk_aliases`` and prefix rules."""
        hit = self.renamed.get(loaded)
        if hit is not None and hit in self.keys:
            return hit
        return next((k for k in self.candidates(loaded) if k in self.keys), None)

    def output_key(self, file_key: str) -> str:
        """The key the in-memory path saves for ``file_key`` (adds the base prefix a bare-base file lacks, strips the
        one a head file has when the bare base class loads it)."""
        if self.file_prefix == self.prefix:
            return file_key
        if not self.prefix:
            return file_key.removeprefix(self.file_prefix)
        return self.prefix + file_key

    def loaded_name(self, file_key: str) -> str:
        """Best-effort inverse for reporting (aliases are not undone)."""
        return self.output_key(file_key)

    def block_pattern(self, blocks: str) -> re.Pattern:
        """Regex whose group 1 is the block index of a file key inside the (base-relative) blocks ModuleList."""
        return self.list_pattern(self.prefix + blocks)

    def list_pattern(self, loaded: str) -> re.Pattern:
        """Regex whose group 1 is the block index of a file key inside the ModuleList with full name ``loaded``."""
        probe = self.candidates(f"{loaded}.{_PROBE_INDEX}.x")[0]
        head = probe.split(f".{_PROBE_INDEX}.")[0] if f".{_PROBE_INDEX}." in probe else probe.split(_PROBE_INDEX)[0]
        return re.compile(rf"^{re.escape(head)}\.(\d+)\.")


@dataclass
class PlannedNorm:
    name: str  # loaded-model module name (what ``normswap.load`` swaps)
    exact: bool
    writes_stream: bool


@dataclass
class StreamPlan:
    """Everything the conversion does to one checkpoint, expressed as file keys (plus the names for metadata)."""

    adapter: Adapter
    names: NameMap
    num_layers: int
    centered_writers: list[str] = field(default_factory=list)  # loaded module names, build_plan order
    #: file key -> maths layout of each tensor to centre ("bias" for a writer's bias)
    center: dict[str, str] = field(default_factory=dict)
    #: file key of a centred tensor -> file key of the LayerScale folded into it before centring
    scale_of: dict[str, str] = field(default_factory=dict)
    #: file keys of folded LayerScales: written as ones (their keys stay, so the stock class still loads)
    ones: list[str] = field(default_factory=list)
    #: {loaded module name: "output"|"input"}: re-centred at run time, no weights change (metadata only)
    recentered_writers: dict[str, str] = field(default_factory=dict)
    norms: list[PlannedNorm] = field(default_factory=list)
    norm_keys: list[str] = field(default_factory=list)
    skipped_optional: list[str] = field(default_factory=list)
    not_exact_reasons: list[str] = field(default_factory=list)
    #: (output key, source file key, layout or None) of each tensor tied to another and absent from the file: the
    #: in-memory path unties it into its own copy, centred when it is a writer (M2M100/mBART encoder and decoder
    #: token tables), kept as is otherwise (the LM head).
    tied_copies: list[tuple[str, str, str | None]] = field(default_factory=list)
    #: The config ties the head, so the output config must say it no longer does.
    untie_config: bool = False
    kept_norms: list[str] = field(default_factory=list)
    #: File keys the model class ignores on load (legacy attention-mask buffers, keys outside the base model when
    #: the bare base class loads a head checkpoint): the in-memory path drops them.
    dropped: list[str] = field(default_factory=list)

    @property
    def approximate_norms(self) -> list[str]:
        return [n.name for n in self.norms if not n.exact]

    @property
    def tied_head(self) -> tuple[str, str] | None:
        """(output key, source file key) of the first untied copy that is not a writer (the LM head), if any."""
        return next(((out, src) for out, src, layout in self.tied_copies if layout is None), None)


def _ignored_on_load(model_cls: type, keys: set[str], protected: set[str]) -> list[str]:
    """Keys matching the class's ``_keys_to_ignore_on_load_unexpected``, anchored at dotted components.

    The class patterns are searched unanchored by transformers (only among keys already known to be unexpected),
    so ``attn.bias`` would also hit ``c_attn.bias``; anchoring keeps them to the buffers they were written for.
    """
    patterns = getattr(model_cls, "_keys_to_ignore_on_load_unexpected", None) or []
    if not patterns:
        return []
    regex = re.compile("|".join(rf"(?:(?:^|\.)(?:{p})$)" for p in patterns))
    return sorted(k for k in keys if k not in protected and regex.search(k))


def skeleton(model_cls: type, config: object) -> nn.Module:
    """The model's module tree on the meta device (no memory, no weights): what the resolver reads names from."""
    with torch.device("meta"):
        if isinstance(model_cls, type) and issubclass(model_cls, transformers.PreTrainedModel):
            return model_cls._from_config(config)
        return model_cls.from_config(config)  # an Auto class (config without ``architectures``)


def _tensor_keys(model: nn.Module, names: NameMap, loaded: str, what: str, model_type: str,
                 tied: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(file key, leaf name) of every parameter of module ``loaded`` in the skeleton; each must be in the file,
    or be an absent tie target (``tied``: loaded name -> source file key), returned as ``(None, loaded name)``."""
    module = model.get_submodule(loaded)
    found = []
    for leaf, _ in module.named_parameters(recurse=False):
        key = names.find(f"{loaded}.{leaf}")
        if key is None and tied and f"{loaded}.{leaf}" in tied:
            found.append((None, f"{loaded}.{leaf}"))
            continue
        if key is None:
            raise CheckpointError(
                f"{model_type} checkpoint has no tensor for {what} {loaded}.{leaf} (looked for "
                f"{', '.join(names.candidates(f'{loaded}.{leaf}'))}); the file is incomplete or not a stock save of "
                "this architecture"
            )
        found.append((key, leaf))
    return found


def _absent_ties(config: object, model: nn.Module, names: NameMap, plan: StreamPlan) -> dict[str, str]:
    """{loaded name: source file key} of every tied tensor the file leaves out (saved once, under its source).

    The in-memory path unties them all (``untie_head_``), so each gets its own copy in the output, saved under its
    loaded name (save_pretrained only re-applies legacy spellings it met on load: GPT-NeoX ``lm_head.weight``).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    # the live mapping (every sub-model's ties: mBART's encoder/decoder tables too), else the class-level one
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(type(model), "_tied_weights_keys", None)
    absent: dict[str, str] = {}
    if getattr(text, "tie_word_embeddings", False) and isinstance(tied, dict):
        for target, source in tied.items():
            source_key = names.find(source)
            if source_key is None:
                continue
            plan.untie_config = True
            if names.find(target) is None:
                absent[target] = source_key
    return absent


def loaded_names(model: nn.Module, keys: set[str]) -> dict[str, str]:
    """{loaded name: file key} for the file's keys, renamed the way ``from_pretrained`` renames them for ``model``.

    transformers maps legacy spellings (ViT/DINOv2/BEiT ``attention.attention.query``, ``LayerNorm.gamma``) and a
    missing or extra base-model prefix onto the module names, per model class; asking it directly lets a discovered
    adapter, which has no ``disk_aliases``, stream too. Keys it merges or splits (DINOv2's SwiGLU ``weights_in``) are
    left out: they are never writers or norms. Empty when this transformers has no such API.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - older transformers, or a class it has no mapping machinery for
        return {}
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    out: dict[str, str] = {}
    for key in sorted(keys):
        try:
            name, converter = rename_source_key(key, renamings, converters, prefix, meta)
        except Exception:  # noqa: BLE001 - a key it cannot rename keeps the alias rules
            continue
        if converter is None and name in meta:
            out.setdefault(name, key)
    return out


def plan_streaming(config: object, model_cls: type, adapter: Adapter, keys) -> StreamPlan:
    """Resolve every role of ``adapter`` (by :func:`normswap.structure.resolve`, on a meta skeleton of the model,
    exactly as the in-memory path resolves it on the live model), then map the names to file keys."""
    keys = set(keys)
    model = skeleton(model_cls, config)
    structure = resolve(model, adapter, config)
    base = getattr(model, "base_model_prefix", "") or ""
    names = NameMap(adapter, structure.prefix, keys, base + "." if base else "")
    names.renamed = loaded_names(model, keys)
    first_list = next(iter(structure.block_lists.values()), 0)
    for loaded, count in structure.block_lists.items():
        pattern, loaded_pattern = names.list_pattern(loaded), re.compile(rf"^{re.escape(loaded)}\.(\d+)\.")
        on_disk = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
        on_disk |= {int(m.group(1)) for k in names.renamed if (m := loaded_pattern.match(k))}
        if on_disk != set(range(count)):
            held = f"blocks {min(on_disk)}..{max(on_disk)} ({len(on_disk)} of them)" if on_disk else "no blocks"
            raise CheckpointError(
                f"the config says {count} layers in {loaded}, but the checkpoint holds {held}; the files and "
                "config.json do not match"
            )
    plan = StreamPlan(adapter, names, first_list, not_exact_reasons=list(structure.not_exact_reasons),
                      skipped_optional=list(structure.skipped_optional))

    absent_ties = _absent_ties(config, model, names, plan)
    for w in structure.writers:
        if w.recenter is not None:
            plan.recentered_writers[w.name] = w.recenter
            plan.centered_writers.append(w.name)
            continue
        if w.is_parameter:
            key = names.find(w.name)
            if key is None:
                raise CheckpointError(
                    f"{adapter.model_type} checkpoint has no tensor for writer {w.name} (looked for "
                    f"{', '.join(names.candidates(w.name))}); the file is incomplete or not a stock save of this "
                    "architecture"
                )
            tensors = [(key, "param")]
        else:
            tensors = _tensor_keys(model, names, w.name, "writer", adapter.model_type, absent_ties)
        scale_key = None
        if w.scale:
            scale_key = names.find(w.scale)
            if scale_key is None:
                raise CheckpointError(f"{adapter.model_type} checkpoint has no tensor for the LayerScale {w.scale}")
            plan.ones.append(scale_key)
        plan.centered_writers.append(w.name)
        for key, leaf in tensors:
            if key is None:  # a tied copy the in-memory path unties and centres: centred from its source
                plan.tied_copies.append((leaf, absent_ties.pop(leaf), w.layout))
                continue
            plan.center[key] = "bias" if leaf == "bias" else w.layout
            if scale_key is not None:
                plan.scale_of[key] = scale_key

    for n in structure.norms:
        tensors = _tensor_keys(model, names, n.name, "norm", adapter.model_type)
        plan.norms.append(PlannedNorm(n.name, n.exact, n.writes_stream))
        plan.norm_keys.extend(k for k, _ in tensors)

    plan.tied_copies.extend((target, source, None) for target, source in absent_ties.items())
    protected = set(plan.center) | set(plan.norm_keys) | set(plan.ones)
    outside = {k for k in keys if names.outside_base(k)}
    plan.dropped = sorted(set(_ignored_on_load(type(model), keys, protected)) | outside)
    if adapter.kept_norms:
        for k in sorted(keys):
            module, _, leaf = k.rpartition(".")
            if leaf in ("weight", "bias") and any(p in module for p in adapter.kept_norms):
                plan.kept_norms.append(names.loaded_name(module))
        plan.kept_norms = list(dict.fromkeys(plan.kept_norms))
    return plan
