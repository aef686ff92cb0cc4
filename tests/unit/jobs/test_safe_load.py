"""Nothing read back from storage runs code: a file of a checkpoint replaced by a
pickle that would run a command is refused with an error naming the file, and the command never
runs; real checkpoints (DDP and DeepSpeed ZeRO, with DeepSpeed's loss scaler) still load."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from jobs.train import checkpoints
from jobs.train.loop import build_training
from models.safe_load import UntrustedFileError, load_weights_only
from models.snapshot import load_snapshot
from tiny_specs import tiny_spec

CPU = torch.device("cpu")


class RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    torch.save({"step": 1, "payload": RunsACommand(marker)}, path)


def written_checkpoint(tmp_path: Path, *strategy: str) -> tuple[Path, tuple]:
    spec = tiny_spec("quickstart", tmp_path / "work", "scaling.num_workers=1", *strategy)
    family, networks, phases, engines = build_training(spec, CPU, 1)
    directory = tmp_path / "ckpt"
    checkpoints.write(directory, rank=0, engines=engines, networks=networks, family=family, step=1, images_seen=4)
    return directory, build_training(spec, CPU, 1)


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    plant(tmp_path / "evil.pt", marker)
    with pytest.raises(UntrustedFileError, match=r"evil\.pt: refused to load.*GLOBAL posix\.system"):
        load_weights_only(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)   # the plant is real: an unrestricted load runs it
    assert marker.exists()


@pytest.mark.parametrize("name", [checkpoints.TRAINING_STATE, "engines/G.pt", "engines/D.pt", checkpoints.SNAPSHOT])
def test_every_file_of_a_ddp_checkpoint_is_loaded_weights_only(name, tmp_path):
    directory, (family, networks, _, engines) = written_checkpoint(tmp_path, "strategy.kind=ddp")
    marker = tmp_path / "ran"
    plant(directory / name, marker)
    with pytest.raises(UntrustedFileError, match=str(directory / name)):
        if name == checkpoints.SNAPSHOT:
            load_snapshot(directory / name)
        else:
            checkpoints.read(directory, engines=engines, networks=networks, family=family)
    assert not marker.exists()


@pytest.mark.integration
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_states_load_weights_only(stage, tmp_path, process_group):
    strategy = ("strategy.kind=deepspeed", f"strategy.zero_stage={stage}")
    directory, (family, networks, _, engines) = written_checkpoint(tmp_path, *strategy)
    clean = tmp_path / "clean"
    shutil.copytree(directory, clean)
    assert checkpoints.read(clean, engines=engines, networks=networks, family=family)["step"] == 1
    marker = tmp_path / "ran"
    for planted in sorted((directory / checkpoints.ENGINES / "G").glob("*.pt")):   # model and ZeRO optimizer states
        shutil.rmtree(directory), shutil.copytree(clean, directory)
        plant(planted, marker)
        with pytest.raises(UntrustedFileError, match=planted.name):
            checkpoints.read(directory, engines=engines, networks=networks, family=family)
    assert not marker.exists()


def snapshot_naming(path: Path, family: str) -> Path:
    torch.save({"format": "orbitgen-snapshot-v1", "family": family, "config": {}, "resolution": 8, "channels": 1,
                "lr": 1e-3, "state_dict": {}, "extra": {}}, path)
    return path


@pytest.mark.parametrize("family", ["planted_family_module:Anything", "planted_family_module", "os:system",
                                    "subprocess:Popen", "models.family:Family"])
def test_a_snapshot_naming_a_module_imports_nothing_and_is_refused(family, tmp_path, monkeypatch):
    """A snapshot's `family` must name a discovered family: a module it names is never imported
    (importing runs the module's code before any subclass check could refuse it)."""
    marker = tmp_path / "imported"
    (tmp_path / "planted_family_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nAnything = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = snapshot_naming(tmp_path / "g.pt", family)
    with pytest.raises(UntrustedFileError, match=r"g\.pt: refused to load: it names the family .*dcgan"):
        load_snapshot(path)
    assert not marker.exists()


def test_a_snapshot_of_a_discovered_family_still_loads(tmp_path):
    from models.registry import make_family
    from models.snapshot import save_snapshot

    family = make_family("dcgan", {}, resolution=16, channels=1, lr=1e-3)
    save_snapshot(tmp_path / "g.pt", family, family.build()[family.sampler_role])
    loaded, sampler, _ = load_snapshot(tmp_path / "g.pt")
    assert loaded.name == "dcgan" and not sampler.training


def test_a_family_in_a_package_shipped_with_the_snapshot_may_be_imported(tmp_path, monkeypatch):
    """A registered model ships a lab's package as code: its loader names that package as trusted."""
    package = tmp_path / "labpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "fam.py").write_text("from models.families.dcgan import DCGAN\n\n\nclass LabGAN(DCGAN):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = snapshot_naming(tmp_path / "g.pt", "labpkg.fam:LabGAN")
    with pytest.raises(UntrustedFileError):
        load_snapshot(path)   # not trusted, not imported
    import sys
    assert "labpkg.fam" not in sys.modules
    with pytest.raises(Exception) as caught:   # trusted: imported and built (this file holds no weights)
        load_snapshot(path, trusted_packages=["labpkg"])
    assert not isinstance(caught.value, UntrustedFileError) and "labpkg.fam" in sys.modules
    monkeypatch.delitem(sys.modules, "labpkg.fam")
    monkeypatch.delitem(sys.modules, "labpkg")
