"""The S3 publish lock against the loopback S3 server (`s3_server`, moto, which honours
`If-None-Match: *` as S3 does): two builds to one s3:// destination at once publish one set (the
other refuses in one line); a lease that ran out is taken over, a live one is kept by renewal and
refused; a holder never removes a successor's lock; a write to a bucket that does not exist
names the destination. Sets are a few 8² images: each test takes seconds."""
from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from data_shards import writer
from data_shards.card import write_whole
from data_shards.errors import InputExists, InputNotFound
from data_shards.publish_lock import ObjectLock, publish_lock
from data_shards.storage import filesystem
from data_shards.synthetic import crater_field
from data_shards.verify import verify
from data_shards.writer import LOCK, write_shards

pytestmark = pytest.mark.integration


@pytest.fixture
def dest(s3_server) -> str:
    return f"s3://orbitgen/publish-lock/{uuid.uuid4().hex[:8]}"


def build(dest: str, seed: int):
    return write_shards(crater_field(4, 8, 1, seed), dest, layout="synthetic:craters", resolution=8, channels=1,
                        source=f"seed={seed}", shard_samples=2, progress=False)


def lock_of(dest: str) -> tuple:
    fs, root = filesystem(dest)
    return fs, root, f"{root}/{LOCK}"


def plant_lease(dest: str, holder: str, lease_s: float) -> None:
    fs, _, path = lock_of(dest)
    fs.pipe_file(path, json.dumps({"holder": holder, "lease_s": lease_s}).encode())


def test_two_builds_at_once_publish_one_set_and_the_other_refuses_in_one_line(dest, monkeypatch):
    real_publish = writer.publish

    def slow_publish(*args):   # both builds staged and checked before either moves a file (without a lock)
        time.sleep(1.0)
        real_publish(*args)

    monkeypatch.setattr(writer, "publish", slow_publish)
    outcomes: dict[int, object] = {}

    def run(seed: int):
        try:
            outcomes[seed] = build(dest, seed)
        except Exception as e:
            outcomes[seed] = e

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    refused = [o for o in outcomes.values() if isinstance(o, Exception)]
    published = [o for o in outcomes.values() if not isinstance(o, Exception)]
    assert len(published) == 1 and len(refused) == 1, outcomes
    assert isinstance(refused[0], InputExists) and "other content" in str(refused[0]) and "\n" not in str(refused[0])
    report = verify(dest)
    assert report.ok and published[0].fingerprint == writer.read_card(dest).fingerprint
    fs, root, path = lock_of(dest)
    fs.invalidate_cache()
    assert not fs.exists(path) and not [p for p in fs.ls(root, detail=False) if "/." in p]


def test_a_lease_that_ran_out_is_taken_over(dest):
    plant_lease(dest, "a build that died", lease_s=1)
    time.sleep(2.2)   # past the lease by the store's clock (whole seconds)
    fs, root, path = lock_of(dest)
    with publish_lock(dest, fs, root, name=LOCK, wait_s=5, poll_s=0.1, lease_s=5):
        assert json.loads(fs.cat_file(path))["holder"] != "a build that died"
    fs.invalidate_cache()
    assert not fs.exists(path)


def test_a_live_lease_is_refused_in_one_line_naming_its_holder(dest):
    plant_lease(dest, "host-b:77:abc", lease_s=600)
    fs, root, path = lock_of(dest)
    start = time.monotonic()
    with pytest.raises(InputExists) as e:
        with publish_lock(dest, fs, root, name=LOCK, wait_s=0.5, poll_s=0.1, lease_s=0.4):
            pass
    message = str(e.value)
    assert time.monotonic() - start < 5 and "\n" not in message
    assert dest in message and "host-b:77:abc" in message and LOCK in message
    assert json.loads(fs.cat_file(path))["holder"] == "host-b:77:abc"   # left alone
    fs.rm(path)


def test_a_holder_renews_its_lease_so_a_waiter_does_not_take_it_over(dest):
    fs, root, path = lock_of(dest)
    # The store's clock counts whole seconds: a 2 s lease, renewed every 0.7 s, never looks run out.
    with publish_lock(dest, fs, root, name=LOCK, wait_s=0.5, poll_s=0.1, lease_s=2.0):
        time.sleep(3.2)   # past the lease: without renewal it would have run out
        with pytest.raises(InputExists):
            with publish_lock(dest, fs, root, name=LOCK, wait_s=0.5, poll_s=0.1, lease_s=0.4):
                pass
    fs.invalidate_cache()
    assert not fs.exists(path)


def test_a_holder_whose_lock_was_taken_over_leaves_the_successors_lock(dest):
    fs, root, path = lock_of(dest)
    lock = ObjectLock(dest, fs, path, lease_s=30)
    assert lock.take() is True
    plant_lease(dest, "the successor", lease_s=30)   # as a takeover would write it
    lock.release()
    assert json.loads(fs.cat_file(path))["holder"] == "the successor"
    fs.rm(path)


def test_writes_to_a_bucket_that_does_not_exist_name_the_destination(s3_server):
    set_url = "s3://no-such-bucket-pl/sets/a"
    with pytest.raises(InputNotFound) as e:
        build(set_url, seed=1)
    assert str(e.value).startswith(f"{set_url}: the bucket 'no-such-bucket-pl' does not exist")
    fs, _ = filesystem(set_url)
    with pytest.raises(InputNotFound, match=r"^s3://no-such-bucket-pl/sets/a/dataset\.json: the bucket"):
        write_whole(fs, "no-such-bucket-pl/sets/a/dataset.json", b"{}")
