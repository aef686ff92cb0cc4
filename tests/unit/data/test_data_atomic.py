"""Nothing half-written by `data build`: a set is complete only with a manifest that reads whole,
a failure at any step leaves the destination as it was, partial sets are refused, and one build at
a time publishes into a folder."""
from __future__ import annotations

import os
import threading
import time

import pytest
from shard_helpers import write_craters

from data_shards import card as card_module
from data_shards import writer
from data_shards.card import CARD, MANIFEST, IncompleteSet, read_card, read_manifest, write_whole
from data_shards.errors import InputExists
from data_shards.storage import filesystem
from data_shards.verify import verify
from data_shards.writer import LOCK, PartialSet, publishing


def tree(folder) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes): what 'as it was' compares."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), folder) + "/"] = b""
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


def test_a_truncated_manifest_is_an_incomplete_set_and_refused_as_a_destination(tmp_path):
    dest = tmp_path / "set"
    write_craters(dest, count=12, shard_samples=5)
    whole = (dest / MANIFEST).read_bytes()
    (dest / MANIFEST).write_bytes(whole[:len(whole) // 2])   # a crash mid-write, as the old writer allowed
    with pytest.raises(IncompleteSet, match=f"{MANIFEST} does not read whole") as e:
        read_manifest(str(dest))
    assert "\n" not in str(e.value) and str(dest) in str(e.value)
    before = tree(tmp_path)
    with pytest.raises(PartialSet) as e:    # neither "already built" nor written into
        write_craters(dest, count=12, shard_samples=5)
    message = str(e.value)
    assert "\n" not in message and str(dest) in message and "shard-000000.tar" in message
    assert "does not read whole" in message
    assert tree(tmp_path) == before


def test_a_folder_with_shards_but_no_manifest_is_refused_naming_what_is_there(tmp_path):
    dest = tmp_path / "set"
    dest.mkdir()
    (dest / "shard-000000.tar").write_bytes(b"left by an interrupted build")
    (dest / "notes.txt").write_text("the user's")
    before = tree(tmp_path)
    with pytest.raises(PartialSet, match=r"part of a shard set \(shard-000000.tar; no manifest: a build cut short\?\)"):
        write_craters(dest, count=5)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("files, says", [
    ({"dataset.json": '{"resolution": [256, 256], "labels": null}', "00000/img00000000.png": "png"},
     "dataset.json that is not an orbitgen card"),   # StyleGAN's dataset_tool output: ours would replace its file
    ({"train-0000.tar": "tar", "train-0001.tar": "tar"}, "tar files that are not orbitgen shards (train-0000.tar"),
])
def test_a_folder_holding_another_tools_set_is_refused(tmp_path, files, says):
    dest = tmp_path / "set"
    for name, text in files.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_text(text)
    before = tree(tmp_path)
    with pytest.raises(PartialSet) as e:
        write_craters(dest, count=5)
    assert says in str(e.value) and str(dest) in str(e.value) and "\n" not in str(e.value)
    assert tree(tmp_path) == before


def test_a_folder_of_other_files_is_written_into(tmp_path):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "README.md").write_text("about this set")
    write_craters(tmp_path / "set", count=5)
    assert verify(str(tmp_path / "set")).ok and (tmp_path / "set" / "README.md").read_text() == "about this set"


def test_a_failure_while_writing_the_manifest_leaves_the_destination_as_it_was(tmp_path, monkeypatch):
    """The old writer moved the shards and wrote the card before the manifest: a failure there left
    shards and card without a manifest."""
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "README").write_text("kept")
    before = tree(tmp_path)

    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "write_manifest", full_disk)
    with pytest.raises(OSError) as e:
        write_craters(tmp_path / "set", count=12, shard_samples=5)
    assert e.value.errno == 28 and "\n" not in str(e.value) and str(tmp_path / "set") in str(e.value)
    assert tree(tmp_path) == before


def test_a_failure_while_moving_files_in_takes_back_what_was_moved(tmp_path, monkeypatch):
    fs, _ = filesystem(str(tmp_path))
    real_mv, calls = fs.mv, []

    def mv_failing_at_the_card(src, dst, **kw):
        calls.append(dst)
        if dst.endswith(CARD):
            raise PermissionError(13, "Permission denied", dst)
        return real_mv(src, dst, **kw)

    monkeypatch.setattr(type(fs), "mv", lambda self, *a, **kw: mv_failing_at_the_card(*a, **kw))
    with pytest.raises(PermissionError) as e:
        write_craters(tmp_path / "set", count=12, shard_samples=5)
    assert len(calls) == 4 and "\n" not in str(e.value)   # 3 shards moved in, then the card failed
    assert tree(tmp_path) == {}   # the folder it created went too


def test_folders_the_build_created_go_when_it_fails(tmp_path):
    def broken():
        from data_shards.synthetic import crater_field
        yield from crater_field(3, 16)
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        writer.write_shards(broken(), str(tmp_path / "a" / "b" / "set"), layout="x", resolution=16, channels=1,
                            source="t", progress=False)
    assert tree(tmp_path) == {}


def test_a_build_waits_for_another_publishing_and_then_sees_its_set(tmp_path):
    """The check that nobody finished meanwhile runs under the publish lock: a set published while
    a build waits for the lock is seen (other content: refused; nothing of the waiting build stays)."""
    dest = tmp_path / "set"
    write_craters(tmp_path / "other", count=6, seed=1)
    dest.mkdir()
    fs, root = filesystem(str(dest))
    outcome: list = []
    with publishing(str(dest), fs, root):
        assert (dest / LOCK).exists()
        t = threading.Thread(target=lambda: outcome.append(_try(lambda: write_craters(dest, count=6, seed=2))))
        t.start()
        staged = [False]
        for _ in range(500):   # until the build has staged its whole set and so stands at the lock
            staged[0] = bool(list(dest.glob(f".tmp-*/{MANIFEST}")))
            if staged[0]:
                break
            time.sleep(0.02)
        time.sleep(0.2)
        assert staged[0] and t.is_alive()   # waits for the lock
        for name in sorted(os.listdir(tmp_path / "other")):   # the other build publishes its set
            os.rename(tmp_path / "other" / name, dest / name)
    t.join(timeout=30)
    assert isinstance(outcome[0], InputExists) and "other content" in str(outcome[0])
    assert not (dest / LOCK).exists() and not [n for n in os.listdir(dest) if n.startswith(".")]
    assert read_card(str(dest)).source == "test seed=1" and verify(str(dest)).ok


def _try(fn):
    try:
        return fn()
    except Exception as e:   # handed to the test thread
        return e


def test_two_concurrent_builds_of_one_set_both_succeed_with_one_set(tmp_path):
    dest = tmp_path / "set"
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(_try(lambda: write_craters(dest, count=20))))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 2 and all(not isinstance(r, Exception) for r in results), results
    assert results[0].fingerprint == results[1].fingerprint
    assert sorted(os.listdir(dest)) == [CARD, MANIFEST, "shard-000000.tar", "shard-000001.tar"]
    assert verify(str(dest)).ok


def test_write_whole_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    target.write_bytes(b"old")
    fs, _ = filesystem(str(tmp_path))

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(card_module.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        write_whole(fs, str(target), b"new" * 1000)
    assert tree(tmp_path) == {"f.json": b"old"}
    monkeypatch.undo()
    write_whole(fs, str(target), b"new")
    assert tree(tmp_path) == {"f.json": b"new"}
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())   # as open() makes it, not 0o600


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_on_an_object_store_a_failed_publish_takes_back_what_it_moved(monkeypatch):
    """No lock there: files move one PUT at a time, the manifest last, and go again on failure."""
    import uuid

    from fsspec.implementations.memory import MemoryFileSystem

    url = f"memory://atomic-{uuid.uuid4().hex}/set"
    fs, root = filesystem(url)
    real_mv = MemoryFileSystem.mv

    def mv(self, src, dst, **kw):
        if dst.endswith(MANIFEST):
            raise ConnectionResetError(104, "Connection reset by peer")
        return real_mv(self, src, dst, **kw)

    monkeypatch.setattr(MemoryFileSystem, "mv", mv)
    with pytest.raises(ConnectionResetError):
        write_craters(url, count=12, shard_samples=5)
    assert not fs.exists(root) or fs.find(root) == []
    monkeypatch.undo()
    write_craters(url, count=12, shard_samples=5)
    assert verify(url).ok and sorted(p.rsplit("/", 1)[-1] for p in fs.find(root)) == \
        [CARD, MANIFEST, "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
