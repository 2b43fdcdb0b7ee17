"""The run config: one YAML file, typed, `key.sub=value` overrides, validated on load."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from actors.common.errors import InputError, Problem, raise_first
from actors.common.files import read_user_text
from actors.common.guard import FaultConfig
from actors.contract import STAGES
from actors.images import ImagesConfig, mark_full_render, omit_default_memory_options
from actors.pairs import PairsConfig
from actors.prompts import PromptsConfig
from actors.rewards import RewardsConfig, omit_default_judge
from actors.sampling import SamplerConfig
from actors.select import SelectionConfig, omit_default_dtype
from cluster.resources import ClusterShape, PoolConfig
from pipelines.evaluate.config import WorldEvalConfig
from pipelines.train.config import TrainConfig
from pipelines.typed import ConfigTypeError, from_dict, set_dotted

POOL_STAGES = tuple(s.pool for s in STAGES)
# What neither generation nor training depends on: where output goes, how it is scheduled, test hooks.
RUN_KEYS = ("output_dir", "rounds", "later_rounds", "tiny_models", "tiny_recipe", "cluster", "pools", "fuse", "train", "min_rows_per_file", "rows_per_shard",
            "max_error_fraction", "faults", "eval")
# Training keys that change how a run is watched or scheduled, not what it learns.
TRAIN_RUN_KEYS = ("save_steps", "logging_steps", "num_to_keep", "max_failures", "merge_adapter", "report_to",
                  "gradient_checkpointing", "workers")


def _without_new_defaults(data: dict, train: dict | None = None) -> dict:
    """Keys added with `rounds` stay out of the hashes at their defaults, so folders made before them still
    match their configs (and round 1 of an iterative run hashes as the same run with `rounds: 1`)."""
    d = copy.deepcopy(data)
    omit_default_memory_options(d)
    mark_full_render(d)
    omit_default_dtype(d)
    omit_default_judge(d)
    if d.get("previous") is None:
        d.pop("previous", None)
    if d.get("prompts", {}).get("round") == 1:
        d["prompts"].pop("round")
    if "prompts" in d and d["prompts"].get("source") != "llm":
        d["prompts"].pop("writer", None)   # only an llm source reads it
    if not d.get("pairs", {}).get("drop_coverage_only", True):
        d["pairs"].pop("drop_coverage_only")
    for s in d.get("samplers", []):
        if not s.get("on_policy"):
            s.pop("on_policy", None)
    for t in [d.get("train"), train]:
        if isinstance(t, dict) and t.get("init_adapter") is None:
            t.pop("init_adapter", None)
            t.pop("reference", None)   # no adapter to start from: the reference is the base either way
        if isinstance(t, dict) and not t.get("dpo"):
            t.pop("dpo", None)   # no TRL options beyond the recipe's: the recipe as before `train.dpo`
    return d


@dataclass
class RunConfig:
    output_dir: str                    # the run folder: a local path, or s3:// / gs:// (object storage)
    # Iterative on-policy DPO: round r >= 2 samples fresh prompts with the policy after round r-1 (samplers with
    # on_policy: true), then continues its adapter. Each round is a run folder of its own: <output_dir>/rounds/<r>.
    rounds: int = 1
    # Settings for rounds >= 2 only, merged over this config as `extends` merges (a list such as samplers is
    # replaced whole): an on-policy round's data differ from round 1's (docs/results.md, rounds).
    later_rounds: dict[str, Any] | None = None
    # Set by pipelines.run.rounds, not by hand: the train hash of the round this one samples from and continues.
    previous: str | None = None
    tiny_models: str | None = None     # build the tiny random-weight models here when missing
    # Which: "tiny" (the CPU demo's), "paper" (twins of paper.yaml's models), "shapes" (the shapes-world LLaVA);
    # default: shapes when images.backend is shapes, else tiny.
    tiny_recipe: str | None = None
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    samplers: list[SamplerConfig] = field(default_factory=list)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    # Scheduling, per stage: images, selection, sampling (default for every sampler),
    # "sampling:<sampler name>" for one sampler, rewards; prompts (the prompt writer of prompts.source llm).
    pools: dict[str, PoolConfig] = field(default_factory=dict)
    # All stages in one actor pool (sized by pools.images): for CPU nodes, where a process per stage
    # time-shares the cores. GPU clusters keep a pool per stage, each model on its own devices.
    fuse: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)
    min_rows_per_file: int = 1000      # rows per view file (pairs/, candidates/): each fold appends its own, <= 128 MB
    rows_per_shard: int = 64           # rows per scored/ shard: what a crash can cost to redo
    max_error_fraction: float = 0.05   # share of image-questions allowed to fail before the job fails
    faults: FaultConfig | None = None  # test-only fault injection
    eval: WorldEvalConfig | None = None  # base vs adapter on held-out world images after `run` trains
    cluster: ClusterShape | None = None  # the cluster it is meant for: pools that cannot all be placed fail at load

    def pool(self, stage: str, sampler: SamplerConfig | None = None) -> PoolConfig:
        if sampler is not None and sampler.pool_key in self.pools:
            return self.pools[sampler.pool_key]
        return self.pools.get(stage, PoolConfig())

    def running_pools(self) -> dict[str, PoolConfig]:
        """The pools the generate chain holds at once: one per stage (a sampler's own as sampling:<name>), or
        the images pool alone when fused."""
        if self.fuse:
            return {"images": self.pool("images")}
        out = {}
        for st in STAGES:   # a list section (samplers) holds a pool per entry
            section = getattr(self, st.config)
            if isinstance(section, list):
                out.update({sub.pool_key: self.pool(st.pool, sub) for sub in section})
            else:
                out[st.pool] = self.pool(st.pool)
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def for_later_rounds(self) -> RunConfig:
        """This config with `later_rounds` merged over it (raises ConfigTypeError on a wrong key or type)."""
        if not self.later_rounds:
            return copy.deepcopy(self)
        data = {k: v for k, v in self.to_dict().items() if k != "later_rounds"}
        return from_dict(RunConfig, _merge(data, self.later_rounds))

    def data_dict(self) -> dict:
        """What determines the generated data (not where it goes or how it is scheduled)."""
        return _without_new_defaults({k: v for k, v in self.to_dict().items() if k not in RUN_KEYS})

    def train_dict(self) -> dict:
        """What determines the trained adapter besides the data; the worker count sets the global batch."""
        d = {k: v for k, v in dataclasses.asdict(self.train).items() if k not in TRAIN_RUN_KEYS}
        d["num_workers"] = self.train.workers.num_workers
        _without_new_defaults({}, d)
        return d

    def hash(self) -> str:
        """The data hash: a run folder's generated data belongs to this config when it matches."""
        return _digest(self.data_dict())

    def train_hash(self) -> str:
        return _digest([self.hash(), self.train_dict()])

    def validate(self) -> list[Problem]:
        errs = self.prompts.validate() + self.images.validate() + self.selection.validate()
        errs += self.rewards.validate() + self.pairs.validate() + self.train.validate()
        if not self.samplers:
            errs.append(Problem("samplers", "at least one sampler is needed"))
        labels = [s.label for s in self.samplers]
        for i, s in enumerate(self.samplers):
            errs += s.validate(f"samplers[{i}]") + s.pool_problems(f"samplers[{i}]", self.pools)
            share = self.pool("sampling", s).num_gpus
            if s.backend == "vllm" and 0 < share < 1 and s.gpu_memory_utilization > share:
                # vLLM takes gpu_memory_utilization of the whole device, whatever fraction Ray granted
                errs.append(Problem(f"samplers[{i}].gpu_memory_utilization",
                                    f"{s.gpu_memory_utilization:g} of a GPU, but its pool gets {share:g} of one"))
            if labels.count(s.label) > 1:
                errs.append(Problem(f"samplers[{i}].name", f"'{s.label}' is used twice; give each sampler a distinct name"))
        for name, pool in self.pools.items():
            stage = name.split(":", 1)[0]
            if stage not in POOL_STAGES + ("prompts",) or (":" in name and stage != "sampling"):
                errs.append(Problem(f"pools.{name}", f"unknown stage (known: {', '.join(POOL_STAGES)}, sampling:<name>)"))
            elif ":" in name and name.split(":", 1)[1] not in labels:
                errs.append(Problem(f"pools.{name}", f"no sampler is named '{name.split(':', 1)[1]}'"))
            errs += pool.validate(f"pools.{name}")
        errs += self._rounds_problems()
        if self.tiny_recipe not in (None, "tiny", "paper", "shapes"):
            errs.append(Problem("tiny_recipe", "must be 'tiny', 'paper' or 'shapes'"))
        if self.min_rows_per_file < 1:
            errs.append(Problem("min_rows_per_file", "must be >= 1"))
        if self.rows_per_shard < 1:
            errs.append(Problem("rows_per_shard", "must be >= 1"))
        if not 0 <= self.max_error_fraction <= 1:
            errs.append(Problem("max_error_fraction", "must be between 0 and 1"))
        if self.faults:
            errs += self.faults.validate()
            if self.faults.stage and self.faults.stage not in POOL_STAGES:
                errs.append(Problem("faults.stage", f"must be one of {', '.join(POOL_STAGES)}"))
        if self.eval:
            errs += self.eval.validate()
        if self.cluster:
            errs += self.cluster.placement_problems(self.running_pools())
        return errs


    def _rounds_problems(self) -> list[Problem]:
        if self.rounds < 1:
            return [Problem("rounds", "must be >= 1")]
        if self.rounds == 1:
            return []
        errs = []
        if self.prompts.source == "file":
            errs.append(Problem("rounds", "rounds > 1 need fresh prompts every round: prompts.source 'generate' "
                                          "or 'shapes' (a prompts file holds one set)"))
        for i, s in enumerate(self.samplers):
            if s.on_policy and s.backend == "vllm" and not self.train.merge_adapter:
                errs.append(Problem(f"samplers[{i}].on_policy", "vllm samples the merged policy: set "
                                                                "train.merge_adapter: true"))
        for key in ("init_adapter", "data"):
            if getattr(self.train, key):
                errs.append(Problem(f"train.{key}", "rounds > 1 set it per round (its own folder); leave it unset"))
        return errs + self._later_rounds_problems()

    def _later_rounds_problems(self) -> list[Problem]:
        if not self.later_rounds:
            return []
        fixed = [k for k in self.later_rounds if k in ("rounds", "later_rounds", "previous", "output_dir", "eval")]
        if fixed:
            return [Problem(f"later_rounds.{fixed[0]}", "is the same for every round; set it at the top level")]
        try:
            later = self.for_later_rounds()
        except ConfigTypeError as e:
            return [Problem(f"later_rounds.{e.key}", e.message)]
        return [Problem(f"later_rounds.{p.key}", p.message) for p in later.validate()]


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise InputError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _merge(base: dict, top: dict) -> dict:
    """Deep merge; an empty mapping replaces (`resources: {}` in a child config means none)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and v and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """A config file as data; `extends: other.yaml` (relative to this file) is deep-merged under it."""
    if not path.is_file():
        raise InputError("config file not found", file=str(path))
    text = read_user_text(path, "config file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        row = mark.line + 1 if mark else None
        raise InputError(f"YAML syntax error: {getattr(e, 'problem', None) or e}", file=str(path), row=row) from None
    if not isinstance(data, dict):
        raise InputError("expected a mapping of config keys at the top level", file=str(path))
    base = data.pop("extends", None)
    if base is not None:
        parent = (path.parent / str(base)).resolve()
        if parent in seen:
            raise InputError(f"extends {base} makes a cycle", file=str(path), field="extends")
        data = _merge(_read_yaml(parent, seen + (parent,)), data)
    return data


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    path = Path(path)
    data = _read_yaml(path)
    for text in overrides:
        key, value = parse_override(text)
        try:
            set_dotted(data, key, value)
        except ConfigTypeError as e:
            raise InputError(f"--set {text}: {e}") from None
    try:
        cfg = from_dict(RunConfig, data)
    except ConfigTypeError as e:
        raise InputError(e.message, file=str(path), field=e.key) from None
    raise_first(cfg.validate(), file=str(path))
    return cfg
