"""Healing a LayerNorm removal by fine-tuning: the progressive schedule (order, ramps), a short run on tiny text,
bit-identical resume in the middle of the schedule, the recipes' strict ``removal`` block, and the CLI path."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import make
from tiny_text import char_tokenizer, corpus_lines, write_text

import normswap
from normswap.cli import main as cli
from normswap.errors import NormswapError
from normswap.removal import DyT, FixedScaleNorm, convert_removal_
from normswap.training import RecipeError, apply_overrides, load_recipe
from normswap.training import loop as ft_loop
from normswap.training.removal_schedule import RemovalSchedule, auto_order, group_of

GPT2_NORMS = ["transformer.ln_f", "transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.h.1.ln_1",
              "transformer.h.1.ln_2"]
#: 5 norms, one starting every step from step 1, each ramped over 2 steps: all gone by step 1 + 4 + 2 = 7.
RECIPE = {
    "family": "causal-lm", "steps": 8, "batch_size": 4,
    "data": {"example": "packed", "seq_len": 16, "eval_examples": 4},
    "optimizer": {"lr": 1e-3}, "schedule": {"name": "constant"}, "loss": {"kl": 1.0, "ce": 0.5},
    "checkpoint_every": 2, "keep_centered": "false",
    "removal": {"progressive": True, "start_step": 1, "gap_steps": 1, "ramp_steps": 2},
}


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture
def text(tmp_path):
    return write_text(tmp_path / "train.txt", 150)


def _pair(tok, target: str):
    teacher = make("gpt2")
    student = copy.deepcopy(teacher)
    convert_removal_(student, target, tokenizer=tok, calibration_text="\n".join(corpus_lines(300, seed=5)))
    return teacher, student


def test_schedule_order_and_ramps():
    assert [group_of(n) for n in GPT2_NORMS] == ["ln_f", "ln_1", "ln_2", "ln_1", "ln_2"]
    assert auto_order(GPT2_NORMS) == ["ln_2", "ln_1", "ln_f"]  # MLP norms, attention norms, final norm
    sched = RemovalSchedule.build(GPT2_NORMS, (), start_step=10, gap_steps=5, ramp_steps=4)
    assert sched.starts == {"transformer.h.0.ln_2": 10, "transformer.h.1.ln_2": 15, "transformer.h.0.ln_1": 20,
                            "transformer.h.1.ln_1": 25, "transformer.ln_f": 30}
    assert sched.end_step == 34
    lam = [sched.blend("transformer.h.1.ln_2", s) for s in range(13, 21)]
    assert lam == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    explicit = RemovalSchedule.build(GPT2_NORMS, ("ln_1", "ln_2", "ln_f"), 0, 1, 1)
    assert list(explicit.starts) == ["transformer.h.0.ln_1", "transformer.h.1.ln_1", "transformer.h.0.ln_2",
                                     "transformer.h.1.ln_2", "transformer.ln_f"]
    with pytest.raises(NormswapError, match="not listed: ln_f"):
        RemovalSchedule.build(GPT2_NORMS, ("ln_1", "ln_2"), 0, 1, 1)
    with pytest.raises(NormswapError, match="not in this model: ln_3"):
        RemovalSchedule.build(GPT2_NORMS, ("ln_1", "ln_2", "ln_f", "ln_3"), 0, 1, 1)


def _blends(model):
    return {n: m.blend for n, m in model.named_modules() if isinstance(m, (FixedScaleNorm, DyT))}


def test_progressive_finetune_removes_in_order(tok, text):
    teacher, student = _pair(tok, "dyt")
    alpha0 = float(student.transformer.h[0].ln_2.alpha.detach())
    seen: list[dict] = []
    result = normswap.finetune(student, teacher, RECIPE, tokenizer=tok, text_file=text, progress=False,
                               callbacks=[lambda step, _logs: seen.append(_blends(student))])
    # step k (1-based) ran with the λ of 0-based step k-1: norm i starts at 1 + i and ramps over 2 steps
    order = ["transformer.h.0.ln_2", "transformer.h.1.ln_2", "transformer.h.0.ln_1", "transformer.h.1.ln_1",
             "transformer.ln_f"]
    for i, name in enumerate(order):
        expected = [min(1.0, max(0.0, (s - (1 + i) + 1) / 2)) for s in range(8)]
        assert [b[name] for b in seen] == expected, name
    assert seen[0] == dict.fromkeys(order, 0.0)  # the first step trains the original (every LayerNorm real)
    assert all(v == 1.0 for v in _blends(student).values())  # the saved model is the replacement alone
    assert result.removal["progressive"] and result.removal["end_step"] == 7
    assert all(torch.isfinite(torch.tensor(v)) for v in result.after.values())
    # DyT's α trained, and the metadata records the trained value
    alpha = float(student.transformer.h[0].ln_2.alpha.detach())
    assert alpha != alpha0
    assert student.config.normswap["removal"]["norms"]["transformer.h.0.ln_2"]["alpha"] == pytest.approx(alpha)


def test_resume_mid_schedule_is_bit_identical(tok, text, tmp_path):
    teacher, student = _pair(tok, "none")
    straight = copy.deepcopy(student)
    full = normswap.finetune(straight, teacher, RECIPE, tokenizer=tok, text_file=text, work_dir=tmp_path / "a",
                             progress=False)

    def crash(step, _logs):
        if step == 5:  # mid-schedule: norms 0-2 are going or gone, 3-4 still real
            raise KeyboardInterrupt

    killed = copy.deepcopy(student)
    with pytest.raises(KeyboardInterrupt):
        normswap.finetune(killed, teacher, RECIPE, tokenizer=tok, text_file=text, work_dir=tmp_path / "b",
                          progress=False, callbacks=[crash])
    assert [p.name for p in ft_loop.list_checkpoints(tmp_path / "b")] == ["checkpoint-0000002", "checkpoint-0000004"]
    resumed = copy.deepcopy(student)  # a fresh process: the converted model, λ = 1 as loaded
    result = normswap.finetune(resumed, teacher, RECIPE, tokenizer=tok, text_file=text, work_dir=tmp_path / "b",
                               resume=True, progress=False)
    assert result.resumed_from_step == 4
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert [h["loss"] for h in full.history if "loss" in h] == [h["loss"] for h in result.history if "loss" in h]
    assert result.after == full.after


def test_recipes_and_refusals(tok, text):
    for name in ("remove-ln", "dyt"):
        recipe = load_recipe(name)
        assert recipe.removal.progressive and recipe.removal.order == ("ln_2", "ln_1", "ln_f")
        assert recipe.family == "causal-lm" and recipe.loss.kl > 0
    base = load_recipe("causal-lm")
    assert base.removal == load_recipe({"family": "causal-lm", "steps": 1, "loss": {"kl": 1.0}}).removal
    with pytest.raises(RecipeError, match=r"unknown recipe key 'removal.ramp_step'.*did you mean 'removal.ramp_steps'"):
        apply_overrides(load_recipe("remove-ln"), ["removal.ramp_step=3"])
    with pytest.raises(RecipeError, match="only apply with removal.progressive"):
        load_recipe({**RECIPE, "removal": {"gap_steps": 3}})
    with pytest.raises(RecipeError, match="ramp_steps must be >= 1"):
        load_recipe({**RECIPE, "removal": {"progressive": True, "ramp_steps": 0}})
    teacher, student = _pair(tok, "none")
    with pytest.raises(NormswapError, match="needs 7 steps for 5 norms"):
        normswap.finetune(student, teacher, {**RECIPE, "steps": 6}, tokenizer=tok, text_file=text, progress=False)
    plain = make("gpt2")
    with pytest.raises(NormswapError, match="no replaced norm"):
        normswap.finetune(copy.deepcopy(plain), plain, RECIPE, tokenizer=tok, text_file=text, progress=False)


def test_cli_convert_finetune_load(tok, text, tmp_path):
    src = tmp_path / "src"
    make("gpt2").save_pretrained(src)
    tok.save_pretrained(src)
    naive = tmp_path / "naive"
    assert cli(["convert", str(src), "-o", str(naive), "--to", "none", "--approximate"]) == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(RECIPE))  # JSON is YAML
    healed = tmp_path / "healed"
    assert cli(["finetune", str(naive), "--teacher", str(src), "--recipe", str(recipe), "--text-file", str(text),
                "-o", str(healed), "--no-progress"]) == 0
    meta = json.loads((healed / "config.json").read_text())["normswap"]
    assert meta["target"] == "none" and meta["finetune"]["removal"]["end_step"] == 7
    model = normswap.load(healed)
    assert sum(isinstance(m, FixedScaleNorm) for m in model.modules()) == 5
    assert all(m.blend == 1.0 for m in model.modules() if isinstance(m, FixedScaleNorm))
