"""The CLI as a user types it: data build/inspect/verify on small sources, models show/promote on a registry."""
from __future__ import annotations

import mlflow
import numpy as np
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image

from data_shards.card import read_manifest
from jobs.cli import main
from jobs.spec import SPECS_DIR
from jobs.tracking.protocol import EvalProtocol, version_tags
from jobs.tracking.runs import ensure_experiment


def test_data_build_then_inspect_and_verify(tmp_path):
    src = tmp_path / "images" / "nested"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(src / f"img{i}.png")
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    dest = tmp_path / "shards"
    runner = CliRunner()
    args = ["data", "build", str(tmp_path / "images"), str(dest), "--layout", "folder", "--resolution", "16",
            "--channels", "gray", "--shard-size", "3"]
    res = runner.invoke(main, args)
    assert res.exit_code == 2 and "nested/broken.png: cannot read image" in res.output, res.output
    assert not dest.exists()   # a failed build removes the folder it created
    res = runner.invoke(main, args + ["--on-error", "skip"])
    assert res.exit_code == 0, res.output
    assert "7 samples (image, json; 1 channels, 16²) in 3 shards" in res.output
    assert "skipped 1 item " in res.output and "skipped.jsonl" in res.output and "nested/broken.png" in res.output
    assert read_manifest(dest.as_uri())["samples"].tolist() == [3, 3, 1]

    res = runner.invoke(main, ["data", "inspect", str(dest), "--preview", str(tmp_path / "grid.png")])
    assert res.exit_code == 0, res.output
    assert "resolution   16" in res.output and "channels     1" in res.output and "skipped      1" in res.output
    assert Image.open(tmp_path / "grid.png").size[0] > 16

    res = runner.invoke(main, ["data", "verify", str(dest)])
    assert res.exit_code == 0 and "ok: 7 samples in 3 shards" in res.output, res.output
    shard = dest / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0x01
    shard.write_bytes(bytes(data))
    res = runner.invoke(main, ["data", "verify", str(dest)])
    assert res.exit_code == 1 and "CORRUPT shard-000002.tar: sha256 differs" in res.output, res.output


def test_data_build_layout_options(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "maps").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 40, 3), dtype=np.uint8)).save(tmp_path / "maps" / f"{i}.png")
    runner = CliRunner()
    res = runner.invoke(main, ["data", "build", str(tmp_path / "maps"), str(tmp_path / "a"), "--layout", "side-by-side",
                               "--resolution", "8", "--input-side", "right", "--shard-size", "1MB"])
    assert res.exit_code == 0 and "3 samples (image, cond, json; 3 channels, 8²) in 1 shard " in res.output, res.output
    res = runner.invoke(main, ["data", "build", str(tmp_path / "maps"), str(tmp_path / "b"), "--resolution", "8",
                               "--stride", "4"])
    assert res.exit_code == 2 and "--stride is for --layout geotiff" in res.output
    res = runner.invoke(main, ["data", "build", str(tmp_path / "maps"), str(tmp_path / "b"), "--resolution", "8",
                               "--shard-size", "big"])
    assert res.exit_code == 2 and "shard size 'big'" in res.output


def test_data_build_errors_name_the_source(tmp_path):
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(main, ["data", "build", str(tmp_path / "empty"), str(tmp_path / "out"), "--resolution", "16"])
    assert res.exit_code != 0 and "no usable items in" in res.output and "empty" in res.output
    res = CliRunner().invoke(main, ["data", "inspect", str(tmp_path / "empty")])
    assert res.exit_code != 0 and "no dataset.json" in res.output
    res = CliRunner().invoke(main, ["data", "verify", str(tmp_path / "empty")])
    assert res.exit_code != 0 and "no dataset.json" in res.output


def test_models_show_and_promote(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_experiment(experiment_id=ensure_experiment(uri, "cli", tmp_path / "artifacts"))
    client = MlflowClient(uri)
    client.create_registered_model("gen")
    protocol = EvalProtocol(data_fingerprint="cli", split="all", real_seed=0, seed_base=0, num_samples=8)
    for fid in (3.0, 1.5):
        with mlflow.start_run() as run:
            mlflow.log_metric("fid", fid)
        # scores recorded under an evaluation protocol, as training records them (promote compares only those)
        client.create_model_version("gen", f"runs:/{run.info.run_id}/generator", run.info.run_id,
                                    tags=version_tags(protocol, {"fid": fid}, run.info.run_id))
    mlflow.set_tracking_uri(None)

    runner = CliRunner()
    res = runner.invoke(main, ["models", "promote", "gen", "--metric", "fid", "--mode", "min", "--tracking-uri", uri])
    assert res.exit_code == 0 and "v2 is the first champion" in res.output, res.output
    res = runner.invoke(main, ["models", "show", "gen", "--tracking-uri", uri])
    assert res.exit_code == 0
    lines = res.output.splitlines()
    assert "champion" in lines[1] and lines[1].startswith("v2") and "fid=1.5" in lines[1]
    res = runner.invoke(main, ["models", "list", "--tracking-uri", uri])
    assert "gen  latest v2  champion=v2" in res.output
    res = runner.invoke(main, ["models", "promote", "nope", "--tracking-uri", uri])
    assert res.exit_code != 0 and "no registered model named 'nope'" in res.output


def test_train_names_missing_backbone_weights_before_starting(tmp_path):
    """SCB-GAN's backbones are local files: a missing one stops the job before Ray or MLflow start."""
    res = CliRunner().invoke(main, ["train", str(SPECS_DIR / "scbgan_rosetta.yaml"), "--set", f"workdir={tmp_path}",
                                    "--set", "data.train=builtin:craters?count=8&seed=0", "--set", "data.resolution=16",
                                    "--set", f"model.vision_aided.weights.vgg16={tmp_path / 'vgg16.pth'}"])
    assert res.exit_code == 2, res.output
    assert "model.vision_aided.weights.clip_vitb32: no file at" in res.output
    assert f"model.vision_aided.weights.vgg16: no file at {tmp_path / 'vgg16.pth'}" in res.output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_data_build_keeps_the_geotiff_bands_named_by_bands_in_their_order(tmp_path):
    import tifffile

    scene = np.stack([np.full((16, 16), v, np.uint8) for v in (10, 20, 30)], axis=-1)
    geokeys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633)
    tifffile.imwrite(tmp_path / "scene.tif", scene, photometric="minisblack", planarconfig="contig", extratags=[
        (33550, "d", 3, (10.0, 10.0, 0.0), True), (33922, "d", 6, (0, 0, 0, 500000.0, 4000000.0, 0), True),
        (34735, "H", len(geokeys), geokeys, True)])
    res = CliRunner().invoke(main, ["data", "build", str(tmp_path / "scene.tif"), str(tmp_path / "set"),
                                    "--layout", "geotiff", "--resolution", "16", "--channels", "keep", "--bands", "3,1"])
    assert res.exit_code == 0, res.output
    assert "1 sample (image, json; 2 channels, 16²) in 1 shard " in res.output, res.output
    from data_shards.stream import iterate_once

    batch = next(iterate_once(str(tmp_path / "set"), 1, keys=("image", "json")))
    assert batch["json"][0]["band_indexes"] == [3, 1]
    assert batch["image"][0, :, 0, 0].tolist() == [30, 10]   # 8-bit bands are kept as they are
    res = CliRunner().invoke(main, ["data", "build", str(tmp_path / "scene.tif"), str(tmp_path / "x"),
                                    "--layout", "folder", "--resolution", "16", "--bands", "1"])
    assert res.exit_code == 2 and "--bands is for --layout geotiff" in res.output
