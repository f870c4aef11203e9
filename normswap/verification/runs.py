"""One forward of a model on the probes at one dtype, recording what verification compares.

Each run records the model's primary output, every block's output stream and, for the converted model, the
|mean|/rms of each writer's output and of each swapped norm's input. The three runs (the original in float64, the
original and the converted model at the saved dtype) are compared by :mod:`normswap.verification.figures`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from normswap import maths
from normswap.errors import NormswapError, VerificationError
from normswap.verification.casting import ForwardOverride, Provider, memory_provider, run_at
from normswap.verification.structure import Block

DTYPE_NAMES = {torch.float64: "float64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def primary_output(outputs) -> torch.Tensor:
    """Logits when the model has a head, else the last hidden state: the first field of the ModelOutput."""
    if hasattr(outputs, "to_tuple"):
        return outputs.to_tuple()[0]
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


#: Output fields never compared: caches are not outputs of the computation the conversion must preserve.
_SKIPPED_OUTPUTS = ("past_key_values", "cache_params", "mems")


def named_outputs(outputs, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every floating tensor the model returns, by dotted field name ("pooler_output",
    "vision_model_output.last_hidden_state", "hidden_states.2"), first field first."""
    found: dict[str, torch.Tensor] = {}
    if torch.is_tensor(outputs):
        if outputs.is_floating_point():
            found[prefix or "output"] = outputs
        return found
    if hasattr(outputs, "to_tuple") and hasattr(outputs, "items"):
        items = list(outputs.items())
    elif isinstance(outputs, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(outputs)]
    else:
        return found
    for key, value in items:
        if key in _SKIPPED_OUTPUTS:
            continue
        found.update(named_outputs(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
    return found


def _stream(out) -> torch.Tensor | None:
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    if hasattr(out, "to_tuple"):
        return _stream(out.to_tuple())
    return None


#: The seed every run starts from, so that a model drawing random numbers draws the same ones in each run.
PROBE_SEED = 0


class _Draws:
    what: str = ""


@contextmanager
def seeded(seed: int = PROBE_SEED) -> Iterator[_Draws]:
    """Run the body with torch's, Python's and NumPy's generators seeded to ``seed``, restore them afterwards, and
    say which generator the body drew from (ViT-MAE's random masking draws noise in its forward: each run would
    mask different patches, and the runs would compare unrelated computations)."""
    import random

    import numpy as np

    draws = _Draws()
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        before = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda], random.getstate(),
                  np.random.get_state()[1].copy(), np.random.get_state()[2])
        try:
            yield draws
        finally:
            moved = []
            if not torch.equal(before[0], torch.get_rng_state()) or any(
                    not torch.equal(s, torch.cuda.get_rng_state(d)) for s, d in zip(before[1], cuda, strict=True)):
                moved.append("torch")
            if before[2] != random.getstate():
                moved.append("Python's random")
            if not np.array_equal(before[3], np.random.get_state()[1]) or before[4] != np.random.get_state()[2]:
                moved.append("NumPy")
            draws.what = " and ".join(moved)
            random.setstate(py_state)
            np.random.set_state(np_state)


@dataclass
class Run:
    """What one forward recorded (all tensors float64 on the CPU)."""

    dtype: torch.dtype
    output: torch.Tensor
    blocks: list[torch.Tensor | None]
    #: writer full name -> max over tokens of |mean|/rms of its output (converted run only)
    writers: dict[str, float] = field(default_factory=dict)
    #: swapped norm name -> (max |mean|/rms of its input, mean rms of its input) (converted run only)
    norms: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: The primary output's field name, and every other floating output by field name (float64, CPU).
    output_name: str = "output"
    others: dict[str, torch.Tensor] = field(default_factory=dict)
    #: What drew random numbers during the forward (torch/Python/NumPy generators), "" when nothing did: such a
    #: model's runs depend on the draws, so they cannot certify each other.
    random_draws: str = ""


@torch.no_grad()
def capture(model: nn.Module, probes: dict, dtype: torch.dtype, blocks: list[Block], *,
            provider: Provider = memory_provider, override: ForwardOverride | None = None,
            writers: list[tuple[str, nn.Module]] = (), norms: list[str] = (), what: str = "the model") -> Run:
    """Run ``model`` on ``probes`` at ``dtype`` and record outputs, block streams, writer outputs and norm inputs.

    A forward that fails, or that produces non-finite numbers, raises :class:`VerificationError` naming the module
    where it happened (never a pass on NaN figures).
    """
    streams: list[torch.Tensor | None] = [None] * len(blocks)
    writer_ratios: dict[str, float] = {}
    norm_stats: dict[str, list[tuple[float, float]]] = {}
    handles = []

    def block_hook(i: int):
        def hook(_m, _args, out):
            s = _stream(out)
            streams[i] = s.detach().to(torch.float64).cpu() if s is not None else None
        return hook

    def writer_hook(name: str):
        def hook(_m, _args, out):
            s = _stream(out)
            if s is not None and s.is_floating_point():
                r = float(maths.hidden_mean_ratio(s).max())
                writer_ratios[name] = max(r, writer_ratios.get(name, 0.0))
        return hook

    def norm_hook(name: str):
        def hook(_m, args):
            x = args[0]
            ratio = float(maths.hidden_mean_ratio(x).max())
            rms = float(x.detach().double().pow(2).mean(-1).sqrt().mean())
            norm_stats.setdefault(name, []).append((ratio, rms))
        return hook

    for i, block in enumerate(blocks):
        handles.append(block.module.register_forward_hook(block_hook(i)))
    for name, module in writers:
        handles.append(module.register_forward_hook(writer_hook(name)))
    for name in norms:
        handles.append(model.get_submodule(name).register_forward_pre_hook(norm_hook(name)))
    was_training = model.training
    model.eval()
    default = torch.get_default_dtype()
    try:
        if dtype == torch.float64:  # tensors the forward creates itself (mask fill values) are float64 too
            torch.set_default_dtype(torch.float64)
        with run_at(model, dtype, provider, override) as trace, seeded() as draws:
            try:
                named = named_outputs(model(**probes))
                out_name = next(iter(named), "output")
                out = named.pop(out_name) if named else None
            except NormswapError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure inside the model becomes one readable line
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise VerificationError(
                    f"{what} cannot run in {dtype_name(dtype)}: module {trace.last}: {type(exc).__name__}: {first}"
                ) from exc
    finally:
        torch.set_default_dtype(default)
        model.train(was_training)
        for h in handles:
            h.remove()
    if out is None:
        raise VerificationError(f"{what} returned no floating-point output on the probe inputs; nothing to compare")
    out = out.detach().to(torch.float64).cpu()
    others = {k: v.detach().to(torch.float64).cpu() for k, v in named.items()}
    if not bool(torch.isfinite(out).all()):
        where = trace.first_nonfinite or "the output"
        raise VerificationError(f"{what} is not finite in {dtype_name(dtype)} on the probe inputs: the first module "
                                f"with NaN/Inf output is {where}; nothing can be verified against it")
    stats = {n: (max(r for r, _ in v), sum(s for _, s in v) / len(v)) for n, v in norm_stats.items()}
    return Run(dtype, out, streams, writer_ratios, stats, out_name, others, draws.what)
