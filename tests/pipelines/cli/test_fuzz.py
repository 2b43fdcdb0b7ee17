"""Fuzzed inputs through the CLI: configs and `--set` overrides, prompt files, pairs tables, each with random
corruptions. Whatever the input, `synthalign` returns 0 or 2 (never raises: a raise is a traceback), and a 2
says why in one `synthalign: error:` line. Seeded (derandomized), so CI runs the same cases every time.

Runs without Ray: configs go through `plan` (loads, validates, writes a config), and `generate`/`train` are
pointed at a Ray address where nothing listens, so an input that passes every check ends at the connection."""
from __future__ import annotations

import contextlib
import io
import json
import string
import uuid

import hypothesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.cli import main
from tests.conftest import ROOT, tiny_yaml

NOWHERE = "127.0.0.1:9"   # the discard port: nothing listens, so a run that passes its checks stops here
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def check_outcome(code: int, err: str) -> list[str]:
    assert code in (0, 2), (code, err)
    hypothesis.event(f"exit {code}")
    lines = [ln for ln in err.splitlines() if ln.startswith("synthalign: error:")]
    if code == 2:
        assert len(lines) == 1, err
    return lines


def _leaves(value, key=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{key}[{i}]")
    else:
        yield key


BASE = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
PATHS = sorted(_leaves(BASE))
values = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**7), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.integers(-2, 5), max_size=3),
                   st.dictionaries(st.text(string.ascii_lowercase, max_size=4), st.integers(), max_size=2))


def _apply(data: dict, path: str, op: str, value) -> None:
    parts = path.replace("[", ".[").split(".")
    node = data
    for p in parts[:-1]:
        node = node[int(p[1:-1])] if p.startswith("[") else node.setdefault(p, {})
        if not isinstance(node, (dict, list)):
            return
    last = parts[-1]
    if isinstance(node, list) or last.startswith("["):
        return
    if op == "del":
        node.pop(last, None)
    elif op == "unknown":
        node[last + "_x"] = value
    else:
        node[last] = value


mutation = st.tuples(st.sampled_from(PATHS), st.sampled_from(["set", "set", "del", "unknown"]), values)
override = st.tuples(st.one_of(st.sampled_from(PATHS), st.text(string.ascii_letters + "._[]0", max_size=15)),
                     st.text(max_size=10))


@settings(max_examples=250, **SETTINGS)
@given(mutations=st.lists(mutation, max_size=4), overrides=st.lists(override, max_size=3),
       garble=st.one_of(st.none(), st.integers(0, 2000)), gpus=st.integers(-1, 16))
def test_configs_and_overrides(tmp_path_factory, mutations, overrides, garble, gpus):
    import copy
    folder = tmp_path_factory.mktemp("cfg")
    data = copy.deepcopy(BASE)
    for path, op, value in mutations:
        _apply(data, path, op, value)
    text = yaml.safe_dump(data)
    if garble is not None:   # cut the YAML and splice in characters YAML cares about
        text = text[: garble % (len(text) + 1)] + ": [ {\n\t- '" + text[garble % (len(text) + 1):]
    cfg = folder / "c.yaml"
    cfg.write_text(text)
    argv = ["plan", str(cfg), "--gpus", str(gpus), "--out", str(folder / "out.yaml")]
    for key, value in overrides:
        argv += ["--set", f"{key}={value}"]
    check_outcome(*run_cli(argv))


prompt_row = st.one_of(
    st.fixed_dictionaries({"image_prompt": st.text(max_size=30)},
                          optional={"instructions": st.one_of(st.text(max_size=20), st.lists(st.text(max_size=10),
                                                                                            max_size=3), values),
                                    "gt_objects": st.one_of(st.lists(st.text(max_size=6), max_size=3), values),
                                    "prompt_id": values}).map(json.dumps),
    st.text(max_size=40),                                              # any line at all
    st.binary(max_size=30).map(lambda b: b.decode("latin-1")),         # bytes that are not UTF-8
    st.just('{"image_prompt": "a cat", "instructions": ["<image>"]}'),
    st.just('{"image_prompt": "a red cat on a sofa"'),                 # truncated JSON
)


@settings(max_examples=150, **SETTINGS)
@given(rows=st.lists(prompt_row, max_size=6), suffix=st.sampled_from([".jsonl", ".txt", ".json"]),
       as_bytes=st.booleans(), instructions=st.one_of(st.none(), st.lists(st.text(max_size=15), max_size=4)))
def test_prompt_files(tmp_path_factory, tiny_models, rows, suffix, as_bytes, instructions):
    folder = tmp_path_factory.mktemp("prompts")
    path = folder / f"prompts{suffix}"
    text = "\n".join(rows)
    if as_bytes:
        path.write_bytes(text.encode("latin-1", errors="replace"))
    else:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    prompts = {"source": "file", "file": str(path)}
    if instructions is not None and suffix == ".txt":
        (folder / "instr.txt").write_text("\n".join(instructions))
        prompts["instructions_file"] = str(folder / "instr.txt")
    out = folder / f"run-{uuid.uuid4().hex[:6]}"
    code, err = run_cli(["generate", tiny_yaml(tiny_models, folder, str(out), prompts=prompts),
                         "--address", NOWHERE])
    (line,) = check_outcome(code, err) if code == 2 else [""]
    assert code == 2 and ("nothing is listening" in line or str(folder) in line), err
    if "nothing is listening" not in line:
        assert not out.exists()   # refused input writes nothing


def _pairs_table(rows: int):
    import pyarrow as pa

    from actors.contract import PAIR_COLUMNS
    cols = {c: pa.array([f"{c}{i}" for i in range(rows)]) for c in PAIR_COLUMNS}
    cols["image"] = pa.array([b"\x89PNG not really" for _ in range(rows)], pa.binary())
    return pa.table(cols)


@settings(max_examples=120, **SETTINGS)
@given(rows=st.integers(0, 4), drop=st.lists(st.sampled_from(["image", "question", "chosen", "rejected",
                                                             "prompt_id", "pair_id"]), max_size=2),
       retype=st.one_of(st.none(), st.sampled_from(["chosen", "image", "question"])),
       cut=st.one_of(st.none(), st.integers(0, 4000)), junk=st.one_of(st.none(), st.binary(max_size=64)),
       files=st.integers(0, 2))
def test_pairs_tables(tmp_path_factory, tiny_models, rows, drop, retype, cut, junk, files):
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder = tmp_path_factory.mktemp("pairs")
    data = folder / "pairs"
    data.mkdir()
    table = _pairs_table(rows).drop_columns(sorted(set(drop)))
    if retype and retype in table.column_names:
        i = table.column_names.index(retype)
        table = table.set_column(i, retype, pa.array(list(range(rows)), pa.int64()))
    for n in range(files):
        pq.write_table(table, data / f"part-{n}.parquet")
    if cut is not None and files:   # a truncated file
        f = data / "part-0.parquet"
        f.write_bytes(f.read_bytes()[: cut % (f.stat().st_size + 1)])
    if junk is not None:
        (data / "junk.parquet").write_bytes(junk)
    out = folder / "run"
    code, err = run_cli(["train", tiny_yaml(tiny_models, folder, str(out)), "--data", str(data),
                         "--address", NOWHERE])
    (line,) = check_outcome(code, err) if code == 2 else [""]
    assert code == 2 and ("nothing is listening" in line or str(data) in line), err
