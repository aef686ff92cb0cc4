"""`models generate` draws its seeds in batches without changing an image, and its workers ask for
GPUs and CPUs as the options say (the Ray runs are in tests/integration/test_generate.py).

- A family that draws every image of a batch from its own seed (`sample_seeds`) is called once a
  batch, and gives, within float tolerance, the images `sample(sampler, 1, seed)` draws one at a
  time; a family without it is drawn one image a call, as before.
- A worker (the actor's class, run without Ray) writes the same samples with `--batch 5` as with
  `--batch 1`.
- Each worker's CPU share and the refusal of a GPU ask on a cluster without GPUs, against values
  worked out by hand.
"""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from data_shards.card import read_manifest
from data_shards.errors import UserError
from jobs import generate as gen
from jobs.cli import main
from jobs.eval.resources import auto_gpu_share, cpu_share, refuse_gpu_ask
from jobs.runtime.cluster import Cluster
from models.families.dcgan import DCGAN
from models.family import Family
from models.registry import make_family
from tiny_specs import perturb_

SEEDS = [7, 8, 9, 1000, 3]


class PerSeedDCGAN(DCGAN):
    """DCGAN with the batched draw a family offers: each image's latent from its own seed, one
    network call for the batch (written here from the family's `sample`, independently of jobs/)."""

    calls = 0

    @torch.no_grad()
    def sample_seeds(self, sampler, seeds, *, cond=None, mask=None):
        type(self).calls += 1
        z = torch.cat([torch.randn(1, *self.latent_shape, generator=torch.Generator().manual_seed(int(s)))
                       for s in seeds])
        sampler.eval()
        return sampler(z).float()


def _family(cls=DCGAN):
    fam = make_family("dcgan", {"nz": 8, "ngf": 8, "ndf": 8}, resolution=16, channels=1, lr=2e-4)
    fam.__class__ = cls   # the same configuration, with (or without) the batched draw
    sampler = perturb_(fam.build()[fam.sampler_role], seed=1)
    return fam, sampler.eval()


def one_at_a_time(fam, sampler, seeds) -> torch.Tensor:
    return torch.cat([fam.sample(sampler, 1, seed=s) for s in seeds])


def test_a_per_seed_family_draws_a_batch_in_one_call_with_the_images_of_one_at_a_time():
    fam, sampler = _family(PerSeedDCGAN)
    PerSeedDCGAN.calls = 0
    batched = gen.sample_images(fam, sampler, SEEDS)
    assert PerSeedDCGAN.calls == 1
    expected = one_at_a_time(fam, sampler, SEEDS)
    assert batched.shape == (len(SEEDS), 1, 16, 16)
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-5)
    # And not what one seed's noise for the whole batch gives: each image has its own seed.
    assert not torch.allclose(batched, fam.sample(sampler, len(SEEDS), seed=SEEDS[0]), atol=1e-3)


class DefaultDrawDCGAN(DCGAN):
    """DCGAN with Family's default draw, as a family from another package that defines none."""

    sample_seeds = Family.sample_seeds


def test_a_family_without_a_batched_draw_is_drawn_one_image_a_call():
    fam, sampler = _family(DefaultDrawDCGAN)
    calls = []
    sampler.register_forward_hook(lambda *_: calls.append(1))
    torch.testing.assert_close(gen.sample_images(fam, sampler, SEEDS), one_at_a_time(fam, sampler, SEEDS),
                               atol=0, rtol=0)
    assert len(calls) == 2 * len(SEEDS)   # one forward an image, then the same again one at a time


def _worker(fam, sampler, batch):
    worker = object.__new__(gen._Generator.__ray_actor_class__)
    worker.family, worker.sampler, worker.batch, worker.device = fam, sampler, batch, torch.device("cpu")
    return worker


def _samples(url) -> list[tuple[str, np.ndarray]]:
    out = []
    for shard in read_manifest(url).url:
        with tarfile.open(shard.removeprefix("file://")) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".png"):
                    out.append((m.name, np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())))))
    return out


def test_a_worker_writes_the_same_samples_in_batches_as_one_at_a_time(tmp_path):
    fam, sampler = _family(PerSeedDCGAN)
    rows = {b: _worker(fam, sampler, b).write(0, 0, 12, 40, str(tmp_path / f"b{b}"), []) for b in (1, 5)}
    one, batched = (_samples(str(tmp_path / f"b{b}" / "part-000000")) for b in (1, 5))
    assert [name for name, _ in batched] == [name for name, _ in one] and len(one) == 12
    assert [n.split(".")[0] for n, _ in one] == [f"seed{s:010d}" for s in range(40, 52)]
    for (_, a), (_, b) in zip(one, batched):   # float sums of a batch may round a pixel the other way
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert rows[1]["samples"] == rows[5]["samples"] == 12


def test_each_worker_gets_whole_cpus_where_they_fit_else_an_equal_fraction():
    nodes = [{"CPU": 8.0}, {"CPU": 4.0}]
    assert cpu_share(nodes, 1) == 8      # the biggest node's
    assert cpu_share(nodes, 2) == 4      # 6 each would not fit the 4-CPU node: 4 + 4
    assert cpu_share(nodes, 3) == 4      # 8 → 2 of 4, 4 → 1 of 4
    assert cpu_share(nodes, 5) == 2      # 8 → 4 of 2, 4 → 2 of 2 (12 // 5 = 2)
    assert cpu_share([{"CPU": 2.0}], 4) == 0.5
    assert cpu_share([{"GPU": 1.0}], 2) == 0
    assert auto_gpu_share([{"CPU": 8.0, "GPU": 2.0}], 4) == 0.5 and auto_gpu_share(nodes, 2) == 0


def test_a_gpu_ask_on_a_cluster_without_gpus_is_refused_in_one_line():
    cpus_only = Cluster(nodes=({"CPU": 8.0},))
    with pytest.raises(UserError) as e:
        refuse_gpu_ask(1.0, 2, cpus_only, "generation workers")
    line = str(e.value)
    assert "\n" not in line and line.startswith("--gpus-per-worker 1: 2 generation workers × {GPU: 1} never fit")
    assert "no GPU" in line
    refuse_gpu_ask(0.0, 2, cpus_only, "generation workers")                       # the CPU: nothing to refuse
    refuse_gpu_ask(0.5, 4, Cluster(nodes=({"CPU": 8.0, "GPU": 2.0},)), "x")     # 4 × 0.5 on 2 GPUs fits
    refuse_gpu_ask(1.0, 2, Cluster(nodes=({"CPU": 8.0},), can_grow=True), "x")   # an autoscaler may add GPUs
    with pytest.raises(UserError, match="at most 2 GPUs a worker"):
        refuse_gpu_ask(4.0, 1, Cluster(nodes=({"CPU": 8.0, "GPU": 2.0},)), "x")


def test_generate_and_eval_document_their_gpu_and_batch_options():
    runner = CliRunner()
    generate = runner.invoke(main, ["models", "generate", "--help"]).output
    evaluate = runner.invoke(main, ["eval", "--help"]).output
    assert "--gpus-per-worker" in generate and "--batch" in generate and "default: 0.0" in generate
    assert "--gpus-per-worker" in evaluate
