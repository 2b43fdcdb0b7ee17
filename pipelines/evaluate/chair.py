"""CHAIR (Rohrbach et al. 2018): object hallucination in captions against ground-truth COCO objects.

Counting follows the reference `compute_chair` (also in RLHF-V's Object HalBench): CHAIR_i counts every
object mention, repeats included ("a dog next to another dog" is two mentions), over all captions;
CHAIR_s is the share of captions with at least one hallucinated mention.
"""
from __future__ import annotations

from actors.common.errors import InputError
from actors.common.objects import ObjectVocab


def chair(captions: list[str], gt_objects: list[list[str]], vocab: ObjectVocab) -> dict:
    """CHAIR_i / CHAIR_s for captions paired with their image's objects (class names or synonyms).

    Returns {"chair_i", "chair_s", "n" (captions), "mentioned" (object mentions), "hallucinated" (mentions
    of objects not in the image)}. Zero denominators give 0.0.
    """
    if len(captions) != len(gt_objects):
        raise InputError(f"{len(captions)} captions but {len(gt_objects)} ground-truth object lists")
    mentioned = hallucinated = bad_captions = 0
    for i, (caption, objects) in enumerate(zip(captions, gt_objects)):
        gt = set()
        for name in objects:
            cls = vocab.canonical(name)
            if cls is None:
                # A typo here would silently turn every mention of that object into a hallucination.
                raise InputError(f"unknown object {name!r}: not a class or synonym in the object vocabulary",
                                 row=i + 1, field="gt_objects")
            gt.add(cls)
        found = vocab.find(caption)
        wrong = sum(1 for _, cls in found if cls not in gt)
        mentioned += len(found)
        hallucinated += wrong
        bad_captions += wrong > 0
    n = len(captions)
    return {"chair_i": hallucinated / mentioned if mentioned else 0.0,
            "chair_s": bad_captions / n if n else 0.0,
            "n": n, "mentioned": mentioned, "hallucinated": hallucinated}
