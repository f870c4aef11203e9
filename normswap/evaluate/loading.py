"""Load any model ``eval``/``bench`` are pointed at: a normswap output runs with its RMSNorms, anything else as is.

A converted checkpoint keeps stock key names, so the stock class would load it with LayerNorms; measuring that
would measure the wrong model. ``normswap.load`` puts the RMSNorms back, which is what users deploy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import transformers
from torch import nn

from normswap.assets import resolve_model
from normswap.checkpoint import load, load_source

logger = logging.getLogger(__name__)


@dataclass
class EvalModel:
    model: nn.Module
    tokenizer: object | None
    path: str
    converted: bool

    @property
    def label(self) -> str:
        return f"{self.path} ({'RMSNorm, normswap output' if self.converted else 'original'})"


def is_causal_lm(model: nn.Module) -> bool:
    """Whether perplexity is meaningful: a decoder-only model that generates (not an encoder, not seq2seq)."""
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate and can_generate()) and not getattr(model.config, "is_encoder_decoder", False)


def load_for_eval(src: str | None, dtype: str = "float32", device: str | None = None) -> EvalModel:
    path = resolve_model(src)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except Exception:  # noqa: BLE001 - load_source below fails with the readable message
        config = None
    meta = getattr(config, "normswap", None)
    if isinstance(meta, dict) and "swapped_norms" in meta:
        model = load(path, dtype=dtype, device=device)
        tokenizer = None
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        except Exception:  # noqa: BLE001 - encoders on pixels need none
            logger.info("no tokenizer found for %s", path)
        return EvalModel(model, tokenizer, path, converted=True)
    source = load_source(path, dtype=dtype, device=device)
    return EvalModel(source.model, source.tokenizer, path, converted=False)
