"""Zero silent answers (issue 13): LayerNorms the probe never runs, and models whose only norms are not LayerNorm.

A composite whose LayerNorm audio/image tower the probe prompt does not reach used to be answered "already uses
RMSNorm" (exit 0, nothing written): a silent wrong answer. It must be a refusal naming the unrun modules and why;
where other norms did run and convert, the unrun ones are listed as kept with that reason. A BatchNorm/GroupNorm-only
model must say which norms it has, not "already RMSNorm". The references are independent of discovery: forward
hooks counting which modules run, isinstance counts, and the LayerNorm formula.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from tiny_models import perturb_
from torch import nn

from normswap.adapters.registry import discovered_adapter
from normswap.cli import main
from normswap.discovery import discover
from normswap.discovery.instance import default_model_class, probe_inputs, tiny_instance
from normswap.discovery.norms import UNRUN_REASON, subtracts_mean
from normswap.errors import AlreadyRMSNormError, UnsupportedArchitectureError


def _tiny(model_type: str) -> nn.Module:
    config = T.CONFIG_MAPPING[model_type]()
    return tiny_instance(default_model_class(config), config)


def _ran(model: nn.Module) -> set[str]:
    """Names of the modules a forward on the probe inputs runs (forward hooks: independent of discovery)."""
    ran: set[str] = set()
    hooks = [m.register_forward_hook(lambda *_a, n=n: ran.add(n)) for n, m in model.named_modules() if n]
    with torch.no_grad():
        model(**probe_inputs(model))
    for h in hooks:
        h.remove()
    return ran


@pytest.fixture(scope="module")
def audio_lm() -> nn.Module:
    return _tiny("qwen2_audio")


def test_composite_with_unrun_layernorm_tower_is_refused_not_already_rms(audio_lm):
    ran = _ran(audio_lm)
    unrun = [n for n, m in audio_lm.named_modules() if isinstance(m, nn.LayerNorm) and n not in ran]
    assert unrun and not any(isinstance(m, nn.LayerNorm) for n, m in audio_lm.named_modules() if n in ran)
    with pytest.raises(UnsupportedArchitectureError) as info:
        discovered_adapter(audio_lm.config, type(audio_lm))
    msg = str(info.value)
    assert "\n" not in msg and UNRUN_REASON in msg and "already" not in msg
    assert f"has {len(unrun)} LayerNorm(s)" in msg
    assert all(name in msg for name in unrun[:3]) and f"(and {len(unrun) - 3} more)" in msg


def test_convert_cli_on_unrun_tower_exits_2_with_one_line(audio_lm, tmp_path, capsys):
    src = tmp_path / "src"
    audio_lm.float().save_pretrained(src)
    capsys.readouterr()
    rc = main(["convert", str(src), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("normswap: error:") and "never ran on the probe inputs" in err[0]
    assert not (tmp_path / "out").exists()


def test_unrun_layernorm_beside_converted_ones_is_kept_with_the_reason():
    """A GPT-2 whose norms all run, plus one nn.LayerNorm and one custom mean-subtracting class that never run: the
    run ones still convert, the unrun ones are kept (named, with the reason), never silently left."""

    class SpareLayerNorm(nn.Module):  # parameter-free, mean-subtracting: found by behaviour, not by nn.LayerNorm
        def __init__(self, width: int) -> None:
            super().__init__()
            self.normalized_shape = (width,)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.layer_norm(x, self.normalized_shape)

    model = perturb_(T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=97, n_positions=64)))
    model.transformer.spare = nn.LayerNorm(32)
    model.transformer.spare_custom = SpareLayerNorm(32)
    found = discover(model)
    assert found.unrun_norms == ["transformer.spare", "transformer.spare_custom"]
    assert found.kept["transformer.spare"] == UNRUN_REASON and found.kept["transformer.spare_custom"] == UNRUN_REASON
    assert "transformer.ln_f" in found.swapped and "transformer.h.1.ln_2" in found.swapped
    assert found.adapter is not None and {"spare", "spare_custom"} <= set(found.adapter.kept_norms)


def test_subtracts_mean_tests_behaviour_not_only_the_name():
    class FakeLayerNorm(nn.Module):  # named LayerNorm, computes RMSNorm (T5LayerNorm-style)
        def __init__(self, width: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.rand(width) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * self.weight

    class CenteredLayerNorm(FakeLayerNorm):  # the LayerNorm formula, by hand
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x - x.mean(-1, keepdim=True)
            return super().forward(x)

    assert not subtracts_mean(FakeLayerNorm(16).double())
    assert subtracts_mean(CenteredLayerNorm(16).double())
    assert subtracts_mean(nn.LayerNorm(16, elementwise_affine=False))
    assert not subtracts_mean(nn.Linear(16, 16))


@pytest.mark.parametrize("model_type,cls", [("resnet", nn.BatchNorm2d), ("bit", nn.GroupNorm)])
def test_batchnorm_or_groupnorm_only_model_says_which_norms_it_has(model_type, cls):
    model = _tiny(model_type)
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, cls):
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    assert counts and not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    with pytest.raises(AlreadyRMSNormError) as info:  # nothing to convert (exit 0), but said truthfully
        discovered_adapter(model.config, type(model))
    msg = str(info.value)
    assert "RMSNorm" not in msg and "has no LayerNorm" in msg
    for name, n in counts.items():
        assert f"{name} (x{n})" in msg
    assert ("`--to none`" in msg) == (cls is nn.BatchNorm2d)
