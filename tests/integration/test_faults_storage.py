"""The S3 server goes away mid-stream and comes back: nothing is lost, the retries are counted.

The server is moto (the `s3_server` fixture) behind tests/outage.py's proxy, which refuses and
resets every connection for OUTAGE_S seconds: what clients see of a stopped S3 server, without
moto losing its in-memory buckets (see tests/outage.py for why not SIGSTOP). Measured here, the
reader before storage.Retries (3 tries) also came through 30 s and 60 s outages of this kind with
no sample lost, on botocore's own retries of a refused connection, but it counted nothing and
its bound was a number of tries whose length depends on the fault; what these tests hold the
reader to is every sample exactly once, and the retries counted and logged in the run.
"""
from __future__ import annotations

import os
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

import pytest
from mlflow.tracking import MlflowClient
from outage import OutageProxy

from data_shards import stream
from data_shards.stream import batches_per_epoch, image_stream
from data_shards.synthetic import crater_field
from data_shards.writer import write_shards
from jobs.train.driver import run_job
from jobs.spec import SPECS_DIR, load_spec

pytestmark = pytest.mark.integration
COUNT, RES, SHARD, BATCH = 192, 16, 8, 8
# Longer than botocore's own retries of one request (legacy mode: at most 1+2+4+8 s of backoff),
# so that the outage reaches storage.Retries and is counted; a shorter one is often absorbed unseen.
OUTAGE_S = 20.0


@pytest.fixture(scope="module")
def shards_behind_proxy(s3_server):
    """(url, proxy): 192 crater images in 24 shards on the S3 server, read through the proxy."""
    url = "s3://orbitgen/shards/outage"
    write_shards(crater_field(COUNT, RES, channels=1, seed=5), url, layout="synthetic:craters", resolution=RES,
                 channels=1, source="test", shard_samples=SHARD, progress=False)
    upstream = urlsplit(s3_server.url)
    proxy = OutageProxy((upstream.hostname, upstream.port))
    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = proxy.url   # run_job forwards it to the Ray workers
    yield url, proxy
    os.environ["AWS_ENDPOINT_URL"] = saved
    proxy.close()


def test_two_ranks_read_every_sample_of_the_epoch_once_through_an_outage(shards_behind_proxy):
    url, proxy = shards_behind_proxy
    per_epoch = batches_per_epoch(url, 2, BATCH)   # 12 batches per rank
    # One DataLoader worker per rank: its retries reach retries() riding along with the batches.
    ranks = [image_stream(url, rank=r, world_size=2, batch_size=BATCH, seed=0, shuffle_buffer=16, num_workers=1)
             for r in range(2)]
    keys: list[str] = [k for it in ranks for k in next(it)["__key__"]]
    before = stream.retries()
    down = threading.Thread(target=proxy.outage, args=(OUTAGE_S,))
    started = time.monotonic()
    down.start()
    for _ in range(per_epoch - 1):
        for it in ranks:
            keys += next(it)["__key__"]
    down.join()
    retried = stream.retries() - before
    print(f"outage {OUTAGE_S:g} s: epoch read in {time.monotonic() - started:.1f} s, {retried} retries")

    seen = Counter(keys)
    assert sorted(seen) == [f"crater-{i:06d}" for i in range(COUNT)], "samples lost"
    assert set(seen.values()) == {1}, f"samples seen twice: {[k for k, n in seen.items() if n > 1]}"
    assert retried > 0, "the outage did not hit a read"


def test_training_run_completes_through_an_outage_and_logs_its_retries(shards_behind_proxy, ray_local, tmp_path):
    url, proxy = shards_behind_proxy
    runs = tmp_path / "runs"   # checkpoints and tracking stay local: the fault is in the data's store
    steps = batches_per_epoch(url, 2, BATCH // 2)   # one epoch
    spec = load_spec(SPECS_DIR / "quickstart.yaml", [
        f"workdir={tmp_path}", f"data.train={url}", f"data.resolution={RES}", "data.shuffle_buffer=16",
        "data.loader_workers=0", "model.nz=16", "model.ngf=8", "model.ndf=8", f"train.batch={BATCH}",
        f"train.steps={steps}", "train.log_every=1", "checkpoint.every_steps=4", f"checkpoint.storage={runs}",
        "eval.num_samples=32", "tracking.registry_model=null", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])

    def outage_after_first_checkpoint() -> None:   # the workers are streaming by then
        deadline = time.monotonic() + 240
        while not any(runs.glob("*/checkpoint_*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        proxy.outage(OUTAGE_S)

    down = threading.Thread(target=outage_after_first_checkpoint, daemon=True)
    down.start()
    result = run_job(spec, say=print)
    down.join()

    client = MlflowClient(result.tracking_uri)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert result.metrics["steps_per_rank"] == [steps, steps]
    retries = [m.value for m in client.get_metric_history(result.run_id, "data_retries")]
    print(f"outage {OUTAGE_S:g} s during training: data_retries logged {retries}")
    assert retries and retries[-1] > 0 and retries == sorted(retries), retries
    assert result.metrics["data_retries"] == retries[-1]
    assert max(m.value for m in client.get_metric_history(result.run_id, "data_skipped")) == 0
