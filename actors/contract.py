"""The stage list and the column contract: each stage declares the columns it needs and adds, and the chain
built from `STAGES` is checked against them when a pipeline is built."""
from __future__ import annotations

from dataclasses import dataclass

from actors.common.errors import ContractError
from actors.images import ImageSynthesis
from actors.pairs import PairBuilder
from actors.prompts import QuestionExpander
from actors.rewards import RewardScorer
from actors.sampling import AnswerSampler
from actors.select import ImageSelection

PROMPT_COLUMNS = ("prompt_id", "image_prompt", "instructions", "gt_objects")
# The pairs dataset every later job (train, eval, export) reads.
PAIR_COLUMNS = ("pair_id", "prompt_id", "image", "image_prompt", "question", "chosen", "rejected",
                "chosen_reward", "rejected_reward", "margin", "chosen_model", "rejected_model", "seed",
                "guidance_scale", "image_score", "gt_objects")


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


@dataclass(frozen=True)
class Stage:
    """One step of the generation chain: its class, the run-config section that configures it, the pool that
    schedules it, and the cheap row-wise step that rides in the same actor after it."""
    pool: str                          # pools.<key>; also the key a stand-in replaces
    cls: type
    config: str                        # RunConfig section; a list section (samplers) gives one stage each
    then: type | None = None           # row-wise step run on the output in the same actor
    then_config: str | None = None     # RunConfig section handed to `then` as cfg
    then_also: tuple[str, ...] = ()    # further RunConfig sections handed to `then`, each by its own name
    needs_vocab: bool = False

    def then_kwargs(self, cfg) -> dict:
        """Constructor arguments of `then` from the run config."""
        kwargs = {"cfg": getattr(cfg, self.then_config)} if self.then_config else {}
        return {**kwargs, **{name: getattr(cfg, name) for name in self.then_also}}


STAGES = (
    Stage("images", ImageSynthesis, "images"),
    Stage("selection", ImageSelection, "selection", then=QuestionExpander),
    Stage("sampling", AnswerSampler, "samplers"),
    # The last step of the chain: PairBuilder scales `image` to images.store_size for storage.
    Stage("rewards", RewardScorer, "rewards", then=PairBuilder, then_config="pairs", then_also=("images",),
          needs_vocab=True),
)
