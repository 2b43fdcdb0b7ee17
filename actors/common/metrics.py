"""Stage metrics for the Ray dashboard and Prometheus (`ray.util.metrics`), made once per process.

Names (Prometheus adds a `ray_` prefix): synthalign_stage_rows (rows a stage finished, by stage),
synthalign_stage_failed_rows (rows quarantined at that stage, by stage; a row that failed upstream and only
passes through counts for neither), synthalign_candidates (answers, by model),
synthalign_pairs (by outcome: kept or the drop reason), synthalign_reward (answers by reward bucket:
Ray histograms take only positive boundaries, rewards are signed) and synthalign_margin (histogram).
Metrics are best-effort: outside Ray (unit tests, plain loops) they are no-ops, and a metrics failure
is logged once, never turned into a failed row. A process that dies (a fatal error, a crash) may take its
last unreported counts along, and its batch, retried, counts again in the stages it had passed: the run's
exact counts are in the manifest.
"""
from __future__ import annotations

import logging

_cache: dict = {}
_warned: set = set()
REWARD_BUCKETS = [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]
MARGIN_BOUNDARIES = [0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]


def reward_bucket(v: float) -> str:
    lower = None
    for b in REWARD_BUCKETS:
        if v < b:
            return f"[{lower},{b})" if lower is not None else f"<{b}"
        lower = b
    return f">={REWARD_BUCKETS[-1]}"


def _best_effort(fn):
    def wrapper(name, *args, **kwargs):
        try:
            fn(name, *args, **kwargs)
        except Exception as e:  # never let monitoring fail a row
            if name not in _warned:
                _warned.add(name)
                logging.getLogger(__name__).warning("metric %s not recorded: %s", name, e)
    return wrapper


def _metric(kind: str, name: str, description: str, tag_keys: tuple, boundaries=None):
    if name not in _cache:
        import ray
        if not ray.is_initialized():
            _cache[name] = None
        else:
            from ray.util import metrics
            if kind == "counter":
                _cache[name] = metrics.Counter(name, description, tag_keys=tag_keys)
            else:
                _cache[name] = metrics.Histogram(name, description, boundaries=boundaries, tag_keys=tag_keys)
    return _cache[name]


@_best_effort
def count(name: str, value: float, description: str, **tags) -> None:
    m = _metric("counter", name, description, tuple(sorted(tags)))
    if m is not None and value:
        m.inc(value, tags={k: str(v) for k, v in tags.items()})


@_best_effort
def observe(name: str, values, description: str, boundaries) -> None:
    m = _metric("histogram", name, description, (), boundaries)
    if m is not None:
        for v in values:
            m.observe(float(v))


def record_stage(stage: str, table) -> None:
    """Called by the guard after every batch with the rows this stage processed (never the rows that failed
    upstream and only pass through): those with an error failed here, the others are done."""
    failed = table.num_rows - table.column("error").null_count if "error" in table.column_names else 0
    count("synthalign_stage_rows", table.num_rows - failed, "rows a stage finished", stage=stage)
    count("synthalign_stage_failed_rows", failed, "rows quarantined to errors/", stage=stage)
