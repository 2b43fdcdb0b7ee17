"""The one owner of a run folder: every path in it (pipelines.layout), what it holds, which config made each part,
what is stale. The folder is a local path or an object-storage URI (`s3://bucket/run`).

A run folder has three parts, each made from part of the config:
    data   scored/, pairs/, candidates/, errors/, manifest.json   <- RunConfig.data_dict() (data hash)
    train  train/ (its recipe in train/recipe.json)               <- RunConfig.train_dict() (train hash)
    eval   eval/, report.*                                         <- remade by every `run`
A part is stale when the config that made it differs from this one; stale data makes training stale too. A
stale part is an error naming the changed keys unless `--overwrite`, which clears exactly the stale parts; an
unchanged part resumes.
"""
from __future__ import annotations

import json
import uuid

from actors.common.errors import InputError
from cluster.storage import Location
from pipelines.config import RunConfig
from pipelines.layout import RunLayout

DATA_PARTS = ("scored", "pairs", "candidates", "errors", ".views", ".faults", ".startup", ".reserve", "manifest.json",
              "tb", "prompts")
TRAIN_PARTS = ("train",)
EVAL_PARTS = ("eval", "report", "report.md", "report.html")


def _flat(d, prefix: str = "") -> dict:
    """Dotted keys of nested config dicts; lists of mappings (samplers) by index: samplers[1].n."""
    if isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        return {k: v for i, x in enumerate(d) for k, v in _flat(x, f"{prefix}[{i}]").items()}
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts. A key only one side has counts as unchanged
    when it is null or false there: an option added later (e.g. images.keep_render), off, changes no data."""
    a, b = _flat(old, prefix), _flat(new, prefix)
    def off(v):
        return v is None or v is False
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)
                  and not ((k not in a and off(b[k])) or (k not in b and off(a[k]))))


class RunFolder(RunLayout):
    """A run folder's lifecycle for one config (`RunFolder(cfg)`); `RunFolder.at(path_or_uri)` for a folder whose
    config is not at hand (its manifest still reads)."""

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg.output_dir)
        self.cfg = cfg

    # Room a generate run holds while it writes, freed to record its failure when the disk fills up.
    reserve = property(lambda self: self.root / ".reserve")

    @classmethod
    def at(cls, where) -> RunFolder:
        folder = cls.__new__(cls)
        RunLayout.__init__(folder, where)
        folder.cfg = None
        return folder

    # ---- what is there ------------------------------------------------------------------------------------
    def manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        try:
            return json.loads(self.manifest_path.read_text())
        except (ValueError, UnicodeDecodeError):
            raise InputError("manifest.json is not valid JSON; move the folder away or pass --overwrite",
                             file=str(self.root)) from None

    def status(self) -> str | None:
        """The manifest's status as a user should read it (None: no manifest). A run killed outright (kill -9, a
        lost node) never writes its end: a `running...` status of a folder no live run holds reads `interrupted`."""
        from pipelines.lock import is_held
        m = self.manifest()
        if m is None:
            return None
        status = str(m.get("status", "unknown"))
        if status.startswith("running") and not is_held(self.root):
            return status.replace("running", "interrupted", 1)   # a rounds run's "running round 2" keeps its round
        return status

    def stale_data(self) -> list[str] | None:
        """Changed generation keys (None: no data yet or the same config)."""
        m = self.manifest()
        if m is None or m.get("data_hash") == self.cfg.hash():
            return None
        old = m.get("data_config")
        return changed_keys(old, self.cfg.data_dict()) if isinstance(old, dict) else ["(unrecorded config)"]

    def stale_train(self) -> list[str] | None:
        """Changed training keys (None: no training yet or the same recipe)."""
        if not self.train.exists():
            return None
        if not self.recipe_path.exists():
            return ["(unrecorded training recipe)"]
        recipe = json.loads(self.recipe_path.read_text())
        if recipe.get("train_hash") == self.cfg.train_hash():
            return None
        return changed_keys(recipe.get("train", {}), self.cfg.train_dict(), "train")

    def trained(self) -> bool:
        """Training finished here: a summary that does not say `failed` (a failed run leaves one saying why)."""
        summary = self.train_paths()["summary"]
        return summary.exists() and json.loads(summary.read_text()).get("status") != "failed"

    # ---- claiming it for this config -----------------------------------------------------------------------
    def prepare(self, overwrite: bool = False, data: bool = True, train: bool = False) -> Location:
        """Check that this config may write its data (`data`) and training (`train`) here; with overwrite, clear
        what is stale. Nothing is removed unless every check passed."""
        data = self.stale_data() if data else None
        trained = self.stale_train() if train or data else None
        if not overwrite:
            if data:
                raise InputError(f"holds generated data of another config (changed: {', '.join(data)}); use "
                                 "another output_dir or pass --overwrite", file=str(self.root))
            if trained:
                raise InputError(f"holds a training run of another recipe (changed: {', '.join(trained)}); use "
                                 "another output_dir or pass --overwrite", file=str(self.root))
        self._check_writable()
        if data:
            self._remove(DATA_PARTS + TRAIN_PARTS + EVAL_PARTS)
        elif trained:
            self._remove(TRAIN_PARTS + EVAL_PARTS)
        return self.root

    def clear(self) -> None:
        """Everything this folder holds of a run (a fresh start, e.g. for a benchmark)."""
        self._remove(DATA_PARTS + TRAIN_PARTS + EVAL_PARTS)

    def claim_train(self) -> None:
        """Record the recipe before training writes anything: a later config is compared with it."""
        self.train.mkdir()
        self.recipe_path.write_text(json.dumps({"train_hash": self.cfg.train_hash(),
                                                "train": self.cfg.train_dict()}, indent=2))

    def write_manifest(self, manifest: dict) -> None:
        base = {"config": self.cfg.to_dict(), "data_config": self.cfg.data_dict(), "data_hash": self.cfg.hash()}
        self.manifest_path.write_text(json.dumps({**base, **manifest}, indent=2))

    # ---- helpers ------------------------------------------------------------------------------------------
    def _check_writable(self) -> None:
        try:
            self.root.mkdir()
            probe = self.root / f".write-test-{uuid.uuid4().hex[:6]}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise InputError(f"output folder is not writable ({getattr(e, 'strerror', None) or e})",
                             file=str(self.root)) from None

    def _remove(self, names) -> None:
        for name in names:
            (self.root / name).rmtree()
