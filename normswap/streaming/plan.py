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

import transformers

from normswap.adapters import Adapter
from normswap.errors import CheckpointError

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

    def __init__(self, adapter: Adapter, prefix: str, keys: set[str]):
        self.keys = keys
        self.prefix = prefix
        #: Prefix the file actually uses: '' for a checkpoint saved from the bare base class.
        self.file_prefix = prefix if not prefix or any(k.startswith(prefix) for k in keys) else ""
        self.aliases = dict(adapter.disk_aliases)
        fragments = sorted(self.aliases, key=len, reverse=True)
        # A fragment matches whole dotted components only, and the substitution is one pass (no cascading).
        self._alias_re = re.compile(r"(?<![^.])(" + "|".join(map(re.escape, fragments)) + r")(?![^.])") if fragments \
            else None

    def _alias(self, name: str) -> str:
        return self._alias_re.sub(lambda m: self.aliases[m.group(1)], name) if self._alias_re else name

    def _split(self, loaded: str) -> tuple[bool, str]:
        if self.prefix and loaded.startswith(self.prefix):
            return True, loaded[len(self.prefix):]
        return False, loaded

    def candidates(self, loaded: str) -> list[str]:
        """File keys ``loaded`` may be stored under: the aliased (saved) spelling first, then the loaded one."""
        in_base, rest = self._split(loaded)
        pre = self.file_prefix if in_base else ""
        return list(dict.fromkeys([pre + self._alias(rest), pre + rest]))

    def find(self, loaded: str) -> str | None:
        return next((k for k in self.candidates(loaded) if k in self.keys), None)

    def output_key(self, file_key: str) -> str:
        """The key the in-memory path saves for ``file_key`` (adds the base prefix a bare-base file lacks)."""
        return file_key if self.file_prefix == self.prefix else self.prefix + file_key

    def loaded_name(self, file_key: str) -> str:
        """Best-effort inverse for reporting (aliases are not undone)."""
        return self.output_key(file_key)

    def block_pattern(self, blocks: str) -> re.Pattern:
        """Regex whose group 1 is the block index of a file key inside the blocks ModuleList."""
        probe = self.candidates(f"{self.prefix}{blocks}.{_PROBE_INDEX}.x")[0]
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
    norms: list[PlannedNorm] = field(default_factory=list)
    norm_keys: list[str] = field(default_factory=list)
    skipped_optional: list[str] = field(default_factory=list)
    not_exact_reasons: list[str] = field(default_factory=list)
    #: (output key, source file key) of a head that is tied to (absent from the file and equal to) an embedding
    tied_head: tuple[str, str] | None = None
    #: The config ties the head, so the output config must say it no longer does.
    untie_config: bool = False
    kept_norms: list[str] = field(default_factory=list)
    #: File keys the model class ignores on load (legacy attention-mask buffers): the in-memory path drops them.
    dropped: list[str] = field(default_factory=list)

    @property
    def approximate_norms(self) -> list[str]:
        return [n.name for n in self.norms if not n.exact]


def _num_layers(config: object) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(text, attr, None)
        if isinstance(value, int):
            return value
    return None


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


def plan_streaming(config: object, model_cls: type, adapter: Adapter, keys) -> StreamPlan:
    """Resolve every role of ``adapter`` against the file keys; raises if a required role is missing."""
    keys = set(keys)
    names = NameMap(adapter, loaded_prefix(model_cls, config), keys)
    prefix = names.prefix
    block_re = names.block_pattern(adapter.blocks)
    on_disk = {int(m.group(1)) for k in keys if (m := block_re.match(k))}
    n_config = _num_layers(config)
    if n_config is not None and on_disk and on_disk != set(range(n_config)):
        raise CheckpointError(
            f"the config says {n_config} layers, but the checkpoint holds blocks "
            f"{min(on_disk)}..{max(on_disk)} ({len(on_disk)} of them); the files and config.json do not match"
        )
    num_layers = n_config if n_config is not None else len(on_disk)
    plan = StreamPlan(adapter, names, num_layers, not_exact_reasons=adapter.post_ln_reasons(config))

    def module_keys(name: str) -> list[tuple[str, str]]:
        found = []
        for suffix, kind in ((".weight", "weight"), (".bias", "bias")):
            k = names.find(name + suffix)
            if k is not None:
                found.append((k, kind))
        return found

    def add_writer(root: str, w) -> None:
        name = root + w.path
        if w.unless_present and (module_keys(root + w.unless_present) or names.find(root + w.unless_present)):
            return
        if w.layout == "param":
            key = names.find(name)
            tensors = [(key, "param")] if key else []
        else:
            tensors = module_keys(name)
        if not tensors:
            if not w.optional:
                raise CheckpointError(
                    f"{adapter.model_type} checkpoint has no tensor for writer {name} (looked for "
                    f"{', '.join(names.candidates(name + ('' if w.layout == 'param' else '.weight')))}); the file "
                    "is incomplete or not a stock save of this architecture"
                )
            plan.skipped_optional.append(name)
            return
        plan.centered_writers.append(name)
        for key, kind in tensors:
            plan.center[key] = "bias" if kind == "bias" else w.layout

    def add_norm(root: str, n) -> None:
        name = root + n.path
        tensors = module_keys(name)
        if not tensors:
            if not n.optional:
                raise CheckpointError(f"{adapter.model_type} checkpoint has no weight or bias for norm {name}; the "
                                      "file is incomplete or not a stock save of this architecture")
            plan.skipped_optional.append(name)
            return
        plan.norms.append(PlannedNorm(name, n.exact and not plan.not_exact_reasons, n.writes_stream))
        plan.norm_keys.extend(k for k, _ in tensors)

    for w in adapter.embeddings:
        add_writer(prefix, w)
    for n in adapter.other_norms:
        add_norm(prefix, n)
    for i in range(num_layers):
        root = f"{prefix}{adapter.blocks}.{i}."
        for w in adapter.block_writers:
            add_writer(root, w)
        for n in adapter.block_norms:
            add_norm(root, n)

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = getattr(model_cls, "_tied_weights_keys", None)
    if getattr(text, "tie_word_embeddings", False) and isinstance(tied, dict):
        for target, source in tied.items():
            source_key = names.find(source)
            if source_key is None:
                continue
            plan.untie_config = True
            if names.find(target) is None:
                # save_pretrained only re-applies legacy spellings it met on load, so a head that was not in the
                # file is saved under its loaded name (GPT-NeoX: lm_head.weight, not embed_out.weight).
                plan.tied_head = (target, source_key)

    protected = set(plan.center) | set(plan.norm_keys)
    plan.dropped = _ignored_on_load(model_cls, keys, protected)
    if adapter.kept_norms:
        for k in sorted(keys):
            module, _, leaf = k.rpartition(".")
            if leaf in ("weight", "bias") and any(p in module for p in adapter.kept_norms):
                plan.kept_norms.append(names.loaded_name(module))
        plan.kept_norms = list(dict.fromkeys(plan.kept_norms))
    return plan
