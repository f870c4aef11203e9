"""Post-LN encoders, converted approximately (see docs/FINETUNE.md); same data format as ``architectures.py``."""

from __future__ import annotations

from normswap.adapters.registry import register
from normswap.adapters.spec import Adapter, Norm, Writer

E = "embedding"

# --- post-LN encoders (approximate conversion; see docs/FINETUNE.md) -----------------------------------------------
# Every block norm reads "previous norm output + sublayer output": the previous output γ·x̂+β is not zero-mean, so
# those swaps are approximate. Centring the block writers is still free (the LayerNorm right after them removes the
# mean anyway) and shrinks the mean the RMSNorm sees; the embedding norm reads a sum of centred tables and is exact.
# No fold readers: each norm's output also feeds the residual, so folding γ/β into Q/K/V would change that residual.

_BERT_LIKE = dict(
    blocks="encoder.layer",
    norm_position="post",
    embeddings=(
        Writer("embeddings.word_embeddings", E),
        Writer("embeddings.position_embeddings", E, optional=True),
        Writer("embeddings.token_type_embeddings", E, optional=True),
    ),
    block_writers=(Writer("attention.output.dense"), Writer("output.dense")),
    block_norms=(Norm("attention.output.LayerNorm", exact=False), Norm("output.LayerNorm", exact=False)),
    other_norms=(Norm("embeddings.LayerNorm"),),
)

register(Adapter(
    model_type="bert",
    kept_norms=("cls.predictions.transform.LayerNorm",),
    notes="post-LN: only embeddings.LayerNorm is exact; the MLM head's transform LayerNorm reads a projection, not "
    "the stream, and stays LayerNorm",
    **_BERT_LIKE,
))

register(Adapter(
    model_type="roberta",
    kept_norms=("lm_head.layer_norm",),
    notes="post-LN like bert; the MLM head's layer_norm stays LayerNorm",
    **_BERT_LIKE,
))

register(Adapter(
    model_type="xlm-roberta",
    kept_norms=("lm_head.layer_norm",),
    notes="post-LN like bert; the MLM head's layer_norm stays LayerNorm",
    **_BERT_LIKE,
))

register(Adapter(
    model_type="distilbert",
    blocks="transformer.layer",
    norm_position="post",
    embeddings=(Writer("embeddings.word_embeddings", E), Writer("embeddings.position_embeddings", E)),
    block_writers=(Writer("attention.out_lin"), Writer("ffn.lin2")),
    block_norms=(Norm("sa_layer_norm", exact=False), Norm("output_layer_norm", exact=False)),
    other_norms=(Norm("embeddings.LayerNorm"),),
    kept_norms=("vocab_layer_norm",),
    notes="post-LN like bert (no token types); vocab_layer_norm in the MLM head stays LayerNorm",
))
