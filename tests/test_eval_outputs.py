"""`normswap eval` / `normswap bench` on normswap's own approximate and fine-tuned outputs (issue 11 item 3).

Those outputs name a ``normswap_<type>`` model type that only their shipped remote code defines, so anything that
reads them through ``AutoConfig`` asks "run the custom code? [y/N]" and then fails. They must load with normswap's own
classes instead: no prompt, RMSNorm modules, the same outputs as the model that was converted in memory.
"""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from tiny_text import char_tokenizer, tiny_bert, write_text

import normswap
from normswap.cli import main as cli
from normswap.evaluate.loading import load_for_eval, normswap_metadata
from normswap.norm import RMSNorm

PROMPT = "custom code"  # transformers' trust_remote_code prompt: "The repository ... contains custom code ..."


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT MLM teacher, its `convert --approximate` output and a 2-step `finetune` of that output."""
    root = tmp_path_factory.mktemp("eval-outputs")
    teacher = tiny_bert(T.BertForMaskedLM)
    teacher.save_pretrained(root / "teacher")
    char_tokenizer().save_pretrained(root / "teacher")
    text = write_text(root / "train.txt", 80)
    assert cli(["convert", str(root / "teacher"), "-o", str(root / "approx"), "--approximate", "--no-eval"]) == 0
    assert cli(["finetune", str(root / "approx"), "--teacher", str(root / "teacher"), "--recipe", "bert-mlm",
                "--text-file", str(text), "-o", str(root / "healed"), "--no-progress", "--set", "steps=2",
                "--set", "batch_size=4", "--set", "gradient_accumulation=1", "--set", "schedule.warmup_steps=0",
                "--set", "data.eval_examples=4", "--set", "data.seq_len=32"]) == 0
    return {"teacher": root / "teacher", "approx": root / "approx", "healed": root / "healed", "text": text}


@pytest.fixture
def closed_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a script or CI job sees: any prompt reads end-of-file at once instead of waiting."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


def _remote_only(folder: Path) -> bool:
    """The output really is one that plain AutoConfig cannot read without remote code (the case under test)."""
    data = json.loads((folder / "config.json").read_text())
    return data["model_type"].startswith("normswap_") and "auto_map" in data


@pytest.mark.parametrize("kind", ["approx", "healed"])
@pytest.mark.usefixtures("closed_stdin")
def test_load_for_eval_uses_normswaps_classes(outputs: dict[str, Path], kind: str, capsys) -> None:
    folder = outputs[kind]
    assert _remote_only(folder)
    with pytest.raises(ValueError, match="custom code"):  # the trap: the Auto classes would prompt, then fail
        T.AutoConfig.from_pretrained(folder)
    capsys.readouterr()
    meta = normswap_metadata(str(folder))
    assert meta is not None and meta["mode"] == "approximate"
    loaded = load_for_eval(str(folder))
    assert loaded.converted and loaded.tokenizer is not None
    rms = {n for n, m in loaded.model.named_modules() if isinstance(m, RMSNorm)}
    assert rms and rms == set(meta["swapped_norms"])
    assert not any(isinstance(m, torch.nn.LayerNorm) and n in rms for n, m in loaded.model.named_modules())
    # Same function as normswap.load (the documented way to run an output), and for the approximate output the same
    # as the model converted in memory from the teacher: what was measured is what was converted.
    ids = loaded.tokenizer(["thou art more lovely", "rough winds do shake"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = loaded.model(**ids).logits
        torch.testing.assert_close(got, normswap.load(folder)(**ids).logits, rtol=0, atol=0)
        if kind == "approx":
            reference = copy.deepcopy(tiny_bert(T.BertForMaskedLM))
            normswap.convert_(reference, approximate=True)
            torch.testing.assert_close(got, reference.eval()(**ids).logits, rtol=1e-5, atol=1e-5)
    out = capsys.readouterr()
    assert PROMPT not in out.out + out.err


def test_plain_folders_still_load_as_originals(outputs: dict[str, Path]) -> None:
    assert normswap_metadata(str(outputs["teacher"])) is None
    original = load_for_eval(str(outputs["teacher"]))
    assert not original.converted
    assert not any(isinstance(m, RMSNorm) for m in original.model.modules())


@pytest.mark.usefixtures("closed_stdin")
def test_cli_eval_on_approximate_and_healed(outputs: dict[str, Path], capsys) -> None:
    for kind in ("approx", "healed"):
        code = cli(["eval", str(outputs[kind]), "--against", str(outputs["teacher"]), "--text-file",
                    str(outputs["text"]), "--samples", "8", "--json"])
        out = capsys.readouterr()
        assert code == 0, out.err
        assert PROMPT not in out.out + out.err and "save_pretrained" not in out.err
        result = json.loads(out.out)
        assert "RMSNorm, normswap output" in result["model"] and "original" in result["against"]
        assert 0.5 < result["cosine_mean"] <= 1.0 + 1e-6


@pytest.mark.usefixtures("closed_stdin")
def test_cli_bench_on_healed_against_approximate(outputs: dict[str, Path], capsys) -> None:
    code = cli(["bench", str(outputs["healed"]), "--against", str(outputs["approx"]), "--prompt-len", "8",
                "--new-tokens", "2", "--batch-sizes", "1", "--warmup", "0", "--repeats", "1", "--no-norm-bound",
                "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert PROMPT not in out.out + out.err
    result = json.loads(out.out)
    assert "RMSNorm, normswap output" in json.dumps(result)


def test_cli_eval_subprocess_with_stdin_closed(outputs: dict[str, Path]) -> None:
    """The real thing: a separate process with no terminal; it must neither prompt nor fail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "normswap", "eval", str(outputs["healed"]), "--against", str(outputs["teacher"]),
         "--text-file", str(outputs["text"]), "--samples", "4"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert PROMPT not in proc.stdout + proc.stderr
    assert "cosine mean" in proc.stdout
