"""Which modules of a live (or skeleton) model are blocks, and which modules inside each block write the stream.

Verification names a failure by block and module ("block 37: mlp.dense_4h_to_h output not centred"), so it needs
the adapter's ``blocks`` ModuleList (and any further ``stacks``) and the block writers' paths. Roles that are bare
parameters or run-time re-centrings have no output of their own to check; their effect shows in the block output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from normswap.adapters import Adapter

#: Writer layouts whose module output is [..., hidden] (hidden last), so the output's mean over it can be checked.
CHECKED_LAYOUTS = ("linear", "conv1d", "embedding")


@dataclass
class Block:
    """One block: its label in messages, its full module name, the module, and its checked writers."""

    label: str
    name: str
    module: nn.Module
    #: (path relative to the block, module) of each writer whose output must be zero-mean over the hidden dim.
    writers: list[tuple[str, nn.Module]] = field(default_factory=list)


def base_of(model: nn.Module) -> tuple[nn.Module, str]:
    """The base model and its dotted name inside the top-level model ('' when the model is the base)."""
    base = getattr(model, "base_model", model)
    if base is model:
        return model, ""
    for name, module in model.named_children():
        if module is base:
            return base, name + "."
    return base, ""


def _module_at(root: nn.Module, path: str) -> nn.Module | None:
    try:
        found = root.get_submodule(path)
    except AttributeError:
        return None
    return found if isinstance(found, nn.Module) else None


def resolve_blocks(model: nn.Module, adapter: Adapter) -> list[Block]:
    """Every block of every stack, in forward order of declaration, with the block writers that have an output."""
    base, prefix = base_of(model)
    stacks = []
    if adapter.blocks:
        stacks.append((adapter.blocks, adapter.block_writers, ""))
    for stack in getattr(adapter, "stacks", ()) or ():
        stacks.append((stack.blocks, stack.block_writers, f"{stack.blocks} "))
    blocks: list[Block] = []
    for path, writers, label in stacks:
        modules = _module_at(base, path)
        if not isinstance(modules, nn.ModuleList):
            continue
        for i, block in enumerate(modules):
            found = []
            for w in writers:
                if w.layout not in CHECKED_LAYOUTS:
                    continue
                module = _module_at(block, w.path)
                if module is not None and not (w.unless_present and _module_at(block, w.unless_present)):
                    found.append((w.path, module))
            blocks.append(Block(f"{label}block {i}", f"{prefix}{path}.{i}", block, found))
    return blocks


def embedding_writers(model: nn.Module, adapter: Adapter) -> list[tuple[str, nn.Module]]:
    """Writers outside the blocks (embeddings, input projections) that have an output to check."""
    base, prefix = base_of(model)
    found = []
    for w in adapter.embeddings:
        if w.layout not in CHECKED_LAYOUTS:
            continue
        module = _module_at(base, w.path)
        if module is None or (w.unless_present and _module_at(base, w.unless_present) is not None):
            continue
        found.append((prefix + w.path, module))
    return found
