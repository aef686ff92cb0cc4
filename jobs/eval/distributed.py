"""One evaluation (`jobs.eval.core`) spread over Ray workers, equal to the single-process one.

The work is cut at multiples of the batch, so every generator call and every extractor pass
sees the batch it would see in one process: worker w gets the w-th contiguous range of the
generated batches (unconditional: a disjoint seed range) and of the reals (conditional families:
of the inputs, with their targets). Each worker is an actor that loads the model and the
extractors once and keeps its own `MetricSuite`; the driver sends it its range in chunks (the
progress bar moves per chunk), then merges the workers' suite states in range order into one
suite (`MetricSuite.merge`: FID's sums add, KID's and precision/recall's features concatenate in
the single-process order) and computes the values there.
"""
from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm import tqdm

from data_shards.split import Holdout, Positions
from jobs.capacity import WAIT_REPORT_S, Demand, Pending
from jobs.eval import weights
from jobs.eval.core import EvalSettings, eval_params, fp32_highest, real_positions, score_part
from jobs.eval.resources import auto_gpu_share, cpu_share, use_cpu_share, worker_device
from jobs.runtime.env import forwarded_env
from models.metrics.suite import MetricSuite
from models.snapshot import load_snapshot

CHUNK_BATCHES = 4   # batches per call to a worker: the progress bar's step


@dataclass(frozen=True)
class Chunk:
    """A piece of one worker's range: reals at `positions`, generated batches from `fake_starts`."""

    positions: Positions
    fake_starts: tuple[int, ...]
    images: int      # reals and generated images together, for the progress bar


def _take(positions: Positions, start: int, stop: int) -> Positions:
    """The samples from `start` to `stop` (exclusive) in reading order (shard by shard)."""
    out, seen = [], 0
    for p in positions:
        lo, hi = min(max(start - seen, 0), len(p)), min(max(stop - seen, 0), len(p))
        out.append(p[lo:hi])
        seen += len(p)
    return out


def _ranges(n_batches: int, parts: int) -> list[range]:
    """`parts` contiguous ranges of batch indices, sizes differing by at most one."""
    bounds = np.linspace(0, n_batches, parts + 1).round().astype(int)
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def plan(positions: Positions, settings: EvalSettings, *, conditional: bool, workers: int) -> list[list[Chunk]]:
    """Each worker's chunks, in order: worker w reads the w-th range of the reals' batches and
    generates the w-th range of the fake batches (none for conditional families)."""
    b, n_reals = settings.batch, sum(len(p) for p in positions)
    real_batches = _ranges(-(-n_reals // b), workers)
    fake_batches = _ranges(0 if conditional else -(-settings.num_samples // b), workers)
    out = []
    for reals, fakes in zip(real_batches, fake_batches):
        chunks = []
        for i in range(0, max(len(reals), len(fakes)), CHUNK_BATCHES):
            r, f = reals[i:i + CHUNK_BATCHES], fakes[i:i + CHUNK_BATCHES]
            part = _take(positions, r.start * b, r.stop * b)
            starts = tuple(k * b for k in f)
            images = sum(len(p) for p in part) + sum(min(b, settings.num_samples - s) for s in starts)
            chunks.append(Chunk(part, starts, images))
        out.append(chunks)
    return out


@ray.remote
class EvalWorker:
    """One worker of a distributed evaluation: the model, the extractors and its own suite."""

    def __init__(self, snapshot: bytes, data_url: str, settings: EvalSettings, env: dict[str, str],
                 shipped: dict | None = None):
        os.environ.update(env)   # the S3 endpoint as the driver has it; credentials are the node's own
        self.device = worker_device()
        use_cpu_share()
        self.family, self.sampler, _ = load_snapshot(io.BytesIO(snapshot), device=self.device)
        # The extractors' weights files where this node lacks the driver's paths (jobs/eval/weights.py).
        settings = weights.place(settings, shipped or {}, weights.node_folder())
        self.data_url, self.settings = data_url, settings
        self.suite = settings.suite(self.family, self.device)

    def score(self, chunk: Chunk) -> int:
        s = self.settings
        score_part(self.family, self.sampler, self.suite, data_url=self.data_url, positions=chunk.positions,
                   fake_starts=chunk.fake_starts, num_samples=s.num_samples, device=self.device, batch=s.batch,
                   seed_base=s.seed_base)
        return chunk.images

    def state(self) -> dict:
        return self.suite.state()

    def ready(self) -> bool:
        return True


def _nodes() -> list[dict[str, float]]:
    """Each alive node's total resources."""
    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def _started(actors: list, demand: Demand) -> None:
    """Returns once every worker has started; until then, every WAIT_REPORT_S, a line says what
    they wait for (a busy cluster, or nodes an autoscaler is still adding)."""
    ready, pending = [actor.ready.remote() for actor in actors], Pending(demand)
    while len(ray.wait(ready, num_returns=len(ready), timeout=WAIT_REPORT_S)[0]) < len(ready):
        print(f"[orbitgen] {pending.line()}", file=sys.stderr, flush=True)


def evaluate_distributed(snapshot: Path, data_url: str, settings: EvalSettings, *, workers: int,
                         progress: bool = True, gpus_per_worker: float | None = None
                         ) -> tuple[dict[str, float], dict[str, str], MetricSuite]:
    """(values, params, the merged suite) of the model in `snapshot` on `workers` Ray workers
    (Ray must be initialised); equal to `jobs.eval.core.evaluate` with the same settings.
    `gpus_per_worker`: each worker's GPUs; None: an equal share of the cluster's, at most one."""
    family, _, _ = load_snapshot(snapshot)
    # Built first: a bad setting (an extractor's missing weights) fails here, not in every worker.
    suite = settings.suite(family, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    positions = real_positions(family, data_url, settings.num_samples, settings.holdout, settings.real_seed)
    chunks = [c for c in plan(positions, settings, conditional=family.conditional, workers=workers) if c]
    model = ray.put(snapshot.read_bytes())
    shipped = weights.ship(weights.weight_paths(settings))
    # SPREAD: one worker a node while nodes are free, so W workers use W machines' cores (or GPUs).
    nodes = _nodes()
    gpus = auto_gpu_share(nodes, len(chunks)) if gpus_per_worker is None else gpus_per_worker
    each = {"CPU": cpu_share(nodes, len(chunks)), "GPU": gpus}
    actors = [EvalWorker.options(num_cpus=each["CPU"], num_gpus=each["GPU"], scheduling_strategy="SPREAD")
              .remote(model, data_url, settings, forwarded_env(), shipped) for _ in chunks]
    try:
        _started(actors, Demand("evaluation workers", len(actors), each, keys="--workers"))
        pending = {actor.score.remote(c): c for actor, mine in zip(actors, chunks) for c in mine}
        with tqdm(total=sum(c.images for c in pending.values()), unit="img", desc="evaluating", file=sys.stderr,
                  disable=not progress, mininterval=0.5 if sys.stderr.isatty() else 30) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                bar.update(ray.get(done[0]))
                pending.pop(done[0])
        states = ray.get([actor.state.remote() for actor in actors])
    finally:
        for actor in actors:
            ray.kill(actor)
    for state in states:   # in range order: the order of one process
        suite.merge(state)
    params = eval_params(suite, family, settings.holdout, settings.real_seed) | {"eval_workers": str(len(actors))}
    with fp32_highest():   # as the single-process evaluation computes its values
        return suite.compute(), params, suite
