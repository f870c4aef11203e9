"""Verification of discovered model types: no false failures on exact conversions, no false passes.

Each test fails on the verifier as it was before (CLIP vision/BEiT/data2vec-vision reported FAILED because their
raw-stream ``last_hidden_state`` comes back mean-removed; SigLIP's ``nn.MultiheadAttention`` head could not run in
float64; ViT-MAE's random masking let a Δ of 1.3 pass; ``normswap verify`` could not find BEiT's ``lambda_1`` on
disk). References are independent of normswap: the stock transformers class run in float64 on the original
weights.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as T
from tiny_models import perturb_

import normswap
from normswap.cli import main
from normswap.verification.engine import judge
from normswap.verification.runs import Run, capture, seeded
from normswap.verify import make_probes

H = 48


#: A small vision tower: two blocks over a 4×4 grid of 8-pixel patches.
_VISION = dict(hidden_size=H, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
               patch_size=8)


def _vision(model_cls, config_cls, **extra):
    torch.manual_seed(0)
    return perturb_(model_cls(config_cls(**_VISION, **extra))).eval()


def _clip_vision() -> T.CLIPVisionModel:
    return _vision(T.CLIPVisionModel, T.CLIPVisionConfig)


def _beit() -> T.BeitModel:
    return _vision(T.BeitModel, T.BeitConfig, layer_scale_init_value=0.5)


def _siglip_vision() -> T.SiglipVisionModel:
    return _vision(T.SiglipVisionModel, T.SiglipVisionConfig)


def _vit_mae() -> T.ViTMAEModel:
    return _vision(T.ViTMAEModel, T.ViTMAEConfig)


def _centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


@pytest.mark.parametrize("factory", [_clip_vision, _beit], ids=["clip_vision_model", "beit"])
def test_raw_stream_output_compared_after_mean_removal(factory):
    model = factory()
    probes = make_probes(model)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(**{k: v.double() for k, v in probes.items()})
    report = normswap.convert_(model, probes=probes)
    v = report.verification
    assert v.passed, v.summary()
    assert v.output_name == "last_hidden_state" and v.raw_stream_outputs == ["last_hidden_state"]
    assert "raw residual stream" in v.summary()
    assert v.outputs["pooler_output"]["passed"] and not v.outputs["pooler_output"]["mean_removed"]
    # independent check: the stream comes back as the float64 original's minus its per-token mean, pooler exact
    with torch.no_grad():
        out = model(**probes)
    scale = ref.last_hidden_state.abs().max()
    assert (out.last_hidden_state.double() - _centre(ref.last_hidden_state)).abs().max() / scale < 1e-5
    assert (out.pooler_output.double() - ref.pooler_output).abs().max() / ref.pooler_output.abs().max() < 1e-5
    assert v.converted_error < 1e-5


def _run(output: torch.Tensor, pooler: torch.Tensor, dtype=torch.float32) -> Run:
    return Run(dtype, output, [], output_name="last_hidden_state", others={"pooler_output": pooler})


def test_every_other_output_stays_strict():
    """Mean removal applies to the raw stream only: a pooler_output off by 1e-3 fails and is named."""
    g = torch.Generator().manual_seed(0)
    stream, pooler = 3 + torch.randn(2, 5, 16, generator=g, dtype=torch.float64), torch.randn(2, 16, generator=g,
                                                                                                 dtype=torch.float64)
    truth, original = _run(stream, pooler, torch.float64), _run(stream + 1e-8, pooler + 1e-8)
    kw = dict(blocks=[], norms={}, mode="exact", logits=False, raw_outputs=("last_hidden_state",))
    ok = judge(truth, original, _run(_centre(stream), pooler), **kw)
    assert ok.passed and ok.raw_stream_outputs == ["last_hidden_state"], ok.first_failure
    bad = judge(truth, original, _run(_centre(stream), pooler + 1e-3), **kw)
    assert not bad.passed and "pooler_output" in bad.first_failure
    # without the raw-stream declaration, a mean-removed stream is a real difference
    strict = judge(truth, original, _run(_centre(stream), pooler), **{**kw, "raw_outputs": ()})
    assert not strict.passed


def test_multihead_attention_head_runs_in_float64():
    """SigLIP's pooling head is an nn.MultiheadAttention whose forward reads out_proj.weight itself."""
    model = _siglip_vision()
    probes = make_probes(model)
    run = capture(model, probes, torch.float64, [])
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(pixel_values=probes["pixel_values"].double()).last_hidden_state
    assert torch.equal(run.output, ref)
    assert run.others["pooler_output"].dtype == torch.float64
    assert next(model.parameters()).dtype == torch.float32  # nothing left cast
    report = normswap.convert_(model, probes=probes)
    assert report.verification.passed, report.verification.summary()


def test_random_masking_is_never_certified():
    """ViT-MAE masks patches at random: without its noise the runs compare unrelated computations."""
    model = _vit_mae()
    probes = make_probes(model)
    assert "noise" in probes  # the default probes fix the masking
    report = normswap.convert_(copy.deepcopy(model), probes=probes)
    assert report.verification.passed and report.verification.converted_error < 1e-5
    unfixed = normswap.convert_(model, probes={"pixel_values": probes["pixel_values"]})
    v = unfixed.verification
    assert not v.passed and "random numbers" in v.first_failure


def test_seeded_restores_the_generator_and_reports_draws():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with seeded() as draws:
        torch.rand(2)
    assert draws.what == "torch"
    assert torch.equal(torch.rand(3), expected)  # the caller's stream is untouched
    with seeded() as quiet:
        torch.zeros(2)
    assert quiet.what == ""


@pytest.mark.parametrize("no_architectures", [False, True], ids=["BeitModel", "AutoModel"])
def test_verify_folder_finds_renamed_keys(tmp_path, capsys, no_architectures):
    """BEiT's LayerScale is saved as lambda_1 (transformers renames it on load); a config without architectures
    is built as AutoModel."""
    model = _beit()
    model.save_pretrained(tmp_path / "src")
    if no_architectures:
        cfg = json.loads((tmp_path / "src" / "config.json").read_text())
        cfg.pop("architectures", None)
        (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    assert main(["convert", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "--no-eval"]) == 0
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "out"), "--against", str(tmp_path / "src"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] and result["blocks_checked"] == 2
    assert result["raw_stream_outputs"] == ["last_hidden_state"]


def test_summary_counts_recentred_writers_apart():
    """XGLM's sinusoidal positions are re-centred at run time: not counted among the centred writers."""
    torch.manual_seed(0)
    cfg = T.XGLMConfig(vocab_size=96, d_model=H, num_layers=2, attention_heads=4, ffn_dim=96,
                       max_position_embeddings=64)
    model = perturb_(T.XGLMForCausalLM(cfg)).eval()
    report = normswap.convert_(model)
    assert report.passed and report.recentered_writers
    recentred = len(report.recentered_writers)
    line = report.summary().splitlines()[1]
    assert f"centred writers: {len(report.centered_writers) - recentred} " in line
    assert f"re-centred at run time: {recentred}" in line


def test_verify_names_the_block_of_an_uncentred_writer_in_a_discovered_model(tmp_path, capsys):
    """Blocks and writers come from the one structure resolver, LayerScale writers included: a writer of block 1
    left with a mean on disk is caught and named."""
    from safetensors.torch import load_file, save_file

    model = _beit()
    model.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "--no-eval"]) == 0
    path = tmp_path / "out" / "model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if ".layer.1." in k and k.endswith("attention.output.dense.bias"))
    tensors[key] = tensors[key] + 0.5
    save_file(tensors, path, metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "out"), "--against", str(tmp_path / "src")]) == 1
    out = capsys.readouterr().out
    assert "FAILED: block 1: attention.o_proj output not centred" in out, out  # on disk: attention.output.dense


@pytest.mark.parametrize("factory", [_beit, _vit_mae], ids=["beit", "vit_mae"])
def test_streamed_conversion_of_discovered_types_verifies(factory, tmp_path, capsys):
    """Streaming verifies from the files with the same certificate: every block, renamed keys, seeded probes."""
    model = factory()
    model.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "--streaming", "--no-eval"]) == 0
    meta = json.loads((tmp_path / "out" / "config.json").read_text())["normswap"]
    assert meta["verification"]["passed"] and meta["verification"]["blocks_checked"] == 2
    assert meta["verification"]["converted_error"] < 1e-5


def test_hidden_states_tuple_is_compared_as_the_raw_stream():
    """``output_hidden_states=True``: the per-block streams come back mean-removed in every model (discovered
    adapters list only last_hidden_state), while the logits stay strict."""
    torch.manual_seed(0)
    cfg = T.MptConfig(vocab_size=96, d_model=H, n_layers=2, n_heads=4, max_seq_len=64, output_hidden_states=True)
    model = perturb_(T.MptForCausalLM(cfg)).eval()
    report = normswap.convert_(model)
    v = report.verification
    assert v.passed, v.summary()
    assert v.output_name == "logits" and v.kl is not None
    streams = [n for n in v.outputs if n.startswith("hidden_states.")]
    assert len(streams) == 3 and all(v.outputs[n]["mean_removed"] and v.outputs[n]["passed"] for n in streams)
    assert set(streams) <= set(v.raw_stream_outputs)
