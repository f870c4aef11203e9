"""Probe inputs synthesised from forward-argument names and config sizes (normswap.discovery.probe_args)."""

from __future__ import annotations

import torch
import transformers
from torch import nn

from normswap.discovery.probes import probe_inputs


class _Toy(nn.Module):
    """A model whose forward is ``fn``; ``probe_inputs`` only sees its signature, config and main input name."""

    def __init__(self, config, main: str = "input_ids") -> None:
        super().__init__()
        self.config = config
        self.main_input_name = main
        self.w = nn.Parameter(torch.zeros(1, dtype=torch.float64))


def _config(**kw):
    return transformers.PretrainedConfig(**kw)


def test_vision_tower_taking_hidden_states_and_grid_gets_flattened_patches():
    class Tower(_Toy):
        def forward(self, hidden_states, grid_thw):
            assert int(grid_thw.prod(-1).sum()) == hidden_states.shape[0]
            return hidden_states.sum()

    cfg = _config(patch_size=4, temporal_patch_size=2, in_channels=3, spatial_merge_size=2)
    probes = probe_inputs(Tower(cfg))
    assert set(probes) == {"hidden_states", "grid_thw"}  # no input_ids: the forward does not take them
    assert probes["hidden_states"].shape == (2 * 16, 3 * 2 * 4 * 4)
    assert probes["grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]


def test_patch_layout_the_forward_reads_is_picked():
    class Tower(_Toy):
        def forward(self, pixel_values, grid_thw=None):
            b, n, c, h, w = pixel_values.shape  # [images, patches, C, p, p] without the temporal fold
            assert c == 3
            return pixel_values.sum()

    cfg = _config(patch_size=4, temporal_patch_size=2, num_channels=3, spatial_merge_size=2)
    probes = probe_inputs(Tower(cfg, main="pixel_values"))
    assert probes["pixel_values"].shape == (2, 16, 3, 4, 4)


def test_video_config_gets_a_clip_and_layout_models_get_boxes():
    class Video(_Toy):
        def forward(self, pixel_values):
            return pixel_values.sum()

    probes = probe_inputs(Video(_config(num_frames=4, image_size=32, num_channels=3), main="pixel_values"))
    assert probes["pixel_values"].shape == (2, 4, 3, 32, 32)

    class Layout(_Toy):
        def forward(self, input_ids, bbox=None):
            return bbox.sum()

    probes = probe_inputs(Layout(_config(vocab_size=100)))
    box = probes["bbox"]
    assert box.shape == (*probes["input_ids"].shape, 4)
    assert (box[..., 2] >= box[..., 0]).all() and (box[..., 3] >= box[..., 1]).all() and box.max() <= 1000


def test_raw_audio_mono_channel_layout_is_tried_when_the_flat_one_fails():
    class Codec(_Toy):
        def forward(self, input_values):
            if input_values.dim() != 3 or input_values.shape[1] != 1:
                raise ValueError("Audio must be mono")
            return input_values.sum()

    probes = probe_inputs(Codec(_config(), main="input_values"))
    assert probes["input_values"].shape[:2] == (2, 1)


def test_required_feature_mask_and_flattened_patches_are_synthesised():
    class Encoder(_Toy):
        def forward(self, input_features, input_features_mask):
            assert input_features_mask.shape == input_features.shape[:1] + input_features.shape[-1:]
            return input_features.sum()

    probes = probe_inputs(Encoder(_config(num_mel_bins=16, max_source_positions=8), main="input_features"))
    assert probes["input_features_mask"].dtype == torch.long

    class Pix2Struct(_Toy):
        def forward(self, flattened_patches=None, attention_mask=None):
            return flattened_patches.sum()

    probes = probe_inputs(Pix2Struct(_config(patch_embed_hidden_size=48), main="flattened_patches"))
    assert probes["flattened_patches"].shape[-1] == 48 + 2  # row, column, then the patch
    assert probes["attention_mask"].shape == probes["flattened_patches"].shape[:2]


def test_vlm_default_config_without_an_image_token_gets_one():
    from normswap.discovery.instance import tiny_config

    cfg = transformers.Blip2Config()
    assert cfg.image_token_index is None
    small = tiny_config(cfg)
    assert isinstance(small.image_token_index, int) and small.image_token_index < small.text_config.vocab_size


def test_optional_image_attention_mask_is_only_an_alternative_layout():
    """FLAVA takes an optional ``image_attention_mask`` over its patches and 4-d pixels; IDEFICS needs one per token
    and image with 5-d pixels. The name alone cannot tell them apart, so the plain layout is tried first."""
    cfg = _config(image_size=32, patch_size=8, num_channels=3, vocab_size=50)

    class FlavaLike(_Toy):
        def forward(self, input_ids=None, pixel_values=None, image_attention_mask=None):
            batch, channels, height, width = pixel_values.shape  # 5-d pixels would fail here
            assert image_attention_mask is None
            return pixel_values.sum()

    class IdeficsLike(_Toy):
        def forward(self, input_ids=None, pixel_values=None, image_attention_mask=None):
            batch, images = pixel_values.shape[:2]
            assert pixel_values.dim() == 5 and image_attention_mask.shape == (*input_ids.shape, images)
            return pixel_values.sum()

    flava = probe_inputs(FlavaLike(cfg, main="pixel_values"))
    assert flava["pixel_values"].dim() == 4 and "image_attention_mask" not in flava
    idefics = probe_inputs(IdeficsLike(cfg, main="pixel_values"))
    assert idefics["pixel_values"].dim() == 5 and "image_attention_mask" in idefics


def test_required_embedded_rows_get_the_width_the_forward_reads_and_a_mask():
    class Encoder(_Toy):
        def forward(self, hidden_states, mask, encoder_hidden_states=None):
            assert hidden_states.shape[-1] == 20 and mask.shape == hidden_states.shape[:2]  # input_dim, not hidden
            assert encoder_hidden_states is not None and encoder_hidden_states.shape[-1] == 12
            return hidden_states.sum()

    probes = probe_inputs(Encoder(_config(input_dim=20, hidden_size=8, encoder_hidden_size=12)))
    assert probes["hidden_states"].shape[-1] == 20 and probes["mask"].dtype == torch.bool


def test_language_ids_region_features_and_image_position_mask_are_synthesised():
    class Multi(_Toy):
        def forward(self, input_ids, pixel_values=None, lang_ids=None, visual_feats=None, visual_pos=None,
                    image_embeds_position_mask=None):
            return input_ids.sum()

    cfg = _config(visual_feat_dim=12, visual_pos_dim=4, latent_query_num=4, image_size=8, num_channels=3)
    probes = probe_inputs(Multi(cfg))
    assert probes["lang_ids"].tolist() == [0, 0]
    assert probes["visual_feats"].shape[-1] == 12 and probes["visual_pos"].shape[-1] == 4
    mask = probes["image_embeds_position_mask"]
    assert mask.shape == probes["input_ids"].shape and mask.sum(-1).tolist() == [4, 4]


def test_required_latents_are_tried_channels_first_and_short():
    class Decoder(_Toy):
        def forward(self, latents):
            assert latents.shape[1] == 24 and latents.shape[2] <= 4  # [batch, width, frames], few frames
            return latents.sum()

    probes = probe_inputs(Decoder(_config(hidden_size=24), main="latents"))
    assert probes["latents"].shape == (2, 24, 4)


def test_required_image_and_visual_prompt_get_pixel_shaped_inputs():
    class Tower(_Toy):
        def forward(self, image):
            return image.sum()

    probes = probe_inputs(Tower(_config(num_channels=3, image_size=16), main="image"))
    assert probes["image"].shape == (2, 3, 16, 16)

    class Painter(_Toy):
        def forward(self, pixel_values, prompt_pixel_values, prompt_masks):
            return pixel_values.sum()

    probes = probe_inputs(Painter(_config(num_channels=3, image_size=16), main="pixel_values"))
    assert probes["prompt_pixel_values"].shape == probes["prompt_masks"].shape == probes["pixel_values"].shape


def test_required_time_series_and_raw_audio_are_synthesised():
    class Forecaster(_Toy):
        def forward(self, past_values, past_values_padding, freq):
            assert past_values.shape[1] % 8 == 0 and past_values_padding.shape == past_values.shape
            return past_values.sum()

    probes = probe_inputs(Forecaster(_config(context_length=512, patch_length=8), main="past_values"))
    assert probes["past_values"].shape == (2, 32) and probes["freq"].shape == (2, 1)

    class AudioText(_Toy):
        def forward(self, input_ids, input_values):
            return input_values.sum()

    assert probe_inputs(AudioText(_config()))["input_values"].shape == (2, 4000)


def test_windowed_audio_gets_whole_windows_and_frame_counts():
    class Windowed(_Toy):
        def forward(self, input_features, input_features_mask):
            assert input_features.shape[-1] % (2 * self.config.n_window) == 0
            return input_features.sum()

    cfg = _config(num_mel_bins=16, n_window=10)
    probes = probe_inputs(Windowed(cfg, main="input_features"))
    assert probes["input_features"].shape == (2, 16, 20) and probes["input_features_mask"].shape == (2, 20)

    class SideBySide(_Toy):
        def forward(self, input_features, feature_lens=None):
            assert input_features.dim() == 2 and input_features.shape[1] == int(feature_lens.sum())
            return input_features.sum()

    probes = probe_inputs(SideBySide(cfg, main="input_features"))
    assert probes["input_features"].shape == (16, 40) and probes["feature_lens"].tolist() == [20, 20]


def test_optional_feature_mask_is_tried_when_the_forward_reads_it_anyway():
    class Encoder(_Toy):
        def forward(self, input_features, input_features_mask=None):
            return input_features_mask.sum() + input_features.sum()  # "optional" in the signature only

    probes = probe_inputs(Encoder(_config(num_mel_bins=16, max_source_positions=8), main="input_features"))
    assert probes["input_features_mask"].shape == (2, 16)


def test_trajectories_and_stacked_audio_frames_are_synthesised():
    class Agent(_Toy):
        def forward(self, states=None, actions=None, rewards=None, returns_to_go=None, timesteps=None):
            assert states.shape[-1] == 5 and actions.shape[-1] == 3 and returns_to_go.shape[-1] == 1
            return states.sum()

    probes = probe_inputs(Agent(_config(state_dim=5, act_dim=3), main="states"))
    assert {"states", "actions", "rewards", "returns_to_go", "timesteps"} <= set(probes)

    class Stacked(_Toy):
        def forward(self, input_features):
            return input_features.sum()

    probes = probe_inputs(Stacked(_config(feature_size=80, feature_projection_input_dim=160), main="input_features"))
    assert probes["input_features"].shape[-1] == 160


def test_an_image_pair_layout_is_tried_for_matchers():
    class Matcher(_Toy):
        def forward(self, pixel_values):
            if pixel_values.dim() != 5 or pixel_values.shape[1] != 2:
                raise ValueError("Input must be a 5D tensor of shape (batch_size, 2, num_channels, height, width)")
            return pixel_values.sum()

    probes = probe_inputs(Matcher(_config(image_size=16, num_channels=3), main="pixel_values"))
    assert probes["pixel_values"].shape == (2, 2, 3, 16, 16)
