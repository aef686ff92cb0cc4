"""`orbitgen models generate` on real parts: a tiny DCGAN trained and registered on the MLflow
server (once for the module), sets generated into S3 on local Ray, checked as a user would:
`data verify`, the card's lineage, the version's tag, the same bytes with 1 and 2 workers, and a
model trained on the generated set. A conditional model pairs its outputs with its inputs; a
failure leaves nothing at --out."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from data_shards.builtin import ensure_builtin
from data_shards.card import CARD, read_card, read_manifest
from data_shards.decode import decode_png
from data_shards.shard_reader import read_piece
from data_shards.storage import filesystem, join, to_url
from data_shards.verify import verify
from jobs.cli import main
from jobs.train.driver import run_job
from jobs.spec import SPECS_DIR, load_spec
from models.registry import make_family
from models.snapshot import save_snapshot
from tiny_specs import perturb_

pytestmark = pytest.mark.integration
MODEL = "generate-test"
TINY = ["data.resolution=16", "model.nz=8", "model.ngf=8", "model.ndf=8", "train.steps=2", "train.batch=4",
        "eval.num_samples=8", "scaling.num_workers=1", "data.shuffle_buffer=8"]


def tiny_spec(work: Path, tracking_uri: str, data: str, *extra: str):
    return load_spec(SPECS_DIR / "quickstart.yaml", [f"workdir={work}", f"data.train={data}",
                                                     f"tracking.uri={tracking_uri}", *TINY, *extra])


@pytest.fixture(scope="module")
def registered(mlflow_server, ray_local, tmp_path_factory):
    """`generate-test` v1, champion: a tiny DCGAN trained for 2 steps."""
    work = tmp_path_factory.mktemp("generate")
    result = run_job(tiny_spec(work, mlflow_server.url, "builtin:craters?count=32&seed=0",
                               f"tracking.registry_model={MODEL}"), say=print)
    assert result.model_version == "1"
    return result


def cli(*args: str):
    res = CliRunner().invoke(main, list(args))
    return res


def card_lineage(url: str) -> dict:
    """The lineage `models generate` writes into the set's dataset.json (read_card drops keys it does not know)."""
    fs, root = filesystem(to_url(url))
    return json.loads(fs.cat_file(join(root, CARD)))["generated"]


def shard_bytes(url: str) -> dict[str, bytes]:
    fs, root = filesystem(url)
    return {Path(p).name: fs.cat_file(p) for p in sorted(fs.ls(root, detail=False))
            if p.endswith((".tar", ".parquet"))}


def test_generated_set_verifies_carries_lineage_is_deterministic_and_trains(registered, mlflow_server, tmp_path):
    two, one = "s3://orbitgen/generated/w2", "s3://orbitgen/generated/w1"
    res = cli("models", "generate", f"models:/{MODEL}@champion", "--n", "40", "--out", two, "--workers", "2",
              "--shard-size", "16", "--seed-base", "100", "--tracking-uri", mlflow_server.url)
    assert res.exit_code == 0, res.output
    assert "40 images in 3 shards" in res.stdout

    # A shard set `data verify` accepts: every sha256 and sample checked.
    report = verify(two)
    assert report.ok and (report.samples, report.shards) == (40, 3), report.problems
    card = read_card(two)
    assert (card.count, card.shards, card.resolution, card.channels) == (40, 3, 16, 1)
    assert list(read_manifest(two).samples) == [16, 16, 8]
    assert cli("data", "inspect", two).exit_code == 0
    # The card's lineage: the model, its version and run, the seeds.
    lineage = card_lineage(two)
    assert lineage == {"model": f"models:/{MODEL}@champion", "name": MODEL, "version": "1",
                       "run_id": registered.run_id, "family": "dcgan", "n": 40, "seeds": [100, 139],
                       "shard_size": 16}
    # Each sample names its seed; different seeds give different images.
    raws = list(read_piece(read_manifest(two).url[0], 0, 2))
    assert [json.loads(r["json"])["seed"] for r in raws] == [100, 101]
    assert not np.array_equal(decode_png(raws[0]["png"]), decode_png(raws[1]["png"]))
    # The version lists the set.
    tag = MlflowClient(mlflow_server.url).get_model_version(MODEL, "1").tags["orbitgen.generated"]
    assert [(g["url"], g["n"], g["seeds"]) for g in json.loads(tag)] == [(two, 40, [100, 139])]

    # The same command with 1 worker: the same shard and manifest bytes.
    res = cli("models", "generate", f"models:/{MODEL}/1", "--n", "40", "--out", one, "--workers", "1",
              "--shard-size", "16", "--seed-base", "100", "--tracking-uri", mlflow_server.url)
    assert res.exit_code == 0, res.output
    assert shard_bytes(one) == shard_bytes(two) and len(shard_bytes(one)) == 4
    assert len(json.loads(MlflowClient(mlflow_server.url).get_model_version(MODEL, "1").tags["orbitgen.generated"])) == 2

    # An --out that holds a set is refused (exit 2), and kept.
    res = cli("models", "generate", f"models:/{MODEL}/1", "--n", "8", "--out", one, "--tracking-uri", mlflow_server.url)
    assert res.exit_code == 2 and "already holds a shard set" in res.stderr and "--overwrite" in res.stderr
    assert verify(one).ok

    # The generated set trains a model.
    trained = run_job(tiny_spec(tmp_path, mlflow_server.url, two, "tracking.registry_model=null"), say=print)
    assert trained.metrics["images_seen"] == 2 * 4 and np.isfinite(trained.metrics["fid"])
    assert MlflowClient(mlflow_server.url).get_run(trained.run_id).data.tags["orbitgen.data_fingerprint"] == card.fingerprint


@pytest.fixture(scope="module")
def pix2pix(tmp_path_factory):
    """A tiny pix2pix snapshot (perturbed weights) and a built-in set of its inputs (satellite -> map)."""
    work = tmp_path_factory.mktemp("generate-cond")
    family = make_family("pix2pix", {"ngf": 8, "ndf": 8, "d_layers": 2}, resolution=16, channels=3, lr=2e-4)
    torch.manual_seed(0)
    save_snapshot(work / "p2p.pt", family, perturb_(family.build()[family.sampler_role]))
    inputs = ensure_builtin("builtin:maps?count=12&seed=0", str(work / "shards"), 16, 3, shard_samples=5)
    return work, str(work / "p2p.pt"), inputs


def test_a_conditional_model_pairs_each_output_with_its_input(pix2pix, ray_local):
    work, snapshot, inputs = pix2pix
    res = cli("models", "generate", snapshot, "--out", str(work / "no-inputs"))
    assert res.exit_code == 2 and "--inputs" in res.stderr and "conditional" in res.stderr
    assert not (work / "no-inputs").exists()

    out = work / "paired"
    res = cli("models", "generate", snapshot, "--inputs", inputs, "--n", "9", "--out", str(out), "--workers", "2",
              "--shard-size", "4")
    assert res.exit_code == 0, res.output
    assert verify(str(out)).ok
    card = read_card(str(out))
    assert card.count == 9 and {"cond", "image"} <= set(card.modalities)
    assert card_lineage(str(out))["inputs"]["fingerprint"] == read_card(inputs).fingerprint
    given = [s for url in read_manifest(inputs).url for s in read_piece(url)][:9]
    made = [s for url in read_manifest(str(out)).url for s in read_piece(url)]
    assert [s["__key__"] for s in made] == [s["__key__"] for s in given]
    assert all(np.array_equal(decode_png(m["cond.png"]), decode_png(g["cond.png"])) for m, g in zip(made, given))
    assert not np.array_equal(decode_png(made[0]["png"]), decode_png(given[0]["png"]))


def test_a_failed_generation_leaves_nothing_at_out(pix2pix, ray_local, tmp_path):
    work, snapshot, inputs = pix2pix
    broken = tmp_path / "broken-inputs"
    fs, root = filesystem(inputs)
    fs.get(root, str(broken), recursive=True)
    (broken / "shard-000001.tar").unlink()   # the manifest still promises it
    res = cli("models", "generate", snapshot, "--inputs", str(broken), "--out", str(tmp_path / "out"),
              "--workers", "2", "--shard-size", "4")
    assert res.exit_code != 0
    assert not (tmp_path / "out").exists()
