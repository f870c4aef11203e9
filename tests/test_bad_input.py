"""Every kind of bad input gets a clear message, and nothing is lost or half-written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers as T
from tiny_models import make, perturb_

import normswap
from normswap.cli import main
from normswap.errors import AlreadyRMSNormError, CheckpointError, NotExactError, UnsupportedArchitectureError


def save_source(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "normswap-tmp" in p.name or "normswap-old" in p.name]


def test_unknown_architecture_that_discovery_cannot_resolve_says_how_to_add(tmp_path, monkeypatch, capsys):
    """No declared adapter and discovery fails (simulated: discovery resolves XGLM these days): one readable error."""
    import normswap.discovery as discovery

    def cannot(*args, **kwargs):
        raise discovery.DiscoveryError("no residual stream found")

    monkeypatch.setattr(discovery, "discover_from_config", cannot)
    model = perturb_(T.AutoModelForCausalLM.from_config(T.XGLMConfig(vocab_size=64, d_model=32, num_layers=2,
                                                                       attention_heads=4, ffn_dim=64)))
    with pytest.raises(UnsupportedArchitectureError) as exc:
        normswap.convert_(model)
    msg = str(exc.value)
    assert "'xglm'" in msg and "register" in msg and "adapter" in msg and "no residual stream found" in msg
    src = save_source(model, tmp_path / "src")
    before = digest(src)
    capsys.readouterr()  # the test's own save_pretrained progress bar
    assert main(["convert", str(src), "-o", str(tmp_path / "out"), "--no-eval"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("normswap: error:") and "'xglm'" in err[0]
    assert digest(src) == before and not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_already_rmsnorm_exits_zero_without_writing(tmp_path, capsys):
    llama = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64))
    with pytest.raises(AlreadyRMSNormError, match="already uses RMSNorm"):
        normswap.convert_(llama)
    src = save_source(llama, tmp_path / "llama")
    assert main(["convert", str(src), "-o", str(tmp_path / "out"), "--no-eval"]) == 0
    assert "already uses RMSNorm" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_converted_model_is_not_converted_twice():
    model = make("gpt2")
    normswap.convert_(model)
    with pytest.raises(AlreadyRMSNormError):
        normswap.convert_(model)


@pytest.mark.parametrize("config", [
    T.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                word_embed_proj_dim=32, do_layer_norm_before=False),
    T.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4, apply_residual_connection_post_layernorm=True),
])
def test_post_ln_exact_refused_naming_the_approximate_path(config):
    model = T.AutoModelForCausalLM.from_config(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotExactError) as exc:
        normswap.convert_(model)
    msg = str(exc.value)
    assert "post" in msg.lower() and "--approximate" in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "refusal must not touch weights"


def test_existing_output_refused_without_force(tmp_path, capsys):
    src = save_source(make("gpt2"), tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["convert", str(src), "-o", str(out), "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "precious"
    assert main(["convert", str(src), "-o", str(out), "--force", "--no-eval"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert leftovers(tmp_path) == []


def test_source_never_modified_and_output_not_source(tmp_path, capsys):
    src = save_source(make("gpt2"), tmp_path / "src")
    before = digest(src)
    assert main(["convert", str(src), "-o", str(tmp_path / "out"), "--no-eval"]) == 0
    assert digest(src) == before
    assert main(["convert", str(src), "-o", str(src), "--force", "--no-eval"]) == 2
    assert "never modifies the source" in capsys.readouterr().err
    assert digest(src) == before


def test_crash_during_save_leaves_no_output(tmp_path, monkeypatch):
    model = make("gpt2")
    normswap.convert_(model)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        normswap.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_missing_tokenizer_converts_anyway_and_says_so(tmp_path, capsys):
    src = save_source(make("gpt2"), tmp_path / "src")
    assert main(["convert", str(src), "-o", str(tmp_path / "out"), "--no-eval"]) == 0
    assert "no tokenizer" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_tokenizer_files_are_copied(tmp_path):
    from normswap.assets import DEFAULT_MODEL

    assert main(["convert", str(DEFAULT_MODEL), "-o", str(tmp_path / "out"), "--no-eval"]) == 0
    assert (tmp_path / "out" / "tokenizer.json").exists()
    tok = T.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("To be, or not to be")["input_ids"]


def test_truncated_checkpoint_is_a_clear_error(tmp_path, capsys):
    src = save_source(make("gpt2"), tmp_path / "src")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        normswap.load_source(src)
    assert main(["convert", str(src), "-o", str(tmp_path / "out"), "--no-eval"]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_source_is_a_clear_error(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope"), "-o", str(tmp_path / "out"), "--no-eval"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_nan_weights_refused_naming_the_tensor():
    model = make("gpt2")
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight"):
        normswap.convert_(model)


def test_failed_verification_refuses_to_save_unless_forced(tmp_path, capsys):
    src = save_source(make("gpt2"), tmp_path / "src")
    assert main(["convert", str(src), "-o", str(tmp_path / "out"), "--tolerance", "1e-30", "--no-eval"]) == 2
    assert "verification failed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(src), "-o", str(tmp_path / "out"), "--tolerance", "1e-30", "--force", "--no-eval"]) == 0
    cfg = T.AutoConfig.from_pretrained(tmp_path / "out")
    assert cfg.normswap["verification"]["passed"] is False


def test_load_refuses_non_normswap_folder(tmp_path):
    src = save_source(make("gpt2"), tmp_path / "src")
    with pytest.raises(normswap.errors.NormswapError, match="not a normswap output"):
        normswap.load(src)


# ---- issue 11 item 1: an output that overlaps the source is refused, whatever the spelling -------------------------

def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (recursively, symlinks by their target text) mapped to a hash of its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "link:" + str(p.readlink())
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture
def sandbox(tmp_path) -> Path:
    """``tmp/sandbox/model``: a tiny GPT-2 with a sub-folder, inside a folder that holds nothing else."""
    model = save_source(make("gpt2"), tmp_path / "sandbox" / "model")
    (model / "extra").mkdir()
    (model / "extra" / "notes.txt").write_text("keep me")
    return tmp_path


OVERLAPS = {  # name: (source as typed, output as typed), relative to tmp_path; `link` -> sandbox/model
    "output is the source's parent": ("sandbox/model", "sandbox"),
    "output is the source's grandparent": ("sandbox/model", "."),
    "output inside the source": ("sandbox/model", "sandbox/model/rms"),
    "output is the source": ("sandbox/model", "sandbox/model"),
    "output is a link to the source": ("sandbox/model", "link"),
    "output inside the source via a link": ("sandbox/model", "link/rms"),
    "source via a link, output its real parent": ("link", "sandbox"),
    "source via a link, output inside its target": ("link", "sandbox/model/rms"),
}


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
@pytest.mark.parametrize("case", list(OVERLAPS))
def test_output_overlapping_the_source_is_refused_and_nothing_is_touched(sandbox, case, streaming, capsys,
                                                                          monkeypatch):
    monkeypatch.chdir(sandbox)
    (sandbox / "link").symlink_to(sandbox / "sandbox" / "model", target_is_directory=True)
    src, out = OVERLAPS[case]
    before = tree_digest(sandbox)
    argv = ["convert", src, "-o", out, "--force", "--no-eval"] + (["--streaming"] if streaming else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("normswap: error:") and "never modifies the source" in err[0]
    assert tree_digest(sandbox) == before  # nothing deleted, nothing written, no temporary folder left


def test_python_save_refuses_an_output_around_its_source_dir(sandbox):
    model = make("gpt2")
    normswap.convert_(model)
    before = tree_digest(sandbox)
    with pytest.raises(normswap.errors.OutputPathError, match="never modifies the source"):
        normswap.save(model, sandbox / "sandbox", source_dir=sandbox / "sandbox" / "model", force=True)
    assert tree_digest(sandbox) == before


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_force_replaces_an_output_that_is_a_file_without_leftovers(tmp_path, streaming, capsys):
    src = save_source(make("gpt2"), tmp_path / "src")
    before = tree_digest(src)
    (tmp_path / "afile").write_text("not a folder")
    argv = ["convert", str(src), "-o", str(tmp_path / "afile"), "--no-eval"] + (["--streaming"] if streaming else [])
    assert main(argv) == 2  # refused without --force
    assert (tmp_path / "afile").read_text() == "not a folder"
    assert main([*argv, "--force"]) == 0
    assert (tmp_path / "afile" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "src"]  # no .afile.normswap-old-NNNN
    assert tree_digest(src) == before


def test_finetune_output_or_work_folder_overlapping_an_input_is_refused(sandbox, capsys):
    student = sandbox / "student"
    assert main(["convert", str(sandbox / "sandbox" / "model"), "-o", str(student), "--no-eval"]) == 0
    capsys.readouterr()
    before = tree_digest(sandbox)
    teacher = sandbox / "sandbox" / "model"
    for extra in (["-o", str(sandbox / "sandbox")], ["-o", str(student / "healed")], ["-o", str(sandbox)],
                  ["-o", str(sandbox / "healed"), "--work-dir", str(sandbox / "sandbox")]):
        argv = ["finetune", str(student), "--teacher", str(teacher), "--recipe", "causal-lm", "--force", *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "never modifies the source" in err[0], err
        assert tree_digest(sandbox) == before


def test_python_streaming_refuses_an_output_around_its_source(sandbox):
    from normswap.streaming import convert_streaming

    before = tree_digest(sandbox)
    for out in (sandbox / "sandbox", sandbox / "sandbox" / "model" / "rms"):
        with pytest.raises(normswap.errors.OutputPathError, match="never modifies the source"):
            convert_streaming(sandbox / "sandbox" / "model", out, force=True, progress=False)
    assert tree_digest(sandbox) == before


# ---- issue 11 item 7: every file of the source that the conversion does not replace is carried over ---------------

@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_source_files_are_carried_over_but_never_stale_weights_or_over_what_was_written(tmp_path, streaming):
    src = save_source(make("gpt2"), tmp_path / "src")
    extras = {"modules.json": "[]", "sentence_bert_config.json": '{"max_seq_length": 64}',
              "1_Pooling/config.json": '{"pooling_mode_mean_tokens": true}', "processor/notes.txt": "x",
              "data_config.json": "{}"}
    for rel, text in extras.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    (src / "2_Normalize").mkdir()
    (src / "onnx").mkdir()
    (src / "onnx" / "model.onnx").write_bytes(b"stale original weights")
    (src / "pytorch_model.bin").write_bytes(b"stale original weights")
    (src / "README.md").write_text("the original's card")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref")
    before = tree_digest(src)
    out = tmp_path / "out"
    assert main(["convert", str(src), "-o", str(out), "--no-eval"] + (["--streaming"] if streaming else [])) == 0
    for rel, text in extras.items():
        assert (out / rel).read_text() == text, rel
    assert (out / "2_Normalize").is_dir()
    assert not (out / "onnx").exists() and not (out / "pytorch_model.bin").exists() and not (out / ".git").exists()
    assert "the original's card" not in (out / "README.md").read_text()  # normswap's card describes the output
    assert "normswap" in json.loads((out / "config.json").read_text())
    assert tree_digest(src) == before


def test_default_output_from_inside_the_source_is_refused(sandbox, monkeypatch, capsys):
    """`cd model && normswap convert .` would write ./model-rms inside the source: refused, named by the real folder."""
    monkeypatch.chdir(sandbox / "sandbox" / "model")
    before = tree_digest(sandbox)
    assert main(["convert", ".", "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert "model-rms is inside the source folder" in err and "never modifies the source" in err
    assert tree_digest(sandbox) == before
