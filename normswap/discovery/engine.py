"""``discover(model)``: find a model's norms, the writers of their streams and their readers, by measurement.

The steps, each a measurement on a float64 copy of a small instance:
1. one traced pass on probe inputs; the norms are the modules that pass the shift and scale tests (norms.py);
2. every module or bare parameter whose output is norm-sized gets a random per-token multiple of ones added, one pass
   each: invisible ones are writers that can be centred, and the norms whose input moved along ones are the norms
   they feed (writers.py);
3. the affine writers (and LayerScale pairs) are centred in a copy; norms still reading a non-zero mean get their
   nonlinear producers re-centred one at a time (a norm whose output is the stream, a positions module, the inline
   input of a block), until every norm that can be exact is (simulate.py);
4. what is left is classified: post-LN (input = an earlier norm's output + centred writers: approximate), blocked by a
   raw reader (a module or an output that reads the stream without a norm), or not a stream at all (per-head q/k
   norms). Every refusal names the module and why.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from normswap import maths
from normswap.discovery import readers as _readers
from normswap.discovery.capture import Trace, same, trace
from normswap.discovery.norms import UNRUN_REASON, find_norms, innermost_names, other_norm_counts, unrun_layernorms
from normswap.discovery.probing import optional_probes
from normswap.discovery.rehearsal import settle
from normswap.discovery.result import Discovery, NormFinding
from normswap.discovery.simulate import Fix, measure_fixes, norm_ratios
from normswap.discovery.template import module_lists, split_block
from normswap.discovery.writers import (
    OUTPUT_TOL,
    REDUCED_TOL,
    Effect,
    affine_layout,
    check_deterministic,
    find_layer_scale,
    measure,
    module_candidates,
    output_effect,
    param_candidates,
    raw_readers,
    wrapper_aliases,
)
from normswap.errors import NormswapError

#: |mean|/rms at a norm's input below which discovery calls the norm exact (float64 instance).
RATIO = 1e-6


class DiscoveryError(NormswapError):
    """The model cannot be measured (a stochastic forward, a forward that fails on probe inputs)."""


def _start(tr: Trace, name: str) -> int:
    calls = tr.calls.get(name)
    return calls[0].start if calls else 1 << 30


def _output_ratio(tr: Trace, module: nn.Module, name: str) -> float:
    axis = 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1
    vals = [float(maths.hidden_mean_ratio(c.out.movedim(axis, -1)).max()) for c in tr.calls.get(name, [])
            if c.out is not None]
    return max(vals, default=0.0)


class _Engine:
    def __init__(self, model: nn.Module, probes: dict, seed: int) -> None:
        self.model, self.probes, self.seed = model, probes, seed
        self.modules = dict(model.named_modules())
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []

    def _tick(self, label: str, t0: float) -> float:
        now = time.perf_counter()
        self.timings[label] = round(now - t0, 3)
        return now

    def run(self, model_type: str) -> Discovery:
        t = t0 = time.perf_counter()
        ref = self.ref = trace(self.model, self.probes, keep_args=True)
        moving = check_deterministic(self.model, self.probes, ref)
        if moving:
            raise DiscoveryError(f"the model's outputs ({', '.join(moving[:3])}) change between two identical runs "
                                 "in eval mode; discovery needs a deterministic forward")
        found = find_norms(self.model, ref, self.seed)
        ln = [f.name for f in found if f.kind == "layernorm"]
        rms = [f.name for f in found if f.kind == "rmsnorm"]
        unrun = unrun_layernorms(self.model, ref, self.seed)
        t = self._tick("norms", t)
        if not ln:
            return Discovery(model_type, None, [], rms, [], {}, [], time.perf_counter() - t0, self.timings,
                             unrun_norms=unrun, other_norms=other_norm_counts(self.model))
        hidden = {f.hidden for f in found if f.kind == "layernorm"}
        # Norms that compute in float32 whatever their input leave rounding-sized traces of an invisible shift.
        self.tol = REDUCED_TOL if max(f.noise for f in found if f.kind == "layernorm") > 1e-12 else OUTPUT_TOL
        mods = module_candidates(self.model, ref, hidden, skip=set())
        aliases = self.aliases = wrapper_aliases(ref, mods)
        pars = param_candidates(self.model, ref, hidden, {f.name for f in found})
        effects = measure(self.model, self.probes, ref, [m for m in mods if m not in aliases], "module", ln,
                          self.seed + 1, self.tol)
        for wrapper, inner in aliases.items():  # a wrapper returning its child's output unchanged: same effect
            e = effects[inner]
            effects[wrapper] = Effect(wrapper, "module", list(e.visible), list(e.raw_outputs), set(e.feeds))
        effects.update(measure(self.model, self.probes, ref, pars, "param", ln, self.seed + 1000, self.tol))
        self.effects = effects
        t = self._tick("writers", t)

        fixes, feeds = self._affine_fixes(effects, set(ln))
        fixes, feeds, tr, ratios = self._iterate(fixes, feeds, effects, ln)
        t = self._tick("centring", t)

        fixes, tr, ratios = self._prune_nonlinear(fixes, tr, ratios, ln)
        fixes, tr, ratios = self._prune_subsumed(fixes, feeds, tr, ratios, ln)
        findings, raw = self._classify(ln, ratios, tr, effects, fixes)
        swapped = {f.name for f in findings if f.status != "kept"}
        kept_fixes = [f for f in fixes if f.layout in ("recenter", "recenter_input", "writes_stream")
                      or feeds.get(f.name, set()) & swapped]
        if kept_fixes != fixes:
            sim, tr2 = measure_fixes(self.model, self.probes, kept_fixes)
            r2 = norm_ratios(tr2, ln)
            if all(r2[f.name] <= RATIO for f in findings if f.status == "exact"):
                fixes, tr = kept_fixes, tr2
            else:
                self.notes.append("pruning writers that feed no swapped norm broke a norm; all candidates kept")
        else:
            sim = None
        findings = self._verify_outputs(findings, fixes)
        # Never silently left: a LayerNorm the probe did not reach stays LayerNorm, and the report says why.
        findings += [NormFinding(n, "kept", UNRUN_REASON) for n in unrun]
        stream_outputs = sorted({o for f in fixes for o in self._effect_of(f).raw_outputs})
        for f in findings:
            if f.status != "kept":
                f.readers = _readers.fold_readers(self.model, self.probes, ref, f.name, self.tol)
        t = self._tick("readers", t)

        # The claim is checked on the adapter as the conversion applies it (every block), not on the measurements.
        settled = settle(self.model, self.probes, ref, model_type, fixes, findings, stream_outputs, self.tol, RATIO,
                         feeds)
        adapter, fixes, stream_outputs = settled.adapter, settled.fixes, settled.stream_outputs
        self.notes += settled.notes
        self._tick("rehearsal", t)
        del sim
        return Discovery(model_type, adapter, findings, rms, fixes, raw, stream_outputs,
                         time.perf_counter() - t0, self.timings, self.notes, module_lists(self.model),
                         unrun_norms=unrun, other_norms=other_norm_counts(self.model))

    # --- writers ---------------------------------------------------------------------------------------------------

    def _effect_of(self, fix: Fix) -> Effect:
        if fix.layout == "recenter_input":
            return self.effects.get("input:" + fix.name) or Effect(fix.name, "input")
        return self.effects.get(fix.name) or Effect(fix.name, "module")

    def _affine_fixes(self, effects: dict[str, Effect], norm_names: set[str]) -> tuple[list[Fix], dict[str, set]]:
        fixes, feeds = [], {}
        order = sorted(effects.values(), key=lambda e: _start(self.ref, e.name) if e.kind == "module" else -1)
        for e in order:
            if not e.invisible:
                continue
            if e.kind == "param":
                fixes.append(Fix(e.name, "param"))
                feeds[e.name] = set(e.feeds)
            elif (layout := affine_layout(self.modules[e.name])) is not None:
                fixes.append(Fix(e.name, layout))
                feeds[e.name] = set(e.feeds)
        fixed = {f.name for f in fixes}
        self.scaled: set[str] = set()
        for e in order:
            if e.kind != "module" or not e.invisible or e.name in fixed or e.name in norm_names:
                continue
            if affine_layout(self.modules[e.name]) is not None:
                continue
            for writer, scale in find_layer_scale(self.model, self.ref, e.name):
                self.scaled.add(e.name)
                if writer in fixed:  # invisible on its own too (no output reads its stream): the scale still folds
                    feeds[writer] |= e.feeds
                    fixes = [Fix(f.name, f.layout, scale) if f.name == writer and f.scale is None else f for f in fixes]
                    continue
                fixes.append(Fix(writer, affine_layout(self.modules[writer]), scale=scale))  # type: ignore[arg-type]
                fixed.add(writer)
                feeds[writer] = set(e.feeds)
        return fixes, feeds

    def _iterate(self, fixes: list[Fix], feeds: dict[str, set], effects: dict[str, Effect], ln: list[str]):
        """Add nonlinear producers (re-centred) one at a time until no failing norm can be helped."""
        for _ in range(12):
            sim, tr = measure_fixes(self.model, self.probes, fixes)
            ratios = norm_ratios(tr, ln)
            failing = sorted((n for n in ln if ratios[n] > RATIO), key=lambda n: _start(tr, n))
            fix = self._next_fix(failing, tr, effects, {f.name for f in fixes}, set(ln))
            if fix is None:
                return fixes, feeds, tr, ratios
            fixes = [*fixes, fix]
            feeds[fix.name] = set(self._effect_of(fix).feeds)
        return fixes, feeds, tr, ratios

    def _prune_nonlinear(self, fixes: list[Fix], tr: Trace, ratios: dict[str, float], ln: list[str]):
        """Drop re-centrings made redundant by a later one (wav2vec2: the sum after the positional conv suffices)."""
        nonlinear = [f for f in fixes if f.layout in ("recenter", "recenter_input")]
        exact = {n for n in ln if ratios[n] <= RATIO}
        for f in reversed(nonlinear[:-1]):
            trial = [g for g in fixes if g != f]
            _, tr2 = measure_fixes(self.model, self.probes, trial)
            r2 = norm_ratios(tr2, ln)
            if all(r2[n] <= RATIO for n in exact):
                fixes, tr, ratios = trial, tr2, r2
        return fixes, tr, ratios

    def _prune_subsumed(self, fixes: list[Fix], feeds: dict[str, set], tr: Trace, ratios: dict[str, float],
                        ln: list[str]):
        """Drop affine writers whose stream a run-time re-centring already centres (Whisper's encoder positions are
        added before ``layers.0``, whose input is re-centred): the minimal set is what gets declared."""
        recentring = [f for f in fixes if f.layout in ("recenter", "recenter_input", "writes_stream")]
        exact = {n for n in ln if ratios[n] <= RATIO}
        for f in [f for f in fixes if f not in recentring]:
            mine = feeds.get(f.name, set())
            if not mine or not any(mine <= feeds.get(r.name, set()) for r in recentring):
                continue
            trial = [g for g in fixes if g != f]
            _, tr2 = measure_fixes(self.model, self.probes, trial)
            r2 = norm_ratios(tr2, ln)
            if all(r2[n] <= RATIO for n in exact):
                fixes, tr, ratios = trial, tr2, r2
        return fixes, tr, ratios

    def _next_fix(self, failing: list[str], tr: Trace, effects: dict[str, Effect], fixed: set[str],
                  ln: set[str]) -> Fix | None:
        for n in failing:
            if any(n in e.feeds and not e.invisible for e in effects.values()):
                continue  # a writer of this stream is visible: no re-centring can make it exact
            # A producer re-centred at run time must write a real stream (read by several norms, or summed with
            # other writers into this norm's input), and must not hold norms itself (re-centring a whole block would
            # hide what is inside it).
            summed = sum(1 for e in effects.values() if n in e.feeds and e.invisible and e.name not in self.aliases)
            feeders = [e.name for e in effects.values()
                       if n in e.feeds and (len(e.feeds) >= 2 or summed >= 2) and e.invisible and e.kind == "module"
                       and e.name not in fixed and e.name not in self.scaled
                       and affine_layout(self.modules[e.name]) is None
                       and not any(m.startswith(e.name + ".") for m in ln)
                       and _output_ratio(tr, self.modules[e.name], e.name) > RATIO]
            if feeders:
                pick = min(innermost_names(feeders), key=lambda m: _start(tr, m))
                return Fix(pick, "writes_stream" if pick in ln else "recenter")
            fix = self._recenter_input(n, tr, fixed, ln)
            if fix is not None:
                return fix
        return None

    def _recenter_input(self, norm: str, tr: Trace, fixed: set[str], ln: set[str]) -> Fix | None:
        """The stream entered between modules (inline code): re-centre the input of the outermost module reading it."""
        calls = tr.calls.get(norm)
        if not calls or calls[0].inp is None:
            return None
        x = calls[0].inp
        parts = norm.split(".")
        for k in range(1, len(parts)):
            anc = ".".join(parts[:k])
            acalls = tr.calls.get(anc)
            if anc in fixed or not acalls or acalls[0].inp is None or not same(acalls[0].inp, x):
                continue
            effect = measure(self.model, self.probes, self.ref, [anc], "input", sorted(ln), self.seed + 5000,
                             self.tol)[anc]
            if not effect.invisible or len(effect.feeds | {norm}) < 2:
                return None  # visible, or a stream of one norm (re-centring a norm's own input proves nothing)
            effect.feeds.add(norm)
            self.effects["input:" + anc] = effect
            return Fix(anc, "recenter_input")
        return None

    # --- classification --------------------------------------------------------------------------------------------

    def _classify(self, ln: list[str], ratios: dict[str, float], tr: Trace, effects: dict[str, Effect],
                  fixes: list[Fix]) -> tuple[list[NormFinding], dict[str, str]]:
        lists = module_lists(self.model)
        findings, raw = [], {}
        diagnosed: dict[str, tuple[list[str], list[str]]] = {}
        for n in ln:
            if ratios[n] <= RATIO:
                findings.append(NormFinding(n, "exact", mean_ratio=ratios[n]))
                continue
            visible = sorted((e for e in effects.values() if n in e.feeds and not e.invisible),
                             key=lambda e: (e.name in ln, e.kind != "module" or affine_layout(self.modules[e.name])
                                            is None, _start(self.ref, e.name)))
            post_of = self._post_ln_source(n, tr, ln)
            if visible:
                e = visible[0]
                if e.name not in diagnosed:
                    diagnosed[e.name] = (raw_readers(self.model, self.probes, self.ref, e, tol=self.tol), e.visible)
                readers, outputs = diagnosed[e.name]
                first = readers[0] if readers else None
                where, first_where = split_block(n, lists), split_block(first, lists) if first else None
                if first_where is not None and where is not None and first_where[0] == where[0]:
                    # A sublayer of the same blocks reads the stream without a norm: the post-LN pattern (OPT with
                    # do_layer_norm_before=False, layer 0 of BERT-likes, ModernBERT's layer 0).
                    source = f"the output of {post_of} plus sublayer outputs" if post_of else f"a stream {first} reads"
                    findings.append(NormFinding(n, "approximate", f"reads {source} without a norm in between "
                                                "(post-LN): not zero-mean", ratios[n]))
                    continue
                if first is not None:
                    reason = (f"the mean of its stream (written by {e.name}) is visible to {first}, which reads the "
                              "stream without a per-token norm")
                    raw.setdefault(first, f"reads the stream of {n} without a norm")
                else:
                    reason = (f"the mean of its stream (written by {e.name}) reaches the model output "
                              f"{outputs[0] if outputs else '?'} without a norm")
                findings.append(NormFinding(n, "kept", reason, ratios[n]))
            elif post_of is not None:
                findings.append(NormFinding(n, "approximate", f"reads the output of {post_of} plus sublayer outputs "
                                            "(post-LN): not zero-mean", ratios[n]))
            else:
                findings.append(NormFinding(n, "kept", "its input is not a sum of writers whose mean the model cannot "
                                            "see (it reads a projection, not the residual stream)", ratios[n]))
        return findings, raw

    def _post_ln_source(self, norm: str, tr: Trace, ln: list[str]) -> str | None:
        """An earlier norm whose output has, token by token, the same mean as this norm's input (post-LN)."""
        calls = tr.calls.get(norm)
        if not calls or calls[0].inp is None:
            return None
        x_mean = calls[0].inp.mean(-1)
        start = calls[0].start
        best = None
        for m in ln:
            mc = tr.calls.get(m)
            if m == norm or not mc or mc[0].out is None or mc[0].start >= start or mc[0].out.shape != calls[0].inp.shape:
                continue
            if same(mc[0].out.mean(-1), x_mean, 1e-6):
                best = m if best is None or mc[0].start > tr.calls[best][0].start else best
        return best

    def _verify_outputs(self, findings: list[NormFinding], fixes: list[Fix]) -> list[NormFinding]:
        """Centring every discovered writer must leave the outputs where they were (stream outputs along ones)."""
        sim, tr = measure_fixes(self.model, self.probes, fixes)
        visible, _ = output_effect(self.ref.outputs, tr.outputs, self.tol)
        if not visible:
            return findings
        reason = (f"centring the discovered writers moved the output {visible[0]}: discovery cannot explain this "
                  "model's stream, so no norm is converted on a guess")
        self.notes.append(reason)
        fixes.clear()
        return [NormFinding(f.name, "kept", reason, f.mean_ratio) for f in findings]


def prepare(model: nn.Module, seed: int = 0) -> nn.Module:
    """A float64, eval-mode, perturbed deep copy of ``model`` (the caller's model is never touched)."""
    from normswap.discovery.instance import perturb_

    if any(p.device.type == "meta" for p in model.parameters()):
        raise DiscoveryError("discover() needs a model with real weights; use discover_from_config for a meta model")
    work = copy.deepcopy(model).to(torch.float64).eval()
    return perturb_(work, seed)


def discover(model: nn.Module, probes: dict | None = None, *, seed: int = 0) -> Discovery:
    """Discover ``model``'s norms, writers and readers on a float64 copy of it (meant for small instances)."""
    from normswap.discovery.instance import probe_inputs

    work = prepare(model, seed)
    # Modelling code that builds constants with the default dtype (XGLM's torch.full(finfo(float64).min)) would
    # overflow in float32: the whole measurement runs with float64 as the default.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        if probes is None:
            probes = optional_probes(work, probe_inputs(work))
        probes = {k: v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in probes.items()}
        return _Engine(work, probes, seed).run(getattr(work.config, "model_type", type(model).__name__))
    except DiscoveryError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own forward failed on the probes: say which and why
        raise DiscoveryError(f"discovery could not run {type(model).__name__} on probe inputs: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    finally:
        torch.set_default_dtype(previous)
