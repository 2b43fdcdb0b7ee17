"""`synthalign eval pope`: a model (optionally with a DPO adapter) answers POPE questions on Ray Data,
then the answers are scored exactly as the official script does (pope.py).

The answering stage is the generation pipeline's own `AnswerSampler` (greedy, one answer) on an actor pool,
so the transformers and vLLM backends and the pool settings work the same here.
"""
from __future__ import annotations

import json
from pathlib import Path

from actors.common.errors import InputError
from actors.common.objects import POPE_SUFFIX
from actors.sampling import AnswerSampler, SamplerConfig
from cluster.resources import PoolConfig, map_batches_kwargs, map_on_pool, task_kwargs
from pipelines.evaluate.pope import load_questions, parse_pope_answer, pope_metrics


def check_images(questions: list[dict], image_dir: Path) -> None:
    if not image_dir.is_dir():
        raise InputError("image folder not found", file=str(image_dir))
    missing = sorted({q["image"] for q in questions if not (image_dir / q["image"]).is_file()})
    if missing:
        raise InputError(f"{len(missing)} image(s) named by the questions are missing, first: {missing[0]}",
                         file=str(image_dir))


DTYPES = ("float32", "float16", "bfloat16")


def model_dtype(model: str) -> str:
    """The dtype a model was saved in (its config's dtype, `torch_dtype` in older files; a multimodal config's
    text model's when the top level has none), the one it is evaluated in unless --dtype says otherwise: a 7B
    saved in float16 answers in float16, as it was trained, at half float32's memory. float32 when unknown."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the model's config ({str(e).splitlines()[0]})", file=model,
                         field="--model") from None
    text = getattr(config, "text_config", None)
    for value in (getattr(config, "dtype", None), getattr(text, "dtype", None)):
        name = str(value).removeprefix("torch.") if value is not None else None
        if name in DTYPES:
            return name
    return "float32"


def eval_sampler(model: str, backend: str, max_new_tokens: int, adapter: str | None, dtype: str | None,
                 prompt_suffix: str = "") -> SamplerConfig:
    """The answering stage of an evaluation: greedy, one answer, in `dtype` (default: the model's own)."""
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"must be one of {', '.join(DTYPES)}", field="--dtype")
    sampler = SamplerConfig(model=model, name="eval", backend=backend, n=1, temperature=0.0,
                            max_new_tokens=max_new_tokens, prompt_suffix=prompt_suffix, adapter=adapter)
    errs = sampler.validate("model")
    if errs:
        raise InputError(errs[0])
    sampler.dtype = dtype or model_dtype(model)
    return sampler


def check_pope_inputs(questions_path, image_dir, model: str, adapter: str | None = None,
                      backend: str = "transformers", max_new_tokens: int = 16, dtype: str | None = None):
    """Everything about the inputs that can be wrong, checked before any Ray work."""
    questions = load_questions(questions_path)
    check_images(questions, Path(image_dir))
    if adapter and not Path(adapter).is_dir():
        raise InputError("adapter folder not found", file=str(adapter), field="--adapter")
    return questions, eval_sampler(model, backend, max_new_tokens, adapter, dtype, POPE_SUFFIX)


def _read_images(batch, image_dir: str):
    import pyarrow as pa
    data = [(Path(image_dir) / name).read_bytes() for name in batch.column("image_file").to_pylist()]
    return batch.append_column("image", pa.array(data, pa.binary()))


def answer_questions(rows: list[dict], image_dir: Path, sampler: SamplerConfig, pool: PoolConfig) -> dict:
    """{question_id (str): answer text} for rows with question_id, image, text; errors answer ''."""
    import pyarrow as pa
    import ray.data
    ids = [str(r["question_id"]) for r in rows]
    table = pa.table({"pair_key": ids, "prompt_id": ids, "question": [r["text"] for r in rows],
                      "image_file": [r["image"] for r in rows]})
    n_blocks = max(1, min(200, len(rows) // max(1, pool.batch_size)))
    ds = ray.data.from_arrow(table).repartition(n_blocks)
    ds = ds.map_batches(_read_images, fn_kwargs={"image_dir": str(image_dir)}, batch_format="pyarrow",
                        **task_kwargs(0.25))
    ds = map_on_pool(ds, AnswerSampler, map_batches_kwargs(pool), batch_format="pyarrow",
                     fn_constructor_kwargs={"cfg": sampler, "threads": pool.threads})
    out = {}
    for batch in ds.select_columns(["pair_key", "answers"]).iter_batches(batch_format="pyarrow"):
        for key, answers in zip(batch.column("pair_key").to_pylist(), batch.column("answers").to_pylist()):
            out[key] = answers[0] if answers else ""
    return out


def eval_pope(questions_path: str | Path, image_dir: str | Path, model: str, adapter: str | None = None,
              backend: str = "transformers", out_dir: str | Path | None = None,
              pool: PoolConfig | None = None, max_new_tokens: int = 16, dtype: str | None = None) -> dict:
    """Answer and score one POPE question file; writes answers.jsonl and metrics.json to out_dir."""
    questions, sampler = check_pope_inputs(questions_path, image_dir, model, adapter, backend, max_new_tokens,
                                           dtype)
    image_dir = Path(image_dir)
    answers = answer_questions(questions, image_dir, sampler, pool or PoolConfig(batch_size=16))
    labels = [q["label"] for q in questions]
    texts = [answers.get(str(q["question_id"]), "") for q in questions]
    metrics = pope_metrics(labels, [parse_pope_answer(t) for t in texts])
    metrics["unanswered"] = sum(1 for q in questions if str(q["question_id"]) not in answers)
    out = Path(out_dir) if out_dir else Path("eval") / Path(questions_path).stem
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "answers.jsonl", "w") as f:
        for q, text in zip(questions, texts):
            f.write(json.dumps({"question_id": q["question_id"], "prompt": q["text"], "text": text,
                                "answer": text, "model_id": model, "adapter": adapter}) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {**metrics, "answers": str(out / "answers.jsonl")}
