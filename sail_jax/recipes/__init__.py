"""Recipes: what ``sail-jax --config=...`` runs, chosen by ``config.recipe``."""

from sail_jax.recipes import score_pairs

RECIPES = {"score_pairs": score_pairs.run}


def get_recipe(name: str):
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid: {sorted(RECIPES)}")
    return RECIPES[name]
