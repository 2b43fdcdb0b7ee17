"""Image selection: score every candidate against its prompt and keep the best (CLIP score, or ImageReward)."""
from __future__ import annotations

from dataclasses import dataclass

from actors.common.errors import Problem
from actors.common.guard import guarded
from actors.common.runtime import (
    add_node_tag,
    device_for,
    open_png,
    setup_torch,
    torch_dtype,
    with_columns,
)


@dataclass
class SelectionConfig:
    scorer: str = "clip"               # clip | imagereward | judge (a VLM asked about each object) | none (first)
    model: str = ""                    # CLIP model id/path; ImageReward folder or name ("ImageReward-v1.0"); judge: VLM
    device: str = "auto"               # auto: the actor's GPU if it has one, else CPU
    dtype: str = "float32"             # float16 / bfloat16 on GPU

    def validate(self) -> list[Problem]:
        errs = []
        if self.scorer not in ("clip", "imagereward", "judge", "none"):
            errs.append(Problem("selection.scorer", "must be 'clip', 'imagereward', 'judge' or 'none'"))
        if not self.model and self.scorer != "none":
            errs.append(Problem("selection.model", "required"))
        if self.dtype not in DTYPES:
            errs.append(Problem("selection.dtype", f"must be one of {', '.join(DTYPES)}"))
        return errs


DTYPES = ("float32", "float16", "bfloat16")


def omit_default_dtype(data: dict) -> None:
    """The data hash leaves selection.dtype out at its default, so configs that do not set it hash as they did
    before it existed."""
    if data.get("selection", {}).get("dtype") == "float32":
        data["selection"].pop("dtype")


class ClipScorer:
    """Cosine similarity of CLIP image and text embeddings (scaled by 100, as CLIPScore is)."""

    def __init__(self, model: str, device: str = "auto", threads: int = 1, dtype: str = "float32"):
        self.torch = setup_torch(threads)
        from transformers import AutoProcessor, CLIPModel
        self.device, self.dtype = device_for(device), torch_dtype(dtype)
        self.model = CLIPModel.from_pretrained(model, dtype=self.dtype).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model)

    def score(self, images, texts) -> list[float]:
        """Pairwise: score(images[i], texts[i])."""
        with self.torch.inference_mode():
            inp = self.processor(text=list(texts), images=list(images), return_tensors="pt",
                                 padding=True, truncation=True).to(self.device)
            # The processor makes float32 pixels; the model's dtype takes them
            img = self.model.get_image_features(pixel_values=inp["pixel_values"].to(self.dtype))
            txt = self.model.get_text_features(input_ids=inp["input_ids"],
                                               attention_mask=inp["attention_mask"])
            img = getattr(img, "pooler_output", img)
            txt = getattr(txt, "pooler_output", txt)
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            return (100.0 * (img * txt).sum(-1)).float().tolist()


class ImageRewardScorer:
    """ImageReward (the paper's selector) through our transformers 5 loader (actors/common/imagereward.py): a folder
    with ImageReward.pt + med_config.json, or "ImageReward-v1.0" / "THUDM/ImageReward" from the hub."""

    def __init__(self, model: str, device: str = "auto", threads: int = 1, dtype: str = "float32"):
        setup_torch(threads)
        from actors.common.imagereward import ImageRewardModel
        self.model = ImageRewardModel(model, device_for(device), torch_dtype(dtype))

    def score(self, images, texts) -> list[float]:
        return self.model.score(images, texts)


class FirstCandidate:
    """No image reward: every candidate scores 0, so the first one is kept."""

    def score(self, images, texts) -> list[float]:
        return [0.0] * len(images)


class ImageSelection:
    REQUIRES = ("image_prompt", "gt_objects", "candidate_images", "candidate_seeds", "candidate_guidance")
    ADDS = ("image", "image_score", "seed", "guidance_scale", "candidate_scores")
    # Only the best image travels on, as rendered (images.store_size applies at storage: actors/pairs.py).
    DROPS = ("candidate_images",)
    # With scorer judge only, for audit (no later stage reads it): per candidate, P(yes) per gt_objects entry.
    JUDGE_ADDS = ("candidate_judge",)

    def __init__(self, cfg: SelectionConfig, threads: int = 1):
        if cfg.scorer == "none":  # e.g. the shapes world: every candidate shows the prompt exactly
            self.scorer = FirstCandidate()
            return
        if cfg.scorer == "judge":
            from actors.common.judge import Judge
            self.scorer = Judge(cfg.model, cfg.device, threads, cfg.dtype)
            return
        cls = ClipScorer if cfg.scorer == "clip" else ImageRewardScorer
        self.scorer = cls(cfg.model, cfg.device, threads, cfg.dtype)

    def __call__(self, batch):
        return guarded("selection", batch, self._process, self.DROPS)

    def _judge(self, batch, cands, flat_imgs) -> list[list[float]]:
        """Each candidate's verdicts on the objects its prompt names (gt_objects); none: it scores 0."""
        objs = [list(o or []) for o in batch.column("gt_objects").to_pylist()]
        return self.scorer.p_yes(flat_imgs, [o for o, row in zip(objs, cands) for _ in row])

    def _process(self, batch):
        prompts = batch.column("image_prompt").to_pylist()
        cands = batch.column("candidate_images").to_pylist()
        flat_imgs = [open_png(b) for row in cands for b in row]
        flat_txt = [p for p, row in zip(prompts, cands) for _ in row]
        judged = self._judge(batch, cands, flat_imgs) if hasattr(self.scorer, "p_yes") else None
        if judged is not None:   # a candidate's score: the mean P(yes) over the prompt's objects
            flat = [sum(v) / len(v) if v else 0.0 for v in judged]
        else:
            flat = self.scorer.score(flat_imgs, flat_txt)
        seeds = batch.column("candidate_seeds").to_pylist()
        scales = batch.column("candidate_guidance").to_pylist()
        out = {"image": [], "image_score": [], "seed": [], "guidance_scale": [], "candidate_scores": []}
        i = 0
        for r, row in enumerate(cands):
            scores = flat[i:i + len(row)]
            i += len(row)
            best = max(range(len(row)), key=lambda k: scores[k])
            out["image"].append(row[best])
            out["image_score"].append(float(scores[best]))
            out["seed"].append(seeds[r][best])
            out["guidance_scale"].append(scales[r][best])
            out["candidate_scores"].append([float(s) for s in scores])
        import pyarrow as pa
        out["image"] = pa.array(out["image"], pa.binary())
        if judged is not None:
            starts = [sum(map(len, cands[:r])) for r in range(len(cands))]
            out["candidate_judge"] = pa.array([judged[s:s + len(row)] for s, row in zip(starts, cands)],
                                              pa.list_(pa.list_(pa.float64())))
        drops = [c for c in self.DROPS if c in batch.column_names]
        return with_columns(add_node_tag(batch.drop_columns(drops), "selection"), out)
