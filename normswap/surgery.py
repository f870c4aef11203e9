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
from normswap.adapters import Adapter, Norm
from normswap.errors import AlreadyRMSNormError, CheckpointError
from normswap.norm import CenteredRMSNorm, RMSNorm, is_layernorm_like, is_rmsnorm_like
from normswap.structure import (
    RUNTIME_RECENTERING,
    Structure,
    base_and_prefix,
    first_present,
    kept_pattern_reason,
    lookup,
    resolve,
)


@dataclass
class ResolvedWriter:
    name: str  # full name in the top-level model
    target: nn.Module | nn.Parameter
    layout: str
    #: The LayerScale parameter multiplying this writer's output (folded into the writer, then set to ones).
    scale: nn.Parameter | None = None
    scale_name: str | None = None

    @property
    def recenter(self) -> str | None:
        """``"output"``/``"input"``: re-centred at run time, weights untouched; None: weights centred."""
        return RUNTIME_RECENTERING.get(self.layout)


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
    structure: Structure | None = None

    @property
    def approximate_norms(self) -> list[str]:
        return [n.name for n in self.norms if not n.exact]

    @property
    def recentered_writers(self) -> dict[str, str]:
        """``{full name: "output"|"input"}`` of the writers re-centred at run time (saved in the metadata)."""
        return {w.name: w.recenter for w in self.writers if w.recenter is not None}


def _prefix(model: nn.Module) -> tuple[nn.Module, str]:
    """The base model and its dotted name inside the top-level model ('' when the model is the base)."""
    return base_and_prefix(model)


_lookup = lookup
_first_present = first_present


def is_layernorm(module: nn.Module) -> bool:
    """A LayerNorm of any class (``nn.LayerNorm``, ``CohereLayerNorm``, ``OlmoLayerNorm``, ...), not an RMSNorm."""
    return is_layernorm_like(module)


def _is_rmsnorm_like(module: nn.Module) -> bool:
    return is_rmsnorm_like(module)


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
    # A head tied to another table than the one ``get_input_embeddings`` names (an encoder-decoder's head shares
    # the decoder's embedding): centring that table would centre the head with it.
    if sum(p is out.weight for _, p in model.named_parameters(remove_duplicate=False)) > 1:
        return True
    return out.weight.device.type != "meta" and out.weight.data_ptr() == inp.weight.data_ptr()


def _configs(config) -> list:
    """``config`` and every config nested in it (an encoder-decoder's ``decoder``, a VLM's ``text_config``)."""
    found, todo = {}, [config]
    while todo:
        cfg = todo.pop()
        if id(cfg) in found:
            continue
        found[id(cfg)] = cfg
        todo += [v for v in vars(cfg).values() if hasattr(v, "to_dict") and hasattr(v, "model_type")]
    return list(found.values())


def build_plan(model: nn.Module, adapter: Adapter, approximate: bool = False) -> Plan:
    """Resolve every role of ``adapter`` in ``model`` (see :func:`normswap.structure.resolve`) and attach modules.

    Raises if a required role is missing (adapter bug) or a named norm is not LayerNorm-like (converted already).
    """
    structure = resolve(model, adapter)
    writers = []
    for w in structure.writers:
        target = model.get_parameter(w.name) if w.is_parameter else model.get_submodule(w.name)
        scale = model.get_parameter(w.scale) if w.scale else None
        writers.append(ResolvedWriter(w.name, target, w.layout, scale, w.scale))
    norms = []
    for n in structure.norms:
        module = model.get_submodule(n.name)
        if not is_layernorm(module):
            raise CheckpointError(
                f"{n.name} is a {type(module).__name__}, not a LayerNorm; was this model converted already?"
            )
        readers = [(r, model.get_submodule(r)) for r in n.readers]
        norms.append(ResolvedNorm(n.name, module, n.spec, n.exact, readers))

    swapped = {id(n.module) for n in norms}
    kept, unaccounted = [], []
    for name, module in model.named_modules():
        if is_layernorm(module) and id(module) not in swapped:
            (kept if kept_pattern_reason(adapter, name) is not None else unaccounted).append(name)
    return Plan(adapter, writers, norms, kept, unaccounted, list(structure.skipped_optional),
                list(structure.not_exact_reasons), _tied_head(model), structure)


def untie_head_(model: nn.Module) -> bool:
    """Give the LM head its own copy of the embedding matrix, so centring the embedding leaves the head intact.

    transformers v5 ties through ``config.tie_word_embeddings`` and the live ``all_tied_weights_keys`` mapping; both
    are cleared so neither ``save_pretrained`` nor a later ``from_pretrained`` ties them again.
    """
    if not _tied_head(model):
        return False
    out = model.get_output_embeddings()
    out.weight = nn.Parameter(out.weight.detach().clone(), requires_grad=out.weight.requires_grad)
    for cfg in _configs(model.config):
        if "tie_word_embeddings" in vars(cfg) or cfg is model.config or cfg is model.config.get_text_config():
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
    """Make every writer's contribution to the stream zero-mean (float64 maths, cast back once).

    A LayerScale is folded into its writer first (rows and bias scaled, the scale set to ones, in the same float64
    pass), because centring the writer alone would leave ``λ ⊙ centred`` uncentred. Run-time re-centrings
    (``recenter``/``recenter_input``) change no weight: their hook is installed here (see
    :func:`install_recentering_`), and the metadata's ``recentered_writers`` makes ``normswap.load`` re-install it.
    """
    for w in tqdm(writers, desc="centring writers", unit="tensor", disable=len(writers) < 64, leave=False):
        if w.recenter is not None:
            _install_one(w.target, w.recenter, w.name)
            continue
        axis = maths.HIDDEN_AXIS[w.layout]
        scale = w.scale.detach() if w.scale is not None else None
        if isinstance(w.target, nn.Parameter):
            w.target.copy_(maths.center_scaled(w.target, axis, scale).to(w.target.dtype))
        else:
            weight = w.target.weight
            weight.copy_(maths.center_scaled(weight, axis, scale).to(weight.dtype))
            bias = getattr(w.target, "bias", None)
            if bias is not None:
                bias.copy_(maths.center_scaled(bias, -1, scale).to(bias.dtype))
        if w.scale is not None:
            w.scale.fill_(1.0)


def _recenter_output(_module: nn.Module, _inputs, output):
    """Forward hook: the module's output (or the first element of a tuple output) minus its hidden-axis mean."""
    if isinstance(output, torch.Tensor):
        return output - output.mean(dim=-1, keepdim=True)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (output[0] - output[0].mean(dim=-1, keepdim=True), *output[1:])
    return output


def _recenter_input(_module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: the module's first input (positional, else ``hidden_states=``) minus its hidden-axis mean."""
    if args and isinstance(args[0], torch.Tensor):
        return (args[0] - args[0].mean(dim=-1, keepdim=True), *args[1:]), kwargs
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        x = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": x - x.mean(dim=-1, keepdim=True)}
    return None


def install_recentering_(model: nn.Module, recentered: dict[str, str]) -> int:
    """Re-centre at run time where no weight can make the stream zero-mean (a nonlinear writer's output, or the
    input of the first block after inline functional code); returns how many hooks were installed.

    ``recentered`` is ``{module name: "output"|"input"}`` (the metadata's ``recentered_writers``). Hooks hold no
    state, so they survive ``copy.deepcopy`` and leave the state dict (stock keys) untouched. Installing twice is a
    no-op for a module that already carries the hook.
    """
    return sum(_install_one(model.get_submodule(name), kind, name) for name, kind in recentered.items())


def _install_one(module: nn.Module, kind: str, name: str) -> int:
    if kind == "output":
        if _recenter_output in module._forward_hooks.values():
            return 0
        module.register_forward_hook(_recenter_output)
        return 1
    if kind == "input":
        if _recenter_input in module._forward_pre_hooks.values():
            return 0
        module.register_forward_pre_hook(_recenter_input, with_kwargs=True)
        return 1
    raise CheckpointError(f"metadata asks to re-centre the {kind!r} of {name}; expected 'output' or 'input'")


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def swap_norms_(model: nn.Module, norms: list[ResolvedNorm]) -> None:
    """Replace each resolved LayerNorm by an RMSNorm sharing its parameters (stock key names are kept)."""
    for n in norms:
        cls = CenteredRMSNorm if n.spec.writes_stream else RMSNorm
        new = cls.from_norm(n.module)
        _replace_module(model, n.name, new)
        n.module = new


def swap_named_norms_(model: nn.Module, names: Iterable[str], recentered: Iterable[str] = (),
                      recentered_writers: dict[str, str] | None = None) -> int:
    """Swap the LayerNorms listed in saved metadata (used by ``normswap.load``); returns how many were swapped.

    Norms of any LayerNorm-like class are taken (``CohereLayerNorm``, ``OlmoLayerNorm``); ``recentered_writers``
    (``{name: "output"|"input"}``, default: the model config's ``normswap["recentered_writers"]``) re-installs the
    run-time re-centrings the conversion relied on, without which the RMSNorms would see a stream with a mean.
    """
    if recentered_writers is None:
        meta = getattr(getattr(model, "config", None), "normswap", None)
        recentered_writers = meta.get("recentered_writers") if isinstance(meta, dict) else None
    recentered = set(recentered)
    count = 0
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, RMSNorm):
            continue
        if not is_layernorm(module):
            raise CheckpointError(f"metadata names {name} as a swapped norm, but the model has a {type(module).__name__}")
        cls = CenteredRMSNorm if name in recentered else RMSNorm
        _replace_module(model, name, cls.from_norm(module))
        count += 1
    if recentered_writers:
        install_recentering_(model, recentered_writers)
    return count
