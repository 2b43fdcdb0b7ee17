"""COCO object vocabulary and object-mention extraction (CHAIR-style), dependency-free.

Used by the hallucination-penalty reward stage (objects an answer mentions that are not in the image) and by
the CHAIR metric. It follows the CHAIR reference (Rohrbach et al. 2018, as adapted by RLHF-V's Object HalBench,
`eval/eval_gpt_obj_halbench.py`): lower-case, tokenise, lemmatise nouns, merge multi-word phrases first so that
"hot dog" is not a dog and "baby elephant" is not a person, then map synonyms to their class. The reference
uses nltk's WordNet lemmatiser; we use small suffix rules checked against the vocabulary instead, which gives
the same result for every vocabulary word without shipping WordNet to each Ray worker.
"""
from __future__ import annotations

import re
from pathlib import Path

from actors.common.errors import InputError
from actors.common.files import read_user_lines

# The CHAIR reference vocabulary (80 COCO classes with synonyms), shipped with the package: data/README.md.
COCO_SYNONYMS = Path(__file__).resolve().parent / "data" / "synonyms_refine.txt"

_TOKEN = re.compile(r"[a-z0-9']+")
_ENTRY = re.compile(r"[a-z0-9']+( [a-z0-9']+)*")

# Irregular plurals the suffix rules cannot reach (only those that can lead to a vocabulary word matter).
_IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "person", "mice": "mouse",
              "geese": "goose", "oxen": "ox", "feet": "foot", "teeth": "tooth", "knives": "knife",
              "policemen": "policeman", "gentlemen": "gentleman", "servicemen": "serviceman"}

# Extra phrases of the reference implementation: "baby cat" is a cat, not a person ("baby" is a person
# synonym); "passenger train" is a train, not a person; "toilet seat" is a toilet, not a chair. Phrases mapped
# to None are swallowed so that their words do not count ("train track" is no train).
_ANIMALS = ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub"]
_EXTRA_PHRASES: dict[str, str | None] = {
    **{f"{age} {a}": a for a in _ANIMALS for age in ("baby", "adult")},
    "passenger jet": "jet", "passenger train": "train",
    "bow tie": "tie", "toilet seat": "toilet", "home plate": None, "train track": None,
}


class ObjectVocab:
    """The object classes (file order) and a synonym phrase -> class map (each class maps to itself)."""

    def __init__(self, entries: list[list[str]]):
        self.entries = [list(e) for e in entries]     # kept for to_dict(): the cheapest faithful form
        self.classes = [e[0] for e in self.entries]
        self.synonyms = {s: e[0] for e in self.entries for s in e}
        # Phrase table used for matching: synonyms plus the reference's extra phrases, where they resolve.
        self._phrases: dict[str, str | None] = {}
        for phrase, target in _EXTRA_PHRASES.items():
            if target is None:
                self._phrases[phrase] = None
            elif target in self.synonyms:
                self._phrases[phrase] = self.synonyms[target]
        self._phrases.update(self.synonyms)
        self._max_words = max(len(p.split(" ")) for p in self._phrases)
        self._words = {w for p in self._phrases for w in p.split(" ")}

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> "ObjectVocab":
        return cls.from_lines(read_user_lines(path, "object vocabulary"), file=str(path))

    @classmethod
    def from_lines(cls, lines, *, file: str | None = None) -> "ObjectVocab":
        """Lines of "class, syn1, syn2, ..."; the reference format is `synonyms_refine.txt`."""
        entries, owner = [], {}
        for row, line in enumerate(lines, start=1):
            if not line.strip():
                raise InputError("empty line (expected 'class, synonym, ...')", file=file, row=row)
            names = [" ".join(n.lower().split()) for n in line.split(",")]
            for n in names:
                if not _ENTRY.fullmatch(n):
                    raise InputError(f"malformed entry {n!r}: expected words of letters, digits or "
                                     "apostrophes, separated by commas", file=file, row=row)
            for n in names:                       # a phrase may repeat within its line (the file does)
                if owner.setdefault(n, names[0]) != names[0]:
                    raise InputError(f"{n!r} is listed for both {owner[n]!r} and {names[0]!r}", file=file, row=row)
            if names[0] in (e[0] for e in entries):
                raise InputError(f"class {names[0]!r} is listed twice", file=file, row=row)
            entries.append(list(dict.fromkeys(names)))
        if not entries:
            raise InputError("object vocabulary is empty", file=file)
        return cls(entries)

    def to_dict(self) -> dict:
        return {"entries": [list(e) for e in self.entries]}

    @classmethod
    def from_dict(cls, d: dict) -> "ObjectVocab":
        return cls(d["entries"])

    def __reduce__(self):
        # Pickle only the entries (a few KB); derived tables are rebuilt on the Ray worker.
        return (self.__class__, (self.entries,))

    # ---- matching -----------------------------------------------------------------------------------------
    def _normalise(self, token: str) -> str:
        """Singularise a token, preferring forms that are vocabulary words ("buses"->"bus", "skis" stays)."""
        token = token.strip("'")
        if token.endswith("'s"):
            token = token[:-2]
        if token in self._words or len(token) < 3:
            return token
        cands = [_IRREGULAR[token]] if token in _IRREGULAR else []
        if token.endswith("ves"):
            cands += [token[:-3] + "f", token[:-3] + "fe"]          # knives, calves, shelves
        if token.endswith("ies"):
            cands += [token[:-3] + "y", token[:-1]]                 # puppies, ties/doggies
        if token.endswith("es"):
            cands += [token[:-2]]                                   # buses, benches, sandwiches, glasses
        if token.endswith("s") and not token.endswith("ss"):
            cands += [token[:-1]]                                   # dogs, bikes
        for c in cands:
            if c in self._words:
                return c
        return token

    def tokens(self, text: str) -> list[str]:
        return [self._normalise(t) for t in _TOKEN.findall(text.lower().replace("\u2019", "'"))]

    def find(self, text: str) -> list[tuple[str, str]]:
        """Every object mention as (phrase, class), in order, repeats kept (CHAIR_i counts each mention)."""
        words = self.tokens(text)
        found, i = [], 0
        while i < len(words):
            for n in range(min(self._max_words, len(words) - i), 0, -1):   # longest phrase first
                phrase = " ".join(words[i:i + n])
                if phrase in self._phrases:
                    if self._phrases[phrase] is not None:
                        found.append((phrase, self._phrases[phrase]))
                    i += n
                    break
            else:
                i += 1
        # Reference rule: with a toilet in the caption, "seat" is the toilet's seat, not a chair.
        if any(c == "toilet" for _, c in found):
            found = [(p, c) for p, c in found if p != "seat"]
        return found

    def mentions(self, text: str) -> list[str]:
        """Classes mentioned in `text`, unique, in order of first appearance."""
        return list(dict.fromkeys(c for _, c in self.find(text)))

    def canonical(self, name: str) -> str | None:
        """The class of an object name given as a class or synonym (any case, plural ok); None if unknown."""
        key = " ".join(name.lower().split())
        if key in self.synonyms:
            return self.synonyms[key]
        key = " ".join(self.tokens(name))
        return self._phrases.get(key)

    # ---- answers to existence questions ---------------------------------------------------------------------
    def asked_object(self, question: str) -> str | None:
        """The class a yes/no existence question asks about ("Is there a dog in the image?"), else None."""
        m = _EXISTENCE.match(question.strip())
        return self.canonical(m.group(1)) if m else None

    def asserted(self, question: str, answer: str) -> list[str]:
        """Classes an answer claims are in the image: its mentions, where a "yes" to an existence question
        claims the asked object and a "no" takes it back ("No, there is no dog" claims no dog)."""
        found = self.mentions(answer)
        asked = self.asked_object(question)
        if asked is None:
            return found
        rest = [c for c in found if c != asked]
        return rest if says_no(answer) else [asked] + rest


# "Is there a/an/any X in the image/picture/photo?" (POPE's wording and its close variants).
_EXISTENCE = re.compile(r"(?:is|are) there (?:an? |any )?(.+?) in (?:the|this) (?:image|picture|photo)\b",
                        re.IGNORECASE)


def is_existence_question(question: str) -> bool:
    """"Is there a X in the image?" and its close variants, whatever the vocabulary knows of X."""
    return _EXISTENCE.match(question.strip()) is not None


# POPE's existence question, worded as its files have it ("a" even before vowels), and its three ways of
# drawing the absent objects it asks about.
EXISTENCE_QUESTION = "Is there a {} in the image?"
POPE_STRATEGIES = ("random", "popular", "adversarial")


def pope_negatives(rng, gt, absent, strategy: str, k: int, freq=None, cooc=None) -> list[str]:
    """Up to k of the `absent` objects, drawn as POPE does: uniformly ("random"), the most frequent in the
    world ("popular", by `freq`), or those co-occurring most with the image's objects `gt` ("adversarial", by
    `cooc[(a, b)]`). Ties are broken by a shuffle with `rng`, so a seed fixes the draw."""
    absent = list(absent)
    rng.shuffle(absent)   # the tie-break: sorted() below is stable
    if strategy == "random":
        return absent[:k]
    if strategy == "popular":
        return sorted(absent, key=lambda c: -freq.get(c, 0))[:k]
    return sorted(absent, key=lambda c: -sum(cooc.get((g, c), 0) for g in gt))[:k]


# LLaVA-1.5's POPE prompt suffix (llava_pope_test.jsonl carries it after a newline): the evaluation asks with
# it, and the shapes world trains and samples with it.
POPE_SUFFIX = "\nAnswer the question using a single word or phrase."


def says_no(answer: str) -> bool:
    """The official POPE answer rule (pipelines/evaluate/pope.py), kept identical so that the reward and the
    benchmark agree on what a "no" is: first sentence, commas dropped, a token `No`, `no` or `not`."""
    words = answer.split(".")[0].replace(",", "").split(" ")
    return "No" in words or "no" in words or "not" in words
