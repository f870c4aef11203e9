"""Load any model ``eval``/``bench`` are pointed at: a normswap output runs with its RMSNorms, anything else as is.

A converted checkpoint keeps stock key names, so the stock class would load it with LayerNorms; measuring that
would measure the wrong model. ``normswap.load`` puts the RMSNorms back, which is what users deploy.

Whether a folder is a normswap output is read from the raw ``config.json``, never through ``AutoConfig``: approximate
and fine-tuned outputs name a ``normswap_<type>`` model type that only their shipped remote code defines, so
``AutoConfig`` would ask to run that code (an interactive prompt, then a failure when stdin is closed). normswap's
own classes load them without it.
"""

from __future__ import annotations

import json
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


def normswap_metadata(path: str) -> dict | None:
    """The ``normswap`` block of a folder's (or hub id's) ``config.json``, or ``None`` if it has none.

    Plain JSON on purpose: no config class is built, so no remote code is ever resolved or offered.
    """
    from transformers.utils import cached_file

    try:
        config_file = cached_file(path, "config.json")
        with open(config_file, encoding="utf-8") as fh:
            data = json.load(fh)
    except Exception:  # noqa: BLE001 - missing/unreadable: load_source below fails with the readable message
        return None
    meta = data.get("normswap") if isinstance(data, dict) else None
    return meta if isinstance(meta, dict) and "swapped_norms" in meta else None


def load_for_eval(src: str | None, dtype: str = "float32", device: str | None = None) -> EvalModel:
    """Load ``src`` for measurement: normswap outputs (exact, approximate, fine-tuned) through :func:`load`."""
    path = resolve_model(src)
    if normswap_metadata(path) is not None:
        model = load(path, dtype=dtype, device=device)
        tokenizer = None
        try:
            # The stock config: without it AutoTokenizer reads config.json itself and offers to run the remote code.
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, config=model.config)
        except Exception:  # noqa: BLE001 - encoders on pixels need none
            logger.info("no tokenizer found for %s", path)
        return EvalModel(model, tokenizer, path, converted=True)
    source = load_source(path, dtype=dtype, device=device)
    return EvalModel(source.model, source.tokenizer, path, converted=False)
