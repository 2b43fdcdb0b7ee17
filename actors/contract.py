"""The column contract: each stage declares the columns it needs and adds; checked when a pipeline is built."""
from __future__ import annotations

PROMPT_COLUMNS = ("prompt_id", "image_prompt", "instructions", "gt_objects")
# The pairs dataset every later job (train, eval, export) reads.
PAIR_COLUMNS = ("pair_id", "prompt_id", "image", "image_prompt", "question", "chosen", "rejected",
                "chosen_reward", "rejected_reward", "margin", "chosen_model", "rejected_model", "seed",
                "guidance_scale", "image_score", "gt_objects")


class ContractError(Exception):
    pass


def check_chain(source_columns, stages) -> list[str]:
    """Walk the stages in order; a stage that needs a column nobody added is an error naming both."""
    have = list(source_columns)
    for stage in stages:
        name = getattr(stage, "__name__", type(stage).__name__)
        missing = [c for c in getattr(stage, "REQUIRES", ()) if c not in have]
        if missing:
            raise ContractError(f"stage {name} needs column(s) {missing} that no earlier stage adds "
                                f"(available: {have})")
        have = [c for c in have if c not in getattr(stage, "DROPS", ())]
        have += [c for c in getattr(stage, "ADDS", ()) if c not in have]
    return have
