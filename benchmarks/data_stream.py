"""Data stream benchmark: images/s through decode + resize + batch, same images, same cores.

    .venv/bin/python benchmarks/data_stream.py [--images 512] [--source-size 512] [--resolution 256]

Compares, on one set of synthetic satellite tiles (PNG, RGB):
  * the seeds' way: a torch DataLoader over a folder of the original PNGs, PIL decode + resize
    + centre crop every epoch (and, for reference, over PNGs already resized to the resolution);
  * orbitgen's shard stream (`image_stream`) from local files and from a loopback S3 server
    (moto, started with infra/local_stack.py), shards built once at the training resolution;
  * ways of reading a shard from S3 (raw bytes + tar parsing): fsspec streaming with 5, 16 and
    64 MiB read-ahead blocks, one GET per shard, one GET with the next shard prefetched in a
    thread (what the stream does), and a `pipe:` to the aws CLI;
and the shard build rate (`orbitgen data build`, folder layout, one run).

Loaders are measured twice: wall-clock images/s with `--workers` DataLoader workers, and CPU
time per image with the loader in one process (no workers). On a shared machine the second is
the steadier figure (other work slows the clock, not the CPU cost); for S3 it leaves out the
moto server's own CPU. Figures are the best of `--repeats` rounds in which the measures take
turns, so a burst of load hits every measure alike. Prints markdown tables for
benchmarks/BENCHMARKS.md. Not a test: nothing here asserts.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "infra")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from data_shards.build import build  # noqa: E402
from data_shards.card import read_manifest  # noqa: E402
from data_shards.landscape import map_pairs  # noqa: E402
from data_shards.shard_reader import Prefetcher, fetch, tar_samples  # noqa: E402
from data_shards.storage import filesystem  # noqa: E402
from data_shards.stream import image_stream  # noqa: E402


def make_sources(folder: Path, n: int, size: int) -> None:
    """Satellite-like tiles as PNG files (generated once, kept in the work folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.png"))) == n:
        return
    for s in map_pairs(n, size, channels=3, seed=0):
        Image.fromarray(s.cond).save(folder / f"{s.key}.png")


class PngFolder(torch.utils.data.Dataset):
    """The seeds' loader: one PNG file an item, PIL decode, resize + centre crop, uint8 CHW."""

    def __init__(self, folder: Path, resolution: int):
        self.files, self.resolution = sorted(folder.glob("*.png")), resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = Image.open(self.files[i]).convert("RGB")
        img = ImageOps.fit(img, (self.resolution, self.resolution), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def folder_batches(folder: Path, resolution: int, batch: int, workers: int):
    return iter(torch.utils.data.DataLoader(PngFolder(folder, resolution), batch_size=batch, shuffle=True,
                                            num_workers=workers, drop_last=True))


def stream_batches(url: str, batch: int, workers: int):
    return image_stream(url, rank=0, world_size=1, batch_size=batch, seed=0, num_workers=workers)


def rate(batches, n: int, clock=time.perf_counter) -> float:
    """Images per second of `clock` over `n` batches, from the second on (workers started)."""
    def size(batch) -> int:  # the stream yields dicts, the folder loader tensors
        return len(batch["image"] if isinstance(batch, dict) else batch)

    next(batches)
    t = clock()
    images = sum(size(next(batches)) for _ in range(n))
    dt = clock() - t
    del batches
    return images / dt


def _consume(f) -> int:
    return sum(len(v) for s in tar_samples(f) for k, v in s.items() if not k.startswith("__"))


def s3_readers(endpoint: str):
    """name -> function(list of s3 urls) -> bytes of sample data read."""
    def streaming(block_mib):
        def read(urls):
            fs, _ = filesystem(urls[0])
            total = 0
            for u in urls:
                with fs.open(filesystem(u)[1], "rb", block_size=block_mib * 2**20, cache_type="readahead") as f:
                    total += _consume(f)
            return total
        return read

    def whole(urls):
        return sum(_consume(io.BytesIO(fetch(u))) for u in urls)

    def prefetched(urls):
        p = Prefetcher(urls)
        try:
            return sum(_consume(io.BytesIO(p.get(u))) for u in urls)
        finally:
            p.close()

    def pipe(urls):
        total = 0
        for u in urls:
            proc = subprocess.Popen(["aws", "s3", "cp", u, "-", "--endpoint-url", endpoint, "--quiet"],
                                    stdout=subprocess.PIPE)
            total += _consume(proc.stdout)
            proc.wait()
        return total

    readers = {"fsspec stream, 5 MiB read-ahead (s3fs default)": streaming(5),
               "fsspec stream, 16 MiB read-ahead": streaming(16),
               "fsspec stream, 64 MiB read-ahead": streaming(64),
               "one GET per shard": whole,
               "one GET per shard + next shard prefetched (orbitgen)": prefetched}
    if shutil.which("aws"):
        readers["`pipe:aws s3 cp URL -`"] = pipe
    return readers


def best_of(measures: dict, repeats: int) -> dict:
    """name -> best figure of `repeats` rounds; the measures take turns within each round, so a
    burst of load from other work on the machine hits all of them alike."""
    figures: dict = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            figures[name].append(measure())
    return {name: max(values) for name, values in figures.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--source-size", type=int, default=512, help="side of the original PNGs")
    ap.add_argument("--resolution", type=int, default=256, help="training resolution")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers, for every loader")
    ap.add_argument("--shard-size", default="128")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--workdir", default=str(REPO / "orbitgen-work" / "bench-data"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    work = Path(args.workdir)
    originals, resized = work / f"png-{args.source_size}", work / f"png-{args.resolution}"
    make_sources(originals, args.images, args.source_size)
    if len(list(resized.glob("*.png"))) != args.images:
        resized.mkdir(parents=True, exist_ok=True)
        for p in sorted(originals.glob("*.png")):
            ImageOps.fit(Image.open(p), (args.resolution,) * 2, Image.Resampling.LANCZOS).save(resized / p.name)
    epoch_batches = args.images // args.batch

    import local_stack

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        t = time.perf_counter()
        build(str(originals), str(shards), layout="folder", resolution=args.resolution, channels="rgb",
              shard_size=args.shard_size, progress=False)
        build_rate = args.images / (time.perf_counter() - t)
        svc = local_stack.start_s3(Path(tmp) / "s3")
        try:
            os.environ.update(local_stack.s3_env(svc.url))
            local_stack.create_bucket(svc.url, "bench")
            fs, _ = filesystem("s3://bench/x")
            fs.put(str(shards) + "/", "bench/shards/", recursive=True)
            s3_url = "s3://bench/shards"
            manifest = read_manifest(s3_url)
            urls, size = list(manifest.url), int(manifest.bytes.sum())
            seeds = f"torch DataLoader, PNG folder {args.source_size}² → resize {args.resolution}² (the seeds' way)"
            loaders = {  # name -> batches(DataLoader workers)
                seeds: lambda w: folder_batches(originals, args.resolution, args.batch, w),
                f"torch DataLoader, PNG folder already at {args.resolution}²":
                    lambda w: folder_batches(resized, args.resolution, args.batch, w),
                "orbitgen shard stream, local files": lambda w: stream_batches(shards.as_uri(), args.batch, w),
                "orbitgen shard stream, loopback S3 (moto)": lambda w: stream_batches(s3_url, args.batch, w),
            }
            n = epoch_batches - 1  # one epoch of the folder loaders, less the first batch
            wall = best_of({k: lambda b=b: rate(b(args.workers), n) for k, b in loaders.items()}, args.repeats)
            cpu = best_of({k: lambda b=b: rate(b(0), n, time.process_time) for k, b in loaders.items()}, 2)

            def mib_per_s(read):
                def measure():
                    t = time.perf_counter()
                    read(urls)
                    return size / (time.perf_counter() - t) / 2**20
                return measure

            reads = best_of({name: mib_per_s(read) for name, read in s3_readers(svc.url).items()}, args.repeats)
        finally:
            svc.stop()

    mib = size / 2**20
    print(f"\n{date.today()} · {platform.node()} · {os.cpu_count()} cores · torch {torch.__version__} · "
          f"{args.images} images, {args.source_size}² PNG originals → {args.resolution}² RGB, batch {args.batch}, "
          f"{args.workers} DataLoader workers, shards of {args.shard_size} ({len(urls)} shards, {mib:.0f} MiB)\n")
    print(f"| loader (decode + resize + batch) | images/s, {args.workers} workers | vs seeds' | "
          "CPU ms/image, in-process | vs seeds' |")
    print("|---|---:|---:|---:|---:|")
    for name in loaders:
        print(f"| {name} | {wall[name]:.0f} | {wall[name] / wall[seeds]:.1f}× | {1000 / cpu[name]:.2f} | "
              f"{cpu[name] / cpu[seeds]:.1f}× |")
    print(f"\n| shard build (`orbitgen data build --layout folder`, {args.source_size}² PNG → {args.resolution}² shards) "
          f"| {build_rate:.0f} images/s |\n|---|---:|")
    print("\n| reading all shards from loopback S3 (bytes + tar parsing) | MiB/s |\n|---|---:|")
    for name, mib in reads.items():
        print(f"| {name} | {mib:.0f} |")


if __name__ == "__main__":
    main()
