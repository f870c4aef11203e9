"""Exact conversion, parametrized over every registered adapter: in memory, stock reload, normswap.load, generate."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import EXACT_ROWS, make
from torch import nn

import normswap
from normswap.adapters import supported_model_types
from normswap.norm import CenteredRMSNorm, RMSNorm
from normswap.verify import make_probes, primary_output

ROWS = sorted(EXACT_ROWS)
TOL = 1e-4


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def run(model: nn.Module, probes: dict) -> torch.Tensor:
    with torch.no_grad():
        return primary_output(model(**probes))


def test_every_adapter_has_a_test_row():
    covered = {model_type for model_type, _ in EXACT_ROWS.values()}
    exact_types = {t for t in supported_model_types() if normswap.adapters.get_adapter(t).norm_position == "pre"}
    assert exact_types <= covered, f"adapters without an exact test row: {sorted(exact_types - covered)}"


@pytest.mark.parametrize("row", ROWS)
def test_exact_conversion_matches_original(row, tmp_path):
    original = make(row)
    model = copy.deepcopy(original)
    probes = make_probes(model, seq_len=24)
    ref = run(original, probes)

    report = normswap.convert_(model)
    assert report.mode == "exact" and report.passed, report.summary()
    assert report.swapped_norms and not report.approximate_norms
    v = report.verification
    assert v.rel_max_abs_diff <= TOL
    assert v.uncentered_exact_norms == []
    assert max(s.max_mean_over_rms for s in v.norm_inputs.values()) < 1e-5
    assert set(v.norm_inputs) == set(report.swapped_norms), "every swapped norm must be exercised by the probe"
    if v.top1_agreement is not None:
        assert v.top1_agreement == 1.0

    # every LayerNorm the adapter names became an RMSNorm; nothing else did
    swapped = {n for n, m in model.named_modules() if isinstance(m, RMSNorm)}
    assert swapped == set(report.swapped_norms)
    assert rel_diff(run(model, probes), ref) <= TOL

    # the saved folder uses stock key names and loads in the stock class with identical outputs
    out = normswap.save(model, tmp_path / "out")
    stock = type(original).from_pretrained(out).eval()
    assert not any(isinstance(m, RMSNorm) for m in stock.modules())
    assert rel_diff(run(stock, probes), ref) <= TOL
    assert stock.config.normswap["mode"] == "exact"
    assert set(stock.state_dict()) == set(original.state_dict()) | ({"lm_head.weight"} if report.untied_head and hasattr(original, "lm_head") else set())

    loaded = normswap.load(out)
    assert {n for n, m in loaded.named_modules() if isinstance(m, RMSNorm)} == set(report.swapped_norms)
    assert rel_diff(run(loaded, probes), ref) <= TOL

    if "input_ids" in probes and hasattr(original, "generate"):  # encoders (CLIP) have no generate
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        prompt = probes["input_ids"][:1, :6]
        with torch.no_grad():
            expected = original.generate(prompt, **kwargs)
            assert torch.equal(model.generate(prompt, **kwargs), expected)
            assert torch.equal(loaded.generate(prompt, **kwargs), expected)


def test_untied_head_keeps_original_embedding():
    original = make("gpt2")
    model = copy.deepcopy(original)
    report = normswap.convert_(model)
    assert report.untied_head
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(model.lm_head.weight, original.lm_head.weight, rtol=0, atol=0)
    wte = model.transformer.wte.weight.detach().double()
    assert float(wte.mean(-1).abs().max()) < 1e-6 < float(original.transformer.wte.weight.detach().double().mean(-1).abs().max())


def test_writers_are_centred_along_the_hidden_dim_for_each_layout():
    model = make("gpt2")  # Conv1D writers
    normswap.convert_(model, verify_result=False)
    c_proj = model.transformer.h[0].attn.c_proj  # Conv1D: weight [in, out=hidden]
    assert float(c_proj.weight.detach().double().mean(dim=1).abs().max()) < 1e-6
    assert abs(float(c_proj.bias.detach().double().mean())) < 1e-6
    vit = make("vit-model")  # Conv2d patch embedding + bare parameters
    normswap.convert_(vit, verify_result=False)
    proj = vit.embeddings.patch_embeddings.projection
    assert float(proj.weight.detach().double().mean(dim=0).abs().max()) < 1e-6
    assert float(vit.embeddings.cls_token.detach().double().mean(-1).abs().max()) < 1e-6
    assert float(vit.embeddings.position_embeddings.detach().double().mean(-1).abs().max()) < 1e-6


def test_bloom_embedding_norm_becomes_recentring_norm():
    model = make("bloom")
    report = normswap.convert_(model)
    assert report.recentered_norms == ["transformer.word_embeddings_layernorm"]
    assert isinstance(model.transformer.word_embeddings_layernorm, CenteredRMSNorm)
    assert report.passed


def test_qk_norms_and_kept_norms_stay_layernorm():
    for row in ("phi", "stablelm-sequential"):
        model = make(row)
        report = normswap.convert_(model)
        assert report.kept_norms and all("q_layernorm" in n or "k_layernorm" in n for n in report.kept_norms)
        for name in report.kept_norms:
            assert type(model.get_submodule(name)) is nn.LayerNorm


@pytest.mark.parametrize("row", ["gpt2", "gpt_neox-parallel", "falcon-old-sequential-alibi", "phi", "opt-project_in_out"])
@pytest.mark.parametrize("gain,bias", [(True, False), (False, True), (True, True)])
def test_folds_stay_exact_and_keep_stock_keys(row, gain, bias, tmp_path):
    original = make(row)
    model = copy.deepcopy(original)
    probes = make_probes(model, seq_len=16)
    ref = run(original, probes)
    report = normswap.convert_(model, fold_gain=gain, fold_bias=bias)
    assert report.passed, report.summary()
    if gain:
        assert report.folds["gain_folded"], report.folds
        for name in report.folds["gain_folded"]:
            torch.testing.assert_close(model.get_submodule(name).weight, torch.ones_like(model.get_submodule(name).weight))
    if bias and report.folds["bias_folded"]:
        for name in report.folds["bias_folded"]:
            assert float(model.get_submodule(name).bias.detach().abs().max()) == 0.0
    assert rel_diff(run(model, probes), ref) <= TOL
    out = normswap.save(model, tmp_path / "out")
    stock = type(original).from_pretrained(out).eval()
    assert set(stock.state_dict()) == set(model.state_dict())
    assert rel_diff(run(stock, probes), ref) <= TOL


def test_fold_bias_skips_readers_without_bias():
    model = make("gpt_neo")  # q/k/v projections have no bias
    report = normswap.convert_(model, fold_bias=True)
    assert any("ln_1" in k and "no bias" in v for k, v in report.folds["skipped"].items())
    assert report.passed


def test_bf16_output_no_worse_than_stock_bf16():
    original = make("gpt2")
    probes = make_probes(original, seq_len=32, batch=4)
    ref = run(original, probes).double()
    stock_bf16 = copy.deepcopy(original).to(torch.bfloat16)
    converted = copy.deepcopy(original)
    normswap.convert_(converted)
    converted.to(torch.bfloat16)
    err_stock = float((run(stock_bf16, probes).double() - ref).abs().mean())
    err_conv = float((run(converted, probes).double() - ref).abs().mean())
    assert err_conv <= 1.25 * err_stock, (err_conv, err_stock)


def test_plan_lists_roles_without_modifying():
    model = make("opt-project_in_out")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = normswap.plan_conversion(model)
    names = [w.name for w in plan.writers]
    assert "model.decoder.project_in" in names and "model.decoder.embed_tokens" not in names
    assert plan.tied_head
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_untie_gives_other_flag_governed_ties_their_own_copy(tmp_path):
    """BERT ties its decoder bias through the same flag as the head: it must survive save → load."""
    import transformers as T
    from tiny_models import perturb_

    model = perturb_(T.BertForMaskedLM(T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64)))
    normswap.convert_(model, approximate=True)
    loaded = normswap.load(normswap.save(model, tmp_path / "out"))
    probes = make_probes(model, seq_len=12)
    torch.testing.assert_close(run(loaded, probes), run(model, probes), rtol=0, atol=1e-5)
