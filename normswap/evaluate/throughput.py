"""Throughput with optimum-benchmark's definitions, several models interleaved in one process.

* prefill: ``generate(max_new_tokens=1, min_new_tokens=1)`` on a ``prompt_len``-token prompt (one forward over the
  prompt plus picking one token); prefill tokens/s = batch × prompt_len / prefill time.
* decode: ``generate`` with ``min_new_tokens = max_new_tokens = new_tokens``; decode tokens/s =
  batch × (new_tokens − 1) / (generate time − prefill time).
* encoders (no ``generate``): prefill is one forward; tokens = batch × the model's sequence length; no decode.

Models run interleaved (A B A B …) per repeat, so thermal or background drift hits all of them alike. A repeat's
decode time is its generate time minus the median prefill time of the same model and batch size (as
optimum-benchmark subtracts its aggregate prefill latency), so one noisy prefill cannot spoil a decode figure; a
generate that finished faster than the median prefill is discarded and counted. Memory is measured in a separate
untimed run so the sampling cannot perturb the timings.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from normswap.evaluate.environment import environment
from normswap.evaluate.loading import is_causal_lm
from normswap.evaluate.nonorm import without_norms
from normswap.evaluate.perplexity import model_context_length
from normswap.verify import model_device, model_dtype

NO_NORM = "no_norm"


@dataclass
class BenchSettings:
    prompt_len: int = 128
    new_tokens: int = 64
    batch_sizes: tuple[int, ...] = (1, 8)
    warmup: int = 2
    repeats: int = 5
    seed: int = 0

    def validate(self, model: nn.Module) -> None:
        if self.prompt_len < 1 or self.repeats < 1 or self.warmup < 0 or not self.batch_sizes:
            raise ValueError("prompt_len and repeats must be >= 1, warmup >= 0, and at least one batch size given")
        if any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be >= 1; got {list(self.batch_sizes)}")
        if is_causal_lm(model):
            if self.new_tokens < 2:
                raise ValueError("decode throughput needs --new-tokens >= 2 (the first new token belongs to prefill)")
            context = model_context_length(model)
            if context and self.prompt_len + self.new_tokens > context:
                raise ValueError(
                    f"prompt ({self.prompt_len}) + new tokens ({self.new_tokens}) exceed the model's context of "
                    f"{context} tokens; lower --prompt-len or --new-tokens"
                )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[dict], object], inputs: dict, device: torch.device) -> float:
    """Wall seconds of ``fn(inputs)``, synchronising the GPU around it so queued kernels are counted."""
    _sync(device)
    start = time.perf_counter()
    fn(inputs)
    _sync(device)
    return time.perf_counter() - start


class PeakMemory:
    """Peak memory while a block runs: CUDA max-allocated on GPU, sampled process RSS on CPU (Linux).

    RSS is per process, so on CPU the peak includes every model loaded; ``delta_mb`` (over the RSS at entry) is the
    part this run added, i.e. activations, KV cache and workspace.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.002) -> None:
        self.device = device
        self.interval_s = interval_s
        self.peak_mb: float | None = None
        self.delta_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._max = 0

    @staticmethod
    def rss_bytes() -> int | None:
        statm = Path("/proc/self/statm")
        if not statm.exists():
            return None
        import resource

        return int(statm.read_text().split()[1]) * resource.getpagesize()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self.rss_bytes() or 0)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._base = self.rss_bytes()
            if self._base is not None:
                self._max = self._base
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._max, self.rss_bytes() or 0)
        else:
            return
        self.peak_mb = peak / 2**20
        self.delta_mb = (peak - self._base) / 2**20


def _pad_token_id(model: nn.Module) -> int:
    config = getattr(model, "generation_config", None) or model.config
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def bench_inputs(model: nn.Module, batch: int, prompt_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random prompts (token ids or pixels): the same seed gives every model of a vocabulary the same ids."""
    gen = torch.Generator().manual_seed(seed + batch)
    device = model_device(model)
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        config = model.config
        size, channels = getattr(config, "image_size", 224), getattr(config, "num_channels", 3)
        pixels = torch.randn(batch, channels, size, size, generator=gen)
        return {"pixel_values": pixels.to(device=device, dtype=model_dtype(model))}
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


class _Runner:
    """The calls timed for one model: prefill and generate for causal LMs, a forward for encoders."""

    def __init__(self, model: nn.Module, settings: BenchSettings) -> None:
        self.model = model
        self.settings = settings
        self.generative = is_causal_lm(model)
        self.device = model_device(model)
        self.pad = _pad_token_id(model)

    def _generate(self, inputs: dict, n: int) -> object:
        return self.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=self.pad, use_cache=True)

    def prefill(self, inputs: dict) -> object:
        if self.generative:
            return self._generate(inputs, 1)
        return self.model(**inputs)

    def generate(self, inputs: dict) -> object:
        return self._generate(inputs, self.settings.new_tokens)

    def tokens_per_sample(self, inputs: dict) -> int:
        """Prompt tokens for LMs; the encoder's sequence length (patches + CLS); 1 (an image) for a CNN."""
        if "input_ids" in inputs:
            return int(inputs["input_ids"].shape[1])
        base = getattr(self.model, "base_model", self.model)
        hidden = base(**inputs).last_hidden_state
        return int(hidden.shape[1]) if hidden.dim() == 3 else 1  # a CNN's (B, C, H, W) map: count images


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@dataclass
class _Samples:
    prefill_s: dict[int, list[float]] = field(default_factory=dict)
    generate_s: dict[int, list[float]] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    memory: dict[int, PeakMemory] = field(default_factory=dict)


def _summarise(samples: _Samples, settings: BenchSettings, generative: bool, model: nn.Module) -> dict:
    prefill_tps, decode_tps, stats = {}, {}, {"prefill_tokens_per_s": {}, "decode_tokens_per_s": {},
                                              "prefill_latency_s": {}, "decode_latency_s": {}}
    memory = {}
    for bs, prefill in samples.prefill_s.items():
        key = str(bs)
        tps = [bs * samples.tokens[bs] / t for t in prefill]
        stats["prefill_tokens_per_s"][key] = _stats(tps)
        stats["prefill_latency_s"][key] = _stats(prefill)
        prefill_tps[key] = stats["prefill_tokens_per_s"][key]["median"]
        if generative:
            prefill_median = statistics.median(prefill)
            decode = [g - prefill_median for g in samples.generate_s[bs]]
            valid = [t for t in decode if t > 0]  # a generate faster than the median prefill is noise, not data
            dtps = [bs * (settings.new_tokens - 1) / t for t in valid]
            stats["decode_tokens_per_s"][key] = _stats(dtps) if dtps else None
            stats["decode_latency_s"][key] = _stats(valid) if valid else None
            decode_tps[key] = stats["decode_tokens_per_s"][key]["median"] if dtps else None
            if len(valid) < len(decode):
                stats.setdefault("discarded_decode_runs", {})[key] = len(decode) - len(valid)
        mem = samples.memory.get(bs)
        memory[key] = {"peak_mb": mem.peak_mb, "delta_mb": mem.delta_mb} if mem else None
    return {
        "kind": "causal-lm" if generative else "encoder",
        #: "images" for a CNN (one sample per image), else tokens: the unit the *_tokens_per_s figures count.
        "unit": "images" if samples.tokens and all(n == 1 for n in samples.tokens.values()) else "tokens",
        "parameters": sum(p.numel() for p in model.parameters()),
        "prefill_tokens_per_s": prefill_tps,
        "decode_tokens_per_s": decode_tps if generative else None,
        "peak_memory": memory,
        "stats": stats,
    }


@torch.no_grad()
def benchmark(models: dict[str, nn.Module], settings: BenchSettings, progress: bool | None = None) -> dict[str, dict]:
    """Per-model throughput figures (keyed like ``models``), all models interleaved within every repeat."""
    from tqdm.auto import tqdm

    runners = {name: _Runner(m.eval(), settings) for name, m in models.items()}
    for m in models.values():
        settings.validate(m)
    samples = {name: _Samples() for name in models}
    steps = len(settings.batch_sizes) * len(models) * (settings.warmup + 1 + settings.repeats)
    show = progress if progress is not None else steps > 10
    bar = tqdm(total=steps, desc="bench", unit="run", disable=None if show else True, leave=False)
    try:
        for bs in settings.batch_sizes:
            inputs = {name: bench_inputs(m, bs, settings.prompt_len, settings.seed) for name, m in models.items()}
            for name, r in runners.items():
                for _ in range(settings.warmup):
                    r.prefill(inputs[name])
                    if r.generative:
                        r.generate(inputs[name])
                    bar.update()
                samples[name].tokens[bs] = r.tokens_per_sample(inputs[name])
                with PeakMemory(r.device) as mem:
                    if r.generative:
                        r.generate(inputs[name])
                    else:
                        r.prefill(inputs[name])
                samples[name].memory[bs] = mem
                bar.update()
            for _ in range(settings.repeats):
                for name, r in runners.items():
                    s = samples[name]
                    s.prefill_s.setdefault(bs, []).append(timed(r.prefill, inputs[name], r.device))
                    if r.generative:
                        s.generate_s.setdefault(bs, []).append(timed(r.generate, inputs[name], r.device))
                    bar.update()
    finally:
        bar.close()
    return {name: _summarise(samples[name], settings, runners[name].generative, models[name]) for name in models}


def rms_norm_kernel(model: nn.Module) -> str | None:
    """Which RMSNorm backend the model's norms dispatch to (``None`` without RMSNorms): speed depends on it."""
    from normswap.kernels import selected_backend
    from normswap.norm import RMSNorm

    norm = next((m for m in model.modules() if isinstance(m, RMSNorm)), None)
    if norm is None:
        return None
    x = torch.zeros(1, *norm.normalized_shape, device=model_device(model), dtype=model_dtype(model))
    try:
        return selected_backend(x, norm.weight, norm.bias)
    except TypeError:  # an older dispatch API that takes the input only
        return selected_backend(x)


def ratios(a: dict, b: dict) -> dict:
    """``a / b`` of median tokens/s per batch size (> 1: ``a`` is faster)."""
    out = {}
    for metric in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        if a.get(metric) and b.get(metric):
            out[metric] = {bs: a[metric][bs] / b[metric][bs] for bs in a[metric]
                           if a[metric][bs] and b[metric].get(bs)}
    return out


def norm_share(model: dict, no_norm: dict) -> dict:
    """Fraction of the runtime spent in norms: 1 − (tokens/s with norms) / (tokens/s with identity instead)."""
    return {metric: {bs: 1 - r for bs, r in values.items()} for metric, values in ratios(model, no_norm).items()}


def run_bench(
    model: nn.Module,
    against: nn.Module | None = None,
    *,
    settings: BenchSettings | None = None,
    no_norm: bool = True,
    labels: dict[str, str] | None = None,
    progress: bool | None = None,
) -> dict:
    """The ``normswap bench --json`` object: environment, settings, per-model figures, ratios, norm share."""
    settings = settings or BenchSettings()
    models = {"model": model}
    if against is not None:
        models["against"] = against
    swapped = 0
    if no_norm:
        models[NO_NORM], swapped = without_norms(model)
    figures = benchmark(models, settings, progress=progress)
    for name, m in models.items():
        figures[name]["rms_norm_kernel"] = rms_norm_kernel(m)
    for name, label in (labels or {}).items():
        if name in figures:
            figures[name]["label"] = label
    if no_norm:
        figures[NO_NORM]["label"] = f"upper bound: 'model' with its {swapped} norms replaced by identity"
    result = {
        "environment": environment(model_device(model), model_dtype(model)),
        "settings": {**asdict(settings), "batch_sizes": list(settings.batch_sizes), "interleaved": len(models) > 1,
                     "definitions": "optimum-benchmark: prefill = generate(max_new_tokens=1); decode tokens/s = "
                                    "batch*(new_tokens-1)/(generate time - median prefill time)"},
        "models": figures,
    }
    if against is not None:
        result["ratios"] = ratios(figures["model"], figures["against"])
        result["ratio_definition"] = "model / against, median tokens/s (> 1: model is faster)"
    if no_norm:
        result["norm_share"] = norm_share(figures["model"], figures[NO_NORM])
    return result
