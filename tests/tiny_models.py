"""Tiny random models for tests, with weights perturbed so that bugs cannot hide behind a near-identity init.

LayerNorm gains/biases are far from 1/0 and every parameter gets a nonzero mean, so an uncentred writer or a
misplaced norm shows up as a large logit difference instead of a rounding-sized one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as T
from torch import nn

V = 96  # vocab size
H = 48  # hidden size


def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_ln = isinstance(module, nn.LayerNorm)
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
                if is_ln and name == "weight":
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
}


def make(row: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return perturb_(EXACT_ROWS[row][1](), seed)
