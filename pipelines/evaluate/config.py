"""`eval:` in a run config: base vs adapter on held-out images of the run's own world after `run` trains."""
from __future__ import annotations

from dataclasses import dataclass, field

from actors.common.errors import Problem
from actors.common.objects import POPE_STRATEGIES as STRATEGIES


@dataclass
class WorldEvalConfig:
    world: str = "shapes"              # shapes | generated (the run's prompt generator and image stage)
    num_images: int = 60               # held-out images asked about
    seed: int | None = None            # default: prompts.seed (the "eval" namespace keeps it held out)
    # test: the held-out images results are reported on; validation: other held-out images, for choosing
    # settings without looking at the test images.
    split: str = "test"
    # POPE's ways of drawing absent objects: random, popular, adversarial.
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    questions_per_image: int = 3       # POPE's 3 present + 3 absent objects per image and strategy
    caption_tokens: int = 40           # longest caption, in tokens (for CHAIR)
    batch_size: int = 32               # questions per generate call
    model: str | None = None           # default: train.model
    adapter: str | None = None         # default: <output_dir>/train/adapter

    def validate(self) -> list[Problem]:
        errs = []
        if self.world not in ("shapes", "generated"):
            errs.append(Problem("eval.world", "must be 'shapes' or 'generated' (worlds whose objects are known)"))
        if self.split not in ("test", "validation"):
            errs.append(Problem("eval.split", "must be 'test' or 'validation'"))
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad or not self.strategies:
            errs.append(Problem("eval.strategies", f"choose from {', '.join(STRATEGIES)}"))
        if self.num_images < 1 or self.questions_per_image < 1 or self.batch_size < 1 or self.caption_tokens < 1:
            errs.append(Problem("eval", "num_images, questions_per_image, batch_size and caption_tokens must be >= 1"))
        return errs
