"""Which modules of a live (or skeleton) model are blocks, and which modules inside each block write the stream.

Verification names a failure by block and module ("block 37: mlp.dense_4h_to_h output not centred"), so it needs
the adapter's ``blocks`` ModuleList (and any further ``stacks``) and the block writers' paths. Roles that are bare
parameters or run-time re-centrings have no output of their own to check; their effect shows in the block output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from normswap.adapters import Adapter
from normswap.structure import ConcreteWriter, base_and_prefix, lookup, resolve

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
    return base_and_prefix(model)


def _checked(writer: ConcreteWriter) -> bool:
    return not writer.is_parameter and writer.layout in CHECKED_LAYOUTS


def resolve_blocks(model: nn.Module, adapter: Adapter) -> list[Block]:
    """Every block of every stack, in the adapter's order, with the block writers that have an output.

    The roles come from :func:`normswap.structure.resolve`, the resolver conversion and streaming use, so the
    blocks and writers verified are exactly those the conversion touched.
    """
    structure = resolve(model, adapter, model.config)
    first = structure.prefix + adapter.blocks if adapter.blocks else None
    blocks: list[Block] = []
    for path, count in structure.block_lists.items():
        label = "" if path == first else f"{path.removeprefix(structure.prefix)} "
        for i in range(count):
            name = f"{path}.{i}"
            module = lookup(model, name)
            if not isinstance(module, nn.Module):
                continue
            found = [(w.name[len(name) + 1:], lookup(model, w.name)) for w in structure.writers
                     if w.name.startswith(name + ".") and _checked(w)]
            blocks.append(Block(f"{label}block {i}", name, module,
                                [(path_, m) for path_, m in found if isinstance(m, nn.Module)]))
    return blocks


def embedding_writers(model: nn.Module, adapter: Adapter) -> list[tuple[str, nn.Module]]:
    """Writers outside the blocks (embeddings, input projections) that have an output to check."""
    structure = resolve(model, adapter, model.config)
    lists = tuple(f"{path}." for path in structure.block_lists)
    found = []
    for w in structure.writers:
        if _checked(w) and not (lists and w.name.startswith(lists)):
            module = lookup(model, w.name)
            if isinstance(module, nn.Module):
                found.append((w.name, module))
    return found
