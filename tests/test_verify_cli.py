"""``normswap verify CONVERTED --against ORIGINAL`` and the folder verification under it (issue 12).

A good conversion passes with the same figures the in-memory verification computed; one writer left uncentred on
disk in one block of a multi-block model is caught and named by block and module; input that cannot be verified
exits 2 with one line. The folder path never reads the LM head or an embedding table whole.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file
from tiny_models import V, make, perturb_

import normswap
from normswap.cli import main
from normswap.verification import folder as folder_mod
from normswap.verification.folder import verify_folder


def neox(layers: int = 4, tied: bool = False, hidden: int = 48) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = T.GPTNeoXConfig(vocab_size=V, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                          intermediate_size=2 * hidden, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                          tie_word_embeddings=tied)
    return perturb_(T.GPTNeoXForCausalLM(cfg))


def convert_pair(model: torch.nn.Module, tmp_path, dtype=None):
    src = tmp_path / "src"
    model.save_pretrained(src)
    converted = copy.deepcopy(model)
    report = normswap.convert_(converted, dtype=dtype)
    out = normswap.save(converted, tmp_path / "out", dtype=dtype)
    return src, out, report


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return convert_pair(neox(), tmp_path_factory.mktemp("pair"))


def test_a_good_conversion_passes_with_the_in_memory_figures(pair, capsys):
    src, out, report = pair
    assert main(["verify", str(out), "--against", str(src)]) == 0
    text = capsys.readouterr().out
    assert "PASSED: converted: " in text and "from the float64 original; the original in fp32: " in text
    assert "4 blocks checked" in text
    assert main(["verify", str(out), "--against", str(src), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    mem = report.verification
    assert got["passed"] and got["reference"] == "float64" and got["blocks_checked"] == 4
    assert got["converted_error"] == pytest.approx(mem.converted_error, rel=1e-6)
    assert got["original_error"] == pytest.approx(mem.original_error, rel=1e-6)


@pytest.mark.parametrize("block,writer", [(2, "mlp.dense_4h_to_h"), (0, "attention.dense"), (3, "mlp.dense_4h_to_h")])
def test_one_uncentred_writer_on_disk_is_caught_and_named(pair, tmp_path, capsys, block, writer):
    src, out, _ = pair
    broken = tmp_path / "broken"
    break_writer(src, out, broken, f"gpt_neox.layers.{block}.{writer}.weight")  # the original, uncentred writer
    assert main(["verify", str(broken), "--against", str(src)]) == 1
    text = capsys.readouterr().out
    assert f"FAILED: block {block}: {writer} output not centred" in text, text
    assert main(["verify", str(broken), "--against", str(src), "--json"]) == 1
    got = json.loads(capsys.readouterr().out)
    assert not got["passed"] and got["first_failure"].startswith(f"block {block}: {writer}")
    assert all(b["passed"] for b in got["blocks"][:block])


def break_writer(src, out, dest, key: str) -> None:
    """A copy of ``out`` with the tensor ``key`` put back to its original (uncentred) value."""
    dest.mkdir()
    for f in out.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(dest / "model.safetensors"))
    tensors[key] = load_file(str(src / "model.safetensors"))[key]
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})


def test_one_broken_block_of_24_is_named(tmp_path, capsys):
    src, out, _ = convert_pair(neox(layers=24, hidden=32), tmp_path)
    assert main(["verify", str(out), "--against", str(src)]) == 0
    assert "24 blocks checked" in capsys.readouterr().out
    break_writer(src, out, tmp_path / "broken", "gpt_neox.layers.17.mlp.dense_4h_to_h.bias")
    assert main(["verify", str(tmp_path / "broken"), "--against", str(src)]) == 1
    assert "FAILED: block 17: mlp.dense_4h_to_h output not centred" in capsys.readouterr().out


def test_cli_convert_bf16_reports_bf16_figures(tmp_path, capsys):
    model = make("gpt_neox-sequential")
    model.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "--dtype", "bfloat16",
                 "--no-eval"]) == 0
    text = capsys.readouterr().out
    assert "from the float64 original; the original in bf16: " in text
    ver = json.loads((tmp_path / "out" / "config.json").read_text())["normswap"]["verification"]
    assert ver["dtype"] == "bf16" and ver["passed"] and "the original in bf16" in ver["summary"]
    assert main(["verify", str(tmp_path / "out"), "--against", str(tmp_path / "src"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["dtype"] == "bf16" and got["converted_error"] == pytest.approx(ver["converted_error"], rel=1e-6)


def test_bad_input_exits_2_with_one_line(pair, tmp_path, capsys):
    src, out, _ = pair
    other = tmp_path / "other"
    normswap.convert_(gpt2 := make("gpt2"))
    normswap.save(gpt2, other)
    nan_src = tmp_path / "nan-src"
    nan_src.mkdir()
    for f in src.iterdir():
        (nan_src / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(nan_src / "model.safetensors"))
    tensors["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"][0, 0] = float("nan")
    save_file(tensors, str(nan_src / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()  # the save's progress bar
    cases = [
        ([str(tmp_path / "missing"), "--against", str(src)], "does not exist"),
        ([str(out), "--against", str(tmp_path / "missing")], "does not exist"),
        ([str(src), "--against", str(src)], "is not a normswap output"),
        ([str(out), "--against", str(out)], "is itself a normswap output"),
        ([str(other), "--against", str(src)], "architectures do not match"),
        ([str(out), "--against", str(nan_src)], "not finite in float64 on the probe inputs: the first module with "
                                                "NaN/Inf output is gpt_neox.layers.1.mlp.dense_h_to_4h"),
    ]
    for argv, message in cases:
        assert main(["verify", *argv]) == 2, argv
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("normswap: error:") and message in lines[0], err


@pytest.mark.parametrize("row", ["gpt2", "bloom", "vit-classification", "opt-project_in_out"])
def test_folder_figures_match_the_in_memory_ones(row, tmp_path):
    src, out, report = convert_pair(make(row), tmp_path)
    v = verify_folder(out, src)
    mem = report.verification
    assert v.passed and v.blocks_checked == mem.blocks_checked == 2
    assert v.converted_error == pytest.approx(mem.converted_error, rel=1e-6)
    assert v.original_error == pytest.approx(mem.original_error, rel=1e-6)


def test_bf16_folder_is_verified_at_bf16(tmp_path):
    src, out, report = convert_pair(make("gpt2"), tmp_path, dtype="bfloat16")
    v = verify_folder(out, src)
    assert v.dtype == "bf16" and v.passed
    assert v.converted_error == pytest.approx(report.verification.converted_error, rel=1e-6)
    assert json.loads((out / "config.json").read_text())["normswap"]["verification"]["dtype"] == "bf16"


def test_head_and_embeddings_are_never_read_whole(tmp_path, monkeypatch):
    src, out, _ = convert_pair(neox(layers=2, tied=True), tmp_path)
    reference = verify_folder(out, src)
    largest = V * 48
    reads = []
    real_read = folder_mod.FileWeights.read

    def spy(self, entry, start=0, count=None):
        t = real_read(self, entry, start, count)
        reads.append((entry.name, t.numel()))
        return t
    monkeypatch.setattr(folder_mod.FileWeights, "read", spy)
    monkeypatch.setattr(folder_mod, "HEAD_CHUNK_BYTES", 8 * 48 * 10)  # ten vocabulary rows at a time
    chunked = verify_folder(out, src)
    big = [(n, k) for n, k in reads if "embed" in n or "lm_head" in n or "embed_out" in n]
    assert big and max(k for _, k in big) <= 10 * 48 < largest
    # a matmul split by rows rounds differently in the last bit: the same figures to within an ulp of the logits
    assert abs(chunked.converted_error - reference.converted_error) < 2 * torch.finfo(torch.float32).eps
    assert abs(chunked.original_error - reference.original_error) < 2 * torch.finfo(torch.float32).eps
    assert chunked.passed


def test_an_approximate_output_reports_damage_and_exits_0(tmp_path, capsys):
    torch.manual_seed(0)
    bert = perturb_(T.BertForMaskedLM(T.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64)))
    bert.save_pretrained(tmp_path / "src")
    report = normswap.convert_(bert, approximate=True)
    normswap.save(bert, tmp_path / "out")  # saved under normswap_bert names: only right with RMSNorm
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "out"), "--against", str(tmp_path / "src")]) == 0
    text = capsys.readouterr().out
    assert "approximate: damage" in text and "PASSED:" not in text and "bound" not in text
    got = verify_folder(tmp_path / "out", tmp_path / "src")
    assert got.mode == "approximate" and got.passed and got.converted_error > 1e-3
    if got.probe == report.verification.probe:  # same probes as the conversion: the same damage
        assert got.converted_error == pytest.approx(report.verification.converted_error, rel=1e-6)
