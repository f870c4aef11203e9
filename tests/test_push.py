"""``normswap push``: dry run, refusals, and the upload call path against a local stand-in for the Hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers
from huggingface_hub.utils import filter_repo_objects
from tiny_models import make

import normswap
from normswap.assets import DEFAULT_MODEL
from normswap.cli import main
from normswap.publish.card import is_generated_card
from normswap.publish.remote_code import MODELING_FILE


class NoNetwork:
    """Stands in for HfApi where nothing may reach the network."""

    def __init__(self, *args, **kwargs):
        raise AssertionError("HfApi was constructed: this path must not touch the network")


class FakeHub:
    """A local stand-in for ``HfApi``: records calls and 'uploads' by copying the selected files into a folder."""

    calls: list[tuple[str, dict]] = []
    storage: Path | None = None
    fail_with: Exception | None = None

    def __init__(self, *args, **kwargs):
        FakeHub.calls.append(("init", kwargs))

    def create_repo(self, repo_id, **kwargs):
        FakeHub.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if FakeHub.fail_with is not None:
            raise FakeHub.fail_with
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        FakeHub.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        FakeHub.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])
        every = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        selected = list(filter_repo_objects(every, allow_patterns=kwargs.get("allow_patterns")))
        for name in selected:
            (FakeHub.storage / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / name, FakeHub.storage / name)
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/0123abc", commit_message="m",
            commit_description="", oid="0123abc", pr_url=None,
        )


@pytest.fixture()
def fake_hub(tmp_path, monkeypatch):
    FakeHub.calls = []
    FakeHub.storage = tmp_path / "hub-storage"
    FakeHub.storage.mkdir()
    FakeHub.fail_with = None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    return FakeHub


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("push") / "tiny-gpt2-rms"
    model = make("gpt2")
    normswap.convert_(model)
    normswap.save(model, out)
    return out


@pytest.fixture()
def out(converted, tmp_path) -> Path:
    """A private copy per test (push rewrites the model card)."""
    dst = tmp_path / "tiny-gpt2-rms"
    shutil.copytree(converted, dst)
    return dst


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_dry_run_lists_every_file_and_size_without_network(out, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetwork)
    (out / ".hidden-scratch").write_text("not for the hub")
    before = snapshot(out)
    assert main(["push", str(out), "me/tiny-gpt2-rms", "--dry-run", "--private", "--revision", "v1"]) == 0
    text = capsys.readouterr().out
    assert snapshot(out) == before  # nothing written
    listed = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "bytes" and parts[0] != "total":
            listed[parts[0]] = int(parts[1].replace(",", ""))
    expected = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert set(listed) == expected and ".hidden-scratch" not in text
    for name, size in listed.items():
        if name != "README.md":  # the card is rewritten with the repo id: listed at its new size
            assert size == (out / name).stat().st_size, name
    assert "README.md" in listed and "(written by push)" in text
    assert f"total {sum(listed.values()):,} bytes" in text
    assert "https://huggingface.co/me/tiny-gpt2-rms (branch v1), private" in text
    assert "dry run: nothing was uploaded or written" in text


def test_push_uploads_through_hfapi(out, fake_hub, capsys):
    rc = main(["push", str(out), "me/tiny-gpt2-rms", "--private", "--revision", "dev", "--commit-message", "first"])
    assert rc == 0
    names = [c[0] for c in fake_hub.calls]
    assert names == ["init", "create_repo", "create_branch", "upload_folder"]
    create, branch, upload = (c[1] for c in fake_hub.calls[1:])
    assert create == {"repo_id": "me/tiny-gpt2-rms", "repo_type": "model", "private": True, "exist_ok": True}
    assert branch == {"repo_id": "me/tiny-gpt2-rms", "branch": "dev", "repo_type": "model", "exist_ok": True}
    assert upload["folder_path"] == str(out.resolve()) and upload["revision"] == "dev"
    assert upload["commit_message"] == "first" and upload["repo_id"] == "me/tiny-gpt2-rms"
    assert sorted(p.name for p in fake_hub.storage.iterdir()) == sorted(p.name for p in out.iterdir())
    assert "pushed: https://huggingface.co/me/tiny-gpt2-rms/commit/0123abc" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert is_generated_card(out / "README.md") and "# tiny-gpt2-rms" in card
    assert 'from_pretrained("me/tiny-gpt2-rms", trust_remote_code=True)' in card


def test_uploaded_files_load_with_remote_code(out, fake_hub):
    """What reached the stand-in Hub is a complete repo: it loads with trust_remote_code and swaps the norms."""
    assert main(["push", str(out), "me/tiny-gpt2-rms"]) == 0
    assert fake_hub.calls[-1][1]["revision"] is None
    assert "create_branch" not in [c[0] for c in fake_hub.calls]
    model = transformers.AutoModelForCausalLM.from_pretrained(fake_hub.storage, trust_remote_code=True)
    assert type(model.transformer.h[0].ln_1).__name__ == "RMSNorm"
    ids = torch.arange(8)[None]
    with torch.no_grad():
        remote = model(input_ids=ids).logits
        local = normswap.load(out)(input_ids=ids).logits
    assert (remote - local).abs().max().item() < 1e-4


def test_push_adds_missing_remote_code(out, fake_hub):
    """A folder saved before publishing existed gets its modeling file and auto_map at push time."""
    (out / MODELING_FILE).unlink()
    config = json.loads((out / "config.json").read_text())
    del config["auto_map"]
    (out / "config.json").write_text(json.dumps(config))
    assert main(["push", str(out), "me/tiny-gpt2-rms"]) == 0
    assert (fake_hub.storage / MODELING_FILE).is_file()
    assert "AutoModelForCausalLM" in json.loads((fake_hub.storage / "config.json").read_text())["auto_map"]


def test_refuses_a_folder_that_is_not_a_normswap_output(fake_hub, capsys):
    assert main(["push", str(DEFAULT_MODEL), "me/x", "--dry-run"]) == 2
    assert "not a normswap output" in capsys.readouterr().err
    assert fake_hub.calls == []


def test_refuses_failed_verification_unless_forced(out, fake_hub, capsys):
    config = json.loads((out / "config.json").read_text())
    config["normswap"]["verification"]["passed"] = False
    (out / "config.json").write_text(json.dumps(config))
    assert main(["push", str(out), "me/x"]) == 2
    err = capsys.readouterr().err
    assert "failed verification" in err and "--force" in err
    assert fake_hub.calls == []
    assert main(["push", str(out), "me/x", "--dry-run", "--force"]) == 0
    assert "warning: --force:" in capsys.readouterr().out
    assert main(["push", str(out), "me/x", "--force"]) == 0
    assert [c[0] for c in fake_hub.calls][-1] == "upload_folder"


def test_missing_token_fails_before_any_call(out, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetwork)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["push", str(out), "me/x"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err


def test_upload_failure_is_one_line(out, fake_hub, capsys):
    fake_hub.fail_with = ConnectionError("Failed to resolve 'huggingface.co'\nlong traceback text")
    assert main(["push", str(out), "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "upload to me/x failed (ConnectionError: Failed to resolve" in err


@pytest.mark.parametrize("bad", ["no-namespace", "me/bad name", "a/b/c"])
def test_invalid_repo_id(out, bad, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetwork)
    assert main(["push", str(out), bad, "--dry-run"]) == 2
    assert "repo id" in capsys.readouterr().err
