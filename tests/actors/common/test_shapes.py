"""The shapes world: the renderer draws what the prompt says, gt_objects match it, reruns are byte-identical."""
from __future__ import annotations

import pytest

from actors.common import shapes
from actors.common.runtime import png_bytes
from actors.prompts import PromptsConfig, load_prompts


def near(pixel, colour, tol=40):
    return all(abs(a - b) <= tol for a, b in zip(pixel, colour))


def cell_centre(cell: int, size: int = 64) -> tuple[int, int]:
    return int((cell % 3 + 0.5) * size / 3), int((cell // 3 + 0.5) * size / 3)


def test_stated_objects_are_drawn_at_their_positions():
    text = "a red circle at the top left, two blue squares and a yellow triangle at the bottom right on a white background"
    objects, bg = shapes.parse_prompt(text)
    assert bg == "white"
    assert objects == [("red circle", 1, 0), ("blue square", 2, None), ("yellow triangle", 1, 8)]
    for seed in range(5):
        img = shapes.render(text, seed)
        assert near(img.getpixel(cell_centre(0)), shapes.COLOURS["red"])
        assert near(img.getpixel(cell_centre(8)), shapes.COLOURS["yellow"])
        # the two unplaced blue squares took two of the free cells; nothing else is blue, nor green
        blue = [c for c in range(9) if near(img.getpixel(cell_centre(c)), shapes.COLOURS["blue"])]
        assert len(blue) == 2 and not {0, 8} & set(blue)
        assert not any(near(p, shapes.COLOURS["green"]) for p in img.getdata())
        assert near(img.getpixel((1, 1)), shapes.BACKGROUNDS["white"], tol=5)


def test_shapes_differ_in_form():
    """A circle leaves its bounding-box corners empty, a square fills them, a triangle fills only the base."""
    for shape, top_corner, bottom_corner in (("circle", False, False), ("square", True, True),
                                             ("triangle", False, True)):
        img = shapes.render(f"a red {shape} at the center on a white background", 0, 192, 192)
        red = [(x, y) for x in range(192) for y in range(192) if near(img.getpixel((x, y)), shapes.COLOURS["red"])]
        x0, x1 = min(x for x, _ in red), max(x for x, _ in red)
        y0, y1 = min(y for _, y in red), max(y for _, y in red)
        assert near(img.getpixel((x0 + 1, y0 + 1)), shapes.COLOURS["red"]) == top_corner, shape
        assert near(img.getpixel((x0 + 1, y1 - 1)), shapes.COLOURS["red"]) == bottom_corner, shape
        assert abs((x1 - x0) - (y1 - y0)) <= 3 * 3


def test_generated_prompts_render_their_gt_objects():
    rows = load_prompts(PromptsConfig(source="shapes", num_prompts=30, seed=3, instructions_per_prompt=3))
    assert len({r["prompt_id"] for r in rows}) == 30
    for row in rows:
        objects, _ = shapes.parse_prompt(row["image_prompt"])
        assert sorted(o for o, _, _ in objects) == row["gt_objects"]
        img = shapes.render(row["image_prompt"], 0)
        colours = {c for c, rgb in shapes.COLOURS.items() if any(near(p, rgb, 25) for p in img.getdata())}
        assert colours == {o.split()[0] for o in row["gt_objects"]}
        assert row["instructions"][0] == shapes.CAPTION_INSTRUCTION and len(row["instructions"]) == 3
        for q in row["instructions"][1:]:
            assert q.endswith(shapes.POPE_SUFFIX) and shapes.object_vocab().asked_object(q) in shapes.CLASSES


def test_same_seed_same_bytes_other_seed_other_image():
    text = shapes.make_prompt(0, 7)["image_prompt"]
    a, b, c = (png_bytes(shapes.render(text, s)) for s in (11, 11, 12))
    assert a == b and a != c
    assert shapes.make_prompt(0, 7) ["image_prompt"] == text   # the generator is seeded too


def test_unparseable_prompt_is_refused():
    with pytest.raises(ValueError, match="shapes prompt"):
        shapes.render("a photo of a dog", 0)


def test_vocab_and_existence_claims():
    vocab = shapes.object_vocab()
    assert len(vocab.classes) == len(shapes.COLOURS) * len(shapes.SHAPES)   # every drawable object, named once
    for c in shapes.CLASSES:                                                 # found by its name, plural too
        assert [cls for _, cls in vocab.find(f"a {c} and two {c}s")] == [c, c], c
    assert vocab.mentions("There are two red circles and a blue square.") == ["red circle", "blue square"]
    q = shapes.existence_question("green triangle")
    assert vocab.asserted(q, "Yes") == ["green triangle"] and vocab.asserted(q, "No") == []


def test_negatives_follow_pope_strategies():
    import random
    gt = ["red circle"]
    freq, cooc = shapes.world_stats()
    popular = shapes.negatives(random.Random(0), gt, "popular", 2)
    assert popular == sorted((c for c in shapes.CLASSES if c not in gt), key=lambda c: -freq[c])[:2]
    adversarial = shapes.negatives(random.Random(0), gt, "adversarial", 1)
    assert adversarial[0] in shapes.COMPANIONS["red circle"]
    assert not set(shapes.negatives(random.Random(0), gt, "random", 11)) & set(gt)


def test_rewards_read_yes_no_answers_and_coverage():
    """A "Yes" to an absent object is a hallucination, a "No" to a present one loses coverage."""
    from actors.rewards import coverage
    vocab = shapes.object_vocab()
    gt = {"red circle", "blue square"}
    absent_q, present_q = shapes.existence_question("green triangle"), shapes.existence_question("red circle")
    assert [o for o in vocab.asserted(absent_q, "Yes") if o not in gt] == ["green triangle"]
    assert vocab.asserted(absent_q, "No, there is no green triangle.") == []
    claims = [vocab.asserted(present_q, a) for a in ("Yes", "No")]
    assert coverage(claims, gt, vocab.asked_object(present_q)) == [1.0, 0.0]
    captions = ["There is a red circle.", "There is a red circle and a blue square."]
    assert coverage([vocab.asserted("Describe this image.", c) for c in captions], gt, None) == [0.5, 1.0]
