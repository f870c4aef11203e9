"""Discovery stays cheap (issue 13: ≤ 10 s per model type), checked by counts rather than by the clock.

Discovery runs the small instance once per candidate writer, so its time is (forward passes) × (cost of one pass).
Both are pinned here without timing anything: the pass count of whole discoveries, and the size of the shrunk
instances of the types that took 13-54 s before their configs were shrunk properly (a 2048-wide XLM, LUKE's 500k
entity table, a 24-layer Kosmos text model, 2048 Kosmos-2.5 latent queries, 64 linear-attention heads of 128 dims,
a full-width CvT and GroupViT vision tower).
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

#: The model types whose discovery took over 10 s in the census before the fix (docs/coverage.json).
ONCE_SLOW = ("cvt", "flaubert", "glm5_next_text", "groupvit", "kosmos-2.5", "kosmos_2_5_text_model",
             "kosmos_2_text_model", "luke", "xlm")
#: Largest shrunk instance among them is ~0.75M parameters; the slow ones had 0.7M-129M.
MAX_PARAMS = 1_000_000
#: Largest single module output on the probes is ~131k elements; the slow ones reached 262k (2048-wide MLPs,
#: 8192-wide linear attention, 2048 latent queries).
MAX_OUTPUT = 200_000


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


@pytest.mark.parametrize("model_type", ONCE_SLOW)
def test_shrunk_instance_of_a_once_slow_type_stays_small(model_type: str) -> None:
    config = T.CONFIG_MAPPING[model_type]()
    model = tiny_instance(default_model_class(config), config)
    params = sum(p.numel() for p in model.parameters())
    assert params <= MAX_PARAMS, f"the small {model_type} instance has {params} parameters"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # as discovery runs it
    try:
        tr = trace(model, optional_probes(model, probe_inputs(model)))
    finally:
        torch.set_default_dtype(previous)
    size, name = max((c.out.numel(), n) for n, calls in tr.calls.items() for c in calls if c.out is not None)
    assert size <= MAX_OUTPUT, f"{name} of the small {model_type} instance outputs {size} elements"
