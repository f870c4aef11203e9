"""Discovery stays cheap (issue 13: ≤ 10 s per model type), checked by counts rather than by the clock.

Discovery runs the small instance once per candidate writer, so its time is (forward passes) × (cost of one pass).
Both are pinned here without timing anything: the pass count of whole discoveries, and the size of the shrunk
instances of the types that took 11-54 s before their configs were shrunk properly (a 2048-wide XLM, LUKE's 500k
entity table, a 24-layer Kosmos text model, 2048 Kosmos-2.5 latent queries, 64 linear-attention heads of 128 dims,
a full-width CvT and GroupViT vision tower, 256-wide DPT fusion convolutions, CLAP's 256² spectrogram image).
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from torch.nn.modules.module import register_module_forward_pre_hook

from normswap.discovery import discover, instance_from_config
from normswap.discovery.capture import trace
from normswap.discovery.instance import default_model_class, probe_inputs, tiny_instance
from normswap.discovery.probing import optional_probes

#: The model types whose discovery took over 10 s in the census before the fix (docs/coverage.json), with bounds on
#: their shrunk instance: (parameters, elements output by all module calls on the probes). The first nine are plain
#: transformers (largest now ~0.75M parameters, ~0.7M output elements; they had up to 129M and 4.3M); the last four
#: have dense-prediction or spectrogram-image heads (now ≤ 3.2M and ≤ 9.4M; they had 18-24M parameters, and CLAP's
#: audio tower output 38M elements on a 256² spectrogram image).
ONCE_SLOW = {
    **dict.fromkeys(("cvt", "flaubert", "glm5_next_text", "groupvit", "kosmos-2.5", "kosmos_2_5_text_model",
                     "kosmos_2_text_model", "luke", "xlm"), (1_000_000, 1_500_000)),
    # V-JEPA 2 timed out in the census: 64 frames and a 12-layer, 384-wide predictor (21.5M parameters) not shrunk.
    "vjepa2": (1_000_000, 1_500_000),
    **dict.fromkeys(("chmv2", "tipsv2_dpt", "zoedepth", "clap_audio_model"), (5_000_000, 12_000_000)),
    "perceiver": (5_000_000, 12_000_000),  # timed out: 1280-wide latents, 26 self-attends (260M parameters)
}


def _forwards(model_type: str) -> int:
    """How many times discovery runs the whole model (top-level forward calls), measured on a fresh instance."""
    config = T.CONFIG_MAPPING[model_type]()
    cls = default_model_class(config)
    calls = [0]

    def count(module, _args):
        if type(module) is cls:
            calls[0] += 1

    handle = register_module_forward_pre_hook(count)
    try:
        discover(instance_from_config(config, cls))
    finally:
        handle.remove()
    return calls[0]


@pytest.mark.parametrize(("model_type", "bound"), [
    ("gpt2", 60),  # 2 layers: ~30 passes (one per candidate writer, plus the claim checks)
    ("kosmos_2_text_model", 100),  # ~40 passes once its `layers` key is shrunk; ~400 with 24 layers
])
def test_discovery_makes_a_bounded_number_of_forward_passes(model_type: str, bound: int) -> None:
    n = _forwards(model_type)
    assert 0 < n <= bound, f"discovery of {model_type} ran the model {n} times (bound {bound})"


@pytest.mark.parametrize("model_type", sorted(ONCE_SLOW))
def test_shrunk_instance_of_a_once_slow_type_stays_small(model_type: str) -> None:
    max_params, max_volume = ONCE_SLOW[model_type]
    config = T.CONFIG_MAPPING[model_type]()
    model = tiny_instance(default_model_class(config), config)
    params = sum(p.numel() for p in model.parameters())
    assert params <= max_params, f"the small {model_type} instance has {params} parameters"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # as discovery runs it
    try:
        tr = trace(model, optional_probes(model, probe_inputs(model)))
    finally:
        torch.set_default_dtype(previous)
    volume = sum(c.out.numel() for calls in tr.calls.values() for c in calls if c.out is not None)
    assert volume <= max_volume, f"the small {model_type} instance's modules output {volume} elements in one pass"
