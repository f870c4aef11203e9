"""Issue 13 pins end to end: custom LayerNorm classes, LayerScale, run-time re-centring, encoder-decoders, raw stream
outputs. Each converted model is compared with the original in fp32 after normswap.load, the stock class, and the
shipped remote code; the structure resolver is checked to give one answer to surgery, streaming and training."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
import transformers as T
from safetensors import safe_open
from tiny_models import make
from torch import nn

import normswap
from normswap.adapters import get_adapter
from normswap.checkpoint import load_source
from normswap.errors import CheckpointError
from normswap.norm import CenteredRMSNorm, RMSNorm, is_layernorm_like
from normswap.streaming import convert_streaming
from normswap.streaming.plan import plan_streaming
from normswap.structure import resolve
from normswap.training.keep_centered import keep_centered_, residual_writers
from normswap.verify import make_probes

TOL = 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def outputs(model: nn.Module, probes: dict) -> dict[str, torch.Tensor]:
    """Every tensor field of the output (nested model outputs flattened with dots)."""
    with torch.no_grad():
        out = model(**probes)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif hasattr(value, "items"):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)

    walk("", out)
    return flat


def compare(model: nn.Module, original_out: dict, probes: dict, raw: tuple[str, ...], rms: bool = True) -> None:
    """Every output equals the original's; raw-stream outputs equal it up to the per-token mean, and with RMSNorm
    modules (``rms``) they come back mean-removed. (The stock class keeps whatever mean its LayerNorm-written
    stream parts carry, e.g. CLIP's pre_layrnorm bias; its later LayerNorms ignore it.)"""
    got = outputs(model, probes)
    assert set(got) == set(original_out)
    for key, ref in original_out.items():
        if not ref.is_floating_point() or ref.numel() == 0:
            continue
        out = got[key]
        if key in raw:
            ref = ref - ref.mean(dim=-1, keepdim=True)
            if rms:
                assert float(out.double().mean(-1).abs().max() / out.double().abs().max()) < 1e-6, key
            out = out - out.mean(dim=-1, keepdim=True)
        assert rel(out, ref) <= TOL, (key, rel(out, ref))


def remote_class(folder, stock: type) -> type:
    """The shipped modeling file's subclass of ``stock``, imported as transformers would import it."""
    spec = importlib.util.spec_from_file_location(f"normswap_remote_{id(folder)}", folder / "modeling_normswap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, "Normswap" + stock.__name__)


PINS = ["cohere", "olmo", "dinov2", "dinov2-swiglu-classification", "dinov2_with_registers", "whisper",
        "clip_vision_model", "clip_text_model", "clip", "mbart", "m2m_100"]


@pytest.mark.parametrize("row", PINS)
def test_pin_converts_exactly_and_reloads_three_ways(row, tmp_path):
    original = make(row)
    probes = make_probes(original, seq_len=12)
    ref = outputs(original, probes)
    model = copy.deepcopy(original)
    report = normswap.convert_(model, probes=probes)
    assert report.passed and report.mode == "exact", report.summary()
    raw = get_adapter(original.config.model_type).raw_stream_outputs
    compare(model, ref, probes, raw)

    out = normswap.save(model, tmp_path / "out")
    meta = json.loads((out / "config.json").read_text())["normswap"]
    assert meta["recentered_writers"] == report.recentered_writers
    stock = type(original).from_pretrained(out).eval()  # LayerNorms, no hooks: the mean is ignored anyway
    assert not any(isinstance(m, RMSNorm) for m in stock.modules())
    compare(stock, ref, probes, raw, rms=False)
    loaded = normswap.load(out)
    assert {n for n, m in loaded.named_modules() if isinstance(m, RMSNorm)} == set(report.swapped_norms)
    compare(loaded, ref, probes, raw)
    remote = remote_class(out, type(original)).from_pretrained(out).eval()  # what trust_remote_code runs
    assert sum(type(m).__name__.endswith("RMSNorm") for m in remote.modules()) == len(report.swapped_norms)
    compare(remote, ref, probes, raw)


def test_custom_layernorm_classes_become_rmsnorm_with_stock_keys():
    for row, cls_name in (("cohere", "CohereLayerNorm"), ("olmo", "OlmoLayerNorm")):
        model = make(row)
        assert any(type(m).__name__ == cls_name for m in model.modules())
        keys = set(model.state_dict())
        report = normswap.convert_(model)
        assert report.swapped_norms and report.passed
        assert set(model.state_dict()) == keys
        kinds = {type(model.get_submodule(n)) for n in report.swapped_norms}
        assert kinds == {RMSNorm}
    cohere = make("cohere")
    norm = cohere.model.norm
    rms = RMSNorm.from_norm(norm)
    assert rms.weight is norm.weight and rms.bias is None and rms.eps == norm.variance_epsilon
    olmo = RMSNorm.from_norm(make("olmo").model.norm)
    assert olmo.weight is None and olmo.eps == 1e-5 and olmo.normalized_shape == (48,)
    x = torch.randn(3, 48, dtype=torch.float64)
    x = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(rms.double()(x), norm.double()(x), rtol=0, atol=1e-5)  # Cohere runs in fp32
    # the per-head q/k norms stay CohereLayerNorm: they read projections, not the stream
    converted = make("cohere")
    report = normswap.convert_(converted)
    assert report.kept_norms and all(type(converted.get_submodule(n)).__name__ == "CohereLayerNorm"
                                     for n in report.kept_norms)


def test_layerscale_is_folded_and_left_as_ones():
    model = make("dinov2")
    lam = model.encoder.layer[0].layer_scale1.lambda1.detach().clone()
    assert float((lam - 1).abs().max()) > 0.1
    w = model.encoder.layer[0].attention.o_proj.weight.detach().double().clone()
    normswap.convert_(model)
    for block in model.encoder.layer:
        assert torch.equal(block.layer_scale1.lambda1, torch.ones_like(block.layer_scale1.lambda1))
        assert torch.equal(block.layer_scale2.lambda1, torch.ones_like(block.layer_scale2.lambda1))
    folded = w * lam.double()[:, None]
    torch.testing.assert_close(model.encoder.layer[0].attention.o_proj.weight.double(),
                               folded - folded.mean(0, keepdim=True), rtol=0, atol=1e-6)


def test_recentred_writers_are_hooks_listed_in_the_metadata():
    whisper = make("whisper")
    report = normswap.convert_(whisper)
    assert report.recentered_writers == {"model.encoder.layers.0": "input"}
    m2m = make("m2m_100")
    report = normswap.convert_(m2m)
    assert report.recentered_writers == {"model.encoder.embed_positions": "output",
                                         "model.decoder.embed_positions": "output"}
    assert m2m.config.normswap["recentered_writers"] == report.recentered_writers
    clip = make("clip_vision_model")
    report = normswap.convert_(clip)
    assert report.recentered_norms == ["vision_model.pre_layrnorm"]
    assert isinstance(clip.vision_model.pre_layrnorm, CenteredRMSNorm)


def test_one_resolver_feeds_surgery_streaming_and_training(tmp_path):
    """The in-memory plan, the streaming plan (from the checkpoint's keys) and keep_centered name the same roles."""
    for row in ("dinov2", "whisper", "cohere", "gpt2", "vit-model", "clip"):
        model = make(row)
        adapter = get_adapter(model.config.model_type)
        plan = normswap.plan_conversion(model)
        model.save_pretrained(tmp_path / row)
        with safe_open(str(tmp_path / row / "model.safetensors"), framework="pt") as fh:
            keys = set(fh.keys())
        stream = plan_streaming(model.config, type(model), adapter, keys)
        assert stream.centered_writers == [w.name for w in plan.writers]
        assert [n.name for n in stream.norms] == [n.name for n in plan.norms]
        assert [n.exact for n in stream.norms] == [n.exact for n in plan.norms]
        assert stream.recentered_writers == plan.recentered_writers
        trained = {t.name.rsplit(".", 1)[0] if not t.name.endswith(("token", "embeddings", "embedding"))
                   else t.name for t in residual_writers(model)}
        centred = {w.name for w in plan.writers if w.recenter is None}
        assert trained <= centred | {n + ".weight" for n in centred}, trained - centred


def test_keep_centered_holds_layerscale_at_one_and_ignores_recentred_writers():
    model = make("dinov2")
    normswap.convert_(model)
    handle = keep_centered_(model)
    assert handle.scales and all(float(p.detach().min()) == 1.0 for _, p in handle.scales)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = make_probes(model)
    model.train()
    out = model(**probes).last_hidden_state
    out.pow(2).mean().backward()
    opt.step()
    handle.recenter_()
    assert all(torch.equal(p, torch.ones_like(p)) for _, p in handle.scales)
    assert handle.max_mean_ratio() < 1e-5
    whisper = make("whisper")
    normswap.convert_(whisper)
    names = {t.name for t in residual_writers(whisper)}
    assert not any(n.startswith("model.encoder.layers.0.") and "out_proj" not in n and "fc2" not in n for n in names)


def test_build_plan_accepts_custom_norms_and_ensure_has_layernorm_sees_them():
    from normswap.surgery import ensure_has_layernorm

    for row in ("cohere", "olmo"):
        ensure_has_layernorm(make(row))  # no "this model has no LayerNorm modules"
    assert is_layernorm_like(nn.LayerNorm(4)) and not is_layernorm_like(RMSNorm(4))
    assert not is_layernorm_like(T.models.llama.modeling_llama.LlamaRMSNorm(4))
    assert not is_layernorm_like(T.models.t5.modeling_t5.T5LayerNorm(4))  # an RMSNorm by behaviour, despite its name


def test_structure_resolves_every_stack_of_an_encoder_decoder():
    model = make("whisper")
    s = resolve(model, get_adapter("whisper"))
    assert set(s.block_lists) == {"model.encoder.layers", "model.decoder.layers"}
    names = [w.name for w in s.writers]
    assert "model.decoder.layers.1.encoder_attn.out_proj" in names and "model.encoder.layers.1.fc2" in names
    assert "model.decoder.layers.0.encoder_attn_layer_norm" in [n.name for n in s.norms]
    decoder_only = T.WhisperForCausalLM(model.config)
    s = resolve(decoder_only, get_adapter("whisper"))
    assert set(s.block_lists) == {"model.decoder.layers"} and "model.encoder.layers" in s.skipped_optional


# --- streaming: the same conversion from the checkpoint's keys --------------------------------------------------


def _read(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys()})
    return tensors


def _in_memory(src, out):
    source = load_source(src, dtype="float32")
    report = normswap.convert_(source.model, verify_result=False)
    source.model.config.normswap = report.metadata(str(src), None, "float32")
    return normswap.save(source.model, out, source_dir=src)


@pytest.mark.parametrize("row", ["dinov2", "whisper", "cohere", "olmo", "clip_vision_model", "mbart"])
def test_streaming_equals_in_memory_for_the_new_structures(row, tmp_path):
    """LayerScale folded (scale keys written as ones), Conv stems, run-time re-centrings recorded in the metadata."""
    model = make(row)
    model.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    streamed = convert_streaming(tmp_path / "src", tmp_path / "streamed", verify="none", progress=False)
    memory = _in_memory(tmp_path / "src", tmp_path / "memory")
    a, b = _read(memory), _read(streamed.path)
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for k in a:
        assert float((a[k].double() - b[k].double()).abs().max()) <= 1e-6 * max(float(a[k].abs().max()), 1e-30), k
    meta_s = json.loads((streamed.path / "config.json").read_text())["normswap"]
    meta_m = json.loads((memory / "config.json").read_text())["normswap"]
    for key in ("swapped_norms", "recentered_norms", "recentered_writers", "approximate_norms", "untied_head"):
        assert meta_s[key] == meta_m[key], key
    probes = make_probes(model, seq_len=12)
    ref = outputs(model, probes)
    compare(normswap.load(streamed.path), ref, probes, get_adapter(model.config.model_type).raw_stream_outputs)


def test_streaming_refuses_nan_in_a_tensor_it_only_copies(tmp_path):
    model = make("gpt2")
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight[3, 5] = float("nan")  # a reader: copied, not centred
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(CheckpointError, match="c_attn.weight contains NaN"):
        convert_streaming(tmp_path / "src", tmp_path / "out", verify="none", progress=False)
    assert not (tmp_path / "out").exists()
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # the re-typing path checks too
    with pytest.raises(CheckpointError, match="NaN"):
        convert_streaming(tmp_path / "bf16", tmp_path / "out", dtype="float32", verify="none", progress=False)


def test_streaming_a_head_checkpoint_whose_config_has_no_architectures(tmp_path):
    """No ``architectures``: the class that loads every tensor is inferred (the head is kept, never dropped), and
    streaming and the in-memory path agree tensor for tensor."""
    model = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=64))
    model.save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    source = _read(tmp_path / "src")
    assert "gpt_neox.embed_in.weight" in source and "embed_out.weight" in source
    streamed = convert_streaming(tmp_path / "src", tmp_path / "streamed", verify="full", progress=False)
    assert streamed.report.passed
    assert json.loads((streamed.path / "config.json").read_text())["architectures"] == ["GPTNeoXForCausalLM"]
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        got = normswap.load(streamed.path)(input_ids=ids).logits
    assert rel(got, ref) <= TOL
    memory = _in_memory(tmp_path / "src", tmp_path / "memory")
    a, b = _read(memory), _read(streamed.path)
    assert set(a) == set(b) == set(source)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_a_config_without_architectures_whose_tensors_no_class_loads_is_refused(tmp_path):
    """Rather than silently dropping tensors, name them."""
    model = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=64))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["stray.extra_head.weight"] = torch.ones(3, 32)
    model.save_pretrained(tmp_path / "src", state_dict=state)
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="stray.extra_head.weight"):
        normswap.load_source(tmp_path / "src")
    with pytest.raises(CheckpointError, match="stray.extra_head.weight"):
        convert_streaming(tmp_path / "src", tmp_path / "streamed", progress=False)
    assert not (tmp_path / "streamed").exists()


def test_conv_layout_centres_any_convnd_along_its_output_channels():
    from normswap.maths import HIDDEN_AXIS
    from normswap.streaming.transform import center_into
    from normswap.surgery import ResolvedWriter, center_writers_

    torch.manual_seed(0)
    for conv, x in ((nn.Conv1d(5, 16, 3), torch.randn(2, 5, 9)), (nn.Conv3d(2, 16, 2), torch.randn(1, 2, 4, 4, 4))):
        with torch.no_grad():
            conv.weight.add_(0.3)
            conv.bias.add_(0.5)
        streamed = torch.empty_like(conv.weight)
        center_into(conv.weight.detach(), "conv", streamed, slab_elements=7)
        center_writers_([ResolvedWriter("stem", conv, "conv")])
        torch.testing.assert_close(streamed, conv.weight.detach(), rtol=0, atol=0)
        with torch.no_grad():
            y = conv(x)  # channels are the hidden axis: every output position is zero-mean over them
        assert float(y.double().mean(dim=1).abs().max()) < 1e-6
    assert HIDDEN_AXIS["conv"] == 0


def test_recentring_hooks_take_positional_and_keyword_inputs_and_tuple_outputs():
    from normswap.surgery import install_recentering_

    class Layer(nn.Module):
        def forward(self, hidden_states, scale=1.0):
            return (hidden_states * scale, "extra")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Layer(), Layer()

    net = Net()
    assert install_recentering_(net, {"a": "input", "b": "output"}) == 2
    assert install_recentering_(net, {"a": "input", "b": "output"}) == 0  # idempotent
    x = torch.randn(3, 8) + 2.0
    for y in (net.a(x)[0], net.a(hidden_states=x)[0], net.b(x)[0]):
        assert float(y.mean(-1).abs().max()) < 1e-6
    assert net.b(x)[1] == "extra"
    copied = copy.deepcopy(net)  # hooks hold no state: a deep copy keeps them
    assert float(copied.a(x)[0].mean(-1).abs().max()) < 1e-6


def test_a_norm_configured_away_as_identity_is_skipped_not_refused():
    """ModernBERT's first block has ``attn_norm = Identity``: nothing to swap there, the other blocks still resolve."""
    model = make("gpt2")
    model.transformer.h[0].ln_1 = nn.Identity()
    s = resolve(model, get_adapter("gpt2"))
    assert "transformer.h.0.ln_1" in s.skipped_optional
    assert "transformer.h.1.ln_1" in [n.name for n in s.norms]


def test_streaming_a_discovered_adapter_reads_legacy_keys_through_transformers_renaming(tmp_path):
    """BEiT has no pin (so no disk_aliases) and saves ``encoder.layer.N.attention.attention.query``: streaming maps
    the file's keys the way from_pretrained renames them, and equals the in-memory conversion (LayerScale included)."""
    from tiny_models import perturb_

    model = perturb_(T.BeitModel(T.BeitConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=64, image_size=16, patch_size=4)))
    model.save_pretrained(tmp_path / "src")
    assert any(".attention.attention.query." in k for k in _read(tmp_path / "src"))
    streamed = convert_streaming(tmp_path / "src", tmp_path / "streamed", verify="none", progress=False)
    memory = _in_memory(tmp_path / "src", tmp_path / "memory")
    a, b = _read(memory), _read(streamed.path)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert any(k.endswith("lambda_1") and torch.equal(v, torch.ones_like(v)) for k, v in b.items())
