"""Generation benchmark: `orbitgen models generate` images/s with 1 and 2 Ray workers, same run.

    .venv/bin/python benchmarks/generate.py [--n 1024] [--shard-size 128] [--rounds 3]

The model is the quickstart's DCGAN as its spec has it (32² grey; weights as built: the sampling
cost does not depend on training). Each round generates N images into a fresh local folder with
1 worker, then with 2 (the order alternates between rounds); a figure is the whole command as a
user runs it: actors started, the model loaded, every image drawn one seed at a time, PNG-encoded,
written as shards, card and manifest. The best round of each counts (the machine is shared).
Also checks that both wrote the same shard bytes. Prints a markdown table for BENCHMARKS.md.
Not a test: nothing here asserts.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from jobs.generate import ModelSource, generate  # noqa: E402
from jobs.spec import SPECS_DIR, load_spec  # noqa: E402
from models.snapshot import save_snapshot  # noqa: E402


def quickstart_snapshot(path: Path) -> None:
    family = load_spec(SPECS_DIR / "quickstart.yaml").make_family()
    torch.manual_seed(0)
    save_snapshot(path, family, family.build()[family.sampler_role])


def shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.tar"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--shard-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from jobs.runtime.ray_session import ensure_ray

    ensure_ray(num_cpus=2)
    work = Path(tempfile.mkdtemp(prefix="orbitgen-bench-generate-"))
    try:
        snapshot = work / "quickstart.pt"
        quickstart_snapshot(snapshot)
        model = ModelSource(str(snapshot), str(snapshot))
        best: dict[int, float] = {}
        for r in range(args.rounds):
            for workers in ((1, 2) if r % 2 == 0 else (2, 1)):
                out = work / f"out-{workers}"
                shutil.rmtree(out, ignore_errors=True)
                started = time.perf_counter()
                generate(model, args.n, str(out), workers=workers, shard_size=args.shard_size, progress=False,
                         say=lambda _: None)
                rate = args.n / (time.perf_counter() - started)
                best[workers] = max(best.get(workers, 0.0), rate)
                print(f"round {r + 1}: {workers} worker(s) {rate:.1f} images/s", file=sys.stderr)
        same = shards(work / "out-1") == shards(work / "out-2")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"### {date.today().isoformat()} · {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
          f"no GPU · load average {os.getloadavg()[0]:.1f}\n")
    print(f"Command: `.venv/bin/python benchmarks/generate.py --n {args.n} --shard-size {args.shard_size} "
          f"--rounds {args.rounds}`; torch {torch.__version__}\n")
    m = load_spec(SPECS_DIR / "quickstart.yaml").model
    print(f"Quickstart DCGAN (nz {m['nz']}, ngf {m['ngf']}, 32² grey), {args.n} images in shards of "
          f"{args.shard_size}, best of {args.rounds} rounds; the same shard bytes with 1 and 2 workers: "
          f"{'yes' if same else 'NO'}\n")
    print("| workers | images/s | vs 1 worker |\n|---:|---:|---:|")
    for w in (1, 2):
        print(f"| {w} | {best[w]:.1f} | {best[w] / best[1]:.2f}× |")


if __name__ == "__main__":
    main()
