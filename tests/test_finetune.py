"""Fine-tuning: strict recipes, a step that lowers the distillation loss, bit-identical resume, keep-centred
training, the CLI (incl. a killed run resumed) and the bad inputs. Tiny random models and synthetic text only."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file
from tiny_models import make
from tiny_text import char_tokenizer, corpus_lines, tiny_bert, write_text

import normswap
from normswap.cli import main as cli
from normswap.errors import NormswapError
from normswap.norm import RMSNorm
from normswap.training import (
    KeepCenteredCallback,
    RecipeError,
    apply_overrides,
    check_same_tokenizer,
    keep_centered_,
    load_recipe,
)
from normswap.training import data as ft_data
from normswap.training import loop as ft_loop
from normswap.training.keep_centered import residual_writers
from normswap.training.losses import distillation_loss
from normswap.verify import make_probes, primary_output

MLM = {
    "family": "masked-lm", "steps": 4, "batch_size": 4,
    "data": {"seq_len": 32, "eval_examples": 8, "max_lines_per_example": 2, "mlm_probability": 0.15},
    "optimizer": {"lr": 1e-4}, "schedule": {"name": "constant"},
    "loss": {"kl": 1.0, "hidden_mse": 1.0}, "checkpoint_every": 2,
}
CAUSAL = {
    "family": "causal-lm", "steps": 3, "batch_size": 4,
    "data": {"example": "packed", "seq_len": 16, "eval_examples": 4},
    "optimizer": {"lr": 1e-2}, "schedule": {"name": "constant"}, "loss": {"kl": 1.0},
}


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture
def text(tmp_path):
    return write_text(tmp_path / "train.txt", 120)


@pytest.fixture
def bert_pair():
    """(teacher, approximately converted student): a tiny post-LN MLM with real damage to heal."""
    teacher = tiny_bert(T.BertForMaskedLM)
    student = copy.deepcopy(teacher)
    normswap.convert_(student, approximate=True)
    return teacher, student


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- recipes ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,family", [("minilm", "sentence-encoder"), ("bert-mlm", "masked-lm"),
                                         ("causal-lm", "causal-lm")])
def test_shipped_recipes_parse(name, family):
    recipe = load_recipe(name)
    assert recipe.family == family and recipe.name == name and recipe.steps > 0
    assert load_recipe(Path(__file__).parents[1] / "recipes" / f"{name}.yaml") == recipe


@pytest.mark.parametrize("raw,message", [
    ({"family": "masked-lm", "steps": 1, "learning_rate": 1e-4}, "unknown recipe key 'learning_rate'"),
    ({"family": "masked-lm", "steps": 1, "optimizer": {"lrr": 1e-4}},
     "unknown recipe key 'optimizer.lrr' (did you mean 'optimizer.lr'?)"),
    ({"family": "masked-lm", "steps": 1, "loss": {"kl": 1, "hiden_mse": 1}}, "'loss.hiden_mse'"),
    ({"steps": 1}, "missing the required key 'family'"),
    ({"family": "masked-lm", "steps": "ten"}, "steps: expected an integer"),
    ({"family": "masked-lm", "steps": 1, "trainable": "everything"}, "not one of norm-gains, norms+biases, all"),
    ({"family": "masked-lm", "steps": 1, "optimizer": {"lr": -1}}, "optimizer.lr must be > 0"),
    ({"family": "masked-lm", "steps": 1, "loss": {"kl": 0}}, "no term with a weight > 0"),
    ({"family": "sentence-encoder", "steps": 1, "loss": {"ce": 1}}, "loss.ce needs labels"),
    ({"family": "masked-lm", "steps": 1, "loss": {"ce": 1}}, "needs data.mlm_probability > 0"),
    ({"family": "masked-lm", "steps": 5, "loss": {"kl": 1}, "schedule": {"warmup_steps": 9}},
     "warmup_steps (9) must be smaller than steps (5)"),
])
def test_invalid_recipes_name_the_problem(raw, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(raw)
    assert message in str(err.value)


def test_recipe_files_missing_or_broken(tmp_path):
    with pytest.raises(RecipeError, match="not found.*minilm"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("family: masked-lm\nsteps: [1\n")
    with pytest.raises(RecipeError, match="not valid YAML at line"):
        load_recipe(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(RecipeError, match="is empty"):
        load_recipe(empty)
    typo = tmp_path / "typo.yaml"
    typo.write_text("family: masked-lm\nsteps: 3\nloss: {kl: 1}\ndata: {seqlen: 64}\n")
    with pytest.raises(RecipeError, match=r"typo.yaml: unknown recipe key 'data.seqlen' \(did you mean 'data.seq_len'"):
        load_recipe(typo)


def test_overrides_are_strict():
    recipe = apply_overrides(load_recipe("minilm"), ["steps=70", "optimizer.lr=3e-4", "data.seq_len=64"])
    assert (recipe.steps, recipe.optimizer.lr, recipe.data.seq_len) == (70, 3e-4, 64)
    assert recipe.fingerprint() != load_recipe("minilm").fingerprint()
    with pytest.raises(RecipeError, match="'optimizer.foo'"):
        apply_overrides(recipe, ["optimizer.foo=1"])
    with pytest.raises(RecipeError, match="key=value"):
        apply_overrides(recipe, ["steps"])


# --- training -----------------------------------------------------------------------------------------------------

def test_one_step_reduces_the_distillation_loss(bert_pair, tok, text):
    teacher, student = bert_pair
    recipe = load_recipe({**MLM, "steps": 1})
    train, _ = ft_data.build_examples(recipe, tok, text)
    plan = ft_data.BatchPlan(len(train), recipe.batch_size, 1, recipe.seed)
    batch = ft_data.micro_batch(train, plan, 0, 0, tok, recipe)
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def loss() -> float:
        with torch.no_grad():
            value, _ = distillation_loss(recipe.loss, student(**inputs, output_hidden_states=True),
                                         teacher(**inputs, output_hidden_states=True), batch, causal=False)
        return float(value)

    before = loss()
    result = normswap.finetune(student, teacher, recipe, tokenizer=tok, text_file=text, progress=False)
    after = loss()
    assert after < 0.9 * before, (before, after)
    assert result.history[1]["loss"] == pytest.approx(before, rel=1e-5)  # the step trained on exactly this batch
    assert result.after["kl"] < result.before["kl"]


def test_trainable_norm_gains_only_touches_norm_gains(bert_pair, tok, text):
    teacher, student = bert_pair
    before = _params(student)
    normswap.finetune(student, teacher, {**MLM, "steps": 2, "trainable": "norm-gains"}, tokenizer=tok,
                      text_file=text, progress=False)
    gains = {f"{n}.weight" for n, m in student.named_modules() if isinstance(m, RMSNorm)}
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= gains


def test_freeze_keeps_named_parameters(bert_pair, tok, text):
    teacher, student = bert_pair
    before = _params(student)
    normswap.finetune(student, teacher, {**MLM, "steps": 2, "freeze": ["word_embeddings"]}, tokenizer=tok,
                      text_file=text, progress=False)
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert "bert.embeddings.word_embeddings.weight" not in changed
    assert "bert.embeddings.position_embeddings.weight" in changed and len(changed) > 20


def _run(teacher, student, tok, text, work, **kw):
    return normswap.finetune(student, teacher, MLM, tokenizer=tok, text_file=text, work_dir=work, progress=False,
                             **kw)


def test_resume_is_bit_identical(bert_pair, tok, text, tmp_path):
    teacher, student = bert_pair
    straight = copy.deepcopy(student)
    full = _run(teacher, straight, tok, text, tmp_path / "a")

    def crash(step, _logs):
        if step == 3:
            raise KeyboardInterrupt  # killed after step 3; the last checkpoint is step 2

    killed = copy.deepcopy(student)
    with pytest.raises(KeyboardInterrupt):
        _run(teacher, killed, tok, text, tmp_path / "b", callbacks=[crash])
    assert [p.name for p in ft_loop.list_checkpoints(tmp_path / "b")] == ["checkpoint-0000002"]

    resumed = copy.deepcopy(student)  # a fresh process: the converted student, nothing trained
    result = _run(teacher, resumed, tok, text, tmp_path / "b", resume=True)
    assert result.resumed_from_step == 2
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    losses = [h["loss"] for h in full.history if "loss" in h]
    assert losses == [h["loss"] for h in result.history if "loss" in h]
    assert result.after == full.after and result.before == full.before


def test_resume_refusals(bert_pair, tok, text, tmp_path):
    teacher, student = bert_pair
    with pytest.raises(ft_loop.ResumeError, match="no complete checkpoint"):
        _run(teacher, copy.deepcopy(student), tok, text, tmp_path / "empty", resume=True)

    def crash(step, _logs):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(teacher, copy.deepcopy(student), tok, text, tmp_path / "w", callbacks=[crash])
    (tmp_path / "w" / ".checkpoint-0000004.tmp").mkdir()  # a checkpoint cut off mid-write is ignored
    with pytest.raises(ft_loop.ResumeError, match="pass --resume"):
        _run(teacher, copy.deepcopy(student), tok, text, tmp_path / "w")
    with pytest.raises(ft_loop.ResumeError, match=r"different recipe \(changed: optimizer.lr\)"):
        normswap.finetune(copy.deepcopy(student), teacher, {**MLM, "optimizer": {"lr": 2e-4}}, tokenizer=tok,
                          text_file=text, work_dir=tmp_path / "w", resume=True, progress=False)


def test_keep_centered_keeps_an_exact_conversion_stock_loadable(tok, text, tmp_path):
    teacher = make("gpt2")
    student = copy.deepcopy(teacher)
    assert normswap.convert_(student).mode == "exact"
    result = normswap.finetune(student, teacher, CAUSAL, tokenizer=tok, text_file=text, progress=False)
    assert result.keep_centered  # "auto" turns it on for exact conversions
    worst = max(float(t.param.detach().double().mean(t.axis).abs().max() / t.param.detach().double().pow(2).mean()
                      .sqrt()) for t in residual_writers(student))
    assert worst < 1e-6
    changed = sum(not torch.equal(a, b) for a, b in zip(student.state_dict().values(),
                                                        teacher.state_dict().values(), strict=False))
    assert changed > 10, "the test must actually train"

    probes = make_probes(student, seq_len=16)
    student.config.normswap = {**student.config.normswap, "finetune": result.metadata()}
    out = normswap.save(student, tmp_path / "healed")
    stock = T.GPT2LMHeadModel.from_pretrained(out).eval()  # LayerNorm, stock class
    assert not any(isinstance(m, RMSNorm) for m in stock.modules())
    with torch.no_grad():
        ref = primary_output(normswap.load(out)(**probes)).double()
        got = primary_output(stock(**probes)).double()
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4

    # without the constraint the same training drifts the writers off zero mean, and LayerNorm ≠ RMSNorm again
    free = copy.deepcopy(teacher)
    normswap.convert_(free)
    normswap.finetune(free, teacher, {**CAUSAL, "keep_centered": "false"}, tokenizer=tok, text_file=text,
                      progress=False)
    as_layernorm = copy.deepcopy(teacher)
    as_layernorm.load_state_dict(free.state_dict(), strict=False)
    with torch.no_grad():
        drift = float((primary_output(as_layernorm(**probes)) - primary_output(free(**probes))).abs().max())
    assert drift > 1e-3


def test_keep_centered_callback_in_hf_trainer(tmp_path):
    model = make("gpt2")
    normswap.convert_(model)
    ids = torch.randint(0, 60, (8, 16), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                               learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                               disable_tqdm=True, logging_strategy="no")
    T.Trainer(model=model, args=args, train_dataset=dataset, callbacks=[KeepCenteredCallback()]).train()
    handle = keep_centered_(model)
    assert handle.recenter_() == 0 and handle.max_mean_ratio() < 1e-6  # already centred after training
    handle.remove()


def test_keep_centered_refuses_a_tied_head():
    with pytest.raises(NormswapError, match="tied"):
        keep_centered_(make("gpt2"))  # not converted: the head still shares the embedding


# --- bad input ----------------------------------------------------------------------------------------------------

def test_empty_text_file(bert_pair, tok, tmp_path):
    teacher, student = bert_pair
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ft_data.DataError, match="empty"):
        normswap.finetune(student, teacher, MLM, tokenizer=tok, text_file=empty, progress=False)


def test_teacher_with_other_shapes_or_tokenizer(bert_pair, tok):
    _, student = bert_pair
    other = tiny_bert(T.BertForMaskedLM, intermediate_size=64)
    with pytest.raises(ft_loop.IncompatibleModelsError, match="different shapes"):
        normswap.finetune(student, other, MLM, tokenizer=tok, progress=False)
    with pytest.raises(ft_loop.IncompatibleModelsError, match="teacher is a gpt2"):
        normswap.finetune(student, make("gpt2"), MLM, tokenizer=tok, progress=False)
    other_tok = T.BertTokenizer(vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"])})
    with pytest.raises(ft_loop.IncompatibleModelsError, match="tokenizers differ"):
        check_same_tokenizer(tok, other_tok)


def test_out_of_memory_names_the_knob(bert_pair, tok, text, monkeypatch):
    teacher, student = bert_pair

    def oom(*_a, **_k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes")

    monkeypatch.setattr(ft_loop, "distillation_loss", oom)
    with pytest.raises(NormswapError, match=r"batch_size=4.*--set batch_size=2 --set gradient_accumulation=2"):
        normswap.finetune(student, teacher, MLM, tokenizer=tok, text_file=text, progress=False)


# --- the command --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory, tok):
    """A saved tiny BERT MLM teacher and its `normswap convert --approximate` output (inputs only: never written)."""
    root = tmp_path_factory.mktemp("cli")
    teacher = tiny_bert(T.BertForMaskedLM)
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    assert cli(["convert", str(root / "teacher"), "-o", str(root / "conv"), "--approximate", "--no-eval"]) == 0
    return root / "teacher", root / "conv"


def _finetune_cmd(teacher, conv, text, out, *extra):
    return ["finetune", str(conv), "--teacher", str(teacher), "--recipe", "bert-mlm", "--text-file", str(text),
            "-o", str(out), "--no-progress", "--set", "steps=4", "--set", "batch_size=4",
            "--set", "gradient_accumulation=1", "--set", "schedule.warmup_steps=0", "--set", "checkpoint_every=2",
            "--set", "data.eval_examples=8", "--set", "data.seq_len=32", *extra]


def test_cli_finetune_kill_and_resume(converted, text, tmp_path, monkeypatch, capsys):
    teacher, conv = converted
    straight = tmp_path / "straight"
    assert cli(_finetune_cmd(teacher, conv, text, straight)) == 0
    meta = json.loads((straight / "config.json").read_text())["normswap"]
    assert meta["mode"] == "approximate" and meta["finetune"]["steps"] == 4
    assert meta["finetune"]["after"]["kl"] < meta["finetune"]["before"]["kl"]
    assert meta["finetune"]["recipe"]["name"] == "bert-mlm"
    report = json.loads((straight / "finetune_report.json").read_text())
    assert [h["step"] for h in report["history"] if "loss" in h] == [1, 2, 3, 4]
    assert not (tmp_path / "straight.work").exists(), "checkpoints are removed after a successful run"
    healed = normswap.load(straight)
    assert {n for n, m in healed.named_modules() if isinstance(m, RMSNorm)} == set(meta["swapped_norms"])
    printed = capsys.readouterr()
    assert "before" in printed.out
    assert "custom code" not in printed.out + printed.err, "reading the student must not ask to run remote code"

    real_step = ft_loop._train_step

    def killed_at_3(*args, step, **kw):
        if step == 2:  # the 3rd step: checkpoint-2 is on disk
            raise KeyboardInterrupt
        return real_step(*args, step=step, **kw)

    monkeypatch.setattr(ft_loop, "_train_step", killed_at_3)
    out = tmp_path / "healed"
    assert cli(_finetune_cmd(teacher, conv, text, out)) == 130
    assert not out.exists(), "a killed run leaves no output folder"
    assert [p.name for p in ft_loop.list_checkpoints(tmp_path / "healed.work")] == ["checkpoint-0000002"]
    monkeypatch.setattr(ft_loop, "_train_step", real_step)
    assert cli(_finetune_cmd(teacher, conv, text, out)) == 2  # checkpoints present: must say --resume
    assert "--resume" in capsys.readouterr().err
    assert cli(_finetune_cmd(teacher, conv, text, out, "--resume")) == 0
    a, b = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((out / "config.json").read_text())["normswap"]
    assert meta["finetune"]["resumed_from_step"] == 2


def test_cli_finetune_bad_inputs(converted, text, tmp_path, capsys):
    teacher, conv = converted
    out = tmp_path / "o"
    cmd = _finetune_cmd(teacher, conv, text, out)
    assert cli([*cmd[:5], "no-such-recipe", *cmd[6:]]) == 2
    assert "recipe 'no-such-recipe' not found" in capsys.readouterr().err
    assert cli(_finetune_cmd(teacher, conv, text, out, "--resume")) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert cli(_finetune_cmd(teacher, conv, tmp_path / "missing.txt", out)) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(_finetune_cmd(teacher, teacher, text, out)) == 2  # the student must be a normswap output
    assert "not a normswap output" in capsys.readouterr().err
    assert cli(_finetune_cmd(teacher, conv, text, out, "--set", "optimiser.lr=1")) == 2
    assert "unknown recipe key 'optimiser" in capsys.readouterr().err
    assert not out.exists()


def test_held_out_text_is_never_trained_on(tok, tmp_path):
    recipe = load_recipe({**MLM, "data": {**MLM["data"], "max_lines_per_example": 1, "eval_examples": 10}})
    lines = corpus_lines(100, seed=3)
    path = tmp_path / "t.txt"
    path.write_text("\n".join(lines))
    train, held = ft_data.build_examples(recipe, tok, path)
    assert len(held) == 10 and len(train) == 90
    assert not {tuple(x) for x in held.ids} - {tuple(tok(line)["input_ids"]) for line in lines[-10:]}
    plan = ft_data.BatchPlan(len(train), 4, 1, 0)
    assert plan.indices(0, 0) == ft_data.BatchPlan(len(train), 4, 1, 0).indices(0, 0)  # pure function of the step
    seen = {i for step in range(23) for i in plan.indices(step, 0)}
    assert seen == set(range(len(train)))  # one epoch covers every training example


def test_batches_do_not_depend_on_the_process_count(tok, text):
    """`accelerate launch` on N processes trains on the same examples and masks as one process: each takes rows."""
    recipe = load_recipe(MLM)
    train, _ = ft_data.build_examples(recipe, tok, text)
    plan = ft_data.BatchPlan(len(train), recipe.batch_size, 1, recipe.seed)
    whole = ft_data.micro_batch(train, plan, 3, 0, tok, recipe)
    halves = [ft_data.micro_batch(train, plan, 3, 0, tok, recipe, rank=r, world=2) for r in (0, 1)]
    for key in whole:
        for r, half in enumerate(halves):
            rows = whole[key][2 * r:2 * r + 2]
            assert torch.equal(half[key], rows[:, : half[key].shape[1]]), key
            assert not rows[:, half[key].shape[1]:].any() or key == "labels"  # only padding was trimmed
    with pytest.raises(ft_data.DataError, match="does not split evenly over 3 processes"):
        ft_data.micro_batch(train, plan, 0, 0, tok, recipe, rank=0, world=3)


def test_distributed_launch_without_distributed_setup_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(NormswapError, match="ACCELERATE_USE_CPU=1"):
        ft_loop.make_accelerator(load_recipe(MLM))
