"""Training recipes: how closely training follows the authors' public code (Zheng222/DMFN).

"paper" (the default) takes the authors' code wherever the paper is silent (VGG input
normalisation, initialisation, when the learning rate decays), the paper's formula where their
code contradicts it (the centroid grid), and the intent of their own comment where the code is
off by one (the rectangle jitter). "authors" follows their code in all of these, for reproducing
their numbers or fine-tuning from their checkpoint on equal terms. The README's "Departures from
the authors' code" table lists every difference.
"""
RECIPES = ("paper", "authors")


def check_recipe(recipe: str) -> str:
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    return recipe
