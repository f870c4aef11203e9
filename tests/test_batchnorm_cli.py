"""``normswap convert --to ...``: BatchNorm folding end to end, and the one-line errors of the target dispatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from test_batchnorm import bn_count, pixels, tiny_resnet

import normswap
from normswap.cli import main


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory) -> Path:
    model = tiny_resnet()
    path = tmp_path_factory.mktemp("src") / "tiny-resnet"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folded_dir(resnet_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "tiny-resnet-none"
    rc = main(["convert", str(resnet_dir), "-o", str(out), "--to", "none", "--bench-repeats", "1",
               "--bench-warmup", "0"])
    assert rc == 0
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def run_logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


def test_convert_to_none_saves_a_folder_every_loader_runs(resnet_dir, folded_dir):
    original = T.ResNetForImageClassification.from_pretrained(resnet_dir).eval()
    x = pixels(original)
    ref = run_logits(original, x)

    stock = T.ResNetForImageClassification.from_pretrained(folded_dir).eval()  # stock keys, stock class
    assert bn_count(stock) == bn_count(original)
    assert rel(run_logits(stock, x), ref) <= 1e-5

    loaded = normswap.load(folded_dir)  # the folded convolutions with a bias, no BatchNorm at all
    assert bn_count(loaded) == 0
    assert rel(run_logits(loaded, x), run_logits(stock, x)) <= 1e-6

    remote = T.AutoModelForImageClassification.from_pretrained(folded_dir, trust_remote_code=True).eval()
    assert type(remote).__name__.startswith("Normswap") and bn_count(remote) == 0
    assert rel(run_logits(remote, x), run_logits(loaded, x)) == 0

    config = json.loads((folded_dir / "config.json").read_text())
    meta = config["normswap"]
    assert meta["target"] == "none" and meta["mode"] == "exact" and meta["verification"]["passed"]
    assert len(meta["batchnorm_folded"]) == bn_count(original) and meta["batchnorm_kept"] == {}
    assert "inference" in meta["semantics"]
    report = json.loads((folded_dir / "normswap_report.json").read_text())
    assert report["throughput"]["interleaved"] and report["fidelity"]["cosine_min"] > 0.999999
    assert (folded_dir / "modeling_normswap.py").is_file()
    card = (folded_dir / "README.md").read_text()
    assert "BatchNorm(s) folded" in card and "- batchnorm-folding" in card and "LayerNorm to RMSNorm" not in card


def test_bench_against_the_original_times_both(resnet_dir, folded_dir, capsys):
    capsys.readouterr()
    rc = main(["bench", str(folded_dir), "--against", str(resnet_dir), "--batch-sizes", "2", "--warmup", "0",
               "--repeats", "1", "--no-norm-bound", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["ratios"]["prefill_tokens_per_s"]) == {"2"}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("normswap")]  # not transformers' progress bars
    assert len(lines) == 1 and lines[0].startswith("normswap: error:") and "Traceback" not in err, err
    return lines[0]


def test_unknown_target_lists_the_known_ones(tmp_path, capsys):
    assert main(["convert", "-o", str(tmp_path / "out"), "--to", "bogus"]) == 2
    line = one_error_line(capsys)
    assert "'bogus'" in line and "rmsnorm" in line and "none" in line and "dyt" in line
    assert not (tmp_path / "out").exists()


def test_to_none_on_a_layernorm_model_without_approximate(tmp_path, capsys):
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32))
    gpt2.save_pretrained(tmp_path / "gpt2")
    assert main(["convert", str(tmp_path / "gpt2"), "-o", str(tmp_path / "out"), "--to", "none", "--no-eval"]) == 2
    line = one_error_line(capsys)
    assert "no BatchNorm" in line and "5 LayerNorm" in line and "--approximate" in line
    assert not (tmp_path / "out").exists()


def test_keep_batch_stats_and_dyt_without_approximate_are_refused(resnet_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(resnet_dir), "-o", str(out), "--to", "none", "--keep-batch-stats"]) == 2
    assert "batch statistics" in one_error_line(capsys)
    assert main(["convert", str(resnet_dir), "-o", str(out), "--to", "dyt", "--no-eval"]) == 2
    assert "--approximate" in one_error_line(capsys)
    assert not out.exists()
