"""The supported architectures, each a few lines of data (see ``../shared/ARCHITECTURES.md`` for the facts).

Conventions: ``embeddings`` and ``other_norms`` are relative to the base model, ``block_*`` to one block, fold
readers may name alternatives with ``|`` (first that exists wins) and are checked against a probe before folding.
"""

from __future__ import annotations

from dataclasses import replace

from normswap.adapters.registry import register
from normswap.adapters.spec import Adapter, Norm, PostLNCondition, Stack, Writer

E = "embedding"

register(Adapter(
    model_type="gpt2",
    blocks="h",
    embeddings=(Writer("wte", E), Writer("wpe", E)),
    block_writers=(Writer("attn.c_proj", "conv1d"), Writer("mlp.c_proj", "conv1d")),
    block_norms=(
        Norm("ln_1", readers=("attn.c_attn",), reader_layout="conv1d"),
        Norm("ln_2", readers=("mlp.c_fc",), reader_layout="conv1d"),
    ),
    other_norms=(Norm("ln_f", readers=("lm_head",)),),
))

register(Adapter(
    model_type="gpt_neo",
    blocks="h",
    embeddings=(Writer("wte", E), Writer("wpe", E)),
    block_writers=(Writer("attn.attention.out_proj"), Writer("mlp.c_proj")),
    block_norms=(
        Norm("ln_1", readers=("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj")),
        Norm("ln_2", readers=("mlp.c_fc",)),
    ),
    other_norms=(Norm("ln_f", readers=("lm_head",)),),
))

register(Adapter(
    model_type="gptj",
    blocks="h",
    block_style="parallel",
    embeddings=(Writer("wte", E),),
    block_writers=(Writer("attn.out_proj"), Writer("mlp.fc_out")),
    block_norms=(Norm("ln_1", readers=("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in")),),
    other_norms=(Norm("ln_f", readers=("lm_head",)),),
))

register(Adapter(
    model_type="codegen",
    blocks="h",
    block_style="parallel",
    embeddings=(Writer("wte", E),),
    block_writers=(Writer("attn.out_proj"), Writer("mlp.fc_out")),
    block_norms=(Norm("ln_1", readers=("attn.qkv_proj", "mlp.fc_in")),),
    other_norms=(Norm("ln_f", readers=("lm_head",)),),
))

register(Adapter(
    model_type="gpt_neox",
    blocks="layers",
    block_style="sequential or parallel",
    embeddings=(Writer("embed_in", E),),
    block_writers=(Writer("attention.dense"), Writer("mlp.dense_4h_to_h")),
    block_norms=(
        Norm("input_layernorm", readers=("attention.query_key_value",)),
        Norm("post_attention_layernorm", readers=("mlp.dense_h_to_4h",)),
    ),
    other_norms=(Norm("final_layer_norm", readers=("lm_head",)),),
    disk_aliases={"lm_head.weight": "embed_out.weight"},
    notes="use_parallel_residual switches the block style; both norms exist either way",
))

register(Adapter(
    model_type="opt",
    blocks="decoder.layers",
    embeddings=(
        Writer("decoder.project_in", optional=True),
        Writer("decoder.embed_tokens", E, unless_present="decoder.project_in"),
        Writer("decoder.embed_positions", E),
    ),
    block_writers=(Writer("self_attn.out_proj"), Writer("fc2")),
    block_norms=(
        Norm("self_attn_layer_norm", readers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        Norm("final_layer_norm", readers=("fc1",)),
    ),
    other_norms=(Norm("decoder.final_layer_norm", readers=("decoder.project_out|lm_head",), optional=True),),
    post_ln_when=(PostLNCondition(
        "do_layer_norm_before", False,
        "this OPT config has do_layer_norm_before=False (post-LN, like opt-350m): its norms read stream + sublayer "
        "output, which is not zero-mean"),),
    notes="project_out reads the final norm; embed_tokens is a writer only without project_in",
))

register(Adapter(
    model_type="bloom",
    blocks="h",
    embeddings=(Writer("word_embeddings", E),),
    block_writers=(Writer("self_attention.dense"), Writer("mlp.dense_4h_to_h")),
    block_norms=(
        Norm("input_layernorm", readers=("self_attention.query_key_value",)),
        Norm("post_attention_layernorm", readers=("mlp.dense_h_to_4h",)),
    ),
    other_norms=(
        Norm("word_embeddings_layernorm", writes_stream=True),
        Norm("ln_f", readers=("lm_head",)),
    ),
    post_ln_when=(PostLNCondition(
        "apply_residual_connection_post_layernorm", True,
        "this BLOOM config has apply_residual_connection_post_layernorm=True: the residual carries the norm "
        "output, which is not zero-mean"),),
    notes="word_embeddings_layernorm writes the stream: it becomes a re-centring RMSNorm (stock keys kept, so the "
    "stock class still loads the output; folding LN(E) into the table would drop its keys)",
))

register(Adapter(
    model_type="falcon",
    blocks="h",
    block_style="sequential or parallel",
    embeddings=(Writer("word_embeddings", E),),
    block_writers=(Writer("self_attention.dense"), Writer("mlp.dense_4h_to_h")),
    block_norms=(
        Norm("ln_attn", readers=("self_attention.query_key_value",), optional=True),
        Norm("ln_mlp", readers=("mlp.dense_h_to_4h",), optional=True),
        Norm("input_layernorm", readers=("self_attention.query_key_value", "mlp.dense_h_to_4h"), optional=True),
        Norm("post_attention_layernorm", readers=("mlp.dense_h_to_4h",), optional=True),
    ),
    other_norms=(Norm("ln_f", readers=("lm_head",)),),
    notes="new_decoder_architecture uses ln_attn+ln_mlp (2 LN) or input_layernorm (1 LN); the old architecture "
    "uses input_layernorm (+ post_attention_layernorm when sequential)",
))

register(Adapter(
    model_type="phi",
    blocks="layers",
    block_style="parallel",
    embeddings=(Writer("embed_tokens", E),),
    block_writers=(Writer("self_attn.dense"), Writer("mlp.fc2")),
    block_norms=(Norm("input_layernorm",
                      readers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1")),),
    other_norms=(Norm("final_layernorm", readers=("lm_head",)),),
    kept_norms=("self_attn.q_layernorm", "self_attn.k_layernorm"),
))

register(Adapter(
    model_type="gpt_bigcode",
    blocks="h",
    embeddings=(Writer("wte", E), Writer("wpe", E)),
    block_writers=(Writer("attn.c_proj"), Writer("mlp.c_proj")),
    block_norms=(Norm("ln_1", readers=("attn.c_attn",)), Norm("ln_2", readers=("mlp.c_fc",))),
    other_norms=(Norm("ln_f", readers=("lm_head",)),),
))

register(Adapter(
    model_type="stablelm",
    blocks="layers",
    block_style="sequential or parallel",
    embeddings=(Writer("embed_tokens", E),),
    block_writers=(Writer("self_attn.o_proj"), Writer("mlp.down_proj")),
    block_norms=(
        Norm("input_layernorm",
             readers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")),
        Norm("post_attention_layernorm", readers=("mlp.gate_proj", "mlp.up_proj"), optional=True),
    ),
    other_norms=(Norm("norm", readers=("lm_head",)),),
    kept_norms=("self_attn.q_layernorm", "self_attn.k_layernorm"),
    notes="use_parallel_residual drops post_attention_layernorm; the per-head q/k norms read projections, not the "
    "stream, and stay LayerNorm",
))

register(Adapter(
    model_type="vit",
    blocks="layers",
    embeddings=(
        Writer("embeddings.patch_embeddings.projection", "conv2d"),
        Writer("embeddings.cls_token", "param"),
        Writer("embeddings.position_embeddings", "param"),
        Writer("embeddings.mask_token", "param", optional=True),
    ),
    block_writers=(Writer("attention.o_proj"), Writer("mlp.fc2")),
    block_norms=(
        Norm("layernorm_before", readers=("attention.q_proj", "attention.k_proj", "attention.v_proj")),
        Norm("layernorm_after", readers=("mlp.fc1",)),
    ),
    other_norms=(Norm("layernorm"),),
    disk_aliases={"layers": "encoder.layer", "attention.o_proj": "attention.output.dense",
                  "attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
                  "attention.v_proj": "attention.attention.value", "mlp.fc1": "intermediate.dense",
                  "mlp.fc2": "output.dense"},
    notes="the final layernorm's output is the model output (and feeds pooler/classifier slices): never folded",
))

# --- issue 13 pins: LayerNorm by behaviour, LayerScale, run-time re-centring, several stacks --------------------
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_HEAD_NORMS = "per-head q/k norms read projections, not the stream"

register(Adapter(
    model_type="cohere",
    blocks="layers",
    block_style="parallel",
    embeddings=(Writer("embed_tokens", E),),
    block_writers=(Writer("self_attn.o_proj"), Writer("mlp.down_proj")),
    block_norms=(Norm("input_layernorm", readers=(*QKV, "mlp.gate_proj", "mlp.up_proj")),),
    other_norms=(Norm("norm", readers=("lm_head",)),),
    kept_norms=("self_attn.q_norm", "self_attn.k_norm"),
    kept_reasons={"self_attn.q_norm": _HEAD_NORMS, "self_attn.k_norm": _HEAD_NORMS},
    notes="CohereLayerNorm is a bias-free LayerNorm of its own class (eps in variance_epsilon); tied head and "
    "logit_scale (a scalar on the logits) need nothing",
))

register(Adapter(
    model_type="olmo",
    blocks="layers",
    embeddings=(Writer("embed_tokens", E),),
    block_writers=(Writer("self_attn.o_proj"), Writer("mlp.down_proj")),
    block_norms=(Norm("input_layernorm", readers=QKV),
                 Norm("post_attention_layernorm", readers=("mlp.gate_proj", "mlp.up_proj"))),
    other_norms=(Norm("norm", readers=("lm_head",)),),
    notes="OlmoLayerNorm has no parameters at all (eps fixed at 1e-5): the swap changes no key",
))

_DINO_EMBEDDINGS = (
    Writer("embeddings.patch_embeddings.projection", "conv2d"),
    Writer("embeddings.cls_token", "param"),
    Writer("embeddings.position_embeddings", "param"),
    Writer("embeddings.mask_token", "param", optional=True),
    Writer("embeddings.register_tokens", "param", optional=True),
)
_DINO = dict(
    blocks="encoder.layer",
    embeddings=_DINO_EMBEDDINGS,
    block_writers=(
        Writer("attention.o_proj", scale="layer_scale1.lambda1"),
        Writer("mlp.fc2", scale="layer_scale2.lambda1", optional=True),
        Writer("mlp.down_proj", scale="layer_scale2.lambda1", optional=True),  # use_swiglu_ffn
    ),
    block_norms=(
        Norm("norm1", readers=("attention.q_proj", "attention.k_proj", "attention.v_proj")),
        Norm("norm2", readers=("mlp.fc1", "mlp.gate_proj", "mlp.up_proj")),
    ),
    other_norms=(Norm("layernorm"),),
    disk_aliases={"attention.o_proj": "attention.output.dense", "attention.q_proj": "attention.attention.query",
                  "attention.k_proj": "attention.attention.key", "attention.v_proj": "attention.attention.value",
                  "mlp.down_proj": "mlp.weights_out"},
    notes="LayerScale (layer_scaleN.lambda1) is folded into o_proj/fc2 before centring and left as ones; "
    "interpolated positions are a per-channel linear map of the centred table, so they stay centred",
)
register(Adapter(model_type="dinov2", **_DINO))
register(Adapter(model_type="dinov2_with_registers", **_DINO))

_SEQ2SEQ_ENCODER_BLOCK = dict(
    block_writers=(Writer("self_attn.out_proj"), Writer("fc2")),
    block_norms=(Norm("self_attn_layer_norm", readers=QKV), Norm("final_layer_norm", readers=("fc1",))),
)
_SEQ2SEQ_DECODER = Stack(
    "decoder.layers",
    block_writers=(Writer("self_attn.out_proj"), Writer("encoder_attn.out_proj"), Writer("fc2")),
    block_norms=(Norm("self_attn_layer_norm", readers=QKV),
                 Norm("encoder_attn_layer_norm", readers=("encoder_attn.q_proj",)),
                 Norm("final_layer_norm", readers=("fc1",))),
)

_SEQ2SEQ_ENCODER = Stack("encoder.layers", **_SEQ2SEQ_ENCODER_BLOCK)

register(Adapter(
    model_type="whisper",
    blocks="",
    embeddings=(
        Writer("encoder.layers.0", "recenter_input", optional=True),
        Writer("decoder.embed_tokens", E, optional=True),
        Writer("decoder.embed_positions", E, optional=True),
    ),
    other_norms=(Norm("encoder.layer_norm", optional=True),
                 Norm("decoder.layer_norm", readers=("proj_out",), optional=True)),
    stacks=(replace(_SEQ2SEQ_ENCODER, optional=True), replace(_SEQ2SEQ_DECODER, optional=True)),
    notes="the encoder's conv stem ends in an inline GELU: the first encoder layer's input is re-centred at run time; "
    "proj_out is untied from the decoder embeddings; the decoder's cross-attention out_proj writes the decoder "
    "stream and its k/v read the encoder's final norm. Encoder and decoder are optional roles, for "
    "WhisperForAudioClassification (encoder only) and WhisperForCausalLM (decoder only)",
))

_CLIP_BLOCK = dict(
    block_writers=(Writer("self_attn.out_proj"), Writer("mlp.fc2")),
    block_norms=(Norm("layer_norm1", readers=QKV), Norm("layer_norm2", readers=("mlp.fc1",))),
)
_CLIP_VISION_EMBEDDINGS = (
    Writer("embeddings.patch_embedding", "conv2d"),
    Writer("embeddings.class_embedding", "param"),
    Writer("embeddings.position_embedding", E),
)
_CLIP_NOTES = ("pre_layrnorm's output is the stream: it becomes a re-centring RMSNorm; the vision tower returns the "
               "raw stream as last_hidden_state (mean-removed after conversion), pooler_output is exact")

register(Adapter(
    model_type="clip_vision_model",
    blocks="encoder.layers",
    embeddings=_CLIP_VISION_EMBEDDINGS,
    other_norms=(Norm("pre_layrnorm", writes_stream=True), Norm("post_layernorm")),
    raw_stream_outputs=("last_hidden_state", "hidden_states"),
    notes=_CLIP_NOTES,
    **_CLIP_BLOCK,
))

register(Adapter(
    model_type="clip_text_model",
    blocks="encoder.layers",
    embeddings=(Writer("embeddings.token_embedding", E), Writer("embeddings.position_embedding", E)),
    other_norms=(Norm("final_layer_norm"),),
    raw_stream_outputs=("hidden_states",),
    **_CLIP_BLOCK,
))


def _prefixed(prefix: str, writers: tuple[Writer, ...]) -> tuple[Writer, ...]:
    return tuple(Writer(prefix + w.path, w.layout, w.optional, w.unless_present, w.scale) for w in writers)


register(Adapter(
    model_type="clip",
    blocks="",
    embeddings=(
        Writer("text_model.embeddings.token_embedding", E, optional=True),
        Writer("text_model.embeddings.position_embedding", E, optional=True),
        *_prefixed("vision_model.", _CLIP_VISION_EMBEDDINGS),
    ),
    other_norms=(Norm("text_model.final_layer_norm", optional=True),
                 Norm("vision_model.pre_layrnorm", writes_stream=True), Norm("vision_model.post_layernorm")),
    stacks=(Stack("text_model.encoder.layers", optional=True, **_CLIP_BLOCK),
            Stack("vision_model.encoder.layers", **_CLIP_BLOCK)),
    raw_stream_outputs=("vision_model_output.last_hidden_state", "vision_model_output.hidden_states",
                        "text_model_output.hidden_states"),
    notes=_CLIP_NOTES,
))

_SHARED_TOKENS = (Writer("shared", E), Writer("encoder.embed_tokens", E), Writer("decoder.embed_tokens", E))

register(Adapter(
    model_type="m2m_100",
    blocks="encoder.layers",
    embeddings=(*_SHARED_TOKENS, Writer("encoder.embed_positions", "recenter"),
                Writer("decoder.embed_positions", "recenter")),
    other_norms=(Norm("encoder.layer_norm"), Norm("decoder.layer_norm", readers=("lm_head",))),
    stacks=(_SEQ2SEQ_DECODER,),
    **_SEQ2SEQ_ENCODER_BLOCK,
    notes="sinusoidal positions live in a non-persistent buffer, so no checkpoint can hold them centred: their "
    "output is re-centred at run time; shared/encoder/decoder token tables are centred, lm_head untied",
))

register(Adapter(
    model_type="mbart",
    blocks="encoder.layers",
    embeddings=(*_SHARED_TOKENS, Writer("encoder.embed_positions", E), Writer("decoder.embed_positions", E)),
    other_norms=(
        Norm("encoder.layernorm_embedding", writes_stream=True),
        Norm("encoder.layer_norm"),
        Norm("decoder.layernorm_embedding", writes_stream=True),
        Norm("decoder.layer_norm", readers=("lm_head",)),
    ),
    stacks=(_SEQ2SEQ_DECODER,),
    **_SEQ2SEQ_ENCODER_BLOCK,
    notes="layernorm_embedding writes the stream: a re-centring RMSNorm; learned positions (offset 2) are centred",
))

# The post-LN encoders (approximate conversion) live in their own module.
from normswap.adapters import post_ln as _post_ln  # noqa: E402, F401  (registers them)
