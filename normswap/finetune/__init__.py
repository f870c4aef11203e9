"""Heal a converted model by distilling its original into it: recipes, the accelerate loop, keep-centred training.

``normswap.finetune(model, teacher, recipe, ...)`` is the Python entry point; ``normswap finetune`` the command; and
``python -m normswap.finetune`` (or ``accelerate launch -m normswap.finetune``) runs the command's arguments.
"""

from normswap.finetune.keep_centered import CenteredWriters, KeepCenteredCallback, keep_centered_
from normswap.finetune.loop import FinetuneResult, check_compatible, check_same_tokenizer, finetune
from normswap.finetune.recipe import Recipe, RecipeError, apply_overrides, load_recipe

__all__ = [
    "CenteredWriters",
    "FinetuneResult",
    "KeepCenteredCallback",
    "Recipe",
    "RecipeError",
    "apply_overrides",
    "check_compatible",
    "check_same_tokenizer",
    "finetune",
    "keep_centered_",
    "load_recipe",
]
