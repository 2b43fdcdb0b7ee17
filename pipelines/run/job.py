"""`synthalign run`: generate, train, evaluate base vs adapter (when the config has `eval:`), then the report."""
from __future__ import annotations

from pipelines.config import RunConfig
from pipelines.evaluate.world import run_world_eval
from pipelines.folder import RunFolder
from pipelines.generate.job import run_generate
from pipelines.report.report import write_report
from pipelines.train.job import run_train


def train_run(cfg: RunConfig, data: str | None = None) -> dict:
    """Train on a run folder's pairs (or `data`), recording the recipe first so a later config is compared."""
    folder = RunFolder(cfg)
    folder.claim_train()
    return run_train(cfg.train, data or cfg.train.data or str(folder.pairs), cfg.output_dir)


def prepare_run(cfg: RunConfig, overwrite: bool = False):
    """What `run_all` needs checked before Ray starts (every round's folder when `rounds` > 1)."""
    if cfg.rounds > 1:
        from pipelines.run.rounds import prepare_rounds
        return prepare_rounds(cfg, overwrite)
    from pipelines.generate.job import prepare
    return prepare(cfg, overwrite=overwrite, train=True)


def run_all(cfg: RunConfig, prepared, log=print, clock: dict | None = None) -> dict:
    """The whole job on the connected Ray cluster; `prepared` comes from `prepare_run(cfg, ...)`. `clock`: the
    CLI's startup figures for the generate manifest (first round only)."""
    if cfg.rounds > 1:
        from pipelines.run.rounds import run_rounds
        return run_rounds(cfg, prepared, log)
    manifest = run_generate(cfg, prepared=prepared, clock=clock)
    c = manifest["counts"]
    log(f"pairs: {c['pairs']} of {c['questions']} image-questions -> {RunFolder(cfg).pairs}")
    summary = train_run(cfg)
    log(f"train: {summary['steps']} steps, final loss {summary['final_loss']} -> {summary['adapter']}")
    evaluation = None
    if cfg.eval:
        evaluation = run_world_eval(cfg, log)
        log(f"eval: {RunFolder(cfg).eval_summary}")
    md, html = write_report(cfg.output_dir)
    log(f"report: {md} and {html}")
    return {"generate": manifest, "train": summary, "eval": evaluation, "report": [str(md), str(html)]}
