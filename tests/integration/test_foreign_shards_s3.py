"""WebDataset shards made elsewhere, on the loopback S3 server, as a user brings them: written by
plain `webdataset.ShardWriter` as `png` + `cls`, no dataset.json. A brace URL trains, evaluates
and verifies; `data adopt` writes a card that `data verify` then checks, tampering included."""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from data_shards.card import ADOPTED_PREFIX
from data_shards.storage import filesystem
from data_shards.synthetic import crater_field
from jobs.cli import main
from jobs.spec import SPECS_DIR

pytestmark = pytest.mark.integration
RES, COUNT, PER_SHARD = 16, 48, 16
QUICKSTART = str(SPECS_DIR / "quickstart.yaml")
MODEL = "foreign-shards-test"


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a[:, :, 0]).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def foreign(s3_server, tmp_path_factory):
    """Two copies of one set on S3 (`train/` and `adopt/`, the second to be tampered with):
    shard-000000.tar .. shard-000002.tar, each sample `KEY.png` + `KEY.cls`."""
    import webdataset as wds

    local = tmp_path_factory.mktemp("foreign")
    with wds.ShardWriter(str(local / "shard-%06d.tar"), maxcount=PER_SHARD, verbose=0) as sink:
        for i, s in enumerate(crater_field(COUNT, RES, channels=1, seed=11)):
            sink.write({"__key__": f"scene{i:05d}", "png": png(s.image), "cls": i % 2})
    fs, _ = filesystem("s3://orbitgen")
    for folder in ("train", "adopt"):
        fs.put([str(p) for p in sorted(local.glob("*.tar"))], f"orbitgen/foreign/{folder}/")
    return "s3://orbitgen/foreign"


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_a_brace_url_trains_evaluates_and_verifies(foreign, mlflow_server, ray_local, tmp_path):
    url = f"{foreign}/train/shard-{{000000..000002}}.tar"
    sets = [f"workdir={tmp_path}", f"data.train={url}", f"data.resolution={RES}", "data.shuffle_buffer=16",
            f"tracking.uri={mlflow_server.url}", f"tracking.registry_model={MODEL}",
            "checkpoint.storage=s3://orbitgen/runs", "scaling.num_workers=1", "model.nz=16", "model.ngf=8", "model.ndf=8", "train.batch=8",
            "train.steps=4", "checkpoint.every_steps=4", "eval.num_samples=32"]
    trained = invoke("train", QUICKSTART, *[a for s in sets for a in ("--set", s)])
    assert trained.exit_code == 0, trained.output + trained.stderr
    assert f"adopted {url}: {COUNT} samples in 3 shards" in trained.stderr and "beside the shards" in trained.stderr
    fs, _ = filesystem(foreign)
    assert fs.glob(f"orbitgen/foreign/train/{ADOPTED_PREFIX}*/dataset.json")
    version = re.search(rf"registry\s+{MODEL} v(\d+)", trained.output).group(1)

    # Two of the three shards: a set no card describes yet, adopted by the evaluation itself.
    part = f"{foreign}/train/shard-{{000001..000002}}.tar"
    evaluated = invoke("eval", f"models:/{MODEL}/{version}", "--data", part, "--tracking-uri", mlflow_server.url,
                       "--num-samples", "16")
    assert evaluated.exit_code == 0, evaluated.output + evaluated.stderr
    assert f"adopted {part}: {COUNT - PER_SHARD} samples in 2 shards" in evaluated.stderr
    assert "fid" in evaluated.output

    verified = invoke("data", "verify", url)
    assert verified.exit_code == 0 and f"ok: {COUNT} samples in 3 shards" in verified.output


def test_data_adopt_writes_a_card_that_verify_checks(foreign):
    folder = f"{foreign}/adopt"
    adopted = invoke("data", "adopt", folder, "--holdout", "0.25")
    assert adopted.exit_code == 0, adopted.output
    assert f"{COUNT} samples (image, cls; 1 channels, {RES}²)" in adopted.output and "members image: png" in adopted.output
    assert "split by key hash, holdout 0.25" in adopted.output
    assert invoke("data", "adopt", folder).output.count("already there") == 1   # reused, not read again
    assert invoke("data", "verify", folder).exit_code == 0

    fs, _ = filesystem(folder)
    shard = "orbitgen/foreign/adopt/shard-000001.tar"
    data = bytearray(fs.cat_file(shard))
    data[len(data) // 2] ^= 0xFF   # same size, other content
    fs.pipe_file(shard, bytes(data))
    verified = invoke("data", "verify", folder)
    assert verified.exit_code == 1 and "shard-000001.tar: sha256 differs from the manifest" in verified.stderr
