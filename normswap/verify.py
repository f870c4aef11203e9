"""Measure what a conversion did: output differences against the original and the mean of every swapped norm's input.

The reference outputs are captured *before* the in-place conversion, so no second copy of the model is needed.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from normswap import maths

#: A short public-domain text (Shakespeare, Sonnet 18) used as the default token probe.
PROBE_TEXT = (
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate: Rough winds do shake the "
    "darling buds of May, And summer's lease hath all too short a date."
)

#: Default relative tolerance on max |Δoutput| / max |output|, by dtype of the verified model.
DEFAULT_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}

#: |mean|/rms above this at a swapped norm's input means the stream was not centred (a bug for exact norms).
MEAN_RATIO_THRESHOLD = 1e-4


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def make_probes(model: nn.Module, tokenizer=None, batch: int = 2, seq_len: int = 32, seed: int = 0) -> dict:
    """Inputs for the model's main input: tokenizer ids on a built-in text (+ random ids), or random pixels."""
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    device = model_device(model)
    main = getattr(model, "main_input_name", "input_ids")
    if main not in ("input_ids", "pixel_values") or getattr(config, "is_encoder_decoder", False) or (
            main == "input_ids" and "pixel_values" in inspect.signature(model.forward).parameters):
        # audio features, decoder ids, text + pixels (Whisper, M2M100, CLIPModel): every input the model needs
        from normswap.discovery.instance import probe_inputs

        return {k: v.to(device) for k, v in probe_inputs(model, batch=batch, seq_len=seq_len, seed=seed).items()}
    if main == "pixel_values":
        size = getattr(config, "image_size", 224)
        channels = getattr(config, "num_channels", 3)
        pixels = torch.randn(batch, channels, size, size, generator=gen)
        probes = {"pixel_values": pixels.to(device=device, dtype=model_dtype(model))}
        patch = getattr(config, "patch_size", None)
        if "noise" in inspect.signature(model.forward).parameters and isinstance(size, int) and isinstance(patch, int):
            # ViT-MAE masks patches at random unless given the noise: every run must mask the same patches
            noise = torch.rand(batch, (size // patch) ** 2, generator=gen)
            probes["noise"] = noise.to(device=device, dtype=model_dtype(model))
        return probes
    if main != "input_ids":
        raise ValueError(f"don't know how to build probe inputs for main input {main!r}")
    text_config = config.get_text_config()
    vocab = text_config.vocab_size
    max_pos = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    if max_pos:
        seq_len = min(seq_len, int(max_pos))
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    if tokenizer is not None:
        tok = tokenizer(PROBE_TEXT)["input_ids"][:seq_len]
        tok = [t for t in tok if 0 <= t < vocab]
        if len(tok) >= 4:
            ids[0, : len(tok)] = torch.tensor(tok)
            ids[0, len(tok):] = ids[1, : seq_len - len(tok)]
    return {"input_ids": ids.to(device)}


def primary_output(outputs) -> torch.Tensor:
    """Logits when the model has a head, else the last hidden state: the first field of the ModelOutput."""
    if hasattr(outputs, "to_tuple"):
        return outputs.to_tuple()[0]
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def _is_logits(model: nn.Module, out: torch.Tensor) -> bool:
    """Whether the primary output is a distribution over classes/tokens (KL, top-1) or a hidden state (cosine)."""
    hidden = getattr(model.config.get_text_config(), "hidden_size", None)
    get_out = getattr(model, "get_output_embeddings", None)
    has_head = get_out is not None and get_out() is not None
    return has_head or out.shape[-1] != hidden


@torch.no_grad()
def reference_outputs(model: nn.Module, probes: dict) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return primary_output(model(**probes)).detach().to(torch.float64).cpu()
    finally:
        model.train(was_training)


@dataclass
class NormInputStats:
    max_mean_over_rms: float
    mean_rms: float
    exact: bool

    @property
    def centered(self) -> bool:
        return self.max_mean_over_rms < MEAN_RATIO_THRESHOLD


@dataclass
class VerificationResult:
    """Figures that tell whether the converted model computes what the conversion claims.

    With ``reference == "float64"`` (every conversion since issue 12) the reference is the original model run in
    float64, and ``original_error``/``converted_error`` are the relative max |Δoutput| of the original and of the
    converted model, both at the saved dtype ``dtype``, against it; ``tolerance`` is the bound the converted error
    was held to. ``max_abs_diff``/``rel_max_abs_diff`` keep their old meaning (converted against the original at
    the same dtype), KL/top-1/cosine compare the converted model with the float64 original.
    """

    max_abs_diff: float
    max_abs_reference: float
    rel_max_abs_diff: float
    kl: float | None
    top1_agreement: float | None
    cosine_min: float | None
    tolerance: float
    output_kind: str
    probe: str
    norm_inputs: dict[str, NormInputStats] = field(default_factory=dict)
    uncentered_exact_norms: list[str] = field(default_factory=list)
    passed: bool = True
    #: Mean over tokens of the hidden-state cosine (encoders): the typical damage, where ``cosine_min`` is the worst.
    cosine_mean: float | None = None
    #: What the figures are measured against: "float64" (the original in float64) or "original" (same dtype, legacy).
    reference: str = "original"
    #: The dtype both models were run at for the figures: the dtype the model is saved in.
    dtype: str | None = None
    original_error: float | None = None
    converted_error: float | None = None
    #: converted_error / original_error (< 1: the converted model is closer to the float64 original).
    ratio: float | None = None
    #: The absolute floor of the bound (a few ulps of the output at ``dtype``) and the bound applied.
    floor: float | None = None
    mode: str = "exact"
    #: Per block: label, module name, both streams' errors against float64 after centring, passed, problems.
    blocks: list[dict] = field(default_factory=list)
    blocks_checked: int = 0
    #: The first thing that failed, named by block and module ("block 3: mlp.dense_4h_to_h output not centred").
    first_failure: str | None = None
    uncentered_writers: list[str] = field(default_factory=list)
    #: What was run: "whole model, module by module" or a streamed/partial description.
    scope: str = ""
    #: The primary output's field name (the figures above), and each other output's figures against float64
    #: ({field: original_error, converted_error, bound, passed, mean_removed}).
    output_name: str | None = None
    outputs: dict[str, dict] = field(default_factory=dict)
    #: Outputs that are the residual stream itself (CLIP vision's last_hidden_state, hidden_states): an exact
    #: conversion returns them mean-removed by design, so they were compared after removing each token's mean.
    raw_stream_outputs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["norm_inputs"] = {k: asdict(v) for k, v in self.norm_inputs.items()}
        if self.reference == "float64":  # the figures in words, for config.json readers
            d["summary"] = self.summary()
        return d

    def _worst_exact_mean(self) -> float:
        return max((s.max_mean_over_rms for s in self.norm_inputs.values() if s.exact), default=0.0)

    def _distribution_parts(self) -> list[str]:
        parts = []
        if self.kl is not None:
            parts.append(f"KL = {self.kl:.3e}")
        if self.top1_agreement is not None:
            parts.append(f"top-1 agreement = {100 * self.top1_agreement:.2f}%")
        if self.cosine_min is not None:
            parts.append(f"min cosine = {self.cosine_min:.6f}")
        if self.cosine_mean is not None:
            parts.append(f"mean cosine = {self.cosine_mean:.6f}")
        return parts

    def summary(self) -> str:
        if self.reference == "float64":
            return self._truth_summary()
        parts = [
            f"max|Δ{self.output_kind}| = {self.max_abs_diff:.3e} (relative {self.rel_max_abs_diff:.3e}, "
            f"tolerance {self.tolerance:.0e})"
        ]
        parts += self._distribution_parts()
        parts.append(f"max |mean|/rms at exact norm inputs = {self._worst_exact_mean():.1e}")
        return ", ".join(parts)

    def raw_stream_outputs_note(self) -> str:
        """The raw-stream outputs in words (stdout, card)."""
        names = ", ".join(self.raw_stream_outputs)
        return (f"{names} {'is' if len(self.raw_stream_outputs) == 1 else 'are'} the raw residual stream: returned "
                "mean-removed (x − mean(x) per token) by design, compared after removing the mean")

    def _truth_summary(self) -> str:
        dt = self.dtype or "the saved dtype"
        if self.mode == "approximate":
            head = (f"approximate: damage {self.converted_error:.1e} (relative max |Δ{self.output_kind}|) from the "
                    f"float64 original; the original in {dt}: {self.original_error:.1e}")
            parts = [head, *self._distribution_parts()]
            approx = sorted(((n, s.max_mean_over_rms) for n, s in self.norm_inputs.items() if not s.exact),
                            key=lambda x: -x[1])
            if approx:
                shown = ", ".join(f"{n} {r:.1e}" for n, r in approx[:4])
                more = f" and {len(approx) - 4} more" if len(approx) > 4 else ""
                parts.append(f"input |mean|/rms of the approximate norms: {shown}{more}")
            exact = [s for s in self.norm_inputs.values() if s.exact]
            if exact:
                ok = "PASSED" if not self.uncentered_exact_norms else "FAILED"
                parts.append(f"zero-mean check of the {len(exact)} exact norm inputs {ok} "
                             f"(max |mean|/rms {self._worst_exact_mean():.1e})")
            return "; ".join(parts)
        ratio = f"{self.ratio:.3g}×" if self.ratio is not None else "n/a"
        parts = [
            f"converted: {self.converted_error:.1e} from the float64 original; the original in {dt}: "
            f"{self.original_error:.1e} (converted/original {ratio}, bound {self.tolerance:.1e})",
            *self._distribution_parts(),
            f"max |mean|/rms at exact norm inputs = {self._worst_exact_mean():.1e}",
        ]
        if self.blocks_checked:
            parts.append(f"{self.blocks_checked} blocks checked")
        if self.outputs:
            worst = max(self.outputs, key=lambda n: self.outputs[n]["converted_error"])
            parts.append(f"{len(self.outputs)} other output(s) checked (worst {worst}: "
                         f"{self.outputs[worst]['converted_error']:.1e})")
        if self.raw_stream_outputs:
            parts.append(f"{self.raw_stream_outputs_note()}")
        text = ", ".join(parts)
        if self.first_failure:
            text += f"; first failure: {self.first_failure}"
        return text


@torch.no_grad()
def verify(
    model: nn.Module,
    probes: dict,
    reference: torch.Tensor,
    norms: dict[str, bool],
    tolerance: float | None = None,
    probe_desc: str = "",
) -> VerificationResult:
    """Compare ``model`` on ``probes`` with ``reference`` and record the input statistics of each swapped norm.

    ``norms`` maps each swapped norm's full name to whether it is claimed exact; an exact norm whose input is not
    ~zero-mean fails verification even when the outputs happen to agree.
    """
    stats: dict[str, list[tuple[float, float]]] = {}
    handles = []
    for name in norms:
        module = model.get_submodule(name)

        def hook(_m, inp, name=name):
            x = inp[0]
            ratio = maths.hidden_mean_ratio(x)
            rms = x.detach().double().pow(2).mean(-1).sqrt()
            stats.setdefault(name, []).append((float(ratio.max()), float(rms.mean())))

        handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        out = primary_output(model(**probes)).detach().to(torch.float64).cpu()
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    diff = (out - reference).abs()
    max_abs = float(diff.max())
    ref_max = float(reference.abs().max())
    rel = max_abs / max(ref_max, 1e-30)
    is_logits = _is_logits(model, out)
    kl = top1 = cos = cos_mean = None
    if is_logits:
        logp_ref = torch.log_softmax(reference, -1)
        logp = torch.log_softmax(out, -1)
        kl = float((logp_ref.exp() * (logp_ref - logp)).sum(-1).mean())
        top1 = float((reference.argmax(-1) == out.argmax(-1)).double().mean())
    else:
        cosines = torch.nn.functional.cosine_similarity(out, reference, dim=-1)
        cos, cos_mean = float(cosines.min()), float(cosines.mean())
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCE.get(model_dtype(model), 1e-4)
    norm_stats = {
        name: NormInputStats(max(r for r, _ in v), sum(s for _, s in v) / len(v), norms[name])
        for name, v in stats.items()
    }
    uncentered = [n for n, s in norm_stats.items() if s.exact and not s.centered]
    exact_claimed = all(norms.values())
    passed = not uncentered and (rel <= tolerance or not exact_claimed)
    return VerificationResult(
        max_abs_diff=max_abs,
        max_abs_reference=ref_max,
        rel_max_abs_diff=rel,
        kl=kl,
        top1_agreement=top1,
        cosine_min=cos,
        tolerance=tolerance,
        output_kind="logit" if is_logits else "hidden",
        probe=probe_desc,
        norm_inputs=norm_stats,
        uncentered_exact_norms=uncentered,
        passed=passed,
        cosine_mean=cos_mean,
    )
