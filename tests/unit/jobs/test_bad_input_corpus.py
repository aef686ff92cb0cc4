"""Bad input, across every command: one or two lines `error: ...` naming the input, exit 2,
nothing written. Each case runs in a fresh working directory; the test compares the
file trees of that directory and of the shared fixtures before and after. Cases with `code=1`
are the environment rather than the input (a disk that refuses writes, a scheme whose filesystem
is not installed): the same one line, exit 1 (jobs/cli/common.py, the error boundary)."""
from __future__ import annotations

import hashlib
import io
import os
import json
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image

from data_shards.builtin import ensure_builtin
from data_shards.card import read_manifest, write_manifest
from jobs.cli import main
from jobs.spec import SPECS_DIR

REPO = Path(__file__).resolve().parents[3]
DEAD = "http://127.0.0.1:1"          # nobody answers on port 1
QS = str(SPECS_DIR / "quickstart.yaml")
S2 = str(SPECS_DIR / "sat2ground_stage2.yaml")
NO_RUN = "0123456789abcdef0123456789abcdef"
BAD_YAML = "name: quickstart\nfamily: dcgan\ndata: {train: [unclosed\n"


@dataclass
class Case:
    id: str
    argv: list[str]          # {work}: the fresh cwd; {fx}: the fixtures; {store}: their MLflow store
    names: list[str]         # what the message must name
    env: dict[str, str] = field(default_factory=dict)
    absent: list[str] = field(default_factory=list)   # what it must not show (a buffer's repr, ...)
    code: int = 2            # 1: the environment, not the input


def train(*sets: str, spec: str = QS, extra: tuple[str, ...] = ()) -> list[str]:
    return ["train", spec, "--set", "workdir={work}/w", *[a for s in sets for a in ("--set", s)], *extra]


SHARDS = "data.train={fx}/shards"   # 1 channel, 16x16


def build(source: str, *extra: str) -> list[str]:
    return ["data", "build", source, "{work}/out", "--resolution", "8", *extra]


GEO = ("--layout", "geotiff", "--resolution", "4")
ZIP = ("--layout", "stylegan-zip")
CASES = [
    # train: the spec and --set
    Case("train-unknown-key", train("train.stepz=5"), ["train.stepz", "unknown key"]),
    Case("train-bad-type", train("train.steps=abc"), ["train.steps", "abc"]),
    Case("train-out-of-range", train("data.resolution=4"), ["data.resolution", "8"]),
    Case("train-unknown-family", train("family=nope"), ["family", "nope", "dcgan"]),
    Case("train-set-without-equals", train("train.steps"), ["--set 'train.steps'", "key.path=value"]),
    Case("train-set-into-a-value", train("name.sub=1"), ["--set name.sub", "not a section"]),
    Case("train-set-unknown-section", train("nosuch.key=1"), ["nosuch", "unknown key"]),
    Case("train-spec-missing", ["train", "{work}/missing.yaml"], ["missing.yaml", "quickstart.yaml"]),
    Case("train-spec-yaml-syntax", ["train", "{fx}/bad.yaml"], ["bad.yaml", "not valid YAML"]),
    Case("train-spec-not-a-mapping", ["train", "{fx}/list.yaml"], ["list.yaml", "mapping"]),
    Case("train-batch-not-divisible", train("train.batch=5"), ["train.batch", "scaling.num_workers"]),
    Case("train-unknown-eval-metric", train("eval.metrics=[nope]"), ["eval.metrics", "nope", "fid"]),
    Case("train-inception-weights-missing", train("eval.fid_extractor=inception",
                                                  "eval.inception_weights={work}/none.pt"),
         ["eval.inception_weights", "none.pt"]),
    # train: the data the spec names
    Case("train-data-path-missing", train("data.train={work}/nowhere"), ["data.train", "nowhere", "nothing there"]),
    Case("train-data-file-url-missing", train("data.train=file://{work}/nowhere"), ["data.train", "file://"]),
    Case("train-data-not-a-shard-set", train("data.train={fx}/square"), ["data.train", "no dataset.json"]),
    Case("train-data-s3-endpoint-dead", train("data.train=s3://no-such-bucket/set"),
         ["data.train", "s3://no-such-bucket/set", "AWS_ENDPOINT_URL"], env={"AWS_ENDPOINT_URL": DEAD}),
    Case("train-channels-differ", train(SHARDS, "data.resolution=16", "data.channels=3"),
         ["data.channels=3", "1-channel"]),
    Case("train-resolution-differs", train(SHARDS, "data.resolution=32"), ["data.resolution=32", "16²"]),
    Case("train-builtin-unknown-name", train("data.train=builtin:nope"), ["builtin:nope", "builtin:craters"]),
    Case("train-builtin-bad-param", train("data.train=builtin:craters?count=x"), ["count", "not an integer"]),
    Case("train-builtin-unknown-param", train("data.train=builtin:craters?size=9"), ["size", "allowed"]),
    # train: runs, references, tracking
    Case("train-resume-unknown-run", train(extra=("--resume", "ghost-1234")), ["ghost-1234", "runs there"]),
    Case("train-tracking-server-dead", train("tracking.uri=" + DEAD), ["tracking.uri", "127.0.0.1:1"]),
    Case("train-ref-unknown-run", train("tracking.uri={store}", f"model.generator_from=runs:/{NO_RUN}/generator",
                                        spec=S2), ["model.generator_from", NO_RUN]),
    Case("train-ref-unknown-model", train("tracking.uri={store}", "model.generator_from=models:/nope@champion",
                                          spec=S2), ["model.generator_from", "models:/nope@champion"]),
    Case("train-ref-no-store", train(f"model.generator_from=runs:/{NO_RUN}/generator", spec=S2),
         ["model.generator_from", "no MLflow store"]),
    Case("train-ref-file-missing", train("model.generator_from={work}/g.pt", spec=S2),
         ["model.generator_from", "g.pt"]),
    # quickstart
    Case("quickstart-out-of-range", ["quickstart", "--workdir", "{work}/w", "--set", "data.resolution=3"],
         ["data.resolution"]),
    Case("quickstart-unknown-key", ["quickstart", "--workdir", "{work}/w", "--set", "nope=1"], ["nope"]),
    Case("quickstart-resume-unknown-run", ["quickstart", "--workdir", "{work}/w", "--resume", "ghost"], ["ghost"]),
    # data build
    Case("build-source-missing", ["data", "build", "{work}/nope", "{work}/out", "--resolution", "8"], ["nope"]),
    Case("build-side-by-side-on-single-images", ["data", "build", "{fx}/square", "{work}/out", "--resolution", "8",
                                                 "--layout", "side-by-side"], ["not a side-by-side pair", "--layout folder"]),
    Case("build-class-folders-on-flat-folder", ["data", "build", "{fx}/square", "{work}/out", "--resolution", "8",
                                                "--layout", "class-folders"], ["square", "no class sub-folders"]),
    Case("build-zip-dotdot", ["data", "build", "{fx}/dotdot.zip", "{work}/out", "--resolution", "8",
                              "--layout", "stylegan-zip"], ["dotdot.zip", "../evil.png", "escape"]),
    Case("build-zip-absolute", ["data", "build", "{fx}/abs.zip", "{work}/out", "--resolution", "8",
                                "--layout", "stylegan-zip"], ["abs.zip", "/abs.png", "escape"]),
    Case("build-zip-not-a-zip", ["data", "build", "{fx}/bad.yaml", "{work}/out", "--resolution", "8",
                                 "--layout", "stylegan-zip"], ["bad.yaml", "not a StyleGAN dataset zip"]),
    Case("build-resolution-zero", ["data", "build", "{fx}/square", "{work}/out", "--resolution", "0"],
         ["--resolution", "x>=1"]),
    Case("build-resolution-not-a-number", ["data", "build", "{fx}/square", "{work}/out", "--resolution", "big"],
         ["--resolution", "big"]),
    Case("build-shard-size-word", ["data", "build", "{fx}/square", "{work}/out", "--resolution", "8",
                                   "--shard-size", "big"], ["shard size 'big'", "256MB"]),
    Case("build-shard-size-zero", ["data", "build", "{fx}/square", "{work}/out", "--resolution", "8",
                                   "--shard-size", "0"], ["shard size '0'"]),
    Case("build-shard-size-unit", ["data", "build", "{fx}/square", "{work}/out", "--resolution", "8",
                                   "--shard-size", "3PB"], ["shard size '3PB'"]),
    Case("build-option-of-another-layout", ["data", "build", "{fx}/square", "{work}/out", "--resolution", "8",
                                            "--stride", "4"], ["--stride is for --layout geotiff"]),
    Case("build-unknown-layout", ["data", "build", "{fx}/square", "{work}/out", "--resolution", "8",
                                  "--layout", "tiles"], ["--layout", "tiles", "class-folders"]),
    Case("build-dest-holds-another-set", ["data", "build", "{fx}/square", "{fx}/shards", "--resolution", "8"],
         ["shards", "already holds a different shard set"]),
    Case("build-paired-folders-missing-side", ["data", "build", "{fx}/square", "{work}/out", "--resolution", "8",
                                               "--layout", "paired-folders"], ["square/cond", "no such folder"]),
    Case("build-timeseries-unknown-role", ["data", "build", "{fx}/series.csv", "{work}/out", "--resolution", "8",
                                           "--layout", "timeseries-csv", "--columns", "pst=a"], ["pst", "roles"]),
    # data build: hostile and odd source files
    Case("build-png-bomb", build("{fx}/bomb"), ["big.png", "13000x13000 pixels", "ORBITGEN_MAX_IMAGE_PIXELS"]),
    Case("build-image-not-an-image", build("{fx}/textpng"), ["notes.png", "cannot read image"], absent=["BytesIO"]),
    Case("build-tiff-zero-bands", build("{fx}/empty.tif", *GEO), ["empty.tif", "zero bands"]),
    Case("build-tiff-zero-bands-folder", build("{fx}/emptytif"), ["empty.tif", "zero bands"]),
    Case("build-tiff-stack-of-rgb-images", build("{fx}/stack.tif", *GEO), ["stack.tif", "several multi-band images"]),
    Case("build-geotiff-gcps", build("{fx}/gcps.tif", *GEO), ["gcps.tif", "tie points", "needs an affine transform"]),
    Case("build-geotiff-raster-over-cap", build("{fx}/scene.tif", *GEO), ["scene.tif", "ORBITGEN_MAX_RASTER_BYTES"],
         env={"ORBITGEN_MAX_RASTER_BYTES": "10"}),
    Case("build-zip-labels-bare-list", build("{fx}/barelist.zip", *ZIP),
         ["barelist.zip", "dataset.json", "neither name/label pairs nor a mapping"]),
    Case("build-zip-json-not-an-object", build("{fx}/jsonlist.zip", *ZIP), ["jsonlist.zip", "holds a JSON list"]),
    Case("build-zip-json-broken", build("{fx}/brokenjson.zip", *ZIP), ["brokenjson.zip", "cannot be read as JSON"]),
    Case("build-zip-vector-labels", build("{fx}/vector.zip", *ZIP), ["vector.zip", "only class indices"]),
    Case("build-zip-member-inflates-past-cap", build("{fx}/inflates.zip", *ZIP),
         ["00000/img00000001.png", "bytes uncompressed"], env={"ORBITGEN_MAX_IMAGE_PIXELS": "65536"}),
    Case("build-names-collide-after-cleaning", build("{fx}/camera"), ["'DSC0001.png'", "'_DSC0001.png'", "'DSC0001'"]),
    Case("build-image-pixel-cap-not-a-number", build("{fx}/square"), ["ORBITGEN_MAX_IMAGE_PIXELS", "lots"],
         env={"ORBITGEN_MAX_IMAGE_PIXELS": "lots"}),
    # data inspect / verify
    Case("inspect-missing", ["data", "inspect", "{work}/nope"], ["nope", "nothing there"]),
    Case("inspect-not-a-shard-set", ["data", "inspect", "{fx}/square"], ["square", "no dataset.json"]),
    Case("adopt-no-tars", ["data", "adopt", "{fx}/square"], ["square", "no dataset.json"]),
    Case("adopt-missing-shards", ["data", "adopt", "{fx}/square/shard-{{000000..000003}}.tar"],
         ["shard-000000.tar", "do not exist"]),
    Case("inspect-s3-endpoint-dead", ["data", "inspect", "s3://bucket/set"], ["s3://bucket/set", DEAD],
         env={"AWS_ENDPOINT_URL": DEAD}),
    Case("inspect-preview-escaping-member", ["data", "inspect", "{fx}/evil", "--preview", "{work}/grid.png"],
         ["shard-000000.tar", "../", "escape"]),
    Case("inspect-preview-malformed-pax-header", ["data", "inspect", "{fx}/paxzero", "--preview", "{work}/grid.png"],
         ["shard-000000.tar", "PaxHeader", "pax record", "data verify"]),
    Case("inspect-samples-zero", ["data", "inspect", "{fx}/shards", "--samples", "0"], ["--samples"]),
    Case("verify-missing", ["data", "verify", "{work}/nope"], ["nope"]),
    Case("verify-escaping-member", ["data", "verify", "{fx}/evil"], ["shard-000000.tar", "../", "escape"]),
    Case("verify-manifest-outside-set", ["data", "verify", "{fx}/outside"], ["manifest.parquet", "../shards/", "outside the set"]),
    # models
    Case("models-show-unknown-name", ["models", "show", "nope", "--tracking-uri", "{store}"], ["'nope'", "gen"]),
    Case("models-show-no-store", ["models", "show", "gen"], ["--tracking-uri", "no MLflow store"]),
    Case("models-show-server-dead", ["models", "show", "gen", "--tracking-uri", DEAD], ["--tracking-uri", DEAD]),
    Case("models-list-server-dead", ["models", "list", "--tracking-uri", DEAD], [DEAD]),
    Case("models-list-no-store-env", ["models", "list"], ["no MLflow store", "nowhere.db"],
         env={"MLFLOW_TRACKING_URI": "sqlite:///{work}/nowhere.db"}),
    Case("models-promote-unknown-name", ["models", "promote", "nope", "--tracking-uri", "{store}"], ["'nope'", "gen"]),
    Case("models-promote-unknown-version", ["models", "promote", "gen", "--version", "9", "--tracking-uri", "{store}"],
         ["version 9", "versions: 1"]),
    Case("models-promote-unknown-alias", ["models", "promote", "gen", "--version", "@best", "--tracking-uri",
                                          "{store}"], ["alias 'best'", "champion"]),
    Case("models-promote-unknown-metric", ["models", "promote", "gen", "--metric", "psnr", "--tracking-uri",
                                           "{store}"], ["'psnr'", "fid"]),
    Case("models-promote-bad-mode", ["models", "promote", "gen", "--mode", "lowest", "--tracking-uri", "{store}"],
         ["--mode", "lowest"]),
    Case("models-promote-server-dead", ["models", "promote", "gen", "--tracking-uri", DEAD], [DEAD]),
    Case("models-promote-negative-margin", ["models", "promote", "gen", "--min-improvement", "-0.1", "--tracking-uri",
                                            "{store}"], ["--min-improvement", "-0.1"]),
    Case("models-rollback-unknown-name", ["models", "rollback", "nope", "--tracking-uri", "{store}"], ["'nope'", "gen"]),
    Case("models-rollback-no-previous", ["models", "rollback", "gen", "--tracking-uri", "{store}"],
         ["'gen'", "no previous champion", "champion v1"]),
    Case("models-rollback-server-dead", ["models", "rollback", "gen", "--tracking-uri", DEAD], [DEAD]),
    # models generate, models show NAME@ALIAS
    Case("models-generate-unknown-name", ["models", "generate", "models:/nope@champion", "--n", "4", "--out",
                                          "{work}/out", "--tracking-uri", "{store}"], ["models:/nope@champion", "gen"]),
    Case("models-generate-unknown-version", ["models", "generate", "models:/gen/9", "--n", "4", "--out", "{work}/out",
                                             "--tracking-uri", "{store}"], ["version 9", "versions: 1"]),
    Case("models-generate-unknown-alias", ["models", "generate", "models:/gen@best", "--n", "4", "--out",
                                           "{work}/out", "--tracking-uri", "{store}"], ["alias 'best'", "champion"]),
    Case("models-generate-no-generator", ["models", "generate", "models:/gen@champion", "--n", "4", "--out",
                                          "{work}/out", "--tracking-uri", "{store}"], ["models:/gen@champion"]),
    Case("models-generate-unknown-run", ["models", "generate", f"runs:/{NO_RUN}", "--n", "4", "--out", "{work}/out",
                                         "--tracking-uri", "{store}"], [NO_RUN]),
    Case("models-generate-snapshot-missing", ["models", "generate", "{work}/g.pt", "--n", "4", "--out", "{work}/out"],
         ["g.pt"]),
    Case("models-generate-out-holds-a-set", ["models", "generate", "models:/gen@champion", "--n", "4", "--out",
                                             "{fx}/shards", "--tracking-uri", "{store}"],
         ["shards", "already holds a shard set", "--overwrite"]),
    Case("models-generate-n-zero", ["models", "generate", "{work}/g.pt", "--n", "0", "--out", "{work}/out"], ["--n"]),
    Case("models-generate-workers-zero", ["models", "generate", "{work}/g.pt", "--n", "4", "--workers", "0",
                                          "--out", "{work}/out"], ["--workers"]),
    Case("models-generate-no-out", ["models", "generate", "{work}/g.pt", "--n", "4"], ["--out"]),
    Case("models-generate-no-store", ["models", "generate", "models:/gen@champion", "--n", "4", "--out", "{work}/out"],
         ["--tracking-uri", "no MLflow store"]),
    Case("models-generate-server-dead", ["models", "generate", "models:/gen@champion", "--n", "4", "--out",
                                         "{work}/out", "--tracking-uri", DEAD], [DEAD]),
    Case("models-show-unknown-alias", ["models", "show", "gen@best", "--tracking-uri", "{store}"],
         ["'best'", "champion=v1"]),
    Case("models-show-unknown-version", ["models", "show", "gen/9", "--tracking-uri", "{store}"],
         ["version 9", "versions: 1"]),
    Case("models-show-version-unknown-name", ["models", "show", "nope@champion", "--tracking-uri", "{store}"],
         ["'nope'", "gen"]),
    # eval
    Case("eval-unknown-version", ["eval", "models:/gen/9", "--tracking-uri", "{store}"], ["'gen'", "version 9", "versions: 1"]),
    Case("eval-unknown-alias", ["eval", "models:/gen@best", "--tracking-uri", "{store}"], ["'best'", "champion=v1"]),
    Case("eval-missing-snapshot", ["eval", "{work}/nothing/generator.pt", "--tracking-uri", "{store}"],
         ["nothing/generator.pt"]),
    Case("eval-no-store", ["eval", "models:/gen@champion", "--tracking-uri", "sqlite:///{work}/none.db"],
         ["no MLflow store", "none.db"]),
    # jobs
    Case("jobs-submit-address-dead", ["jobs", "submit", QS, "--address", DEAD], ["Ray Jobs API", DEAD]),
    Case("jobs-submit-bad-spec", ["jobs", "submit", QS, "--set", "train.steps=0", "--address", DEAD], ["train.steps"]),
    Case("jobs-submit-spec-missing", ["jobs", "submit", "{work}/missing.yaml", "--address", DEAD], ["missing.yaml"]),
    Case("jobs-status-address-dead", ["jobs", "status", "raysubmit_1", "--address", DEAD], [DEAD]),
    Case("jobs-logs-address-dead", ["jobs", "logs", "raysubmit_1", "--address", DEAD], [DEAD]),
    Case("jobs-stop-address-dead", ["jobs", "stop", "raysubmit_1", "--address", DEAD], [DEAD]),
    Case("unknown-command", ["jobs", "kill", "raysubmit_1"], ["kill"]),
    # search
    Case("search-show-unknown-run", ["search", "show", NO_RUN, "--tracking-uri", "{store}"], [NO_RUN]),
    Case("search-show-not-a-search", ["search", "show", "{gen_run}", "--tracking-uri", "{store}"],
         ["{gen_run}", "not a MineAug search"]),
    Case("search-show-no-store", ["search", "show", NO_RUN, "--workdir", "{work}/w"], ["no MLflow store"]),
    Case("search-show-server-dead", ["search", "show", NO_RUN, "--tracking-uri", DEAD], [DEAD]),
    Case("search-mineaug-bad-k", ["search", "mineaug", QS, "--set", "workdir={work}/w", "--set", "search.k=0"],
         ["search.k"]),
    Case("search-mineaug-bad-select", ["search", "mineaug", QS, "--set", "workdir={work}/w", "--set",
                                       "search.select=best"], ["search.select", "sets"]),
    Case("search-mineaug-data-missing", ["search", "mineaug", QS, "--set", "workdir={work}/w", "--set",
                                         "data.train={work}/nowhere"], ["data.train", "nowhere"]),
    # the world outside the spec: schemes, state files, hostile files, refusing disks (issue 25)
    Case("train-data-scheme-not-installed", train("data.train=gs://bucket/x"), ["gs://bucket/x", "gs://", "gcsfs"],
         code=1),
    Case("data-inspect-scheme-not-installed", ["data", "inspect", "gs://bucket/set"], ["gs://", "pip install gcsfs"],
         code=1),
    Case("data-build-unknown-scheme", ["data", "build", "{fx}/square", "nope://x/y", "--resolution", "8"],
         ["nope://x/y", "unknown URL scheme"]),
    Case("train-resume-run-info-cut-short", train("checkpoint.storage={fx}/runs", extra=("--resume", "cut-1234")),
         ["'cut-1234'", "orbitgen-run.json", "damaged", "without --resume"]),
    Case("train-resume-run-info-without-run-id", train("checkpoint.storage={fx}/runs", extra=("--resume", "noid-1234")),
         ["'noid-1234'", "mlflow_run_id"]),
    Case("train-deepspeed-universal-checkpoint", train("strategy.kind=deepspeed",
                                                       "strategy.deepspeed={{checkpoint: {{load_universal: true}}}}"),
         ["strategy.deepspeed.checkpoint.load_universal", "unpickles"]),
    Case("models-generate-snapshot-names-a-module", ["models", "generate", "{fx}/names-a-module.pt", "--n", "4", "--out",
                                                     "{work}/out"], ["names-a-module.pt", "'antigravity:Fly'", "refused"]),
    Case("eval-snapshot-names-a-module", ["eval", "{fx}/names-a-module.pt"], ["names-a-module.pt", "'antigravity:Fly'"]),
    Case("data-build-dest-not-writable", ["data", "build", "{fx}/square", "/sys/orbitgen-corpus-out", "--resolution",
                                          "8"], ["/sys/orbitgen-corpus-out", "choose"], code=1),
    Case("search-mineaug-channels-differ", ["search", "mineaug", QS, "--set", "workdir={work}/w", "--set", SHARDS,
                                            "--set", "data.resolution=16", "--set", "data.channels=3"],
         ["data.channels=3"]),
]


def _png(shape, seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(side: int) -> bytes:
    """A valid 1-band PNG of side x side zeros: a few hundred KB that decode to side² bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z, row = zlib.compressobj(9), bytes(side + 1)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _hostile_sources(fx: Path) -> None:
    """Source files the world makes: a PNG bomb, TIFFs without bands or with tie points only,
    dataset.json shapes dataset_tool never writes, camera names that clash once cleaned."""
    import tifffile

    for folder, files in (("bomb", {"a.png": _png((10, 10, 3)), "big.png": _bomb_png(13000)}),
                          ("textpng", {"notes.png": b"meeting notes, not a picture"}),
                          ("camera", {"_DSC0001.png": _png((10, 10, 3)), "DSC0001.png": _png((10, 10, 3), 1)})):
        (fx / folder).mkdir()
        for name, data in files.items():
            (fx / folder / name).write_bytes(data)
    geokeys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633)
    gcps = (0, 0, 0, 10.0, 50.0, 0, 16, 0, 0, 11.0, 50.0, 0, 0, 16, 0, 10.0, 49.0, 0)
    tifffile.imwrite(fx / "empty.tif", np.zeros((8, 8, 0), np.uint8))
    (fx / "emptytif").mkdir()
    shutil.copy(fx / "empty.tif", fx / "emptytif" / "empty.tif")
    tifffile.imwrite(fx / "stack.tif", np.zeros((2, 8, 8, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(fx / "gcps.tif", np.ones((8, 8), np.uint8), extratags=[
        (33922, "d", len(gcps), gcps, True), (34735, "H", len(geokeys), geokeys, True)])
    tifffile.imwrite(fx / "scene.tif", np.ones((8, 8), np.uint8))
    names = ["00000/img00000000.png", "00000/img00000001.png"]
    for name, doc in (("barelist", json.dumps({"labels": [0, 1]})), ("jsonlist", json.dumps([[names[0], 0]])),
                      ("brokenjson", '{"labels": [['), ("vector", json.dumps({"labels": [[n, [0.5]] for n in names]})),
                      ("inflates", None)):
        with zipfile.ZipFile(fx / f"{name}.zip", "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(names[0], _png((8, 8, 3)))
            z.writestr(names[1], bytes(4 << 20) if name == "inflates" else _png((8, 8, 3), 1))
            if doc is not None:
                z.writestr("dataset.json", doc)


def _escaping_copy(good: Path, evil: Path) -> None:
    """The shard set `good` again, its shard's members renamed `../NAME`, manifest matching."""
    shutil.copytree(good, evil)
    shard = evil / "shard-000000.tar"
    out = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            m.name = "../" + m.name
            dst.addfile(m, io.BytesIO(data))
    shard.write_bytes(out.getvalue())
    for extra in sorted(evil.glob("shard-*.tar"))[1:]:
        extra.unlink()
    samples = int(read_manifest(str(good)).samples.iloc[0])
    write_manifest(str(evil), [{"url": shard.name, "samples": samples, "bytes": len(out.getvalue()),
                                "sha256": hashlib.sha256(out.getvalue()).hexdigest()}])


def _zero_length_pax_copy(good: Path, broken: Path) -> None:
    """The set `good` again, its first shard rewritten with pax headers whose first record says
    it is 0 bytes long (the hand-written tar reader used to loop on it), manifest matching."""
    shutil.copytree(good, broken)
    shard = broken / "shard-000000.tar"
    out = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            m.pax_headers = {"comment": "camera"}
            dst.addfile(m, io.BytesIO(data))
    data = bytearray(out.getvalue())
    data[512:514] = b"00"   # "NN comment=camera\n" -> "00 comment=..."
    shard.write_bytes(bytes(data))
    rows = [{**r, "url": r["url"].rsplit("/", 1)[1]} for r in read_manifest(str(broken)).to_dict("records")]
    first = {**rows[0], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_manifest(str(broken), [first, *rows[1:]])


def _store(fx: Path) -> tuple[str, str]:
    """A registry with model `gen` v1 (fid 2.0, alias champion); (its URI, the run id)."""
    uri = f"sqlite:///{fx / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("corpus", artifact_location=(fx / "artifacts").as_uri())
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "fid", 2.0)
    client.set_terminated(run.info.run_id)
    client.create_registered_model("gen")
    client.create_model_version("gen", f"runs:/{run.info.run_id}/generator", run.info.run_id)
    client.set_registered_model_alias("gen", "champion", "1")
    return uri, run.info.run_id


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    fx = tmp_path_factory.mktemp("fixtures")
    shards = ensure_builtin("builtin:craters?count=8&seed=0", str(fx / "built"), 16, 1, shard_samples=4)
    Path(shards.removeprefix("file://")).rename(fx / "shards")
    shutil.rmtree(fx / "built")
    _escaping_copy(fx / "shards", fx / "evil")
    _zero_length_pax_copy(fx / "shards", fx / "paxzero")
    shutil.copytree(fx / "shards", fx / "outside")   # its manifest names a shard of another set
    rows = read_manifest(str(fx / "shards")).to_dict("records")
    write_manifest(str(fx / "outside"), [{**r, "url": "../shards/" + r["url"].rsplit("/", 1)[1]} for r in rows])
    (fx / "square").mkdir()
    for i in range(3):
        (fx / "square" / f"{i}.png").write_bytes(_png((10, 10, 3), i))
    for name, member in (("dotdot.zip", "../evil.png"), ("abs.zip", "/abs.png")):
        with zipfile.ZipFile(fx / name, "w") as z:
            z.writestr("00000/img00000000.png", _png((8, 8, 3)))
            z.writestr(zipfile.ZipInfo(member), _png((8, 8, 3)))
        assert member in zipfile.ZipFile(fx / name).namelist()   # the archive really holds the name
    (fx / "bad.yaml").write_text(BAD_YAML)
    (fx / "list.yaml").write_text("- name\n- family\n")
    (fx / "series.csv").write_text("past,mask,future\na.png,b.png,c.png\n")
    (fx / "runs" / "cut-1234").mkdir(parents=True)   # a run info cut short by a crash
    (fx / "runs" / "cut-1234" / "orbitgen-run.json").write_text('{"mlflow_run_id": "ab')
    (fx / "runs" / "noid-1234").mkdir()
    (fx / "runs" / "noid-1234" / "orbitgen-run.json").write_text('{"experiment": "x"}')
    # A snapshot naming a module that importing would run (it opens a web browser).
    torch.save({"format": "orbitgen-snapshot-v1", "family": "antigravity:Fly", "config": {}, "resolution": 8,
                "channels": 1, "lr": 1e-3, "state_dict": {}, "extra": {}}, fx / "names-a-module.pt")
    _hostile_sources(fx)
    uri, run_id = _store(fx)
    mlflow.set_tracking_uri(None)
    return {"fx": str(fx), "store": uri, "gen_run": run_id}


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `root`: (size, mtime) by relative path."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def error_lines(stderr: str) -> list[str]:
    """The error part of stderr: from the `error:` line on (progress lines before it are not errors)."""
    lines = stderr.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    return lines[starts[0]:] if starts else lines


def test_the_corpus_covers_every_command():
    commands = {" ".join(a for a in c.argv[:2] if not a.startswith(("{", "/"))) for c in CASES}
    wanted = {"train", "quickstart", "data build", "data inspect", "data verify", "data adopt", "models show", "models list",
              "models promote", "models rollback", "models generate", "eval", "jobs submit", "jobs status", "jobs logs", "jobs stop", "search show", "search mineaug"}
    assert wanted <= {c if c.split()[0] in ("data", "models", "jobs", "search") else c.split()[0] for c in commands}
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_says_what_in_two_lines_exits_2_and_writes_nothing(case, fixtures, tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    values = {**fixtures, "work": str(work)}
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    for var, value in case.env.items():
        monkeypatch.setenv(var, value.format(**values))
    monkeypatch.chdir(work)
    before = tree(work), tree(Path(fixtures["fx"]))

    res = CliRunner().invoke(main, [a.format(**values) for a in case.argv])

    lines = error_lines(res.stderr)
    assert res.exit_code == case.code, (res.exit_code, res.output, res.exc_info)
    assert "Traceback" not in res.output and lines[0].startswith("error: "), res.stderr
    assert len(lines) <= 2, res.stderr
    for name in case.names:
        assert name.format(**values) in "\n".join(lines), (name, res.stderr)
    for shown in case.absent:
        assert shown not in res.stderr, (shown, res.stderr)
    assert (tree(work), tree(Path(fixtures["fx"]))) == before


def test_an_internal_error_is_one_line_exit_70_with_its_traceback_in_a_log(tmp_path):
    """A bug is not bad input: one `internal error:` line naming the log that holds its traceback, exit 70."""
    code = ("import sys, jobs.tracking.registry as r\n"
            "def broken(*a, **k): raise RuntimeError('internal bug')\n"
            "r.list_models = broken\n"
            "from jobs.cli import main\n"
            "sys.argv = ['orbitgen', 'models', 'list', '--tracking-uri', sys.argv[1]]\n"
            "main()\n")
    (tmp_path / "mlflow.db").write_bytes(b"")   # a store that exists, so the bug is reached
    proc = subprocess.run([sys.executable, "-c", code, f"sqlite:///{tmp_path / 'mlflow.db'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "ORBITGEN_LOG_DIR": str(tmp_path / "logs")})
    assert proc.returncode == 70, proc.stderr
    assert "Traceback" not in proc.stderr
    [log] = (tmp_path / "logs").iterdir()
    assert f"internal error: RuntimeError: internal bug; the traceback is in {log}; please report it" in proc.stderr
    assert "Traceback" in log.read_text() and "RuntimeError: internal bug" in log.read_text()
