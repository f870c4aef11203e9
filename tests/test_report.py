"""The conversion report: `normswap convert` measures before/after and saves JSON, Markdown and PNG with the model."""

from __future__ import annotations

import json
import time

import pytest
import torch
import transformers as T
from conftest import SHARED_MODEL, SHARED_VALID, needs_shared
from tiny_models import make, perturb_

import normswap
from normswap.assets import DEFAULT_MODEL
from normswap.cli import main
from normswap.evaluate import BenchSettings
from normswap.evaluate.corpus import Corpus
from normswap.evaluate.measurement import BeforeAfter, MeasureOptions
from normswap.evaluate.report import REPORT_JSON, REPORT_MD, REPORT_PNG, markdown_table, report_files

QUICK = ["--bench-prompt-len", "6", "--bench-new-tokens", "8", "--bench-repeats", "3", "--bench-warmup", "1"]


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    """A tiny GPT-2 over the embedded tokenizer, saved as a source folder."""
    tok = T.AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                       eos_token_id=0)
    path = tmp_path_factory.mktemp("src")
    perturb_(T.GPT2LMHeadModel(cfg), seed=3).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def converted_report(tiny_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "rms"
    assert main(["convert", str(tiny_src), "-o", str(out), "--eval-limit", "400", *QUICK]) == 0
    return out


def test_convert_writes_the_report_files_into_the_output(converted_report):
    assert {REPORT_JSON, REPORT_MD, REPORT_PNG} <= {p.name for p in converted_report.iterdir()}
    assert (converted_report / REPORT_PNG).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert not list(converted_report.parent.glob(".*normswap-tmp*"))  # written inside the atomic save


def test_report_json_shape_and_exactness(converted_report):
    report = json.loads((converted_report / REPORT_JSON).read_text())
    assert {"perplexity", "throughput", "verification"} <= set(report)
    ppl = report["perplexity"]
    before, after = ppl["before"], ppl["after"]
    assert before["tokens"] == after["tokens"] == 399 and before["bytes"] == after["bytes"]
    assert before["dtype"] == after["dtype"] == "float32"
    assert abs(after["perplexity"] - before["perplexity"]) / before["perplexity"] <= 1e-4
    assert ppl["relative_change"] == pytest.approx((after["perplexity"] - before["perplexity"]) / before["perplexity"])
    tp = report["throughput"]
    assert tp["interleaved"] is True
    for side in ("before", "after"):
        assert tp[side]["prefill_tokens_per_s"]["1"] > 0 and tp[side]["decode_tokens_per_s"]["1"] > 0
    assert set(tp["norm_share"]) == {"before", "after"}
    assert report["verification"]["passed"] is True
    assert report["command"].startswith("normswap") and report["machine"]["torch"] == torch.__version__


def test_report_markdown_carries_table_machine_and_command(converted_report):
    report = json.loads((converted_report / REPORT_JSON).read_text())
    table = markdown_table(report)
    assert table.startswith("| Metric | Before (LayerNorm) | After (RMSNorm) | Change |")
    assert f"{report['perplexity']['before']['perplexity']:,.4f}" in table
    assert "Prefill tokens/s (batch 1" in table and "Decode tokens/s (batch 1" in table
    assert "Machine:" in table and "torch " + torch.__version__ in table and "Command: `normswap" in table
    md = (converted_report / REPORT_MD).read_text()
    assert table in md and f"]({REPORT_PNG})" in md


def test_no_eval_writes_no_report(tiny_src, tmp_path):
    assert main(["convert", str(tiny_src), "-o", str(tmp_path / "plain"), "--no-eval"]) == 0
    assert not (tmp_path / "plain" / REPORT_JSON).exists()


def test_existing_output_fails_before_measuring(tiny_src, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    start = time.perf_counter()
    assert main(["convert", str(tiny_src), "-o", str(tmp_path / "taken")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert "measuring" not in capsys.readouterr().out
    assert (tmp_path / "taken" / "x").read_text() == "keep me"
    assert time.perf_counter() - start < 60  # generous: it must not have run the full default measurement


def test_impossible_bench_settings_fail_before_measuring(tiny_src, tmp_path, capsys):
    args = ["convert", str(tiny_src), "-o", str(tmp_path / "o"), "--bench-prompt-len", "60", "--bench-new-tokens", "8"]
    assert main(args) == 2
    assert "exceed the model's context of 64" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_encoder_conversion_reports_fidelity(tmp_path):
    src = tmp_path / "vit"
    make("vit-classification").save_pretrained(src)
    assert main(["convert", str(src), "-o", str(tmp_path / "vit-rms"), *QUICK]) == 0
    report = json.loads((tmp_path / "vit-rms" / REPORT_JSON).read_text())
    assert report["perplexity"] is None
    assert report["fidelity"]["cosine_min"] > 1 - 1e-6 and report["fidelity"]["input"] == "images of random pixels"
    assert report["throughput"]["after"]["decode_tokens_per_s"] is None
    assert "Cosine to the original" in markdown_table(report)


def test_models_too_large_to_copy_are_timed_sequentially_and_the_report_says_so(tiny_src):
    source = normswap.load_source(tiny_src)
    options = MeasureOptions(corpus=Corpus("Fair is foul, and foul is fair: hover through the fog. " * 8, "unit"),
                             bench=BenchSettings(prompt_len=6, new_tokens=8, batch_sizes=(1,), warmup=1, repeats=3))
    measurement = BeforeAfter(source.model, source.tokenizer, options, copy_limit_bytes=0)
    assert measurement.original is None and measurement.before_bench is not None
    conversion = normswap.convert_(source.model, tokenizer=source.tokenizer)
    report = measurement.finish(conversion, source="src", output="out", command="normswap convert src -o out")
    tp = report["throughput"]
    assert tp["interleaved"] is False and set(tp["norm_share"]) == {"before"}
    assert any("one after the other" in note for note in report["notes"])
    assert abs(report["perplexity"]["relative_change"]) <= 1e-4


def test_report_files_render_a_hand_written_report():
    report = {
        "perplexity": {"before": {"perplexity": 10.0, "bits_per_byte": 1.0, "byte_perplexity": 2.0,
                                  "word_perplexity": 30.0, "protocol": "hf-stride", "max_length": 8, "stride": 4,
                                  "tokens": 100, "corpus": "unit"},
                       "after": {"perplexity": 10.00001, "bits_per_byte": 1.0, "byte_perplexity": 2.0,
                                 "word_perplexity": 30.0}},
        "throughput": {"interleaved": True, "settings": {"prompt_len": 8, "new_tokens": 4, "repeats": 3},
                       "before": {"prefill_tokens_per_s": {"1": 100.0}, "decode_tokens_per_s": {"1": 10.0}},
                       "after": {"prefill_tokens_per_s": {"1": 110.0}, "decode_tokens_per_s": {"1": 9.0}},
                       "norm_share": {"before": {"decode_tokens_per_s": {"1": 0.05}}}},
        "verification": {"rel_max_abs_diff": 1e-7, "tolerance": 1e-4, "passed": True, "output_kind": "logit"},
        "command": "normswap convert x -o y",
    }
    table = markdown_table(report)
    assert "| 10.0000 | 10.0000 | +1.0e-06 |" in table
    assert "| 100.0 | 110.0 | ×1.100 |" in table and "| 10.0 | 9.0 | ×0.900 |" in table
    assert "+5.0%" in table and "Command: `normswap convert x -o y`" in table
    files = report_files(report)
    assert json.loads(files[REPORT_JSON])["command"] == "normswap convert x -o y"
    assert files[REPORT_PNG][:4] == b"\x89PNG"


@needs_shared
def test_real_model_exact_conversion_keeps_perplexity(tmp_path):
    """The shared trained model on its unseen validation text: |Δppl|/ppl ≤ 1e-4 in fp32."""
    out = tmp_path / "real"
    assert main(["convert", str(SHARED_MODEL), "-o", str(out), "--eval-text", str(SHARED_VALID), "--eval-limit",
                 "2000", "--eval-batch-size", "8", "--no-bench"]) == 0
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["throughput"] is None
    assert abs(report["perplexity"]["relative_change"]) <= 1e-4
    assert report["perplexity"]["before"]["corpus"] == str(SHARED_VALID)


def test_table_columns_and_units_say_what_was_converted():
    """A BatchNorm fold is not "LayerNorm → RMSNorm", and a CNN's throughput counts images, not tokens."""
    from normswap.evaluate.report import markdown_table

    tp = {"settings": {"prompt_len": 32, "new_tokens": 8, "repeats": 3}, "interleaved": True,
          "before": {"unit": "images", "prefill_tokens_per_s": {"8": 100.0}},
          "after": {"unit": "images", "prefill_tokens_per_s": {"8": 110.0}}}
    folded = markdown_table({"conversion": {"target": "none", "folds": {"batchnorm_folded": 3}}, "throughput": tp})
    assert "| Before (BatchNorm) | After (BatchNorm folded) |" in folded
    assert "Images/s (batch 8, one forward" in folded and "tokens/s" not in folded
    removed = markdown_table({"conversion": {"target": "dyt", "folds": {}}})
    assert "| Before (LayerNorm) | After (DyT) |" in removed
    assert "| Before (LayerNorm) | After (RMSNorm) |" in markdown_table({"conversion": {"mode": "exact"}})
