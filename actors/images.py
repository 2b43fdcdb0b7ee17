"""Image synthesis: K candidate images per prompt from any diffusers pipeline, over a list of guidance scales."""
from __future__ import annotations

from dataclasses import dataclass, field

from actors.common.errors import Problem
from actors.common.guard import guarded
from actors.common.runtime import (
    add_node_tag,
    device_for,
    png_bytes,
    setup_torch,
    torch_dtype,
    with_columns,
)
from actors.prompts import candidate_seed


@dataclass
class ImagesConfig:
    backend: str = "diffusers"         # diffusers | shapes (actors/shapes.py draws the prompt; no model)
    model: str = ""                    # diffusers pipeline: hub id or local folder
    guidance_scales: list[float] = field(default_factory=lambda: [5.0, 7.0, 9.0, 11.0])
    per_scale: int = 1                 # candidates per guidance scale
    steps: int = 28
    height: int = 1024
    width: int = 1024
    dtype: str = "float32"             # float16 / bfloat16 on GPU
    device: str = "auto"
    seed: int = 0
    negative_prompt: str | None = None

    def validate(self) -> list[Problem]:
        errs = []
        if self.backend not in ("diffusers", "shapes"):
            errs.append(Problem("images.backend", "must be 'diffusers' or 'shapes'"))
        if not self.model and self.backend == "diffusers":
            errs.append(Problem("images.model", "required"))
        if not self.guidance_scales:
            errs.append(Problem("images.guidance_scales", "must list at least one guidance scale"))
        if self.per_scale < 1 or self.steps < 1 or self.height < 8 or self.width < 8:
            errs.append(Problem("images", "per_scale and steps must be >= 1, height and width >= 8"))
        return errs

    @property
    def num_candidates(self) -> int:
        return len(self.guidance_scales) * self.per_scale


def _warn_once(logger_name: str, prefix: str) -> None:
    """Let a library warning that repeats on every call (CLIP's prompt truncation, once per candidate image)
    through once per process: thousands of identical lines bury the log and cost the log stream."""
    import logging
    seen: list[bool] = []

    def first_only(record) -> bool:
        if not record.getMessage().startswith(prefix):
            return True
        seen.append(True)
        return len(seen) == 1
    for handler in logging.getLogger(logger_name).handlers:
        handler.addFilter(first_only)


class ImageSynthesis:
    REQUIRES = ("prompt_id", "image_prompt")
    ADDS = ("candidate_images", "candidate_seeds", "candidate_guidance", "stage_nodes")

    def __init__(self, cfg: ImagesConfig, threads: int = 1):
        torch = setup_torch(threads)
        self.cfg, self.torch = cfg, torch
        if cfg.backend == "shapes":  # same columns and seeds, drawn with PIL instead of diffused
            return
        from diffusers import DiffusionPipeline
        self.device = device_for(cfg.device)
        self.pipe = DiffusionPipeline.from_pretrained(cfg.model, dtype=torch_dtype(cfg.dtype))
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        _warn_once("diffusers", "The following part of your input was truncated")

    def render(self, prompt: str, guidance: float, seed: int):
        if self.cfg.backend == "shapes":
            from actors.common.shapes import render
            return render(prompt, seed, self.cfg.width, self.cfg.height)
        gen = self.torch.Generator(device="cpu").manual_seed(seed)
        kwargs = dict(prompt=prompt, guidance_scale=guidance, num_inference_steps=self.cfg.steps,
                      height=self.cfg.height, width=self.cfg.width, generator=gen)
        if self.cfg.negative_prompt:
            kwargs["negative_prompt"] = self.cfg.negative_prompt
        return self.pipe(**kwargs).images[0]

    def __call__(self, batch):
        return guarded("images", batch, self._process)

    def _process(self, batch):
        images, seeds, scales = [], [], []
        for pid, prompt in zip(batch.column("prompt_id").to_pylist(), batch.column("image_prompt").to_pylist()):
            row_imgs, row_seeds, row_scales = [], [], []
            # One call per candidate: the bytes then depend only on (prompt_id, k), never on how
            # Ray Data happened to batch the rows.
            for k in range(self.cfg.num_candidates):
                g = self.cfg.guidance_scales[k // self.cfg.per_scale]
                s = candidate_seed(pid, k, self.cfg.seed)
                with self.torch.inference_mode():
                    row_imgs.append(png_bytes(self.render(prompt, g, s)))
                row_seeds.append(s)
                row_scales.append(float(g))
            images.append(row_imgs)
            seeds.append(row_seeds)
            scales.append(row_scales)
        import pyarrow as pa
        batch = add_node_tag(batch, "images")
        return with_columns(batch, {"candidate_images": pa.array(images, pa.list_(pa.binary())),
                                    "candidate_seeds": pa.array(seeds, pa.list_(pa.int64())),
                                    "candidate_guidance": pa.array(scales, pa.list_(pa.float64()))})
