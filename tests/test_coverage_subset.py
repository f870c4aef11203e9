"""The CI subset of the coverage census: each type must still give the result the committed census records.

The full census (``python scripts/coverage.py``, every model type of the installed transformers) is too slow for
the suite; this re-runs a fixed subset in-process through the very same per-type function and compares with
docs/coverage.json, so a regression (an exact type that stops converting, a refusal that loses its reason, a
LayerNorm model reported as having nothing to convert) fails here. When the census is re-run and committed, the
expectations move with it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

from normswap.adapters import all_adapters

ROOT = Path(__file__).resolve().parents[1]
CENSUS = ROOT / "docs" / "coverage.json"

#: Every declared adapter plus the types issue 13 names, plus a few more of each category (RMSNorm, BatchNorm,
#: channels-first LayerNorm, post-LN encoders), ≥ 40 in all.
SUBSET = sorted(set(all_adapters()) | {
    "clip", "clip_text_model", "clip_vision_model", "siglip", "siglip_vision_model", "siglip2", "dinov2",
    "dinov2_with_registers", "whisper", "cohere", "olmo", "mpt", "starcoder2", "persimmon", "biogpt", "xglm", "deit",
    "beit", "data2vec-vision", "swin", "vit_mae", "wav2vec2", "mbart", "m2m_100", "llava", "llama", "t5", "electra",
    "convnext", "resnet", "hubert",
    # composites whose LayerNorm tower the probe does not run, and a GroupNorm-only model: once silent answers
    "llava_next", "qwen2_audio", "idefics3", "bit",
})


def _load_script():
    spec = importlib.util.spec_from_file_location("normswap_coverage_script", ROOT / "scripts" / "coverage.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def census():
    assert CENSUS.exists(), "docs/coverage.json is committed with the census; regenerate it: python scripts/coverage.py"
    data = json.loads(CENSUS.read_text())
    return {r["model_type"]: r for r in data["rows"]}, data


@pytest.fixture(scope="module")
def script():
    return _load_script()


def test_subset_is_representative(census):
    rows, data = census
    assert len(SUBSET) >= 40
    assert set(all_adapters()) <= set(SUBSET)
    missing = [t for t in SUBSET if t not in rows]
    assert not missing, f"subset types missing from the census: {missing}"
    # The committed census covers the whole zoo of the installed transformers, not a hand list.
    if data["meta"].get("transformers") == transformers.__version__:
        assert {r["model_type"] for r in data["rows"]} == set(transformers.CONFIG_MAPPING.keys())


def test_census_silent_flags_are_consistent(census):
    """A row is flagged silent exactly when a model holding a LayerNorm-like norm was answered "nothing to
    convert"; the totals list exactly those rows."""
    rows, data = census
    for r in rows.values():
        has_ln = r.get("norms", {}).get("layernorm", 0) > 0
        assert bool(r.get("silent")) == (has_ln and r.get("result") == "nothing-to-convert"), r["model_type"]
    assert data["totals"]["silent"] == sorted(t for t, r in rows.items() if r.get("silent"))


def test_census_has_no_silent_answers(census):
    """Issue 13's target: no model holding a mean-subtracting norm is answered "nothing to convert" (composites
    whose LayerNorm tower the probe cannot run are refused, naming the unrun modules)."""
    rows, data = census
    assert data["totals"]["silent"] == []
    for t, r in rows.items():
        if r.get("norms", {}).get("layernorm", 0) > 0:
            assert r.get("result") != "nothing-to-convert", t


@pytest.mark.parametrize("model_type", SUBSET)
def test_subset_type_matches_census(model_type, census, script):
    rows, _ = census
    rec = rows[model_type]
    row = script.census_one(model_type)
    why = f"{model_type}: now {row.get('result')} ({row.get('reason')}), census says {rec.get('result')}"
    assert row.get("result") == rec.get("result"), why
    assert row.get("category") == rec.get("category"), why
    assert not row.get("silent"), why
    result = row["result"]
    if result == "exact":
        assert row["passed"] and row["rel_diff"] <= script.EXACT_TOL, why
    elif result == "approximate":
        assert row["mode"] == "approximate" and row["approximate_norms"] > 0, why
        assert row.get("rel_diff") is not None and row["rel_diff"] > 0, why  # the damage is measured and reported
    elif result == "refused":
        assert row.get("reason"), why
        report = sys.modules["coverage_report"]
        if report.structural_refusal(rec):
            assert report.structural_refusal(row), why  # the refusal still names the module that blocks it


# --- the census's own instruments, against facts known independently of them -------------------------------------

#: Hand-checked facts about these architectures (see ../shared/ARCHITECTURES.md): category and one norm per kind.
KNOWN = {
    "gpt2": ("pre-LN", {"transformer.h.0.ln_2": ("layernorm", "pre")}),
    "bert": ("post-LN", {"bert.encoder.layer.0.output.LayerNorm": ("layernorm", "post")}),
    "olmo": ("pre-LN", {"model.layers.0.post_attention_layernorm": ("layernorm", "pre")}),  # parameter-free class
    "cohere": ("pre-LN", {"model.norm": ("layernorm", "pre")}),  # bias-free CohereLayerNorm
    "t5": ("rmsnorm", {"encoder.final_layer_norm": ("rmsnorm", "pre")}),  # "T5LayerNorm" is an RMSNorm
    "llama": ("rmsnorm", {"model.norm": ("rmsnorm", "pre")}),
    "clip": ("pre-LN", {"vision_model.encoder.layers.0.layer_norm1": ("layernorm", "reads-norm-output")}),
    "swinv2": ("pre-LN", {"encoder.layers.0.blocks.0.layernorm_after": ("layernorm", "branch")}),  # res-post-norm
    "beit": ("pre-LN", {"layers.0.layernorm_after": ("layernorm", "pre")}),  # inline LayerScale λ
    "resnet": ("other-norms", {"embedder.embedder.normalization": ("batchnorm", None)}),
}


@pytest.mark.parametrize("model_type", sorted(KNOWN))
def test_classify_matches_known_architecture(model_type):
    from normswap.discovery.classify import classify
    from normswap.discovery.instance import default_model_class, tiny_instance

    config = transformers.CONFIG_MAPPING[model_type]()
    model = tiny_instance(default_model_class(config), config)
    result = classify(model)
    category, norms = KNOWN[model_type]
    assert result.category == category
    found = {n.name: (n.kind, n.link) for n in result.norms}
    for name, expected in norms.items():
        assert found.get(name) == expected, (name, found.get(name))
    assert not result.has_layernorm or result.category != "rmsnorm"


def test_norm_kinds_match_their_formula():
    """Every nn.LayerNorm is classified layernorm, and every module that computes x/rms(x)·γ is classified rmsnorm:
    checked on a model holding both (a LayerNorm vision tower and an RMSNorm language model)."""
    from normswap.discovery.classify import classify
    from normswap.discovery.instance import default_model_class, tiny_instance

    config = transformers.CONFIG_MAPPING["llava"]()
    model = tiny_instance(default_model_class(config), config)
    result = classify(model)
    kinds = {n.name: n.kind for n in result.norms}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm) and name in kinds:
            assert kinds[name] == "layernorm", name
        if type(module).__name__.endswith("RMSNorm"):
            x = torch.randn(3, module.weight.shape[-1], dtype=torch.float64) * 5
            ref = x / x.pow(2).mean(-1, keepdim=True).add(module.variance_epsilon).sqrt() * module.weight
            assert torch.allclose(module(x), ref, rtol=1e-5, atol=1e-6)  # the RMS formula (Llama: fp32 inside) ...
            assert kinds[name] == "rmsnorm", name  # ... and classified as such
    assert result.category == "mixed"


def test_tiny_instance_from_a_70b_config_is_small_and_fast():
    import time

    from normswap.discovery.instance import probe_inputs, tiny_instance

    config = transformers.LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                      num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                      bos_token_id=128000, eos_token_id=128001)
    t = time.perf_counter()
    model = tiny_instance(transformers.LlamaForCausalLM, config)
    assert time.perf_counter() - t < 10
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    cfg = model.config
    assert cfg.num_hidden_layers == 2 and cfg.hidden_size % cfg.num_attention_heads == 0
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0 and cfg.num_key_value_heads < cfg.num_attention_heads
    assert max(cfg.bos_token_id, cfg.eos_token_id) < cfg.vocab_size
    probes = probe_inputs(model)
    assert not torch.isin(probes["input_ids"], torch.tensor([cfg.bos_token_id, cfg.eos_token_id])).any()
    logits = model(**probes).logits
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()
