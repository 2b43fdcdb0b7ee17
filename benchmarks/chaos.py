"""Chaos soak: `synthalign generate` on a two-node local Ray cluster while a seeded schedule kills pool actors
(kill -9), the worker node's raylet (then starts the node again) and finally the driver (then resumes with the
same command); the pairs must equal those of a fault-free run of the same config, pair by pair.

The cluster's nodes are `ray start` processes of their own (nodes.py); both see the run folder.
Faults fire at random points of progress (rows in scored/), each after the stream wrote a shard since the last:
a batch retried on an actor killed again and again would use up its retries by design (cluster/resources.py).
A command that ends by itself with an error (Ray Data aborts a dataset on some actor deaths, e.g. an
ActorUnavailableError from a killed actor's batch) is resumed with the same command and counted as unplanned.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.meter import load_avg
from benchmarks.nodes import LocalCluster, clean_env, kill_pids

REPO = Path(__file__).resolve().parents[1]


def command(config: Path, out: Path, address: str, models: dict, prompts: int, sets=()) -> list[str]:
    """`synthalign generate CONFIG --address ... --set ...` (as `python -m pipelines.cli`)."""
    samplers = [{"model": str(models[m]), "name": n, "n": k, "temperature": 1.0, "max_new_tokens": 16,
                 "batch_size": 8} for m, n, k in (("llava", "tiny-llava-a", 2), ("llava-b", "tiny-llava-b", 1))]
    kv = {"output_dir": str(out), "tiny_models": "null", "prompts.num_prompts": prompts,
          "images.model": str(models["sd"]), "selection.model": str(models["clip"]),
          "rewards.text_model": str(models["reward"]), "rewards.clip_model": str(models["clip"]),
          "train.model": str(models["llava"]), "samplers": json.dumps(samplers), **dict(sets)}
    return [sys.executable, "-m", "pipelines.cli", "generate", str(config), "--address", address,
            *(a for k, v in kv.items() for a in ("--set", f"{k}={v}"))]


class Run:
    """One run folder driven by the same command until it completes; each invocation's log and actor starts."""

    def __init__(self, cmd: list[str], out: Path, env: dict, total_rows: int):
        self.cmd, self.out, self.env, self.proc, self.invocations = cmd, out, env, None, []
        self.total_rows = total_rows
        self._rows: dict[str, int] = {}
        self._starts: set[str] = set()

    def launch(self) -> None:
        self.note_starts()
        n = len(self.invocations)
        self.log = self.out.parent / f"{self.out.name}-{n}.log"
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=clean_env({**self.env, "RAY_ADDRESS": ""}),
                                         stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.invocations.append({"pid": self.proc.pid, "start": time.time()})

    def note_starts(self) -> None:
        """Actor start records (one file per actor process, .startup/ is cleared by each invocation)."""
        self._starts |= {f"{len(self.invocations)}/{p.name}" for p in (self.out / ".startup").glob("*.json")}

    def rows(self) -> int:
        """Rows in scored/ (footers read once per shard)."""
        import pyarrow.parquet as pq
        for f in (self.out / "scored").glob("shard-*.parquet"):
            if f.name not in self._rows:
                try:
                    self._rows[f.name] = pq.read_metadata(f).num_rows
                except OSError:
                    pass
        return sum(self._rows.values())

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None and "end" not in self.invocations[-1]:
            self.note_starts()
            self.invocations[-1].update(end=time.time(), rc=rc, tail=self.log.read_text()[-600:])
        return rc

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self.poll()

    @property
    def actor_starts(self) -> int:
        return len(self._starts)

    def status(self) -> str | None:
        try:
            return self.manifest()["status"]
        except (OSError, ValueError, KeyError):
            return None

    def manifest(self) -> dict:
        return json.loads((self.out / "manifest.json").read_text())


def relaunch(run: Run, relaunches: int = 5) -> None:
    """An unplanned failure (the command ended by itself with an error) is resumed with the same command."""
    if sum(1 for i in run.invocations if i.get("rc", 0) > 0) > relaunches:
        raise RuntimeError(f"generate failed {relaunches + 1} times; last:\n{run.invocations[-1]['tail']}")
    run.launch()


def finish(run: Run, deadline: float, relaunches: int = 5) -> None:
    """Wait for the command to end, resuming an unplanned failure (`relaunch`)."""
    while True:
        rc = run.poll()
        if rc == 0:
            return
        if rc is not None:
            relaunch(run, relaunches)
        if time.time() > deadline:
            run.kill()
            raise RuntimeError(f"generate did not finish in time; log {run.log}")
        run.note_starts()
        time.sleep(1)


def schedule(rng: random.Random, n: int) -> list[tuple[float, str]]:
    """`n` faults at random fractions of the rows: the driver kill last, a node kill for about one in five."""
    nodes = max(1, round((n - 1) / 5)) if n > 2 else 0
    kinds = ["node"] * nodes + ["actor"] * (n - 1 - nodes)
    rng.shuffle(kinds)
    return list(zip(sorted(rng.uniform(0.03, 0.75) for _ in range(n)), kinds + ["driver"]))


def pairs_by_id(out: Path) -> tuple[dict, int]:
    """pair_id -> the row without `stage_nodes` (which node ran a stage differs by run); and the pair rows."""
    import pyarrow.parquet as pq
    rows = [r for f in sorted((out / "pairs").glob("*.parquet"))
            for r in pq.read_table(f).drop_columns(["stage_nodes"]).to_pylist()]
    return {r["pair_id"]: r for r in rows}, len(rows)


def _gap(x, y) -> float:
    """How far apart two floats (or lists of floats) are; inf for values of another kind that differ."""
    if isinstance(x, float) and isinstance(y, float):
        return abs(x - y)
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        return max((_gap(u, v) for u, v in zip(x, y)), default=0.0)
    return 0.0 if x == y else float("inf")


def compare(want: dict, got: dict, tol: float = 1e-4) -> dict:
    """Pairs in both runs whose rows differ: at all (bytes), by column, and beyond `tol` (or in a non-float
    column): scores move by float rounding when a resumed run's blocks batch rows differently."""
    cols: dict[str, int] = {}
    differing, beyond, worst = 0, 0, 0.0
    for k in want.keys() & got.keys():
        gaps = {c: _gap(v, got[k][c]) for c, v in want[k].items() if v != got[k][c]}
        differing += bool(gaps)
        beyond += any(g > tol for g in gaps.values())
        worst = max([worst, *(g for g in gaps.values() if g != float("inf"))])
        for c in gaps:
            cols[c] = cols.get(c, 0) + 1
    return {"differing": differing, "differing_columns": cols, "max_float_diff": worst,
            "differing_beyond_rounding": beyond}


def soak(cluster: LocalCluster, run: Run, plan: list, rng: random.Random, deadline: float) -> list[dict]:
    """Drive `run` through the faults of `plan`; returns what was injected, when and at how many rows."""
    total = run.total_rows
    done, last_rows = [], -1
    run.launch()
    for frac, kind in plan:
        jitter = rng.uniform(0, 3)
        while True:   # until the stream is running past this fault's rows (a failed command is resumed)
            rc = run.poll()
            if rc == 0 or run.status() == "complete":
                break
            if rc is not None:
                relaunch(run)
            elif run.status() == "running" and run.rows() >= frac * total and run.rows() > last_rows:
                if jitter is None:
                    break
                time.sleep(jitter)   # a random moment within the batch, then look again
                jitter = None
                continue
            if time.time() > deadline:
                raise RuntimeError("the soak did not reach its faults in time")
            run.note_starts()
            time.sleep(0.5)
        if rc == 0 or run.status() == "complete":
            break   # the stream ended before this fault
        at, rows = time.time(), run.rows()
        if kind == "actor":
            wait = time.time() + 120
            while not (pids := cluster.pool_actors()) and time.time() < wait:
                time.sleep(0.5)
            if not pids:
                continue
            victim = rng.choice(pids)
            kill_pids([victim])
            what = f"pid {victim}"
        elif kind == "node":
            cluster.kill_worker_raylet()
            time.sleep(rng.uniform(1, 5))
            cluster.start_worker()
            what = "worker raylet"
        else:
            run.kill()
            what = f"driver pid {run.invocations[-1]['pid']}"
            run.launch()   # the same command resumes
        done.append({"kind": kind, "rows": rows, "target_rows": round(frac * total), "what": what,
                     "seconds": round(at - run.invocations[0]["start"], 1)})
        last_rows = rows
    finish(run, deadline)
    return done


def bench_chaos(work: Path, tiny: Path, prompts: int = 2048, faults: int = 24, seed: int = 0,
                timeout_s: float = 7200, sets=()) -> dict:
    """The soak, then a fault-free run of the same config on the same cluster; the pair sets compared."""
    from benchmarks.streaming import TINY_CONFIG
    from pipelines.models.tiny import make_tiny
    models = make_tiny(tiny)
    work = Path(work) / "chaos"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(seed)
    plan = schedule(rng, faults)
    # fuse: one chain actor per node (0.9 of its 1 CPU each)
    sets = {"pools.images.size": 2, "pools.images.num_cpus": 0.9, **dict(sets)}
    deadline = time.time() + timeout_s
    base = Path(tempfile.mkdtemp(prefix="sa-chaos-", dir="/tmp"))   # short: Ray's socket paths are limited
    cluster = LocalCluster(base)
    try:
        cluster.start()
        runs = {}
        for name in ("chaos", "reference"):
            cmd = command(TINY_CONFIG, work / name, cluster.gcs, models, prompts, sets.items())
            runs[name] = Run(cmd, work / name, cluster.env, total_rows=prompts * 2)   # tiny.yaml: 2 questions each
        injected = soak(cluster, runs["chaos"], plan, rng, deadline)
        runs["reference"].launch()
        finish(runs["reference"], deadline, relaunches=0)
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    chaos, ref = runs["chaos"], runs["reference"]
    got, n_got = pairs_by_id(chaos.out)
    want, _ = pairs_by_id(ref.out)
    m, mr = chaos.manifest(), ref.manifest()
    wall = chaos.invocations[-1]["end"] - chaos.invocations[0]["start"]
    ref_wall = ref.invocations[-1]["end"] - ref.invocations[0]["start"]
    by_kind = {k: sum(1 for f in injected if f["kind"] == k) for k in ("actor", "node", "driver")}
    return {"prompts": prompts, "seed": seed, "faults_planned": len(plan), "faults_injected": len(injected),
            "faults_by_kind": by_kind, "faults": injected,
            "survived": m["status"] == "complete" and mr["status"] == "complete",
            "invocations": len(chaos.invocations),
            "unplanned_failures": sum(1 for i in chaos.invocations if i.get("rc", 0) > 0),
            "failure_tails": [i["tail"] for i in chaos.invocations if i.get("rc", 0) > 0],
            "actor_starts": chaos.actor_starts, "reference_actor_starts": ref.actor_starts,
            "rows_retried": None,   # neither Ray Data nor the manifest counts a retried batch's rows
            "duplicates_skipped": m["counts"].get("duplicates_skipped"),
            "prompts_resumed": m["counts"]["prompts_resumed"],
            "pairs": len(got), "reference_pairs": len(want), "errors": m["counts"]["errors"],
            "reference_errors": mr["counts"]["errors"],
            "lost": len(want.keys() - got.keys()), "extra": len(got.keys() - want.keys()),
            "duplicated": n_got - len(got), **compare(want, got),
            "wall_s": round(wall, 1), "reference_wall_s": round(ref_wall, 1),
            "wall_ratio": round(wall / ref_wall, 2), "sets": sets, "load_avg_after": load_avg()}
