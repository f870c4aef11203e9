"""Discovery's exact claims hold for the adapter as the conversion applies it (issue 13 census).

Each test fails on discovery as it was before: it claimed exact and verification then failed. Parakeet's conformer
block ends in ``norm_out``, which re-centres the next block's stream; the template re-centred the last block's too,
moving the model output (measured on 2 layers, converted here with 3). DINOv3's ``base_model`` is its encoder, so the
embedding writers were dropped from the adapter. VideoPrism's LayerNorm applies ``weight + 1``, which an RMSNorm with
its parameters does not. VipLlava's projector reads the stream after block 0 raw, so ``layer_norm1`` is exact in
block 0 only, and one role swapped it in every block. VitDet's stream is channels-first, so its raw-stream output
was taken for a visible one. A LayerScale after a writer found invisible on its own was not folded (TIPSv2-DPT).
References: the stock classes run in float64.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import transformers as T
from tiny_models import perturb_

import normswap
from normswap.adapters.spec import Writer
from normswap.discovery import discover_from_config
from normswap.discovery.capture import is_stream_field, trace
from normswap.discovery.engine import _Engine, prepare
from normswap.discovery.instance import probe_inputs
from normswap.discovery.rehearsal import rehearse
from normswap.discovery.simulate import Fix
from normswap.discovery.writers import Effect
from normswap.errors import UnsupportedArchitectureError
from normswap.structure import base_and_prefix


def _f64(probes: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in probes.items()}


def _reference(model, probes: dict):
    with torch.no_grad():
        return copy.deepcopy(model).double()(**_f64(probes))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).abs().max() / b.abs().max())


def _convert_and_compare(model, field: str) -> tuple:
    """Convert ``model`` in place (verification must pass) and return (converted, float64 reference) ``field``."""
    probes = probe_inputs(model)
    ref = _reference(model, probes)
    report = normswap.convert_(model, probes=probes)
    assert report.passed, report.verification.summary()
    with torch.no_grad():
        return getattr(model(**probes), field), getattr(ref, field), report


def _parakeet_encoder_config(layers: int = 3) -> T.ParakeetEncoderConfig:
    return T.ParakeetEncoderConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=4, intermediate_size=96, num_mel_bins=16,
                                   subsampling_conv_channels=16, conv_kernel_size=5)


def test_conformer_last_block_norm_out_keeps_the_output():
    torch.manual_seed(0)
    model = perturb_(T.ParakeetEncoder(_parakeet_encoder_config())).eval()
    out, ref, report = _convert_and_compare(model, "last_hidden_state")
    assert _rel(out, ref) < 1e-5  # the output itself, not its mean-removed version
    adapter = discover_from_config(model.config, type(model)).adapter
    assert Writer("", "recenter_input") in adapter.block_writers  # every block re-centres its input ...
    assert not next(n for n in adapter.block_norms if n.path == "norm_out").writes_stream  # ... not norm_out
    assert adapter.raw_stream_outputs == ()
    assert report.recentered_writers == {f"layers.{i}": "input" for i in range(3)}


def test_conformer_ctc_head_reading_the_last_block():
    torch.manual_seed(0)
    cfg = T.ParakeetCTCConfig(vocab_size=40, encoder_config=_parakeet_encoder_config(2).to_dict())
    model = perturb_(T.ParakeetForCTC(cfg)).eval()
    out, ref, _ = _convert_and_compare(model, "logits")
    assert _rel(out, ref) < 1e-5


def _dinov3() -> T.DINOv3ViTModel:
    torch.manual_seed(0)
    cfg = T.DINOv3ViTConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8, layerscale_value=0.5)
    return perturb_(T.DINOv3ViTModel(cfg)).eval()


def test_writers_outside_the_base_model_attribute_are_kept_in_the_adapter():
    model = _dinov3()
    assert base_and_prefix(model) == (model, "")  # model.base_model is the encoder, which lacks the embeddings
    adapter = discover_from_config(model.config, type(model)).adapter
    assert {"embeddings.patch_embeddings", "embeddings.cls_token"} <= {w.path for w in adapter.embeddings}
    out, ref, _ = _convert_and_compare(model, "last_hidden_state")
    assert _rel(out, ref) < 1e-5


def test_layer_scale_folds_into_a_writer_already_found_invisible():
    # TIPSv2-DPT: a writer whose own mean no output sees (below the float32 norms' tolerance) was centred without
    # the LayerScale after it, so the stream after block 0 moved beyond its mean. The scale must fold all the same.
    work = prepare(_dinov3())
    probes = probe_inputs(work)
    engine = _Engine(work, probes, 0)
    engine.ref = trace(work, probes, keep_args=True)
    writer, scale = "model.layer.0.attention.o_proj", "model.layer.0.layer_scale1"
    effects = {n: Effect(n, "module") for n in (writer, scale)}  # both invisible on their own
    fixes, _ = engine._affine_fixes(effects, set())
    assert fixes == [Fix(writer, "linear", scale=f"{scale}.lambda1")]


def test_rehearsal_compares_block_streams_beyond_their_mean():
    # The safety net for any such miss: the rehearsal holds the block streams to what verification checks.
    work = prepare(_dinov3())
    probes = probe_inputs(work)
    ref = trace(work, probes, keep_args=True)
    adapter = discover_from_config(work.config, type(work)).adapter
    assert rehearse(work, probes, ref, adapter, 1e-8, 1e-6).ok
    unscaled = dataclasses.replace(adapter, block_writers=tuple(dataclasses.replace(w, scale=None)
                                                                for w in adapter.block_writers))
    moved = rehearse(work, probes, ref, unscaled, 1e-8, 1e-6).visible
    assert any(v.startswith("the stream after model.layer.0 beyond its mean") for v in moved), moved


def test_layernorm_of_another_form_is_refused_before_conversion():
    torch.manual_seed(0)
    cfg = T.VideoPrismTextConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=32)
    model = perturb_(T.VideoPrismTextModel(cfg)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedArchitectureError, match=r"VideoPrismLayerNorm .*weight \+ 1"):
        normswap.convert_(model, probes=probe_inputs(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before touching it


def test_role_exact_in_some_blocks_only_is_kept_in_all():
    torch.manual_seed(0)
    vision = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8, projection_dim=32)
    text = T.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=256)
    cfg = T.VipLlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=255,
                           vision_feature_layers=[-2, -1])
    model = perturb_(T.VipLlavaForConditionalGeneration(cfg)).eval()
    found = discover_from_config(model.config, type(model))
    status = {n.name: n.status for n in found.norms}
    assert status["model.vision_tower.encoder.layers.0.layer_norm1"] == "kept"  # exact there, but not in block 1
    assert "layer_norm1" in found.adapter.kept_norms
    assert all(n.path != "layer_norm1" for n in found.adapter.block_norms)
    report = normswap.convert_(model, probes=probe_inputs(model))
    assert report.passed, report.verification.summary()


def test_channels_first_raw_stream_output_is_named_and_compared_over_its_channels():
    # VitDet returns the stream after the last block as last_hidden_state, laid out [batch, hidden, h, w]: it comes
    # back with each position's mean over the hidden (channel) axis removed, and verification compares it so.
    torch.manual_seed(0)
    cfg = T.VitDetConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=32,
                         pretrain_image_size=32, patch_size=8)
    model = perturb_(T.VitDetModel(cfg)).eval()
    adapter = discover_from_config(model.config, type(model)).adapter
    assert adapter.raw_stream_outputs == ("last_hidden_state",) and adapter.stream_axis == 1
    out, ref, report = _convert_and_compare(model, "last_hidden_state")
    assert report.verification.raw_stream_outputs == ["last_hidden_state"]
    assert _rel(out, ref - ref.mean(1, keepdim=True)) < 1e-5
    assert _rel(out, ref) > 1e-3  # the mean it lost is not rounding


def test_only_the_per_layer_stream_tuples_are_stream_fields():
    assert is_stream_field("hidden_states.1") and is_stream_field("vision_model_output.hidden_states.0")
    assert is_stream_field("encoder_hidden_states.2")
    assert not is_stream_field("fpn_hidden_states.0")  # SAM3's FPN: convolutions of the stream, an output
    assert not is_stream_field("last_hidden_state")
