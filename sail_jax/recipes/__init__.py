"""Recipes: what ``sail-jax --config=...`` runs, chosen by ``config.recipe``."""

from sail_jax.errors import UserError
from sail_jax.recipes import offline, sail, score_pairs

RECIPES = {"score_pairs": score_pairs.run, "sail": sail.run, **{name: offline.run for name in offline.RECIPES}}


def get_recipe(name: str):
    if name not in RECIPES:
        raise UserError(f"config.recipe={name!r} is unknown; valid: {sorted(RECIPES)}")
    return RECIPES[name]
