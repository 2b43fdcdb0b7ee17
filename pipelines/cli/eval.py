"""`synthalign eval ...` subcommands, each thin over a function in pipelines/evaluate/."""
from __future__ import annotations

import json


def eval_pool(args):
    """The answering pool: --num-gpus per actor, by default one GPU when this machine has CUDA (a 7B answering
    on CPU takes hours), else none."""
    from cluster.resources import PoolConfig
    num_gpus = args.num_gpus
    if num_gpus is None:
        import torch
        num_gpus = 1.0 if torch.cuda.is_available() else 0.0
    return PoolConfig(size=args.pool_size, batch_size=args.batch_size, num_gpus=num_gpus)


def cmd_eval(args) -> int:
    if args.eval_cmd == "pope":
        from cluster.connect import connect
        from pipelines.evaluate.answer import check_pope_inputs, eval_pope
        pool = eval_pool(args)
        check_pope_inputs(args.questions, args.image_dir, args.model, args.adapter, args.backend, dtype=args.dtype)
        connect(args.address)
        result = eval_pope(args.questions, args.image_dir, args.model, args.adapter, args.backend, args.out, pool,
                           dtype=args.dtype)
    elif args.eval_cmd == "mmhal":
        from cluster.connect import connect
        from pipelines.evaluate.judge import check_mmhal_inputs, eval_mmhal
        pool = eval_pool(args)
        # A bad template, image folder, adapter or judge fails here, before Ray starts.
        check_mmhal_inputs(args.template, args.image_dir, args.adapter, args.judge, args.judge_key_env,
                           args.model, args.backend, args.max_new_tokens, args.dtype)
        connect(args.address)
        result = eval_mmhal(args.template, args.image_dir, args.model, args.adapter, args.judge, args.judge_model,
                            args.judge_key_env, args.backend, args.out, pool, args.max_new_tokens, args.dtype)
    elif args.eval_cmd == "pope-score":
        from pipelines.evaluate.pope import pope_score_cli
        result = pope_score_cli(args.questions, args.answers)
    else:
        from pipelines.evaluate.mmhal import mmhal_score_cli
        result = mmhal_score_cli(args.reviews)
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


def _answering_args(e, batch_size: int) -> None:
    """What every answering subcommand takes: the model, its adapter and backend, the pool, the Ray address."""
    e.add_argument("--model", required=True, help="VLM hub id or local folder")
    e.add_argument("--adapter", help="PEFT LoRA adapter folder (e.g. RUN/train/adapter)")
    e.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    e.add_argument("--pool-size", type=int, default=1)
    e.add_argument("--batch-size", type=int, default=batch_size)
    e.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs per answering actor (default: 1 when CUDA is available, else 0)")
    e.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="answering model's dtype (default: the one its config was saved in)")
    e.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    e.add_argument("--json", action="store_true")


def add_eval_commands(sub) -> None:
    p = sub.add_parser("eval", help="evaluation and scoring")
    esub = p.add_subparsers(dest="eval_cmd", required=True)
    e = esub.add_parser("pope", help="answer POPE questions with a model (+ adapter), then score them")
    e.add_argument("--questions", required=True, help="POPE question file (JSON Lines)")
    e.add_argument("--image-dir", required=True, help="folder with the images the questions name")
    _answering_args(e, batch_size=16)
    e.add_argument("--out", help="folder for answers.jsonl and metrics.json (default eval/<questions stem>)")
    e = esub.add_parser("mmhal", help="answer MMHal-Bench with a model (+ adapter), have a judge rate it, score")
    e.add_argument("--template", required=True, help="MMHal-Bench template (JSON array of items)")
    e.add_argument("--image-dir", required=True,
                   help="folder with the photos (named as image_src's file name, or IMAGE_ID.jpg)")
    _answering_args(e, batch_size=8)
    e.add_argument("--judge", required=True,
                   help="OpenAI-compatible base URL (http://HOST:PORT or .../v1) or a causal LM folder / hub id")
    e.add_argument("--judge-model", help="model name sent to the judge endpoint (default gpt-4-0314)")
    e.add_argument("--judge-key-env", help="environment variable holding the judge's API key "
                                           "(default OPENAI_API_KEY, sent if set)")
    e.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit")
    e.add_argument("--out", help="folder for mmhal_reviews.json and metrics.json (default eval/<template stem>)")
    e = esub.add_parser("pope-score", help="score POPE answers exactly as the official evaluate.py")
    e.add_argument("--questions", required=True)
    e.add_argument("--answers", required=True)
    e.add_argument("--json", action="store_true")
    e = esub.add_parser("mmhal-score", help="score judged MMHal-Bench reviews")
    e.add_argument("--reviews", required=True)
    e.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_eval)
