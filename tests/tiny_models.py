"""Tiny random models for tests, with weights perturbed so that bugs cannot hide behind a near-identity init.

LayerNorm gains/biases are far from 1/0 and every parameter gets a nonzero mean, so an uncentred writer or a
misplaced norm shows up as a large logit difference instead of a rounding-sized one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as T
from torch import nn

from normswap.norm import is_layernorm_like

V = 96  # vocab size
H = 48  # hidden size


def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_ln = is_layernorm_like(module)  # nn.LayerNorm and the models' own classes (CohereLayerNorm)
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
                if name.startswith("lambda"):  # LayerScale (DINOv2 lambda1, BEiT lambda_1): far from its init
                    p.copy_(0.5 + 0.3 * noise)
                elif is_ln and name == "weight":
                    p.copy_(1.0 + 0.3 * noise)
                elif is_ln and name == "bias":
                    p.copy_(0.1 + 0.2 * noise)
                else:
                    p.add_(0.03 * noise + 0.02)
    return model.eval()


def _causal(config_cls, **kw) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        cfg = config_cls(vocab_size=V, bos_token_id=0, eos_token_id=0, pad_token_id=0, **kw)
        return T.AutoModelForCausalLM.from_config(cfg)
    return make


def _vit(cls) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        cfg = T.ViTConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                          image_size=16, patch_size=4, num_labels=5)
        return cls(cfg)
    return make


def _dinov2(cls, config_cls=T.Dinov2Config, **kw) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        return cls(config_cls(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=16,
                              patch_size=4, **kw))
    return make


def _vision_cfg() -> dict:
    return dict(hidden_size=H, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                patch_size=4)


def _text_cfg() -> dict:
    return dict(vocab_size=V, hidden_size=H, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=32)


def clip_config() -> T.CLIPConfig:
    # 224-pixel images (what probes of a composite config get) cut into 16 patches of 56
    return T.CLIPConfig(text_config=_text_cfg(), vision_config={**_vision_cfg(), "image_size": 224, "patch_size": 56},
                        projection_dim=24)


def whisper_config() -> T.WhisperConfig:
    return T.WhisperConfig(vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                           d_model=H, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, num_mel_bins=16,
                           max_source_positions=16, max_target_positions=32)


def _seq2seq(config_cls, cls, **kw) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        return cls(config_cls(vocab_size=V, d_model=H, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                              decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96,
                              max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                              decoder_start_token_id=2, **kw))
    return make


#: One row per configuration an adapter must convert exactly: id → (model_type, factory).
EXACT_ROWS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "gpt2": ("gpt2", _causal(T.GPT2Config, n_embd=H, n_layer=2, n_head=4, n_positions=64)),
    "gpt_neo": ("gpt_neo", _causal(T.GPTNeoConfig, hidden_size=H, num_layers=2, num_heads=4,
                                   max_position_embeddings=64, attention_types=[[["global", "local"], 1]],
                                   window_size=8)),
    "gptj": ("gptj", _causal(T.GPTJConfig, n_embd=H, n_layer=2, n_head=4, n_positions=64, rotary_dim=4)),
    "gpt_neox-parallel": ("gpt_neox", _causal(T.GPTNeoXConfig, hidden_size=H, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=96,
                                              use_parallel_residual=True)),
    "gpt_neox-sequential": ("gpt_neox", _causal(T.GPTNeoXConfig, hidden_size=H, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=96,
                                                use_parallel_residual=False)),
    "opt": ("opt", _causal(T.OPTConfig, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
                           max_position_embeddings=64, word_embed_proj_dim=H)),
    "opt-project_in_out": ("opt", _causal(T.OPTConfig, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                          ffn_dim=96, max_position_embeddings=64, word_embed_proj_dim=32)),
    "bloom": ("bloom", _causal(T.BloomConfig, hidden_size=H, n_layer=2, n_head=4)),
    "falcon-new-2ln": ("falcon", _causal(T.FalconConfig, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                         new_decoder_architecture=True, num_kv_heads=2, bias=True)),
    "falcon-new-1ln": ("falcon", _causal(T.FalconConfig, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                         new_decoder_architecture=True, num_kv_heads=2,
                                         num_ln_in_parallel_attn=1)),
    "falcon-old-parallel": ("falcon", _causal(T.FalconConfig, hidden_size=H, num_hidden_layers=2,
                                              num_attention_heads=4, new_decoder_architecture=False,
                                              parallel_attn=True, multi_query=True)),
    "falcon-old-sequential-alibi": ("falcon", _causal(T.FalconConfig, hidden_size=H, num_hidden_layers=2,
                                                      num_attention_heads=4, new_decoder_architecture=False,
                                                      parallel_attn=False, alibi=True, multi_query=False,
                                                      bias=True)),
    "phi": ("phi", _causal(T.PhiConfig, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=96, qk_layernorm=True)),
    "gpt_bigcode": ("gpt_bigcode", _causal(T.GPTBigCodeConfig, n_embd=H, n_layer=2, n_head=4, n_positions=64)),
    "stablelm-sequential": ("stablelm", _causal(T.StableLmConfig, hidden_size=H, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=4,
                                                intermediate_size=96, qk_layernorm=True,
                                                use_parallel_residual=False, use_qkv_bias=True,
                                                partial_rotary_factor=0.5)),
    "stablelm-parallel": ("stablelm", _causal(T.StableLmConfig, hidden_size=H, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
                                              qk_layernorm=True, use_parallel_residual=True, partial_rotary_factor=0.5)),
    "codegen": ("codegen", _causal(T.CodeGenConfig, n_embd=H, n_layer=2, n_head=4, n_positions=64, rotary_dim=4)),
    "vit-model": ("vit", _vit(T.ViTModel)),
    "vit-classification": ("vit", _vit(T.ViTForImageClassification)),
    # issue 13 pins (tests/test_structures.py: stock reload, raw stream outputs, streaming, keep_centered)
    "cohere": ("cohere", _causal(T.CohereConfig, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=96, use_qk_norm=True)),
    "olmo": ("olmo", _causal(T.OlmoConfig, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=96)),
    "dinov2": ("dinov2", _dinov2(T.Dinov2Model)),
    "dinov2-swiglu-classification": ("dinov2", _dinov2(T.Dinov2ForImageClassification, use_swiglu_ffn=True,
                                                       num_labels=5)),
    "dinov2_with_registers": ("dinov2_with_registers", _dinov2(T.Dinov2WithRegistersModel,
                                                               T.Dinov2WithRegistersConfig)),
    "whisper": ("whisper", lambda: T.WhisperForConditionalGeneration(whisper_config())),
    "clip_vision_model": ("clip_vision_model", lambda: T.CLIPVisionModelWithProjection(
        T.CLIPVisionConfig(**_vision_cfg(), projection_dim=24))),
    "clip_text_model": ("clip_text_model", lambda: T.CLIPTextModel(T.CLIPTextConfig(**_text_cfg()))),
    "clip": ("clip", lambda: T.CLIPModel(clip_config())),
    "mbart": ("mbart", _seq2seq(T.MBartConfig, T.MBartForConditionalGeneration)),
    "m2m_100": ("m2m_100", _seq2seq(T.M2M100Config, T.M2M100ForConditionalGeneration)),
}


def make(row: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return perturb_(EXACT_ROWS[row][1](), seed)
