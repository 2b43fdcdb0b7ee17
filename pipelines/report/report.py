"""`synthalign report RUN`: report.md and a self-contained report.html with PNG plots of a run.

Sections whose data is not there yet (no training, no evaluation) say so instead of failing.
"""
from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter

from actors.common.errors import InputError
from cluster.storage import Location, read_schema, read_table
from pipelines.folder import RunFolder
from pipelines.layout import RunLayout
from pipelines.train.job import read_metrics


def _column(folder: Location, column: str) -> list:
    values = []
    for f in folder.glob("*.parquet"):
        if column in read_schema(f).names:
            values += read_table(f, [column]).column(column).to_pylist()
    return values


def _plot(path: Location, draw) -> Location:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    draw(ax)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    return path.write_bytes(png.getvalue())


def _binnable(values: list) -> list:
    # Values equal but for the last bits (z-scored rewards often are) make a range numpy cannot cut into bins;
    # rounded, they are equal and numpy draws one bin around them.
    return [round(v, 9) for v in values]


def _rewards(ax, pairs: Location):
    chosen, rejected = _binnable(_column(pairs, "chosen_reward")), _binnable(_column(pairs, "rejected_reward"))
    ax.hist([chosen, rejected], bins=20, label=["chosen", "rejected"], alpha=0.8)
    ax.set_xlabel("combined reward")
    ax.set_ylabel("pairs")
    ax.legend()


def _margins(ax, pairs: Location):
    ax.hist(_binnable(_column(pairs, "margin")), bins=20, color="tab:green")
    ax.set_xlabel("margin (chosen - rejected)")
    ax.set_ylabel("pairs")


def _models(ax, pairs: Location):
    chosen, rejected = Counter(_column(pairs, "chosen_model")), Counter(_column(pairs, "rejected_model"))
    names = sorted(set(chosen) | set(rejected))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [chosen[n] for n in names], width=0.4, label="chosen")
    ax.bar([x + 0.2 for x in xs], [rejected[n] for n in names], width=0.4, label="rejected")
    ax.set_xticks(list(xs), names, rotation=15, fontsize=8)
    ax.set_ylabel("pairs")
    ax.legend()


def _training(ax, metrics: list[dict]):
    steps = [m["step"] for m in metrics if "loss" in m]
    ax.plot(steps, [m["loss"] for m in metrics if "loss" in m], label="DPO loss")
    margins = [m.get("rewards/margins") for m in metrics if "loss" in m]
    if all(v is not None for v in margins):
        ax.plot(steps, margins, label="reward margin")
    ax.set_xlabel("step")
    ax.legend()


def _eval_table(summary: dict) -> list[str]:
    rows = ["| metric | base | adapter |", "| --- | --- | --- |"]
    for group in ("pope", "chair", "mmhal"):
        keys = sorted(set(summary.get("base", {}).get(group, {})) | set(summary.get("adapter", {}).get(group, {})))
        for k in keys:
            b = summary.get("base", {}).get(group, {}).get(k)
            a = summary.get("adapter", {}).get(group, {}).get(k)
            fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("—" if v is None else str(v))  # noqa: E731
            rows.append(f"| {group} {k} | {fmt(b)} | {fmt(a)} |")
    return rows


def _eval_bars(ax, summary: dict):
    """Base and adapter side by side: POPE accuracy per negative strategy, then CHAIR_i and CHAIR_s."""
    labels, base, adapter = [], [], []
    for name, get in [(f"POPE {s}", lambda m, s=s: m.get("pope_by_strategy", {}).get(s, {}).get("accuracy"))
                      for s in summary.get("base", {}).get("pope_by_strategy", {})] + \
                     [("POPE acc", lambda m: m.get("pope", {}).get("accuracy")),
                      ("CHAIR_i", lambda m: m.get("chair", {}).get("chair_i")),
                      ("CHAIR_s", lambda m: m.get("chair", {}).get("chair_s"))]:
        b, a = get(summary.get("base", {})), get(summary.get("adapter", {}))
        if b is not None and a is not None:
            labels.append(name)
            base.append(b)
            adapter.append(a)
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], base, width=0.4, label="base")
    ax.bar([i + 0.2 for i in x], adapter, width=0.4, label="adapter")
    ax.set_xticks(list(x), labels, fontsize=7, rotation=15)
    ax.set_ylim(0, 1)
    ax.legend()


def _rounds_section(run: RunLayout, manifest: dict, plots_dir: Location) -> tuple[list[str], list]:
    """An iterative run: one row per round (its data, training and held-out numbers), base first; a plot of the
    held-out numbers over rounds. Each round's own report is in its folder."""
    path = run.eval_summary
    summary = json.loads(path.read_text()) if path.exists() else {}
    evals = {r["round"]: r for r in summary.get("rounds", [])}
    if "base" in summary:
        evals[0] = summary["base"]
    fmt = lambda v: "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    md = ["## Rounds", "", "| round | pairs | train steps | final loss | POPE acc | yes ratio | CHAIR_i | CHAIR_s |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = [{"round": 0}] + manifest["rounds"]
    for rec in rows:
        r, ev = rec["round"], evals.get(rec["round"], {})
        train = rec.get("train") or {}
        md.append(f"| {'base' if r == 0 else r} | {fmt((rec.get('counts') or {}).get('pairs'))} | "
                  f"{fmt(train.get('steps'))} | {fmt(train.get('final_loss'))} | "
                  f"{fmt(ev.get('pope', {}).get('accuracy'))} | {fmt(ev.get('pope', {}).get('yes_ratio'))} | "
                  f"{fmt(ev.get('chair', {}).get('chair_i'))} | {fmt(ev.get('chair', {}).get('chair_s'))} |")
    md += [""] + [f"Round {rec['round']}: `{rec['output_dir']}` (report: {rec['output_dir']}/report.md)"
                  for rec in manifest["rounds"]]
    plots = []
    if len(evals) > 1:
        def draw(ax):
            xs = sorted(evals)
            for key, label in ((("pope", "accuracy"), "POPE accuracy"), (("chair", "chair_i"), "CHAIR_i"),
                               (("chair", "chair_s"), "CHAIR_s")):
                ax.plot(xs, [evals[x].get(key[0], {}).get(key[1]) for x in xs], marker="o", label=label)
            ax.set_xticks(xs, ["base" if x == 0 else f"round {x}" for x in xs])
            ax.set_ylim(0, 1)
            ax.legend()
        plots.append(("Held-out numbers per round (POPE higher is better, CHAIR lower)",
                      _plot(plots_dir / "rounds.png", draw)))
    else:
        md += ["", "Not evaluated yet (no `eval/summary.json`)."]
    return md, plots


def write_report(run_dir) -> tuple[Location, Location]:
    run = RunLayout(run_dir)
    if not run.manifest_path.exists():
        raise InputError("not a run folder (no manifest.json)", file=str(run.root))
    manifest = json.loads(run.manifest_path.read_text())
    status = RunFolder.at(run.root).status()   # a killed run's `running` reads `interrupted`
    plots_dir = run.report_dir.mkdir()
    if "rounds" in manifest:
        md, plots = _rounds_section(run, manifest, plots_dir)
        md = [f"# SynthAlign run report: `{run.root}`", "", f"{len(manifest['rounds'])} rounds, status "
              f"**{status}**.", ""] + md
        return _write(run, md, plots)
    md = [f"# SynthAlign run report: `{run.root}`", "", f"Data hash `{manifest.get('data_hash')}`, "
          f"status **{status}**.", "", "## Data", ""]
    counts = manifest.get("counts", {})
    md += ["| count | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in counts.items()] + [""]
    plots = []
    pairs = run.pairs
    if counts.get("pairs"):
        for name, title, draw in (("rewards", "Chosen and rejected rewards", _rewards),
                                  ("margins", "Reward margins", _margins),
                                  ("models", "Whose answers were chosen / rejected", _models)):
            plots.append((title, _plot(plots_dir / f"{name}.png", lambda ax, d=draw: d(ax, pairs))))
    else:
        md.append("No pairs yet.")
    md += ["", "## Training", ""]
    metrics = read_metrics(run.root)
    if metrics:
        last = metrics[-1]
        md.append(f"{len(metrics)} logged steps; last loss {last.get('loss', float('nan')):.4f}, "
                  f"margin {last.get('rewards/margins', float('nan')):.4f}, "
                  f"accuracy {last.get('rewards/accuracies', float('nan')):.2f}.")
        plots.append(("Training loss and reward margin",
                      _plot(plots_dir / "training.png", lambda ax: _training(ax, metrics))))
    else:
        md.append("Not trained yet (`synthalign train`).")
    md += ["", "## Evaluation: base vs adapter", ""]
    summary_path = run.eval_summary
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        md += _eval_table(summary)
        if "base" in summary and "adapter" in summary:
            plots.append(("Evaluation: base vs adapter (POPE accuracy higher is better, CHAIR lower)",
                          _plot(plots_dir / "eval.png", lambda ax: _eval_bars(ax, summary))))
    else:
        md.append("Not evaluated yet (no `eval/summary.json`).")
    return _write(run, md, plots)


def _write(run: RunLayout, md: list[str], plots: list) -> tuple[Location, Location]:
    md += ["", "## Plots", ""] + [f"### {t}\n\n![{t}](report/{p.name})\n" for t, p in plots]
    md_path = run.report_md
    md_path.write_text("\n".join(md) + "\n")
    body = "".join(
        f"<h3>{html.escape(t)}</h3><img alt='{html.escape(t)}' src='data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode()}'/>" for t, p in plots)
    text = "\n".join(line for line in md if not line.startswith(("![", "### ", "## Plots")))
    html_path = run.report_html
    html_path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>SynthAlign report</title>"
                         f"</head><body><pre>{html.escape(text)}</pre>{body}</body></html>\n")
    return md_path, html_path
