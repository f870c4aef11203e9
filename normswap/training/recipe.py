"""Fine-tuning recipes: YAML files parsed into frozen dataclasses with strict keys.

A typo in a recipe (``learning_rate`` for ``lr``) would otherwise silently fall back to a default and waste a
training run, so every unknown key is an error that names it (with the nearest known key), and every value is
checked for type and range before any model is loaded.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import yaml

from normswap.errors import NormswapError


class RecipeError(NormswapError):
    """A recipe file is missing, is not valid YAML, has an unknown key or an invalid value."""


FAMILIES = ("sentence-encoder", "masked-lm", "causal-lm")
TRAINABLE = ("norm-gains", "norms+biases", "all")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class DataSpec:
    """Where the training text comes from and how it becomes examples."""

    #: Training text file; the CLI's ``--text-file`` overrides it.
    text_file: str | None = None
    #: A ``datasets`` id, used when no text file is given (needs the ``datasets`` package and a network).
    dataset: str | None = None
    dataset_config: str | None = None
    dataset_split: str = "train"
    text_column: str = "text"
    #: Held-out text for evaluation; unset: the last ``eval_examples`` lines of the training text are held out
    #: (and never trained on).
    eval_text_file: str | None = None
    eval_examples: int = 256
    #: ``lines``: each example is 1..max_lines_per_example consecutive non-empty lines (encoders, masked LMs);
    #: ``packed``: the text is one token stream cut into seq_len blocks (causal LMs).
    example: typing.Literal["lines", "packed"] = "lines"
    max_lines_per_example: int = 1
    seq_len: int = 128
    #: Masked LMs: fraction of tokens masked (80% [MASK], 10% random, 10% kept); teacher and student see the
    #: same masked input, and the masked positions are the labels of the optional CE loss.
    mlm_probability: float = 0.0


@dataclass(frozen=True)
class OptimizerSpec:
    name: typing.Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    #: Gradient-norm clipping; 0 disables it.
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class ScheduleSpec:
    name: typing.Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    #: Final learning rate as a fraction of ``lr`` (cosine and linear decay).
    min_lr_ratio: float = 0.0


@dataclass(frozen=True)
class LossSpec:
    """Weights of the distillation terms (0 disables a term); the total is their weighted sum."""

    #: KL(teacher || student) on the logits, per token (LMs).
    kl: float = 0.0
    temperature: float = 1.0
    #: Per-layer hidden-state MSE relative to the teacher's mean square, on mean-removed vectors: an intermediate
    #: stream's mean is not the student's to match (the approximate conversion moved it into reader biases).
    hidden_mse: float = 0.0
    #: Relative MSE of the final hidden state, raw (the model's output).
    final_mse: float = 0.0
    #: 1 - cosine of the final hidden state, per token.
    final_cosine: float = 0.0
    #: 1 - cosine of the mean-pooled final hidden state (what sentence encoders are judged on).
    pooled_cosine: float = 0.0
    #: Cross-entropy on labels (masked tokens for masked LMs, next token for causal LMs).
    ce: float = 0.0


@dataclass(frozen=True)
class RemovalSpec:
    """Progressive LayerNorm removal for models converted with ``--to none|dyt`` (see docs/REMOVAL.md)."""

    #: true: every replaced norm starts as the real LayerNorm (λ = 0) and is taken away on the schedule below;
    #: false: the replacements are used as converted (λ = 1) from the first step.
    progressive: bool = False
    #: Groups in removal order, by the norm's name inside its block (``[ln_2, ln_1, ln_f]``); empty: automatic
    #: (later-in-block norms first, norms outside the blocks last).
    order: tuple[str, ...] = ()
    #: Step at which the first norm starts to go.
    start_step: int = 0
    #: Steps between the starts of two consecutive norms.
    gap_steps: int = 0
    #: Steps over which one norm's λ ramps linearly from 0 to 1 (1: switched at once).
    ramp_steps: int = 1


@dataclass(frozen=True)
class Recipe:
    """Everything a fine-tuning run depends on; two runs with equal recipes and inputs are bit-identical."""

    family: typing.Literal["sentence-encoder", "masked-lm", "causal-lm"]
    steps: int
    data: DataSpec = field(default_factory=DataSpec)
    #: Sequences per micro-batch, over all processes together (split between them), so the same recipe means the
    #: same optimisation on one CPU or eight GPUs.
    batch_size: int = 32
    gradient_accumulation: int = 1
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    #: ``norm-gains``: only the swapped norms' gains; ``norms+biases``: all norm parameters and every bias;
    #: ``all``: every parameter.
    trainable: typing.Literal["norm-gains", "norms+biases", "all"] = "all"
    #: Parameters that never train, by name fragment (e.g. ``word_embeddings``: rare tokens' rows get full-size Adam
    #: steps from tiny gradients, noise that the healing then has to undo).
    freeze: tuple[str, ...] = ()
    loss: LossSpec = field(default_factory=LossSpec)
    #: fp32, or bf16/fp16 autocast for the student (the teacher always runs in its own dtype).
    precision: typing.Literal["fp32", "bf16", "fp16"] = "fp32"
    eval_every: int = 0
    checkpoint_every: int = 100
    #: Keep residual writers zero-mean while training (``normswap.keep_centered_``) so an exactly converted model
    #: stays loadable by the stock LayerNorm class; ``auto``: on for exact conversions, off for approximate ones.
    keep_centered: typing.Literal["auto", "true", "false"] = "auto"
    removal: RemovalSpec = field(default_factory=RemovalSpec)
    seed: int = 0
    name: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["optimizer"]["betas"] = list(self.optimizer.betas)
        d["freeze"] = list(self.freeze)
        d["removal"]["order"] = list(self.removal.order)
        return d

    def fingerprint(self) -> str:
        """Hash of every setting that changes the optimisation (resume refuses a different one)."""
        d = self.to_dict()
        d.pop("name")
        d["data"].pop("eval_text_file")
        d["data"].pop("eval_examples")
        d.pop("eval_every")
        d.pop("checkpoint_every")
        if self.removal == RemovalSpec():  # recipes without removal keep the fingerprint they had before it existed
            d.pop("removal")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.gradient_accumulation


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value, tp, where: str):
    """Check/convert one YAML value against a dataclass field type; errors name the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if origin is typing.Literal:
        if isinstance(value, bool):  # YAML reads `true`/`false` as booleans
            value = str(value).lower()
        if value not in args:
            raise RecipeError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise RecipeError(f"{where}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if is_dataclass(tp):
        if value is None:
            return tp()
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        except ValueError:
            raise RecipeError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise RecipeError(f"{where}: unsupported value {value!r} (expected {_type_name(tp)})")


def _build(cls, raw, where: str):
    """Instantiate dataclass ``cls`` from a mapping, refusing unknown keys and missing required ones."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    prefix = f"{where}." if where else ""
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise RecipeError(f"unknown recipe key '{prefix}{key}'{hint}; known keys here: {', '.join(known)}")
    kwargs = {}
    for name, f in known.items():
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], prefix + name)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise RecipeError(f"recipe is missing the required key '{prefix}{name}'")
    return cls(**kwargs)


def validate(recipe: Recipe) -> Recipe:
    """Range and consistency checks that types alone cannot express."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise RecipeError(msg)

    d, o, s, lo = recipe.data, recipe.optimizer, recipe.schedule, recipe.loss
    need(recipe.steps >= 1, f"steps must be >= 1, got {recipe.steps}")
    need(recipe.batch_size >= 1, f"batch_size must be >= 1, got {recipe.batch_size}")
    need(recipe.gradient_accumulation >= 1, f"gradient_accumulation must be >= 1, got {recipe.gradient_accumulation}")
    need(recipe.eval_every >= 0, f"eval_every must be >= 0 (0 = only before and after), got {recipe.eval_every}")
    need(recipe.checkpoint_every >= 0, f"checkpoint_every must be >= 0 (0 = never), got {recipe.checkpoint_every}")
    need(d.seq_len >= 4, f"data.seq_len must be >= 4, got {d.seq_len}")
    need(d.max_lines_per_example >= 1, f"data.max_lines_per_example must be >= 1, got {d.max_lines_per_example}")
    need(d.eval_examples >= 1, f"data.eval_examples must be >= 1, got {d.eval_examples}")
    need(0.0 <= d.mlm_probability < 1.0, f"data.mlm_probability must be in [0, 1), got {d.mlm_probability}")
    need(o.lr > 0, f"optimizer.lr must be > 0, got {o.lr}")
    need(o.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {o.weight_decay}")
    need(all(0 <= b < 1 for b in o.betas), f"optimizer.betas must be in [0, 1), got {list(o.betas)}")
    need(o.max_grad_norm >= 0, f"optimizer.max_grad_norm must be >= 0 (0 = no clipping), got {o.max_grad_norm}")
    need(0 <= s.warmup_steps < recipe.steps or s.warmup_steps == 0,
         f"schedule.warmup_steps ({s.warmup_steps}) must be smaller than steps ({recipe.steps})")
    need(0 <= s.min_lr_ratio <= 1, f"schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
    weights = {k: v for k, v in asdict(lo).items() if k != "temperature"}
    need(all(v >= 0 for v in weights.values()), f"loss weights must be >= 0, got {weights}")
    need(any(v > 0 for v in weights.values()), "the recipe's loss has no term with a weight > 0 (set e.g. loss.kl: 1.0)")
    need(lo.temperature > 0, f"loss.temperature must be > 0, got {lo.temperature}")
    if lo.ce > 0:
        need(recipe.family != "sentence-encoder", "loss.ce needs labels: it applies to masked-lm or causal-lm recipes")
        need(recipe.family != "masked-lm" or d.mlm_probability > 0,
             "loss.ce on a masked-lm recipe needs data.mlm_probability > 0 (the masked tokens are the labels)")
    need(d.mlm_probability == 0 or recipe.family == "masked-lm", "data.mlm_probability applies to masked-lm recipes")
    r = recipe.removal
    need(r.start_step >= 0 and r.gap_steps >= 0, f"removal.start_step and removal.gap_steps must be >= 0, got "
         f"{r.start_step} and {r.gap_steps}")
    need(r.ramp_steps >= 1, f"removal.ramp_steps must be >= 1 (1 = switch at once), got {r.ramp_steps}")
    need(r.progressive or r == RemovalSpec(),
         "removal.order/start_step/gap_steps/ramp_steps only apply with removal.progressive: true")
    return recipe


def recipe_from_dict(raw: dict, name: str = "") -> Recipe:
    """A validated :class:`Recipe` from a mapping (what the YAML file holds)."""
    recipe = _build(Recipe, raw, "")
    if name and not recipe.name:
        recipe = replace(recipe, name=name)
    return validate(recipe)


def _parse_scalar(text: str):
    return yaml.safe_load(text) if text.strip() else None


def apply_overrides(recipe: Recipe, overrides: list[str] | dict) -> Recipe:
    """Return ``recipe`` with ``key.sub=value`` overrides applied (strict keys, values parsed as YAML)."""
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
    raw = recipe.to_dict()
    for key, value in items:
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise RecipeError(f"unknown recipe key '{key}' in override")
            node = node[part]
        node[parts[-1]] = value
    return recipe_from_dict(raw, recipe.name)


def _split_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {text!r} must look like key=value, e.g. steps=200 or optimizer.lr=3e-4")
    return key.strip(), _parse_scalar(value)


def _packaged_recipes() -> Path | None:
    """``normswap/recipes/`` inside an installed package: the wheel maps the checkout's ``recipes/`` there (see
    ``[tool.setuptools.package-dir]`` in pyproject.toml), so names resolve without a checkout. Found through
    importlib.resources so it follows wherever the package was installed."""
    from importlib import resources

    root = resources.files("normswap")
    return Path(str(root)) / "recipes" if isinstance(root, Path) else None


#: Where recipe names (``minilm``) are looked up, first match wins: the recipes shipped in the installed package, a
#: checkout's ``recipes/`` folder (a plain or editable checkout has no copy inside the package), then the current
#: directory's ``recipes/``. Every ``*.yaml`` in these folders is a recipe name.
RECIPE_DIRS = tuple(
    d for d in (_packaged_recipes(), Path(__file__).resolve().parents[2] / "recipes", Path("recipes")) if d is not None
)


def resolve_recipe_path(name_or_path: str | os.PathLike) -> Path:
    """A recipe file from a path, or from a bare name found in ``recipes/`` (``minilm`` → recipes/minilm.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.suffix == "" and path.parent == Path("."):
        for folder in RECIPE_DIRS:
            candidate = folder / f"{path.name}.yaml"
            if candidate.is_file():
                return candidate
    shipped = sorted({p.stem for d in RECIPE_DIRS if d.is_dir() for p in d.glob("*.yaml")})
    raise RecipeError(
        f"recipe {str(name_or_path)!r} not found; pass a YAML file path"
        + (f" or one of the shipped recipes: {', '.join(shipped)}" if shipped else "")
    )


def load_recipe(source: str | os.PathLike | dict | Recipe) -> Recipe:
    """A validated recipe from a :class:`Recipe`, a mapping, a YAML path or a shipped recipe name."""
    if isinstance(source, Recipe):
        return validate(source)
    if isinstance(source, dict):
        return recipe_from_dict(source)
    path = resolve_recipe_path(source)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"recipe {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        raise RecipeError(f"recipe {path} is empty")
    try:
        return recipe_from_dict(raw, path.stem)
    except RecipeError as exc:
        raise RecipeError(f"recipe {path}: {exc}") from None
