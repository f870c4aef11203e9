"""``normswap convert`` on model types with no declared adapter: discovered, converted, verified, reloadable.

The reference is independent of normswap: the stock transformers class run on the original weights, compared with
the stock class and with ``normswap.load`` on the converted folder.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from tiny_models import perturb_

import normswap
from normswap.adapters import registry
from normswap.cli import main
from normswap.errors import AlreadyRMSNormError, UnsupportedArchitectureError

H = 48


def _mpt() -> T.MptForCausalLM:
    torch.manual_seed(0)
    return perturb_(T.MptForCausalLM(T.MptConfig(vocab_size=96, d_model=H, n_layers=2, n_heads=4, max_seq_len=64)))


def _biogpt() -> T.BioGptForCausalLM:
    torch.manual_seed(0)
    cfg = T.BioGptConfig(vocab_size=96, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=96, max_position_embeddings=64)
    return perturb_(T.BioGptForCausalLM(cfg))


def _xglm() -> T.XGLMForCausalLM:
    # Sinusoidal positions in a non-persistent buffer: discovered as a writer re-centred at run time.
    torch.manual_seed(0)
    cfg = T.XGLMConfig(vocab_size=96, d_model=H, num_layers=2, attention_heads=4, ffn_dim=96, max_position_embeddings=64)
    return perturb_(T.XGLMForCausalLM(cfg))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


@pytest.mark.parametrize("factory", [_mpt, _biogpt, _xglm], ids=["mpt", "biogpt", "xglm"])
def test_convert_cli_discovers_converts_and_verifies(factory, tmp_path, capsys):
    model = factory()
    model_type = model.config.model_type
    assert registry.declared_adapter(model_type) is None  # the point: nobody wrote an adapter for it
    model.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "--no-eval"]) == 0
    out = capsys.readouterr().out
    discovered_lines = [line for line in out.splitlines() if "discovered its structure" in line]
    assert len(discovered_lines) == 1 and model_type in discovered_lines[0]
    assert "verification PASSED" in out

    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids)
    stock = type(model).from_pretrained(tmp_path / "out")
    rms = normswap.load(tmp_path / "out")
    assert any(isinstance(m, normswap.RMSNorm) for m in rms.modules())
    for converted in (stock, rms):
        rel = float((_logits(converted, ids) - ref).abs().max() / ref.abs().max())
        assert rel < 1e-5


_CUSTOM_LN = {
    "olmo": (T.OlmoForCausalLM, T.OlmoConfig, 5),  # parameter-free OlmoLayerNorm
    "cohere": (T.CohereForCausalLM, T.CohereConfig, 3),  # bias-free CohereLayerNorm, parallel blocks
}


@pytest.mark.parametrize("model_type", sorted(_CUSTOM_LN))
def test_undeclared_custom_layernorm_class_is_converted_not_reported_as_rmsnorm(model_type, monkeypatch):
    # Neither class is an nn.LayerNorm; without their pins, discovery must still find them by what they compute.
    monkeypatch.setattr(registry, "_REGISTRY", {k: v for k, v in registry._REGISTRY.items() if k != model_type})
    cls, config_cls, swapped = _CUSTOM_LN[model_type]
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=96, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                     pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = perturb_(cls(cfg))
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    ref = _logits(model, ids)
    report = normswap.convert_(model)
    assert report.passed and len(report.swapped_norms) == swapped
    assert any("discovered" in n for n in report.notes)
    assert float((_logits(model, ids) - ref).abs().max() / ref.abs().max()) < 1e-5


def test_rmsnorm_model_without_adapter_says_so():
    cfg = T.LlamaConfig(vocab_size=96, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
    with pytest.raises(AlreadyRMSNormError, match="already uses RMSNorm"):
        normswap.plan_conversion(T.LlamaForCausalLM(cfg))


def test_unknown_declared_type_message_points_at_the_rows():
    with pytest.raises(UnsupportedArchitectureError, match=r"EXACT_ROWS in tests/tiny_models\.py"):
        registry.get_adapter("not-a-model-type")


def test_declared_adapters_win():
    cfg = T.GPT2Config(vocab_size=96, n_embd=H, n_layer=2, n_head=4, n_positions=64)
    model = T.GPT2LMHeadModel(cfg)
    assert registry.adapter_for(model) is registry.get_adapter("gpt2")
    assert registry.adapter_for(_mpt()).origin == "discovered"


def test_per_stage_template_does_not_transfer_to_a_different_stage_count():
    # Discovery measures Swin on 2 stages: the last stage has no patch merging reading it raw, the first does. A
    # 4-stage Swin would get the wrong stage's verdicts, so it is refused up front, naming the stage list.
    with torch.device("meta"):
        swin = T.SwinModel(T.SwinConfig())
    with pytest.raises(UnsupportedArchitectureError, match=r"encoder\.layers has 2 entries.*this model has 4"):
        registry.adapter_for(swin)


def test_discovered_readers_take_gain_and_bias_folds():
    model = _biogpt()
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(3))
    ref = _logits(model, ids)
    report = normswap.convert_(model, fold_gain=True, fold_bias=True)
    assert report.passed and len(report.folds["gain_folded"]) == 5
    for name in report.folds["gain_folded"]:  # the gain now lives in the readers: the RMSNorm's own gain is ones
        assert torch.equal(model.get_submodule(name).weight, torch.ones_like(model.get_submodule(name).weight))
    assert float((_logits(model, ids) - ref).abs().max() / ref.abs().max()) < 1e-5
