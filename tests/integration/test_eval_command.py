"""`orbitgen eval` on real parts: a tiny training registers a version with its protocol and
scores; `eval` on 2 Ray workers logs an evaluation run, tags the version, and equals the
single-process evaluation of the same seeds (unconditional, and a conditional family on the
held-out split through `evaluate_model(like=...)`)."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from data_shards.builtin import ensure_builtin
from data_shards.card import read_card
from data_shards.synthetic import crater_field
from data_shards.writer import write_shards
from jobs.cli import main
from jobs.eval.core import EvalSettings, evaluate, feature_extractors, protocol_of
from jobs.eval.model import EVAL_EXPERIMENT, evaluate_model
from jobs.train.driver import run_job
from jobs.spec import SPECS_DIR, load_spec
from jobs.tracking.model_refs import resolve_ref
from jobs.tracking.protocol import (TAG_EVAL_OF, TAG_MODEL_NAME, TAG_MODEL_VERSION, TAG_RUN_PROTOCOL, EvalProtocol,
                                    read_version_tags, weights_hash)
from models.metrics.extractors import RandConvExtractor
from models.registry import make_family
from models.snapshot import load_snapshot, save_snapshot
from tiny_specs import perturb_, tiny_model

pytestmark = pytest.mark.integration
RES = 16
MODEL = "eval-test"
CPU = torch.device("cpu")


def assert_equal_scores(got: dict[str, float], expected: dict[str, float]) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-12), name


def test_eval_of_a_registered_version_on_two_workers(mlflow_server, ray_local, tmp_path):
    url = str(tmp_path / "craters")   # 96 reals: two batches of the evaluation, one per worker
    write_shards(crater_field(96, RES, channels=1, seed=3), url, layout="synthetic:craters", resolution=RES,
                 channels=1, source="test", shard_samples=24, progress=False)
    spec = load_spec(SPECS_DIR / "quickstart.yaml", [
        f"workdir={tmp_path}", f"data.train={url}", f"data.resolution={RES}", "data.shuffle_buffer=8",
        f"tracking.uri={mlflow_server.url}", f"tracking.registry_model={MODEL}", "scaling.num_workers=1",
        "train.steps=2", "train.batch=8", "checkpoint.every_steps=2", "eval.num_samples=16",
        "model.nz=8", "model.ngf=8", "model.ndf=8"])
    trained = run_job(spec, say=print)
    client = MlflowClient(mlflow_server.url)

    # Training recorded its protocol on the run, and its scores under it on the new version.
    run = client.get_run(trained.run_id)
    protocol = EvalProtocol.from_json(run.data.tags[TAG_RUN_PROTOCOL])
    assert protocol == EvalProtocol(data_fingerprint=read_card(url).fingerprint, split="all", real_seed=0,
                                    seed_base=1_000_000, num_samples=16,
                                    extractors={RandConvExtractor.name: weights_hash(RandConvExtractor())})
    assert read_version_tags(client.get_model_version(MODEL, trained.model_version).tags) == {
        protocol.key(): (protocol, {"fid": run.data.metrics["fid"]}, trained.run_id)}

    # 160 samples: three generated batches of 64, split over the two workers.
    out = CliRunner().invoke(main, ["eval", f"models:/{MODEL}@champion", "--num-samples", "160", "--workers", "2",
                                    "--tracking-uri", mlflow_server.url])
    assert out.exit_code == 0, out.output
    assert "fid" in out.output and "protocol" in out.output

    evals = client.search_runs([run.info.experiment_id], f"tags.`{TAG_EVAL_OF}` = 'models:/{MODEL}@champion'")
    assert len(evals) == 1
    ev = evals[0]
    assert ev.data.tags[TAG_MODEL_NAME] == MODEL and ev.data.tags[TAG_MODEL_VERSION] == trained.model_version
    assert ev.data.params["eval_workers"] == "2" and ev.data.params["eval_fake_images"] == "160"
    ev_protocol = EvalProtocol.from_json(ev.data.tags[TAG_RUN_PROTOCOL])
    assert ev_protocol.differences(protocol) == ["num_samples: 160 vs 16"]

    # The same as one process evaluating the same seeds against the same reals.
    family, sampler, _ = load_snapshot(resolve_ref(f"models:/{MODEL}/1", tmp_path / "model", mlflow_server.url))
    expected, _ = evaluate(family, sampler, EvalSettings(num_samples=160), data_url=url, device=CPU)
    assert_equal_scores(ev.data.metrics, expected)

    # The version now holds the values of both protocols, each with the run that measured it.
    tags = read_version_tags(client.get_model_version(MODEL, trained.model_version).tags)
    assert tags[ev_protocol.key()] == (ev_protocol, ev.data.metrics, ev.info.run_id)
    assert set(tags) == {protocol.key(), ev_protocol.key()}

    bad = CliRunner().invoke(main, ["eval", f"models:/{MODEL}/7", "--tracking-uri", mlflow_server.url])
    assert bad.exit_code == 2 and bad.output.strip().splitlines()[-1] == \
        f"error: '{MODEL}' has no version 7; versions: 1; aliases: champion=v1"


def test_eval_of_a_conditional_checkpoint_on_the_held_out_split(mlflow_server, ray_local, tmp_path):
    data = ensure_builtin("builtin:timeseries?count=160&seed=0", str(tmp_path / "shards"), RES, 3)
    family = make_family("cgan_unet", tiny_model("cgan_unet"), resolution=RES, channels=3, lr=2e-4)
    torch.manual_seed(0)
    sampler = perturb_(family.build()[family.sampler_role])
    snapshot = tmp_path / "generator.pt"
    save_snapshot(snapshot, family, sampler)

    # Under a protocol with a held-out split (half the set: two batches of inputs, one per worker).
    used = feature_extractors(family.metrics, extractor="randconv", inception_weights=None)
    like = protocol_of(used, family, data_url=data, num_samples=100, holdout=0.5)
    result = evaluate_model(str(snapshot), tracking_uri=mlflow_server.url, data_url=data, workers=2, like=like)
    assert result.protocol == like and result.model_version is None

    expected, params = evaluate(family, sampler.eval(), EvalSettings(num_samples=100, holdout=0.5), data_url=data,
                                device=CPU)
    assert 64 < int(params["eval_real_images"]) < 100
    assert_equal_scores(result.scores, expected)
    assert set(expected) == {"perceptual_randconv", "ssim", "psnr", "fid", "f1"}

    client = MlflowClient(mlflow_server.url)
    ev = client.get_run(result.run_id)
    assert ev.info.experiment_id == client.get_experiment_by_name(EVAL_EXPERIMENT).experiment_id
    assert ev.data.tags[TAG_EVAL_OF] == str(snapshot) and TAG_MODEL_NAME not in ev.data.tags
    assert ev.data.params["eval_split"] == "holdout=0.5"

    # Through the command: --metrics perceptual_randconv is the family's perceptual metric without LPIPS
    # weights (a snapshot with no spec has none), on a CPU worker (--gpus-per-worker 0).
    out = CliRunner().invoke(main, ["eval", str(snapshot), "--data", data, "--metrics", "perceptual_randconv,ssim",
                                    "--num-samples", "16", "--gpus-per-worker", "0", "--tracking-uri", mlflow_server.url])
    assert out.exit_code == 0, out.output
    assert "perceptual_randconv" in out.output and "lpips" not in out.output.replace("perceptual_randconv", "")
