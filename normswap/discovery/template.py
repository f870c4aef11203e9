"""Turn discovered full module names into an :class:`Adapter` (templated over repeated blocks) and back into code.

Discovery runs on a 2-layer instance; the adapter must resolve on the 80-layer model. So every name under a
ModuleList index (``h.0.attn.c_proj``) becomes a block-relative role (``attn.c_proj``) of that list, and the list
with the most roles becomes ``blocks`` (others become ``stacks``). A role present in only some blocks is optional.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from torch import nn

from normswap.adapters.spec import Adapter, Norm, Stack, Writer
from normswap.structure import base_and_prefix


@dataclass
class NormRole:
    name: str  # full name in the instance
    exact: bool
    writes_stream: bool = False
    readers: list[str] = field(default_factory=list)  # full names
    reader_layout: str = "linear"


@dataclass
class WriterRole:
    name: str
    layout: str
    scale: str | None = None


def base_prefix(model: nn.Module) -> str:
    """Dotted name of the base model inside the top-level model ('' when the model is its own base)."""
    return base_and_prefix(model)[1]


def module_lists(model: nn.Module) -> dict[str, int]:
    """Full name → length of every ModuleList in the model."""
    return {n: len(m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n}


def split_block(name: str, lists: dict[str, int]) -> tuple[str, int, str] | None:
    """(list name, index, block-relative rest) for the innermost ModuleList ``name`` lies in, else None."""
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:k])
        if head in lists and parts[k].isdigit() and k + 1 < len(parts):
            return head, int(parts[k]), ".".join(parts[k + 1:])
    return None


def _relative(name: str, prefix: str) -> str | None:
    if not prefix:
        return name
    return name[len(prefix):] if name.startswith(prefix) else None


@dataclass
class _Group:
    writers: dict[str, WriterRole] = field(default_factory=dict)  # rest → role (first block's)
    norms: dict[str, NormRole] = field(default_factory=dict)
    writer_blocks: dict[str, set[int]] = field(default_factory=dict)
    norm_blocks: dict[str, set[int]] = field(default_factory=dict)
    reader_rests: dict[str, tuple[str, ...] | None] = field(default_factory=dict)


def _reader_paths(norm: NormRole, own_block: tuple[str, int] | None, lists: dict[str, int]) -> tuple[str, ...] | None:
    """Readers as the adapter names them: block-relative in the norm's own block, else top-level; None = cannot."""
    out = []
    for r in norm.readers:
        where = split_block(r, lists)
        if where is None:
            out.append(r)
        elif own_block is not None and (where[0], where[1]) == own_block:
            out.append(where[2])
        else:
            return None
    return tuple(out)


def _every_block_input(writers: list[WriterRole], lists: dict[str, int]) -> dict[str, tuple[str, int, str]]:
    """{block name: (list, index, '')} for input re-centrings found on every block of a list (each block re-centres
    its input: the block role ``''``); a re-centring of some blocks only (Whisper's ``encoder.layers.0``) stays a
    full path."""
    found: dict[str, set[int]] = {}
    for w in writers:
        head, _, index = w.name.rpartition(".")
        if w.layout == "recenter_input" and head in lists and index.isdigit():
            found.setdefault(head, set()).add(int(index))
    return {f"{head}.{i}": (head, i, "") for head, idx in found.items() if idx == set(range(lists[head]))
            for i in idx}


def build_adapter(model: nn.Module, model_type: str, writers: list[WriterRole], norms: list[NormRole],
                  kept: dict[str, str], raw_stream_outputs: list[str], notes: str = "",
                  stream_axis: int = -1) -> tuple[Adapter, list[str]]:
    """The adapter for these roles, and the roles that could not be expressed (outside the base model)."""
    prefix = base_prefix(model)
    lists = module_lists(model)
    groups: dict[str, _Group] = {}
    top_writers: list[Writer] = []
    top_norms: list[Norm] = []
    heads: set[str] = set()
    unexpressed: list[str] = []
    every_input = _every_block_input(writers, lists)
    for w in writers:
        where = split_block(w.name, lists) if w.layout != "recenter_input" else every_input.get(w.name)
        if where is not None and _relative(where[0], prefix) is not None:
            g = groups.setdefault(where[0], _Group())
            g.writer_blocks.setdefault(where[2], set()).add(where[1])
            if where[2] not in g.writers:
                scale = None
                if w.scale is not None:
                    sw = split_block(w.scale, lists)
                    scale = sw[2] if sw is not None and sw[:2] == where[:2] else None
                g.writers[where[2]] = WriterRole(w.name, w.layout, scale)
            continue
        rel = _relative(w.name, prefix)
        if rel is None:
            unexpressed.append(w.name)
            continue
        scale = _relative(w.scale, prefix) if w.scale else None
        top_writers.append(Writer(rel, w.layout, scale=scale))  # type: ignore[arg-type]
    for n in norms:
        where = split_block(n.name, lists)
        if where is not None and _relative(where[0], prefix) is not None:
            g = groups.setdefault(where[0], _Group())
            g.norm_blocks.setdefault(where[2], set()).add(where[1])
            readers = _reader_paths(n, where[:2], lists)
            if where[2] not in g.norms:
                g.norms[where[2]] = n
                g.reader_rests[where[2]] = readers
            elif g.reader_rests[where[2]] != readers:
                g.reader_rests[where[2]] = None  # blocks disagree: no fold rather than a partial one
            continue
        rel = _relative(n.name, prefix)
        if rel is None:
            unexpressed.append(n.name)
            continue
        readers = _reader_paths(n, None, lists)
        if readers is not None:
            heads.update(r for r in readers if _relative(r, prefix) is None)
            readers = tuple(_relative(r, prefix) or r for r in readers)
        top_norms.append(Norm(rel, readers=readers or (), reader_layout=n.reader_layout,  # type: ignore[arg-type]
                              exact=n.exact, writes_stream=n.writes_stream))

    def stack_of(list_name: str, g: _Group) -> Stack:
        size = lists[list_name]
        ws = tuple(Writer(rest, r.layout, optional=len(g.writer_blocks[rest]) < size, scale=r.scale)  # type: ignore
                   for rest, r in g.writers.items())
        ns = tuple(Norm(rest, readers=g.reader_rests[rest] or (), reader_layout=r.reader_layout,  # type: ignore
                        exact=r.exact, writes_stream=r.writes_stream, optional=len(g.norm_blocks[rest]) < size)
                   for rest, r in g.norms.items())
        return Stack(_relative(list_name, prefix) or list_name, ws, ns)

    ordered = sorted(groups, key=lambda k: -(len(groups[k].writers) + len(groups[k].norms)))
    stacks = [stack_of(k, groups[k]) for k in ordered]
    main = stacks[0] if stacks else Stack("")
    kept_names, reasons = [], {}
    for name, reason in kept.items():
        where = split_block(name, lists)
        pattern = where[2] if where is not None else (_relative(name, prefix) or name)
        if where is not None and where[0] in groups and pattern in groups[where[0]].norms:
            continue  # swapped in the other blocks of this list: the role covers it (the verification guards it)
        if pattern not in reasons:
            kept_names.append(pattern)
            reasons[pattern] = reason
    adapter = Adapter(
        model_type=model_type,
        blocks=main.blocks,
        embeddings=tuple(top_writers),
        block_writers=main.block_writers,
        block_norms=main.block_norms,
        other_norms=tuple(top_norms),
        heads=tuple(sorted(heads)),
        kept_norms=tuple(kept_names),
        norm_position="post" if any(not n.exact for n in norms) else "pre",
        notes=notes,
        stacks=tuple(stacks[1:]),
        kept_reasons=reasons,
        raw_stream_outputs=tuple(raw_stream_outputs),
        stream_axis=stream_axis,
        origin="discovered",
    )
    return adapter, unexpressed


# --- rendering as Python --------------------------------------------------------------------------------------------

def _render_value(value: object, indent: str) -> str:
    if isinstance(value, (Writer, Norm, Stack)):
        return _render_dataclass(value, indent)
    if isinstance(value, tuple):
        if not value:
            return "()"
        inner = indent + "    "
        items = [_render_value(v, inner) for v in value]
        if sum(len(i) for i in items) < 80 and all("\n" not in i for i in items):
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        return "(\n" + "".join(f"{inner}{i},\n" for i in items) + indent + ")"
    if isinstance(value, dict):
        if not value:
            return "{}"
        inner = indent + "    "
        return "{\n" + "".join(f"{inner}{k!r}: {v!r},\n" for k, v in value.items()) + indent + "}"
    return repr(value)


def _render_dataclass(obj: object, indent: str) -> str:
    """``Cls(first, key=value, ...)`` with default-valued fields left out."""
    parts = []
    for i, f in enumerate(fields(obj)):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if value == _default(f):
            continue
        text = _render_value(value, indent)
        parts.append(text if i == 0 else f"{f.name}={text}")
    return f"{type(obj).__name__}({', '.join(parts)})"


def _default(f) -> object:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def render_adapter(adapter: Adapter) -> str:
    """The ``register(Adapter(...))`` call that declares ``adapter`` in normswap/adapters/architectures.py."""
    lines = ["register(Adapter("]
    for f in fields(adapter):
        value = getattr(adapter, f.name)
        if f.name != "model_type" and value == _default(f):
            continue
        if f.name == "origin":  # a pasted entry is a declared (reviewed) one
            continue
        lines.append(f"    {f.name}={_render_value(value, '    ')},")
    lines.append("))")
    return "\n".join(lines)
