"""Answer sampling: a vision-language model answers each (image, question), n answers per model.

Two backends behind one column contract: `transformers` (CPU and GPU) and `vllm` (GPU). Each model
is its own stage (and actor pool); each appends to the `answers` / `answer_models` lists.
"""
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
from actors.common.seeds import stable_seed


@dataclass
class SamplerConfig:
    model: str = ""                    # hub id or local folder
    name: str | None = None            # recorded as chosen_model / rejected_model; default: model
    backend: str = "transformers"      # transformers | vllm
    n: int = 1                         # answers per (image, question)
    temperature: float = 0.0           # 0 means greedy
    top_p: float = 1.0                 # nucleus sampling; 1.0 keeps every token
    max_new_tokens: int = 128          # longest answer, in tokens
    batch_size: int = 8                # rows (image, question) per generate call; each row's n samples ride along
    dtype: str = "float32"             # bfloat16 / float16 on GPU
    device: str = "auto"               # auto: the actor's GPU if it has one, else CPU
    seed: int = 0                      # sampling seed, with the row's ids: a rerun samples the same answers
    prompt_suffix: str = ""            # e.g. POPE's "Answer the question using a single word or phrase."
    max_model_len: int = 4096          # vllm only, as the four below: what fits a model to the GPUs at hand
    tensor_parallel_size: int = 1      # GPUs one engine spans (a 13B on 40 GB cards: 2; `plan` picks it); pool num_gpus must match
    gpu_memory_utilization: float = 0.9  # share of each GPU the engine takes (engines sharing a GPU: split it)
    quantization: str | None = None    # e.g. "awq", "gptq", "fp8" (vLLM's names)
    max_num_seqs: int | None = None    # concurrent sequences (vLLM default when None)
    enforce_eager: bool = False        # vllm: skip torch.compile / CUDA graphs (starts minutes sooner; the CPU lane)
    trust_remote_code: bool = False    # load a model's own code from its repository; only for models you trust
    adapter: str | None = None         # a PEFT LoRA adapter folder, merged into the model on load
    # With `rounds: N` this entry samples the policy being trained (train.model, in place of `model`): in round 1
    # the base, in round r >= 2 the base with round r-1's adapter (transformers) or its merged weights (vllm; needs
    # train.merge_adapter).
    on_policy: bool = False

    @property
    def label(self) -> str:
        return self.name or self.model

    @property
    def pool_key(self) -> str:
        """Its own pool's key under `pools:`, and its stage's name in metrics, errors and node tags."""
        return f"sampling:{self.label}"

    def validate(self, key: str) -> list[Problem]:
        errs = []
        if not self.model:
            errs.append(Problem(f"{key}.model", "required"))
        if self.backend not in ("transformers", "vllm"):
            errs.append(Problem(f"{key}.backend", "must be 'transformers' or 'vllm'"))
        if self.n < 1:
            errs.append(Problem(f"{key}.n", "must be >= 1"))
        if self.n > 1 and self.temperature == 0:
            errs.append(Problem(f"{key}.n", "n > 1 needs temperature > 0 (greedy gives n identical answers)"))
        if self.batch_size < 1:
            errs.append(Problem(f"{key}.batch_size", "must be >= 1"))
        if self.max_new_tokens < 1:
            errs.append(Problem(f"{key}.max_new_tokens", "must be >= 1"))
        if self.tensor_parallel_size < 1:
            errs.append(Problem(f"{key}.tensor_parallel_size", "must be >= 1"))
        if not 0 < self.gpu_memory_utilization <= 1:
            errs.append(Problem(f"{key}.gpu_memory_utilization", "must be in (0, 1]"))
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            errs.append(Problem(f"{key}.max_num_seqs", "must be >= 1 or null"))
        if self.on_policy and self.adapter:
            errs.append(Problem(f"{key}.adapter", "an on_policy sampler gets each round's adapter; leave adapter unset"))
        if self.adapter and self.backend == "vllm":
            errs.append(Problem(f"{key}.adapter", "the vllm backend takes merged weights (train.merge_adapter: true, "
                        "then point model at train/merged)"))
        return errs

    def pool_problems(self, key: str, pools: dict) -> list[Problem]:
        """A vLLM engine spans `tensor_parallel_size` GPUs, all of them its actor's: the sampler's pool
        (`pools`: the run config's, by name; a sampler's own as sampling:<name>) must give each actor exactly
        that many, or a fraction of one for a single-GPU engine. Otherwise the engine finds fewer GPUs than it
        shards over, or holds GPUs it never uses."""
        if self.backend != "vllm":
            return []
        name = self.pool_key if self.pool_key in pools else "sampling"
        gpus = getattr(pools.get(name), "num_gpus", 0.0)
        tp = self.tensor_parallel_size
        if (tp > 1 and gpus != tp) or (tp == 1 and gpus > 1):
            return [Problem(f"{key}.tensor_parallel_size", f"sampler '{self.label}' shards its vLLM engine over {tp} "
                            f"GPU(s), but its pool pools.{name} gives each actor num_gpus {gpus:g}; make them equal")]
        return []


def row_seed(base: int, key: str, model: str) -> int:
    return stable_seed(base, key, model)


def sample_seed(base: int, key: str, model: str, j: int) -> int:
    """Seed of the j-th answer of a row (transformers backend): a function of the row alone."""
    return stable_seed(row_seed(base, key, model), j)


def chat_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


class PerRowSampling:
    """A logits processor for HF `generate` (a callable (input_ids, scores) -> scores) that samples each
    sequence's next token with that sequence's own torch.Generator and masks every other token, so greedy
    decoding picks it. HF's sampling draws a whole batch from one global RNG, so a row's answer would depend
    on its batch; here a row's draws depend on its seed alone. Temperature, top-k and top-p are HF's own
    warpers, in the order HF applies them when it samples."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float = 1.0, top_k: int | None = None):
        import torch
        from transformers import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )
        self.torch, self.seeds, self.gens = torch, seeds, None
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids, scores):
        torch = self.torch
        if self.gens is None:  # made on first use, on the device the logits live on
            self.gens = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        probs = torch.softmax(self.warpers(input_ids, scores), dim=-1)
        picks = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.gens)])
        return torch.full_like(scores, float("-inf")).scatter_(1, picks, 0.0)


class TransformersBackend:
    def __init__(self, cfg: SamplerConfig, threads: int):
        self.torch = setup_torch(threads)
        from transformers import AutoModelForImageTextToText, AutoProcessor
        self.cfg, self.device = cfg, device_for(cfg.device)
        self.processor = AutoProcessor.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        self.processor.tokenizer.padding_side = "left"  # decoder-only batches pad on the left
        self.model = AutoModelForImageTextToText.from_pretrained(
            cfg.model, dtype=torch_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code
        )
        if cfg.adapter:  # e.g. the DPO-trained adapter, for a before/after evaluation
            from peft import PeftModel
            self.model = PeftModel.from_pretrained(self.model, cfg.adapter).merge_and_unload()
        self.model = self.model.to(self.device).eval()

    def _generate(self, images, prompts, keys, max_new_tokens: int | None) -> list[list[str]]:
        """One generate call: greedy, or n samples per row (each row repeated n times, each copy with the
        generator seeded `sample_seed(seed, key, model, j)`)."""
        cfg = self.cfg
        n = cfg.n if cfg.temperature > 0 else 1
        kwargs = dict(max_new_tokens=max_new_tokens or cfg.max_new_tokens, do_sample=False)
        if cfg.temperature > 0:
            images = [im for im in images for _ in range(n)]
            prompts = [p for p in prompts for _ in range(n)]
            seeds = [sample_seed(cfg.seed, k, cfg.label, j) for k in keys for j in range(n)]
            kwargs["logits_processor"] = [PerRowSampling(seeds, cfg.temperature, cfg.top_p,
                                                         self.model.generation_config.top_k)]
        inp = self.processor(images=images, text=prompts, return_tensors="pt", padding=True).to(self.device)
        with self.torch.inference_mode():
            out = self.model.generate(**inp, **kwargs)
        texts = self.processor.batch_decode(out[:, inp["input_ids"].shape[1]:], skip_special_tokens=True)
        return [[t.strip() for t in texts[i:i + n]] for i in range(0, len(texts), n)]

    def answer(self, images, questions, keys=None, max_new_tokens: int | None = None) -> list[list[str]]:
        """n answers per (image, question), `batch_size` rows per generate call; `max_new_tokens` overrides the
        config. Sampling needs the rows' keys: a row's samples are decided by its own seeds, whatever else is
        in its batch (up to float rounding of the batched logits; see test_sampling_batch.py)."""
        if self.cfg.temperature > 0 and keys is None:
            raise ValueError("sampling needs a key per row (its seed)")
        prompts = [chat_prompt(self.processor, q + self.cfg.prompt_suffix) for q in questions]
        b, out = self.cfg.batch_size, []
        for i in range(0, len(prompts), b):
            out += self._generate(images[i:i + b], prompts[i:i + b], keys[i:i + b] if keys else None,
                                  max_new_tokens)
        return out


def engine_kwargs(cfg: SamplerConfig) -> dict:
    """vLLM's `LLM(...)` arguments for a sampler: the model, its seed, and what fits it to the GPUs."""
    kwargs = dict(model=cfg.model, dtype=cfg.dtype, seed=cfg.seed, max_model_len=cfg.max_model_len,
                  limit_mm_per_prompt={"image": 1}, trust_remote_code=cfg.trust_remote_code,
                  tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization)
    if cfg.quantization:
        kwargs["quantization"] = cfg.quantization
    if cfg.max_num_seqs:
        kwargs["max_num_seqs"] = cfg.max_num_seqs
    if cfg.enforce_eager:
        kwargs["enforce_eager"] = True
    return kwargs


class VllmBackend:
    """vLLM's offline engine with multi-modal input (GPU nodes; `pip install synthalign[vllm]`)."""

    def __init__(self, cfg: SamplerConfig, threads: int):
        setup_torch(threads)
        from transformers import AutoProcessor
        from vllm import LLM
        self.cfg = cfg
        self.processor = AutoProcessor.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        self.llm = LLM(**engine_kwargs(cfg))

    def answer(self, images, questions, keys, max_new_tokens: int | None = None) -> list[list[str]]:
        """The whole batch in one call (vLLM batches continuously itself); each request seeded by its row."""
        from vllm import SamplingParams
        cfg = self.cfg
        requests = [{"prompt": chat_prompt(self.processor, q + cfg.prompt_suffix), "multi_modal_data": {"image": im}}
                    for im, q in zip(images, questions)]
        params = [SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                                 max_tokens=max_new_tokens or cfg.max_new_tokens, seed=row_seed(cfg.seed, k, cfg.label))
                  for k in keys]
        outs = self.llm.generate(requests, params, use_tqdm=False)
        return [[o.text.strip() for o in out.outputs] for out in outs]


class AnswerSampler:
    REQUIRES = ("image", "question", "pair_key")
    ADDS = ("answers", "answer_models")

    def __init__(self, cfg: SamplerConfig, threads: int = 1):
        self.cfg = cfg
        self.backend = (VllmBackend if cfg.backend == "vllm" else TransformersBackend)(cfg, threads)

    def __call__(self, batch):
        return guarded(self.cfg.pool_key, batch, self._process)

    def _process(self, batch):
        images = [open_png(b) for b in batch.column("image").to_pylist()]
        new = self.backend.answer(images, batch.column("question").to_pylist(),
                                  batch.column("pair_key").to_pylist())
        if any(not any(a.strip() for a in row) for row in new):
            raise ValueError("the model gave only empty answers")
        names = batch.column("answer_models").to_pylist() if "answer_models" in batch.column_names else None
        prev = batch.column("answers").to_pylist() if "answers" in batch.column_names else None
        answers = [(prev[i] if prev else []) + a for i, a in enumerate(new)]
        models = [(names[i] if names else []) + [self.cfg.label] * len(a) for i, a in enumerate(new)]
        batch = add_node_tag(batch, self.cfg.pool_key)
        return with_columns(batch, {"answers": answers, "answer_models": models})
