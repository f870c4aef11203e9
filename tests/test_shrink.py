"""Config shrinking rules (normswap.discovery.instance), on toy config dicts: cross-config widths, head widths,
stage-pooling counts and per-layer kind lists stay consistent after the small copy is made."""

from __future__ import annotations

from normswap.discovery.instance import HIDDEN, INTERMEDIATE, _shrink_tree


def _shrunk(d: dict) -> dict:
    _shrink_tree(d, {}, 2)
    return d


def test_a_width_of_another_tower_follows_that_tower():
    d = _shrunk({"text_config": {"model_type": "t", "hidden_size": 2048},
                 "vision_config": {"model_type": "v", "hidden_size": 1024, "out_hidden_size": 2048},
                 "head_config": {"model_type": "h", "hidden_size": 32, "audio_hidden_size": 512,
                                 "condition_dim": 768}})
    assert d["vision_config"]["out_hidden_size"] == d["text_config"]["hidden_size"] == HIDDEN
    assert d["head_config"]["audio_hidden_size"] == d["head_config"]["condition_dim"] == HIDDEN


def test_d_head_times_heads_is_the_model_width():
    d = _shrunk({"d_model": 1024, "n_head": 16, "d_head": 64})
    assert d["d_head"] * d["n_head"] == d["d_model"]


def test_query_pooling_happens_between_the_kept_stages():
    d = _shrunk({"depths": [2, 3, 16, 3], "num_heads": [1, 2, 4, 8], "embed_dim": 96, "num_query_pool": 3})
    assert d["num_query_pool"] < len(d["depths"])


def test_a_per_layer_kind_list_without_a_layer_count_keeps_one_layer_of_each_kind():
    kinds = ["mamba", "moe", "mamba", "attention", "moe"] * 10
    d = _shrunk({"hidden_size": 2688, "layers_block_type": kinds, "moe_shared_expert_intermediate_size": 3712})
    assert sorted(d["layers_block_type"]) == ["attention", "mamba", "moe"]
    assert d["moe_shared_expert_intermediate_size"] <= INTERMEDIATE


def test_per_tower_layer_counts_block_sizes_and_region_features_shrink():
    d = _shrunk({"hidden_size": 768, "num_attention_heads": 12, "l_layers": 9, "x_layers": 5, "r_layers": 5,
                 "visual_feat_dim": 2048, "context_size": 200, "dim_head": 128})
    assert (d["l_layers"], d["x_layers"], d["r_layers"]) == (2, 2, 2)
    assert d["visual_feat_dim"] <= HIDDEN and d["context_size"] <= 32
    assert d["dim_head"] * d["num_attention_heads"] == d["hidden_size"]


def test_groups_of_the_model_width_follow_it_and_codec_convs_narrow():
    d = _shrunk({"hidden_size": 512, "upsample_groups": 512, "num_filters": 64, "num_quantizers": 32})
    assert d["upsample_groups"] == d["hidden_size"] == HIDDEN  # a depthwise conv over the model width
    assert d["num_filters"] <= 16 and d["num_quantizers"] <= 8


def test_a_list_of_widths_summing_to_the_model_width_still_sums_to_it():
    d = _shrunk({"hidden_size": 256, "num_attention_heads": 4, "axial_pos_embds_dim": [64, 192]})
    assert sum(d["axial_pos_embds_dim"]) == d["hidden_size"] and d["axial_pos_embds_dim"][0] > 0


def test_explicit_stage_channels_narrow_with_the_stage_widths():
    d = _shrunk({"depths": [3, 4, 6, 3], "hidden_sizes": [256, 512, 1024, 2048], "stem_channels": [3, 32, 48],
                 "stage_in_channels": [48, 128, 512, 1024], "stage_out_channels": [128, 512, 1024, 2048],
                 "out_indices": [2, 3, 4]})
    assert d["stage_out_channels"][1:] == d["hidden_sizes"][1:]  # the tapped stage outputs are the stage widths
    assert d["stage_in_channels"][1:] == d["stage_out_channels"][:-1]
    assert d["stem_channels"][0] == 3 and d["stem_channels"][-1] == d["stage_in_channels"][0]


def test_encoder_and_decoder_kv_heads_divide_their_heads():
    d = _shrunk({"hidden_size": 288, "encoder_num_attention_heads": 8, "decoder_num_attention_heads": 8,
                 "encoder_num_key_value_heads": 8, "decoder_num_key_value_heads": 8})
    for side in ("encoder", "decoder"):
        assert d[f"{side}_num_attention_heads"] % d[f"{side}_num_key_value_heads"] == 0
