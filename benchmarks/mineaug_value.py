"""Does the MineAug search pay? The value benchmark of issue 23 (item 9).

For each of two small image sets, one `orbitgen search mineaug` (`jobs.mineaug.run.run_search_job`,
stage 1 and stage 2, the project's own proxy trainings from `jobs.mineaug.proxy`) trains the same
tiny DCGAN under five arms, each at every seed (`search.validate.seeds`):

    none          no augmentation
    trivial       TrivialAugment-style: one kept candidate drawn uniformly per image, per draw
    singles       the published choice: the K best kept singles by stage-1 FID
    best set      the best K-set by stage-1 mixture FID (search.select=sets)
    winner        stage 2's own pick: the best Optuna proposal (chosen at the first seed under
                  successive halving, then confirmed on the other seeds)

and reports each arm's trained FID and KID (against the original images, randconv features) as a
mean with a 95% Student-t interval over seeds, and each arm's paired difference against "none"
(same seed, same data order and initial weights) with its 95% t-interval. The winner is also
compared with "trivial", and, because it was picked as the best of several proposals at the first
seed, its difference is given again over the confirmation seeds alone (unbiased by that pick).
The search's own verdict (Holm-corrected paired bootstrap, `search.verdict`) is printed as it gave it.

The two sets: the built-in crater set (`builtin:craters`), and real photographs: scikit-image's
sample images (moon, camera, astronaut in grey, grass, gravel, brick), cut into 64² tiles and
built into shards here with `data_shards.build` (the `folder` layout, as `orbitgen data build` does).

    .venv/bin/python benchmarks/mineaug_value.py            # 5 seeds, 300 steps, 16²: ~7 min on 2 cores
    .venv/bin/python benchmarks/mineaug_value.py --quick    # 1 seed, 40 steps: the code path in ~4 min
    options: --seeds N --steps N --resolution R --trials N --datasets craters,skimage --out results.json

With one seed there is no interval (printed as n/a). Arms that name the same subset (the K best
singles may be the best K-set) are trained once and reported on both rows.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

import numpy as np  # noqa: E402

SKIMAGE_IMAGES = ("moon", "camera", "astronaut", "grass", "gravel", "brick")
TILE = 64
LEVEL = 0.95
ARMS = ("none", "trivial", "singles", "best set", "winner")


# -- data -----------------------------------------------------------------------------------------

def skimage_tiles(tile: int = TILE) -> dict[str, np.ndarray]:
    """Non-overlapping tile×tile grey tiles of scikit-image's sample images, keyed `<image>_<row>_<col>`
    (no tile shares pixels with another, so no near-copies sit across the set)."""
    import skimage.data
    from skimage.color import rgb2gray

    out = {}
    for name in SKIMAGE_IMAGES:
        img = getattr(skimage.data, name)()
        if img.ndim == 3:   # astronaut is RGB: the set is grey, as the probe sets are
            img = (rgb2gray(img) * 255).round().astype(np.uint8)
        for r in range(img.shape[0] // tile):
            for c in range(img.shape[1] // tile):
                out[f"{name}_{r:02d}_{c:02d}"] = img[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
    return out


def build_skimage_set(work: str, resolution: int) -> str:
    """The tiles as PNG files in a folder, then shards at `resolution` by the `folder` layout; their URL."""
    from PIL import Image

    from data_shards.build import build
    from data_shards.storage import to_url

    folder, dest = os.path.join(work, "skimage-tiles"), os.path.join(work, f"skimage-shards-r{resolution}")
    os.makedirs(folder, exist_ok=True)
    for key, tile in skimage_tiles().items():
        Image.fromarray(tile).save(os.path.join(folder, f"{key}.png"))
    build(folder, dest, layout="folder", resolution=resolution, channels=1, shard_size=128, progress=False)
    return to_url(dest)


# -- statistics -----------------------------------------------------------------------------------

@dataclass
class Interval:
    mean: float
    low: float      # nan with fewer than 2 values
    high: float
    n: int

    def show(self, scale: float = 1.0, digits: int = 3) -> str:
        if math.isnan(self.mean):
            return "–"
        m = f"{self.mean * scale:.{digits}g}"
        if self.n < 2:
            return f"{m} (n/a)"
        return f"{m} [{self.low * scale:.{digits}g}, {self.high * scale:.{digits}g}]"


def t_interval(values, level: float = LEVEL) -> Interval:
    """Mean and Student-t interval: mean ± t(1 − (1 − level)/2, n − 1) · s / √n, s the sample std."""
    from scipy.stats import t

    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    if v.size < 2:
        return Interval(float(v[0]), math.nan, math.nan, 1)
    half = t.ppf(1 - (1 - level) / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return Interval(float(v.mean()), float(v.mean() - half), float(v.mean() + half), int(v.size))


def paired(arm: dict[int, float], base: dict[int, float], seeds=None, level: float = LEVEL) -> Interval:
    """t-interval of arm − base at the seeds both have (or at `seeds`)."""
    common = sorted(set(arm) & set(base) & (set(seeds) if seeds is not None else set(arm)))
    return t_interval([arm[s] - base[s] for s in common if arm[s] is not None and base[s] is not None], level)


def significant(iv: Interval) -> str:
    """Plain words for a difference against the baseline (negative: the arm is better)."""
    if iv.n < 2 or math.isnan(iv.low):
        return "no interval"
    if iv.high < 0:
        return "better"
    if iv.low > 0:
        return "worse"
    return "no difference shown"


# -- the search -----------------------------------------------------------------------------------

def spec_overrides(work: str, data_url: str, args) -> list[str]:
    """The quickstart spec (dcgan, 1 channel) shrunk for the benchmark; stage 2 at every seed."""
    return [f"workdir={work}", f"data.train={data_url}", f"data.resolution={args.resolution}",
            "data.shuffle_buffer=128", "scaling.num_workers=1", "scaling.cpus_per_worker=1",
            "model.nz=32", "model.ngf=16", "model.ndf=16", "train.batch=32",
            f"eval.num_samples={args.samples}", f"tracking.uri=sqlite:///{work}/mlflow.db",
            "search.k=3", "search.repeats=2", "search.concurrency=2",
            # 16²: rotations by <= 15° and the flips of smooth tiles move few pixels (issue 23's gate note)
            f"search.mse_min={args.mse_min}",
            f"search.validate.top_m={args.top_m}", f"search.validate.trials={args.trials}",
            f"search.validate.budget_steps={args.steps}", f"search.validate.seeds={args.seeds}",
            f"search.validate.num_samples={args.samples}"]


def arm_runs(result) -> dict[str, tuple[str, dict[int, float], dict[int, float]]]:
    """arm -> (subset key, {seed: FID}, {seed: KID}) from the search's stage-2 runs."""
    from search.proposals import NONE_KEY, in_order, subset_key
    from search.validate import TRIVIAL_KEY

    v = result.validation
    kept = [r.augmentation for r in result.ranking if r.kept]
    finished = [r for r in v.runs if r.status == "finished" and r.fid is not None]

    def of(key: str) -> tuple[str, dict[int, float], dict[int, float]]:
        runs = [r for r in finished if r.key == key]
        return key, {r.seed: r.fid for r in runs}, {r.seed: r.kid for r in runs}

    proposals = {r.key for r in finished if r.role == "proposal"}
    # Stage 2's pick: the proposal confirmed on the most seeds (the best at the first seed).
    first = min(r.seed for r in v.runs)
    winner = min(proposals, key=lambda k: (-len(of(k)[1]), of(k)[1].get(first, math.inf), k)) if proposals else None
    arms = {"none": of(NONE_KEY), "trivial": of(TRIVIAL_KEY),
            "singles": of(subset_key(in_order(result.singles, kept))),
            "best set": of(subset_key(in_order(result.best_set, kept)))}
    if winner is not None:
        arms["winner"] = of(winner)
    return arms


def run_dataset(label: str, data_url: str, args, work: str) -> dict:
    from jobs.mineaug.run import run_search_job
    from jobs.spec import SPECS_DIR, load_spec

    spec = load_spec(SPECS_DIR / "quickstart.yaml", spec_overrides(work, data_url, args))
    start = time.perf_counter()
    job = run_search_job(spec, say=lambda line: print(f"[{time.strftime('%H:%M:%S')}] {label}: {line}", flush=True))
    seconds = time.perf_counter() - start
    result, v = job.result, job.result.validation
    arms = arm_runs(result)
    first = min(r.seed for r in v.runs)
    return {"dataset": label, "data": data_url, "seconds": seconds, "first_seed": first,
            "arms": {a: {"subset": k, "fid": {str(s): f for s, f in fid.items()},
                         "kid": {str(s): x for s, x in kid.items()}} for a, (k, fid, kid) in arms.items()},
            "verdict": v.verdict, "correction": v.correction,
            "comparisons": [c.as_dict() for c in v.comparisons],
            "stopped": sum(r.status == "stopped" for r in v.runs), "runs": len(v.runs)}


def _seeded(d: dict) -> dict[int, float]:
    return {int(s): x for s, x in d.items()}


def table(res: dict) -> str:
    """The markdown table of one data set."""
    arms = res["arms"]
    none_fid, none_kid = _seeded(arms["none"]["fid"]), _seeded(arms["none"]["kid"])
    lines = [f"| arm | subset | seeds | FID, mean [95% t] | KID ×10³, mean [95% t] | ΔFID vs none [95% t] | "
             f"ΔKID×10³ vs none [95% t] | FID vs none |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for arm in ARMS:
        if arm not in arms:
            lines.append(f"| {arm} | (none finished) | 0 | – | – | – | – | – |")
            continue
        a = arms[arm]
        fid, kid = _seeded(a["fid"]), _seeded(a["kid"])
        d_fid = paired(fid, none_fid) if arm != "none" else None
        d_kid = paired(kid, none_kid) if arm != "none" else None
        lines.append(f"| {arm} | {a['subset']} | {len(fid)} | {t_interval(fid.values()).show()} | "
                     f"{t_interval(kid.values()).show(1e3)} | {d_fid.show() if d_fid else '–'} | "
                     f"{d_kid.show(1e3) if d_kid else '–'} | {significant(d_fid) if d_fid else '–'} |")
    if "winner" in arms:
        w, triv = _seeded(arms["winner"]["fid"]), _seeded(arms["trivial"]["fid"])
        confirm = [s for s in w if s != res["first_seed"]]
        vs_trivial, confirmed = paired(w, triv), paired(w, none_fid, confirm)
        lines.append("")
        lines.append(f"winner vs trivial: ΔFID {vs_trivial.show()} ({significant(vs_trivial)}); winner vs none "
                     f"over the confirmation seeds {confirm} only (not the seed it was picked at): "
                     f"ΔFID {confirmed.show()} ({significant(confirmed)})")
    lines.append(f"search's verdict ({res['correction']}): {res['verdict']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description="MineAug value benchmark (issue 23)")
    ap.add_argument("--quick", action="store_true", help="1 seed, 40 steps, 2 proposals: the code path only")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 5; --quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per proxy (default 300; --quick 40)")
    ap.add_argument("--trials", type=int, default=None, help="Optuna proposals in stage 2 (default 6; --quick 2)")
    ap.add_argument("--top-m", type=int, default=5)
    ap.add_argument("--resolution", type=int, default=16)
    ap.add_argument("--count", type=int, default=384, help="images of the built-in crater set")
    ap.add_argument("--samples", type=int, default=256, help="generated images per FID/KID")
    ap.add_argument("--mse-min", type=float, default=0.005)
    ap.add_argument("--datasets", default="craters,skimage")
    ap.add_argument("--out", help="write every per-seed value as JSON here")
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temporary one, removed)")
    args = ap.parse_args()
    args.seeds = args.seeds or (1 if args.quick else 5)
    args.steps = args.steps or (40 if args.quick else 300)
    args.trials = args.trials or (2 if args.quick else 6)

    work = args.keep or tempfile.mkdtemp(prefix="mineaug-value-")
    os.makedirs(work, exist_ok=True)
    start = time.perf_counter()
    results = []
    try:
        for label in args.datasets.split(","):
            if label == "craters":
                url = f"builtin:craters?count={args.count}&seed=0"
            elif label == "skimage":
                url = build_skimage_set(work, args.resolution)
            else:
                raise SystemExit(f"unknown data set {label!r}: craters, skimage")
            results.append(run_dataset(label, url, args, os.path.join(work, label)))
        total = time.perf_counter() - start
        print(f"\n{args.seeds} seed(s) per arm, {args.steps} steps, {args.resolution}², batch 32, DCGAN nz 32 "
              f"ngf/ndf 16, {args.samples} samples per FID/KID (randconv features), {args.trials} Optuna "
              f"proposals among subsets of the top {args.top_m}; intervals: Student t, {LEVEL:.0%}, over seeds; "
              f"total {total / 60:.1f} min")
        for res in results:
            print(f"\n### {res['dataset']} ({res['data']}; {res['runs']} proxy trainings, {res['stopped']} stopped by "
                  f"halving; {res['seconds'] / 60:.1f} min)\n")
            print(table(res))
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"args": vars(args), "total_seconds": total, "results": results}, f, indent=1)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
