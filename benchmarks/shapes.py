"""The shapes-world benchmark: does PDS-DPO reduce hallucination? Base vs adapter over several seeds.

    python -m benchmarks.shapes --seeds 0 1 2 [--config configs/shapes.yaml] [--set key=value ...]

Per seed: pretrain the base (`pipelines.models.pretrain`, seed = the seed; reused when already built), then the same
library calls as `synthalign run` (generate -> DPO on Ray Train -> `world_eval`) with `prompts.seed`,
`train.seed` and the sampler seed set to it, so data, training and the held-out eval images all change with
the seed. Prints a table and checks the targets of issue 8: the adapter beats the base on every seed, POPE
accuracy +5 points on average, CHAIR_i -30% relative on average, each run (pretraining included) under 15
minutes. Writes <out>/bench.json. Exit code 0 when every target is met, 1 otherwise. An iterative config
(`rounds` > 1, e.g. configs/shapes-rounds.yaml) prints a table per round first, then checks issue 18's rounds
target (`rounds_verdict`, which decides the exit code there) and the one-round targets on the last round's adapter.
A seed's minutes count its base's recorded build (`pretrain.json`), also when the base was cached.

    python -m benchmarks.shapes --reread runs/shapes-bench/bench.json   # verdicts of a saved run, no Ray
    python -m benchmarks.shapes --grid --seeds 0 --fidelity 0.8         # reward source x fidelity x selection

`--grid` runs the fidelity grid (benchmarks/grid.py); `--reread` of its grid.json prints the grid's table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

TARGETS = {"pope_gain_points": 5.0, "chair_i_relative_drop": 0.30, "run_minutes": 15.0}
# "Does a second round help?": round 2 against round 1 on every seed; minutes are all rounds of a seed.
ROUNDS_TARGETS = {"pope_gain_points": 2.0, "run_minutes": 25.0}


def run_seed(config: str, seed: int, out: Path, models: Path, overrides: list[str], log=print,
             swap: dict | None = None) -> dict:
    """One seed's run; `swap`: stage stand-ins by pool key (the fidelity grid's oracle selection)."""
    import dataclasses

    from pipelines.config import load_config
    from pipelines.evaluate.world import run_world_eval
    from pipelines.generate.job import prepare, run_generate
    from pipelines.models.pretrain import make_shapes_base
    from pipelines.train.job import run_train
    t0 = time.time()
    base = make_shapes_base(models / f"s{seed}", seed=seed, log=log)
    pretrain = json.loads((base / "pretrain.json").read_text())
    # A base built by an earlier bench is reused; its recorded build time still counts in the run's total.
    built_s = max(time.time() - t0, pretrain.get("build_seconds", pretrain["seconds"] + pretrain.get("vision_seconds", 0)))
    cfg = load_config(config, [f"output_dir={out / f's{seed}'}", "tiny_models=null", f"train.model={base}",
                               f"prompts.seed={seed}", f"train.seed={seed}"] + overrides)
    for s in cfg.samplers:
        s.model, s.seed = str(base), seed
    t1 = time.time()
    if cfg.rounds > 1:
        return _run_rounds(cfg, seed, pretrain, built_s, t1, log)
    manifest = run_generate(cfg, overwrite=True, prepared=prepare(cfg, overwrite=True), swap=swap)
    t2 = time.time()
    train = run_train(cfg.train, None, cfg.output_dir, resume=False)
    t3 = time.time()
    # Held-out images are true renders whatever the run's images.fidelity: the eval asks about the prompt's objects.
    summary = run_world_eval(dataclasses.replace(cfg, images=dataclasses.replace(cfg.images, fidelity=1.0)), log=log)
    t4 = time.time()
    return {"seed": seed, "base": summary["base"], "adapter": summary["adapter"], "pairs": manifest["counts"]["pairs"],
            "train_steps": train["steps"], "base_val_yes_no": pretrain["val_yes_no_accuracy"],
            "seconds": {"pretrain": round(built_s, 1), "generate": round(t2 - t1, 1), "train": round(t3 - t2, 1),
                        "eval": round(t4 - t3, 1), "total": round(built_s + t4 - t1, 1)}}


def _run_rounds(cfg, seed: int, pretrain: dict, built_s: float, t1: float, log) -> dict:
    """An iterative config (`rounds` > 1) from a clean folder: every round, then base and each round's adapter."""
    from pipelines.folder import RunFolder
    from pipelines.run.rounds import prepare_rounds, round_configs, run_rounds
    for c in [cfg] + round_configs(cfg):
        RunFolder(c).clear()
    result = run_rounds(cfg, prepare_rounds(cfg, overwrite=True), log=log)
    summary, done = result["eval"], result["rounds"]
    rounds = [{**ev, "pairs": d["generate"]["counts"]["pairs"], "train_steps": d["train"]["steps"],
               "seconds": d["seconds"]} for ev, d in zip(summary["rounds"], done)]
    return {"seed": seed, "base": summary["base"], "adapter": summary["adapter"], "rounds": rounds,
            "pairs": sum(r["pairs"] for r in rounds), "train_steps": sum(r["train_steps"] for r in rounds),
            "base_val_yes_no": pretrain["val_yes_no_accuracy"],
            "seconds": {"pretrain": round(built_s, 1), **{f"round {r['round']}": r["seconds"] for r in rounds},
                        "total": round(built_s + time.time() - t1, 1)}}


def rounds_table(rows: list[dict]) -> str:
    """Per seed and round: the held-out numbers of base and each round's adapter, and the change from the base."""
    head = ("| seed | model | POPE acc | Δ points vs base | yes ratio | CHAIR_i | Δ rel vs base | CHAIR_s | "
            "caption coverage | pairs | minutes |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        b = r["base"]
        lines.append(f"| {r['seed']} | base | {b['pope']['accuracy']:.3f} | | {b['pope']['yes_ratio']:.2f} | "
                     f"{b['chair']['chair_i']:.3f} | | {b['chair']['chair_s']:.2f} | {b['chair']['coverage']:.2f} | | |")
        for m in r["rounds"]:
            gain = 100 * (m["pope"]["accuracy"] - b["pope"]["accuracy"])
            rel = m["chair"]["chair_i"] / b["chair"]["chair_i"] - 1 if b["chair"]["chair_i"] else 0.0
            lines.append(f"| {r['seed']} | round {m['round']} | {m['pope']['accuracy']:.3f} | {gain:+.1f} | "
                         f"{m['pope']['yes_ratio']:.2f} | {m['chair']['chair_i']:.3f} | {rel:+.0%} | "
                         f"{m['chair']['chair_s']:.2f} | {m['chair']['coverage']:.2f} | {m['pairs']} | "
                         f"{m['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> dict:
    gains = [100 * (r["adapter"]["pope"]["accuracy"] - r["base"]["pope"]["accuracy"]) for r in rows]
    drops = [1 - r["adapter"]["chair"]["chair_i"] / r["base"]["chair"]["chair_i"]
             if r["base"]["chair"]["chair_i"] else 0.0 for r in rows]
    minutes = [r["seconds"]["total"] / 60 for r in rows]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    checks = {"adapter beats base on every seed": all(g > 0 for g in gains) and all(d > 0 for d in drops),
              f"POPE accuracy +{TARGETS['pope_gain_points']:g} points on average": mean(gains) >= TARGETS["pope_gain_points"],
              f"CHAIR_i -{TARGETS['chair_i_relative_drop']:.0%} relative on average": mean(drops) >= TARGETS["chair_i_relative_drop"],
              f"every run under {TARGETS['run_minutes']:g} minutes": max(minutes) < TARGETS["run_minutes"]}
    return {"pope_gain_points": gains, "chair_i_relative_drop": drops, "mean_pope_gain_points": mean(gains),
            "mean_chair_i_relative_drop": mean(drops), "run_minutes": minutes, "checks": checks}


def rounds_verdict(rows: list[dict]) -> dict | None:
    """Round 2's adapter against round 1's on every seed (None unless every row has both): POPE accuracy higher,
    +2 points on average, CHAIR_i no higher; each seed's total (recorded base build + all rounds) < 25 minutes."""
    if not rows or not all({1, 2} <= {m["round"] for m in r.get("rounds", [])} for r in rows):
        return None
    seeds = []
    for r in rows:
        one, two = ({m["round"]: m for m in r["rounds"]}[k] for k in (1, 2))
        gain = 100 * (two["pope"]["accuracy"] - one["pope"]["accuracy"])
        ci = [one["chair"]["chair_i"], two["chair"]["chair_i"]]
        minutes = r["seconds"]["total"] / 60
        seeds.append({"seed": r["seed"], "pope_gain_points": gain, "chair_i": ci, "chair_i_change": ci[1] - ci[0],
                      "minutes": minutes, "base_build_minutes": r["seconds"].get("pretrain", 0.0) / 60,
                      "met": {"pope": gain > 0, "chair_i": ci[1] <= ci[0],
                              "minutes": minutes < ROUNDS_TARGETS["run_minutes"]}})
    mean = sum(s["pope_gain_points"] for s in seeds) / len(seeds)
    checks = {"round 2 beats round 1 on POPE on every seed": all(s["met"]["pope"] for s in seeds),
              f"POPE +{ROUNDS_TARGETS['pope_gain_points']:g} points on average (round 2 - round 1)":
                  mean >= ROUNDS_TARGETS["pope_gain_points"],
              "CHAIR_i no worse in round 2 on every seed": all(s["met"]["chair_i"] for s in seeds),
              f"every seed, all rounds and its recorded base build, under {ROUNDS_TARGETS['run_minutes']:g} minutes":
                  all(s["met"]["minutes"] for s in seeds)}
    return {"seeds": seeds, "mean_pope_gain_points": mean, "checks": checks, "met": all(checks.values())}


def rounds_verdict_table(rv: dict) -> str:
    head = "| seed | round 2 - round 1 (POPE points) | CHAIR_i round 1 → 2 | minutes (base build) | met |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for s in rv["seeds"]:
        missed = [k for k, ok in s["met"].items() if not ok]
        lines.append(f"| {s['seed']} | {s['pope_gain_points']:+.1f} | {s['chair_i'][0]:.3f} → {s['chair_i'][1]:.3f} | "
                     f"{s['minutes']:.1f} ({s['base_build_minutes']:.1f}) | "
                     f"{'yes' if not missed else 'no: ' + ', '.join(missed)} |")
    lines.append(f"\nmean: round 2 - round 1 {rv['mean_pope_gain_points']:+.1f} POPE points")
    lines += [f"[{'x' if ok else ' '}] {name}" for name, ok in rv["checks"].items()]
    return "\n".join(lines)


def report(rows: list[dict]) -> tuple[str, bool]:
    """The printout and whether the bench's target is met: the rounds target for an iterative run, else one round's."""
    v, rv = verdict(rows), rounds_verdict(rows)
    text = table(rows, v)
    if all("rounds" in r for r in rows):
        text = rounds_table(rows) + "\n\nlast round against the base:\n" + text
    if rv is not None:
        text += "\n\nround 2 against round 1 (issue 18's rounds target):\n" + rounds_verdict_table(rv)
    return text, rv["met"] if rv is not None else all(v["checks"].values())


def table(rows: list[dict], v: dict) -> str:
    head = ("| seed | POPE acc base | POPE acc adapter | Δ points | yes ratio base→adapter | CHAIR_i base | "
            "CHAIR_i adapter | Δ rel | CHAIR_s base→adapter | caption coverage base→adapter | pairs | minutes |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r, g, d, m in zip(rows, v["pope_gain_points"], v["chair_i_relative_drop"], v["run_minutes"]):
        b, a = r["base"], r["adapter"]
        lines.append(f"| {r['seed']} | {b['pope']['accuracy']:.3f} | {a['pope']['accuracy']:.3f} | {g:+.1f} | "
                     f"{b['pope']['yes_ratio']:.2f}→{a['pope']['yes_ratio']:.2f} | {b['chair']['chair_i']:.3f} | "
                     f"{a['chair']['chair_i']:.3f} | {-d:+.0%} | {b['chair']['chair_s']:.2f}→{a['chair']['chair_s']:.2f} | "
                     f"{b['chair']['coverage']:.2f}→{a['chair']['coverage']:.2f} | {r['pairs']} | {m:.1f} |")
    lines.append(f"\nmean: POPE accuracy {v['mean_pope_gain_points']:+.1f} points, CHAIR_i "
                 f"{-v['mean_chair_i_relative_drop']:+.0%} relative")
    lines += [f"[{'x' if ok else ' '}] {name}" for name, ok in v["checks"].items()]
    return "\n".join(lines)


def write_bench(out: Path, rows: list[dict], args) -> None:
    """<out>/bench.json: every finished seed's row and the verdict over them; `pending` lists the seeds to come."""
    from actors.common.files import atomic_write
    done = {r["seed"] for r in rows}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "bench.json", json.dumps({
        "rows": rows, "verdict": verdict(rows), "rounds_verdict": rounds_verdict(rows), "config": args.config, "overrides": args.overrides,
        "pending": [s for s in args.seeds if s not in done]}, indent=2))


def connect_quiet() -> None:
    """A local Ray of its own, quiet: the workers' per-step logs would bury the table. Its workers inherit the
    environment, so the repo on PYTHONPATH lets them import benchmarks/ stand-ins."""
    import ray

    from cluster.connect import connect
    repo = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join([repo] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    t = time.time()
    connect(dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"ray: started in {time.time() - t:.0f} s (once for all seeds)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shapes", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--config", default="configs/shapes.yaml")
    p.add_argument("--out", default="runs/shapes-bench")
    p.add_argument("--models", default=".synthalign/shapes-bench", help="pretrained bases, one folder per seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--reread", metavar="BENCH_JSON", help="print the verdicts of a saved run's rows with this code")
    g = p.add_argument_group("fidelity grid (benchmarks/grid.py)")
    g.add_argument("--grid", action="store_true", help="reward source x images.fidelity x selection, per seed")
    g.add_argument("--fidelity", type=float, nargs="+", default=[1.0, 0.8, 0.6])
    g.add_argument("--sources", nargs="+", default=["oracle", "prompt", "judge"],
                   choices=["oracle", "prompt", "judge"])
    g.add_argument("--selection", nargs="+", default=["none", "judge"], choices=["none", "judge"])
    args = p.parse_args(argv)
    if args.grid and args.out == p.get_default("out"):
        args.out = "runs/shapes-grid"
    if args.reread:
        rows = json.loads(Path(args.reread).read_text())["rows"]
        if rows and "cell" in rows[0]:   # a grid.json
            from benchmarks.grid import grid_report
            text, met = grid_report(rows)
        else:
            text, met = report(rows)
        print(text)
        return 0 if met else 1
    if args.grid:
        from benchmarks.grid import main_grid
        return main_grid(args, run_seed, connect_quiet)
    connect_quiet()
    out = Path(args.out)
    rows = []
    for seed in args.seeds:
        load = os.getloadavg()[0]
        rows.append(run_seed(args.config, seed, out, Path(args.models), args.overrides,
                             log=lambda m: print(m, flush=True)))
        # The machine's load (1-minute average at the start and end, 15-minute at the end): minutes on a shared
        # machine mean little without it.
        rows[-1]["load_avg"] = {"start": round(load, 1), "end": round(os.getloadavg()[0], 1),
                                "end_15min": round(os.getloadavg()[2], 1)}
        print(f"seed {seed}: {json.dumps(rows[-1]['seconds'])}", flush=True)
        # Written after every seed: a long run stopped part way still leaves the seeds it finished.
        write_bench(out, rows, args)
    text, met = report(rows)
    print(text)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
