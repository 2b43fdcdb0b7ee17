"""The shapes fidelity grid: which reward source survives renders that do not show what the prompt says?

    python -m benchmarks.shapes --grid [--seeds 0 1] [--fidelity 0.8] [--sources oracle prompt judge]
                                       [--selection none judge]

Per seed and cell (reward source x `images.fidelity` x selection) the same run as the one-round bench (pretrained
base -> generate -> DPO -> world eval of base vs adapter on true renders):
- source prompt: hallucination + coverage against `gt_objects`, the prompt's objects (the product today);
- source oracle: the same terms against the truth of the chosen image (`OracleSelection`, a stand-in swapped in
  for the selection stage here only: the truth never reaches the product);
- source judge: the hallucination term replaced by the judge term (claims the teacher refutes on the image);
  coverage stays against the prompt's objects, the only object list the product has;
- selection none: one candidate; judge: K=4 candidates, the one the teacher sees the prompt's objects in best.
The judge is a teacher (`pipelines.models.pretrain.make_shapes_judge`), built once under --models. Writes
<out>/grid.json after every cell (merged with the cells an earlier command left there); `--reread
<out>/grid.json` prints it again. Exit code 0 when the targets at fidelity 0.8 on seeds 0-4 are met.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from actors.select import ImageSelection

SOURCES = ("oracle", "prompt", "judge")
FIDELITIES = (1.0, 0.8, 0.6)
SELECTIONS = ("none", "judge")
CANDIDATES = 4   # best-of-K under judge selection
# The targets: at this fidelity on these seeds, judge selection + judge reward against the oracle
# (without selection: rewards that know what was drawn, whatever it was) and against today's prompt rewards.
TARGET = {"fidelity": 0.8, "seeds": (0, 1, 2, 3, 4), "share_of_oracle": 0.8,
          "cell": ("judge", "judge"), "oracle": ("oracle", "none"), "baseline": ("prompt", "none")}


def cell_name(source: str, fidelity: float, selection: str) -> str:
    return f"{source}-f{fidelity:g}-{selection}"


def cell_overrides(source: str, fidelity: float, selection: str, judge: str) -> list[str]:
    """The config overrides of one cell over the shapes config (`judge`: the teacher's folder)."""
    if source not in SOURCES or selection not in SELECTIONS:
        raise ValueError(f"unknown cell {source}/{selection}")
    out = [f"images.fidelity={fidelity}"]
    if selection == "judge":
        out += [f"images.per_scale={CANDIDATES}", "selection.scorer=judge", f"selection.model={judge}"]
    else:
        out += ["images.per_scale=1", "selection.scorer=none"]
    if source == "judge":
        out += ["rewards.weights.hallucination=0.0", "rewards.weights.coverage=1.0", "rewards.weights.judge=1.0",
                f"rewards.judge_model={judge}"]
    else:
        out += ["rewards.weights.hallucination=1.0", "rewards.weights.coverage=1.0"]
    return out


def truth(image_prompt: str, seed: int, fidelity: float) -> list[str]:
    """The object classes the render of (prompt, seed) at `fidelity` really shows."""
    from actors.common.shapes import drawn_objects, render
    return drawn_objects(render(image_prompt, seed, with_layout=True, fidelity=fidelity)[1])


def prompt_objects(image_prompt: str) -> list[str]:
    from actors.common.shapes import parse_prompt
    return sorted({cls for cls, _, _ in parse_prompt(image_prompt)[0]})


class OracleSelection(ImageSelection):
    """The real selection, then `gt_objects` replaced by the truth of the chosen image (`FIDELITY`: the render's;
    a subclass per fidelity from `oracle_selection`)."""
    FIDELITY = 1.0

    def _process(self, batch):
        import pyarrow as pa
        out = super()._process(batch)
        real = [truth(p, s, self.FIDELITY) for p, s in zip(out.column("image_prompt").to_pylist(),
                                                           out.column("seed").to_pylist())]
        i = out.column_names.index("gt_objects")
        return out.set_column(i, "gt_objects", pa.array(real, pa.list_(pa.string())))


def oracle_selection(fidelity: float) -> type:
    """An `OracleSelection` for renders at `fidelity`. Not a module attribute, so Ray pickles the class by value
    (its base by reference: benchmarks/ must be importable on the workers, as it is with the repo on the path)."""
    return type(f"OracleSelection{round(fidelity * 100)}", (OracleSelection,), {"FIDELITY": fidelity})


def exact_share(scored: Path, fidelity: float) -> float:
    """Share of the run's chosen images (one per prompt) that show exactly the prompt's objects."""
    import pyarrow.dataset as pads
    t = pads.dataset(str(scored), format="parquet").to_table(columns=["prompt_id", "image_prompt", "seed"])
    chosen = {pid: (p, s) for pid, p, s in zip(*(t.column(c).to_pylist() for c in t.column_names))}
    exact = sum(truth(p, s, fidelity) == prompt_objects(p) for p, s in chosen.values())
    return exact / len(chosen) if chosen else 0.0


def run_cell(run_seed, config: str, source: str, fidelity: float, selection: str, seed: int, out: Path,
             models: Path, judge: str, overrides: list[str], log=print) -> dict:
    """One cell of one seed through `run_seed` (benchmarks.shapes: handed in, so this module never imports it)."""
    name = cell_name(source, fidelity, selection)
    swap = {"selection": oracle_selection(fidelity)} if source == "oracle" else None
    t0 = time.time()
    row = run_seed(config, seed, out / name, models, cell_overrides(source, fidelity, selection, judge) + overrides,
                   log=log, swap=swap)
    cell_s = time.time() - t0
    folder = out / name / f"s{seed}" / "scored"
    return {**row, "cell": name, "source": source, "fidelity": fidelity, "selection": selection,
            "exact_share": round(exact_share(folder, fidelity), 4), "cell_minutes": round(cell_s / 60, 2)}


def gains(row: dict) -> tuple[float, float]:
    """(POPE accuracy gain in points, CHAIR_i relative drop) of the adapter over the base."""
    b, a = row["base"], row["adapter"]
    drop = 1 - a["chair"]["chair_i"] / b["chair"]["chair_i"] if b["chair"]["chair_i"] else 0.0
    return 100 * (a["pope"]["accuracy"] - b["pope"]["accuracy"]), drop


def grid_table(rows: list[dict]) -> str:
    head = ("| source | fidelity | selection | seed | POPE acc base | adapter | Δ points | CHAIR_i base | adapter | "
            "Δ rel | exact images | pairs | minutes |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (-r["fidelity"], SOURCES.index(r["source"]), r["selection"], r["seed"])):
        g, d = gains(r)
        b, a = r["base"], r["adapter"]
        lines.append(f"| {r['source']} | {r['fidelity']:g} | {r['selection']} | {r['seed']} | "
                     f"{b['pope']['accuracy']:.3f} | {a['pope']['accuracy']:.3f} | {g:+.1f} | "
                     f"{b['chair']['chair_i']:.3f} | {a['chair']['chair_i']:.3f} | {-d:+.0%} | "
                     f"{r['exact_share']:.2f} | {r['pairs']} | {r['cell_minutes']:.1f} |")
    return "\n".join(lines)


def grid_verdict(rows: list[dict], target: dict = TARGET) -> dict:
    """The issue's targets on the rows at target fidelity: the judge cell's mean POPE gain and mean CHAIR_i
    relative drop each >= share_of_oracle of the oracle cell's, and the judge cell above the baseline cell on
    POPE accuracy and below it on CHAIR_i on every seed. Checked only on the seeds all three cells have; a
    target seed missing from any cell leaves every check unmet."""
    at = {(r["source"], r["selection"], r["seed"]): r for r in rows if r["fidelity"] == target["fidelity"]}
    cells = {k: target[k] for k in ("cell", "oracle", "baseline")}
    seeds = [s for s in target["seeds"] if all((*c, s) in at for c in cells.values())]
    missing = [s for s in target["seeds"] if s not in seeds]
    if not seeds:
        return {"seeds": [], "missing_seeds": missing, "checks": {"no seed has all three cells": False}}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    per = {k: [gains(at[(*c, s)]) for s in seeds] for k, c in cells.items()}
    pope = {k: mean([g for g, _ in v]) for k, v in per.items()}
    chair = {k: mean([d for _, d in v]) for k, v in per.items()}
    share = target["share_of_oracle"]
    beats = [gj > gb and dj > db for (gj, dj), (gb, db) in zip(per["cell"], per["baseline"])]
    done = not missing
    checks = {f"POPE gain >= {share:.0%} of the oracle's (mean)": done and pope["cell"] >= share * pope["oracle"],
              f"CHAIR_i drop >= {share:.0%} of the oracle's (mean)": done and chair["cell"] >= share * chair["oracle"],
              "beats prompt rewards without selection on every seed": done and all(beats)}
    return {"seeds": seeds, "missing_seeds": missing, "mean_pope_gain_points": pope,
            "mean_chair_i_relative_drop": chair, "beats_baseline": beats, "checks": checks}


def verdict_text(v: dict) -> str:
    lines = [f"\ntargets at fidelity {TARGET['fidelity']:g}, seeds {list(TARGET['seeds'])}: checked on seeds "
             f"{v['seeds']}" + (f"; not run: {v['missing_seeds']}" if v["missing_seeds"] else "")]
    if "mean_pope_gain_points" in v:
        for k, c in (("cell", TARGET["cell"]), ("oracle", TARGET["oracle"]), ("baseline", TARGET["baseline"])):
            lines.append(f"  {c[0]} rewards, {c[1]} selection: POPE {v['mean_pope_gain_points'][k]:+.1f} points, "
                         f"CHAIR_i {-v['mean_chair_i_relative_drop'][k]:+.0%} (mean)")
    lines += [f"[{'x' if ok else ' '}] {name}" for name, ok in v["checks"].items()]
    return "\n".join(lines)


def main_grid(args, run_seed, connect_quiet) -> int:
    """`python -m benchmarks.shapes --grid`: the shapes benchmark hands in its run and Ray functions."""
    import ray

    from pipelines.models.pretrain import make_shapes_judge
    out, models = Path(args.out), Path(args.models)
    log = lambda m: print(m, flush=True)  # noqa: E731
    cells = [(s, f, sel) for f in args.fidelity for s in args.sources for sel in args.selection]
    teacher = {}
    if any("judge" in (s, sel) for s, _, sel in cells):
        t = time.time()
        judge = make_shapes_judge(models / "judge", log=log)
        stats = json.loads((judge / "pretrain.json").read_text())
        teacher = {"folder": str(judge), "val_yes_no_accuracy": stats["val_yes_no_accuracy"],
                   "steps": stats["steps"], "build_minutes": round(stats["build_seconds"] / 60, 1),
                   "this_run_seconds": round(time.time() - t, 1)}
        log(f"judge teacher: held-out yes/no accuracy {teacher['val_yes_no_accuracy']:.3f} "
            f"({teacher['steps']} steps, built in {teacher['build_minutes']} min)")
    connect_quiet()
    rows, every = [], []
    try:
        for seed in args.seeds:
            for source, fidelity, selection in cells:
                rows.append(run_cell(run_seed, args.config, source, fidelity, selection, seed, out, models,
                                     teacher.get("folder", ""), args.overrides, log))
                log(f"cell {rows[-1]['cell']} seed {seed}: {rows[-1]['cell_minutes']} min")
                every = write_grid(out, rows, teacher, args)
    finally:
        ray.shutdown()
    text, met = grid_report(every)
    print(text)
    return 0 if met else 1


def grid_report(rows: list[dict]) -> tuple[str, bool]:
    """The table, the targets' verdict, and whether every target is met."""
    v = grid_verdict(rows)
    return grid_table(rows) + "\n" + verdict_text(v), all(v["checks"].values())


def merged(old: list[dict], new: list[dict]) -> list[dict]:
    """The rows of an earlier grid.json that this run did not redo (same cell and seed), then this run's."""
    redone = {(r["cell"], r["seed"]) for r in new}
    return [r for r in old if (r["cell"], r["seed"]) not in redone] + new


def write_grid(out: Path, rows: list[dict], teacher: dict, args) -> list[dict]:
    """<out>/grid.json: this run's rows merged over the file's, so cells run by separate commands (at the same
    time too: the merge holds a lock) add up."""
    import fcntl

    from actors.common.files import atomic_write
    out.mkdir(parents=True, exist_ok=True)
    path = out / "grid.json"
    with open(out / ".grid.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if path.exists() else {}
        rows = merged(old.get("rows", []), rows)
        atomic_write(path, json.dumps({"rows": rows, "teacher": teacher or old.get("teacher", {}),
                                       "verdict": grid_verdict(rows), "config": args.config,
                                       "overrides": args.overrides}, indent=2))
    return rows
