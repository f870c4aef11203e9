"""Heal a converted model by distilling its original into it: recipes, the accelerate loop, keep-centred training.

``normswap.finetune(model, teacher, recipe, ...)`` is the Python entry point; ``normswap finetune`` the command; and
``python -m normswap.training`` (or ``accelerate launch -m normswap.training``) runs the command's arguments.
"""

from normswap.training.keep_centered import CenteredWriters, KeepCenteredCallback, keep_centered_
from normswap.training.loop import FinetuneResult, check_compatible, check_same_tokenizer, finetune
from normswap.training.recipe import Recipe, RecipeError, apply_overrides, load_recipe

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
