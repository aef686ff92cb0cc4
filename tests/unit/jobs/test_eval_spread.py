"""Training-time evaluation spread over the ranks (jobs/eval/spread.py) equals rank 0 evaluating
alone: each rank's share (the plan of jobs/eval/distributed.py) scored into its own suite, the
states merged in rank order on rank 0, give the one-pass values of `jobs.eval.core.evaluate`
(unconditional: fid, kid, precision/recall over generated seed batches; conditional: paired
metrics over the inputs). The ranks are simulated in one process with an explicit gather; the
last test runs the same over two gloo processes.
"""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from data_shards.builtin import ensure_builtin
from jobs.eval.core import EvalSettings, evaluate
from jobs.eval.spread import evaluate_spread, gather_to_rank0, merged_scores, score_share
from models.registry import make_family
from tiny_specs import perturb_

CPU = torch.device("cpu")
# 40 samples in batches of 8: 5 batches, cut 2 + 3 between two ranks, 2 + 1 + 2 between three (the plan rounds).
SETTINGS = EvalSettings(num_samples=40, metrics=("fid", "kid", "pr"), batch=8)
PAIRED = EvalSettings(num_samples=20, metrics=("l1", "ssim", "psnr", "perceptual_randconv", "fid"), batch=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("spread")
    return {"craters": ensure_builtin("builtin:craters?count=48&seed=0", str(root), 16, 1),
            "maps": ensure_builtin("builtin:maps?count=24&seed=0", str(root), 16, 3)}


def dcgan():
    fam = make_family("dcgan", {"nz": 8, "ngf": 8, "ndf": 8}, resolution=16, channels=1, lr=2e-4)
    torch.manual_seed(0)   # the same network in every process
    return fam, perturb_(fam.build()[fam.sampler_role], seed=2).eval()


def pix2pix():
    fam = make_family("pix2pix", {"ngf": 8, "ndf": 8, "d_layers": 2}, resolution=16, channels=3, lr=2e-4)
    return fam, perturb_(fam.build()[fam.sampler_role], seed=3).eval()


def assert_same(got: dict[str, float], expected: dict[str, float]) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


@pytest.mark.parametrize("world", [2, 3])
def test_the_ranks_shares_merged_equal_the_one_pass_score(data, world):
    fam, sampler = dcgan()
    expected, params = evaluate(fam, sampler, SETTINGS, data_url=data["craters"], device=CPU)
    states = [score_share(fam, sampler, SETTINGS, data_url=data["craters"], device=CPU, rank=r, world=world)
              for r in range(world)]
    assert [s["counts"]["fake"] for s in states] == ([16, 24] if world == 2 else [16, 8, 16])
    got, merged_params = merged_scores(fam, SETTINGS, states, CPU)
    assert_same(got, expected)
    assert merged_params == params | {"eval_ranks": str(world)}
    # Every rank's share counts: without the last one, another value.
    partial, _ = merged_scores(fam, SETTINGS, states[:-1], CPU)
    assert partial["fid"] != pytest.approx(expected["fid"], rel=1e-6)


def test_a_conditional_family_spreads_its_inputs(data):
    fam, sampler = pix2pix()
    expected, _ = evaluate(fam, sampler, PAIRED, data_url=data["maps"], device=CPU)
    got = {}

    def gather_on(rank):   # rank 1 has already scored; rank 0 gathers both states
        return lambda state: [state, got["rank1"]] if rank == 0 else got.__setitem__("rank1", state)

    assert evaluate_spread(fam, sampler, PAIRED, data_url=data["maps"], device=CPU, rank=1, world=2,
                           gather=gather_on(1)) is None
    scores, params = evaluate_spread(fam, sampler, PAIRED, data_url=data["maps"], device=CPU, rank=0, world=2,
                                     gather=gather_on(0))
    assert_same(scores, expected)
    assert params["eval_real_images"] == "20" and params["eval_ranks"] == "2"


def _rank(rank: int, world: int, port: int, url: str, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fam, sampler = dcgan()
        out = evaluate_spread(fam, sampler, SETTINGS, data_url=url, device=CPU, rank=rank, world=world,
                              gather=gather_to_rank0(world, rank))
        results.put((rank, out))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_log_the_single_rank_score(data):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fam, sampler = dcgan()
    expected, _ = evaluate(fam, sampler, SETTINGS, data_url=data["craters"], device=CPU)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, data["craters"], results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got[1] is None
    assert_same(got[0][0], expected)
