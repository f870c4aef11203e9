"""Throughput: the optimum-benchmark formulas, interleaving, the no-norm variant and the `bench --json` schema.

No assertion here depends on how fast this machine is: timings are either replaced by a fake clock or only checked
for being positive and finite.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import transformers as T
from tiny_models import make, perturb_
from torch import nn

import normswap
from normswap.cli import main
from normswap.evaluate import throughput
from normswap.evaluate.nonorm import without_norms
from normswap.evaluate.throughput import BenchSettings, bench_inputs, benchmark, run_bench

TINY = BenchSettings(prompt_len=8, new_tokens=8, batch_sizes=(1, 2), warmup=1, repeats=3)


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
                       eos_token_id=0)
    return perturb_(T.GPT2LMHeadModel(cfg), seed=2)


@pytest.fixture(scope="module")
def converted(tiny_lm):
    model = copy.deepcopy(tiny_lm)
    normswap.convert_(model)
    return model


def test_decode_and_prefill_follow_the_optimum_benchmark_definitions(tiny_lm, monkeypatch):
    """A fake clock: prefill takes 0.1 s, generate 0.5 s, so every figure is known in closed form."""
    calls = []

    def fake_timed(fn, inputs, device):
        calls.append((fn.__self__.model, fn.__name__))
        return {"prefill": 0.1, "generate": 0.5}[fn.__name__]

    monkeypatch.setattr(throughput, "timed", fake_timed)
    settings = BenchSettings(prompt_len=8, new_tokens=5, batch_sizes=(2,), warmup=0, repeats=3)
    fig = benchmark({"a": tiny_lm}, settings)["a"]
    assert fig["prefill_tokens_per_s"]["2"] == pytest.approx(2 * 8 / 0.1)
    assert fig["decode_tokens_per_s"]["2"] == pytest.approx(2 * (5 - 1) / (0.5 - 0.1))
    assert fig["stats"]["decode_latency_s"]["2"]["median"] == pytest.approx(0.4)
    assert len(calls) == 2 * 3


def test_decode_runs_faster_than_prefill_are_discarded_not_clamped(tiny_lm, monkeypatch):
    clock = iter([0.10, 0.50, 0.10, 0.05, 0.10, 0.60])  # (prefill, generate) × 3; the 2nd generate is noise

    monkeypatch.setattr(throughput, "timed", lambda fn, inputs, device: next(clock))
    settings = BenchSettings(prompt_len=8, new_tokens=5, batch_sizes=(1,), warmup=0, repeats=3)
    fig = benchmark({"a": tiny_lm}, settings)["a"]
    assert fig["stats"]["discarded_decode_runs"] == {"1": 1}
    assert fig["stats"]["decode_latency_s"]["1"]["min"] == pytest.approx(0.4)
    assert fig["decode_tokens_per_s"]["1"] == pytest.approx((4 / 0.4 + 4 / 0.5) / 2)  # median of the two valid runs


def test_models_run_interleaved(tiny_lm, converted, monkeypatch):
    order = []

    def fake_timed(fn, inputs, device):
        order.append(fn.__self__.model)
        return 0.1 if fn.__name__ == "prefill" else 0.3

    monkeypatch.setattr(throughput, "timed", fake_timed)
    benchmark({"a": tiny_lm, "b": converted}, BenchSettings(prompt_len=4, new_tokens=2, batch_sizes=(1,),
                                                             warmup=0, repeats=3))
    names = ["a" if m is tiny_lm else "b" for m in order]
    assert names == ["a", "a", "b", "b"] * 3  # (prefill, generate) of A, then of B, every repeat


def test_generate_really_produces_new_tokens(tiny_lm):
    runner = throughput._Runner(tiny_lm, BenchSettings(prompt_len=6, new_tokens=5))
    inputs = bench_inputs(tiny_lm, 2, 6)
    assert runner.generate(inputs).shape == (2, 6 + 5)  # min_new_tokens: an early EOS cannot shorten the run
    assert runner.prefill(inputs).shape == (2, 6 + 1)


def test_same_seed_gives_every_model_the_same_prompt(tiny_lm, converted):
    a, b = bench_inputs(tiny_lm, 2, 8, seed=3), bench_inputs(converted, 2, 8, seed=3)
    assert torch.equal(a["input_ids"], b["input_ids"])


def test_without_norms_replaces_every_norm_in_a_copy(tiny_lm, converted):
    for model, kind in ((tiny_lm, nn.LayerNorm), (converted, normswap.RMSNorm)):
        clone, n = without_norms(model)
        assert n == 2 * 2 + 1  # ln_1, ln_2 per layer and ln_f
        assert not any(isinstance(m, (nn.LayerNorm, normswap.RMSNorm)) for m in clone.modules())
        assert sum(isinstance(m, nn.Identity) for m in clone.modules()) >= n
        assert sum(isinstance(m, kind) for m in model.modules()) == n  # the original is untouched


def test_run_bench_json_schema(tiny_lm, converted):
    result = run_bench(converted, tiny_lm, settings=TINY, labels={"model": "conv", "against": "orig"})
    env = result["environment"]
    assert {"device", "dtype", "threads", "torch", "transformers", "cpu"} <= set(env)
    assert (env["device"], env["dtype"], env["torch"]) == ("cpu", "float32", torch.__version__)
    assert set(result["models"]) == {"model", "against", "no_norm"}
    for fig in result["models"].values():
        for metric in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            assert set(fig[metric]) == {"1", "2"}
            assert all(math.isfinite(v) and v > 0 for v in fig[metric].values())
            for s in fig["stats"][metric].values():
                assert s["min"] <= s["median"] <= s["max"]
    assert result["models"]["model"]["label"] == "conv"
    assert result["models"]["model"]["rms_norm_kernel"] in {"fused", "composite"}
    assert result["models"]["against"]["rms_norm_kernel"] is None  # the original has no RMSNorm
    for metric in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        for bs, ratio in result["ratios"][metric].items():
            expected = result["models"]["model"][metric][bs] / result["models"]["against"][metric][bs]
            assert ratio == pytest.approx(expected)
        for bs, share in result["norm_share"][metric].items():
            expected = 1 - result["models"]["model"][metric][bs] / result["models"]["no_norm"][metric][bs]
            assert share == pytest.approx(expected)
    assert result["settings"]["interleaved"] is True
    json.dumps(result)  # serialisable as is


def test_encoders_get_forward_throughput_only():
    vit = make("vit-model")
    fig = run_bench(vit, settings=BenchSettings(batch_sizes=(2,), warmup=0, repeats=1))["models"]["model"]
    assert fig["kind"] == "encoder" and fig["decode_tokens_per_s"] is None
    assert fig["prefill_tokens_per_s"]["2"] > 0


def test_settings_are_checked_against_the_context(tiny_lm):
    with pytest.raises(ValueError, match="exceed the model's context of 32"):
        BenchSettings(prompt_len=30, new_tokens=8).validate(tiny_lm)
    with pytest.raises(ValueError, match="new-tokens >= 2"):
        BenchSettings(prompt_len=4, new_tokens=1).validate(tiny_lm)


def test_bench_cli_json_and_table(tiny_lm, converted, tmp_path, capsys):
    tiny_lm.save_pretrained(tmp_path / "orig")
    normswap.save(copy.deepcopy(converted), tmp_path / "conv")
    args = ["bench", str(tmp_path / "conv"), "--against", str(tmp_path / "orig"), "--prompt-len", "6",
            "--new-tokens", "8", "--batch-sizes", "1", "--warmup", "1", "--repeats", "3"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "normswap output" in out["models"]["model"]["label"]
    assert set(out["ratios"]) == {"prefill_tokens_per_s", "decode_tokens_per_s"}
    assert main([*args, "--no-norm-bound"]) == 0
    table = capsys.readouterr().out
    assert "prefill, batch 1" in table and "decode, batch 1" in table and "ratio model / against" in table
    assert "no_norm" not in table
    assert main(["bench", str(tmp_path / "orig"), "--prompt-len", "40"]) == 2
    assert "exceed the model's context" in capsys.readouterr().err
