"""MineAug stage 1: the published way (serial, originals re-extracted per candidate) against
orbitgen's Ray Tune stage 1 with one and with two concurrent trials.

    .venv/bin/python benchmarks/mineaug_search.py [--count 384] [--resolution 64] [--repeats 1]

Same images (built-in crater set), same candidates (the 1-channel pool), same extractor
(randconv), one repeat each by default so that every variant does the same augmentation work.
(a) runs in this process with torch's default threads; (b) gives its one trial all CPUs; (c)
splits them, one CPU per trial. Ray's start-up is outside the timings (a cluster is already up
when a search runs); Tune's per-trial overhead is inside.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402

from data_shards.builtin import ensure_builtin  # noqa: E402
from models.augment.pool import apply_uint8, mse_pm1, names_for  # noqa: E402
from models.metrics.extractors import make_extractor  # noqa: E402
from models.metrics.fid import frechet_distance  # noqa: E402
from search.originals import load_originals  # noqa: E402
from search.scoring import repeat_seed  # noqa: E402
from search.stage1 import run_stage1  # noqa: E402
from search.store import SearchStore  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=384)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    import ray

    work = tempfile.mkdtemp(prefix="mab")
    try:
        url = ensure_builtin(f"builtin:craters?count={args.count}&seed=0", os.path.join(work, "shards"),
                             args.resolution, 1)
        names = names_for(1)
        cpus = os.cpu_count() or 2
        print(f"{args.count} crater images {args.resolution}², {len(names)} candidates, {args.repeats} repeat(s), "
              f"randconv features, {cpus} CPUs, torch {torch.__version__}")

        t = time.perf_counter()
        published(load_originals(url, 1, "randconv"), names, args.repeats)
        a = time.perf_counter() - t
        print(f"(a) published, serial, originals re-extracted per candidate: {a:7.2f} s")

        ray.init(num_cpus=cpus, object_store_memory=300_000_000, include_dashboard=False, log_to_driver=False,
                 _temp_dir=os.path.join(work, "ray"))
        times = {}
        for label, conc, cpu in (("b", 1, float(cpus)), ("c", 2, 1.0)):
            store = SearchStore(os.path.join(work, f"store-{label}"))
            t = time.perf_counter()
            originals = load_originals(url, 1, "randconv")   # once, included in the time
            run_stage1(originals, names, repeats=args.repeats, seed=0, extractor="randconv", weights_path=None,
                       store=store, resources={"CPU": cpu, "GPU": 0.0}, concurrency=conc)
            times[label] = time.perf_counter() - t
            print(f"({label}) orbitgen stage 1 on Ray Tune, {conc} concurrent trial(s) x {cpu:g} CPU: "
                  f"{times[label]:7.2f} s")
        print(f"ratio (b)/(a) = {times['b'] / a:.2f}   (goal <= 0.6)")
        print(f"speed-up (c) vs (b) = {times['b'] / times['c']:.2f}x   (goal >= 1.6x where the cores allow it)")
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
