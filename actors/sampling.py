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
    top_p: float = 1.0
    max_new_tokens: int = 128
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0
    prompt_suffix: str = ""            # e.g. POPE's "Answer the question using a single word or phrase."
    max_model_len: int = 4096          # vllm only
    trust_remote_code: bool = False
    adapter: str | None = None         # a PEFT LoRA adapter folder, merged into the model on load

    @property
    def label(self) -> str:
        return self.name or self.model

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
        if self.max_new_tokens < 1:
            errs.append(Problem(f"{key}.max_new_tokens", "must be >= 1"))
        if self.adapter and self.backend == "vllm":
            errs.append(Problem(f"{key}.adapter", "the vllm backend takes merged weights (train.merge_adapter: true, "
                        "then point model at train/merged)"))
        return errs


def row_seed(base: int, key: str, model: str) -> int:
    return stable_seed(base, key, model)


def chat_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


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

    def _generate(self, images, prompts, seed: int | None, max_new_tokens: int | None = None) -> list[list[str]]:
        cfg = self.cfg
        inp = self.processor(images=images, text=prompts, return_tensors="pt", padding=True).to(self.device)
        sample = cfg.temperature > 0
        kwargs = dict(max_new_tokens=max_new_tokens or cfg.max_new_tokens, do_sample=sample,
                      num_return_sequences=cfg.n)
        if sample:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
            self.torch.manual_seed(seed)
        with self.torch.inference_mode():
            out = self.model.generate(**inp, **kwargs)
        texts = self.processor.batch_decode(out[:, inp["input_ids"].shape[1]:], skip_special_tokens=True)
        return [[t.strip() for t in texts[i * cfg.n:(i + 1) * cfg.n]] for i in range(len(prompts))]

    def answer(self, images, questions, keys=None, max_new_tokens: int | None = None) -> list[list[str]]:
        """n answers per (image, question); greedy answers are batched, `max_new_tokens` overrides the config."""
        prompts = [chat_prompt(self.processor, q + self.cfg.prompt_suffix) for q in questions]
        if self.cfg.temperature == 0:
            return self._generate(images, prompts, None, max_new_tokens)
        # Sampling: one row per call with its own seed, so a rerun gives the same answers
        # whatever the batching.
        return [self._generate([im], [p], row_seed(self.cfg.seed, k, self.cfg.label), max_new_tokens)[0]
                for im, p, k in zip(images, prompts, keys)]


class VllmBackend:
    """vLLM's offline engine with multi-modal input (GPU nodes; `pip install synthalign[vllm]`)."""

    def __init__(self, cfg: SamplerConfig, threads: int):
        setup_torch(threads)
        from transformers import AutoProcessor
        from vllm import LLM
        self.cfg = cfg
        self.processor = AutoProcessor.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        self.llm = LLM(model=cfg.model, dtype=cfg.dtype, seed=cfg.seed, max_model_len=cfg.max_model_len,
                       limit_mm_per_prompt={"image": 1}, trust_remote_code=cfg.trust_remote_code)

    def answer(self, images, questions, keys) -> list[list[str]]:
        from vllm import SamplingParams
        cfg = self.cfg
        requests = [{"prompt": chat_prompt(self.processor, q + cfg.prompt_suffix), "multi_modal_data": {"image": im}}
                    for im, q in zip(images, questions)]
        params = [SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                                 max_tokens=cfg.max_new_tokens, seed=row_seed(cfg.seed, k, cfg.label))
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
        return guarded(f"sampling:{self.cfg.label}", batch, self._process)

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
        batch = add_node_tag(batch, f"sampling:{self.cfg.label}")
        return with_columns(batch, {"answers": answers, "answer_models": models})
