"""One resolver from an :class:`~normswap.adapters.Adapter` to the concrete names of one model.

An adapter speaks in roles (base-model relative writers, block-relative norms, alternatives, optional roles, extra
block stacks). Every consumer needs the same answer to "which modules and parameters are these, here": the in-memory
surgery (:func:`normswap.surgery.build_plan`), the streaming planner (:func:`normswap.streaming.plan.plan_streaming`,
which resolves against a meta-device skeleton of the model and then maps names to file keys) and keep-centred
training (:func:`normswap.training.keep_centered.residual_writers`). Working it out once keeps them from drifting:
which norms are exact, which writers change weights and which are re-centred at run time is decided here only.

Nothing here changes a model; it only reads its module tree (a live model or a ``torch.device("meta")`` skeleton).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from normswap.adapters.spec import Adapter, Norm, Writer
from normswap.errors import CheckpointError

#: Writer layouts whose weights do not change: the stream they produce is re-centred at run time instead.
#: ``output``: the module's output is re-centred; ``input``: the module's first input is.
RUNTIME_RECENTERING = {"recenter": "output", "recenter_input": "input"}


@dataclass(frozen=True)
class ConcreteWriter:
    """One residual writer of one model, by full (top-level) name."""

    name: str
    layout: str
    #: A bare parameter (ViT cls token) rather than a module with ``weight``/``bias``.
    is_parameter: bool = False
    #: Full name of the LayerScale parameter multiplying this writer's output (folded in, then set to ones).
    scale: str | None = None

    @property
    def recenter(self) -> str | None:
        """``"output"``/``"input"`` for a writer re-centred at run time, None for one whose weights are centred."""
        return RUNTIME_RECENTERING.get(self.layout)


@dataclass(frozen=True)
class ConcreteNorm:
    """One swapped norm of one model."""

    name: str
    spec: Norm
    exact: bool
    #: Full names of the declared readers that exist (``a|b`` alternatives resolved), for folds.
    readers: tuple[str, ...] = ()

    @property
    def writes_stream(self) -> bool:
        return self.spec.writes_stream


@dataclass
class Structure:
    """Everything an adapter names in one model, resolved to full names in the top-level model."""

    adapter: Adapter
    #: The base model's name plus a dot ('' when the model is the base model).
    prefix: str
    writers: list[ConcreteWriter] = field(default_factory=list)
    norms: list[ConcreteNorm] = field(default_factory=list)
    skipped_optional: list[str] = field(default_factory=list)
    not_exact_reasons: list[str] = field(default_factory=list)
    #: Full name -> length of every block ModuleList the adapter walks (``blocks`` and each stack).
    block_lists: dict[str, int] = field(default_factory=dict)

    @property
    def centred_writers(self) -> list[ConcreteWriter]:
        """Writers whose weights are centred (everything but run-time re-centrings)."""
        return [w for w in self.writers if w.recenter is None]

    @property
    def recentered_writers(self) -> dict[str, str]:
        """``{full name: "output"|"input"}``: what ``normswap.load`` and the remote code re-centre at run time."""
        return {w.name: w.recenter for w in self.writers if w.recenter is not None}

    @property
    def scales(self) -> list[str]:
        """Full names of the LayerScale parameters folded into writers (they stay ones afterwards)."""
        return [w.scale for w in self.writers if w.scale]

    @property
    def approximate_norms(self) -> list[str]:
        return [n.name for n in self.norms if not n.exact]


def base_and_prefix(model: nn.Module) -> tuple[nn.Module, str]:
    """The base model and its dotted name inside the top-level model plus a dot ('' when the model is the base).

    ``model.base_model`` is the child named by ``base_model_prefix``; a child that does not hold the model's input
    embeddings is not its body but a part of it (``DINOv3ViTModel.model`` is the encoder, next to the embeddings),
    and the model is then its own base.
    """
    base = getattr(model, "base_model", model)
    if base is model:
        return model, ""
    for name, module in model.named_children():
        if module is base:
            return (base, name + ".") if _holds_input_embeddings(model, base) else (model, "")
    return base, ""


def _holds_input_embeddings(model: nn.Module, base: nn.Module) -> bool:
    """Whether ``base`` contains ``model``'s input embeddings (True when the model cannot say which they are)."""
    try:
        emb = model.get_input_embeddings()
    except Exception:  # noqa: BLE001 - no input embeddings declared (NotImplementedError, AttributeError ...)
        return True
    if not isinstance(emb, nn.Module):
        return True
    return any(m is emb for m in base.modules())


def lookup(root: nn.Module, path: str) -> nn.Module | nn.Parameter | None:
    """Module or parameter at ``path`` under ``root`` ('' is ``root``); None when absent or None-valued."""
    if path == "":
        return root
    obj: object = root
    for part in path.split("."):
        if not isinstance(obj, nn.Module):
            return None
        obj = obj._modules.get(part) if part in obj._modules else obj._parameters.get(part)
        if obj is None:
            return None
    return obj if isinstance(obj, (nn.Module, nn.Parameter)) else None


def first_present(roots: Iterable[tuple[nn.Module, str]], path: str) -> tuple[str, nn.Module | nn.Parameter] | None:
    """Resolve ``path`` (``a|b`` = first that exists) against several (root, prefix) pairs, in order."""
    for alternative in path.split("|"):
        for root, prefix in roots:
            found = lookup(root, alternative)
            if found is not None:
                return prefix + alternative, found
    return None


def _blocks(base: nn.Module, prefix: str, path: str, model_type: str,
            optional: bool = False) -> list[tuple[str, nn.Module]] | None:
    """(full prefix with trailing dot, block) for every block of the ModuleList at ``path`` ('' = no blocks);
    None for an optional stack that this model lacks."""
    if not path:
        return []
    blocks = lookup(base, path)
    if blocks is None and optional:
        return None
    if not isinstance(blocks, nn.ModuleList):
        raise CheckpointError(f"{model_type} adapter expects the blocks at {prefix}{path}, but this model has none there")
    return [(f"{prefix}{path}.{i}.", block) for i, block in enumerate(blocks)]


def resolve(model: nn.Module, adapter: Adapter, config: object | None = None) -> Structure:
    """Resolve every role of ``adapter`` in ``model`` (live or meta); raises if a required role is missing.

    Order (embeddings, other norms, then block by block: writers, norms; then each stack the same way) is the order
    every report and metadata list uses, so the in-memory and streaming paths write identical metadata.
    """
    config = config if config is not None else model.config
    base, prefix = base_and_prefix(model)
    all_inexact = bool(adapter.config_reasons(config))
    out = Structure(adapter, prefix, not_exact_reasons=adapter.post_ln_reasons(config))

    def add_writer(root: nn.Module, root_prefix: str, w: Writer) -> None:
        if w.unless_present and lookup(root, w.unless_present) is not None:
            return
        found = lookup(root, w.path)
        if found is None:
            if not w.optional:
                raise CheckpointError(f"{adapter.model_type} adapter: writer {root_prefix}{w.path} not found")
            out.skipped_optional.append(root_prefix + w.path)
            return
        scale = None
        if w.scale:
            if not isinstance(lookup(root, w.scale), nn.Parameter):
                raise CheckpointError(f"{adapter.model_type} adapter: LayerScale {root_prefix}{w.scale} of writer "
                                      f"{root_prefix}{w.path} not found")
            scale = root_prefix + w.scale
        name = root_prefix + w.path if w.path else root_prefix.removesuffix(".")  # '': the block itself
        out.writers.append(ConcreteWriter(name, w.layout, isinstance(found, nn.Parameter), scale))

    def add_norm(root: nn.Module, root_prefix: str, n: Norm) -> None:
        found = lookup(root, n.path)
        if isinstance(found, nn.Identity):  # a norm configured away in this block (ModernBERT layer 0's attn_norm)
            out.skipped_optional.append(root_prefix + n.path)
            return
        if not isinstance(found, nn.Module):
            if not n.optional:
                raise CheckpointError(f"{adapter.model_type} adapter: norm {root_prefix}{n.path} not found")
            out.skipped_optional.append(root_prefix + n.path)
            return
        roots = [(root, root_prefix), (model, "")]
        readers = []
        for r in n.readers:
            hit = first_present(roots, r)
            if hit is not None and isinstance(hit[1], nn.Module):
                readers.append(hit[0])
        out.norms.append(ConcreteNorm(root_prefix + n.path, n, n.exact and not all_inexact, tuple(readers)))

    def add_stack(path: str, writers: tuple[Writer, ...], norms: tuple[Norm, ...], optional: bool = False) -> None:
        blocks = _blocks(base, prefix, path, adapter.model_type, optional)
        if blocks is None:
            out.skipped_optional.append(prefix + path)
            return
        if path:
            out.block_lists[prefix + path] = len(blocks)
        for bprefix, block in blocks:
            for w in writers:
                add_writer(block, bprefix, w)
            for n in norms:
                add_norm(block, bprefix, n)

    for w in adapter.embeddings:
        add_writer(base, prefix, w)
    for n in adapter.other_norms:
        add_norm(base, prefix, n)
    add_stack(adapter.blocks, adapter.block_writers, adapter.block_norms)
    for stack in adapter.stacks:
        add_stack(stack.blocks, stack.block_writers, stack.block_norms, stack.optional)
    return out


def kept_pattern_reason(adapter: Adapter, name: str) -> str | None:
    """Why the norm ``name`` deliberately stays LayerNorm (None when the adapter does not keep it)."""
    for pattern in adapter.kept_norms:
        if pattern in name:
            return adapter.kept_reasons.get(pattern, "does not read the residual stream")
    return None
