"""`synthalign eval mmhal`: a model (optionally with a DPO adapter) answers MMHal-Bench, a judge rates each
answer with the official prompt, and the ratings are scored as the official `eval_gpt4.py` does (mmhal.py).

Two judges behind one call, `judge(prompts) -> reviews`: any OpenAI-compatible chat endpoint (OpenAI, vLLM's
or SGLang's server, ...) over stdlib HTTP, or a local transformers causal LM. Answering runs on Ray Data with
the generation pipeline's `AnswerSampler` stage (run_pope.answer_questions); judging happens afterwards in
the driver, so a local judge never shares memory with the answering pool.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from actors.common.chat import chat_completion, endpoint
from actors.common.errors import InputError
from actors.common.files import looks_local
from cluster.resources import PoolConfig
from pipelines.evaluate.mmhal import (
    build_judge_prompt,
    load_template,
    mmhal_metrics,
    parse_rating,
    ratings_in,
)

DEFAULT_JUDGE_MODEL = "gpt-4-0314"   # what the official eval_gpt4.py asked for
DEFAULT_KEY_ENV = "OPENAI_API_KEY"


class HttpJudge:
    """POST {base}/v1/chat/completions, temperature 0 as the official script; bounded retries with backoff."""

    def __init__(self, base_url: str, model: str = DEFAULT_JUDGE_MODEL, api_key: str | None = None,
                 timeout: float = 120.0, retries: int = 4, backoff: float = 2.0, workers: int = 4,
                 max_tokens: int | None = None):
        self.url, self.model, self.api_key = endpoint(base_url), model, api_key
        self.timeout, self.retries, self.backoff, self.workers = timeout, retries, backoff, workers
        self.max_tokens = max_tokens

    def _request(self, prompt: str) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0.0}
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        return chat_completion(self.url, body, self.api_key, who="judge", field="--judge", timeout=self.timeout,
                               retries=self.retries, backoff=self.backoff)

    def __call__(self, prompts: list[str]) -> list[str]:
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            return list(pool.map(self._request, prompts))   # map keeps the order


class LocalJudge:
    """A causal LM from a hub id or folder, prompted through its chat template, greedy."""

    def __init__(self, path: str, max_new_tokens: int = 512, dtype: str = "float32", device: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from actors.common.runtime import device_for, torch_dtype
        self.torch = torch   # the driver's thread settings are left alone: this runs in the caller's process
        self.device, self.max_new_tokens = device_for(device), max_new_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype)).to(self.device).eval()

    def _review(self, prompt: str) -> str:
        tok = self.tokenizer
        if tok.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
        else:   # a base model: the prompt as is
            text = prompt
        # The template already holds any BOS token; adding special tokens again would double it.
        inp = tok(text, return_tensors="pt", add_special_tokens=not tok.chat_template).to(self.device)
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        if limit and inp["input_ids"].shape[1] + self.max_new_tokens > limit:   # else an index error deep down
            raise InputError(f"judge prompt of {inp['input_ids'].shape[1]} tokens + {self.max_new_tokens} new "
                             f"does not fit the judge model's {limit}-token context", field="--judge")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with self.torch.inference_mode():
            out = self.model.generate(**inp, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=pad)
        return tok.decode(out[0, inp["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def __call__(self, prompts: list[str]) -> list[str]:
        # One prompt at a time: judge prompts are ~1.5K tokens, padding a batch would mostly add waste.
        return [self._review(p) for p in prompts]


def is_url(spec: str) -> bool:
    return urlparse(spec).scheme in ("http", "https")


def check_judge(spec: str, key_env: str | None = None) -> None:
    """Fail on a judge that cannot work before answering starts (answering is the slow part)."""
    if not spec:
        raise InputError("a judge is required (an OpenAI-compatible URL or a causal LM folder)", field="--judge")
    if is_url(spec):
        if key_env and not os.environ.get(key_env):
            raise InputError(f"environment variable {key_env} (the judge's API key) is not set",
                             field="--judge-key-env")
    elif looks_local(spec) and not Path(spec).expanduser().is_dir():
        raise InputError("judge model folder not found", file=spec, field="--judge")


def make_judge(spec: str, model: str | None = None, key_env: str | None = None, **kwargs):
    """A URL gives an HttpJudge (key from `key_env`, default OPENAI_API_KEY if set); anything else is loaded
    as a local causal LM (folder or hub id)."""
    check_judge(spec, key_env)
    if is_url(spec):
        return HttpJudge(spec, model or DEFAULT_JUDGE_MODEL, os.environ.get(key_env or DEFAULT_KEY_ENV), **kwargs)
    return LocalJudge(str(Path(spec).expanduser()) if os.path.exists(spec) else spec, **kwargs)


def image_name(item: dict, image_dir: Path) -> str | None:
    """The file for an item: the basename of `image_src` (how the release's photos download), else
    `image_id` with a common extension."""
    names = [Path(urlparse(item["image_src"]).path).name]
    names += [item["image_id"] + ext for ext in (".jpg", ".jpeg", ".png", "")]
    return next((n for n in names if n and (image_dir / n).is_file()), None)


def check_mmhal_inputs(template, image_dir, adapter: str | None, judge: str | None, judge_key_env: str | None,
                       model: str = "", backend: str = "transformers", max_new_tokens: int = 512,
                       dtype: str | None = None):
    """Everything about the inputs that can be wrong, checked before any Ray work."""
    items = load_template(template)
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise InputError("image folder not found", file=str(image_dir))
    names = [image_name(it, image_dir) for it in items]
    missing = [it for it, n in zip(items, names) if n is None]
    if missing:
        first = Path(urlparse(missing[0]["image_src"]).path).name or missing[0]["image_id"]
        raise InputError(f"{len(missing)} image(s) named by the items are missing, first: {first} "
                         f"(image_id {missing[0]['image_id']})", file=str(image_dir))
    if adapter and not Path(adapter).is_dir():
        raise InputError("adapter folder not found", file=str(adapter), field="--adapter")
    if isinstance(judge, str) or judge is None:
        check_judge(judge or "", judge_key_env)
    from pipelines.evaluate.answer import eval_sampler
    return items, names, eval_sampler(model, backend, max_new_tokens, adapter, dtype)


def review_items(items: list[dict], judge) -> list[dict]:
    """Items with `model_answer` -> the same items plus the judge's `review` and the official `rating`."""
    reviews = judge([build_judge_prompt(it) for it in items])
    return [{**it, "review": r, "rating": parse_rating(r)} for it, r in zip(items, reviews)]


def rated(review: str) -> bool:
    """Whether the official parser found exactly one rating (else it silently scores 0)."""
    return len(ratings_in(review)) == 1


def eval_mmhal(template: str | Path, image_dir: str | Path, model: str, adapter: str | None = None,
               judge=None, judge_model: str | None = None, judge_key_env: str | None = None,
               backend: str = "transformers", out_dir: str | Path | None = None, pool: PoolConfig | None = None,
               max_new_tokens: int = 512, dtype: str | None = None) -> dict:
    """Answer, judge and score MMHal-Bench items; `judge` is a URL, a causal LM folder or a callable.

    Writes `mmhal_reviews.json` (the items with model_answer, review, rating; `synthalign eval mmhal-score`
    re-scores it) and `metrics.json` to out_dir (default eval/<template stem>).
    """
    from pipelines.evaluate.answer import answer_questions
    items, names, sampler = check_mmhal_inputs(template, image_dir, adapter, judge, judge_key_env, model,
                                               backend, max_new_tokens, dtype)
    rows = [{"question_id": i, "image": n, "text": it["question"]} for i, (it, n) in enumerate(zip(items, names))]
    answers = answer_questions(rows, Path(image_dir), sampler, pool or PoolConfig(batch_size=8))
    answered = [{**it, "model_answer": answers.get(str(i), "")} for i, it in enumerate(items)]
    if not callable(judge):
        judge = make_judge(judge, judge_model, judge_key_env)
    reviewed = review_items(answered, judge)
    metrics = mmhal_metrics(reviewed)
    # The official parser scores "no rating found" as 0; say how often that happened.
    metrics["unrated"] = sum(1 for r in reviewed if not rated(r["review"]))
    metrics["unanswered"] = sum(1 for r in reviewed if not r["model_answer"].strip())   # failed rows answer ''
    out = Path(out_dir) if out_dir else Path("eval") / Path(template).stem
    out.mkdir(parents=True, exist_ok=True)
    (out / "mmhal_reviews.json").write_text(json.dumps(reviewed, indent=2, ensure_ascii=False))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {**metrics, "reviews": str(out / "mmhal_reviews.json")}
