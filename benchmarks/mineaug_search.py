"""MineAug stage 1, two measurements.

1. The default: the published way (serial, originals re-extracted per candidate) against
   orbitgen's Ray Tune stage 1 with one and with two concurrent trials (issue 11).

       .venv/bin/python benchmarks/mineaug_search.py [--count 384] [--resolution 64] [--repeats 1] [--rounds 3]

   Same images (built-in crater set), same candidates (the 1-channel pool), same extractor
   (randconv), one repeat each by default so that every variant does the same augmentation work.
   (a) runs in this process with torch's default threads; (b) gives its one trial all CPUs; (c)
   splits them, one CPU per trial. Ray's start-up is outside the timings (a cluster is already up
   when a search runs); Tune's per-trial overhead is inside, and so is reading the originals.

2. `--paper-scale` (issue 23, item 8): the whole stage 1 of `search.run.run_search` (no stage 2)
   as `search.preset: paper` runs it: 2,500 crater images at 256², the 26 one-channel candidates,
   3 repeats, Inception-v3 2048-d features, one CPU per trial. The extractor has Inception-v3's
   architecture with random weights (`RandomInceptionV3`, saved as TorchScript with the interface
   of NVIDIA's file): what a forward pass costs does not depend on the weights, and no weights file
   is on these machines.

       .venv/bin/python benchmarks/mineaug_search.py --paper-scale [--count N] [--resolution R] [--repeats R]

   `--count` etc. shrink it (a 2-core CPU extracts Inception features of some 20 images a second:
   the paper's 197,500 extractions take hours there); the table says which scale ran. It prints:
   - the driver's peak RSS (this process: `getrusage`, plus a sampled RSS per phase of the search),
     against the issue's 2 GB goal, PASS or FAIL in the line itself;
   - stage 1's wall time, from the progress line announcing the Tune trials to the last trial's line;
   - the trials' own compute (each trial's `seconds`, stored by the trial: augmenting, extracting,
     scoring) summed, and two ratios: wall / (sum / slots) (the issue's, goal <= 1.15; slots = trials
     Tune runs at once) and sum / wall (the parallel efficiency in trial-seconds per wall-second).

3. The driver's memory at the paper's scale, piece by piece (a whole run there takes hours on a CPU):
   `--extract-probe N` featurises N originals as the driver does (its batches of
   `search.originals.EXTRACT_BATCH`); `--driver-probe` runs the driver's steps after stage 1
   (ranking, mixture table, subsets, mixture KIDs) on a store of synthetic features of the paper's
   shape. Both print the peak RSS against the 2 GB goal.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from data_shards.builtin import ensure_builtin  # noqa: E402
from models.augment.pool import apply_uint8, mse_pm1, names_for  # noqa: E402
from models.metrics.extractors import make_extractor  # noqa: E402
from models.metrics.fid import frechet_distance  # noqa: E402
from search.originals import load_originals  # noqa: E402
from search.scoring import repeat_seed  # noqa: E402
from search.stage1 import run_stage1  # noqa: E402
from search.store import SearchStore  # noqa: E402

# The paper's stage 1 (issue 23, item 8; MINEAUG.md §1): Rosetta2495 / Dawn2500 at 256².
PAPER = {"count": 2500, "resolution": 256, "repeats": 3}
GOAL_RSS_GB = 2.0
GOAL_RATIO = 1.15


# -- Inception-v3's architecture, random weights ------------------------------------------------
# Szegedy et al. 2016 ("Rethinking the Inception Architecture"), in the layout of the FID network:
# every convolution without bias, then batch norm (eps 1e-3) and ReLU; the 2048-d global average
# pool is the feature. Written from the paper's block structure and widths.

def _conv(cin: int, cout: int, kernel, stride: int = 1, padding=0) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False),
                         nn.BatchNorm2d(cout, eps=1e-3), nn.ReLU(inplace=True))


class _Branches(nn.Module):
    """Runs every branch on the same input and concatenates along channels."""

    def __init__(self, *branches: nn.Module):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.branches], 1)


class _Split(nn.Module):
    """A stem followed by a 1×3 and a 3×1 convolution side by side (Inception-v3's widest blocks)."""

    def __init__(self, stem: nn.Module, width: int, cout: int):
        super().__init__()
        self.stem, self.wide, self.tall = stem, _conv(width, cout, (1, 3), padding=(0, 1)), \
            _conv(width, cout, (3, 1), padding=(1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return torch.cat([self.wide(y), self.tall(y)], 1)


def _pool_proj(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1), _conv(cin, cout, 1))


def _block_a(cin: int, pool: int) -> _Branches:      # 35×35: 1×1, 5×5, double 3×3, pool
    return _Branches(_conv(cin, 64, 1),
                     nn.Sequential(_conv(cin, 48, 1), _conv(48, 64, 5, padding=2)),
                     nn.Sequential(_conv(cin, 64, 1), _conv(64, 96, 3, padding=1), _conv(96, 96, 3, padding=1)),
                     _pool_proj(cin, pool))


def _block_b(cin: int) -> _Branches:                 # 35 → 17, grid reduction
    return _Branches(_conv(cin, 384, 3, stride=2),
                     nn.Sequential(_conv(cin, 64, 1), _conv(64, 96, 3, padding=1), _conv(96, 96, 3, stride=2)),
                     nn.MaxPool2d(3, stride=2))


def _block_c(c7: int) -> _Branches:                  # 17×17: factorised 7×7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    return _Branches(_conv(768, 192, 1),
                     nn.Sequential(_conv(768, c7, 1), _conv(c7, c7, **row), _conv(c7, 192, **col)),
                     nn.Sequential(_conv(768, c7, 1), _conv(c7, c7, **col), _conv(c7, c7, **row),
                                   _conv(c7, c7, **col), _conv(c7, 192, **row)),
                     _pool_proj(768, 192))


def _block_d() -> _Branches:                         # 17 → 8, grid reduction
    return _Branches(nn.Sequential(_conv(768, 192, 1), _conv(192, 320, 3, stride=2)),
                     nn.Sequential(_conv(768, 192, 1), _conv(192, 192, (1, 7), padding=(0, 3)),
                                   _conv(192, 192, (7, 1), padding=(3, 0)), _conv(192, 192, 3, stride=2)),
                     nn.MaxPool2d(3, stride=2))


def _block_e(cin: int) -> _Branches:                 # 8×8: expanded filter banks
    return _Branches(_conv(cin, 320, 1),
                     _Split(_conv(cin, 384, 1), 384, 384),
                     _Split(nn.Sequential(_conv(cin, 448, 1), _conv(448, 384, 3, padding=1)), 384, 384),
                     _pool_proj(cin, 192))


class RandomInceptionV3(nn.Module):
    """Inception-v3 to its 2048-d pool, randomly initialised, called as NVIDIA's TorchScript file is:
    uint8-valued RGB NCHW floats in, resized to 299² and scaled by (x − 128) / 128 inside."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv(3, 32, 3, stride=2), _conv(32, 32, 3), _conv(32, 64, 3, padding=1),
                                  nn.MaxPool2d(3, stride=2), _conv(64, 80, 1), _conv(80, 192, 3),
                                  nn.MaxPool2d(3, stride=2))
        self.blocks = nn.Sequential(_block_a(192, 32), _block_a(256, 64), _block_a(288, 64), _block_b(288),
                                    _block_c(128), _block_c(160), _block_c(160), _block_c(192), _block_d(),
                                    _block_e(1280), _block_e(2048))
        # He initialisation keeps the activations' scale through the 94 convolutions; torch's default
        # shrinks them to ~1e-8 by the pool, where denormal floats would make the CPU time unlike real weights'.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.blocks(self.stem((x - 128.0) / 128.0)).mean(dim=(2, 3))


def random_inception_file(path: str, seed: int = 0) -> str:
    """`RandomInceptionV3` saved as TorchScript at `path` (what `eval.inception_weights` points to)."""
    import warnings

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # torch.jit is deprecated in recent torch, but NVIDIA's file, which this stands in for, is TorchScript.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.", category=DeprecationWarning)
        torch.jit.save(torch.jit.script(RandomInceptionV3().eval()), path)
    return path


# -- issue 11: the published way against Tune ---------------------------------------------------

def published(originals, names, repeats):
    """Execute + Select as the original notebooks do: per candidate, augment, then FID from scratch
    (both sides extracted again), then MSE."""
    ex = make_extractor("randconv")
    out = {}
    for n in names:
        for r in range(repeats):
            aug = apply_uint8(n, originals.images, 1, repeat_seed(0, n, r))
            fid = frechet_distance([originals.images[i:i + 256] for i in range(0, originals.count, 256)],
                                   [aug[i:i + 256] for i in range(0, originals.count, 256)], ex)
            out[(n, r)] = (fid, mse_pm1(aug, originals.images))
    return out


def compare(args) -> None:
    import ray

    work = tempfile.mkdtemp(prefix="mab")
    try:
        url = ensure_builtin(f"builtin:craters?count={args.count}&seed=0", os.path.join(work, "shards"),
                             args.resolution, 1)
        names = names_for(1)
        cpus = os.cpu_count() or 2
        print(f"{args.count} crater images {args.resolution}², {len(names)} candidates, {args.repeats} repeat(s), "
              f"randconv features, {cpus} CPUs, torch {torch.__version__}")

        ray.init(num_cpus=cpus, object_store_memory=300_000_000, include_dashboard=False, log_to_driver=False,
                 _temp_dir=os.path.join(work, "ray"))
        variants = {"a": ("published, serial, originals re-extracted per candidate", None, None),
                    "b": ("orbitgen stage 1 on Ray Tune, 1 concurrent trial x {cpus} CPU", 1, float(cpus)),
                    "c": ("orbitgen stage 1 on Ray Tune, 2 concurrent trials x 1 CPU", 2, 1.0)}
        # Rounds interleave the variants, so a slow spell of this shared VM hits all of them alike.
        best = {k: float("inf") for k in variants}
        for rnd in range(args.rounds):
            for label, (_, conc, cpu) in variants.items():
                t = time.perf_counter()
                originals = load_originals(url, 1, "randconv")   # once per variant, inside the time
                if conc is None:
                    published(originals, names, args.repeats)
                else:
                    store = SearchStore(os.path.join(work, f"store-{label}-{rnd}"))   # fresh: nothing to reuse
                    run_stage1(originals, names, repeats=args.repeats, seed=0, extractor="randconv",
                               weights_path=None, store=store, resources={"CPU": cpu, "GPU": 0.0}, concurrency=conc)
                seconds = time.perf_counter() - t
                best[label] = min(best[label], seconds)
                print(f"round {rnd + 1}: ({label}) {seconds:7.2f} s")
        print(f"\nbest of {args.rounds} rounds")
        for label, (what, _, _) in variants.items():
            print(f"({label}) {what.format(cpus=cpus)}: {best[label]:7.2f} s")
        print(f"ratio (b)/(a) = {best['b'] / best['a']:.2f}   (goal <= 0.6)")
        print(f"speed-up (c) vs (b) = {best['b'] / best['c']:.2f}x   (goal >= 1.6x where the cores allow it)")
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- issue 23: stage 1 at the paper's scale ------------------------------------------------------

def rss_bytes() -> int:
    """This process's resident set now (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PhaseMemory:
    """Samples the driver's RSS every `every` seconds and keeps the peak per phase; a phase is named by
    the search's latest progress line (so the table shows which step holds the memory)."""

    def __init__(self, every: float = 0.1):
        self.every, self.phase, self.peaks, self.marks = every, "start", {}, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss_bytes())

    def say(self, line: str) -> None:
        """The search's `progress`: timestamps each line and starts a phase at each step's first line."""
        now = time.perf_counter()
        self.marks.append((now, line))
        for prefix, phase in (("originals:", "originals read and featurised"), ("stage 1:", "stage 1 trials"),
                              ("ranked ", "mixture table and subset ranking")):
            if line.startswith(prefix):
                self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss_bytes())
                self.phase = phase
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    def __enter__(self) -> "PhaseMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def stage1_wall(marks: list[tuple[float, str]]) -> float:
    """Seconds from the line announcing stage 1's Tune trials to the last trial's result line."""
    start = next(t for t, line in marks if line.startswith("stage 1:") and "trial(s), up to" in line)
    end = max(t for t, line in marks if line.lstrip().startswith("[") and "FID" in line)
    return end - start


def parallel_ratios(wall: float, trial_seconds: list[float], slots: int) -> tuple[float, float]:
    """(wall / (sum of trial seconds / slots), sum of trial seconds / wall): the issue's ratio (1.0 when
    the slots are busy with trial work the whole time) and the parallel efficiency (trial-seconds done
    per wall-second, at most `slots`)."""
    total = float(sum(trial_seconds))
    return wall / (total / slots), total / wall


def held_bytes(count: int, resolution: int, candidates: int, repeats: int, dim: int = 2048) -> dict[str, int]:
    """What `search.run` kept in the driver's memory through stage 1's ranking BEFORE issue 23 item 8's
    changes (the first table of BENCHMARKS.md's section; `held_now_bytes` is what it holds now),
    array by array, computed from the shapes: the originals' pixels (uint8, 1 channel) and features,
    every candidate's stored features for every repeat (float32), which `run_search` loaded all at
    once, and the table (`search.frechet.MixtureTable`) stacked in memory: an r × r float64 matrix
    per candidate and repeat, r = min(d, N − 1), counted as if every candidate were kept (an upper
    bound: the MSE gate drops some)."""
    rank = min(dim, count - 1)
    return {"originals' pixels": count * resolution * resolution,
            "originals' features": count * dim * 4,
            "every candidate's features, all repeats": candidates * repeats * count * dim * 4,
            "mixture table, r × r per candidate and repeat": candidates * repeats * rank * rank * 8}


def held_now_bytes(count: int, resolution: int, candidates: int, repeats: int, dim: int = 2048) -> dict[str, int]:
    """What `search.run` keeps in the driver's memory through stage 1's ranking, array by array (computed
    from the shapes, not measured), as the driver now works (issue 23 item 8): the originals' pixels
    (uint8, 1 channel) and features; candidates' features read from the store one at a time (two at
    once while a near-duplicate pair is compared; float32, every repeat); the reference (its basis,
    d × r, and its own r × r matrix); the mixture table's per-(candidate, repeat) vectors (a d-vector
    and two r-vectors, float64; counted as if every candidate were kept, an upper bound) and its r × r
    matrices, in memory only while all of them fit `search.set_matrices.MEMORY_BYTES` (else on
    local disk, with the screening's leading blocks cached when those fit); one scoring batch (two
    (B, r, r) arrays of `search.frechet.BATCH_BYTES`). r = min(d, N − 1)."""
    from search.frechet import BATCH_BYTES
    from search.select import SCREEN_RANK
    from search.set_matrices import MEMORY_BYTES

    rank = min(dim, count - 1)
    matrices = candidates * repeats * rank * rank * 8
    blocks = candidates * repeats * min(rank, SCREEN_RANK) ** 2 * 8
    return {"originals' pixels": count * resolution * resolution,
            "originals' features": count * dim * 4,
            "candidates' features, two at a time (all repeats)": 2 * repeats * count * dim * 4,
            "reference: basis d × r and its own r × r": (dim * rank + rank * rank) * 8,
            "mixture table vectors (d + 2r per candidate and repeat)": candidates * repeats * (dim + 2 * rank) * 8,
            "mixture table r × r matrices in memory (else on disk)": matrices if matrices <= MEMORY_BYTES else 0,
            "screening blocks cached (leading 256 × 256)": blocks if matrices > MEMORY_BYTES and rank > SCREEN_RANK
            and blocks <= MEMORY_BYTES else 0,
            "one scoring batch, two (B, r, r) arrays (at most)": 2 * max(BATCH_BYTES, rank * rank * 8)}


def held_table(count: int, resolution: int, candidates: int, repeats: int) -> str:
    """What the driver holds now (`held_now_bytes`), at this run's scale and at the paper's."""
    here = held_now_bytes(count, resolution, candidates, repeats)
    paper = held_now_bytes(PAPER["count"], PAPER["resolution"], 26, PAPER["repeats"])
    rows = ["| arrays the driver holds (computed from shapes) | this run | paper scale |", "|---|---:|---:|"]
    rows += [f"| {k} | {here[k] / 1e9:.3f} GB | {paper[k] / 1e9:.3f} GB |" for k in here]
    rows.append(f"| sum | {sum(here.values()) / 1e9:.3f} GB | {sum(paper.values()) / 1e9:.3f} GB |")
    return "\n".join(rows)


def extract_probe(count: int, resolution: int, batch: int | None = None) -> None:
    """Peak RSS of one `search.originals.extract` call over `count` random images with the random
    Inception-v3, in this (fresh) process, in the driver's batches (`search.originals.EXTRACT_BATCH`,
    or `batch`): what the driver pays to featurise the originals."""
    from search.originals import EXTRACT_BATCH, extract

    batch = batch or EXTRACT_BATCH

    work = tempfile.mkdtemp(prefix="mab-probe")
    try:
        weights = os.path.join(work, "inception-random.pt")
        subprocess.run([sys.executable, __file__, "--write-inception", weights], check=True)
        net = make_extractor("inception", weights)
        images = torch.randint(0, 256, (count, 1, resolution, resolution), dtype=torch.uint8)
        before = peak_rss_bytes()
        t = time.perf_counter()
        extract(net, images, batch=batch)
        seconds = time.perf_counter() - t
        print(f"extract() of {count} images {resolution}² with Inception-v3 (random weights), batch "
              f"{min(count, batch)}, {torch.get_num_threads()} threads: {seconds:.1f} s ({count / seconds:.1f} "
              f"images/s); peak RSS {before / 1e9:.2f} GB before, {peak_rss_bytes() / 1e9:.2f} GB after")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def driver_probe(args) -> None:
    """The driver's steps after stage 1 (`search.run._search`: ranking with near-duplicate groups, the
    mixture table, the subset ranking, mixture KIDs) at the paper's scale, from a store holding 26
    candidates × 3 repeats × 2,500 × 2048 float32 features (1.6 GB on disk, synthetic: per candidate
    a per-image offset plus per-repeat noise, so that no two are near-duplicates), in this fresh
    process; peak RSS after each step. Exact subset scoring is cut to `EXACT` subsets (its memory is
    one batch whatever their number; each costs 3 eigenvalue problems of 2048 × 2048)."""
    import numpy as np

    from search.frechet import Reference
    from search.scoring import CandidateScore
    from search.select import add_mixture_kids, mixture_table, rank_candidates, rank_subsets

    count, resolution, repeats = args.count or PAPER["count"], args.resolution or PAPER["resolution"], \
        args.repeats or PAPER["repeats"]
    names = names_for(1)[:args.candidates] if args.candidates else names_for(1)
    dim, k, exact = 2048, 3, 4
    work = tempfile.mkdtemp(prefix="mab-driver")
    marks: list[tuple[str, float, float]] = []

    def mark(step: str, since: float) -> None:
        marks.append((step, time.perf_counter() - since, peak_rss_bytes() / 1e9))
        print(f"[{time.strftime('%H:%M:%S')}] {step}: {marks[-1][1]:.1f} s, peak RSS {marks[-1][2]:.2f} GB", flush=True)

    try:
        store = SearchStore(os.path.join(work, "search"))
        rng = np.random.default_rng(0)
        t = time.perf_counter()
        for i, name in enumerate(names):
            base = rng.standard_normal((count, dim), dtype=np.float32)
            feats = [base + np.float32(0.3) * rng.standard_normal((count, dim), dtype=np.float32) for _ in range(repeats)]
            store.save_score(CandidateScore(name, [1.0 + 0.01 * i] * repeats, [0.1] * repeats, feats, 0.0,
                                            [0.0] * repeats))
            del base, feats
        pixels = np.full((count, 1, resolution, resolution), 7, dtype=np.uint8)   # what the driver holds of them
        originals = rng.standard_normal((count, dim), dtype=np.float32)
        mark(f"store written ({len(names)} candidates × {repeats} repeats × {count} × {dim})", t)
        t = time.perf_counter()
        scores = {n: store.load_score(n, features=False) for n in names}
        reference = Reference(originals)
        mark(f"scores without features, reference (rank {reference.rank})", t)
        t = time.perf_counter()
        ranking = rank_candidates(scores, 0.02, True, features=store.load_features)
        kept = [r.augmentation for r in ranking if r.kept]
        mark(f"ranking with near-duplicate groups ({len(kept)} kept)", t)
        t = time.perf_counter()
        table = mixture_table(reference, scores, kept, store.load_features)
        mark(f"mixture table ({'on disk' if table.outer.on_disk else 'in memory'})", t)
        t = time.perf_counter()
        subsets = rank_subsets(table, kept, k, exact_top=exact, max_exact=exact)
        mark(f"{len(subsets)} {k}-subsets screened, {sum(s.exact for s in subsets)} scored exactly", t)
        t = time.perf_counter()
        with_kid = add_mixture_kids(subsets, originals, scores, features=store.load_features)
        mark(f"mixture KIDs ({with_kid}: above search.kid.FULL_KERNEL_MAX rows none is computed)", t)
        table.close()
        peak = peak_rss_bytes()
        print(f"\n| step of the driver after stage 1 | seconds | peak RSS so far |\n|---|---:|---:|")
        for step, seconds, gb in marks:
            print(f"| {step} | {seconds:.1f} | {gb:.2f} GB |")
        print(f"\n{held_table(count, resolution, len(names), repeats)}")
        print(f"\ndriver peak RSS {peak / 1e9:.2f} GB: {'PASS' if peak < GOAL_RSS_GB * 1e9 else 'FAIL'} "
              f"(goal < {GOAL_RSS_GB:g} GB); pixels {pixels.nbytes / 1e9:.2f} GB held")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def paper_scale(args) -> None:
    import ray

    from search.run import run_search

    count, resolution, repeats = args.count or PAPER["count"], args.resolution or PAPER["resolution"], \
        args.repeats or PAPER["repeats"]
    names = names_for(1)[:args.candidates] if args.candidates else names_for(1)
    cpus = os.cpu_count() or 2
    slots = max(1, cpus // args.cpus_per_trial)
    work = tempfile.mkdtemp(prefix="mab-paper")
    try:
        # Written by a child process: building the network here would add its ~0.1 GB to the driver's RSS.
        weights = os.path.join(work, "inception-random.pt")
        subprocess.run([sys.executable, __file__, "--write-inception", weights], check=True)
        t = time.perf_counter()
        url = ensure_builtin(f"builtin:craters?count={count}&seed=0", os.path.join(work, "shards"), resolution, 1)
        built = time.perf_counter() - t
        scale = "paper scale" if (count, resolution, repeats, len(names)) == (
            PAPER["count"], PAPER["resolution"], PAPER["repeats"], 26) else "REDUCED scale (paper: 2500 × 256², 26 " \
                                                                          "candidates, 3 repeats)"
        print(f"{count} crater images {resolution}², {len(names)} candidates, {repeats} repeats, Inception-v3 "
              f"architecture with random weights (2048-d), {slots} trial(s) at once × {args.cpus_per_trial} CPU, "
              f"{cpus} CPUs, torch {torch.__version__}, ray {ray.__version__}: {scale}; shards built in {built:.0f} s")
        # Ray as a cluster would have it, up before the search; its start-up is outside the times.
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, _temp_dir=os.path.join(work, "ray"))
        config = {"preset": "paper", "repeats": repeats, "candidates": names,
                  "resources_per_trial": {"CPU": float(args.cpus_per_trial), "GPU": 0.0}}
        before = peak_rss_bytes()
        with PhaseMemory() as memory:
            t = time.perf_counter()
            result = run_search(url, channels=1, resolution=resolution, config=config,
                                tracking_uri=f"sqlite:///{os.path.join(work, 'mlflow.db')}", experiment="bench",
                                name="paper-scale", storage=os.path.join(work, "search"), extractor="inception",
                                extractor_weights=weights, progress=memory.say)
            total = time.perf_counter() - t
        ray.shutdown()
        store = SearchStore(os.path.join(work, "search"))
        trial_seconds = [store.read_json("stage1", f"{n}.json")["seconds"] for n in names]
        wall = stage1_wall(memory.marks)
        ratio, efficiency = parallel_ratios(wall, trial_seconds, slots)
        peak = peak_rss_bytes()
        ok = peak < GOAL_RSS_GB * 1e9
        print(f"\nchosen: {', '.join(result.chosen)}")
        print("\n| phase of the search (driver) | peak RSS |\n|---|---:|")
        for phase, value in memory.peaks.items():
            print(f"| {phase} | {value / 1e9:.2f} GB |")
        print(f"\n| measure | value |\n|---|---:|")
        print(f"| images × resolution, candidates, repeats | {count} × {resolution}², {len(names)}, {repeats} |")
        print(f"| whole search (run_search, stage 1 only) wall | {total:.1f} s |")
        print(f"| stage 1 wall (first trial line to last) | {wall:.1f} s |")
        print(f"| trials' own compute, summed ({len(trial_seconds)} trials) | {sum(trial_seconds):.1f} s |")
        print(f"| wall / (compute / {slots} slots) (goal <= {GOAL_RATIO}) | {ratio:.3f} |")
        print(f"| compute / wall (parallel efficiency, at most {slots}) | {efficiency:.2f} |")
        print(f"| driver peak RSS before the search (Ray up, torch loaded) | {before / 1e9:.2f} GB |")
        print(f"| driver peak RSS, whole run | {peak / 1e9:.2f} GB |")
        print(f"\n{held_table(count, resolution, len(names), repeats)}")
        print(f"\ndriver peak RSS {peak / 1e9:.2f} GB: {'PASS' if ok else 'FAIL'} (goal < {GOAL_RSS_GB:g} GB); "
              f"wall/compute ratio {ratio:.3f}: {'PASS' if ratio <= GOAL_RATIO else 'FAIL'} (goal <= {GOAL_RATIO}); "
              f"{scale}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--paper-scale", action="store_true",
                    help="stage 1 as search.preset paper runs it (2500 × 256², 26 candidates, 3 repeats, Inception)")
    ap.add_argument("--count", type=int, default=None, help="images (default 384; --paper-scale: 2500)")
    ap.add_argument("--resolution", type=int, default=None, help="pixels a side (default 64; --paper-scale: 256)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per candidate (default 1; --paper-scale: 3)")
    ap.add_argument("--candidates", type=int, default=None, help="--paper-scale: only the first N of the 26")
    ap.add_argument("--cpus-per-trial", type=int, default=1, help="--paper-scale: CPUs per stage-1 trial")
    ap.add_argument("--rounds", type=int, default=3, help="each variant's best of this many interleaved runs")
    ap.add_argument("--extract-probe", type=int, default=None, metavar="N",
                    help="only measure the driver's feature extraction of N originals, in its batches (peak RSS, images/s)")
    ap.add_argument("--extract-batch", type=int, default=None, metavar="B",
                    help="--extract-probe: batches of B images (default search.originals.EXTRACT_BATCH)")
    ap.add_argument("--driver-probe", action="store_true",
                    help="only measure the driver's steps after stage 1 at the paper's scale, from synthetic stored features")
    ap.add_argument("--write-inception", help=argparse.SUPPRESS)   # the child process of paper_scale
    args = ap.parse_args()
    if args.write_inception:
        random_inception_file(args.write_inception)
    elif args.driver_probe:
        driver_probe(args)
    elif args.extract_probe:
        extract_probe(args.extract_probe, args.resolution or PAPER["resolution"], args.extract_batch)
    elif args.paper_scale:
        paper_scale(args)
    else:
        args.count, args.resolution, args.repeats = args.count or 384, args.resolution or 64, args.repeats or 1
        compare(args)


if __name__ == "__main__":
    main()
