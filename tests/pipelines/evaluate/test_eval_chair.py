
import pytest

from actors.common.errors import InputError
from pipelines.evaluate.chair import chair


@pytest.fixture(scope="module")
def vocab(coco_vocab):
    return coco_vocab


def test_hot_dog_is_not_a_dog(vocab):
    assert chair(["a hot dog on a plate"], [[]], vocab) == {
        "chair_i": 1.0, "chair_s": 1.0, "n": 1, "mentioned": 1, "hallucinated": 1}
    assert chair(["a hot dog on a plate"], [["hot dog"]], vocab)["hallucinated"] == 0
    assert chair(["a hot dog on a plate"], [["dog"]], vocab)["hallucinated"] == 1


def test_hand_computed(vocab):
    captions = ["a hot dog on a plate",               # hot dog: hallucinated
                "a dog and a cat on a couch",         # dog ok, cat hallucinated, couch ok (gt given as "sofa")
                "two dogs and another dog",           # two mentions, both ok (gt given as plural)
                "a man riding a motor bike"]          # person ok, motorcycle ok
    gt = [[], ["dog", "sofa"], ["Dogs"], ["person", "motorcycle"]]
    assert chair(captions, gt, vocab) == {"chair_i": 2 / 8, "chair_s": 2 / 4, "n": 4, "mentioned": 8,
                                          "hallucinated": 2}


def test_repeated_hallucination_counts_each_mention(vocab):
    # As the reference compute_chair: CHAIR_i counts mentions, not unique objects.
    m = chair(["a cat and a cat and a dog", "a dog"], [["dog"], ["dog"]], vocab)
    assert (m["mentioned"], m["hallucinated"], m["chair_i"], m["chair_s"]) == (4, 2, 0.5, 0.5)


def test_zero_denominators(vocab):
    assert chair(["a sunny day at the beach"], [["person"]], vocab) == {
        "chair_i": 0.0, "chair_s": 0.0, "n": 1, "mentioned": 0, "hallucinated": 0}
    assert chair([], [], vocab) == {"chair_i": 0.0, "chair_s": 0.0, "n": 0, "mentioned": 0, "hallucinated": 0}


def test_errors(vocab):
    with pytest.raises(InputError, match="2 captions but 1"):
        chair(["a", "b"], [[]], vocab)
    with pytest.raises(InputError) as e:
        chair(["a dog", "a cat"], [["dog"], ["cat", "spaceship"]], vocab)
    assert (e.value.row, e.value.field) == (2, "gt_objects") and "'spaceship'" in str(e.value)
