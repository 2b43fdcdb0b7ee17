"""Stage metrics for the Ray dashboard and Prometheus (`ray.util.metrics`), made once per process.

Names (Prometheus adds a `ray_` prefix): synthalign_stage_rows (rows a stage finished, by stage),
synthalign_stage_failed_rows (rows quarantined at that stage, by stage; a row that failed upstream and only
passes through counts for neither), synthalign_candidates (answers, by model),
synthalign_pairs (by outcome: kept or the drop reason), synthalign_reward (answers by reward bucket:
Ray histograms take only positive boundaries, rewards are signed) and synthalign_margin (histogram).
Metrics are best-effort: outside Ray (unit tests, plain loops) they are no-ops, and a metrics failure
is logged once, never turned into a failed row.

A row counts once per stage: inside `held()` (a Chain call: one actor's stages on one batch) every metric is
held back and reported only when the block ends without an error. A batch that fails in a later stage and is
retried by Ray Data (its actor ended by a fatal error or a crash) re-runs the earlier stages: the failed call's
counts are dropped with it, the retry's are reported. Outside `held()` a metric is reported at once.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from contextvars import ContextVar

_held: ContextVar[list | None] = ContextVar("synthalign_held_metrics", default=None)
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


def _hold(fn, *args, **kwargs) -> bool:
    """Inside `held()`: keep the call for the block's end and return True."""
    pending = _held.get()
    if pending is None:
        return False
    pending.append((fn, args, kwargs))
    return True


@contextmanager
def held():
    """Report the block's metrics only if it ends without an error (see the module docstring); nested, the
    inner block's metrics go to the outer one."""
    token = _held.set([])
    try:
        yield
        pending = _held.get()
    finally:
        _held.reset(token)
    for fn, args, kwargs in pending:
        fn(*args, **kwargs)


@_best_effort
def count(name: str, value: float, description: str, **tags) -> None:
    if _hold(count, name, value, description, **tags):
        return
    m = _metric("counter", name, description, tuple(sorted(tags)))
    if m is not None and value:
        m.inc(value, tags={k: str(v) for k, v in tags.items()})


@_best_effort
def observe(name: str, values, description: str, boundaries) -> None:
    if _hold(observe, name, list(values), description, boundaries):
        return
    m = _metric("histogram", name, description, (), boundaries)
    if m is not None:
        for v in values:
            m.observe(float(v))


def record_stage(stage: str, table) -> None:
    """Called by the guard after every batch with the rows this stage processed (never the rows that failed
    upstream and only pass through): those with an error failed here, the others are done."""
    failed = table.num_rows - table.column("error").null_count if "error" in table.column_names else 0
    _stage_counts(stage, table.num_rows - failed, failed)


def _stage_counts(stage: str, done: int, failed: int) -> None:
    if _hold(_stage_counts, stage, done, failed):   # held as numbers: the batch itself is not kept
        return
    count("synthalign_stage_rows", done, "rows a stage finished", stage=stage)
    count("synthalign_stage_failed_rows", failed, "rows quarantined to errors/", stage=stage)
