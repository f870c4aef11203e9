"""``normswap inspect`` plans from the config alone (meta device) and agrees with what convert_ does."""

from __future__ import annotations

import json

import pytest
import transformers as T
from tiny_models import make

import normswap
from normswap.cli import main


@pytest.mark.parametrize("row", ["gpt2", "opt-project_in_out", "bloom", "falcon-new-2ln", "stablelm-parallel",
                                 "vit-classification"])
def test_inspect_matches_conversion(row, tmp_path, capsys):
    model = make(row)
    model.save_pretrained(tmp_path / "src")
    assert main(["inspect", str(tmp_path / "src"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    report = normswap.convert_(model, verify_result=False)
    assert info["exact"] is True
    assert [n["name"] for n in info["norms"]] == report.swapped_norms
    assert [w["name"] for w in info["writers"]] == report.centered_writers
    assert info["kept_norms"] == report.kept_norms
    assert info["tied_head"] == report.untied_head


def test_inspect_explains_post_ln(tmp_path, capsys):
    cfg = T.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                      word_embed_proj_dim=32, do_layer_norm_before=False)
    T.OPTForCausalLM(cfg).save_pretrained(tmp_path / "src")
    assert main(["inspect", str(tmp_path / "src")]) == 0
    out = capsys.readouterr().out
    assert "NOT possible" in out and "do_layer_norm_before=False" in out and "--approximate" in out
