"""The distillation loop: a converted student learns to compute what its original (the teacher) computes.

Built on accelerate: one process on a CPU here, ``accelerate launch -m normswap.training ...`` on many GPUs with the
same recipe (``batch_size`` is global and split between processes, so the optimisation is the same). Dropout is off
(both models stay in eval mode: the target is a deterministic function). Checkpoints (model, optimizer, scheduler,
RNG states, step counter) are written atomically into a work folder, and since each batch is a pure function of
(seed, step), a resumed run continues bit-identically.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from normswap.errors import NormswapError
from normswap.norm import RMSNorm
from normswap.training.checkpoints import ResumeError, list_checkpoints, load_checkpoint, save_checkpoint
from normswap.training.data import BatchPlan, build_examples, eval_batches, max_sequence_length, micro_batch
from normswap.training.keep_centered import CenteredWriters, keep_centered_
from normswap.training.losses import distillation_loss
from normswap.training.metrics import evaluate
from normswap.training.recipe import Recipe, load_recipe
from normswap.training.removal_schedule import make_schedule, removal_summary, removed_norms

logger = logging.getLogger(__name__)


__all__ = ["FinetuneResult", "IncompatibleModelsError", "ResumeError", "check_compatible", "check_same_tokenizer",
           "finetune", "list_checkpoints"]


class IncompatibleModelsError(NormswapError):
    """Teacher and student differ in architecture, shapes or tokenizer."""


@dataclass
class FinetuneResult:
    """What a fine-tuning run did and how the student compares with the teacher before and after."""

    recipe: dict
    steps: int
    examples_seen: int
    wall_time_s: float
    before: dict
    after: dict
    keep_centered: bool
    data: dict
    resumed_from_step: int | None = None
    history: list[dict] = field(default_factory=list)
    #: Progressive norm removal: the step each replaced norm started to go, and the ramp length (None: not used).
    removal: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def metadata(self) -> dict:
        """The ``finetune`` block stored next to the conversion metadata in config.json (no per-step history)."""
        d = self.to_dict()
        d.pop("history")
        return d

    def summary(self) -> str:
        keys = [k for k in ("mean_cosine", "min_cosine", "nn_agreement", "token_cosine", "kl", "top1_agreement",
                            "student_perplexity", "teacher_perplexity") if k in self.after]
        rows = [f"  {k:20s} {self.before.get(k, float('nan')):>12.6f} -> {self.after[k]:.6f}" for k in keys]
        head = (f"fine-tuned {self.steps} steps ({self.examples_seen} sequences) in {self.wall_time_s:.0f} s"
                + (f", resumed from step {self.resumed_from_step}" if self.resumed_from_step else ""))
        return "\n".join([head, f"  held-out: {self.data.get('eval_source')} ({self.after.get('examples', self.after.get('tokens'))})",
                          f"  {'metric':20s} {'before':>12s} -> after", *rows])


def check_compatible(student: nn.Module, teacher: nn.Module) -> None:
    """Refuse a teacher that is not the student's original architecture (same type, same tensor shapes)."""
    s_type, t_type = student.config.model_type, teacher.config.model_type
    if s_type != t_type:
        raise IncompatibleModelsError(f"teacher is a {t_type} model but the student is a {s_type}; distillation needs "
                                      "the original model the student was converted from")
    # a replaced norm's own scalar (FixedScaleNorm.scale, DyT.alpha) has no counterpart in the original
    extra = {f"{name}.{key}" for name in removed_norms(student) for key in ("scale", "alpha")}
    s_sd = {k: v for k, v in student.state_dict().items() if k not in extra}
    t_sd = teacher.state_dict()
    bad = [f"{k}: student {tuple(v.shape)} vs teacher {tuple(t_sd[k].shape)}"
           for k, v in s_sd.items() if k in t_sd and v.shape != t_sd[k].shape]
    only_s = sorted(set(s_sd) - set(t_sd))
    only_t = sorted(set(t_sd) - set(s_sd))
    if bad or only_s or only_t:
        detail = "; ".join(bad[:3] + [f"only in student: {', '.join(only_s[:3])}"] * bool(only_s)
                           + [f"only in teacher: {', '.join(only_t[:3])}"] * bool(only_t))
        raise IncompatibleModelsError(f"teacher and student have different shapes ({detail}); pass the model the "
                                      "student was converted from as --teacher")


def check_same_tokenizer(student_tok, teacher_tok) -> None:
    """Distillation compares outputs token by token: both models must read the same ids for the same text."""
    if student_tok is None or teacher_tok is None:
        return
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        diff = sum(1 for k, v in s_vocab.items() if t_vocab.get(k) != v) + len(set(t_vocab) - set(s_vocab))
        raise IncompatibleModelsError(
            f"teacher and student tokenizers differ ({len(s_vocab)} vs {len(t_vocab)} tokens, {diff} mapped "
            "differently); distillation needs the tokenizer of the model the student was converted from")
    probe = "Shall I compare thee to a summer's day?"
    if student_tok(probe)["input_ids"] != teacher_tok(probe)["input_ids"]:
        raise IncompatibleModelsError("teacher and student tokenizers split text differently (same vocabulary, other "
                                      "rules or special tokens); use the teacher's tokenizer files for the student")


def select_trainable(model: nn.Module, mode: str, freeze: tuple[str, ...] = ()) -> list[nn.Parameter]:
    """Set requires_grad per the recipe's ``trainable`` and ``freeze``; return the trainable parameters (deduplicated)."""
    norm_params: dict[int, str] = {}
    replaced = {id(m) for m in removed_norms(model).values()}
    for module in model.modules():
        if id(module) in replaced:  # a removed LayerNorm: its gain (and DyT's alpha) count as the norm's gain
            for pname, p in module.named_parameters(recurse=False):
                norm_params[id(p)] = "bias" if pname == "bias" else "gain"
        elif isinstance(module, RMSNorm):
            if module.weight is not None:
                norm_params[id(module.weight)] = "gain"
            if module.bias is not None:
                norm_params[id(module.bias)] = "bias"
        elif isinstance(module, nn.LayerNorm) and mode == "norms+biases":
            for p in module.parameters(recurse=False):
                norm_params[id(p)] = "norm"
    chosen: list[nn.Parameter] = []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if mode == "all":
            keep = True
        elif mode == "norm-gains":
            keep = norm_params.get(id(p)) == "gain"
        else:
            keep = id(p) in norm_params or name.endswith(".bias") or name == "bias"
        keep = keep and not any(fragment in name for fragment in freeze)
        p.requires_grad_(keep)
        if keep and id(p) not in seen:
            chosen.append(p)
            seen.add(id(p))
    if not chosen:
        raise NormswapError(f"trainable={mode!r} with freeze={list(freeze)} selects no parameters in this model")
    return chosen


def build_optimizer(params: list[nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    o = recipe.optimizer
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": o.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    try:  # the fused kernel is ~10x faster than the per-tensor loop on CPU, and just as deterministic
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)


def lr_factor(step: int, recipe: Recipe) -> float:
    """Multiplier of ``optimizer.lr`` at ``step``: linear warmup, then cosine/linear decay to min_lr_ratio."""
    s = recipe.schedule
    if s.warmup_steps and step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    if s.name == "constant":
        return 1.0
    span = max(1, recipe.steps - s.warmup_steps)
    progress = min(1.0, (step - s.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if s.name == "cosine" else 1 - progress
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * shape


def make_accelerator(recipe: Recipe):
    """An Accelerator for the recipe's precision; a fresh single process may re-initialise accelerate's state."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState, GradientState, PartialState

    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[recipe.precision]
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", precision) != precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()  # tests and notebooks run several recipes in one process
        GradientState._reset_state()
    try:
        # distillation losses leave some parameters unused (e.g. BertModel's pooler): DDP must expect that
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        accelerator = Accelerator(mixed_precision=precision, step_scheduler_with_optimizer=False,
                                  kwargs_handlers=[ddp])
    except ValueError as exc:
        raise NormswapError(f"precision {recipe.precision!r} is not available here ({exc}); set precision: fp32 or "
                            "bf16 in the recipe") from None
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:  # every process would think it is alone and write the output
        raise NormswapError(f"launched as {launched} processes, but accelerate set up none of them as distributed (on "
                            "CPU it needs ACCELERATE_USE_CPU=1, which `accelerate launch --cpu` sets)")
    return accelerator


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _oom_hint(recipe: Recipe) -> str:
    b, a = recipe.batch_size, recipe.gradient_accumulation
    half = max(1, b // 2)
    return (f"ran out of memory at batch_size={b}, data.seq_len={recipe.data.seq_len}: lower batch_size (e.g. "
            f"--set batch_size={half} --set gradient_accumulation={a * b // half} keeps the effective batch of "
            f"{a * b}), or lower data.seq_len, or use precision: bf16")


# --- the loop ---------------------------------------------------------------------------------------------------

def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def finetune(
    model: nn.Module,
    teacher: nn.Module,
    recipe: Recipe | str | os.PathLike | dict,
    *,
    tokenizer=None,
    text_file: str | os.PathLike | None = None,
    eval_text_file: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
    resume: bool = False,
    keep_checkpoints: int = 2,
    progress: bool = True,
    callbacks: Sequence[Callable[[int, dict], None]] = (),
    accelerator=None,
) -> FinetuneResult:
    """Distil ``teacher`` into the converted ``model`` (in place) following ``recipe``; returns before/after figures.

    ``recipe`` is a :class:`Recipe`, a mapping, a YAML path or a shipped recipe name (``"minilm"``). Checkpoints go
    to ``work_dir`` every ``recipe.checkpoint_every`` steps (none without a work_dir); ``resume=True`` continues from
    the latest one bit-identically. ``callbacks`` are called as ``fn(step, logs)`` after every optimizer step.
    """
    recipe = load_recipe(recipe)
    check_compatible(model, teacher)
    accelerator = accelerator or make_accelerator(recipe)
    from accelerate.utils import set_seed

    set_seed(recipe.seed)
    train, held = build_examples(recipe, tokenizer, text_file, eval_text_file,
                                 max_sequence_length(model.config, tokenizer))
    plan = BatchPlan(len(train), recipe.batch_size, recipe.gradient_accumulation, recipe.seed)
    held_batches = eval_batches(held, recipe.batch_size, tokenizer, recipe)  # every process: same batches, same figures
    causal = recipe.family == "causal-lm"
    meta = getattr(model.config, "normswap", None) or {}
    keep = recipe.keep_centered == "true" or (recipe.keep_centered == "auto" and meta.get("mode") == "exact")
    if recipe.family != "sentence-encoder" and getattr(model, "get_output_embeddings", lambda: None)() is None:
        raise NormswapError(f"a {recipe.family} recipe needs a model with an LM head (logits); this "
                            f"{type(model).__name__} has none: use the sentence-encoder recipe or the *ForMaskedLM / "
                            "*ForCausalLM class")

    teacher.requires_grad_(False)
    teacher.eval().to(accelerator.device)
    model.eval()  # dropout off: the student must learn a deterministic function
    params = select_trainable(model, recipe.trainable, recipe.freeze)
    optimizer = build_optimizer(params, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, recipe))
    prepared, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw_model = accelerator.unwrap_model(prepared)
    centered: CenteredWriters | None = keep_centered_(raw_model) if keep else None

    schedule, replaced = make_schedule(raw_model, recipe.removal, recipe.steps)  # refused before any work
    work = Path(work_dir) if work_dir is not None else None
    start, history, before, elapsed, resumed_from = 0, [], None, 0.0, None
    if resume:
        if work is None:
            raise ResumeError("resume=True needs the work_dir that holds the checkpoints")
        state = load_checkpoint(accelerator, work, recipe)
        start, history, before, elapsed = state["step"], state["history"], state["before"], state["elapsed_s"]
        resumed_from = start
        logger.info("resumed from step %d", start)
    elif work is not None and list_checkpoints(work):
        raise ResumeError(f"{work} holds checkpoints of an earlier run; pass --resume to continue it, or --force "
                          "to discard them and start over")

    if before is None:  # the converted model as given (removed norms fully replaced): the naive figures
        before = evaluate(raw_model, teacher, held_batches, recipe.family, accelerator.device)
        history.append({"step": 0, "eval": before})
    t0 = time.perf_counter() - elapsed

    def state_at(step: int) -> dict:
        return {"step": step, "recipe_fingerprint": recipe.fingerprint(), "recipe": recipe.to_dict(),
                "history": history, "before": before, "elapsed_s": time.perf_counter() - t0}

    bar = None
    if progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=recipe.steps, initial=start, desc="finetune", unit="step", dynamic_ncols=True)
    try:
        for step in range(start, recipe.steps):
            if schedule is not None:
                schedule.apply(replaced, step)
            logs = _train_step(prepared, teacher, optimizer, scheduler, accelerator, recipe, plan, train, tokenizer,
                               step=step, causal=causal, params=params)
            if centered is not None:
                centered.recenter_()
            history.append(logs)
            done = step + 1
            if recipe.eval_every and done % recipe.eval_every == 0 and done < recipe.steps:
                metrics = evaluate(raw_model, teacher, held_batches, recipe.family, accelerator.device)
                history.append({"step": done, "eval": metrics})
                logs = {**logs, "eval": metrics}
                if bar is not None:
                    bar.write(f"step {done}: " + ", ".join(f"{k} {v:.6g}" for k, v in metrics.items()))
            if work is not None and recipe.checkpoint_every and done % recipe.checkpoint_every == 0 \
                    and done < recipe.steps:
                save_checkpoint(accelerator, work, done, state_at(done), keep_checkpoints)
            if bar is not None:
                bar.set_postfix(loss=f"{logs['loss']:.4g}", lr=f"{logs['lr']:.2e}")
                bar.update(1)
            for fn in callbacks:
                fn(done, logs)
    finally:
        if bar is not None:
            bar.close()

    for module in replaced.values():  # the schedule has ended: the replacements alone, as saved
        module.blend = 1.0
    after = evaluate(raw_model, teacher, held_batches, recipe.family, accelerator.device)
    history.append({"step": recipe.steps, "eval": after})
    removal = removal_summary(raw_model, replaced, schedule)
    accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)  # mixed precision patched forward: give it back
    if centered is not None:
        centered.recenter_()
        centered.remove()
    wall = time.perf_counter() - t0
    return FinetuneResult(
        recipe=recipe.to_dict(), steps=recipe.steps, examples_seen=recipe.steps * recipe.effective_batch,
        wall_time_s=wall, before=before, after=after, keep_centered=keep,
        data={"train_source": train.source, "train_examples": len(train), "epochs": plan.epoch(recipe.steps),
              "eval_source": held.source, "eval_examples": len(held)},
        resumed_from_step=resumed_from, history=history, removal=removal,
    )


def _train_step(model, teacher, optimizer, scheduler, accelerator, recipe: Recipe, plan: BatchPlan, train,
                tokenizer, step: int, causal: bool, params: list[nn.Parameter]) -> dict:
    """One optimizer step over ``gradient_accumulation`` micro-batches; returns the step's logs."""
    accum = recipe.gradient_accumulation
    totals: dict[str, float] = {}
    optimizer.zero_grad(set_to_none=True)
    try:
        for micro in range(accum):
            batch = _to(micro_batch(train, plan, step, micro, tokenizer, recipe, accelerator.process_index,
                                    accelerator.num_processes), accelerator.device)
            inputs = _model_inputs(batch)
            sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(model)
            with sync:
                with torch.no_grad():
                    t_out = teacher(**inputs, output_hidden_states=True)
                s_out = model(**inputs, output_hidden_states=True)
                loss, parts = distillation_loss(recipe.loss, s_out, t_out, batch, causal)
                accelerator.backward(loss / accum)
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                totals[k] = totals.get(k, 0.0) + v / accum
        if recipe.optimizer.max_grad_norm:
            totals["grad_norm"] = float(accelerator.clip_grad_norm_(params, recipe.optimizer.max_grad_norm))
        optimizer.step()
        scheduler.step()
    except RuntimeError as exc:
        if _is_oom(exc):
            raise NormswapError(_oom_hint(recipe)) from exc
        raise
    if not math.isfinite(totals["loss"]):
        raise NormswapError(f"the loss became {totals['loss']} at step {step + 1}; lower optimizer.lr (now "
                            f"{recipe.optimizer.lr:g}) or raise schedule.warmup_steps")
    return {"step": step + 1, "lr": scheduler.get_last_lr()[0], **totals}
