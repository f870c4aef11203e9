"""Streaming conversion: equal to the in-memory path on every architecture, bounded per-tensor work, clean failures."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import SHARED_MODEL, SHARED_VALID, needs_shared
from safetensors import safe_open
from safetensors.torch import save_file

import normswap
from normswap.checkpoint import load_source
from normswap.cli import main
from normswap.errors import CheckpointError, NormswapError, NotExactError, OutputExistsError
from normswap.norm import CenteredRMSNorm, RMSNorm
from normswap.streaming import convert_streaming, parse_size
from normswap.streaming.resume import LOCK_FILE, STATE_FILE, partial_folder
from normswap.streaming.transform import center_into
from normswap.streaming.writer import ShardWriter
from normswap.verify import make_probes, primary_output

H = 32  # hidden size of every tiny model


def _tiny(model_type: str, **over):
    """(config, class) of a 2-layer model of ``model_type`` with hidden size 32."""
    rows = {
        "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, dict(n_embd=H, n_layer=2, n_head=2, vocab_size=64, n_positions=32)),
        "gpt_neo": (T.GPTNeoConfig, T.GPTNeoForCausalLM, dict(
            hidden_size=H, num_layers=2, num_heads=2, vocab_size=64, max_position_embeddings=32,
            attention_types=[[["global", "local"], 1]], window_size=8)),
        "gptj": (T.GPTJConfig, T.GPTJForCausalLM, dict(n_embd=H, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                                                       rotary_dim=8)),
        "codegen": (T.CodeGenConfig, T.CodeGenForCausalLM, dict(n_embd=H, n_layer=2, n_head=2, vocab_size=64,
                                                                n_positions=32, rotary_dim=8)),
        "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, dict(
            hidden_size=H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=64,
            max_position_embeddings=32)),
        "opt": (T.OPTConfig, T.OPTForCausalLM, dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                                    ffn_dim=64, vocab_size=64, max_position_embeddings=32,
                                                    word_embed_proj_dim=16)),
        "bloom": (T.BloomConfig, T.BloomForCausalLM, dict(hidden_size=H, n_layer=2, n_head=2, vocab_size=64)),
        "falcon": (T.FalconConfig, T.FalconForCausalLM, dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                                             vocab_size=64, new_decoder_architecture=True,
                                                             num_kv_heads=2)),
        "phi": (T.PhiConfig, T.PhiForCausalLM, dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=64, max_position_embeddings=32)),
        "gpt_bigcode": (T.GPTBigCodeConfig, T.GPTBigCodeForCausalLM, dict(n_embd=H, n_layer=2, n_head=2,
                                                                          vocab_size=64, n_positions=32)),
        "stablelm": (T.StableLmConfig, T.StableLmForCausalLM, dict(
            hidden_size=H, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
            vocab_size=64, max_position_embeddings=32)),
        "vit": (T.ViTConfig, T.ViTForImageClassification, dict(hidden_size=H, num_hidden_layers=2,
                                                               num_attention_heads=2, intermediate_size=64,
                                                               image_size=16, patch_size=8, num_labels=3)),
        "bert": (T.BertConfig, T.BertForMaskedLM, dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                                       intermediate_size=64, vocab_size=64,
                                                       max_position_embeddings=32)),
    }
    config_cls, model_cls, kwargs = rows[model_type]
    return config_cls(**{**kwargs, **over}), model_cls


#: (id, model_type, config overrides): tied and untied heads, on-disk aliases, optional roles, both block styles.
CASES = [
    ("gpt2", "gpt2", {}),
    ("gpt2-untied", "gpt2", {"tie_word_embeddings": False}),
    ("gpt_neo", "gpt_neo", {}),
    ("gptj", "gptj", {}),
    ("codegen", "codegen", {}),
    ("gpt_neox", "gpt_neox", {}),
    ("gpt_neox-sequential", "gpt_neox", {"use_parallel_residual": False}),
    ("gpt_neox-tied", "gpt_neox", {"tie_word_embeddings": True}),
    ("opt-project_in", "opt", {}),
    ("opt", "opt", {"word_embed_proj_dim": H}),
    ("bloom", "bloom", {}),
    ("falcon-new", "falcon", {}),
    ("falcon-new-1ln", "falcon", {"num_ln_in_parallel_attn": 1}),
    ("falcon-parallel", "falcon", {"new_decoder_architecture": False, "parallel_attn": True}),
    ("falcon-sequential", "falcon", {"new_decoder_architecture": False, "parallel_attn": False}),
    ("phi", "phi", {}),
    ("gpt_bigcode", "gpt_bigcode", {}),
    ("stablelm", "stablelm", {}),
    ("stablelm-parallel", "stablelm", {"use_parallel_residual": True}),
    ("vit", "vit", {}),
]


def make_model(model_type: str, seed: int = 0, **over) -> torch.nn.Module:
    """A tiny model with perturbed norms and non-zero-mean writers (random init is too symmetric to test centring)."""
    torch.manual_seed(seed)
    config, cls = _tiny(model_type, **over)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.2 if ("norm" in name.lower() or "ln" in name) else 0.05
            p.add_(torch.randn_like(p) * scale + 0.03)
    return model


def save_sharded(model, folder: Path, shard: str = "6KB") -> Path:
    model.save_pretrained(folder, max_shard_size=shard)
    return folder


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    out = {}
    for f in files:
        with safe_open(str(folder / f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def in_memory(src: Path, out: Path, dtype: str = "float32") -> Path:
    source = load_source(src, dtype="float32")
    report = normswap.convert_(source.model, verify_result=False)
    source.model.config.normswap = report.metadata(str(src), None, dtype)
    return normswap.save(source.model, out, source_dir=src, dtype=dtype)


def assert_same_tensors(a: dict, b: dict, rel: float = 1e-6) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        x, y = a[k].double(), b[k].double()
        assert float((x - y).abs().max()) <= rel * max(float(x.abs().max()), 1e-30), k


def logits(model, probes) -> torch.Tensor:
    with torch.no_grad():
        return primary_output(model(**probes)).double()


def leftovers(parent: Path) -> list[str]:
    marks = (".normswap-tmp-", "normswap-verify", ".normswap-partial")
    return sorted(p.name for p in parent.iterdir() if any(m in p.name for m in marks))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_streamed_output_equals_in_memory_and_reloads(tmp_path, case):
    _, model_type, over = case
    model = make_model(model_type, **over)
    src = save_sharded(model, tmp_path / "src")
    assert len(list(src.glob("*.safetensors"))) > 1  # really sharded

    result = convert_streaming(src, tmp_path / "streamed", max_shard_size="5KB", verify="none", progress=False)
    reference = in_memory(src, tmp_path / "memory")

    assert_same_tensors(read_all(reference), read_all(result.path))
    meta_s = json.loads((result.path / "config.json").read_text())
    meta_m = json.loads((reference / "config.json").read_text())
    for key in ("model_type", "mode", "untied_head", "swapped_norms", "recentered_norms", "approximate_norms",
                "folds", "dtype"):
        assert meta_s["normswap"][key] == meta_m["normswap"][key], key
    assert meta_s.get("tie_word_embeddings") == meta_m.get("tie_word_embeddings")
    assert result.report.centered_writers

    probes = make_probes(model)
    expected = logits(model, probes)
    scale = float(expected.abs().max())
    stock = type(model).from_pretrained(result.path).eval()  # stock class, stock LayerNorms, centred weights
    converted = normswap.load(result.path)
    assert any(isinstance(m, RMSNorm) for m in converted.modules())
    for reloaded in (stock, converted):
        assert float((logits(reloaded, probes) - expected).abs().max()) <= 1e-4 * scale


def test_bloom_embedding_norm_is_recentred_and_head_untied(tmp_path):
    src = save_sharded(make_model("bloom"), tmp_path / "src")
    result = convert_streaming(src, tmp_path / "out", verify="full", progress=False)
    meta = json.loads((result.path / "config.json").read_text())
    assert meta["normswap"]["recentered_norms"] == ["transformer.word_embeddings_layernorm"]
    assert meta["tie_word_embeddings"] is False and meta["normswap"]["untied_head"] is True
    model = normswap.load(result.path)
    assert isinstance(model.transformer.word_embeddings_layernorm, CenteredRMSNorm)
    assert isinstance(model.transformer.h[0].input_layernorm, RMSNorm)
    # the head is the original embedding; the stored embedding is centred
    tensors = read_all(result.path)
    original = read_all(src)["transformer.word_embeddings.weight"]
    assert torch.equal(tensors["lm_head.weight"], original)
    assert float(tensors["transformer.word_embeddings.weight"].double().mean(-1).abs().max()) < 1e-7
    assert result.report.verification.passed and result.report.verification.rel_max_abs_diff < 1e-5


def test_gpt_neox_tied_head_is_saved_under_its_loaded_name(tmp_path):
    src = save_sharded(make_model("gpt_neox", tie_word_embeddings=True), tmp_path / "src")
    assert "embed_out.weight" not in read_all(src)
    result = convert_streaming(src, tmp_path / "out", verify="full", progress=False)
    tensors = read_all(result.path)
    # save_pretrained writes a head it never loaded under its loaded name; the stock loader accepts both spellings
    assert torch.equal(tensors["lm_head.weight"], read_all(src)["gpt_neox.embed_in.weight"])
    assert result.report.verification.passed


def test_legacy_checkpoint_without_base_prefix_and_with_mask_buffers(tmp_path):
    """The original GPT-2 files: keys saved from the bare GPT2Model, plus the old ``attn.bias`` mask buffers."""
    model = make_model("gpt2")
    src = tmp_path / "legacy"
    src.mkdir()
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()
             if k.startswith("transformer.")}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = ["GPT2LMHeadModel"]
    model.config.save_pretrained(src)

    result = convert_streaming(src, tmp_path / "out", verify="full", progress=False)
    reference = in_memory(src, tmp_path / "memory")
    streamed = read_all(result.path)
    assert "transformer.h.0.attn.c_proj.weight" in streamed and "h.0.attn.bias" not in streamed
    assert_same_tensors(read_all(reference), streamed)
    assert result.report.verification.passed


def test_bf16_checkpoint_keeps_dtype_and_matches_in_memory_casts(tmp_path):
    src = save_sharded(make_model("gpt2").to(torch.bfloat16), tmp_path / "src")
    kept = convert_streaming(src, tmp_path / "bf16", verify="full", progress=False)
    assert {t.dtype for t in read_all(kept.path).values()} == {torch.bfloat16}
    assert json.loads((kept.path / "config.json").read_text())["normswap"]["dtype"] == "bfloat16"
    assert kept.report.verification.passed
    assert_same_tensors(read_all(in_memory(src, tmp_path / "mem-bf16", dtype="bfloat16")), read_all(kept.path), 0.0)

    widened = convert_streaming(src, tmp_path / "fp32", dtype="float32", verify="none", progress=False)
    assert_same_tensors(read_all(in_memory(src, tmp_path / "mem-fp32")), read_all(widened.path), 0.0)


def test_shards_respect_the_size_limit_and_the_index_is_complete(tmp_path):
    src = save_sharded(make_model("gpt2"), tmp_path / "src")
    result = convert_streaming(src, tmp_path / "out", max_shard_size="10KB", verify="none", progress=False)
    index = json.loads((result.path / "model.safetensors.index.json").read_text())
    tensors = read_all(result.path)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in set(index["weight_map"].values()):
        with safe_open(str(result.path / shard), framework="pt") as h:
            sizes = [h.get_tensor(k).numel() * 4 for k in h.keys()]
        assert sum(sizes) <= 10_000 or len(sizes) == 1
    assert result.stats.shards == len(set(index["weight_map"].values())) > 1


def test_sampled_verification_on_a_truncated_model(tmp_path):
    """verify="sample" is kept for old callers: every block is verified now (issue 12), one module at a time."""
    src = save_sharded(make_model("gpt2", n_layer=4), tmp_path / "src")
    result = convert_streaming(src, tmp_path / "out", verify="sample", progress=False)
    v = result.report.verification
    assert v.passed and v.rel_max_abs_diff < 1e-5
    assert v.blocks_checked == 4 and "all 4 blocks" in result.verification_scope
    assert leftovers(tmp_path) == []
    stored = json.loads((result.path / "config.json").read_text())["normswap"]["verification"]
    assert stored["passed"] and stored["reference"] == "float64" and stored["blocks_checked"] == 4


def test_center_into_matches_whole_tensor_maths_in_small_slabs():
    torch.manual_seed(0)
    shapes = {"linear": (48, 40), "conv1d": (40, 48), "embedding": (50, 48), "conv2d": (48, 3, 4, 4)}
    for layout, shape in shapes.items():
        w = torch.randn(shape) + 0.5
        expected = normswap.maths.center_weight(w, layout).to(torch.float32)
        out = w.clone()
        center_into(out, layout, out, slab_elements=100)  # many slabs, in place, on the slab threads
        assert torch.equal(out, expected), layout


@pytest.mark.parametrize("threads", [1, 2])
def test_center_into_refuses_a_non_finite_slab_whatever_the_threads(monkeypatch, threads):
    monkeypatch.setattr("normswap.streaming.transform.SLAB_THREADS", threads)
    w = torch.randn(64, 40)
    w[37, 5] = float("inf")
    with pytest.raises(CheckpointError, match="h.3.mlp.c_proj.weight contains NaN/Inf"):
        center_into(w, "conv1d", w.clone(), name="h.3.mlp.c_proj.weight", slab_elements=64)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("1.5GB") == 1_500_000_000 and parse_size(1234) == 1234
    with pytest.raises(NormswapError, match="5GB"):
        parse_size("lots")


# --- failures leave nothing behind ---------------------------------------------------------------------------------

def test_truncated_shard_is_refused_before_any_output(tmp_path):
    src = save_sharded(make_model("gpt2"), tmp_path / "src")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size - 10)
    with pytest.raises(CheckpointError, match=f"{shard.name}.*truncated"):
        convert_streaming(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_index_pointing_at_a_missing_shard(tmp_path):
    src = save_sharded(make_model("gpt2"), tmp_path / "src")
    missing = sorted(src.glob("model-*.safetensors"))[-1]
    missing.unlink()
    with pytest.raises(CheckpointError, match=f"missing.*{missing.name}"):
        convert_streaming(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    make_model("gpt2").config.save_pretrained(src)
    (src / "pytorch_model.bin").write_bytes(b"not a pickle: reading it as one would fail")
    with pytest.raises(CheckpointError, match="never unpickles.*safetensors"):
        convert_streaming(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_failure_mid_stream_leaves_nothing_and_a_rerun_succeeds(tmp_path):
    model = make_model("gpt2")
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[3, 5] = float("nan")
    src = save_sharded(model, tmp_path / "src")
    with pytest.raises(CheckpointError, match="h.1.mlp.c_proj.weight.*NaN"):
        convert_streaming(src, tmp_path / "out", verify="none", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []

    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[3, 5] = 0.0
    save_sharded(model, src)
    assert convert_streaming(src, tmp_path / "out", verify="none", progress=False).path.is_dir()
    with pytest.raises(OutputExistsError):
        convert_streaming(src, tmp_path / "out", verify="none", progress=False)


def test_post_ln_model_is_refused_in_streaming_mode(tmp_path):
    src = save_sharded(make_model("opt", do_layer_norm_before=False), tmp_path / "src")
    with pytest.raises(NotExactError, match="do_layer_norm_before=False.*does not stream"):
        convert_streaming(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# --- page-cache-free I/O -------------------------------------------------------------------------------------------

def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("direct", ["1", "0"], ids=["o_direct", "page_cache"])
@pytest.mark.parametrize("chunk", [8192, 12288, None], ids=["chunk8k", "chunk12k", "chunk_default"])
def test_shards_are_byte_identical_across_io_modes_and_chunk_sizes(tmp_path, monkeypatch, direct, chunk):
    """Windows and chunks far smaller than the tensors, so reads and writes straddle every boundary, and the
    padded-then-truncated tail of every shard; the bytes must not depend on any of it."""
    src = save_sharded(make_model("gpt2", n_embd=48), tmp_path / "src", shard="20KB")
    reference = convert_streaming(src, tmp_path / "ref", max_shard_size="30KB", verify="none", progress=False)
    monkeypatch.setenv("NORMSWAP_DIRECT_IO", direct)
    if chunk is not None:
        monkeypatch.setattr("normswap.streaming.direct_io.CHUNK", chunk)
    result = convert_streaming(src, tmp_path / "out", max_shard_size="30KB", progress=False)
    assert result.report.verification.passed
    if direct == "0":
        assert result.stats.direct_io is False
    got, want = file_bytes(result.path), file_bytes(reference.path)
    assert len(got) >= 3 and got == want
    assert any(len(b) % 4096 for b in got.values())  # some shard really ends mid-block
    assert_same_tensors(read_all(result.path), read_all(in_memory(src, tmp_path / "mem")))


def test_filesystem_without_o_direct_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    """tmpfs refuses O_DIRECT at open; some filesystems accept it at open and refuse the I/O. Both fall back."""
    import errno

    from normswap.streaming.direct_io import DirectFile

    data = os.urandom(3 * 4096 + 123)
    (tmp_path / "f.bin").write_bytes(data)
    real_open, real_preadv = os.open, os.preadv

    def open_without_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_without_direct)
    f = DirectFile(tmp_path / "f.bin", os.O_RDONLY)
    buf = bytearray(len(data) + 50)
    assert not f.direct and f.pread_into(memoryview(buf), 0) == len(data) and bytes(buf[:len(data)]) == data
    f.close()
    monkeypatch.setattr(os, "open", real_open)

    refusals = []

    def preadv_refusing_direct(fd, buffers, offset):
        if os.get_blocking(fd) and fcntl_flags(fd) & os.O_DIRECT:
            refusals.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    def fcntl_flags(fd):
        import fcntl

        return fcntl.fcntl(fd, fcntl.F_GETFL)

    monkeypatch.setattr(os, "preadv", preadv_refusing_direct)
    f = DirectFile(tmp_path / "f.bin", os.O_RDONLY)
    opened_direct = f.direct
    buf = bytearray(len(data))
    assert f.pread_into(memoryview(buf), 0) == len(data) and bytes(buf) == data and not f.direct
    assert bool(refusals) == opened_direct
    f.close()

    src = save_sharded(make_model("gpt2"), tmp_path / "src")
    monkeypatch.setattr(os, "open", open_without_direct)
    result = convert_streaming(src, tmp_path / "out", max_shard_size="8KB", verify="none", progress=False)
    monkeypatch.setattr(os, "open", real_open)
    assert result.stats.direct_io is False
    assert_same_tensors(read_all(result.path), read_all(in_memory(src, tmp_path / "mem")))


def test_pwrite_refused_under_o_direct_falls_back_mid_file(tmp_path, monkeypatch):
    import errno
    import fcntl

    from normswap.streaming.direct_io import ShardAppender

    real_pwrite = os.pwrite

    def pwrite_refusing_direct(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite_refusing_direct)
    payload = os.urandom(5 * 4096 + 77)
    with ThreadPoolExecutor(1) as pool:
        out = ShardAppender(tmp_path / "s.bin", len(payload), pool, chunk=8192)
        out.append(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        out.close()
    assert (tmp_path / "s.bin").read_bytes() == payload and not out.file.direct


@needs_shared
def test_streaming_the_real_shared_model_matches_in_memory_and_the_source(tmp_path):
    """Trained weights (not a random init): streamed tensors equal the in-memory conversion's, and the stock class
    reloads them to the source's logits on real text."""
    result = convert_streaming(SHARED_MODEL, tmp_path / "out", max_shard_size="5MB", progress=False)
    assert result.report.verification.passed and result.stats.shards >= 4
    assert_same_tensors(read_all(result.path), read_all(in_memory(SHARED_MODEL, tmp_path / "mem")))
    tok = T.AutoTokenizer.from_pretrained(SHARED_MODEL)
    ids = tok(SHARED_VALID.read_text()[:2000], return_tensors="pt").input_ids[:, :256]
    original = T.AutoModelForCausalLM.from_pretrained(SHARED_MODEL, dtype=torch.float32).eval()
    streamed = T.AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32).eval()
    a, b = logits(original, {"input_ids": ids}), logits(streamed, {"input_ids": ids})
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5
    assert torch.equal(a.argmax(-1), b.argmax(-1))


# --- resuming an interrupted run ------------------------------------------------------------------------------------

def interrupt_after(monkeypatch, n_tensors: int) -> None:
    """Make the run die as Ctrl-C would: in the main thread, as it is about to write its n-th tensor."""
    original, calls = ShardWriter.write, []

    def write(self, t, *args):
        calls.append(t.key)
        if len(calls) == n_tensors:
            raise KeyboardInterrupt
        original(self, t, *args)

    monkeypatch.setattr(ShardWriter, "write", write)


def interrupted(src: Path, out: Path, monkeypatch, cli: bool = False) -> list[str]:
    """Run a conversion that gets interrupted half-way; the names of the shards it finished."""
    with monkeypatch.context() as m:
        interrupt_after(m, len(read_all(src)) // 2)
        if cli:
            assert main(["convert", str(src), "-o", str(out), "--streaming", "--max-shard-size", "8KB"]) == 130
        else:
            with pytest.raises(KeyboardInterrupt):
                convert_streaming(src, out, max_shard_size="8KB", verify="none", progress=False)
    assert not out.exists()
    return json.loads((partial_folder(out) / STATE_FILE).read_text())["done"]


def test_interrupted_run_resumes_without_rewriting_finished_shards(tmp_path, monkeypatch):
    src = save_sharded(make_model("gpt2"), tmp_path / "src")
    fresh = convert_streaming(src, tmp_path / "fresh", max_shard_size="8KB", verify="none", progress=False)
    assert fresh.stats.shards >= 4

    done = interrupted(src, tmp_path / "out", monkeypatch)
    assert 2 <= len(done) < fresh.stats.shards
    partial = partial_folder(tmp_path / "out")
    kept = {name: (partial / name).stat() for name in done}

    result = convert_streaming(src, tmp_path / "out", max_shard_size="8KB", progress=False)
    assert result.stats.resumed_shards == len(done)
    assert f"{len(done)} more kept from an interrupted run" in result.stats.summary()
    assert result.report.verification.passed
    for name, before in kept.items():  # the very same files, never reopened for writing
        after = (tmp_path / "out" / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name
    assert_same_tensors(read_all(tmp_path / "out"), read_all(fresh.path), rel=0.0)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(fresh.path))
    assert leftovers(tmp_path) == []


def test_partial_work_from_a_changed_source_is_discarded(tmp_path, monkeypatch, caplog):
    src = save_sharded(make_model("gpt2", seed=0), tmp_path / "src")
    assert interrupted(src, tmp_path / "out", monkeypatch)
    save_sharded(make_model("gpt2", seed=1), src)  # new weights in the source: nothing may be reused
    with caplog.at_level("WARNING", logger="normswap.streaming.resume"):
        result = convert_streaming(src, tmp_path / "out", max_shard_size="8KB", verify="none", progress=False)
    assert "discarding the partial conversion" in caplog.text and "files differ" in caplog.text
    assert result.stats.resumed_shards == 0
    fresh = convert_streaming(src, tmp_path / "fresh", max_shard_size="8KB", verify="none", progress=False)
    assert_same_tensors(read_all(result.path), read_all(fresh.path), rel=0.0)


def test_damaged_shard_is_rewritten_on_resume(tmp_path, monkeypatch):
    src = save_sharded(make_model("gpt2"), tmp_path / "src")
    done = interrupted(src, tmp_path / "out", monkeypatch)
    with open(partial_folder(tmp_path / "out") / done[-1], "r+b") as fh:
        fh.truncate(100)
    result = convert_streaming(src, tmp_path / "out", max_shard_size="8KB", verify="none", progress=False)
    assert result.stats.resumed_shards == len(done) - 1
    fresh = convert_streaming(src, tmp_path / "fresh", max_shard_size="8KB", verify="none", progress=False)
    assert_same_tensors(read_all(result.path), read_all(fresh.path), rel=0.0)


def test_cli_no_resume_starts_over_and_a_concurrent_run_is_refused(tmp_path, monkeypatch, capsys):
    import fcntl

    src = save_sharded(make_model("gpt2"), tmp_path / "src")
    done = interrupted(src, tmp_path / "out", monkeypatch, cli=True)
    assert "interrupted; no output was written (the finished shards are kept: run the same command again to resume" \
        in capsys.readouterr().err
    partial = partial_folder(tmp_path / "out")
    with open(partial / LOCK_FILE) as held:  # another run holds the folder
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert main(["convert", str(src), "-o", str(tmp_path / "out"), "--streaming"]) == 2
        assert "another normswap run is writing" in capsys.readouterr().err
    assert json.loads((partial / STATE_FILE).read_text())["done"] == done  # the refused run touched nothing

    assert main(["convert", str(src), "-o", str(tmp_path / "out"), "--streaming", "--max-shard-size", "8KB",
                 "--no-resume", "--json"]) == 0
    out = capsys.readouterr().out
    payload = json.loads(out)  # --json: stdout holds the JSON alone
    assert payload["streaming"]["resumed_shards"] == 0
    assert not partial.exists()


# --- CLI -----------------------------------------------------------------------------------------------------------

def test_cli_streaming_flag_and_automatic_switch(tmp_path, capsys, monkeypatch):
    src = save_sharded(make_model("gpt2"), tmp_path / "src")
    assert main(["convert", str(src), "-o", str(tmp_path / "a"), "--streaming", "--max-shard-size", "8KB",
                 "--no-eval"]) == 0
    out = capsys.readouterr().out
    assert "verification PASSED" in out and "streamed" in out
    assert (tmp_path / "a" / "model.safetensors.index.json").is_file()

    # pretend the machine has 100 kB of free RAM: the checkpoint no longer fits, so convert streams by itself
    monkeypatch.setattr("normswap.streaming.converter.available_ram", lambda: 100_000)
    assert main(["convert", str(src), "-o", str(tmp_path / "b"), "--no-eval"]) == 0
    out = capsys.readouterr().out
    assert "more than 50% of the available RAM" in out and "converting shard by shard" in out
    assert_same_tensors(read_all(tmp_path / "a"), read_all(tmp_path / "b"))

    assert main(["convert", str(src), "-o", str(tmp_path / "c"), "--streaming", "--fold-gain"]) == 2
    assert "--fold-gain cannot stream" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_leftovers_of_a_killed_run_are_reported(tmp_path, caplog):
    """A SIGKILL skips the temporary folder's cleanup; the next run says where the debris is."""
    src = save_sharded(make_model("gpt2"), tmp_path / "src")
    debris = tmp_path / ".out.normswap-tmp-abc123"
    debris.mkdir()
    with caplog.at_level("WARNING", logger="normswap.streaming.converter"):
        convert_streaming(src, tmp_path / "out", verify="none", progress=False)
    assert str(debris) in caplog.text and "safe to delete" in caplog.text
    assert debris.exists()  # never deleted behind the user's back: it could belong to a run still in progress


def test_source_files_the_conversion_does_not_replace_are_carried_over(tmp_path):
    """Every other file of the source comes across unchanged (issue 11: sentence-transformers folders lost theirs)."""
    src = save_sharded(make_model("gpt2"), tmp_path / "src")
    (src / "notes.txt").write_text("private")
    result = convert_streaming(src, tmp_path / "out", verify="none", progress=False)
    names = set(os.listdir(result.path))
    assert {"config.json", "generation_config.json", "notes.txt"} <= names
    assert (result.path / "notes.txt").read_text() == "private"
