"""Tiny text, a character-level tokenizer and tiny post-LN encoders for the approximate-conversion and finetune tests.

The tokenizer has 65 ids, so it fits the 96-token vocab of the tiny models in ``tiny_models``; the text is synthetic
(seeded), so the tests need nothing from ../shared.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

import transformers as T
from tiny_models import H, V, perturb_
from torch import nn

WORDS = ("thou art more lovely and temperate rough winds do shake the darling buds of may summer lease hath all too "
         "short a date sometime eye heaven shines hot often is his gold complexion dimmed fair from declines by "
         "chance nature changing course untrimmed but thy eternal shall not fade nor lose possession that owest").split()


def char_tokenizer() -> T.PreTrainedTokenizerBase:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
             *("##" + c for c in string.ascii_lowercase), *".,;:!?'-"]
    return T.BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})


def corpus_lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7))) + rng.choice(".,;!?") for _ in range(n)]


def write_text(path: Path, n: int, seed: int = 0) -> Path:
    path.write_text("\n".join(corpus_lines(n, seed)) + "\n")
    return path


def bert_config(**kw) -> T.BertConfig:
    base = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)
    return T.BertConfig(**{**base, **kw})


def tiny_bert(cls=T.BertModel, seed: int = 0, **kw) -> nn.Module:
    import torch

    torch.manual_seed(seed)
    return perturb_(cls(bert_config(**kw)), seed)
