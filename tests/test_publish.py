"""Publishable outputs: remote code that loads without normswap, the stock-path refusal, and the model card."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from conftest import SHARED_MODEL, needs_shared
from tiny_models import make
from torch import nn

import normswap
from normswap.publish.card import CARD_MARKER, read_front_matter, render_model_card
from normswap.publish.remote_code import GUARD_KEY, GUARD_MESSAGE, MODELING_FILE, load_output_config
from normswap.verify import make_probes

# Loads each case with plain transformers in a process where `import normswap` fails, and saves what it saw.
REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["normswap"] = None  # any import of normswap now raises ImportError
    import json, torch, transformers
    from torch import nn

    try:
        import normswap  # noqa: F401
        raise SystemExit("normswap is importable: the test would prove nothing")
    except ImportError:
        pass
    cases = json.loads(sys.argv[1])
    results = {}
    for case in cases:
        auto = getattr(transformers, case["auto"])
        model = auto.from_pretrained(case["path"], trust_remote_code=True).eval()
        names = dict(model.named_modules())
        probes = torch.load(case["probes"])
        with torch.no_grad():
            out = model(**probes)
        torch.save(out.to_tuple()[0], case["out"])
        results[case["id"]] = {
            "class": type(model).__name__,
            "module": type(model).__module__,
            "norms": {n: type(names[n]).__name__ for n in case["norms"]},
            "layernorms": sorted(n for n, m in names.items() if isinstance(m, nn.LayerNorm)),
        }
    leaked = sorted(k for k, v in sys.modules.items() if k.startswith("normswap") and v is not None)
    print(json.dumps({"results": results, "leaked": leaked}))
    """
)


def convert_and_save(model: nn.Module, out: Path, *, mode: str | None = None, **save_kw) -> tuple[dict, torch.Tensor]:
    """Convert ``model`` exactly, optionally relabel its metadata ``mode``, save; returns probes and original output."""
    probes = make_probes(model)
    with torch.no_grad():
        reference = model(**probes).to_tuple()[0]
    normswap.convert_(model, probes=probes)
    if mode:
        model.config.normswap["mode"] = mode
    normswap.save(model, out, **save_kw)
    return probes, reference


def break_centering_(model: nn.Module) -> None:
    """Give the stream a nonzero mean, so LayerNorm and RMSNorm now differ (what an approximate conversion is like)."""
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(0.5)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict:
    """Converted tiny outputs, each with its probes and the original (LayerNorm) model's output."""
    root = tmp_path_factory.mktemp("publish")
    made = {}
    for row, auto in (("gpt2", "AutoModelForCausalLM"), ("bloom", "AutoModelForCausalLM"),
                      ("vit-classification", "AutoModelForImageClassification"), ("vit-model", "AutoModel")):
        probes, reference = convert_and_save(make(row), root / row)
        made[row] = {"path": root / row, "probes": probes, "reference": reference, "auto": auto}
    model = make("gpt2")
    probes = make_probes(model)
    normswap.convert_(model, probes=probes)
    break_centering_(model)
    model.config.normswap["mode"] = "approximate"
    normswap.save(model, root / "gpt2-approx")
    made["gpt2-approx"] = {"path": root / "gpt2-approx", "probes": probes, "reference": None,
                           "auto": "AutoModelForCausalLM"}
    if SHARED_MODEL.exists():
        source = normswap.load_source(SHARED_MODEL)
        ids = source.tokenizer("So foul and fair a day I have not seen.", return_tensors="pt")["input_ids"]
        probes = {"input_ids": ids}
        with torch.no_grad():
            reference = source.model(**probes).logits
        normswap.convert_(source.model, tokenizer=source.tokenizer)
        normswap.save(source.model, root / "shakespeare", tokenizer=source.tokenizer, source_dir=source.local_dir)
        made["shakespeare"] = {"path": root / "shakespeare", "probes": probes, "reference": reference,
                               "auto": "AutoModelForCausalLM"}
    return made


@pytest.fixture(scope="module")
def remote(outputs, tmp_path_factory) -> dict:
    """Run REMOTE_SCRIPT once over every output (one interpreter start for all cases)."""
    work = tmp_path_factory.mktemp("remote")
    cases = []
    for case_id, o in outputs.items():
        meta = json.loads((o["path"] / "config.json").read_text())["normswap"]
        torch.save(o["probes"], work / f"{case_id}.probes.pt")
        cases.append({"id": case_id, "path": str(o["path"]), "auto": o["auto"], "norms": meta["swapped_norms"],
                      "probes": str(work / f"{case_id}.probes.pt"), "out": str(work / f"{case_id}.out.pt")})
    env = {**os.environ, "HF_MODULES_CACHE": str(work / "modules"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, json.dumps(cases)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["leaked"] == []
    for case in cases:
        report["results"][case["id"]]["output"] = torch.load(case["out"])
    return report["results"]


def normswap_output(o: dict, monkeypatch) -> torch.Tensor:
    """The output of ``normswap.load`` with the stock-op kernel, the same ops as the shipped modeling file."""
    monkeypatch.setenv("NORMSWAP_KERNEL", "composite")
    model = normswap.load(o["path"])
    with torch.no_grad():
        return model(**o["probes"]).to_tuple()[0]


@pytest.mark.parametrize("case_id", ["gpt2", "bloom", "vit-classification", "vit-model", "gpt2-approx"])
def test_remote_code_loads_without_normswap(case_id, outputs, remote, monkeypatch):
    o, r = outputs[case_id], remote[case_id]
    assert r["class"].startswith("Normswap") and r["module"].startswith("transformers_modules.")
    meta = json.loads((o["path"] / "config.json").read_text())["normswap"]
    expected = {n: "CenteredRMSNorm" if n in meta["recentered_norms"] else "RMSNorm" for n in meta["swapped_norms"]}
    assert r["norms"] == expected
    assert r["layernorms"] == []  # none of these models keeps a LayerNorm
    ours = normswap_output(o, monkeypatch)
    assert (r["output"] - ours).abs().max().item() <= 1e-5 * ours.abs().max().item()
    if o["reference"] is not None:  # exact: also the original model's output
        rel = (r["output"] - o["reference"]).abs().max().item() / o["reference"].abs().max().item()
        assert rel < 1e-4


def test_recentered_norm_is_centred_in_remote_code(remote):
    assert remote["bloom"]["norms"]["transformer.word_embeddings_layernorm"] == "CenteredRMSNorm"


@needs_shared
def test_shared_shakespeare_loads_without_normswap(outputs, remote, monkeypatch):
    o, r = outputs["shakespeare"], remote["shakespeare"]
    assert r["class"] == "NormswapGPT2LMHeadModel"
    assert set(r["norms"].values()) == {"RMSNorm"} and len(r["norms"]) == 13
    ours = normswap_output(o, monkeypatch)
    assert (r["output"] - ours).abs().max().item() <= 1e-5 * ours.abs().max().item()
    rel = (r["output"] - o["reference"]).abs().max().item() / o["reference"].abs().max().item()
    assert rel < 1e-4
    assert torch.equal(r["output"].argmax(-1), o["reference"].argmax(-1))


def test_modeling_file_imports_only_torch_and_transformers(outputs):
    path = outputs["gpt2"]["path"] / MODELING_FILE
    tops = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            tops.add(node.module.split(".")[0])
    assert tops <= {"__future__", "logging", "torch", "transformers"}
    # what transformers itself checks before running remote code
    from transformers.dynamic_module_utils import get_imports

    assert set(get_imports(path)) <= {"__future__", "logging", "torch", "transformers"}


def test_exact_config_keeps_stock_names_and_points_at_the_remote_code(outputs):
    config = json.loads((outputs["gpt2"]["path"] / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_normswap.NormswapGPT2LMHeadModel"
    assert config["auto_map"]["AutoModel"] == "modeling_normswap.NormswapGPT2Model"
    assert "AutoConfig" not in config["auto_map"] and GUARD_KEY not in config
    meta = config["normswap"]
    assert meta["remote_code"] == {"file": MODELING_FILE, "stock_model_type": "gpt2",
                                   "stock_architectures": ["GPT2LMHeadModel"], "required": False}
    assert meta["swapped_norms"] and meta["verification"]["passed"] is True


def test_exact_output_still_loads_in_the_stock_class(outputs):
    o = outputs["gpt2"]
    model = transformers.AutoModelForCausalLM.from_pretrained(o["path"]).eval()
    assert type(model) is transformers.GPT2LMHeadModel
    assert isinstance(model.transformer.h[0].ln_1, nn.LayerNorm)
    with torch.no_grad():
        out = model(**o["probes"]).logits
    assert (out - o["reference"]).abs().max().item() / o["reference"].abs().max().item() < 1e-4


def test_approximate_output_requires_the_remote_code(outputs, monkeypatch):
    path = outputs["gpt2-approx"]["path"]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "normswap_gpt2" and config["architectures"] == ["NormswapGPT2LMHeadModel"]
    assert config["auto_map"]["AutoConfig"] == "modeling_normswap.NormswapGPT2Config"
    assert config["normswap"]["remote_code"]["required"] is True
    # Auto classes: declining remote code, explicitly or by not answering the prompt, is an error
    monkeypatch.setattr(transformers.dynamic_module_utils, "TIME_OUT_REMOTE_CODE", 0)
    for kwargs in ({}, {"trust_remote_code": False}):
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        transformers.pipeline("text-generation", model=str(path))
    # the stock class called directly refuses too, with our message
    with pytest.raises(Exception, match="only correct with RMSNorm") as info:
        transformers.GPT2LMHeadModel.from_pretrained(path)
    assert GUARD_MESSAGE in str(info.value)


def test_approximate_output_differs_under_layernorm(outputs, monkeypatch):
    """The refusal matters: the same weights run with LayerNorm compute something else."""
    o = outputs["gpt2-approx"]
    rms = normswap_output(o, monkeypatch)
    stock = transformers.GPT2LMHeadModel.from_pretrained(o["path"], config=load_output_config(o["path"])).eval()
    with torch.no_grad():
        ln = stock(**o["probes"]).logits
    assert (ln - rms).abs().max().item() > 1e-2


def test_normswap_load_reads_every_output(outputs):
    for case_id, o in outputs.items():
        model = normswap.load(o["path"])
        meta = model.config.normswap
        assert not hasattr(model.config, "auto_map") and model.config.model_type == meta["remote_code"]["stock_model_type"]
        assert all(isinstance(model.get_submodule(n), normswap.RMSNorm) for n in meta["swapped_norms"]), case_id


def test_resaving_an_approximate_model_keeps_it_remote_only(outputs, tmp_path, monkeypatch):
    model = normswap.load(outputs["gpt2-approx"]["path"])
    normswap.save(model, tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["model_type"] == "normswap_gpt2" and GUARD_KEY in config
    monkeypatch.setattr(transformers.dynamic_module_utils, "TIME_OUT_REMOTE_CODE", 0)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again")


# ---- model card ----

def card_of(path: Path) -> tuple[dict, str]:
    text = (path / "README.md").read_text()
    return read_front_matter(text), text


def test_card_front_matter_and_figures(outputs):
    path = outputs["gpt2"]["path"]
    front, text = card_of(path)
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert front["tags"][:2] == ["normswap", "rmsnorm"] and "exact-conversion" in front["tags"]
    assert "base_model" not in front  # a local source is not a Hub repo
    assert CARD_MARKER in text and "# gpt2" in text
    ver = json.loads((path / "config.json").read_text())["normswap"]["verification"]
    assert "**PASSED**" in text
    for figure in (f"{ver['max_abs_diff']:.3e}", f"{ver['rel_max_abs_diff']:.3e}", f"{ver['kl']:.3e}",
                   f"{100 * ver['top1_agreement']:.2f}%", f"{ver['tolerance']:.1e}", f"{ver['converted_error']:.1e}",
                   f"{ver['original_error']:.1e}", "from the float64 original; the original in fp32"):
        assert figure in text
    assert 'AutoModelForCausalLM.from_pretrained("path/to/gpt2", trust_remote_code=True)' in text
    assert 'AutoModelForCausalLM.from_pretrained("path/to/gpt2")' in text
    assert 'normswap.load("path/to/gpt2")' in text
    assert "| Mode | **exact** |" in text


def test_card_for_vision_and_approximate(outputs):
    front, _ = card_of(outputs["vit-classification"]["path"])
    assert front["pipeline_tag"] == "image-classification"
    front, _ = card_of(outputs["vit-model"]["path"])
    assert front["pipeline_tag"] == "image-feature-extraction"
    front, text = card_of(outputs["gpt2-approx"]["path"])
    assert "approximate-conversion" in front["tags"]
    assert "only correct with RMSNorm" in text and "Not with the stock class" in text
    assert 'from_pretrained("path/to/gpt2-approx")' not in text  # no stock-class snippet


def test_card_base_model_license_report_and_recipe(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# source\n")
    fake = types.ModuleType("normswap.evaluate.report")
    fake.markdown_table = lambda report: f"| | perplexity |\n|---|---|\n| before | {report['ppl']:.2f} |"
    monkeypatch.setitem(sys.modules, "normswap.evaluate.report", fake)
    model = make("gpt2")
    normswap.convert_(model)
    model.config.normswap["source"] = {"id": "openai-community/gpt2", "revision": "abc123"}
    model.config.normswap["finetune"] = {"steps": 100, "lr": 1e-4, "data": "shakespeare"}
    report = {"ppl": 12.345, "machine": "2-core CPU", "command": "normswap eval OUT"}
    normswap.save(model, tmp_path / "out", source_dir=src, extra_files={"normswap_report.json": json.dumps(report)})
    front, text = card_of(tmp_path / "out")
    assert front["base_model"] == "openai-community/gpt2" and front["base_model_relation"] == "finetune"
    assert front["license"] == "mit" and "fine-tuned" in front["tags"]
    assert "| before | 12.35 |" in text and "Machine: `2-core CPU`" in text and "Command: `normswap eval OUT`" in text
    assert "## Fine-tuning recipe" in text and "steps: 100" in text
    assert "[`openai-community/gpt2`](https://huggingface.co/openai-community/gpt2) (revision `abc123`)" in text
    # fine-tuned without keeping the stream centred: only correct with RMSNorm
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "normswap_gpt2"


def test_card_degrades_without_the_report_module(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "normswap.evaluate.report", None)  # import fails
    model = make("gpt2")
    normswap.convert_(model)
    normswap.save(model, tmp_path / "out", extra_files={"normswap_report.json": "{}", "normswap_report.md": "# r\n"})
    _, text = card_of(tmp_path / "out")
    assert "[`normswap_report.md`](normswap_report.md)" in text
    normswap.save(model, tmp_path / "bare")
    assert "No before/after measurement" in card_of(tmp_path / "bare")[1]


def test_card_reports_failed_verification(tmp_path):
    model = make("gpt2")
    normswap.convert_(model)
    model.config.normswap["verification"]["passed"] = False
    normswap.save(model, tmp_path / "out", force=True)
    _, text = card_of(tmp_path / "out")
    assert "**FAILED**" in text and "Do not rely on it" in text


def test_foreign_readme_is_kept(tmp_path):
    model = make("gpt2")
    normswap.convert_(model)
    normswap.save(model, tmp_path / "out", extra_files={"README.md": "# my own card\n"})
    assert (tmp_path / "out" / "README.md").read_text() == "# my own card\n"
    assert (tmp_path / "out" / MODELING_FILE).is_file()


def test_render_uses_repo_id_and_valid_yaml(outputs):
    text = render_model_card(outputs["gpt2"]["path"], repo_id="someone/tiny-gpt2-rms")
    assert text.startswith("---\n")
    yaml.safe_load(text.split("---\n")[1])
    assert "# tiny-gpt2-rms" in text
    assert 'from_pretrained("someone/tiny-gpt2-rms", trust_remote_code=True)' in text


def test_write_publish_files_never_breaks_a_save(tmp_path, caplog):
    """A model type without an auto class gets no remote code, with a warning, and the folder is left valid."""
    from normswap.publish import write_publish_files

    config = {"model_type": "not_a_model_type", "architectures": ["NotAModel"], "normswap": {"swapped_norms": []}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert write_publish_files(None, tmp_path, name="x") is False
    assert "not adding remote code" in caplog.text
    assert json.loads((tmp_path / "config.json").read_text()) == config
    assert not (tmp_path / MODELING_FILE).exists() and not (tmp_path / "README.md").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shipped_rms_norm_matches_normswap_reference_kernel(dtype):
    """The modeling file copies normswap's reference maths (it may not import it); this keeps the copies in step."""
    from normswap.kernels import rms_norm_composite
    from normswap.publish import modeling_normswap

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 48, generator=gen) * 3 + 1).to(dtype)
    w = (1 + 0.3 * torch.randn(48, generator=gen)).to(dtype)
    b = (0.1 * torch.randn(48, generator=gen)).to(dtype)
    for weight, bias in ((w, b), (w, None), (None, None)):
        assert torch.equal(modeling_normswap.rms_norm(x, weight, bias, 1e-5), rms_norm_composite(x, weight, bias, 1e-5))
