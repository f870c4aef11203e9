"""Approximate conversion of post-LN models (BERT family, post-LN OPT): what is exact stays exact, the rest is
swapped with the damage measured and reduced by function-preserving edits, and the output reloads faithfully."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from tiny_models import H, V, perturb_
from tiny_text import char_tokenizer, tiny_bert
from torch import nn

import normswap
from normswap.adapters import get_adapter, supported_model_types
from normswap.errors import NotExactError
from normswap.norm import RMSNorm
from normswap.verify import make_probes, primary_output

_SMALL = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)


def _roberta(cls):
    return lambda: perturb_(cls(T.RobertaConfig(max_position_embeddings=66, pad_token_id=1, **_SMALL)))


def _xlmr():
    return perturb_(T.XLMRobertaModel(T.XLMRobertaConfig(max_position_embeddings=66, pad_token_id=1, **_SMALL)))


def _distil():
    cfg = T.DistilBertConfig(vocab_size=V, dim=H, n_layers=2, n_heads=4, hidden_dim=96, max_position_embeddings=64)
    return perturb_(T.DistilBertForMaskedLM(cfg))


def _opt_post_ln():
    cfg = T.OPTConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
                      max_position_embeddings=64, word_embed_proj_dim=H, do_layer_norm_before=False,
                      pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return perturb_(T.OPTForCausalLM(cfg))


def _bloom_post_residual():
    cfg = T.BloomConfig(vocab_size=V, hidden_size=H, n_layer=2, n_head=4, apply_residual_connection_post_layernorm=True)
    return perturb_(T.BloomForCausalLM(cfg))


#: id -> (factory, exact norm names, kept norm names)
ROWS = {
    "bert-base": (lambda: tiny_bert(T.BertModel), ["embeddings.LayerNorm"], []),
    "bert-mlm": (lambda: tiny_bert(T.BertForMaskedLM), ["bert.embeddings.LayerNorm"],
                 ["cls.predictions.transform.LayerNorm"]),
    "bert-classifier": (lambda: tiny_bert(T.BertForSequenceClassification), ["bert.embeddings.LayerNorm"], []),
    "roberta-base": (_roberta(T.RobertaModel), ["embeddings.LayerNorm"], []),
    "roberta-mlm": (_roberta(T.RobertaForMaskedLM), ["roberta.embeddings.LayerNorm"], ["lm_head.layer_norm"]),
    "xlm-roberta-base": (_xlmr, ["embeddings.LayerNorm"], []),
    "distilbert-mlm": (_distil, ["distilbert.embeddings.LayerNorm"], ["vocab_layer_norm"]),
    "opt-post-ln": (_opt_post_ln, [], []),
    "bloom-post-residual": (_bloom_post_residual, [], []),
}


def _out(model: nn.Module, probes: dict) -> torch.Tensor:
    with torch.no_grad():
        return primary_output(model(**probes)).double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _naive_swap(model: nn.Module, keep: list[str]) -> nn.Module:
    """Every stream norm replaced by RMSNorm with nothing else done: the baseline the preparation must beat."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.LayerNorm) and not isinstance(module, RMSNorm) and name not in keep:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, RMSNorm.from_layernorm(module))
    return model


def test_every_post_ln_adapter_has_a_test_row():
    covered = {ROWS[row][0]().config.model_type for row in ROWS}
    post = {t for t in supported_model_types() if get_adapter(t).norm_position == "post" or get_adapter(t).post_ln_when}
    assert post <= covered, f"post-LN adapters without a row here: {sorted(post - covered)}"


def test_post_ln_adapters_are_registered_as_post_ln():
    for model_type in ("bert", "roberta", "xlm-roberta", "distilbert"):
        adapter = get_adapter(model_type)
        assert adapter.norm_position == "post"
        assert [n.exact for n in adapter.block_norms] == [False, False]
        assert [n.exact for n in adapter.other_norms] == [True]  # the embedding norm reads centred tables


@pytest.mark.parametrize("row", sorted(ROWS))
def test_exact_mode_refuses_and_names_the_approximate_path(row):
    model = ROWS[row][0]()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NotExactError, match="--approximate"):
        normswap.convert_(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "refusal must not touch weights"


@pytest.mark.parametrize("row", sorted(ROWS))
def test_approximate_conversion(row, tmp_path):
    factory, exact_norms, kept = ROWS[row]
    original = factory()
    model = copy.deepcopy(original)
    probes = make_probes(model, seq_len=24)
    ref = _out(original, probes)

    report = normswap.convert_(model, approximate=True, probes=probes)
    assert report.mode == "approximate" and report.passed, report.summary()
    # norm by norm: which are exact, which approximate, which stay LayerNorm
    assert sorted(set(report.swapped_norms) - set(report.approximate_norms)) == exact_norms
    # 2 blocks x 2 post-LN norms (BLOOM: + its embedding norm and ln_f, which read the post-LN stream too)
    assert len(report.approximate_norms) == (6 if row.startswith("bloom") else 4)
    assert report.kept_norms == kept and report.unaccounted_norms == []
    v = report.verification
    for name in exact_norms:  # the exact part really is exact: its input is centred
        assert v.norm_inputs[name].exact and v.norm_inputs[name].max_mean_over_rms < 1e-5
    assert v.rel_max_abs_diff > 1e-3, "an approximate swap that measures no damage is measuring the wrong thing"
    if v.output_kind == "hidden":
        assert v.cosine_mean is not None and v.cosine_min <= v.cosine_mean < 1
    assert _rel(_out(model, probes), ref) == pytest.approx(v.rel_max_abs_diff, rel=1e-6)

    # centring + mean(β) moves cut the damage well below a plain swap of the same norms
    naive = _rel(_out(_naive_swap(copy.deepcopy(original), kept), probes), ref)
    assert v.rel_max_abs_diff < naive / 3, (v.rel_max_abs_diff, naive)

    # BERT family: every edit made before the swap (centring, mean(β) moves) leaves LayerNorm's function unchanged:
    # the same tensors under stock key names, in the stock LayerNorm class, compute the original model. (Post-LN
    # OPT feeds its embeddings straight into layer 0's attention, so centring them is part of the approximation.)
    stock = copy.deepcopy(original)
    stock.load_state_dict(model.state_dict())
    if row != "opt-post-ln":
        assert _rel(_out(stock, probes), ref) < 1e-4

    # the saved folder reloads with its RMSNorms through normswap.load, and the stock class refuses it (these
    # weights are only right with RMSNorm)
    out = normswap.save(model, tmp_path / "out")
    loaded = normswap.load(out)
    assert {n for n, m in loaded.named_modules() if isinstance(m, RMSNorm)} == set(report.swapped_norms)
    assert _rel(_out(loaded, probes), _out(model, probes)) < 1e-6
    assert loaded.config.normswap["approximate_norms"] == report.approximate_norms
    with pytest.raises(Exception, match="only correct with RMSNorm"):
        type(original).from_pretrained(out)


def test_bias_mean_moves_where_provably_safe():
    """The last norm of a bare encoder is the model output: its β keeps its mean; an MLM head's dense absorbs it."""
    base = normswap.convert_(tiny_bert(T.BertModel), approximate=True)
    last = "encoder.layer.1.output.LayerNorm"
    assert "model's output" in base.bias_means["skipped"][last]
    assert set(base.bias_means["folded"]) == set(base.swapped_norms) - {last}
    assert all(abs(m) > 0 for m in base.bias_means["folded"].values())

    mlm = tiny_bert(T.BertForMaskedLM)
    report = normswap.convert_(mlm, approximate=True)
    assert set(report.bias_means["folded"]) == set(report.swapped_norms)
    for name in report.swapped_norms:  # the moved means are gone from the norms' biases
        assert abs(float(mlm.get_submodule(name).bias.detach().double().mean())) < 1e-6
    assert any("mean(β)" in note for note in report.notes)


def test_approximate_report_on_real_tokens():
    """With a tokenizer the probe is text; the report still says norm by norm what is approximate."""
    model = tiny_bert(T.BertModel)
    report = normswap.convert_(model, approximate=True, tokenizer=char_tokenizer())
    text = report.summary()
    assert "approximate conversion" in text and "4 approximate" in text and "mean cosine" in text
    meta = model.config.normswap
    assert meta["mode"] == "approximate" and meta["approximate_norms"] == report.approximate_norms
    assert meta["verification"]["cosine_mean"] == pytest.approx(report.verification.cosine_mean)


def test_a_head_tied_to_the_decoders_embedding_is_untied_not_centred(tmp_path):
    """An encoder-decoder's LM head shares the *decoder's* word embedding, not the table ``get_input_embeddings``
    names; centring that embedding (a writer) used to centre the head with it, adding avoidable damage."""
    torch.manual_seed(0)
    enc = T.BertConfig(**_SMALL)
    dec = T.BertConfig(**_SMALL, is_decoder=True, add_cross_attention=True)
    cfg = T.EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id = cfg.pad_token_id = 0
    model = perturb_(T.EncoderDecoderModel(config=cfg)).eval()
    assert model.get_output_embeddings().weight is model.decoder.get_input_embeddings().weight
    head = model.get_output_embeddings().weight.detach().clone()
    report = normswap.convert_(model, approximate=True)
    assert report.untied_head
    assert torch.equal(model.get_output_embeddings().weight, head)  # the head computes what it computed
    embedding = model.decoder.get_input_embeddings().weight
    assert float(embedding.double().mean(-1).abs().max()) < 1e-6  # while the writer it was tied to is centred
    ids = torch.randint(1, V, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids, decoder_input_ids=ids).logits
    normswap.save(model, tmp_path / "out")
    reloaded = normswap.load(tmp_path / "out").eval()
    assert reloaded.get_output_embeddings().weight is not reloaded.decoder.get_input_embeddings().weight
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, decoder_input_ids=ids).logits, before)
