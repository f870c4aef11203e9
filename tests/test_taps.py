"""Backbone taps survive shrinking (normswap.discovery.taps): a neck keeps one backbone output per level."""

from __future__ import annotations

import transformers

from normswap.discovery.instance import tiny_config


def test_dpt_neck_keeps_one_backbone_layer_per_tap_and_its_width():
    small = tiny_config(transformers.DepthAnythingConfig())
    bb = small.backbone_config
    assert len(bb.out_indices) == len(small.neck_hidden_sizes) == 4
    assert max(bb.out_indices) <= bb.num_hidden_layers
    assert small.reassemble_hidden_size == bb.hidden_size and small.patch_size == bb.patch_size


def test_detr_encoder_channels_follow_the_tapped_stage_widths():
    small = tiny_config(transformers.RTDetrConfig())
    bb = small.backbone_config
    assert small.encoder_in_channels == [bb.hidden_sizes[i - 1] for i in bb.out_indices]
    assert small.decoder_in_channels == [small.d_model] * len(small.decoder_in_channels)
    assert small.num_queries <= 8  # top-k proposals out of a 32-pixel image's few tokens


def test_single_default_tap_is_dropped_as_before():
    small = tiny_config(transformers.SwinConfig())
    assert len(small.depths) == 2 and small.out_indices == [2]
