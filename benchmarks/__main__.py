"""`python -m benchmarks --out DIR [--only ...]`: the benchmark suite; writes results.json and results.md.

Run from a clone of the repository (the benchmarks are not part of the installed package)."""
from __future__ import annotations

import json
import os


def _ints(text: str, field: str = "") -> tuple[int, ...]:
    from actors.common.errors import InputError
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise InputError(f"expected comma-separated whole numbers, got {text!r}", field=field) from None


def _shape(text: str | None) -> dict | None:
    """`images=4,sampling=1,selection=0.5,rewards=0.5` -> GPUs per pool (sampling: per sampler)."""
    if not text:
        return None
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        out[key.strip()] = float(value)
    return out


def cmd_bench(args) -> int:
    from actors.common.errors import InputError
    from benchmarks.suite import BENCHMARKS, run_bench
    only = tuple(x.strip() for x in args.only.split(",") if x.strip())
    unknown = [x for x in only if x not in BENCHMARKS]
    if unknown:
        raise InputError(f"unknown benchmark(s) {unknown} (known: {', '.join(BENCHMARKS)})", field="--only")
    prompts = _ints(args.prompts, "--prompts")   # bad input fails before Ray starts
    if not prompts or min(prompts) < 1:
        raise InputError(f"expected prompt counts >= 1, got {args.prompts!r}", field="--prompts")
    ray_start_s = None
    if set(only) - {"cluster", "chaos"}:  # the cluster simulation and the chaos soak start their own Ray
        import time

        import ray

        from cluster.connect import connect
        t0, fresh = time.time(), not ray.is_initialized()
        connect(args.address)
        if fresh and not (args.address or os.environ.get("RAY_ADDRESS")):   # a local Ray this command started
            ray_start_s = time.time() - t0
    sim = {"prompts": args.sim_prompts, "scale": args.cost_scale, "gpus": args.gpus, "nodes": args.nodes,
           "shape": _shape(args.shape)}
    results = run_bench(args.out, only, tiny=args.tiny, prompts=prompts, repeats=args.repeats, sizes=_ints(args.scaling_sizes),
                        train_steps=args.train_steps, sim=sim,
                        scale={"sizes": _ints(args.scale_sizes), "px": args.scale_px,
                               "fold_pairs": args.scale_fold_pairs,
                               "gen": {"sim": _ints(args.scale_gen_sim), "real": _ints(args.scale_gen_real),
                                       "prompt_s": args.scale_gen_prompt_s,
                                       "sim_overrides": [f"rows_per_shard={args.scale_gen_sim_shard_rows}"]}},
                        ray_start_s=ray_start_s, chaos={"faults": args.chaos_faults, "seed": args.chaos_seed})
    print(json.dumps(results, indent=2))
    print(f"-> {args.out}/results.json, {args.out}/results.md")
    return 0


def build_parser():
    import argparse
    p = argparse.ArgumentParser(prog="python -m benchmarks",
                                description="performance benchmarks (streaming, scaling, training, cluster simulation)")
    p.add_argument("--out", required=True, help="folder for results.json, results.md and the runs")
    p.add_argument("--only", default="streaming,scaling,training,cluster,scale",
                   help="comma-separated subset of streaming,scaling,training,cluster,scale,chaos (chaos: "
                        "only when named)")
    p.add_argument("--prompts", default="2048", help="streaming: prompts (pipeline vs loop); several, e.g. 512,2048, "
                   "run one after the other; chaos: the first")
    p.add_argument("--repeats", type=int, default=1, help="streaming: loop/pipeline pairs per size, run in turn "
                   "(the pair with the median ratio is reported, every pair listed)")
    p.add_argument("--scaling-sizes", default="500,2250", help="scaling: prompts per run (2K-vs-9K proportions)")
    p.add_argument("--train-steps", type=int, default=30, help="training: DPO steps per run")
    p.add_argument("--sim-prompts", type=int, default=1200, help="cluster: prompts through the simulated cluster")
    p.add_argument("--cost-scale", type=float, default=0.05,
                   help="cluster: factor on the A100 per-item seconds (at 0.05 Ray's per-batch overhead here is "
                        "1-6%% of a batch)")
    p.add_argument("--gpus", type=int, default=8, help="cluster: GPUs per node of the planned shape (`synthalign plan`)")
    p.add_argument("--nodes", type=int, default=1, help="cluster: nodes of the planned shape")
    p.add_argument("--shape", default="images=4,sampling=1,selection=0.5,rewards=0.5",
                   help="cluster: a given shape to simulate as well, GPUs per pool (sampling: each sampler)")
    p.add_argument("--scale-sizes", default="1000,16000", help="scale: pairs per training run (two sizes)")
    p.add_argument("--scale-fold-pairs", type=int, help="scale: pairs under the resume's one new shard "
                   "(default: the larger of --scale-sizes)")
    p.add_argument("--scale-px", type=int, default=512, help="scale: image side of the synthetic pairs")
    p.add_argument("--scale-gen-sim", default="2000,20000", help="scale: prompts per generation run with the "
                   "cluster simulation's stand-in stages (driver memory; empty: none)")
    p.add_argument("--scale-gen-real", default="", help="scale: prompts per generation run of configs/tiny.yaml "
                   "with its tiny models (20K: ~35 min of 2 cores; empty: none)")
    p.add_argument("--scale-gen-prompt-s", type=float, default=0.005, help="scale: stand-in seconds a prompt")
    p.add_argument("--scale-gen-sim-shard-rows", type=int, default=256,
                   help="scale: rows_per_shard of the stand-in runs (tiny.yaml's 8 would make 5,000 write tasks)")
    p.add_argument("--chaos-faults", type=int, default=24, help="chaos: faults to inject (about one in five a "
                   "worker node's raylet, the last the driver, the rest pool actors); its prompts: --prompts")
    p.add_argument("--chaos-seed", type=int, default=0, help="chaos: seed of the fault schedule")
    p.add_argument("--tiny", help="tiny models folder (default OUT/tiny)")
    p.add_argument("--address", help="Ray address to attach to (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv=None) -> int:
    import sys

    from pipelines.cli import USER_ERRORS
    args = build_parser().parse_args(argv)
    try:
        return cmd_bench(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"benchmarks: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
