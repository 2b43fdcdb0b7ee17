"""`rounds: N` - iterative on-policy DPO. Each round is an ordinary run folder, `<output_dir>/rounds/<r>/`.

Round r's config is derived from the run's (`round_config`): its own output folder, fresh prompts (the prompt
generator's namespace for round r, which no other round and not the eval set draws from), and for r >= 2 the
policy after round r-1: samplers with `on_policy: true` load round r-1's adapter (transformers) or merged weights
(vllm), and training continues that adapter (`train.init_adapter`). The round's data hash includes round r-1's
train hash (`previous`), so a changed earlier round makes every later round stale. A round that is complete is
skipped, its files untouched; an interrupted round resumes as any run folder does (scored/ shards, Ray Train
checkpoints). Round 1 hashes as the same config with `rounds: 1` would.

The top folder holds `manifest.json` (every round's hashes, status and counts), `eval/` (base and every
round's adapter on one held-out set) and the report.
"""
from __future__ import annotations

import copy
import json
import time

from actors.common.errors import InputError
from pipelines.config import RunConfig
from pipelines.folder import RunFolder


def round_dir(cfg: RunConfig, r: int):
    return RunFolder.at(cfg.output_dir).round_dir(r)


def round_config(cfg: RunConfig, r: int) -> RunConfig:
    """The run config of round r (1-based): a plain one-round config of its own folder."""
    c = cfg.for_later_rounds() if r >= 2 else copy.deepcopy(cfg)
    c.rounds, c.output_dir, c.eval = 1, str(round_dir(cfg, r)), None   # the top folder evaluates every round
    c.later_rounds = None
    c.prompts.round = r
    on_policy = [s.on_policy for s in c.samplers]
    for s, given in zip(c.samplers, on_policy):
        s.on_policy = False   # resolved here: the round's config names the weights it samples
        if given:             # the policy being trained: train.model (+ the round before's adapter, below)
            s.model = c.train.model
    if r == 1:
        return c
    prev = round_config(cfg, r - 1)
    paths = RunFolder.at(prev.output_dir).train_paths()
    c.previous = prev.train_hash()
    c.train.init_adapter = str(paths["adapter"])
    for s, given in zip(c.samplers, on_policy):
        if given and s.backend == "vllm":
            s.model = str(paths["merged"])
        elif given:
            s.adapter = str(paths["adapter"])
    return c


def round_configs(cfg: RunConfig) -> list[RunConfig]:
    return [round_config(cfg, r) for r in range(1, cfg.rounds + 1)]


def round_done(c: RunConfig) -> bool:
    """Generated, trained and unchanged: a rerun leaves it alone."""
    folder = RunFolder(c)
    m = folder.manifest()
    return (m is not None and m.get("status") == "complete" and folder.stale_data() is None
            and folder.stale_train() is None and folder.trained())


def prepare_rounds(cfg: RunConfig, overwrite: bool = False):
    """Before Ray starts: round 1's models, prompts and recipe; then every round folder is checked (a stale one is
    an error naming it, or cleared with overwrite) before anything is removed. Returns round 1's `prepare`."""
    from pipelines.generate.job import prepare
    configs = round_configs(cfg)
    top = RunFolder(cfg)
    if (top.manifest() or {"rounds": []}).get("rounds") is None:   # a one-round run's folder
        if not overwrite:
            raise InputError("holds a one-round run; use another output_dir or pass --overwrite", file=str(top.root))
        top.clear()
    if not overwrite:
        for c in configs:
            RunFolder(c).prepare(overwrite=False, train=True)   # raises on a stale round, removes nothing
    first = prepare(configs[0], overwrite, train=True)
    for c in configs[1:]:
        RunFolder(c).prepare(overwrite, train=True)
    return first


def _round_record(c: RunConfig, r: int, on_policy: list[str]) -> dict:
    m = RunFolder(c).manifest() or {}
    summary = RunFolder.at(c.output_dir).train_paths()["summary"]
    train = json.loads(summary.read_text()) if summary.exists() else None
    return {"round": r, "output_dir": c.output_dir, "data_hash": c.hash(), "train_hash": c.train_hash(),
            "previous": c.previous, "status": m.get("status", "pending"), "counts": m.get("counts"),
            "on_policy_samplers": on_policy if r > 1 else [],
            "train": {k: train.get(k) for k in ("steps", "final_loss", "init_adapter", "reference")} if train else None}


def write_rounds_manifest(cfg: RunConfig, status: str) -> dict:
    """The top folder's manifest: the run's config and every round's record."""
    on_policy = [s.label for s in cfg.samplers if s.on_policy]
    records = [_round_record(c, r, on_policy) for r, c in enumerate(round_configs(cfg), 1)]
    manifest = {"config": cfg.to_dict(), "status": status, "rounds": records,
                "counts": {"rounds": cfg.rounds, "pairs": sum((x["counts"] or {}).get("pairs", 0) for x in records)}}
    top = RunFolder.at(cfg.output_dir)
    top.root.mkdir()
    top.manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest


def run_rounds(cfg: RunConfig, prepared, log=print) -> dict:
    """Every round in turn (generate -> train; a complete one skipped), then base and every round's adapter on the
    held-out set, then the report. `prepared` comes from `prepare_rounds`."""
    from pipelines.generate.job import prepare, run_generate
    from pipelines.report.report import write_report
    from pipelines.train.job import run_train
    results = []
    for r, c in enumerate(round_configs(cfg), 1):
        t0 = time.time()
        if round_done(c):
            log(f"round {r}: complete, kept as it is ({c.output_dir})")
            results.append({"round": r, "skipped": True})
            continue
        write_rounds_manifest(cfg, f"running round {r}")
        manifest = run_generate(c, prepared=prepared if r == 1 else prepare(c, train=True))
        log(f"round {r}: pairs {manifest['counts']['pairs']} of {manifest['counts']['questions']} -> {c.output_dir}")
        RunFolder(c).claim_train()   # as `run` does: the recipe first, so a later config is compared with it
        summary = run_train(c.train, str(RunFolder(c).pairs), c.output_dir)
        log(f"round {r}: train {summary['steps']} steps, final loss {summary['final_loss']}")
        write_report(c.output_dir)
        results.append({"round": r, "generate": manifest, "train": summary, "seconds": round(time.time() - t0, 1)})
    write_rounds_manifest(cfg, "trained")
    evaluation = None
    if cfg.eval:
        from pipelines.evaluate.world import run_world_eval
        adapters = [(f"round-{r}", str(RunFolder(c).train_paths()["adapter"])) for r, c in
                    enumerate(round_configs(cfg), 1)]
        evaluation = run_world_eval(cfg, log, adapters=adapters)
    manifest = write_rounds_manifest(cfg, "complete")
    md, html = write_report(cfg.output_dir)
    log(f"report: {md} and {html}")
    return {"rounds": results, "manifest": manifest, "eval": evaluation, "report": [str(md), str(html)]}
