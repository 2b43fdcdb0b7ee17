"""`synthalign doctor --smoke`: the paper's stack run for real on the connected cluster in a few minutes, on
random-weight twins of its models (pipelines/models/twins.py): a few prompts through SD3 images and ImageReward
selection, the three LLaVA-NeXT samplers, the ArmoRM reward and the pairs, then 5 DPO steps under DeepSpeed ZeRO-2.

With GPUs in the cluster it is the real path: bf16 everywhere, samplers on vLLM, NCCL. Without: the CPU stand-ins
of configs/paper-twin.yaml (transformers samplers, gloo), generation still in bf16 (every twin runs it on CPU);
training in float32, as transformers refuses bf16 training without `use_cpu`, which the DeepSpeed path cannot set
(the worker hands accelerate Ray's process group instead). Nodes need not share a disk: each node builds the twins itself, seeded, so every copy is the same model, into
the same node-local folder. The run writes to a fresh temporary folder (beside a remote output_dir, never inside
it), removed when every phase passed. Library code: the caller connects Ray (the CLI does).
"""
from __future__ import annotations

import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.train.config import REPO_ROOT

TWIN_CONFIG = REPO_ROOT / "configs" / "paper-twin.yaml"
PHASES = ("twins", "generate", "train")
STEPS = 5
SAMPLERS = ("llava-next-mistral-7b", "llava-next-vicuna-13b", "llava-next-vicuna-7b")


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    error: str | None = None      # one line; None when the phase passed
    detail: str = ""
    skipped: bool = False
    facts: dict = field(default_factory=dict)   # generate's counts, train's summary

    @property
    def ok(self) -> bool:
        return self.error is None and not self.skipped

    def line(self) -> str:
        if self.skipped:
            return f"smoke {self.name:<8} {'':>7}  skipped (an earlier phase failed)"
        result = f"ok ({self.detail})" if self.ok and self.detail else "ok" if self.ok else f"FAILED: {self.error}"
        return f"smoke {self.name:<8} {self.seconds:6.1f}s  {result}"


def default_twins_dir(seed: int = 0) -> str:
    return os.path.join(tempfile.gettempdir(), "synthalign-smoke", f"twins-{seed}")


def _build_here(folder: str, seed: int) -> str:
    from pipelines.models import build_recipe
    build_recipe("paper", folder, seed)
    return folder


def build_twins_everywhere(folder: str, seed: int = 0, timeout: float = 900.0) -> int:
    """The twins in `folder` on every alive node (one pinned task per machine: nodes on one address share its
    disk) and on the driver when it is not on a node (it checks the model folders exist). Returns the machines."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    nodes = {}
    for n in ray.nodes():
        if n.get("Alive"):
            nodes.setdefault(n["NodeManagerAddress"], n["NodeID"])
    if ray.util.get_node_ip_address() not in nodes:
        _build_here(folder, seed)
    # num_cpus=0: a node whose CPUs all belong to other work, or a head started with --num-cpus 0, still builds
    task = ray.remote(num_cpus=0, max_retries=0)(_build_here)
    ray.get([task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
             .remote(folder, seed) for node_id in nodes.values()], timeout=timeout)
    return len(nodes)


def smoke_output_dir(base_output_dir: str | None, scratch: str | None = None) -> str:
    """A fresh folder for the smoke's run: beside a remote output_dir (nodes without a shared disk all reach it),
    else a local temporary folder (under `scratch`, default the system's temp dir)."""
    from cluster.storage import is_uri
    if base_output_dir and is_uri(base_output_dir):
        scheme, rest = base_output_dir.rstrip("/").split("://", 1)
        parent = rest.rsplit("/", 1)[0]   # a bucket's root has no parent: the smoke's folder goes in the bucket
        return f"{scheme}://{parent}/.synthalign-smoke-{uuid.uuid4().hex[:12]}"
    return tempfile.mkdtemp(prefix="synthalign-smoke-", dir=scratch)


def smoke_config(twins: str, output_dir: str, gpus: float, base=None, prompts: int = 4, overrides: dict = ()):
    """configs/paper-twin.yaml on the twins in `twins`, 5 DPO steps, every row required to succeed. With GPUs:
    bf16, vLLM samplers and the GPU pools sized to share one GPU (training takes one GPU per worker, two when the
    cluster has them). `base`: the user's config, whose pool and worker `resources` place the smoke on the node
    groups the real run uses. `overrides`: dotted keys set last (tests)."""
    from actors.common.errors import raise_first
    from pipelines.config import RunConfig, load_config
    from pipelines.typed import from_dict, set_dotted
    d = load_config(TWIN_CONFIG).to_dict()
    t = Path(twins)
    d.update(output_dir=output_dir, tiny_models=None, tiny_recipe=None, eval=None, max_error_fraction=0.0)
    d["prompts"]["num_prompts"] = prompts
    d["images"]["model"], d["selection"]["model"] = str(t / "sd3"), str(t / "imagereward")
    d["rewards"]["text_model"], d["train"]["model"] = str(t / "armorm"), str(t / "llava")
    for s, name in zip(d["samplers"], SAMPLERS):
        s["model"] = str(t / name)
    d["train"].update(max_steps=STEPS, bf16=bool(gpus))
    if gpus:
        d["images"]["cpu_offload"] = False
        for s in d["samplers"]:   # three engines share one GPU; the twins hold 1,024 positions
            s.update(backend="vllm", gpu_memory_utilization=0.15, max_model_len=1024, enforce_eager=True)
        for key, share in (("images", 0.1), ("selection", 0.1), ("sampling", 0.2), ("rewards", 0.1)):
            d["pools"][key]["num_gpus"] = share
        d["train"]["workers"].update(num_workers=2 if gpus >= 2 else 1, use_gpu=True, num_gpus=1)
    d["images"]["dtype"] = d["selection"]["dtype"] = d["rewards"]["dtype"] = "bfloat16"
    for s in d["samplers"]:
        s["dtype"] = "bfloat16"
    if base is not None:
        for key in d["pools"]:
            d["pools"][key]["resources"] = dict(base.pool(key).resources)
        d["train"]["workers"]["resources"] = dict(base.train.workers.resources)
    for key, value in dict(overrides).items():
        set_dotted(d, key, value)
    cfg = from_dict(RunConfig, d)
    raise_first(cfg.validate(), file=str(TWIN_CONFIG))
    return cfg


def _reason(e: BaseException) -> str:
    """One line: a Ray task's own error rather than Ray's wrapper (its first line names only the task), Ray
    Train's lowest failed rank."""
    from pipelines.train.job import training_failure
    while getattr(e, "cause", None) is not None and isinstance(e.cause, BaseException):
        e = e.cause
    return training_failure(e)


def _phase(name: str, fn, log) -> Phase:
    t = time.time()
    try:
        detail, error = fn(), None
    except Exception as e:   # the phase's answer: one line, whatever failed
        detail, error = "", _reason(e)
    p = Phase(name, round(time.time() - t, 1), error, detail or "")
    log(p.line())
    return p


def run_smoke(base=None, seed: int = 0, twins_dir: str | None = None, prompts: int = 4, overrides: dict = (),
              log=print, scratch: str | None = None) -> list[Phase]:
    """Every phase in order, each logged as one line when it ends; after a failure the rest are skipped. Needs a
    connected Ray. `base`: the user's RunConfig (its output_dir is never written)."""
    import ray

    from cluster.storage import Location
    twins = twins_dir or default_twins_dir(seed)
    gpus = ray.cluster_resources().get("GPU", 0.0)
    state: dict = {}

    def twins_phase():
        machines = build_twins_everywhere(twins, seed)
        return f"paper twins on {machines} machine(s) in {twins}"

    def generate_phase():
        from pipelines.generate.job import prepare, run_generate
        state["out"] = smoke_output_dir(base.output_dir if base else None, scratch)
        cfg = state["cfg"] = smoke_config(twins, state["out"], gpus, base, prompts, overrides)
        c = state["generate"] = run_generate(cfg, prepared=prepare(cfg, train=True))["counts"]
        if not c["pairs"]:
            raise RuntimeError(f"no pairs from {c['questions']} image-questions")
        backend = cfg.samplers[0].backend
        return (f"{prompts} prompts, {c['images_rendered']} images, {c['questions']} questions x "
                f"{len(cfg.samplers)} samplers ({backend}, {cfg.samplers[0].dtype}), {c['pairs']} pairs")

    def train_phase():
        from pipelines.run.job import train_run
        cfg = state["cfg"]
        s = state["train"] = train_run(cfg)
        if s.get("steps") != STEPS or s.get("deepspeed_stage") != 2:
            raise RuntimeError(f"{s.get('steps')} steps under ZeRO stage {s.get('deepspeed_stage')}, "
                               f"expected {STEPS} under 2")
        w = cfg.train.workers
        return (f"{s['steps']} DPO steps, ZeRO-2 on {s['world_size']} {'GPU' if w.use_gpu else 'CPU'} worker(s) "
                f"({'nccl' if w.use_gpu else 'gloo'}, {'bf16' if cfg.train.bf16 else 'float32'}), "
                f"final loss {s['final_loss'] if s['final_loss'] is None else round(s['final_loss'], 4)}")

    phases = []
    for name, fn in zip(PHASES, (twins_phase, generate_phase, train_phase)):
        if phases and not phases[-1].ok:
            phases.append(Phase(name, skipped=True))
            log(phases[-1].line())
        else:
            phases.append(_phase(name, fn, log))
            phases[-1].facts = state.get(name, {})
    out = state.get("out")
    if out and all(p.ok for p in phases):
        Location(out).rmtree()
    elif out:
        log(f"smoke: the failed run's files are kept in {out}")
    return phases
