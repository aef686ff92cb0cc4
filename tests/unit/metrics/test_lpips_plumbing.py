"""`eval.lpips_weights` reaches everything that names, computes or records the perceptual metric:
`EvalSettings` (from the spec, its names, suite and protocol), the spec's reported names (promotion
and best checkpoint), the driver's registered scores, `orbitgen eval`'s --metrics, and workers on
other nodes (the file's bytes shipped and placed). With a weights file the metric is `lpips`,
without one `perceptual_randconv`.

The weights file is made here: random AlexNet layers and lin weights in the reference module's
state-dict layout (models/metrics/lpips.py), written out independently of the module.
"""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from data_shards.builtin import ensure_builtin
from data_shards.errors import UserError
from jobs.eval import weights
from jobs.eval.core import EvalSettings, evaluate, real_samples
from jobs.eval.model import _like, _settings
from jobs.spec import SPECS_DIR, SpecError, load_spec
from models.images import to_float, to_uint8
from models.metrics.lpips import LPIPS
from models.metrics.suite import all_reported_names
from models.registry import make_family
from tiny_specs import perturb_

CPU = torch.device("cpu")
# AlexNet's convolutions as (index in `features`, in, out, kernel); LPIPS cuts `features` into five
# slices at layers 2, 5, 8 and 10, so conv i is in slice 1 + (number of cuts at or below i).
ALEX_CONVS = ((0, 3, 64, 11), (3, 64, 192, 5), (6, 192, 384, 3), (8, 384, 256, 3), (10, 256, 256, 3))
CUTS = (2, 5, 8, 10)


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    state = {}
    for index, c_in, c_out, k in ALEX_CONVS:
        part = 1 + sum(index >= cut for cut in CUTS)
        state[f"net.slice{part}.{index}.weight"] = 0.05 * torch.randn(c_out, c_in, k, k, generator=g)
        state[f"net.slice{part}.{index}.bias"] = 0.01 * torch.randn(c_out, generator=g)
    for i, (_, _, c_out, _) in enumerate(ALEX_CONVS):
        state[f"lin{i}.model.1.weight"] = torch.rand(1, c_out, 1, 1, generator=g)   # learned weights are >= 0
    path = tmp_path_factory.mktemp("lpips") / "lpips_alex.pth"
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def maps(tmp_path_factory):   # 32²: AlexNet's pooling leaves nothing of a 16² image
    return ensure_builtin("builtin:maps?count=8&seed=0", str(tmp_path_factory.mktemp("maps")), 32, 3)


def pix2pix():
    fam = make_family("pix2pix", {"ngf": 8, "ndf": 8, "d_layers": 2}, resolution=32, channels=3, lr=2e-4)
    torch.manual_seed(0)
    return fam, perturb_(fam.build()[fam.sampler_role], seed=3).eval()


def cgan_spec(*overrides):
    return load_spec(SPECS_DIR / "spatiotemporal_cgan.yaml", ["eval.metrics=[lpips,ssim,fid]", *overrides])


def test_evaluation_settings_report_lpips_with_weights_and_perceptual_randconv_without(lpips_file, maps):
    fam, sampler = pix2pix()
    plain = EvalSettings(num_samples=8, metrics=("lpips", "ssim"), batch=4)
    weighted = replace(plain, lpips_weights=lpips_file)
    assert plain.names(fam) == ("perceptual_randconv", "ssim") and weighted.names(fam) == ("lpips", "ssim")

    scores, params = evaluate(fam, sampler, weighted, data_url=maps, device=CPU)
    assert set(scores) == {"lpips", "ssim"} and params["lpips_network"] == LPIPS(lpips_file).name
    # The value is LPIPS's own: the module on the same (output, target) pairs, averaged.
    net, distances = LPIPS(lpips_file), []
    for b in real_samples(fam, maps, 8, 4):
        fake = to_uint8(fam.sample(sampler, len(b["image"]), cond=to_float(b["cond"])))
        distances.append(net(to_float(fake), to_float(b["image"])))
    assert scores["lpips"] == pytest.approx(float(torch.cat(distances).mean()), rel=1e-5)
    plain_scores, plain_params = evaluate(fam, sampler, plain, data_url=maps, device=CPU)
    assert set(plain_scores) == {"perceptual_randconv", "ssim"} and "perceptual_randconv_note" in plain_params
    assert scores["ssim"] == pytest.approx(plain_scores["ssim"], rel=1e-6)

    # The weights are part of what the values were measured under.
    with_weights, without = weighted.protocol(fam, maps), plain.protocol(fam, maps)
    assert LPIPS(lpips_file).name in with_weights.extractors
    assert not any(e.startswith("lpips") for e in without.extractors) and with_weights.key() != without.key()


def test_the_spec_names_promotion_and_registered_scores_by_the_weights(lpips_file):
    from jobs.train.driver import _registered_scores

    weighted, plain = cgan_spec(f"eval.lpips_weights={lpips_file}"), cgan_spec()
    fam = weighted.make_family()
    assert EvalSettings.from_spec(weighted, fam).lpips_weights == lpips_file
    assert weighted.reported_metrics(fam) == ("lpips", "ssim", "fid")
    assert plain.reported_metrics(fam) == ("perceptual_randconv", "ssim", "fid")
    # Promotion and best checkpoint by lpips: a metric that is logged only with the weights.
    cgan_spec(f"eval.lpips_weights={lpips_file}", "tracking.promote_metric=lpips", "checkpoint.best_metric=lpips")
    with pytest.raises(SpecError, match="promote_metric 'lpips' is not computed"):
        cgan_spec("tracking.promote_metric=lpips")

    checkpoint = SimpleNamespace(path="ckpt")
    result = SimpleNamespace(best_checkpoints=[(checkpoint, {"lpips": 0.25, "ssim": 0.5, "fid": 3.0, "loss": 1.0})],
                             metrics={})
    assert _registered_scores(weighted, result, checkpoint) == {"lpips": 0.25, "ssim": 0.5, "fid": 3.0}
    result.best_checkpoints = [(checkpoint, {"perceptual_randconv": 0.3, "ssim": 0.5, "fid": 3.0})]
    assert _registered_scores(plain, result, checkpoint) == {"perceptual_randconv": 0.3, "ssim": 0.5, "fid": 3.0}


def test_orbitgen_eval_metrics_map_to_the_family_names(lpips_file):
    weighted, plain = cgan_spec(f"eval.lpips_weights={lpips_file}"), cgan_spec()
    fam = plain.make_family()
    assert _settings(fam, plain, ["perceptual_randconv", "ssim"], None, None).names(fam) == ("perceptual_randconv", "ssim")
    assert _settings(fam, plain, ["lpips"], None, None).names(fam) == ("perceptual_randconv",)
    assert _settings(fam, weighted, ["lpips"], None, None).names(fam) == ("lpips",)
    assert _settings(fam, None, ["perceptual_randconv"], None, None).names(fam) == ("perceptual_randconv",)
    with pytest.raises(UserError, match="ask for lpips"):
        _settings(fam, weighted, ["perceptual_randconv"], None, None)
    with pytest.raises(UserError, match="judged by perceptual_randconv, ssim"):
        _settings(fam, plain, ["kid"], None, None)


def test_another_evaluations_protocol_keeps_lpips_only_when_it_had_it(lpips_file, maps):
    fam, _ = pix2pix()
    weighted = EvalSettings(num_samples=8, metrics=("lpips",), batch=4, lpips_weights=lpips_file)
    assert _like(weighted, weighted.protocol(fam, maps)).lpips_weights == lpips_file
    assert _like(weighted, replace(weighted, lpips_weights=None).protocol(fam, maps)).lpips_weights is None


def test_workers_on_other_nodes_get_the_weights_files_bytes(lpips_file, maps, tmp_path, monkeypatch):
    import ray

    store: list[bytes] = []   # Ray's object store, without Ray

    def put(data: bytes) -> int:
        store.append(data)
        return len(store) - 1

    monkeypatch.setattr(ray, "put", put)
    monkeypatch.setattr(ray, "get", lambda ref: store[ref])
    fam, _ = pix2pix()
    driver = EvalSettings(num_samples=8, metrics=("lpips",), batch=4, lpips_weights=lpips_file)
    shipped = weights.ship(weights.weight_paths(driver))
    assert set(shipped) == {"eval.lpips_weights"}

    elsewhere = replace(driver, lpips_weights="/only/on/the/driver/lpips_alex.pth")   # this node lacks the path
    placed = weights.place(elsewhere, shipped, tmp_path / "node")
    assert placed.lpips_weights.startswith(str(tmp_path / "node"))
    assert open(placed.lpips_weights, "rb").read() == open(lpips_file, "rb").read()
    assert placed.protocol(fam, maps) == driver.protocol(fam, maps)   # the same weights, the same protocol
    assert weights.place(driver, shipped, tmp_path / "node") is driver   # a node that has the file keeps its path


def test_every_name_a_score_may_be_logged_under_counts_lpips_and_its_stand_in():
    names = all_reported_names()
    assert {"lpips", "perceptual_randconv", "precision", "recall", "fid"} <= set(names) and "pr" not in names
    assert len(names) == len(set(names))


def test_promotion_reads_an_eval_runs_lpips_and_perceptual_randconv_scores():
    from jobs.tracking.promotion import EVAL_METRICS

    assert {"lpips", "perceptual_randconv", "fid", "kid"} <= EVAL_METRICS
