"""cluster/grafana's dashboard: a well-formed Grafana model whose every query names metrics, and groups or filters by
labels, that a real tiny `generate` run exports -- read from the session Ray's Prometheus endpoint, no hand list."""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import pytest
from conftest import METRICS_PORT, ROOT, tiny_config

DASHBOARD = ROOT / "cluster" / "grafana" / "synthalign-pools.json"
DATASOURCE = "${datasource}"
# Identifiers in PromQL that are not metric names once strings, matchers, ranges and grouping clauses are gone.
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*"')


def _bare(query: str) -> str:
    """The query without string literals, label matchers, range selectors, grouping clauses, and the label
    argument of Grafana's label_values(metric, label)."""
    q = re.sub(r'"(?:[^"\\]|\\.)*"', '""', query)
    q = re.sub(r"\{[^}]*\}", "{}", q)
    q = re.sub(r"\[[^\]]*\]", "[]", q)
    q = GROUPING.sub(" ", q)
    return re.sub(r"(label_values\s*\(.*),\s*\w+\s*\)\s*$", r"\1)", q)


def metric_names(query: str) -> set[str]:
    """Identifiers not called like a function (sum, rate, histogram_quantile, ...) and not a PromQL keyword."""
    found = re.findall(r"(?<![\w:$.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", _bare(query))
    return {n for n in found if n.lower() not in PROMQL_WORDS}


def label_names(query: str) -> set[str]:
    """Labels the query filters on (matchers) or groups by; label_values' label too."""
    q = re.sub(r'"(?:[^"\\]|\\.)*"', '""', query)
    labels = set(MATCHER.findall(q))
    for group in GROUPING.findall(q):
        labels |= {g.strip() for g in group.split(",") if g.strip()}
    m = re.search(r"label_values\s*\(.*,\s*(\w+)\s*\)\s*$", q)
    return labels | ({m.group(1)} if m else set())


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(dash: dict) -> list[str]:
    """Every PromQL in the dashboard: the panels' targets and the query variables."""
    out = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            out.append(v["query"]["query"] if isinstance(v["query"], dict) else v["query"])
    return out


def test_metric_and_label_names_are_read_from_promql():
    q = ('histogram_quantile(0.9, sum by (operator, le) (rate(ray_data_task_completion_time_bucket'
         '{SessionName=~"$SessionName", operator=~"Map(x) rate"}[$__rate_interval]))) / '
         'sum without (WorkerId) (increase(ray_a_total[5m] offset 1h)) and on(stage) ray_b > bool 1e3')
    assert metric_names(q) == {"ray_data_task_completion_time_bucket", "ray_a_total", "ray_b"}
    assert label_names(q) == {"operator", "le", "SessionName", "WorkerId", "stage"}
    v = 'label_values(ray_synthalign_stage_rows_total{SessionName=~"$SessionName"}, stage)'
    assert metric_names(v) == {"ray_synthalign_stage_rows_total"}
    assert label_names(v) == {"SessionName", "stage"}


def test_dashboard_is_a_grafana_model_on_the_datasource_variable():
    dash = load()
    assert dash["uid"] == "synthalign-pools" and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"SessionName", "stage", "operator"} <= set(variables)
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == DATASOURCE, v["name"]
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) == 14 and {p["type"] for p in graphs} == {"timeseries", "bargauge"}
    cells: set = set()
    for p in panels:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
    for p in graphs:
        assert p["datasource"] == DATASOURCE and p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE and metric_names(t["expr"]), (p["title"], t["expr"])


def _scrape() -> dict[str, set[str]]:
    """Sample name -> its label names, from the session Ray's Prometheus endpoint."""
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


@pytest.fixture(scope="module")
def exported(tiny_models, ray_local, tmp_path_factory) -> dict[str, set[str]]:
    """Every series name (with its labels) the endpoint showed during and after a tiny run in which one prompt
    fails for good at the first sampler (the failed-rows counter has no series before a failure). Ray Data drops
    its operator series when the dataset ends, so the endpoint is read while the run goes too."""
    from actors.prompts import load_prompts
    from pipelines.generate.job import run_generate
    out = tmp_path_factory.mktemp("grafana") / "run"
    cfg = tiny_config(tiny_models, out, **{"prompts.num_prompts": 4})
    victim = [r["prompt_id"] for r in load_prompts(cfg.prompts)][1]
    cfg = tiny_config(tiny_models, out, **{
        "prompts.num_prompts": 4, "faults.stage": "sampling", "faults.kind": "raise", "faults.times": -1,
        "faults.prompt_ids": json.dumps([victim]), "max_error_fraction": 0.5})
    seen: dict[str, set[str]] = {}

    def merge():
        for name, labels in _scrape().items():
            seen.setdefault(name, set()).update(labels)

    stop = threading.Event()

    def poll():
        while not stop.wait(4):
            merge()

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        counts = run_generate(cfg)["counts"]
    finally:
        stop.set()
        poller.join()
    assert counts["errors"] == 2 and counts["pairs"] > 0   # the victim's two image-questions failed
    wanted = set().union(*map(metric_names, queries(load())))
    deadline = time.time() + 90
    while True:  # workers report every few seconds: wait for the run's last counts
        merge()
        if wanted <= set(seen) or time.time() > deadline:
            return seen
        time.sleep(3)


def test_every_dashboard_metric_is_exported_by_a_real_run(exported):
    names = set().union(*map(metric_names, queries(load())))
    assert sorted(names - set(exported)) == []
    assert {"ray_synthalign_stage_rows_total", "ray_synthalign_stage_failed_rows_total",
            "ray_data_pool_utilization", "ray_data_task_completion_time_bucket"} <= names
    # the usual slips are caught: a counter is only exported as <name>_total, a histogram as _bucket/_sum/_count
    assert {"ray_synthalign_stage_rows", "ray_synthalign_margin", "synthalign_stage_rows_total"}.isdisjoint(exported)


def test_every_filtered_or_grouped_label_is_on_the_querys_metrics(exported):
    """`by (stage)` on a metric without a stage label would draw one unlabelled line: each label a query names
    must be carried by one of its metrics' series."""
    wrong = []
    for q in queries(load()):
        carried = set().union(*(exported.get(n, set()) for n in metric_names(q)))
        wrong += [(label, q) for label in sorted(label_names(q) - carried)]
    assert wrong == []
