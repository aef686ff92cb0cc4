"""A model file a spec names (a frozen stage-1 generator, a ControlNet's base) reaches workers
on nodes without the driver's disk: shipped through Ray's object store, written once per node."""
from __future__ import annotations

import pytest

from jobs.tracking.model_refs import place, ship
from jobs.spec import JobSpec

pytestmark = pytest.mark.integration


def test_a_worker_without_the_file_gets_its_bytes(ray_local, tmp_path):
    from models.registry import make_family
    from models.snapshot import save_snapshot

    stage1 = make_family("sat2ground", {"nz": 8, "ngf": 8, "ndf": 8}, resolution=16, channels=3, lr=2e-4)
    driver_file = tmp_path / "driver" / "g.pt"
    driver_file.parent.mkdir()
    save_snapshot(driver_file, stage1, stage1.build()["G"])
    spec = JobSpec.model_validate({"name": "t", "family": "sat2ground", "data": {"train": "builtin:sat2ground",
                                   "resolution": 16, "channels": 3}, "train": {"steps": 1},
                                   "model": {"nz": 8, "ngf": 8, "ndf": 8, "stage": 2,
                                             "generator_from": str(driver_file)}})
    shipped = ship(spec)
    # On the driver's node the file is there: the spec is left as it is.
    assert place(spec, shipped, tmp_path / "node").model["generator_from"] == str(driver_file)
    original = driver_file.read_bytes()
    driver_file.unlink()   # another node: the driver's path does not exist there
    placed = place(spec, shipped, tmp_path / "node")
    local = placed.model["generator_from"]
    assert local != str(driver_file) and open(local, "rb").read() == original
    assert place(spec, shipped, tmp_path / "node").model["generator_from"] == local   # written once
