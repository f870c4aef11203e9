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


def _paste(code: str):
    """Run the printed register(Adapter(...)) the way architectures.py would, capturing the adapter."""
    from normswap.adapters.spec import Adapter, Norm, PostLNCondition, Stack, Writer

    registered = []
    exec(code, {"register": registered.append, "Adapter": Adapter, "Norm": Norm, "Writer": Writer, "Stack": Stack,
                "PostLNCondition": PostLNCondition})
    assert len(registered) == 1
    return registered[0]


def test_inspect_discover_prints_pasteable_adapter(tmp_path, capsys):
    import dataclasses

    from normswap.discovery import discover_from_config

    cfg = T.CLIPConfig(text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, vocab_size=99),
                       vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, image_size=16, patch_size=4),
                       projection_dim=16, architectures=["CLIPModel"])
    cfg.save_pretrained(tmp_path / "clip")
    assert main(["inspect", "--discover", str(tmp_path / "clip")]) == 0
    out = capsys.readouterr().out
    code = "\n".join(line for line in out.splitlines() if not line.startswith("#"))
    pasted = _paste(code)
    found = discover_from_config(T.CLIPConfig.from_pretrained(tmp_path / "clip"), T.CLIPModel)
    assert pasted == dataclasses.replace(found.adapter, origin="declared")
    assert {n.path for n in pasted.other_norms if n.writes_stream} == {"vision_model.pre_layrnorm"}
    assert "vision_model_output.last_hidden_state" in out  # named as the raw stream


def test_inspect_discover_names_kept_norms_and_why(tmp_path, capsys):
    T.SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         image_size=16, patch_size=4, architectures=["SiglipVisionModel"]).save_pretrained(tmp_path / "s")
    assert main(["inspect", "--discover", "--json", str(tmp_path / "s")]) == 0
    info = json.loads(capsys.readouterr().out)
    kept = {n["name"]: n["reason"] for n in info["norms"] if n["status"] == "kept"}
    assert list(kept) == ["head.layernorm"] and "pooler_output" in kept["head.layernorm"]
    assert "kept_norms=('head.layernorm',)" in info["adapter"]


def test_inspect_undeclared_type_uses_discovery(tmp_path, capsys):
    T.MptForCausalLM(T.MptConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4)).save_pretrained(tmp_path / "m")
    assert main(["inspect", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "structure discovered by measurement" in out and "exact conversion possible" in out
