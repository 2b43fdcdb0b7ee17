"""The multi-node fixtures (tests/multinode.py) are what they claim: two Ray nodes, a worker node with no
local disk in common with the head, S3 reachable from every node with only environment variables, and a
worker node that can be killed and replaced. Driver code runs in a subprocess (ray_nodes["run"])."""
from __future__ import annotations

import json
import time
import uuid

import pytest

pytestmark = pytest.mark.slow

PRELUDE = """
import json, os, ray
from pathlib import Path
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address={gcs!r}, log_to_driver=False)
def on(node_id):
    return {{"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}}
"""


def driver(ray_nodes, body: str, **values) -> dict:
    """Run `body` after PRELUDE in a driver subprocess; it prints one JSON line, returned here."""
    code = PRELUDE.format(gcs=ray_nodes["gcs"]) + "".join(f"{k} = {v!r}\n" for k, v in values.items()) + body
    return json.loads(ray_nodes["run"](code).strip().splitlines()[-1])


def test_two_nodes_and_no_shared_disk(ray_nodes):
    run = ray_nodes["root"] / f"run-{uuid.uuid4().hex[:8]}"
    run.mkdir()
    out = driver(ray_nodes, """
@ray.remote(num_cpus=0)
def probe(run, name):
    p = Path(run)
    p.mkdir(parents=True, exist_ok=True)
    (p / name).write_text("x")
    return {"node": ray.get_runtime_context().get_node_id(), "listing": sorted(os.listdir(p))}
(Path(run) / "driver.txt").write_text("from the driver")
w = ray.get(probe.options(**on(worker)).remote(run, "worker.txt"))
h = ray.get(probe.options(**on(head)).remote(run, "head.txt"))
print(json.dumps({"alive": [n["NodeID"] for n in ray.nodes() if n["Alive"]], "worker": w, "head": h,
                  "driver_listing": sorted(os.listdir(run))}))
""", run=str(run), worker=ray_nodes["worker_node_id"](), head=ray_nodes["head_node_id"])
    assert sorted(out["alive"]) == sorted([ray_nodes["head_node_id"], ray_nodes["worker_node_id"]()])
    assert out["worker"]["node"] == ray_nodes["worker_node_id"]() and out["head"]["node"] == ray_nodes["head_node_id"]
    # The worker node sees only its own file; the head node and the driver share the head's disk.
    assert out["worker"]["listing"] == ["worker.txt"]
    assert out["head"]["listing"] == ["driver.txt", "head.txt"]
    assert out["driver_listing"] == ["driver.txt", "head.txt"]
    assert sorted(p.name for p in run.iterdir()) == ["driver.txt", "head.txt"]


def test_worker_node_writes_s3_with_env_only(ray_nodes, bucket):
    uri = f"{bucket}/from-worker/hello.txt"
    out = driver(ray_nodes, """
@ray.remote(num_cpus=0)
def put(uri):
    import pyarrow.fs
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)  # endpoint and keys come from AWS_* variables only
    with fs.open_output_stream(path) as f:
        f.write(b"written on " + ray.get_runtime_context().get_node_id().encode())
    return ray.get_runtime_context().get_node_id()
node = ray.get(put.options(**on(worker)).remote(uri))
import boto3, pyarrow.fs
fs, path = pyarrow.fs.FileSystem.from_uri(uri)
with fs.open_input_stream(path) as f:
    via_arrow = f.read().decode()
bucket, key = uri[len("s3://"):].split("/", 1)
via_boto = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read().decode()
print(json.dumps({"node": node, "arrow": via_arrow, "boto": via_boto}))
""", uri=uri, worker=ray_nodes["worker_node_id"]())
    worker = ray_nodes["worker_node_id"]()
    assert out == {"node": worker, "arrow": f"written on {worker}", "boto": f"written on {worker}"}


def test_kill_and_replace_the_worker_node(ray_nodes):
    t0 = time.time()
    old = ray_nodes["kill_worker"]()
    while old in ray_nodes["alive_nodes"]() and time.time() - t0 < 60:
        time.sleep(0.5)
    dead_after = time.time() - t0
    assert old not in ray_nodes["alive_nodes"](), "the killed node is still alive after 60 s"
    new = ray_nodes["start_worker"]()
    assert new != old and set(ray_nodes["alive_nodes"]()) == {ray_nodes["head_node_id"], new}
    out = driver(ray_nodes, """
alive = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
ran_on = ray.get(ray.remote(num_cpus=0)(lambda: ray.get_runtime_context().get_node_id()).options(**on(new)).remote())
print(json.dumps({"alive": alive, "ran_on": ran_on}))
""", new=new)
    assert out["alive"][old] is False and out["alive"][new] is True
    assert sum(out["alive"].values()) == 2 and out["ran_on"] == new
    print(f"node dead after {dead_after:.1f} s; start times {ray_nodes['times']}")
