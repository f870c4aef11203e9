"""`--json` owns stdout on every exit 0: an already-RMSNorm model (nothing to convert) prints a JSON object too.

Found by trying `normswap convert LLAMA -o out --json | python -m json.tool`: exit 0 with an empty stdout, so
json.tool failed ("Expecting value") on a run that succeeded.
"""

from __future__ import annotations

import json

import pytest
import transformers as T

from normswap.cli import main


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qa_json") / "llama"
    config = T.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4)
    T.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("extra", [[], ["--streaming"]], ids=["in-memory", "streaming"])
def test_already_rmsnorm_with_json_prints_one_json_object(llama, tmp_path, capsys, extra):
    code = main(["convert", str(llama), "-o", str(tmp_path / "out"), "--json", "--no-eval", *extra])
    captured = capsys.readouterr()
    assert code == 0
    payload = json.loads(captured.out)  # the whole of stdout is one JSON document
    assert isinstance(payload, dict)
    assert payload["written"] is False and payload["mode"] == "nothing_to_convert"
    assert "RMSNorm" in payload["message"]
    assert "already uses RMSNorm" in captured.err  # the person still reads why, on stderr
    assert not (tmp_path / "out").exists()


def test_already_rmsnorm_without_json_keeps_the_plain_line(llama, tmp_path, capsys):
    code = main(["convert", str(llama), "-o", str(tmp_path / "out"), "--no-eval"])
    captured = capsys.readouterr()
    assert code == 0 and "nothing written" in captured.out and "{" not in captured.out
