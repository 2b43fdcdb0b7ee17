"""The dataset card (README.md) of an `export --format hf` folder: YAML metadata the Hub parses (licence, task
categories, size, tags, source models, the splits' files and features) and a body saying how the pairs were made,
how many there are, how their rewards and margins spread, and under which licence each model's outputs are."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

# The licence of each paper model's outputs, as its model card states it: (Hub licence id, name, link).
MODEL_LICENCES = {
    "stabilityai/stable-diffusion-3-medium-diffusers": (
        "other", "Stability AI Community License",
        "https://huggingface.co/stabilityai/stable-diffusion-3-medium/blob/main/LICENSE.md"),
    "ImageReward-v1.0": ("apache-2.0", "Apache 2.0 (ImageReward)", "https://github.com/THUDM/ImageReward"),
    "THUDM/ImageReward": ("apache-2.0", "Apache 2.0 (ImageReward)", "https://github.com/THUDM/ImageReward"),
    "llava-hf/llava-v1.6-mistral-7b-hf": ("apache-2.0", "Apache 2.0",
                                          "https://huggingface.co/llava-hf/llava-v1.6-mistral-7b-hf"),
    "llava-hf/llava-v1.6-vicuna-7b-hf": ("llama2", "Llama 2 Community License",
                                         "https://huggingface.co/llava-hf/llava-v1.6-vicuna-7b-hf"),
    "llava-hf/llava-v1.6-vicuna-13b-hf": ("llama2", "Llama 2 Community License",
                                          "https://huggingface.co/llava-hf/llava-v1.6-vicuna-13b-hf"),
    "llava-hf/llava-1.5-7b-hf": ("llama2", "Llama 2 Community License",
                                 "https://huggingface.co/llava-hf/llava-1.5-7b-hf"),
    "RLHFlow/ArmoRM-Llama3-8B-v0.1": ("llama3", "Meta Llama 3 Community License",
                                      "https://huggingface.co/RLHFlow/ArmoRM-Llama3-8B-v0.1"),
}
UNKNOWN = (None, "unknown, check the model card", None)
SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
         (10_000_000, "1M<n<10M"))
BINS = 10


def stage_models(config: dict) -> list[tuple[str, str, str]]:
    """(stage, model, what of it is in the dataset) for each model the run's config used."""
    images = config.get("images", {})
    rows = [("images", images.get("model", "?") if images.get("backend", "diffusers") != "shapes"
             else "shapes world (procedural)", "the images")]
    sel = config.get("selection", {})
    if sel.get("model"):
        rows.append((f"image selection ({sel.get('scorer', '?')})", sel["model"], "image_score"))
    for s in config.get("samplers", []):
        rows.append((f"answers ({s.get('name') or s['model']})", s["model"], "chosen / rejected answers"))
    rew = config.get("rewards", {})
    weights = rew.get("weights", {})
    if rew.get("text_model") and weights.get("text", 1.0):
        rows.append(("text reward", rew["text_model"], "chosen_reward / rejected_reward / margin"))
    if rew.get("clip_model") and weights.get("clip", 0.0):
        rows.append(("CLIP reward", rew["clip_model"], "chosen_reward / rejected_reward / margin"))
    return rows


def dataset_licence(models) -> tuple[str, str | None]:
    """The Hub licence id when every model's is known and the same, else "other" (the body's table says which)."""
    ids = {MODEL_LICENCES.get(m, UNKNOWN)[0] for m in models}
    if len(ids) == 1 and None not in ids and "other" not in ids:
        return ids.pop(), None
    return "other", "model-output-licences"


def size_category(n: int) -> str:
    return next((name for limit, name in SIZES if n < limit), "n>10M")


def histogram(columns: dict[str, list[float]]) -> list[str]:
    """A markdown table: BINS equal bins over all the values, one count column per named list."""
    values = [round(v, 9) for vs in columns.values() for v in vs if v is not None]
    if not values:
        return ["(no values)"]
    lo, hi = min(values), max(values)
    width = (hi - lo) / BINS or 1.0
    edges = [lo + i * width for i in range(BINS)] if hi > lo else [lo]
    counts = {k: Counter(min(int((round(v, 9) - lo) / width), len(edges) - 1) for v in vs if v is not None)
              for k, vs in columns.items()}
    out = ["| range | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for i, e in enumerate(edges):
        end = hi if i == len(edges) - 1 else e + width
        out.append(f"| {e:.3f} .. {end:.3f} | " + " | ".join(str(counts[k][i]) for k in columns) + " |")
    return out


def _metadata(manifest: dict, stats: dict, feats, models: list[str], license: str | None) -> dict:
    licence, licence_name = (license, None) if license else dataset_licence(models)
    splits = [s for s in ("train", "test") if s in stats["files"]]
    meta = {
        "license": licence, "license_name": licence_name, "language": ["en"],
        "task_categories": ["image-text-to-text", "visual-question-answering"],
        "size_categories": [size_category(sum(stats["rows"].values()))],
        "tags": ["dpo", "preference", "synthetic", "vision-language", "trl", "synthalign"],
        "annotations_creators": ["machine-generated"], "language_creators": ["machine-generated"],
        "source_models": sorted({m for m in models if "/" in m and not m.startswith((".", "/", "~"))}) or None,
        "pretty_name": "SynthAlign preference pairs",
        "configs": [{"config_name": "default",
                     "data_files": [{"split": s, "path": f"data/{s}-*"} for s in splits]}],
        "dataset_info": {"features": feats._to_yaml_list(),
                         "splits": [{"name": s, "num_bytes": stats["bytes"][s], "num_examples": stats["rows"][s]}
                                    for s in splits],
                         "dataset_size": sum(stats["bytes"].values())},
    }
    return {k: v for k, v in meta.items() if v is not None}


INTRO = ("Synthetic preference pairs for vision-language DPO, made by SynthAlign (`synthalign export --format hf`) "
         "from generated prompts: an image per prompt (best of several by an image scorer), answers from the "
         "sampler models, the best- and worst-rewarded answers as chosen and rejected. Columns `images`, `prompt`, "
         "`chosen`, `rejected` are TRL's conversational vision preference format (`DPOTrainer` takes a split as it "
         "is); the others say where each pair came from.")
USE = """```python
from datasets import load_dataset
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import DPOConfig, DPOTrainer

pairs = load_dataset("REPO_OR_FOLDER")
trainer = DPOTrainer(model=AutoModelForImageTextToText.from_pretrained(MODEL), args=DPOConfig(output_dir="dpo"),
                     train_dataset=pairs["train"], processing_class=AutoProcessor.from_pretrained(MODEL))
```"""


def _made(manifest: dict, stages) -> list[str]:
    config = manifest.get("config", {})
    versions = ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items())
    return ["## How it was made", "", "| stage | model | in the dataset |", "|---|---|---|",
            *[f"| {s} | `{m}` | {what} |" for s, m, what in stages], "",
            (f"Config hash `{manifest.get('data_hash', '?')}`; prompts seed "
             f"{config.get('prompts', {}).get('seed', '?')}; versions: {versions or '?'}."), ""]


def _counts(manifest: dict, stats: dict, test_fraction: float, seed: int) -> list[str]:
    c = manifest.get("counts", {})
    dropped = ", ".join(f"{r} {n}" for r, n in sorted((c.get("dropped") or {}).items())) or "none"
    return ["## Counts", "",
            (f"{c.get('prompts', '?')} prompts, {c.get('questions', '?')} image-questions, {c.get('answers', '?')} "
             f"answers, {c.get('pairs', '?')} pairs; {c.get('errors', 0)} failed rows."), "",
            f"Dropped image-questions by reason: {dropped}.", "",
            "| split | pairs | prompts |", "|---|---|---|",
            *[f"| {s} | {stats['rows'][s]} | {stats['prompts'][s]} |" for s in ("train", "test")], "",
            (f"Split by prompt (every pair of a prompt on one side): {test_fraction:g} of the prompts held out for "
             f"test, at least one when there are two or more, chosen with seed {seed}."), ""]


def _rewards(stats: dict) -> list[str]:
    return ["## Rewards", "", "Combined reward of the chosen and rejected answers:", "",
            *histogram({"chosen": stats["chosen_reward"], "rejected": stats["rejected_reward"]}), "",
            "Margin (chosen - rejected):", "", *histogram({"pairs": stats["margin"]}), "",
            "Pairs by answering model:", "", "| model | chosen | rejected |", "|---|---|---|",
            *_model_rows(stats), ""]


def _licences(stages) -> list[str]:
    return ["## Licences", "",
            "Each model's outputs in this dataset are under that model's licence; use the dataset within all of them.",
            "", "| model | licence of its outputs |", "|---|---|",
            *[f"| `{m}` | {_licence_cell(m)} |" for m in dict.fromkeys(m for _, m, _ in stages)], ""]


def card_text(manifest: dict, stats: dict, feats, test_fraction: float, seed: int, license: str | None = None) -> str:
    from huggingface_hub import DatasetCardData
    stages = stage_models(manifest.get("config", {}))
    meta = _metadata(manifest, stats, feats, [m for _, m, _ in stages], license)
    lines = ["# SynthAlign preference pairs", "", INTRO, "", *_made(manifest, stages),
             *_counts(manifest, stats, test_fraction, seed), *_rewards(stats), *_licences(stages),
             "## Use", "", USE, ""]
    return f"---\n{DatasetCardData(**meta).to_yaml()}\n---\n\n" + "\n".join(lines)


def _model_rows(stats: dict) -> list[str]:
    chosen, rejected = Counter(stats["chosen_model"]), Counter(stats["rejected_model"])
    return [f"| {m} | {chosen[m]} | {rejected[m]} |" for m in sorted(set(chosen) | set(rejected))]


def _licence_cell(model: str) -> str:
    _, name, link = MODEL_LICENCES.get(model, UNKNOWN)
    return f"[{name}]({link})" if link else name


def write_card(path: Path, manifest: dict, stats: dict, feats, **kw) -> Path:
    path.write_text(card_text(manifest, stats, feats, **kw), encoding="utf-8")
    return path
