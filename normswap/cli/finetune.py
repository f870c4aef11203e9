"""``normswap finetune OUT --teacher SRC --recipe recipes/NAME.yaml --text-file F -o HEALED``: heal a converted model.

The student is a ``normswap convert`` output, loaded with its RMSNorms; the teacher is the original. Training state
goes to a work folder beside the output (``HEALED.work``) so a killed run continues with ``--resume``; the output
folder itself is written once, atomically, at the end, with the conversion metadata plus a ``finetune`` block.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("student", metavar="OUT", help="a `normswap convert` output folder (the model to heal)")
    p.add_argument("--teacher", required=True, metavar="SRC",
                   help="the original model it was converted from (hub id or local folder)")
    p.add_argument("--recipe", required=True, help="recipe YAML (e.g. recipes/minilm.yaml) or a shipped recipe name")
    p.add_argument("--text-file", metavar="F", help="training text (overrides data.text_file in the recipe)")
    p.add_argument("--eval-text-file", metavar="F",
                   help="held-out evaluation text (default: the recipe's, else the tail of the training text)")
    p.add_argument("-o", "--output", required=True, metavar="HEALED", help="output folder for the healed model")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set steps=200 --set optimizer.lr=3e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the work folder")
    p.add_argument("--work-dir", help="checkpoint folder (default: HEALED.work beside the output)")
    p.add_argument("--keep-work-dir", action="store_true", help="keep the checkpoints after a successful run")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep (default 2)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output folder and discard checkpoints of an earlier run")
    p.add_argument("--dtype", default=None, help="dtype of the saved weights (default: as trained, float32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the fine-tuning report as JSON")
    p.set_defaults(func=run, interrupted_hint=" (continue with --resume)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="heal a converted model by distilling the original into it",
        description="Fine-tune a normswap output against the original model (knowledge distillation) following a "
        "recipe, with checkpoints and --resume; writes the healed model and a before/after report.",
    )
    add_arguments(p)


def default_work_dir(output: Path) -> Path:
    return output.with_name(output.name + ".work")


def run(args: argparse.Namespace) -> int:
    import normswap
    from normswap.assets import resolve_model
    from normswap.checkpoint import load_source
    from normswap.errors import NormswapError, OutputExistsError
    from normswap.outputs import check_output_not_source, probe_output_location
    from normswap.training import apply_overrides, check_same_tokenizer, load_recipe
    from normswap.training.loop import list_checkpoints, make_accelerator

    recipe = load_recipe(args.recipe)
    if args.overrides:
        recipe = apply_overrides(recipe, args.overrides)
    out = Path(args.output).expanduser().resolve()
    work = Path(args.work_dir).expanduser().resolve() if args.work_dir else default_work_dir(out)
    student_dir = Path(resolve_model(args.student)).resolve()
    if not student_dir.is_dir():
        raise NormswapError(f"the student must be a local `normswap convert` output folder; {args.student} is not one")
    teacher = resolve_model(args.teacher)
    for folder, what in ((out, "output folder"), (work, "work folder")):  # --force deletes both: never an input
        check_output_not_source(folder, student_dir, role="student", what=what)
        check_output_not_source(folder, teacher, role="teacher", what=what)
    check_output_not_source(work, out, role="output", what="work folder")
    probe_output_location(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise OutputExistsError(f"output folder {out} exists and is not empty; choose another path or pass --force")
    for f in (args.text_file, args.eval_text_file):
        if f and not Path(f).is_file():
            raise NormswapError(f"text file {f} does not exist")
    if args.force and not args.resume and work.exists():
        shutil.rmtree(work)

    accelerator = make_accelerator(recipe)
    main = accelerator.is_main_process
    say = print if main else (lambda *a, **k: None)
    say(f"recipe {recipe.name or args.recipe}: {recipe.family}, {recipe.steps} steps x {recipe.effective_batch} "
        f"sequences, trainable={recipe.trainable}, precision={recipe.precision}")
    say(f"loading student {student_dir} and teacher {teacher}")
    student = normswap.load(student_dir)
    meta = dict(student.config.normswap)
    teacher_src = load_source(teacher, dtype="float32")
    student_tok = _student_tokenizer(student_dir)
    check_same_tokenizer(student_tok, teacher_src.tokenizer)
    tokenizer = student_tok or teacher_src.tokenizer
    if args.resume and not list_checkpoints(work):
        raise NormswapError(f"--resume: no complete checkpoint in {work}; run without --resume to start")
    say(f"checkpoints: {work} (every {recipe.checkpoint_every} steps; a killed run continues with --resume)")

    result = normswap.finetune(
        student, teacher_src.model, recipe, tokenizer=tokenizer, text_file=args.text_file,
        eval_text_file=args.eval_text_file, work_dir=work, resume=args.resume,
        keep_checkpoints=args.keep_checkpoints, progress=not args.no_progress, accelerator=accelerator,
    )
    model = accelerator.unwrap_model(student)
    if main:
        meta["finetune"] = {**result.metadata(), "teacher": args.teacher, "recipe_file": str(args.recipe)}
        model.config.normswap = meta
        report = json.dumps(result.to_dict(), indent=1, default=str)
        path = normswap.save(model, out, tokenizer=tokenizer, source_dir=student_dir, force=args.force,
                             dtype=args.dtype, extra_files={"finetune_report.json": report})
        print(result.summary())
        if args.json:
            print(report)
        print(f"saved {path}")
        if not args.keep_work_dir:
            shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    return 0


def _student_tokenizer(path: Path):
    """The tokenizer saved with the student, read with its stock config: an approximate output's config names a
    remote-code model type, which would otherwise make transformers ask to run that code."""
    import transformers

    from normswap.publish import load_output_config

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), config=load_output_config(path))
    except Exception:  # noqa: BLE001 - the teacher's tokenizer is used instead
        return None


def build_parser() -> argparse.ArgumentParser:
    from normswap.cli import Parser

    parser = Parser(
        prog="python -m normswap.training",
        description="Heal a normswap output by distilling the original model into it (the `normswap finetune` "
        "command; also runs under `accelerate launch -m normswap.training ...`).",
    )
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m normswap.training`` / ``accelerate launch -m normswap.training``."""
    import logging

    from normswap.cli import run_command

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    return run_command(args)
