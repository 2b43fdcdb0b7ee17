"""Image synthesis: K candidate images per prompt from any diffusers pipeline, over a list of guidance scales."""
from __future__ import annotations

from dataclasses import dataclass, field

from actors.common.errors import Problem
from actors.common.guard import guarded
from actors.common.runtime import (
    add_node_tag,
    device_for,
    open_png,
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
    # Classifier-free guidance scales: per_scale candidates at each (the paper: 5, 7, 9, 11).
    guidance_scales: list[float] = field(default_factory=lambda: [5.0, 7.0, 9.0, 11.0])
    per_scale: int = 1                 # candidates per guidance scale
    # Images per diffusers call, all at one guidance scale. Every call renders exactly this many (a short one
    # is padded with copies of its last image), so an image is computed the same way whichever rows arrive
    # together (Ray's batching, a resume); see _process. Size it to the accelerator's memory.
    batch_size: int = 4
    steps: int = 28                    # denoising steps per image
    height: int = 1024                 # render size, px
    width: int = 1024                  # render size, px
    dtype: str = "float32"             # float16 / bfloat16 on GPU
    device: str = "auto"               # auto: the actor's GPU if it has one, else CPU
    seed: int = 0                      # with prompt_id and candidate: each image's generator seed
    negative_prompt: str | None = None  # the same negative prompt for every image
    # Side (px) of the stored image: the policy processor's input (336 for LLaVA-1.5); the shorter side is scaled
    # to it, never up, as the row leaves the chain (actors/pairs.py). Every stage sees the full render. null: keep it.
    store_size: int | None = None
    keep_render: bool = False          # also store the chosen full render (scored/ column `image_render`)
    # Memory options for SD3 on 24 GB cards (docs/configs.md), all off by default.
    drop_t5: bool = False              # load SD3 without its T5-XXL encoder: ~9.5 GB less in fp16, other images
    vae_tiling: bool = False           # decode in overlapping tiles: less memory, other pixels
    vae_slicing: bool = False          # decode one image at a time
    cpu_offload: bool = False          # each model on the GPU only while it runs (CUDA only; the same images)
    # Shapes backend only: the chance that each object is drawn as the prompt says; the others are left out,
    # recoloured or joined by a stray object (actors/common/shapes.misdrawn), as diffusion models fail.
    fidelity: float = 1.0

    def validate(self) -> list[Problem]:
        errs = []
        if self.backend not in ("diffusers", "shapes"):
            errs.append(Problem("images.backend", "must be 'diffusers' or 'shapes'"))
        if not self.model and self.backend == "diffusers":
            errs.append(Problem("images.model", "required"))
        if not self.guidance_scales:
            errs.append(Problem("images.guidance_scales", "must list at least one guidance scale"))
        if self.per_scale < 1 or self.steps < 1 or self.batch_size < 1 or self.height < 8 or self.width < 8:
            errs.append(Problem("images", "per_scale, steps and batch_size must be >= 1, height and width >= 8"))
        if self.store_size is not None and (isinstance(self.store_size, bool) or self.store_size < 8):
            errs.append(Problem("images.store_size", "must be an integer >= 8 or null (keep the render size)"))
        if isinstance(self.fidelity, bool) or not 0.0 <= self.fidelity <= 1.0:
            errs.append(Problem("images.fidelity", "must be a number from 0 to 1"))
        elif self.fidelity != 1.0 and self.backend != "shapes":
            errs.append(Problem("images.fidelity", "applies to the shapes backend only (a diffusion model fails "
                                                   "on its own)"))
        for key in MEMORY_OPTIONS:
            if getattr(self, key) and self.backend != "diffusers":
                errs.append(Problem(f"images.{key}", "applies to the diffusers backend only"))
        if self.cpu_offload and self.device not in ("auto", "cuda") and not self.device.startswith("cuda:"):
            errs.append(Problem("images.cpu_offload", f"needs a CUDA device, not images.device {self.device!r}"))
        return errs

    @property
    def num_candidates(self) -> int:
        return len(self.guidance_scales) * self.per_scale


MEMORY_OPTIONS = ("drop_t5", "vae_tiling", "vae_slicing", "cpu_offload")


def omit_default_memory_options(data: dict) -> None:
    """The data hash leaves the memory options out at their defaults (off), so a config that does not use them
    hashes as it did before they existed; CPU offload always (it moves weights between devices, the same sums run)."""
    images = data.get("images", {})
    if images.get("fidelity") == 1.0:   # likewise the shapes renderer's fidelity at its default
        images.pop("fidelity")
    for key in MEMORY_OPTIONS:
        if images.get(key) is False or key == "cpu_offload":
            images.pop(key, None)


def mark_full_render(data: dict) -> None:
    """Hash-only: with store_size set, selection, the samplers and the rewards see the full render, not the stored
    size as they once did, so their answers differ; the marker gives such a config another data hash and names
    itself in a stale folder's error. With store_size null nothing changed, nor does the hash."""
    images = data.get("images", {})
    if images.get("store_size") is not None:
        images["stages_see"] = "full render"


def load_pipeline(cfg: ImagesConfig, device: str):
    """The diffusers pipeline of `cfg` on `device`, every component in cfg.dtype, with its memory options on."""
    from diffusers import DiffusionPipeline
    kwargs = {}
    if cfg.drop_t5:
        # Only SD3-style pipelines have a third (T5) text encoder; elsewhere the None would be ignored silently.
        if "text_encoder_3" not in DiffusionPipeline.load_config(cfg.model):
            raise ValueError(f"images.drop_t5: {cfg.model} has no text_encoder_3 (T5) to drop")
        kwargs = dict(text_encoder_3=None, tokenizer_3=None)
    if cfg.cpu_offload and not device.startswith("cuda"):
        raise ValueError(f"images.cpu_offload needs a CUDA GPU; this actor has {device} (give the images pool "
                         "num_gpus, or set images.cpu_offload: false)")
    pipe = DiffusionPipeline.from_pretrained(cfg.model, dtype=torch_dtype(cfg.dtype), **kwargs)
    if cfg.vae_tiling:
        pipe.vae.enable_tiling()
    if cfg.vae_slicing:
        pipe.vae.enable_slicing()
    if cfg.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)   # moves each model to the GPU as it runs; no pipe.to()
    else:
        pipe.to(device)
    return pipe


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


def stored(image, store_size: int | None):
    """The image as stored: its shorter side scaled down to `store_size` (aspect kept; the processor crops)."""
    if store_size is None or min(image.size) <= store_size:
        return image
    from PIL import Image
    w, h = image.size
    scale = store_size / min(w, h)
    return image.resize((max(store_size, round(w * scale)), max(store_size, round(h * scale))),
                        Image.Resampling.BICUBIC)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def stored_png(data: bytes | None, store_size: int | None) -> bytes | None:
    """PNG bytes as stored (`stored`); bytes already small enough are kept as they are, read from the PNG header
    without decoding. Bytes that are no PNG (the cluster simulation's stand-in images) pass unchanged."""
    if data is None or store_size is None or not data.startswith(PNG_SIGNATURE):
        return data
    import struct
    if min(struct.unpack(">II", data[16:24])) <= store_size:   # IHDR: width, height
        return data
    return png_bytes(stored(open_png(data), store_size))


class LastPromptEncoding:
    """A diffusers pipeline's `encode_prompt` that reuses its last result when called again with the same
    arguments. The K candidates of a prompt are K calls with the same prompts at other guidance scales or seeds,
    and each call would encode them anew: 4x the text encoders' work (T5-XXL's on SD3). Same arguments, same
    computation: the images are bitwise those of encoding every time (tests/actors/test_images_batch.py).
    Arguments holding tensors (precomputed embeddings) are passed through uncached."""

    def __init__(self, encode):
        self.encode, self.key, self.value = encode, None, None

    def __call__(self, *args, **kwargs):
        key = _key((args, sorted(kwargs.items())))
        if key is _UNKEYED:
            return self.encode(*args, **kwargs)
        if key != self.key:
            self.key = None   # no stale pair if the encoder raises
            self.value = self.encode(*args, **kwargs)
            self.key = key
        return self.value


_UNKEYED = object()


def _key(value):
    """A hashable copy of encode_prompt's arguments, or _UNKEYED if one is not plain data (a tensor)."""
    if isinstance(value, (list, tuple)):
        items = tuple(_key(v) for v in value)
        return _UNKEYED if any(i is _UNKEYED for i in items) else (type(value).__name__, items)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if type(value).__name__ == "device":   # torch.device
        return ("device", str(value))
    return _UNKEYED


class ImageSynthesis:
    REQUIRES = ("prompt_id", "image_prompt")
    # Full renders: images.store_size applies where the row leaves the chain (actors/pairs.py).
    ADDS = ("candidate_images", "candidate_seeds", "candidate_guidance", "stage_nodes")

    def __init__(self, cfg: ImagesConfig, threads: int = 1):
        torch = setup_torch(threads)
        self.cfg, self.torch = cfg, torch
        if cfg.backend == "shapes":  # same columns and seeds, drawn with PIL instead of diffused
            return
        self.device = device_for(cfg.device)
        self.pipe = load_pipeline(cfg, self.device)
        self.pipe.set_progress_bar_config(disable=True)
        if hasattr(self.pipe, "encode_prompt"):   # SD, SDXL, SD3, ...: see LastPromptEncoding
            self.pipe.encode_prompt = LastPromptEncoding(self.pipe.encode_prompt)
        _warn_once("diffusers", "The following part of your input was truncated")

    def render(self, prompt: str, guidance: float, seed: int):
        """One image, alone in its call (not padded: e.g. an evaluation image no run renders)."""
        return self.render_batch([prompt], [seed], guidance)[0]

    def render_batch(self, prompts: list[str], seeds: list[int], guidance: float) -> list:
        """One diffusers call: image i from prompts[i] with its own generator seeded seeds[i]."""
        if self.cfg.backend == "shapes":
            from actors.common.shapes import render
            return [render(p, s, self.cfg.width, self.cfg.height, fidelity=self.cfg.fidelity)
                    for p, s in zip(prompts, seeds)]
        gens = [self.torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        kwargs = dict(prompt=list(prompts), guidance_scale=guidance, num_inference_steps=self.cfg.steps,
                      height=self.cfg.height, width=self.cfg.width, generator=gens)
        if self.cfg.negative_prompt:
            kwargs["negative_prompt"] = [self.cfg.negative_prompt] * len(prompts)
        with self.torch.inference_mode():
            return self.pipe(**kwargs).images

    def __call__(self, batch):
        return guarded("images", batch, self._process)

    def _process(self, batch):
        """Candidate k of a prompt is seeded `candidate_seed(prompt_id, k, seed)` and rendered at its guidance
        scale in a call of exactly `batch_size` images. diffusers computes each image of a call from its own
        latents and generator; on diffusers 0.42 with torch 2.13 on CPU, an image's result does not depend on
        its position or on the other images of a call of that size (bitwise), while another call size changes
        it by float rounding (a level of 255 at most, measured). Fixed-size calls thus make the bytes a
        function of the config and the row, whatever rows Ray or a resume put together
        (tests/actors/test_images_batch.py)."""
        cfg = self.cfg
        pids = batch.column("prompt_id").to_pylist()
        prompts = batch.column("image_prompt").to_pylist()
        n, b = cfg.num_candidates, (1 if cfg.backend == "shapes" else cfg.batch_size)
        images = [[b""] * n for _ in pids]
        seeds = [[candidate_seed(pid, k, cfg.seed) for k in range(n)] for pid in pids]
        # Calls of b (row, j) slots, j the candidate within a guidance scale; every scale renders the same slots
        # in turn, so consecutive calls share their prompts and the text encoders run once per slot group.
        slots = [(r, j) for r in range(len(pids)) for j in range(cfg.per_scale)]
        for i in range(0, len(slots), b):
            group = slots[i:i + b]
            group += [group[-1]] * (b - len(group))   # padded: the last slot again
            for gi, g in enumerate(cfg.guidance_scales):
                call = [(r, gi * cfg.per_scale + j) for r, j in group]
                out = self.render_batch([prompts[r] for r, _ in call], [seeds[r][k] for r, k in call], g)
                for (r, k), img in zip(call, out):
                    images[r][k] = png_bytes(img)
        scales = [[float(cfg.guidance_scales[k // cfg.per_scale]) for k in range(n)] for _ in pids]
        import pyarrow as pa
        batch = add_node_tag(batch, "images")
        cols = {"candidate_images": pa.array(images, pa.list_(pa.binary())),
                "candidate_seeds": pa.array(seeds, pa.list_(pa.int64())),
                "candidate_guidance": pa.array(scales, pa.list_(pa.float64()))}
        return with_columns(batch, cols)
