"""Discovery finds by measurement what the declared adapters say by hand, and the structures they cannot list.

Every declared adapter is checked against discovery on the tiny models of ``tests/tiny_models.py`` (resolved full
names compared as sets; tied tables compared by the parameter they hold). The other tests build models whose
structure needs something beyond plain centring and check discovery's answer against an independent float64 run:
centring the discovered writers by hand and comparing the model's outputs before and after.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from tiny_models import EXACT_ROWS, make, perturb_
from tiny_text import tiny_bert
from torch import nn

from normswap.adapters import get_adapter
from normswap.discovery import discover, discover_from_config
from normswap.discovery.capture import flatten_outputs, is_stream_field, trace
from normswap.discovery.readers import candidate_readers
from normswap.discovery.simulate import centred_copy
from normswap.surgery import build_plan

H = 48


def _canonical(model: nn.Module) -> dict[int, str]:
    """First name of every parameter: tied tables (``model.shared`` = ``encoder.embed_tokens``) get one name."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def _writers(model: nn.Module, plan) -> set[tuple[str, str, str | None]]:
    canon = _canonical(model)
    out = set()
    for w in plan.writers:
        target = w.target
        if isinstance(target, nn.Parameter):
            key = canon[id(target)]
        elif getattr(target, "weight", None) is not None and w.recenter is None:
            key = canon[id(target.weight)]
        else:
            key = w.name
        out.add((key, w.layout, getattr(w, "scale_name", None)))
    return out


def _moves_nothing(model: nn.Module, name: str) -> bool:
    """A declared optional writer the probe pass never runs (DINOv2's mask token in a classifier)."""
    from normswap.discovery.instance import probe_inputs

    m = copy.deepcopy(model).double()
    probes = {k: v.double() if v.is_floating_point() else v for k, v in probe_inputs(m).items()}
    before = flatten_outputs(m(**probes))
    with torch.no_grad():
        p = dict(m.named_parameters())[name]
        p.add_(1.0)
    after = flatten_outputs(m(**probes))
    return all(torch.equal(before[k], after[k]) for k in before)


#: Declared adapters discovery disagrees with on purpose, and why (kept short: each is a bug report to its owner).
KNOWN_DIFFERENCES: dict[str, str] = {}


@pytest.mark.parametrize("row", sorted(EXACT_ROWS))
def test_discovery_reproduces_declared_adapter(row):
    if row in KNOWN_DIFFERENCES:
        pytest.xfail(KNOWN_DIFFERENCES[row])
    model_type = EXACT_ROWS[row][0]
    model = make(row)
    declared = build_plan(model, get_adapter(model_type), approximate=True)
    found = discover(model)
    assert found.adapter is not None and found.adapter.origin == "discovered"
    discovered = build_plan(model, found.adapter, approximate=True)

    dec_w, dis_w = _writers(model, declared), _writers(model, discovered)
    unused = {w for w in dec_w - dis_w if w[1] == "param" and _moves_nothing(model, w[0])}
    assert dec_w - unused == dis_w
    assert {(n.name, n.exact, n.spec.writes_stream) for n in declared.norms} == \
        {(n.name, n.exact, n.spec.writes_stream) for n in discovered.norms}
    # Readers: every declared reader that really reads the norm's output is discovered (a declared adapter may list
    # a reader that only exists in another configuration; discovery may find a complete reader set it omits).
    probe_model = copy.deepcopy(model).double()
    from normswap.discovery.instance import probe_inputs

    probes = {k: v.double() if v.is_floating_point() else v for k, v in probe_inputs(probe_model).items()}
    ref = trace(probe_model, probes)
    found_readers = {n.name: {r for r, _ in n.readers} for n in discovered.norms}
    for n in declared.norms:
        actual = set(candidate_readers(probe_model, ref, n.name))
        declared_real = {r for r, _ in n.readers} & actual
        if found_readers[n.name]:
            assert declared_real <= found_readers[n.name], n.name
        assert found_readers[n.name] <= actual, n.name


def _outputs(model: nn.Module, probes: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {k: v for k, v in flatten_outputs(model(**probes)).items() if not is_stream_field(k)}


def _assert_exact_by_hand(model: nn.Module, found, probes: dict, tol: float = 1e-9) -> None:
    """Independent check: centre the discovered writers in a float64 copy; outputs must not move (stream outputs
    only by their mean), and every exact norm's input must be zero-mean."""
    ref = _outputs(model, probes)
    sim = centred_copy(model, found.writers)
    new = _outputs(sim, probes)
    for k, r in ref.items():
        d = new[k] - r
        if k in found.raw_stream_outputs:
            d = d - d.mean(-1, keepdim=True)
        assert float(d.abs().max()) <= tol * float(r.abs().max()), k
    tr = trace(sim, probes, names={n.name for n in found.norms})
    for n in found.norms:
        if n.status == "exact":
            x = tr.calls[n.name][0].inp
            assert float((x.mean(-1).abs() / x.pow(2).mean(-1).sqrt()).max()) < 1e-9, n.name


def _double(model: nn.Module) -> tuple[nn.Module, dict]:
    from normswap.discovery.instance import probe_inputs

    m = copy.deepcopy(model).double().eval()
    probes = {k: v.double() if v.is_floating_point() else v for k, v in probe_inputs(m).items()}
    return m, probes


@pytest.mark.parametrize("cls, cfg", [
    (T.CohereForCausalLM, T.CohereConfig(vocab_size=96, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=96, pad_token_id=0,
                                         bos_token_id=0, eos_token_id=0)),
    (T.OlmoForCausalLM, T.OlmoConfig(vocab_size=96, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, pad_token_id=0, bos_token_id=0, eos_token_id=0)),
])
def test_custom_layernorm_classes_are_found_by_behaviour(cls, cfg):
    torch.manual_seed(0)
    model = perturb_(cls(cfg))
    found = discover(model)
    norm_classes = {type(model.get_submodule(n.name)).__name__ for n in found.norms}
    assert norm_classes and all(c.endswith("LayerNorm") and c != "LayerNorm" for c in norm_classes)
    assert not any(isinstance(model.get_submodule(n.name), nn.LayerNorm) for n in found.norms)
    assert found.rms_norms == []
    # The stream norms convert; per-head q/k norms (Cohere's use_qk_norm) read projections and stay.
    assert all(n.status == "exact" or n.name.endswith(("q_norm", "k_norm")) for n in found.norms)
    assert sum(n.status == "exact" for n in found.norms) == 3 if cls is T.CohereForCausalLM else 5
    m, probes = _double(model)
    _assert_exact_by_hand(m, found, probes, tol=1e-6)  # these classes compute in float32 whatever their input


def test_rmsnorm_model_is_recognised_and_left_alone():
    cfg = T.LlamaConfig(vocab_size=96, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96)
    found = discover(T.LlamaForCausalLM(cfg))
    assert found.adapter is None and found.norms == []
    assert len(found.rms_norms) == 5  # 2 per layer + the final norm


def test_layerscale_is_folded_into_its_writer():
    cfg = T.Dinov2Config(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4,
                         layerscale_value=0.5)
    torch.manual_seed(0)
    model = perturb_(T.Dinov2Model(cfg))
    found = discover(model)
    scaled = {w.name: w.scale for w in found.writers if w.scale}
    assert scaled == {f"encoder.layer.{i}.{w}": f"encoder.layer.{i}.layer_scale{k}.lambda1"
                      for i in range(2) for w, k in (("attention.o_proj", 1), ("mlp.fc2", 2))}
    assert {w.layout for w in found.adapter.block_writers} == {"linear"}
    assert {w.scale for w in found.adapter.block_writers} == {"layer_scale1.lambda1", "layer_scale2.lambda1"}
    m, probes = _double(model)
    _assert_exact_by_hand(m, found, probes)
    # Without the fold, centring the same writers leaves the stream uncentred: the scale is what made them writers.
    unscaled = [type(w)(w.name, w.layout) for w in found.writers]
    tr = trace(centred_copy(m, unscaled), probes, names={"encoder.layer.1.norm1"})
    x = tr.calls["encoder.layer.1.norm1"][0].inp
    assert float((x.mean(-1).abs() / x.pow(2).mean(-1).sqrt()).max()) > 1e-3


def test_beit_inline_layerscale_parameters():
    cfg = T.BeitConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                       image_size=16, patch_size=4, layer_scale_init_value=0.3, use_mean_pooling=True)
    torch.manual_seed(0)
    found = discover(perturb_(T.BeitModel(cfg)))
    scales = {w.scale for w in found.adapter.block_writers}
    assert scales == {"lambda_1", "lambda_2"}
    assert all(n.status == "exact" for n in found.norms)


def test_nonlinear_writers_are_recentred():
    # CLIP vision: pre_layrnorm's output is the stream (a norm that writes it); last_hidden_state is the raw stream.
    cfg = T.CLIPVisionConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                             image_size=16, patch_size=4)
    torch.manual_seed(0)
    model = perturb_(T.CLIPVisionModel(cfg))
    found = discover(model)
    assert [n.name.split(".")[-1] for n in found.norms if n.writes_stream] == ["pre_layrnorm"]
    assert found.raw_stream_outputs == ["last_hidden_state"]
    assert all(n.status == "exact" for n in found.norms)
    m, probes = _double(model)
    _assert_exact_by_hand(m, found, probes)


def test_whisper_inline_stem_recentres_the_first_layer_input():
    found = discover_from_config(T.WhisperConfig(), T.WhisperForConditionalGeneration)
    recentred = [(w.name, w.layout) for w in found.writers if w.layout.startswith("recenter")]
    assert recentred == [("model.encoder.layers.0", "recenter_input")]
    assert all(n.status == "exact" for n in found.norms) and len(found.norms) == 12
    assert ("encoder.layers.0", "recenter_input") in {(w.path, w.layout) for w in found.adapter.embeddings}
    assert {s.blocks for s in found.adapter.stacks} | {found.adapter.blocks} == {"encoder.layers", "decoder.layers"}


def test_sinusoidal_positions_buffer_is_recentred():
    found = discover_from_config(T.M2M100Config(), T.M2M100ForConditionalGeneration)
    assert sorted(w.name for w in found.writers if w.layout == "recenter") == \
        ["model.decoder.embed_positions", "model.encoder.embed_positions"]
    assert all(n.status == "exact" for n in found.norms)


def test_raw_reader_blocks_the_norms_it_sees():
    # SigLIP's pooling head keeps its own residual and returns it raw: its norm stays, the tower converts.
    found = discover_from_config(T.SiglipVisionConfig(), T.SiglipVisionModel)
    kept = found.kept
    assert list(kept) == ["head.layernorm"] and "pooler_output" in kept["head.layernorm"]
    assert sum(n.status == "exact" for n in found.norms) == 5
    assert found.adapter.kept_norms == ("head.layernorm",)
    # LLaVA: the projector reads a mid-tower stream raw, so every vision norm on it is refused, naming the reader.
    found = discover_from_config(T.LlavaConfig(), T.LlavaForConditionalGeneration)
    vision_kept = {n: r for n, r in found.kept.items() if ".encoder.layers." in n}
    assert vision_kept and all("model.multi_modal_projector.linear_1" in r for r in vision_kept.values())
    assert "model.multi_modal_projector.linear_1" in found.raw_readers


def test_post_ln_norms_are_approximate():
    found = discover(tiny_bert(T.BertForMaskedLM))
    status = {n.name: n.status for n in found.norms}
    assert status["bert.embeddings.LayerNorm"] == "exact"
    assert status["cls.predictions.transform.LayerNorm"] == "kept"
    block = [s for n, s in status.items() if ".encoder.layer." in n]
    assert len(block) == 4 and set(block) == {"approximate"}
    assert found.adapter.norm_position == "post"


def test_discovery_of_a_large_config_is_fast():
    # A 70B-class config: discovery only ever builds the shrunk instance.
    cfg = T.MptConfig(d_model=8192, n_layers=80, n_heads=64, vocab_size=50432)
    found = discover_from_config(cfg, T.MptForCausalLM)
    assert found.seconds < 10
    assert found.adapter.blocks == "blocks" and all(n.status == "exact" for n in found.norms)


@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_a_norm_whose_input_mean_dwarfs_its_spread_is_still_found(offset):
    """CvT's wide stages feed LayerNorms an input whose mean (~500) is fifty times its spread; scaling the probe
    input by its rms left the spread at 0.2, where eps moves the scale test and the norm went unrecognised."""
    from normswap.discovery.capture import Call
    from normswap.discovery.norms import classify_call

    gen = torch.Generator().manual_seed(0)
    ln = nn.LayerNorm(H, dtype=torch.float64)
    # An RMSNorm on the same input: scale-invariant, not shift-invariant.
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    rmsnorm = LlamaRMSNorm(H, eps=1e-6).double()
    x = 0.2 * torch.randn(2, 5, H, generator=gen, dtype=torch.float64) + offset
    for module, kind in ((ln, "layernorm"), (rmsnorm, "rmsnorm")):
        with torch.no_grad():
            call = Call(args=(x,), kwargs={}, inp=x, out=module(x), start=0)
        found = classify_call(module, call, torch.Generator().manual_seed(1))
        assert found is not None and found[0] == kind
