"""`orbitgen models generate`: a generator (registered, a run's, or a snapshot file) -> a shard set
that `data verify`, `data inspect` and a spec's `data.train` accept, its lineage on the card.

Why it is shaped this way:
- The same command gives the same bytes, whatever the worker count. The set is cut into shards
  of `shard_size` samples, fixed by N alone: sample i (seed `seed_base + i`; input i of a
  conditional model) is always in shard i // shard_size. Each image is the one
  `family.sample(sampler, 1, seed=...)` draws, as the registered pyfunc draws one per seed, so its
  noise does not depend on its batch-mates; images go through the sampler `--batch` at a time,
  each from its own seed (`Family.sample_seeds`). Shards and manifest match byte for byte between
  runs on the same kind of worker with the same `--batch` (float sums may differ in their last
  bit between a GPU and a CPU, between thread counts or batch sizes; diffusion's first DDIM step
  magnifies that to ±1 uint8 level in a few pixels); only the card's `created` time differs.
- W Ray actors each load the model once and take shards from a queue: a shard is one disjoint
  seed (or input) range, written by one actor as a one-shard set under a temporary prefix
  (`write_shards`: the checks and encoding of `data build`). Each asks for `--gpus-per-worker`
  GPUs and an equal share of the CPUs (jobs/eval/resources.py), and runs on its GPU when it has one.
- Nothing is visible at `--out` until the set is complete: the driver stages the whole set (shards,
  card, manifest) under the temporary prefix, then moves it into place with the manifest last
  (`swap_in`). `--overwrite` publishes the new set before the old one goes: the old set is moved
  to a named backup beside it (`.orbitgen-overwrite-backup`, with a journal of the swap's phase),
  the new one in, and the old one back if that fails; it is removed only once the new set is
  complete. A kill in between (where no handler runs) leaves the backup: the next `generate` at
  that --out restores the old set, or drops the backup when the new set was complete, and says so
  in one line (`recover_interrupted_swap`). On failure the temporary prefix goes, and so does a
  destination folder the command created.
"""
from __future__ import annotations

import io
import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import ray

from data_shards.card import CARD, MANIFEST, SKIPPED, DatasetCard, fingerprint, read_card, read_manifest, \
    write_manifest, write_whole
from data_shards.errors import InputExists, UserError
from data_shards.shard_reader import read_piece
from data_shards.sources import Sample
from data_shards.storage import filesystem, join, to_url
from data_shards.writer import publish, publishing, write_shards
from jobs.tracking.lineage import TAG_GENERATED, generated_summary, generated_tag
from jobs.tracking.versions import version_of_ref

CARD_KEY = "generated"               # the lineage's key in dataset.json
SHARD_SIZE = 256


@dataclass(frozen=True)
class ModelSource:
    """What MODEL named: the local snapshot and, for a registered model or a run, where it came from."""
    ref: str                       # as given
    snapshot: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None


@dataclass
class GenerateResult:
    url: str
    card: DatasetCard
    lineage: dict[str, Any]
    workers: int
    seconds: float


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[lo, hi) sample positions of each shard: fixed by N and the shard size, never by the workers."""
    return [(lo, min(lo + shard_size, n)) for lo in range(0, n, shard_size)]


def resolve_model(ref: str, dest: Path, client=None) -> ModelSource:
    """MODEL (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN_ID[/generator]`, a snapshot
    path) as a local snapshot plus its registry coordinates; bad refs raise UserError."""
    from mlflow.exceptions import MlflowException

    from jobs.tracking.model_refs import resolve_ref

    name = version = run_id = None
    canonical = ref
    try:
        if ref.startswith("models:/"):
            try:
                v = version_of_ref(client, ref)
            except UserError as e:
                raise UserError(f"MODEL {ref}: {e}") from None
            name, version, run_id = v.name, str(v.version), v.run_id
            canonical = f"models:/{name}/{version}"
        elif ref.startswith("runs:/"):
            run_id = ref.removeprefix("runs:/").split("/")[0]
            client.get_run(run_id)   # an unknown run is named here, not deep in a download
            canonical = ref if ref.count("/") > 1 else f"runs:/{run_id}/generator"
        snapshot = resolve_ref(canonical, dest, tracking_uri=client.tracking_uri if client else None)
    except (MlflowException, OSError) as e:   # no such run, artifact or file
        raise UserError(f"MODEL {ref}: {_first_line(e)}") from None
    return ModelSource(ref, snapshot, name, version, run_id)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def check_inputs(family, inputs: str | None, n: int | None) -> tuple[int, DatasetCard | None]:
    """The sample count and the input set's card; UserError when they do not fit the model."""
    if not family.conditional:
        if inputs:
            raise UserError(f"--inputs: this {family.name} model is unconditional: it draws from seeds, "
                            "leave --inputs out")
        if n is None:
            raise UserError("--n: how many images to draw (this model is unconditional)")
        return n, None
    keys = [k for k in ("cond", "mask") if k in family.data_keys]
    if not inputs:
        raise UserError(f"--inputs: this {family.name} model is conditional: give a shard set with "
                        f"{' and '.join(keys)} (e.g. one `orbitgen data build` made)")
    card = read_card(to_url(inputs))
    missing = [k for k in keys if k not in card.modalities]
    if missing:
        raise UserError(f"--inputs {inputs}: no {', '.join(missing)} in its samples (it has "
                        f"{', '.join(card.modalities)}); this {family.name} model needs {', '.join(keys)}")
    if (card.resolution, card.channels) != (family.resolution, family.channels):
        raise UserError(f"--inputs {inputs}: {card.channels}-channel {card.resolution}² images; this "
                        f"{family.name} model takes {family.channels}-channel {family.resolution}²")
    if n is not None and n > card.count:
        raise UserError(f"--n {n}: --inputs {inputs} holds {card.count} samples")
    return (card.count if n is None else n), card


def check_out(url: str, overwrite: bool) -> None:
    """A destination that already holds a shard set (or part of one) is refused without `overwrite`."""
    fs, root = filesystem(url)
    if not overwrite and fs.exists(root) and any(_is_set_file(p) for p in fs.ls(root, detail=False)):
        raise InputExists(f"--out {url} already holds a shard set; pick another --out or pass --overwrite")


def _is_set_file(path: str) -> bool:
    base = path.rstrip("/").rsplit("/", 1)[-1]
    return base in (CARD, MANIFEST, SKIPPED) or (base.startswith("shard-") and base.endswith(".tar"))


GPU_BATCH, CPU_BATCH = 64, 16   # images per sampler call when --batch is not given


def sample_images(family, sampler, seeds: list[int], inputs: dict | None = None):
    """Float NCHW images in [-1, 1], image i from `seeds[i]` (and row i of each of `inputs`): the
    image `family.sample(sampler, 1, seed=seeds[i], ...)` draws alone, drawn with its batch-mates
    in one forward (`Family.sample_seeds`; a family without its own draws one image a call)."""
    return family.sample_seeds(sampler, list(seeds), **(inputs or {}))


def draw(family, sampler, seeds: list[int], inputs: dict | None = None) -> np.ndarray:
    """`sample_images` as uint8 N×H×W×C, on the CPU."""
    from models.images import nchw_to_nhwc_numpy, to_uint8

    return nchw_to_nhwc_numpy(to_uint8(sample_images(family, sampler, seeds, inputs).cpu()))


@ray.remote(scheduling_strategy="SPREAD")   # one a node while nodes are free
class _Generator:
    """One worker: the model loaded once on its device; writes whole shards of a seed (input) range,
    drawing `batch` images a call."""

    def __init__(self, snapshot: bytes, env: dict[str, str], batch: int | None = None):
        from jobs.eval.resources import use_cpu_share, worker_device
        from models.snapshot import load_snapshot

        os.environ.update(env)
        self.device = worker_device()
        use_cpu_share()   # a thread per whole CPU of this worker
        self.family, self.sampler, _ = load_snapshot(io.BytesIO(snapshot), device=self.device)
        self.batch = batch or (GPU_BATCH if self.device.type == "cuda" else CPU_BATCH)

    def write(self, index: int, lo: int, hi: int, seed_base: int, tmp: str, inputs: list[tuple[str, int, int]]) -> dict:
        """Samples lo..hi-1 as a one-shard set under `tmp`; returns its manifest row, the shard's
        URL and the sample parts."""
        fam = self.family
        samples = self._conditional(lo, seed_base, inputs) if fam.conditional else self._drawn(lo, hi, seed_base)
        part = join(tmp, f"part-{index:06d}")
        card = write_shards(samples, part, layout="generated", resolution=fam.resolution, channels=fam.channels,
                            source="generated", shard_samples=hi - lo, progress=False)
        row = read_manifest(part).iloc[0]
        return {"index": index, "shard": row["url"], "samples": int(row["samples"]), "bytes": int(row["bytes"]),
                "sha256": row["sha256"], "modalities": card.modalities}

    def _drawn(self, lo: int, hi: int, seed_base: int) -> Iterator[Sample]:
        for start in range(lo, hi, self.batch):
            seeds = list(range(seed_base + start, seed_base + min(start + self.batch, hi)))
            for seed, image in zip(seeds, draw(self.family, self.sampler, seeds)):
                yield Sample(key=f"seed{seed:010d}", image=image, meta={"seed": seed})

    def _conditional(self, lo: int, seed_base: int, inputs: list[tuple[str, int, int]]) -> Iterator[Sample]:
        import torch

        from data_shards.decode import decode_sample, expected_shapes
        from models.images import to_float

        fam = self.family
        keys = tuple(k for k in ("cond", "mask") if k in fam.data_keys)
        shapes = expected_shapes(fam.resolution, fam.channels)

        def drawn(batch: list[dict], first: int) -> Iterator[Sample]:
            given = {k: torch.cat([to_float(torch.from_numpy(s[k]).permute(2, 0, 1)[None]) for s in batch])
                     .to(self.device) for k in keys}
            seeds = list(range(seed_base + first, seed_base + first + len(batch)))
            for s, seed, image in zip(batch, seeds, draw(fam, self.sampler, seeds, given)):
                yield Sample(key=s["__key__"], image=image, cond=s["cond"], mask=s.get("mask"),
                             meta={"input": s["__key__"], "seed": seed})

        pending, first = [], lo
        for url, a, b in inputs:
            for raw in read_piece(url, a, b):
                pending.append(decode_sample(raw, keys, shapes))
                if len(pending) == self.batch:
                    yield from drawn(pending, first)
                    pending, first = [], first + self.batch
        if pending:
            yield from drawn(pending, first)


def input_pieces(counts: list[int], urls: list[str], lo: int, hi: int) -> list[tuple[str, int, int]]:
    """Input positions lo..hi-1 of a shard set as (shard url, first, end) pieces of its shards."""
    pieces, start = [], 0
    for url, count in zip(urls, counts):
        a, b = max(lo - start, 0), min(hi - start, count)
        if a < b:
            pieces.append((url, a, b))
        start += count
    return pieces


def generate(model: ModelSource, n: int | None, out: str, *, workers: int = 1, inputs: str | None = None,
             seed_base: int = 0, shard_size: int = SHARD_SIZE, overwrite: bool = False, client=None,
             progress: bool = True, say: Callable[[str], None] = print, gpus_per_worker: float = 0.0,
             batch: int | None = None) -> GenerateResult:
    """Write the set at `out`; on a registered version, record it on the version (`record_on_version`).
    Each worker asks for `gpus_per_worker` GPUs (0: the CPU) and draws `batch` images a call
    (None: GPU_BATCH on a GPU, CPU_BATCH on the CPU)."""
    import time

    from models.snapshot import load_snapshot

    started = time.perf_counter()
    if workers < 1 or shard_size < 1 or seed_base < 0 or (n is not None and n < 1) or (batch is not None and batch < 1):
        raise UserError("--n, --workers, --shard-size and --batch must be >= 1, --seed-base >= 0")
    out = to_url(out).rstrip("/")
    recover_interrupted_swap(out, say)   # before the check: it may put an old set back
    check_out(out, overwrite)
    family, _, _ = load_snapshot(model.snapshot)
    n, input_card = check_inputs(family, inputs, n)
    ranges = shard_ranges(n, shard_size)
    workers = min(workers, len(ranges))
    lineage = {"model": model.ref, "name": model.name, "version": model.version, "run_id": model.run_id,
               "family": family.name, "n": n, "seeds": [seed_base, seed_base + n - 1], "shard_size": shard_size}
    if input_card is not None:
        lineage["inputs"] = {"url": to_url(inputs), "fingerprint": input_card.fingerprint}
    say(f"generating {n} images from {model.ref} ({family.name}) on {workers} workers → {out}")

    fs, root = filesystem(out)
    tmp = join(out, f".tmp-generate-{uuid.uuid4().hex}")
    aside = filesystem(backup_of(out))[1]   # an --overwrite's old set while the new one moves in
    made_root = not fs.exists(root)
    done = False
    try:
        rows = _write_shards(model, ranges, seed_base, tmp, workers, inputs, progress,
                             gpus_per_worker=gpus_per_worker, batch=batch)
        card = DatasetCard(layout=f"generated:{family.name}", modalities=rows[0]["modalities"],
                           resolution=family.resolution, channels=family.channels, count=n,
                           fingerprint=fingerprint([r["sha256"] for r in rows]), shards=len(rows), source=model.ref)
        staged = join(tmp, "set")   # the whole new set, before anything at --out changes
        names = []
        for r in rows:
            names.append(f"shard-{r['index']:06d}.tar")
            fs.mv(filesystem(r["shard"])[1], join(filesystem(staged)[1], names[-1]))
        write_whole(fs, join(filesystem(staged)[1], CARD),
                    json.dumps(card.model_dump(mode="json") | {CARD_KEY: lineage}, indent=2).encode())
        write_manifest(staged, [{"url": name, **{k: r[k] for k in ("samples", "bytes", "sha256")}}
                                for name, r in zip(names, rows)])
        with publishing(out, fs, root):
            check_out(out, overwrite)   # again: another command may have written there meanwhile
            swapped = False
            try:
                swap_in(fs, staged, root, names, aside)
                swapped = True
                _kill_point("published")
            finally:   # under the lock: the next command's swap uses the same backup folder
                _remove_backup(fs, aside, swapped)
        done = True
    except BaseException:
        if made_root and fs.exists(root):
            fs.rm(root, recursive=True)
        raise
    finally:
        _remove_staging(fs, tmp)
    if model.version is not None and client is not None:
        record_on_version(client, model.name, model.version,
                          {"url": out, "n": n, "seeds": lineage["seeds"], "fingerprint": card.fingerprint})
    return GenerateResult(out, card, lineage, workers, time.perf_counter() - started)


def _remove_staging(fs, tmp: str) -> None:
    """The temporary prefix, whatever is left there."""
    fs.invalidate_cache()   # s3fs lists from a cache: what was moved out of `tmp` may still be listed there
    try:
        fs.rm(filesystem(tmp)[1], recursive=True)
    except FileNotFoundError:   # nothing left there (an object store has no empty folders)
        pass


def _remove_backup(fs, aside: str, done: bool) -> None:
    """An --overwrite's backup: removed once the new set is in place, or once nothing of the old set
    is in it (it moved back); an old set that could not be moved back stays (the error said where)."""
    fs.invalidate_cache()
    if not fs.exists(aside) or (not done and _set_files(fs, aside)):
        return
    _drop_backup(fs, aside)


def _drop_backup(fs, aside: str) -> None:
    """The backup's set files first, then its journal: a kill in between leaves a journal that still
    says `publishing` beside the complete new set, which the next run reads as "drop the backup"."""
    try:
        for name in _set_files(fs, aside):
            fs.rm(join(aside, name))
        fs.rm(aside, recursive=True)
    except FileNotFoundError:   # an object store has no empty folders
        pass


def swap_in(fs, staged: str, root: str, names: list[str], aside: str) -> None:
    """Publish the complete set at `staged` into `root` (its shards, card, and last its manifest),
    replacing a set there (--overwrite): the old one is moved `aside` (`backup_of(root)`) first (its
    manifest first, so it never looks complete half-moved) and moved back if the new one cannot be
    published; the caller removes `aside` once this returns. A failure leaves the old set whole,
    or no set. A kill (no `except` runs) leaves the old set in `aside` with a journal saying how
    far the swap went: the next `generate` at this --out puts it back (`recover_interrupted_swap`)."""
    old = sorted((p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if _is_set_file(p)),
                 key=lambda name: name != MANIFEST) if fs.exists(root) else []
    if old:
        fs.makedirs(aside, exist_ok=True)
        _journal(fs, aside, MOVING_ASIDE)   # root still holds what has not moved yet
    publish(fs, root, aside, old)   # all or none of the old set's files move
    if old:
        _journal(fs, aside, PUBLISHING)     # root holds nothing of the old set, perhaps part of the new
    try:
        _kill_point("swap")
        publish(fs, staged, root, [*names, CARD, MANIFEST])
    except BaseException:
        try:
            publish(fs, aside, root, old[1:] + old[:1])   # back, the manifest last
        except Exception as e:
            raise OSError(f"--out {root}: could not publish the new set, nor move the old one back ({e}); "
                          f"the old set's files are in {aside}: move them back into {root}") from None
        raise


# The backup of the set an --overwrite replaces, and its journal: what the next run needs to know
# to restore it after a kill (SIGKILL, OOM, a lost node) in the swap, where no `except` runs.
BACKUP = ".orbitgen-overwrite-backup"
JOURNAL = "swap.json"
MOVING_ASIDE, PUBLISHING, RESTORING = "moving-aside", "publishing", "restoring"


def backup_of(root: str) -> str:
    return join(root, BACKUP)


def _journal(fs, aside: str, phase: str) -> None:
    write_whole(fs, join(aside, JOURNAL), json.dumps({"phase": phase}).encode())


def _kill_point(name: str) -> None:
    """Tests of a hard kill: with ORBITGEN_TEST_KILL_AT=`name`, the process SIGKILLs itself here."""
    if os.environ.get("ORBITGEN_TEST_KILL_AT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def recover_interrupted_swap(out: str, say: Callable[[str], None] = print) -> str | None:
    """Finish what a killed `--overwrite` left at `out`, under the publishing lock; returns the line
    said, None when there was nothing to do. The old set waits in `backup_of(out)`; its journal says
    where the swap stopped:
      moving-aside  the old set is split between --out and the backup: the backup's files go back;
      publishing    --out holds part of the new set, or all of it: all of it (its manifest, moved
                    last, is there) stays and the backup goes; else the new set's files go and the
                    old set comes back (`restoring` is journalled between the two, so a kill
                    during the restore never removes restored files).
    Each step can be cut short and run again."""
    fs, root = filesystem(out)
    aside = filesystem(backup_of(out))[1]
    if not fs.exists(aside):
        return None
    _clear_dead_lock(root, say)
    with publishing(out, fs, root):
        fs.invalidate_cache()
        if not fs.exists(aside):   # another command recovered it meanwhile
            return None
        try:
            phase = json.loads(fs.cat_file(join(aside, JOURNAL)))["phase"]
        except (FileNotFoundError, ValueError, KeyError):
            phase = MOVING_ASIDE   # killed before the journal's first write: nothing of the set moved yet
        backed = _set_files(fs, aside)
        if phase == PUBLISHING and MANIFEST in _set_files(fs, root):
            _drop_backup(fs, aside)
            line = f"--out {out}: an earlier --overwrite was stopped after publishing its new set; removed the old set's backup"
        else:
            if phase == PUBLISHING:
                for name in _set_files(fs, root):   # the part of the new set that came in
                    fs.rm(join(root, name))
                _journal(fs, aside, RESTORING)
            publish(fs, aside, root, sorted(backed, key=lambda name: name == MANIFEST))   # the manifest last
            _drop_backup(fs, aside)
            line = (f"--out {out}: an earlier --overwrite was stopped while swapping sets; restored the old set "
                    f"from {BACKUP}")
    say(line)
    return line


def _set_files(fs, folder: str) -> list[str]:
    fs.invalidate_cache()
    if not fs.exists(folder):
        return []
    return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False) if _is_set_file(p)]


def _clear_dead_lock(root: str, say: Callable[[str], None]) -> None:
    """A local publishing lock whose holder, a process of this host, is gone (it was killed in the
    swap) is removed, said in one line; any other lock is left to `publishing`'s wait."""
    import socket

    from data_shards.writer import LOCK

    lock = os.path.join(root, LOCK)
    try:
        host, pid = Path(lock).read_text().split()
    except (OSError, ValueError):
        return
    if host != socket.gethostname() or _alive(int(pid)):
        return
    try:
        os.unlink(lock)
        say(f"removed {lock}, left by process {pid}, which was stopped while publishing")
    except FileNotFoundError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


def _write_shards(model: ModelSource, ranges, seed_base: int, tmp: str, workers: int, inputs: str | None,
                  progress: bool, *, gpus_per_worker: float = 0.0, batch: int | None = None) -> list[dict]:
    """Every shard written under `tmp` by `workers` actors taking shards from a queue; their rows, in order."""
    from ray.util import ActorPool
    from tqdm import tqdm

    from jobs.eval.resources import cpu_share, refuse_gpu_ask
    from jobs.placement import Place, refuse_unshared
    from jobs.runtime.env import forwarded_env
    from jobs.runtime.ray_session import ensure_ray

    manifest = read_manifest(to_url(inputs)) if inputs else None
    cluster = ensure_ray()
    refuse_gpu_ask(gpus_per_worker, workers, cluster, "generation workers")
    # The actors write the shards and read the inputs themselves: on a cluster, where every node reaches.
    refuse_unshared(cluster, [Place("--out", tmp), Place("--inputs", inputs or "")])
    snapshot = ray.put(Path(model.snapshot).read_bytes())
    cpus = cpu_share(list(cluster.nodes), workers)
    actors = [_Generator.options(num_cpus=cpus, num_gpus=gpus_per_worker).remote(snapshot, forwarded_env(), batch)
              for _ in range(workers)]

    def task(actor, item):
        index, (lo, hi) = item
        pieces = input_pieces(list(manifest.samples), list(manifest.url), lo, hi) if manifest is not None else []
        return actor.write.remote(index, lo, hi, seed_base, tmp, pieces)

    rows = []
    try:
        with tqdm(total=ranges[-1][1], desc="generating", unit="img", file=sys.stderr, disable=not progress) as bar:
            for row in ActorPool(actors).map_unordered(task, list(enumerate(ranges))):
                rows.append(row)
                bar.update(row["samples"])
    finally:
        for a in actors:
            ray.kill(a)
    return sorted(rows, key=lambda r: r["index"])


def record_on_version(client, name: str, version: str, entry: dict) -> None:
    """Records `entry` (a set made from the version) in its own version tag, one write with no read
    before it: two `generate`s finishing at once both stay recorded (jobs/tracking/lineage.py).
    Then the old single-list tag is rebuilt from the per-set tags for its readers; it is a summary,
    which a writer at the same instant may leave one set short until the next write."""
    from mlflow.exceptions import MlflowException

    import datetime

    entry = {**entry, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")}
    key, value = generated_tag(entry)
    client.set_model_version_tag(name, version, key, value)
    try:
        tags = client.get_model_version(name, version).tags or {}
        client.set_model_version_tag(name, version, TAG_GENERATED, generated_summary(tags))
    except MlflowException:
        pass   # the summary only (two first writes of it at once: one is refused); the set is recorded
