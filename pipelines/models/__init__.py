"""`synthalign make-tiny`: tiny random-weight models, twins of the paper's models, the shapes-world LLaVA."""
from __future__ import annotations

RECIPES = ("tiny", "paper", "shapes")


def build_recipe(recipe: str, out_dir, seed: int = 0) -> dict:
    """Build (or reuse) a recipe's models under out_dir; returns name -> folder."""
    if recipe == "shapes":   # a small LLaVA pretrained to see the shapes world (a few minutes on CPU)
        from pipelines.models.pretrain import make_shapes_base
        return {"llava": make_shapes_base(out_dir, seed=seed)}
    if recipe == "paper":
        from pipelines.models.twins import make_twins
        return make_twins(out_dir, seed)
    from pipelines.models.tiny import make_tiny
    return make_tiny(out_dir, seed)
