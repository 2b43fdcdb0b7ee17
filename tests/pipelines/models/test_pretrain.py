"""The shapes base's SFT data: a share of its absent objects are hard for a colour-only reader (issue 18)."""
from __future__ import annotations

import random


def test_shape_negatives_ask_about_an_absent_shape_in_a_present_colour():
    from actors.common import shapes
    from pipelines.models.pretrain import sft_example, shape_negative_pool
    assert shape_negative_pool(["red circle", "blue square"]) == [
        "red square", "red triangle", "blue circle", "blue triangle"]
    assert shape_negative_pool(["red circle", "red square", "red triangle"]) == []   # falls back to uniform

    def negatives(share):
        rng, out = random.Random(0), []
        for i in range(300):
            _, q, a = sft_example(rng, i, "test", 0.0, share)
            if a == "No":
                gt = shapes.make_prompt(0, i, "test")["gt_objects"]
                obj = q.split("Is there a ")[1].split(" in the image")[0]
                assert obj not in gt
                out.append(obj in shape_negative_pool(gt))
        return out

    hard, uniform = negatives(1.0), negatives(0.0)
    assert len(hard) > 100 and sum(hard) / len(hard) > 0.95     # all but the images whose colours are all taken
    assert sum(uniform) / len(uniform) < 0.6                    # uniform negatives: mostly another colour
