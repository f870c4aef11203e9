"""Apply an adapter to a live model: resolve its roles, untie the head, centre writers, fold, swap norms.

Everything here edits modules and parameters in place; the numbers come from :mod:`normswap.maths`. Nothing in this
module knows about files or prints: the report objects carry what happened.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from normswap import maths
from normswap.adapters import Adapter, Norm, Writer
from normswap.errors import AlreadyRMSNormError, CheckpointError
from normswap.norm import CenteredRMSNorm, RMSNorm


@dataclass
class ResolvedWriter:
    name: str  # full name in the top-level model
    target: nn.Module | nn.Parameter
    layout: str


@dataclass
class ResolvedNorm:
    name: str
    module: nn.Module
    spec: Norm
    exact: bool
    #: (full name, module) of each reader that exists (alternatives resolved), for folds.
    readers: list[tuple[str, nn.Module]] = field(default_factory=list)


@dataclass
class Plan:
    """What a conversion would touch in one particular model (used by ``inspect`` and ``convert_``)."""

    adapter: Adapter
    writers: list[ResolvedWriter]
    norms: list[ResolvedNorm]
    kept: list[str]  # LayerNorms that deliberately stay LayerNorm
    unaccounted: list[str]  # LayerNorms the adapter does not mention: stay LayerNorm, reported
    skipped_optional: list[str]
    not_exact_reasons: list[str]
    tied_head: bool

    @property
    def approximate_norms(self) -> list[str]:
        return [n.name for n in self.norms if not n.exact]


def _prefix(model: nn.Module) -> tuple[nn.Module, str]:
    """The base model and its dotted name inside the top-level model ('' when the model is the base)."""
    base = getattr(model, "base_model", model)
    if base is model:
        return model, ""
    for name, module in model.named_children():
        if module is base:
            return base, name + "."
    return base, ""


def _lookup(root: nn.Module, path: str) -> nn.Module | nn.Parameter | None:
    """Module or parameter at ``path`` under ``root``; None when absent or None-valued (optional roles)."""
    obj: object = root
    for part in path.split("."):
        if obj is None:
            return None
        if isinstance(obj, nn.Module):
            obj = obj._modules.get(part) if part in obj._modules else obj._parameters.get(part)
        else:
            return None
    return obj if isinstance(obj, (nn.Module, nn.Parameter)) else None


def _first_present(roots: Iterable[tuple[nn.Module, str]], path: str) -> tuple[str, nn.Module | nn.Parameter] | None:
    """Resolve ``path`` (``a|b`` = first that exists) against several roots, in order."""
    for alternative in path.split("|"):
        for root, prefix in roots:
            found = _lookup(root, alternative)
            if found is not None:
                return prefix + alternative, found
    return None


def is_layernorm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) and not isinstance(module, RMSNorm)


def _is_rmsnorm_like(module: nn.Module) -> bool:
    return isinstance(module, RMSNorm) or type(module).__name__.lower().endswith("rmsnorm")


def check_finite(model: nn.Module) -> None:
    """Refuse weights with NaN/Inf: centring would spread them over every row of the tensor."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            bad = int((~torch.isfinite(p)).sum())
            raise CheckpointError(
                f"parameter {name} contains {bad} NaN/Inf value(s); the source checkpoint is damaged or was saved "
                "mid-divergence. Fix or re-download it; normswap will not convert non-finite weights."
            )


def ensure_has_layernorm(model: nn.Module) -> None:
    if any(is_layernorm(m) for m in model.modules()):
        return
    kinds = sorted({type(m).__name__ for m in model.modules() if _is_rmsnorm_like(m)})
    if kinds:
        raise AlreadyRMSNormError(f"this model already uses RMSNorm ({', '.join(kinds)}); there is nothing to convert")
    raise AlreadyRMSNormError("this model has no LayerNorm modules; there is nothing to convert")


def _tied_head(model: nn.Module) -> bool:
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    if get_out is None or get_in is None:
        return False
    try:
        out, inp = get_out(), get_in()
    except (NotImplementedError, AttributeError):
        return False
    if out is None or inp is None or getattr(out, "weight", None) is None:
        return False
    if out.weight is inp.weight:
        return True
    return out.weight.device.type != "meta" and out.weight.data_ptr() == inp.weight.data_ptr()


def build_plan(model: nn.Module, adapter: Adapter, approximate: bool = False) -> Plan:
    """Resolve every role of ``adapter`` in ``model``; raises if a required role is missing (adapter bug)."""
    base, prefix = _prefix(model)
    blocks = _lookup(base, adapter.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise CheckpointError(
            f"{adapter.model_type} adapter expects the blocks at {prefix}{adapter.blocks}, but this model has none there"
        )
    not_exact = adapter.post_ln_reasons(model.config)
    all_inexact = bool(adapter.config_reasons(model.config))
    writers: list[ResolvedWriter] = []
    norms: list[ResolvedNorm] = []
    skipped: list[str] = []

    def add_writer(root: nn.Module, root_prefix: str, w: Writer) -> None:
        found = _lookup(root, w.path)
        if w.unless_present and _lookup(root, w.unless_present) is not None:
            return
        if found is None:
            if not w.optional:
                raise CheckpointError(f"{adapter.model_type} adapter: writer {root_prefix}{w.path} not found")
            skipped.append(root_prefix + w.path)
            return
        writers.append(ResolvedWriter(root_prefix + w.path, found, w.layout))

    def add_norm(root: nn.Module, root_prefix: str, n: Norm) -> None:
        found = _lookup(root, n.path)
        if found is None:
            if not n.optional:
                raise CheckpointError(f"{adapter.model_type} adapter: norm {root_prefix}{n.path} not found")
            skipped.append(root_prefix + n.path)
            return
        if not isinstance(found, nn.LayerNorm):
            raise CheckpointError(
                f"{root_prefix}{n.path} is a {type(found).__name__}, not a LayerNorm; was this model converted already?"
            )
        readers = []
        roots = [(root, root_prefix), (model, "")]
        for r in n.readers:
            hit = _first_present(roots, r)
            if hit is not None and isinstance(hit[1], nn.Module):
                readers.append(hit)
        exact = n.exact and not all_inexact
        norms.append(ResolvedNorm(root_prefix + n.path, found, n, exact, readers))

    for w in adapter.embeddings:
        add_writer(base, prefix, w)
    for n in adapter.other_norms:
        add_norm(base, prefix, n)
    for i, block in enumerate(blocks):
        bprefix = f"{prefix}{adapter.blocks}.{i}."
        for w in adapter.block_writers:
            add_writer(block, bprefix, w)
        for n in adapter.block_norms:
            add_norm(block, bprefix, n)

    swapped = {id(n.module) for n in norms}
    kept, unaccounted = [], []
    for name, module in model.named_modules():
        if is_layernorm(module) and id(module) not in swapped:
            (kept if any(k in name for k in adapter.kept_norms) else unaccounted).append(name)
    return Plan(adapter, writers, norms, kept, unaccounted, skipped, not_exact, _tied_head(model))


def untie_head_(model: nn.Module) -> bool:
    """Give the LM head its own copy of the embedding matrix, so centring the embedding leaves the head intact.

    transformers v5 ties through ``config.tie_word_embeddings`` and the live ``all_tied_weights_keys`` mapping; both
    are cleared so neither ``save_pretrained`` nor a later ``from_pretrained`` ties them again.
    """
    if not _tied_head(model):
        return False
    out = model.get_output_embeddings()
    out.weight = nn.Parameter(out.weight.detach().clone(), requires_grad=out.weight.requires_grad)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        # With tie_word_embeddings=False transformers re-ties nothing on load, so every other tie the flag governed
        # (BERT's decoder bias) gets its own copy too; otherwise save_pretrained would drop one key as a duplicate.
        for target in list(tied):
            module_name, _, param_name = target.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            param = getattr(module, param_name, None)
            if isinstance(param, nn.Parameter):
                setattr(module, param_name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
        tied.clear()
    return True


@torch.no_grad()
def center_writers_(writers: list[ResolvedWriter]) -> None:
    """Make every writer's contribution to the stream zero-mean (float64 maths, cast back once)."""
    for w in tqdm(writers, desc="centring writers", unit="tensor", disable=len(writers) < 64, leave=False):
        if isinstance(w.target, nn.Parameter):
            w.target.copy_(maths.center(w.target, maths.HIDDEN_AXIS[w.layout]).to(w.target.dtype))
            continue
        weight = w.target.weight
        weight.copy_(maths.center_weight(weight, w.layout).to(weight.dtype))
        bias = getattr(w.target, "bias", None)
        if bias is not None:
            bias.copy_(maths.center_bias(bias).to(bias.dtype))


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def swap_norms_(model: nn.Module, norms: list[ResolvedNorm]) -> None:
    """Replace each resolved LayerNorm by an RMSNorm sharing its parameters (stock key names are kept)."""
    for n in norms:
        cls = CenteredRMSNorm if n.spec.writes_stream else RMSNorm
        new = cls.from_layernorm(n.module)
        _replace_module(model, n.name, new)
        n.module = new


def swap_named_norms_(model: nn.Module, names: Iterable[str], recentered: Iterable[str] = ()) -> int:
    """Swap the LayerNorms listed in saved metadata (used by ``normswap.load``); returns how many were swapped."""
    recentered = set(recentered)
    count = 0
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, RMSNorm):
            continue
        if not isinstance(module, nn.LayerNorm):
            raise CheckpointError(f"metadata names {name} as a swapped norm, but the model has a {type(module).__name__}")
        cls = CenteredRMSNorm if name in recentered else RMSNorm
        _replace_module(model, name, cls.from_layernorm(module))
        count += 1
    return count
