import pickle

import pytest

from actors.common.errors import InputError
from actors.common.objects import ObjectVocab


@pytest.fixture(scope="module")
def vocab(coco_vocab):
    return coco_vocab


def test_real_file_loads_80_classes(vocab):
    # Published facts: COCO's 80 classes in their order, with the synonyms of CHAIR's synonyms_refine.txt.
    assert len(vocab.classes) == 80
    assert vocab.classes[:3] == ["person", "bicycle", "car"]
    assert vocab.classes[-1] == "toothbrush"
    assert vocab.synonyms["person"] == "person"
    assert vocab.synonyms["motor bike"] == "motorcycle"
    assert vocab.synonyms["iphone"] == "cell phone"        # synonyms are lower-cased


@pytest.mark.parametrize("text, expected", [
    ("A hot dog on a plate.", ["hot dog"]),                 # not "dog"
    ("Two dogs chase three buses", ["dog", "bus"]),
    ("knives, forks and spoons", ["knife", "fork", "spoon"]),
    ("The men and women, and their children", ["person"]),
    ("Teddy bears under traffic lights near motor bikes", ["teddy bear", "traffic light", "motorcycle"]),
    ("wine glasses on the dining table", ["wine glass", "dining table"]),
    ("a baby elephant", ["elephant"]),                      # "baby" alone would be a person
    ("a passenger train on the train tracks", ["train"]),
    ("a toilet with its seat up", ["toilet"]),              # a toilet's seat is not a chair
    ("a seat by the window", ["chair"]),
    ("a girl's kittens", ["person", "cat"]),
    ("ties, skis and a pair of scissors", ["tie", "skis", "scissors"]),
    ("puppies and ponies", ["dog", "horse"]),
    ("A DOG. a Dog! dogs", ["dog"]),                        # unique, case-insensitive
    ("glasses and a hotdog", []),                           # no vocabulary word
    ("", []),
])
def test_mentions(vocab, text, expected):
    assert vocab.mentions(text) == expected


def test_find_keeps_repeats_and_order(vocab):
    assert vocab.find("a dog, a cat and another dog") == [("dog", "dog"), ("cat", "cat"), ("dog", "dog")]
    assert vocab.find("a hot dog") == [("hot dog", "hot dog")]


def test_canonical(vocab):
    assert vocab.canonical("Dogs") == "dog"
    assert vocab.canonical("motor bike") == "motorcycle"
    assert vocab.canonical("sofa") == "couch"
    assert vocab.canonical("hot dog") == "hot dog"
    assert vocab.canonical("spaceship") is None
    assert vocab.canonical("train track") is None


def test_pickle_and_dict_round_trip(vocab):
    for copy in (pickle.loads(pickle.dumps(vocab)), ObjectVocab.from_dict(vocab.to_dict())):
        assert copy.classes == vocab.classes and copy.synonyms == vocab.synonyms
        assert copy.mentions("a hot dog and two cats") == ["hot dog", "cat"]
    assert len(pickle.dumps(vocab)) < 10_000


def test_from_lines_small_vocab():
    v = ObjectVocab.from_lines(["dog, puppy", "hot dog", "person, man, baby, passenger"])
    assert v.classes == ["dog", "hot dog", "person"]
    assert v.mentions("a baby dog next to a man eating hot dogs") == ["dog", "person", "hot dog"]
    # Extra reference phrases only apply where their class exists: no "train" here.
    assert v.mentions("a passenger train") == ["person"]


@pytest.mark.parametrize("lines, row, text", [
    (["dog, puppy", ""], 2, "empty line"),
    (["dog, puppy", "cat, , kitten"], 2, "malformed entry ''"),
    (["t-shirt, shirt"], 1, "malformed entry 't-shirt'"),
    (["dog, puppy", "cat, puppy"], 2, "'puppy' is listed for both 'dog' and 'cat'"),
    (["dog", "cat", "dog, hound"], 3, "class 'dog' is listed twice"),
])
def test_from_lines_errors(lines, row, text):
    with pytest.raises(InputError) as e:
        ObjectVocab.from_lines(lines, file="vocab.txt")
    assert e.value.file == "vocab.txt" and e.value.row == row
    assert text in str(e.value) and str(e.value).startswith(f"vocab.txt, row {row}: ")


def test_from_file_errors(tmp_path):
    with pytest.raises(InputError, match="cannot read object vocabulary") as e:
        ObjectVocab.from_file(tmp_path / "missing.txt")
    assert e.value.file.endswith("missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(InputError, match="empty"):
        ObjectVocab.from_file(empty)
    bad = tmp_path / "bad.txt"
    bad.write_text("dog, puppy\n\ncat\n")
    with pytest.raises(InputError) as e:
        ObjectVocab.from_file(bad)
    assert (e.value.file, e.value.row) == (str(bad), 2)
