"""The driver's cluster checks without a cluster: where a job's files may live (jobs/placement.py)
and whether what it asks for can ever be placed (jobs/capacity.py), on described clusters."""
from __future__ import annotations

import pytest

from jobs.capacity import Demand, fits_ever, placeable, refuse_unfitting, training_demand
from jobs.placement import Place, builtin_home, local_path, refuse_unshared, shared, training_places
from jobs.runtime.cluster import Cluster
from jobs.spec import SPECS_DIR, SpecError, load_spec

ONE_BOX = Cluster(nodes=({"CPU": 2.0},), local=True)
TWO_NODES = Cluster(nodes=({"CPU": 8.0}, {"CPU": 8.0, "GPU": 2.0}))
GROWS = Cluster(nodes=({"CPU": 4.0},), can_grow=True, max_resources={"CPU": 64.0, "GPU": 8.0})


def quickstart(*sets: str):
    return load_spec(SPECS_DIR / "quickstart.yaml", list(sets))


@pytest.mark.parametrize("url, path", [
    ("/w/runs", "/w/runs"), ("file:///w/runs", "/w/runs"), ("sqlite:////w/mlflow.db", "/w/mlflow.db"),
    ("s3://bucket/runs", None), ("http://mlflow:5000", None), ("gs://b/x", None)])
def test_local_path_of_a_url(url, path):
    assert local_path(url) == path


def test_a_declared_mount_is_shared():
    assert shared("/mnt/fsx/runs", ["/mnt/fsx"]) and not shared("/mnt/fsxother/runs", ["/mnt/fsx"])
    assert shared("s3://bucket/x", []) and not shared("file:///w/runs", [])


def test_one_machine_takes_local_paths():
    spec = quickstart("workdir=/w")
    refuse_unshared(ONE_BOX, training_places(spec, data_url="/w/shards", tracking_uri="sqlite:////w/m.db"))


@pytest.mark.parametrize("sets, key, path", [
    (["workdir=/w", "tracking.uri=http://mlflow:5000", "checkpoint.storage=s3://b/runs"], "data.train", "/w/shards"),
    (["workdir=/w", "tracking.uri=http://mlflow:5000"], "storage.root", "/w/runs"),
    (["workdir=/w", "tracking.uri=http://mlflow:5000", "checkpoint.storage=/scratch/runs"], "checkpoint.storage",
     "/scratch/runs"),
    (["workdir=/w", "checkpoint.storage=s3://b/runs", "tracking.uri=sqlite:////w/m.db"], "tracking.uri", "/w/m.db"),
])
def test_a_cluster_refuses_the_first_local_path_naming_key_path_and_fix(sets, key, path):
    spec = quickstart(*sets)
    data = "s3://b/shards" if key != "data.train" else "/w/shards"
    with pytest.raises(SpecError) as err:
        refuse_unshared(TWO_NODES, training_places(spec, data_url=data, tracking_uri=spec.tracking_uri()))
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{key}: ") and path in line and "2 nodes" in line
    assert ("s3://" in line or "http://" in line) and (key == "tracking.uri" or "storage.shared_mounts" in line)
    if key in ("storage.root", "checkpoint.storage"):   # the setting to change, named once
        assert line.count(f"set {key}") == 1 and "itself" not in line


def test_a_cluster_takes_object_storage_and_declared_mounts(monkeypatch):
    monkeypatch.setenv("ORBITGEN_STORAGE", "s3://b/orbitgen")
    spec = quickstart("workdir=/w", "tracking.uri=http://mlflow:5000", "storage.shared_mounts=[/mnt/fsx]")
    assert spec.storage_url() == "s3://b/orbitgen/runs"
    assert builtin_home(spec, TWO_NODES) == "s3://b/orbitgen/shards" and builtin_home(spec, ONE_BOX) == "/w/shards"
    refuse_unshared(GROWS, training_places(spec, data_url="/mnt/fsx/shards", tracking_uri=spec.tracking_uri()),
                    spec.storage.shared_mounts)


def test_a_cluster_that_can_grow_spans_machines_even_with_one_node():
    assert GROWS.spans_machines and TWO_NODES.spans_machines and not ONE_BOX.spans_machines


def test_placeable_counts_bundles_per_node():
    d = Demand("workers", 3, {"CPU": 4.0, "GPU": 1.0})
    assert placeable(d, [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 16.0}]) == 3
    assert placeable(Demand("w", 3, {"CPU": 1.0}, one_per_node=True), [{"CPU": 8.0}, {"CPU": 8.0}]) == 2


@pytest.mark.parametrize("sets, cluster, fix", [
    (["scaling.use_gpu=true"], ONE_BOX, "--set scaling.use_gpu=false"),
    (["scaling.num_workers=4", "train.batch=64"], ONE_BOX, "--set scaling.num_workers=2"),
    (["scaling.cpus_per_worker=4"], ONE_BOX, "--set scaling.cpus_per_worker=2"),
    (["scaling.num_workers=4", "train.batch=64", "scaling.use_gpu=true"], TWO_NODES, "--set scaling.num_workers=2"),
    (["scaling.num_workers=3", "train.batch=63", "scaling.placement_strategy=STRICT_SPREAD"], TWO_NODES,
     "--set scaling.num_workers=2"),
])
def test_a_demand_that_never_fits_is_refused_with_the_set_that_fits(sets, cluster, fix):
    demand = training_demand(quickstart(*sets))
    with pytest.raises(SpecError) as err:
        refuse_unfitting(demand, cluster)
    line = str(err.value)
    assert "\n" not in line and str(demand) in line and cluster.describe() in line and fix in line


def test_a_cluster_that_can_grow_takes_what_its_autoscaler_may_add():
    gpu4 = training_demand(quickstart("scaling.num_workers=4", "train.batch=64", "scaling.use_gpu=true"))
    assert fits_ever(gpu4, GROWS)
    assert not fits_ever(Demand("w", 9, {"GPU": 1.0}), GROWS)   # beyond its max of 8 GPUs
    assert fits_ever(Demand("w", 9, {"GPU": 1.0}), Cluster(nodes=({"CPU": 1.0},), can_grow=True))   # limits unsaid


def test_only_a_monitor_with_node_types_of_its_own_can_grow():
    from ray.autoscaler._private.util import format_readonly_node_type

    from jobs.runtime.cluster import grows

    readonly = {"autoscaler_report": {"node_type_mapping": {n: format_readonly_node_type(n) for n in ("a1", "b2")},
                                      "legacy": True}}
    launcher = {"autoscaler_report": {"node_type_mapping": {"a1": "ray.head.default", "b2": "ray.worker.gpu"}}}
    assert not grows(readonly) and not grows({}) and not grows({"load_metrics_report": {}})
    assert grows(launcher)


def test_the_waiting_line_names_what_is_missing_or_busy(monkeypatch):
    import ray

    from jobs.capacity import Pending

    gpu2 = training_demand(quickstart("scaling.use_gpu=true"))
    placed = False   # whether this job's placement group is made (read from Ray's state API)
    monkeypatch.setattr(Pending, "_placed", lambda self: placed)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 8.0})
    assert Pending(gpu2).line() == ("waiting for 2 training workers × {GPU: 1, CPU: 1}: cluster has 0 GPUs; "
                                    "the autoscaler is adding nodes")
    cpu2 = training_demand(quickstart())
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 1.0})
    assert Pending(cpu2).line() == "waiting for 2 training workers × {CPU: 1}: 1 of 8 CPUs free (other work holds the rest)"
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 2.0})   # room, but not yet placed
    assert Pending(cpu2).line() == "waiting for 2 training workers × {CPU: 1}: 2 of 8 CPUs free, Ray is placing them"
    placed = True
    assert "placed, starting" in Pending(cpu2).line()


def test_one_of_a_demand_is_named_in_the_singular():
    assert str(Demand("search trials", 1, {"CPU": 1})) == "1 search trial × {CPU: 1}"
    assert str(Demand("search trials", 2, {"CPU": 1})) == "2 search trials × {CPU: 1}"
