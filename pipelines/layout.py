"""Every path of a run folder, in one place: a local folder or an object-storage URI (`s3://bucket/run`), each path
a `cluster.storage.Location`. No other module joins names onto an output_dir. What the folder holds and which
config made it is `pipelines.folder.RunFolder`'s (built on this layout)."""
from __future__ import annotations

from cluster.storage import Location


class RunLayout:
    def __init__(self, where):
        self.root = Location(where)

    scored = property(lambda self: self.root / "scored")        # the stream's durable log (shards)
    pairs = property(lambda self: self.root / "pairs")
    prompts = property(lambda self: self.root / "prompts")      # prompts.source llm: the written prompts
    candidates = property(lambda self: self.root / "candidates")
    errors = property(lambda self: self.root / "errors")
    views_state = property(lambda self: self.root / ".views")   # which shards the views hold
    faults = property(lambda self: self.root / ".faults")       # test-only fault markers
    startup = property(lambda self: self.root / ".startup")     # per-actor start records of one invocation
    manifest_path = property(lambda self: self.root / "manifest.json")
    lock_path = property(lambda self: self.root / ".lock")           # flock of the run using a local folder
    lease_path = property(lambda self: self.root / ".lock.json")     # its lease on object storage
    generate_tb = property(lambda self: self.root / "tb" / "generate")   # generate's counts and histograms
    train = property(lambda self: self.root / "train")
    recipe_path = property(lambda self: self.root / "train" / "recipe.json")
    eval = property(lambda self: self.root / "eval")
    eval_summary = property(lambda self: self.root / "eval" / "summary.json")
    report_dir = property(lambda self: self.root / "report")
    report_md = property(lambda self: self.root / "report.md")
    report_html = property(lambda self: self.root / "report.html")
    export_llava = property(lambda self: self.root / "export" / "llava")
    export_hf = property(lambda self: self.root / "export" / "hf")

    def train_paths(self) -> dict[str, Location]:
        """Under train/: the Ray Train run (checkpoints), the adapter, the merged model, per-step metrics,
        TensorBoard events, the summary, the records the workers train on."""
        t = self.train
        return {"root": t, "ray": t / "ray", "run": t / "ray" / "dpo", "adapter": t / "adapter",
                "merged": t / "merged", "metrics": t / "metrics.jsonl", "tb": t / "tb",
                "summary": t / "summary.json", "data": t / "data"}

    def round_dir(self, r: int) -> Location:
        return self.root / "rounds" / str(r)

    def round_of(self) -> tuple[RunLayout, int] | None:
        """(the run, r) when this folder is that run's `round_dir(r)`, else None."""
        root = self.root
        if root.name.isdigit() and root.parent.name == "rounds":
            top = RunLayout(root.parent.parent.uri)
            if top.round_dir(int(root.name)) == root:
                return top, int(root.name)
        return None
