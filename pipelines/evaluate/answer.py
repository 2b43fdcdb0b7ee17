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


def check_pope_inputs(questions_path, image_dir, model: str, adapter: str | None = None,
                      backend: str = "transformers", max_new_tokens: int = 16):
    """Everything about the inputs that can be wrong, checked before any Ray work."""
    questions = load_questions(questions_path)
    check_images(questions, Path(image_dir))
    if adapter and not Path(adapter).is_dir():
        raise InputError("adapter folder not found", file=str(adapter), field="--adapter")
    sampler = SamplerConfig(model=model, name="eval", backend=backend, n=1, temperature=0.0,
                            max_new_tokens=max_new_tokens, prompt_suffix=POPE_SUFFIX, adapter=adapter)
    errs = sampler.validate("model")
    if errs:
        raise InputError(errs[0])
    return questions, sampler


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
              pool: PoolConfig | None = None, max_new_tokens: int = 16) -> dict:
    """Answer and score one POPE question file; writes answers.jsonl and metrics.json to out_dir."""
    questions, sampler = check_pope_inputs(questions_path, image_dir, model, adapter, backend, max_new_tokens)
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
