"""Upper bounds on sizes that are neither layers nor widths (sequence caps, queries, codec filters ...).

Each entry was a cost the census measured: a default that made a 2-layer, 64-wide instance slow (seconds per
forward in float64) or that the small image or probe cannot fill.
"""

from __future__ import annotations

from normswap.discovery.probes import _is_int


def cap_sizes(d: dict) -> None:
    """Cap these keys of one (flat) config dict in place."""
    for k, cap in (("max_source_positions", 64), ("num_conv_pos_embeddings", 16), ("num_mel_bins", 16),
                   ("spec_size", 64),  # CLAP's audio tower resizes the mel bins to a spec_size² image
                   ("attention_window", 16),  # Longformer/LED pad every input to a multiple of the window (512)
                   ("max_length", 64), ("num_queries", 8),  # DETR queries: top-k of the small image's tokens
                   ("latent_query_num", 8),  # Kosmos-2(.5): learned queries pooling the image (2048 by default)
                   ("num_frames", 4), ("frames_per_clip", 4),  # video: 4 frames are two tubelets (V-JEPA 2: 64)
                   ("num_latents", 16),  # Perceiver: latent array length (256)
                   # VITS' waveform decoder and flows: 512 channels upsampled 256× took 75 s a forward in float64
                   ("upsample_initial_channel", 32), ("duration_predictor_filter_channels", 32),
                   ("posterior_encoder_num_wavenet_layers", 2),
                   ("visual_feat_dim", 64),  # LXMERT: region features (2048)
                   ("context_size", 32),  # Granite Speech: block attention over 200-frame blocks
                   ("num_filters", 16), ("num_quantizers", 8)):  # SEANet codecs (Mimi) took 19 s
        if _is_int(d.get(k)) and d[k] > cap:
            d[k] = cap
    for k in ("conv_dim", "tdnn_dim"):  # audio feature extractors: narrow convs, same kernels and strides
        if isinstance(d.get(k), list) and all(_is_int(x) for x in d[k]):
            d[k] = [min(x, 32) for x in d[k]]
    for k in ("xvector_output_dim", "classifier_proj_size", "codevector_dim", "proj_codevector_dim"):
        if _is_int(d.get(k)) and d[k] > 32:
            d[k] = 32
