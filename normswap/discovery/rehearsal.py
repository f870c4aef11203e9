"""Rehearse the conversion on the instance: discovery's claim is checked on the adapter, not on its measurements.

Discovery measures full names on a 2-layer instance (``layers.0.norm_out`` re-centred, ``layers.1.norm_out`` not);
the adapter it returns is a template with one role per block-relative path, applied to every block. Where the blocks
differ (a conformer block's ``norm_out`` writes the next block's stream, but the last one writes the model output; a
VLM projector reads the stream after block 0 raw, so ``layer_norm1`` is exact in block 0 only) the template says
more than was measured. And a swap is exact only if ``normswap.RMSNorm`` with the norm's own parameters computes what
the norm computes on a zero-mean input (VideoPrism's LayerNorm applies ``weight + 1``).

So before discovery answers, :func:`settle` converts a float64 copy of the instance with the conversion's own
surgery (resolve, untie, centre, swap) and requires every norm it swaps exactly to read a zero-mean input and every
output to stay put (raw stream outputs: along ones only). Where that fails it repairs what can be repaired by
measurement (a re-centring role that must not reach the last block becomes a re-centring of every block's input),
and otherwise keeps the norms that cannot be exact, naming the role and why, so that a wrong claim is never made.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from normswap.adapters.spec import Adapter
from normswap.discovery.capture import Trace, first_tensor, trace
from normswap.discovery.readers import reader_layout
from normswap.discovery.result import NormFinding
from normswap.discovery.simulate import Fix, measure_fixes, norm_ratios
from normswap.discovery.template import NormRole, WriterRole, build_adapter, module_lists, split_block
from normswap.discovery.writers import ones_axis, output_effect
from normswap.norm import RMSNorm, is_layernorm_like
from normswap.structure import resolve

#: Fix layouts that change no weight: the stream is re-centred at run time.
RUNTIME = ("recenter", "recenter_input", "writes_stream")


@dataclass
class Settled:
    """The adapter discovery answers with, and the full-name measurements it was built from."""

    adapter: Adapter
    findings: list[NormFinding]
    fixes: list[Fix]
    stream_outputs: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class Rehearsal:
    """What converting the instance with an adapter did: norms swapped exactly whose input kept a mean, what moved
    (``visible``: outputs, and block streams that moved beyond their mean, as verification compares them), outputs
    that moved along ones (``raw``: the stream itself), or the error that stopped it."""

    bad_norms: dict[str, float] = field(default_factory=dict)
    visible: list[str] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    error: str | None = None
    #: The hidden axis of the stream as the raw outputs show it: -1, or 1 when every one is channels-first.
    stream_axis: int = -1

    @property
    def ok(self) -> bool:
        return self.error is None and not self.bad_norms and not self.visible


def build(model: nn.Module, model_type: str, fixes: list[Fix], findings: list[NormFinding],
          stream_outputs: list[str], stream_axis: int = -1) -> tuple[Adapter, list[str]]:
    """The adapter for these full-name measurements, and the roles it could not express (outside the base model)."""
    writes_stream = {f.name for f in fixes if f.layout == "writes_stream"}
    for f in findings:
        f.writes_stream = f.name in writes_stream
    modules = dict(model.named_modules())
    writer_roles = [WriterRole(f.name, f.layout, f.scale) for f in fixes if f.layout != "writes_stream"]
    norm_roles = [NormRole(f.name, f.status == "exact", f.writes_stream, f.readers, reader_layout(modules, f.readers))
                  for f in findings if f.status != "kept"]
    kept = {f.name: f.reason for f in findings if f.status == "kept"}
    return build_adapter(model, model_type, writer_roles, norm_roles, kept, stream_outputs,
                         notes="discovered by normswap.discovery (measured on a small instance)",
                         stream_axis=stream_axis if stream_outputs else -1)


@torch.no_grad()
def swap_mismatch(module: nn.Module, x: torch.Tensor) -> float:
    """Relative max difference between ``module`` and ``RMSNorm.from_norm(module)`` on the zero-mean ``x``: ~1e-16
    for a norm that computes ``weight · x̂ + bias`` with its own parameters, O(1) for one that does not."""
    x = x - x.mean(-1, keepdim=True)
    own = copy.deepcopy(module)
    try:
        y, swapped = first_tensor(own(x)), RMSNorm.from_norm(own)(x)
    except Exception:  # noqa: BLE001 - a norm that cannot run on its input alone cannot be swapped for RMSNorm
        return float("inf")
    if y is None or y.shape != swapped.shape:
        return float("inf")
    return float((y - swapped).abs().max() / y.abs().max().clamp_min(1e-30))


def keep_unswappable(model: nn.Module, ref: Trace, findings: list[NormFinding], tol: float) -> None:
    """Keep every norm whose RMSNorm swap would not reproduce it on a zero-mean input (its class computes another
    function of its parameters than ``weight · x̂ + bias``), with the reason."""
    modules = dict(model.named_modules())
    for f in findings:
        calls = ref.calls.get(f.name)
        if f.status == "kept" or not calls or calls[0].inp is None:
            continue
        if not is_layernorm_like(modules[f.name]):
            f.status = "kept"
            f.reason = (f"its class {type(modules[f.name]).__name__} computes a LayerNorm here, but is not one the "
                        "conversion swaps (an nn.LayerNorm, or a *LayerNorm class that subtracts the mean on its own)")
            continue
        diff = swap_mismatch(modules[f.name], calls[0].inp)
        if diff > tol:
            f.status = "kept"
            f.reason = (f"normswap.RMSNorm with its parameters does not compute what its class "
                        f"{type(modules[f.name]).__name__} computes, even on a zero-mean input (relative difference "
                        f"{diff:.1e}): it is a LayerNorm of another form (e.g. a gain applied as weight + 1, or an "
                        "epsilon kept where normswap cannot read it)")


def resolved_fixes(model: nn.Module, adapter: Adapter) -> list[Fix]:
    """The adapter's roles in the instance, as the conversion resolves them (every block of every list)."""
    st = resolve(model, adapter)
    fixes = [Fix(w.name, "param" if w.is_parameter else w.layout, w.scale) for w in st.writers]
    return fixes + [Fix(n.name, "writes_stream") for n in st.norms if n.writes_stream]


@torch.no_grad()
def rehearse(model: nn.Module, probes: dict, ref: Trace, adapter: Adapter, tol: float, ratio: float) -> Rehearsal:
    """Convert a float64 copy of the instance as ``normswap.convert_`` would, and compare it with the original (the
    exact part: approximate norms stay LayerNorm here, so the outputs must not move)."""
    from normswap.surgery import build_plan, center_writers_, swap_norms_, untie_head_

    sim = copy.deepcopy(model)
    try:
        plan = build_plan(sim, adapter)
        untie_head_(sim)
        center_writers_(plan.writers)
        swap_norms_(sim, [n for n in plan.norms if n.exact])  # post-LN norms are approximate: not rehearsed
        blocks = [f"{lst}.{i}" for lst, size in plan.structure.block_lists.items() for i in range(size)]
        tr = trace(sim, probes, names={n.name for n in plan.norms} | set(blocks))
    except Exception as exc:  # noqa: BLE001 - the conversion itself would fail: no claim can be made
        return Rehearsal(error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    ratios = norm_ratios(tr, [n.name for n in plan.norms if n.exact])
    visible, raw = output_effect(ref.outputs, tr.outputs, tol)
    visible = [f"the output {n}" for n in visible] + [f"the stream after {b} beyond its mean ({d:.1e})"
                                                      for b in blocks if (d := _beyond_mean(ref, tr, b)) > tol]
    axes = {ones_axis(tr.outputs[n] - ref.outputs[n], tol) for n in raw}
    return Rehearsal({n: r for n, r in ratios.items() if r > ratio}, visible, raw, stream_axis=1 if axes == {1} else -1)


def _beyond_mean(ref: Trace, new: Trace, block: str) -> float:
    """How far a block's output stream moved other than along ones (relative), over its hidden axis: the last, or
    the channels of a 4-d stream; 0 when the block did not run or returns no stream."""
    a, b = ref.calls.get(block), new.calls.get(block)
    if not a or not b or a[0].out is None or b[0].out is None or a[0].out.shape != b[0].out.shape:
        return 0.0
    diff, scale = b[0].out - a[0].out, max(float(a[0].out.abs().max()), 1e-30)
    axes = (-1, 1) if diff.dim() == 4 else (-1,)
    return min(float((diff - diff.mean(axis, keepdim=True)).abs().max()) / scale for axis in axes)


def _role(name: str, lists: dict[str, int]) -> tuple[str | None, str]:
    """(block list, block-relative path) of a full name; (None, name) outside every list."""
    where = split_block(name, lists)
    return (where[0], where[2]) if where is not None else (None, name)


def _keep_role(findings: list[NormFinding], norm: str, lists: dict[str, int], why: str) -> None:
    role = _role(norm, lists)
    for f in findings:
        if f.status != "kept" and _role(f.name, lists) == role:
            f.status, f.reason = "kept", why


def settle(model: nn.Module, probes: dict, ref: Trace, model_type: str, fixes: list[Fix],
           findings: list[NormFinding], stream_outputs: list[str], tol: float, ratio: float,
           feeds: dict[str, set] | None = None) -> Settled:
    """The adapter for these measurements once its conversion of the instance has been rehearsed and holds; norms
    that cannot be made exact as the template applies them are kept, each with the reason. ``feeds`` ({writer: norms
    it feeds}) lets writers that only fed norms kept here be dropped again."""
    settled = _settle(model, probes, ref, model_type, fixes, findings, stream_outputs, tol, ratio)
    swapped = {f.name for f in findings if f.status != "kept"}
    lean = [f for f in settled.fixes if feeds is None or f.name not in feeds or feeds[f.name] & swapped]
    if lean != settled.fixes and swapped:
        adapter, _ = build(model, model_type, lean, findings, settled.stream_outputs, settled.adapter.stream_axis)
        rh = rehearse(model, probes, ref, adapter, tol, ratio)
        if rh.ok and set(rh.raw) <= set(settled.stream_outputs):
            raw = sorted(rh.raw)
            settled.adapter, settled.fixes, settled.stream_outputs = build(model, model_type, lean, findings, raw,
                                                                           rh.stream_axis)[0], lean, raw
    return settled


def _settle(model: nn.Module, probes: dict, ref: Trace, model_type: str, fixes: list[Fix],
            findings: list[NormFinding], stream_outputs: list[str], tol: float, ratio: float) -> Settled:
    lists = module_lists(model)
    notes: list[str] = []
    keep_unswappable(model, ref, findings, tol)
    repaired: set[tuple[str | None, str]] = set()
    for _ in range(2 * len(findings) + 4):
        adapter, unexpressed = build(model, model_type, fixes, findings, stream_outputs)
        if not any(f.status != "kept" for f in findings):
            break
        rh = rehearse(model, probes, ref, adapter, tol, ratio)
        if rh.error is not None:
            _keep_all(findings, f"converting the small instance with the discovered adapter fails ({rh.error})")
            continue
        new_raw = set(rh.raw) - set(stream_outputs)
        if rh.ok and not new_raw:
            if rh.stream_axis != adapter.stream_axis:
                adapter, unexpressed = build(model, model_type, fixes, findings, stream_outputs, rh.stream_axis)
            break
        # A run-time re-centring role applied where it was not measured: where re-centring each block's input does
        # the same job, every output stays as it was.
        extra = [f for f in resolved_fixes(model, adapter) if f not in fixes]
        repair = _block_input_repair(model, probes, ref, fixes, findings, extra, lists, tol, ratio, repaired)
        if repair is not None:
            fixes, note = repair
            notes.append(note)
            continue
        if rh.ok:  # the roles also move a stream output along ones: it is named as the raw stream
            stream_outputs = sorted(set(stream_outputs) | new_raw)
            adapter, unexpressed = build(model, model_type, fixes, findings, stream_outputs, rh.stream_axis)
            break
        if rh.visible and not rh.bad_norms and any(f.status == "approximate" for f in findings):
            # Post-LN: the conversion is approximate and measures its damage; no exact claim rests on the outputs.
            notes.append(f"converting the small instance (approximate norms left as they are) moves "
                         f"{rh.visible[0]}: the approximate conversion's damage includes it")
            break
        if rh.bad_norms:
            norm = min(rh.bad_norms, key=lambda n: ref.calls[n][0].start if ref.calls.get(n) else 0)
            _keep_role(findings, norm, lists, _bad_norm_reason(norm, rh.bad_norms[norm], findings, lists,
                                                               unexpressed))
            continue
        if extra:
            fixes = _drop_roles(model, probes, fixes, findings, extra, rh.visible[0], lists, ratio)
            continue
        _keep_all(findings, f"converting the small instance with the discovered adapter moves "
                            f"{rh.visible[0]}: discovery cannot explain this model's stream, so no norm is "
                            "converted on a guess")
    else:  # pragma: no cover - every round keeps at least one norm or repairs one role, so the loop ends first
        _keep_all(findings, "discovery could not settle on an adapter whose conversion of the instance is exact")
        adapter, unexpressed = build(model, model_type, fixes, findings, stream_outputs)
    if unexpressed:
        notes.append(f"roles outside the base model cannot be declared: {', '.join(unexpressed)}")
    return Settled(adapter, findings, fixes, stream_outputs, notes)


def _keep_all(findings: list[NormFinding], why: str) -> None:
    for f in findings:
        if f.status != "kept":
            f.status, f.reason = "kept", why


def _bad_norm_reason(norm: str, mean_ratio: float, findings: list[NormFinding], lists: dict[str, int],
                     unexpressed: list[str]) -> str:
    own = next((f for f in findings if f.name == norm), None)
    where = split_block(norm, lists)
    if own is not None and own.status == "kept" and where is not None:
        return (f"swapped by the block role {where[2]} of {where[0]}, but in {norm} it stays LayerNorm ({own.reason}), "
                "and one role covers every block")
    if unexpressed:
        return (f"its stream's writers {', '.join(unexpressed[:3])} lie outside the base model, where an adapter "
                "cannot name them")
    return (f"as the adapter applies to every block, {norm} reads a stream with a mean (|mean|/rms "
            f"{mean_ratio:.1e}) that the measured writers did not leave")


def _block_input_repair(model: nn.Module, probes: dict, ref: Trace, fixes: list[Fix], findings: list[NormFinding],
                        extra: list[Fix], lists: dict[str, int], tol: float, ratio: float,
                        repaired: set) -> tuple[list[Fix], str] | None:
    """A run-time re-centring inside a block that the template would also apply where it was not measured (the last
    conformer block's ``norm_out`` writes the model output, not a stream): re-centre every block's input instead,
    which serves the same streams and leaves the last block's output alone. Kept only if measured exact."""
    for e in extra:
        lst, rest = _role(e.name, lists)
        if e.layout not in ("recenter", "writes_stream") or lst is None or (lst, rest) in repaired:
            continue
        repaired.add((lst, rest))
        trial = [f for f in fixes if not (f.layout in RUNTIME and _role(f.name, lists) == (lst, rest))]
        trial += [Fix(f"{lst}.{i}", "recenter_input") for i in range(lists[lst])]
        _, tr = measure_fixes(model, probes, trial)
        exact = [f.name for f in findings if f.status == "exact"]
        visible, _ = output_effect(ref.outputs, tr.outputs, tol)
        if not visible and all(r <= ratio for r in norm_ratios(tr, exact).values()):
            return trial, (f"{rest} in {lst} re-centres the next block's stream, but not in the last block: every "
                           f"block of {lst} re-centres its input instead")
    return None


def _drop_roles(model: nn.Module, probes: dict, fixes: list[Fix], findings: list[NormFinding], extra: list[Fix],
                output: str, lists: dict[str, int], ratio: float) -> list[Fix]:
    """Drop the writer roles the template would apply where they were not measured (their mean reaches an output
    there); the norms those roles fed keep a mean and stay LayerNorm, each naming the role."""
    roles = {_role(e.name, lists) for e in extra}
    trial = [f for f in fixes if _role(f.name, lists) not in roles]
    _, tr = measure_fixes(model, probes, trial)
    exact = [f.name for f in findings if f.status == "exact"]
    ratios = norm_ratios(tr, exact)
    first = extra[0].name
    why = (f"its stream is written by {_role(first, lists)[1]}, a role of every block, but centring it in {first} "
           f"moves {output} (it is not a writer there): one role cannot say so")
    hit = False
    for f in findings:
        if f.status == "exact" and ratios.get(f.name, 0.0) > ratio:
            _keep_role(findings, f.name, lists, why)
            hit = True
    if not hit:
        _keep_all(findings, why)
    return trial
