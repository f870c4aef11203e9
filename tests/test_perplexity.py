"""Perplexity (hf-stride) against independent computations, corpus counts, encoder fidelity, and `eval --json`."""

from __future__ import annotations

import copy
import json
import math
import sys
import types

import pytest
import torch
import transformers as T
from conftest import SHARED_MODEL, SHARED_VALID, needs_shared
from tiny_models import make, perturb_

import normswap
from normswap.assets import DEFAULT_MODEL, DEFAULT_TEXT
from normswap.cli import main
from normswap.errors import NormswapError
from normswap.evaluate.corpus import Corpus, count_bytes, count_words, load_corpus, text_lines
from normswap.evaluate.fidelity import cosine_fidelity, encoder_inputs, pooled_features
from normswap.evaluate.perplexity import evaluate_perplexity, nll_metrics, plan_windows, tokenize_corpus

TEXT = (
    "When shall we three meet again, in thunder, lightning, or in rain? When the hurlyburly's done, when the battle's "
    "lost and won. That will be ere the set of sun. Where the place? Upon the heath. There to meet with Macbeth."
)


@pytest.fixture(scope="module")
def tokenizer():
    return T.AutoTokenizer.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    """A 2-layer GPT-2 over the embedded tokenizer's vocabulary, weights perturbed away from the init."""
    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                       bos_token_id=0, eos_token_id=0)
    return perturb_(T.GPT2LMHeadModel(cfg), seed=1)


@pytest.fixture(scope="module")
def tiny_lm_dir(tiny_lm, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-lm")
    tiny_lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def ids_of(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text)["input_ids"])


# --- windows ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,max_length,stride", [(100, 16, 8), (100, 16, 16), (17, 16, 5), (10, 16, 8), (33, 8, 3)])
def test_windows_score_every_token_once_and_stay_within_max_length(n, max_length, stride):
    windows = plan_windows(n, max_length, stride)
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    assert len(scored) == len(set(scored)), "a token was scored twice"
    assert all(w.length <= max_length and w.begin < w.score_from for w in windows)
    assert windows[-1].end == n
    if stride < max_length:
        assert sorted(scored) == list(range(1, n))  # everything but the first token, which has no context
    else:
        unscored = set(range(n)) - set(scored)
        assert unscored == {w.begin for w in windows}  # each window's first token has no context inside it


def test_window_arguments_are_checked():
    with pytest.raises(ValueError, match="stride"):
        plan_windows(100, 16, 17)
    with pytest.raises(ValueError, match="max_length"):
        plan_windows(100, 1, 1)


# --- perplexity against independent computations -------------------------------------------------------------

def test_single_window_matches_a_hand_written_loop(tiny_lm, tokenizer):
    ids = ids_of(tokenizer, TEXT)[:40]
    with torch.no_grad():
        logits = tiny_lm(ids.unsqueeze(0)).logits[0].double()
    nll = 0.0
    for t in range(1, len(ids)):  # token t is predicted from positions < t
        nll -= float(torch.log_softmax(logits[t - 1], dim=-1)[ids[t]])
    text = tokenizer.decode(ids)
    result = evaluate_perplexity(tiny_lm, tokenizer, Corpus(text, "test"), max_length=64, stride=32)
    assert result.windows == 1 and result.tokens == len(ids) - 1
    assert result.nll == pytest.approx(nll, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-6)
    # and the model's own loss (mean NLL over shifted labels) agrees
    with torch.no_grad():
        hf_loss = float(tiny_lm(ids.unsqueeze(0), labels=ids.unsqueeze(0)).loss)
    assert math.log(result.perplexity) == pytest.approx(hf_loss, rel=1e-5)


def test_stride_equal_to_max_length_is_a_sum_of_independent_chunks(tiny_lm, tokenizer):
    text = TEXT * 3
    ids = ids_of(tokenizer, text)
    max_length = 16
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), max_length):
            chunk = ids[start:start + max_length].unsqueeze(0)
            if chunk.shape[1] < 2:
                continue
            total += float(tiny_lm(chunk, labels=chunk).loss) * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    result = evaluate_perplexity(tiny_lm, tokenizer, Corpus(text, "t"), max_length=max_length, stride=max_length,
                                 batch_size=3)
    assert result.tokens == count
    assert result.nll == pytest.approx(total, rel=1e-5)


def test_overlapping_windows_match_the_transformers_guide_loop(tiny_lm, tokenizer):
    """The guide's loop, written as it is published: labels -100 on context, loss × scored tokens."""
    text = TEXT * 3
    encodings = ids_of(tokenizer, text).unsqueeze(0)
    max_length, stride, seq_len = 24, 10, encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = tiny_lm(input_ids, labels=target_ids).loss
        num_loss_tokens = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    for batch_size in (1, 4):
        result = evaluate_perplexity(tiny_lm, tokenizer, Corpus(text, "t"), max_length=max_length, stride=stride,
                                     batch_size=batch_size)
        assert result.tokens == n_tokens
        assert result.perplexity == pytest.approx(math.exp(nll_sum / n_tokens), rel=1e-5)


def test_metrics_follow_the_harness_definitions():
    m = nll_metrics(total_nll=50 * math.log(10), tokens=50, n_bytes=200, words=40)
    assert m["perplexity"] == pytest.approx(10.0)
    assert m["bits_per_byte"] == pytest.approx(50 * math.log2(10) / 200)
    assert m["byte_perplexity"] == pytest.approx(10 ** (50 / 200))
    assert m["word_perplexity"] == pytest.approx(10 ** (50 / 40))


def test_limit_counts_only_the_covered_text(tiny_lm, tokenizer):
    text = TEXT * 2
    ids, covered, n_all = tokenize_corpus(tokenizer, text, limit=30)
    assert len(ids) == 30 and n_all > 30
    assert covered == tokenizer.decode(ids)  # byte-level BPE: the ids are exactly this prefix
    assert text.startswith(covered)
    result = evaluate_perplexity(tiny_lm, tokenizer, Corpus(text, "t"), max_length=16, stride=8, limit=30)
    assert (result.text_tokens, result.tokens) == (30, 29)
    assert (result.bytes, result.words) == (count_bytes(covered), count_words(covered))


def test_half_precision_is_scored_in_float32(tiny_lm, tokenizer):
    fp32 = evaluate_perplexity(tiny_lm, tokenizer, Corpus(TEXT, "t"), max_length=32, stride=16)
    bf16 = evaluate_perplexity(copy.deepcopy(tiny_lm).to(torch.bfloat16), tokenizer, Corpus(TEXT, "t"),
                               max_length=32, stride=16)
    assert bf16.dtype == "bfloat16"
    assert bf16.perplexity == pytest.approx(fp32.perplexity, rel=5e-2)


def test_exact_conversion_keeps_perplexity(tiny_lm, tokenizer):
    converted = copy.deepcopy(tiny_lm)
    normswap.convert_(converted, tokenizer=tokenizer)
    corpus = Corpus(TEXT * 2, "t")
    before = evaluate_perplexity(tiny_lm, tokenizer, corpus, max_length=32, stride=16)
    after = evaluate_perplexity(converted, tokenizer, corpus, max_length=32, stride=16)
    assert abs(after.perplexity - before.perplexity) / before.perplexity <= 1e-4


# --- corpus -----------------------------------------------------------------------------------------------------

def test_byte_and_word_counts_match_the_text():
    assert count_bytes("Thane of Cawdor") == 15
    assert count_bytes("naïve — ok") == len("naïve — ok") + 1 + 2  # ï is 2 bytes, the em dash 3
    assert count_words("Fair is foul,\n and  foul is fair") == 7
    # the harness counts with re.split, so edge whitespace adds empty "words"
    assert count_words("  Hover through the fog ") == 6
    text = DEFAULT_TEXT.read_text(encoding="utf-8")
    corpus = load_corpus()
    assert corpus.bytes == DEFAULT_TEXT.stat().st_size
    assert corpus.words == len(text.split()) + (text[:1].isspace()) + (text[-1:].isspace())


def test_text_file_errors_say_what_to_do(tmp_path):
    with pytest.raises(NormswapError, match="does not exist"):
        load_corpus(text_file=tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(NormswapError, match="not valid UTF-8"):
        load_corpus(text_file=tmp_path / "latin1.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(NormswapError, match="empty"):
        load_corpus(text_file=tmp_path / "empty.txt")
    (tmp_path / "ok.txt").write_text("Out, damned spot!")
    assert load_corpus(text_file=tmp_path / "ok.txt").text == "Out, damned spot!"


def test_wikitext_without_datasets_or_network_fails_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(NormswapError, match=r"pip install 'normswap\[data\]'"):
        load_corpus(dataset="wikitext2")

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(NormswapError, match="unreachable.*--text-file"):
        load_corpus(dataset="wikitext2")


def test_wikitext_rows_are_joined_like_the_guide(monkeypatch):
    calls = []

    def fake_load(path, config, split):
        calls.append((path, config, split))
        return {"text": [" = Title = \n", " body one \n", ""]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load))
    corpus = load_corpus(dataset="wikitext2")
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test")]
    assert corpus.text == " = Title = \n\n\n body one \n\n\n"


# --- encoders ---------------------------------------------------------------------------------------------------

def test_encoder_fidelity_is_one_for_an_exact_conversion_and_not_for_a_changed_model():
    original = make("vit-classification")
    converted = copy.deepcopy(original)
    normswap.convert_(converted)
    batches = encoder_inputs(original, samples=6, batch_size=4)
    ref = pooled_features(original, batches)
    assert ref.shape == (6, original.config.hidden_size)
    fid = cosine_fidelity(pooled_features(converted, batches), ref)
    assert fid["samples"] == 6 and fid["cosine_min"] > 1 - 1e-9
    damaged = copy.deepcopy(original)
    with torch.no_grad():
        damaged.vit.layers[0].mlp.fc2.weight.mul_(-1)
    assert cosine_fidelity(pooled_features(damaged, batches), ref)["cosine_min"] < 0.999


def test_text_lines_skip_short_lines():
    assert text_lines("ACT I\n\nFirst Witch.\nWhen shall we three meet again\n", limit=5) == [
        "When shall we three meet again"]


# --- CLI --------------------------------------------------------------------------------------------------------

EVAL_KEYS = {"perplexity", "bits_per_byte", "byte_perplexity", "word_perplexity", "tokens", "bytes", "words",
             "protocol", "max_length", "stride", "dtype", "device"}


def test_eval_json_schema(tiny_lm_dir, tmp_path, capsys):
    text = tmp_path / "witches.txt"
    text.write_text(TEXT * 2, encoding="utf-8")
    assert main(["eval", str(tiny_lm_dir), "--text-file", str(text), "--max-length", "32", "--stride", "16",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert EVAL_KEYS <= set(out)
    assert (out["protocol"], out["max_length"], out["stride"], out["dtype"], out["device"]) == (
        "hf-stride", 32, 16, "float32", "cpu")
    assert out["bytes"] == count_bytes(TEXT * 2) and out["words"] == count_words(TEXT * 2)
    assert out["perplexity"] == pytest.approx(math.exp(out["nll"] / out["tokens"]))
    assert out["bits_per_byte"] == pytest.approx(out["nll"] / out["bytes"] / math.log(2))


def test_eval_against_reports_both_and_the_delta(tiny_lm_dir, capsys):
    assert main(["eval", str(tiny_lm_dir), "--against", str(tiny_lm_dir), "--limit", "120", "--max-length", "32",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert EVAL_KEYS <= set(out["against"])
    assert out["relative_delta_perplexity"] == pytest.approx(0.0, abs=1e-12)
    assert main(["eval", str(tiny_lm_dir), "--limit", "120", "--max-length", "32"]) == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and "bits per byte" in table and "hf-stride" in table


def test_eval_errors_are_one_line(tiny_lm_dir, tmp_path, capsys):
    assert main(["eval", str(tiny_lm_dir), "--max-length", "65"]) == 2
    assert "exceeds the model's context of 64" in capsys.readouterr().err
    vit = make("vit-model")
    vit.save_pretrained(tmp_path / "vit")
    assert main(["eval", str(tmp_path / "vit")]) == 2
    assert "--against ORIGINAL" in capsys.readouterr().err


def test_eval_encoder_against_original(tmp_path, capsys):
    original = make("vit-classification")
    original.save_pretrained(tmp_path / "orig")
    converted = copy.deepcopy(original)
    normswap.convert_(converted)
    normswap.save(converted, tmp_path / "conv")
    assert main(["eval", str(tmp_path / "conv"), "--against", str(tmp_path / "orig"), "--samples", "4",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] == 4 and out["input"] == "random pixels"
    assert out["cosine_min"] > 1 - 1e-6 and "normswap output" in out["model"]


@needs_shared
def test_shared_model_perplexity_on_unseen_text_is_in_the_trained_range():
    """The real model on text it never trained on: perplexity near its recorded validation figure (~130)."""
    corpus = load_corpus(text_file=SHARED_VALID)
    model = T.AutoModelForCausalLM.from_pretrained(SHARED_MODEL).eval()
    tok = T.AutoTokenizer.from_pretrained(SHARED_MODEL)
    result = evaluate_perplexity(model, tok, corpus, limit=3000, batch_size=8)
    assert 60 < result.perplexity < 250
    assert 1.5 < result.bits_per_byte < 3.5
