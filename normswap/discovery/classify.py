"""Classify a model by what its norms *compute* and how they are wired, measured on probe inputs, not by names.

A norm is recognised by its input→output behaviour: a LayerNorm-like module is invariant to adding a per-token
multiple of the ones vector *and* to a per-token rescaling of its input; an RMSNorm-like module only to the rescaling.
Class names would miss ``CohereLayerNorm``/``OlmoLayerNorm`` (the silent "no LayerNorm" answers this exists to
prevent) and mislabel RMSNorms called ``LayerNorm`` (T5).

Pre-LN versus post-LN is then a property of the wiring, also measured: for two norms A then B on the same stream,
B's input minus A's *input* is a sum of module outputs computed in between (the sublayers' writes) in a pre-LN
model, while B's input minus A's *output* is such a sum in a post-LN model (the residual carries the normalised
tensor). When B's input *is* A's output, A writes the stream (BLOOM's embedding norm, CLIP's ``pre_layrnorm``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

#: Relative change below which a module is called invariant to a perturbation of its input (float64 instances).
INVARIANCE_TOL = 1e-4
#: Relative residual below which a difference of streams is called a sum of the outputs computed in between.
SPAN_TOL = 1e-6
#: How many earlier norms (most recent first) are tried as B's partner.
LOOKBACK = 8


@dataclass
class NormInfo:
    """One norm as measured: its function, and how it sits on the residual stream."""

    name: str
    kind: str  # "layernorm" | "rmsnorm" | "batchnorm" | "groupnorm" | "instancenorm"
    class_name: str
    axis: str = "last"  # "last" | "channels" (channels-first LayerNorm on [B, C, H, W])
    #: "pre": reads stream (its input = an earlier norm's input + writes); "post": reads an earlier norm's output +
    #: writes; "reads-norm-output": its input is an earlier norm's output (that norm writes the stream); "not-run":
    #: a LayerNorm class the probe never executed (known by class only); "branch": reads a sublayer's output, not
    #: a stream (Swin-v2 res-post-norm); None: unlinked.
    link: str | None = None
    link_from: str | None = None


@dataclass
class Classification:
    """The census category of one model and the evidence for it."""

    #: "pre-LN" | "post-LN" | "rmsnorm" | "other-norms" | "mixed" | "no-norms"
    category: str
    #: Position of the LayerNorm part ("pre" | "post" | "unlinked" | None), also for "mixed" models.
    ln_position: str | None
    norms: list[NormInfo] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def names(self, kind: str) -> list[str]:
        return [n.name for n in self.norms if n.kind == kind]

    @property
    def has_layernorm(self) -> bool:
        return any(n.kind == "layernorm" for n in self.norms)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Call:
    index_start: int
    index_end: int
    args: tuple
    kwargs: dict
    x: torch.Tensor | None
    y: torch.Tensor | None


def _first_tensor(obj) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if hasattr(obj, "to_tuple"):
        obj = obj.to_tuple()
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
        return obj[0]
    return None


def _record(model: nn.Module, probes: dict) -> dict[str, _Call]:
    """Run the model once and keep, for each module's first call, its input, output and place in the run order."""
    calls: dict[str, _Call] = {}
    starts: dict[str, int] = {}
    counter = [0]
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def pre(_m, args, kwargs, name=name):
            if name not in starts:
                starts[name] = counter[0]
            counter[0] += 1

        def post(_m, args, kwargs, out, name=name):
            counter[0] += 1
            if name in calls or name not in starts:
                return
            x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
            x = x if isinstance(x, torch.Tensor) and x.is_floating_point() else None
            y = _first_tensor(out)
            y = y.detach().clone() if isinstance(y, torch.Tensor) and y.is_floating_point() else None
            calls[name] = _Call(starts[name], counter[0], args, kwargs, x, y)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    # Inputs must be captured before later in-place updates of the stream: clone them in the pre-hook instead.
    inputs: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not name or any(True for _ in module.children()):
            continue

        def grab(_m, args, kwargs, name=name):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
            if name not in inputs and isinstance(x, torch.Tensor) and x.is_floating_point():
                inputs[name] = x.detach().clone()

        handles.append(module.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**probes)
    finally:
        for h in handles:
            h.remove()
    for name, call in calls.items():
        call.x = inputs.get(name, call.x)
    return calls


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).detach())


def _invariance(module: nn.Module, call: _Call, gen: torch.Generator) -> tuple[str | None, str]:
    """("layernorm" | "rmsnorm" | None, axis) from re-running ``module`` on shifted and rescaled copies of its input."""
    x, y = call.x, call.y
    if x is None or y is None or x.shape != y.shape or x.numel() == 0 or x.shape[-1] < 4:
        return None, "last"
    if torch.equal(x, y) or float(y.abs().max()) == 0.0:
        return None, "last"

    def run(x_new: torch.Tensor) -> torch.Tensor | None:
        args = (x_new, *call.args[1:]) if call.args else ()
        kwargs = dict(call.kwargs)
        if not call.args:
            kwargs["hidden_states"] = x_new
        try:
            out = _first_tensor(module(*args, **kwargs))
        except Exception:  # noqa: BLE001 - a module that cannot be re-run alone is simply not classified
            return None
        return out if isinstance(out, torch.Tensor) and out.shape == y.shape else None

    axes = [(-1, "last")] + ([(1, "channels")] if x.dim() == 4 else [])
    with torch.no_grad():
        # Work at rms 100 so that a norm's epsilon (up to ~1e-2) is invisible next to the variance.
        big = x * (100.0 / x.double().pow(2).mean().sqrt().clamp_min(1e-30)).to(x.dtype)
        base = run(big)
        other = run(torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype) * 100.0)
        if base is None or other is None or _rel(other, base) < INVARIANCE_TOL:  # ignores its input: not a norm
            return None, "last"
        for dim, axis in axes:
            shape = [1] * x.dim()
            for d in range(x.dim()):
                if d != dim % x.dim():
                    shape[d] = x.shape[d]
            scale = torch.exp(0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(x.dtype)
            scaled = run(big * scale)
            if scaled is None or _rel(scaled, base) > INVARIANCE_TOL:
                continue
            shift = torch.randn(shape, generator=gen, dtype=torch.float64).to(x.dtype) * 100.0
            shifted = run(big + shift)
            if shifted is not None and _rel(shifted, base) < INVARIANCE_TOL:
                return "layernorm", axis
            return "rmsnorm", axis
    return None, "last"


def _class_kind(module: nn.Module) -> str | None:
    """Norms that are not per-token functions of the hidden vector (they mix the batch or the spatial axes)."""
    name = type(module).__name__.lower()
    if isinstance(module, nn.modules.batchnorm._BatchNorm) or "batchnorm" in name:
        return "batchnorm"
    if isinstance(module, nn.GroupNorm) or "groupnorm" in name:
        return "groupnorm"
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) or "instancenorm" in name:
        return "instancenorm"
    return None


def _lstsq_fits(a: torch.Tensor, b: torch.Tensor, scale: float) -> bool:
    if not torch.isfinite(a).all() or not torch.isfinite(b).all():
        return False
    try:
        sol = torch.linalg.lstsq(a, b, driver="gelsd").solution
    except RuntimeError:  # a degenerate system (LAPACK refuses it): no evidence of a link
        return False
    return float((a @ sol - b).abs().max()) / scale < SPAN_TOL


def _in_span(r: torch.Tensor, candidates: list[torch.Tensor]) -> bool:
    """Whether ``r`` is (to rounding) a combination of ``candidates`` (all of r's shape, hidden axis last): one
    coefficient per candidate, or, failing that, one per candidate and hidden channel (a LayerScale applied inline,
    as BEiT's ``lambda_1 * attention_output``), the latter only when there are enough tokens to rule out chance."""
    scale = float(r.abs().max())
    if scale == 0.0:
        return True
    if not candidates:
        return False
    a = torch.stack([c.reshape(-1).double() for c in candidates], dim=1)
    if _lstsq_fits(a, r.reshape(-1, 1).double(), scale):
        return True
    hidden = r.shape[-1]
    rows = r.numel() // hidden
    if rows < 3 * len(candidates) + 4:
        return False
    per_channel = torch.stack([c.reshape(rows, hidden).double() for c in candidates], dim=-1)  # [rows, hidden, k]
    return _lstsq_fits(per_channel.transpose(0, 1), r.reshape(rows, hidden).double().T.unsqueeze(-1), scale)


def _same_stream(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same tokens and hidden size, whatever the layout ([B, T, H] or flattened [B·T, H] as OPT's MLP runs)."""
    return x.shape[-1] == y.shape[-1] and x.numel() == y.numel()


def _links(norms: list[NormInfo], calls: dict[str, _Call], norm_names: set[str], leaves: set[str]) -> None:
    """Fill ``link``/``link_from`` of every norm from the run order and the span tests described in the module doc.

    A norm whose input *is* a leaf module's output computed since the previous norm reads a sublayer output
    (Swin-v2's res-post-norm: ``x + LN(attn(x))``), not a stream: link "branch".
    """
    by_start = sorted((n for n in norms if calls[n.name].x is not None), key=lambda n: calls[n.name].index_start)
    others = [(c.index_end, c.y, name in leaves) for name, c in calls.items()
              if name not in norm_names and c.y is not None]
    for i, b in enumerate(by_start):
        cb = calls[b.name]
        xb = cb.x
        tried = 0
        for a in reversed(by_start[:i]):
            ca = calls[a.name]
            if ca.x is None or ca.y is None or not _same_stream(ca.x, xb) or not _same_stream(ca.y, xb) \
                    or ca.index_end > cb.index_start:
                continue
            tried += 1
            if tried > LOOKBACK:
                break
            xa, ya = ca.x.reshape(xb.shape), ca.y.reshape(xb.shape)
            between = [(y.reshape(xb.shape), leaf) for end, y, leaf in others
                       if ca.index_end < end < cb.index_start and _same_stream(y, xb)]
            # Copies of A's output or B's input (identity drop-paths, the containers that return them) would make
            # the span tests trivially true: the question is what *else* was added.
            outs = [y for y, _ in between if not (torch.equal(y, ya) or torch.equal(y, xb))]
            if float((xb - ya).abs().max()) <= SPAN_TOL * float(xb.abs().max()):
                b.link, b.link_from = "reads-norm-output", a.name
            elif _in_span(xb - xa, outs):
                b.link, b.link_from = "pre", a.name
            elif any(leaf and float((xb - y).abs().max()) <= SPAN_TOL * float(xb.abs().max()) for y, leaf in between):
                b.link, b.link_from = "branch", a.name
            elif _in_span(xb - ya, outs):
                b.link, b.link_from = "post", a.name
            else:
                continue
            break


def find_norms(model: nn.Module, probes: dict, *, seed: int = 0) -> list[NormInfo]:
    """Every norm of ``model`` (run once on ``probes``), found by behaviour, with its stream links."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # some modelling code builds float constants at the default dtype (XGLM)
    try:
        return _find_norms(model, probes, seed)
    finally:
        torch.set_default_dtype(previous)


def _find_norms(model: nn.Module, probes: dict, seed: int) -> list[NormInfo]:
    calls = _record(model, probes)
    gen = torch.Generator().manual_seed(seed)
    norms: list[NormInfo] = []
    for name, module in model.named_modules():
        if not name or name not in calls:
            continue
        kind = _class_kind(module)
        axis = "channels" if kind else "last"
        if kind is None and not any(True for _ in module.children()):
            kind, axis = _invariance(module, calls[name], gen)
        if kind is not None:
            norms.append(NormInfo(name, kind, type(module).__name__, axis))
    leaves = {name for name, m in model.named_modules() if name and not any(True for _ in m.children())}
    _links(norms, calls, {n.name for n in norms}, leaves)
    # Modules the probe never ran (a VLM's vision tower when the prompt could not carry an image) cannot be measured;
    # LayerNorm classes among them are still LayerNorms, so they are listed rather than silently dropped.
    for name, module in model.named_modules():
        if name and name not in calls and (isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(
                "LayerNorm") and "rms" not in type(module).__name__.lower()):
            norms.append(NormInfo(name, "layernorm", type(module).__name__, link="not-run"))
    return norms


def classify_norms(norms: list[NormInfo]) -> Classification:
    """The census category from measured norms (see :class:`Classification`)."""
    ln = [n for n in norms if n.kind == "layernorm"]
    rms = [n for n in norms if n.kind == "rmsnorm"]
    other = [n for n in norms if n.kind not in ("layernorm", "rmsnorm")]
    notes = []
    position = None
    if ln:
        links = {n.link for n in ln if n.link != "not-run"}
        if "post" in links:
            position = "post"
            notes.append("post-LN: " + ", ".join(n.name for n in ln if n.link == "post")[:300])
        elif links & {"pre", "reads-norm-output", "branch"}:
            position = "pre"
            if "branch" in links:
                notes.append("norms on sublayer outputs (res-post-norm): the stream is a sum of normalised writes")
        else:
            position = "unlinked"
            notes.append("LayerNorm not on a residual stream between norms (no link measured)")
    if other:
        notes.append(f"{len(other)} batch/group/instance norm(s): {', '.join(sorted({n.kind for n in other}))}")
    not_run = [n.name for n in ln if n.link == "not-run"]
    if not_run:
        notes.append(f"{len(not_run)} LayerNorm module(s) not run by the probe (known by class only), e.g. {not_run[0]}")
    if ln and rms:
        category = "mixed"
    elif ln:
        category = {"pre": "pre-LN", "post": "post-LN"}.get(position or "", "other-norms")
    elif rms:
        category = "rmsnorm"
    elif other:
        category = "other-norms"
    else:
        category = "no-norms"
    return Classification(category, position, norms, notes)


def classify(model: nn.Module, probes: dict | None = None, *, seed: int = 0) -> Classification:
    """Classify ``model`` (a small float64 instance is best: the invariance tests then resolve to ~1e-12)."""
    if probes is None:
        from normswap.discovery.instance import probe_inputs

        probes = probe_inputs(model)
    return classify_norms(find_norms(model, probes, seed=seed))
