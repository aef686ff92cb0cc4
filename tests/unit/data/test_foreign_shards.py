"""Shards made elsewhere (plain `webdataset.ShardWriter` sets) are adopted: card, reads, sizes, verify."""
from __future__ import annotations

import glob
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_shards import adopt as adopting
from data_shards.adopt import adopt, expand_braces, resolve
from data_shards.card import ADOPTED_PREFIX, read_card, read_manifest
from data_shards.decode import CorruptSample, decode_sample
from data_shards.errors import EnvironmentProblem, InputNotFound, UserError
from data_shards.stream import image_stream, iterate_once
from data_shards.verify import verify


def encoded(a: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(buf, format=fmt)
    return buf.getvalue()


def images(n: int, side: int = 16, bands: int = 1, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (side, side, bands), np.uint8) for _ in range(n)]


def shard_writer_set(folder: Path, arrays, per_shard: int = 5, name: str = "shard") -> list[str]:
    """png + cls samples written by plain webdataset, as another project would: no dataset.json."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / f"{name}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, a in enumerate(arrays):
            sink.write({"__key__": f"tile{i:04d}", "png": encoded(a), "cls": i % 3})
    return sorted(glob.glob(str(folder / f"{name}-*.tar")))


def flip_byte(path: str, offset: int) -> None:
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0xFF
    Path(path).write_bytes(bytes(data))


@pytest.mark.parametrize("pattern", ["s3://b/x/shard-{000000..000012}.tar", "a{1..3}b{x,y}c", "p-{09..11}.tar",
                                     "n{5..2}", "s{0..10..3}", "f-{a,bb,}.tar", "plain.tar", "x{}y"])
def test_brace_expansion_agrees_with_the_braceexpand_package(pattern):
    from braceexpand import braceexpand   # webdataset's own dependency: an independent implementation

    assert expand_braces(pattern) == list(braceexpand(pattern))


def test_brace_expansion_refuses_nesting_and_huge_patterns():
    with pytest.raises(UserError, match="nested or unbalanced"):
        expand_braces("a{1,{2,3}}")
    with pytest.raises(UserError, match="more than the 1,000 allowed"):
        expand_braces("s-{0..99}-{0..99}.tar", limit=1000)


def test_a_folder_of_plain_tars_is_adopted_read_and_verified(tmp_path):
    arrays = images(12)
    shards = shard_writer_set(tmp_path / "theirs", arrays)
    adopted = resolve(str(tmp_path / "theirs"))
    card = adopted.card
    assert adopted.written and "beside the shards" in adopted.note and (tmp_path / "theirs" / "dataset.json").exists()
    assert (card.layout, card.modalities, card.resolution, card.channels, card.count, card.shards) == \
        ("webdataset", ["image", "cls"], 16, 1, 12, 3)
    assert card.members == {"image": ["png"], "cls": ["cls"]} and card.shards_url is None and not card.resize
    # the fingerprint `data build` computes: sha256 over the shards' sha256 hex digests, in order
    digests = "".join(hashlib.sha256(Path(s).read_bytes()).hexdigest() for s in shards)
    assert card.fingerprint == hashlib.sha256(digests.encode()).hexdigest()

    batch = next(iterate_once(adopted.url, batch_size=12, keys=("image", "cls")))
    assert batch["__key__"] == [f"tile{i:04d}" for i in range(12)]
    assert all(np.array_equal(batch["image"][i].permute(1, 2, 0).numpy(), a) for i, a in enumerate(arrays))
    assert batch["cls"].tolist() == [i % 3 for i in range(12)]
    it = image_stream(adopted.url, rank=0, world_size=1, batch_size=4, seed=0, num_workers=0)
    assert tuple(next(it)["image"].shape) == (4, 1, 16, 16)
    assert verify(adopted.url).ok

    again = resolve(str(tmp_path / "theirs"))
    assert not again.written and again.card.created == card.created   # reused: names and sizes match

    with tarfile.open(shards[1]) as tar:   # same size, other content: `data verify` names the shard
        offset = tar.getmember("tile0005.png").offset_data
    flip_byte(shards[1], offset + 40)
    report = verify(resolve(str(tmp_path / "theirs"), refresh=False).url)
    assert any("shard-000001.tar: sha256 differs from the manifest" in str(p) for p in report.problems)

    shard_writer_set(tmp_path / "theirs", images(3, seed=1), name="zz-more")   # a shard added: adopted again
    grown = resolve(str(tmp_path / "theirs"))
    assert grown.written and "changed since" in grown.note and grown.card.count == 15
    assert "1 image unreadable" in grown.note   # the tampered one: counted, skipped when read


def test_a_brace_pattern_gets_its_card_in_a_hidden_folder_beside_the_shards(tmp_path):
    shard_writer_set(tmp_path / "theirs", images(15), per_shard=5)
    pattern = str(tmp_path / "theirs" / "shard-{000000..000001}.tar")   # two of the three shards
    adopted = resolve(pattern)
    assert Path(adopted.url[len("file://"):]).name.startswith(ADOPTED_PREFIX)
    assert adopted.card.count == 10 and adopted.card.shards_url == f"file://{tmp_path}/theirs"
    assert read_card(pattern).fingerprint == adopted.card.fingerprint   # readers find it from the pattern
    assert [u.rsplit("/", 1)[-1] for u in read_manifest(pattern).url] == ["shard-000000.tar", "shard-000001.tar"]
    assert verify(pattern).ok

    with pytest.raises(InputNotFound, match=r"1 of its 3 shards do not exist, e\.g\. .*shard-000009\.tar"):
        resolve(str(tmp_path / "theirs" / "shard-{000000,000001,000009}.tar"))


def test_common_member_names_and_orbitgen_old_ones_read(tmp_path):
    rgb = images(1, bands=3, seed=2)[0]
    six = images(1, bands=6, seed=3)[0]
    for fmt, part in (("PNG", "png"), ("WEBP", "webp"), ("TIFF", "tif"), ("JPEG", "jpg"), ("JPEG", "jpeg")):
        data = encoded(rgb, fmt)
        out = decode_sample({"__key__": "k", part: data}, ("image",), {"image": (16, 16, 3)})
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))   # PIL's own decode of the same bytes
        assert np.array_equal(out["image"], expected), part
    npy = io.BytesIO()
    np.save(npy, six)
    assert np.array_equal(decode_sample({"__key__": "k", "npy": npy.getvalue()}, ("image",))["image"], six)
    gray = images(1)[0]
    pair = {"__key__": "k", "png": encoded(rgb), "cond.jpg": encoded(rgb, "JPEG"), "mask.png": encoded(gray)}
    out = decode_sample(pair, ("cond", "mask", "image"), {"image": (16, 16, 3), "cond": (16, 16, 3), "mask": (16, 16, 1)})
    assert np.array_equal(out["image"], rgb) and np.array_equal(out["mask"], gray) and out["cond"].shape == (16, 16, 3)
    old = {"__key__": "k", "image.png": encoded(gray), "cond.png": encoded(gray), "cls": b"2", "json": b"{}"}
    out = decode_sample(old, ("image", "cond", "cls", "json"))
    assert np.array_equal(out["image"], gray) and out["cls"] == 2 and out["json"] == {}


def test_orbitgen_writes_the_common_names_that_tarfile_and_webdataset_read(tmp_path):
    import webdataset as wds
    from shard_helpers import write_craters

    write_craters(tmp_path / "ours", count=4, shard_samples=4, resolution=8)
    shard = str(tmp_path / "ours" / "shard-000000.tar")
    with tarfile.open(shard) as tar:
        assert sorted(tar.getnames())[:2] == ["crater-000000.json", "crater-000000.png"]
    first = next(iter(wds.WebDataset(shard, shardshuffle=False).decode("l").to_tuple("png", "json")))
    assert first[0].shape == (8, 8) and "index" in first[1]


def test_sizes_are_refused_in_one_line_or_fitted_as_asked(tmp_path):
    arrays = images(4, side=16) + images(2, side=20, seed=5)
    shard_writer_set(tmp_path / "mixed", arrays, per_shard=3)
    with pytest.raises(UserError) as refused:
        resolve(str(tmp_path / "mixed"))
    assert "\n" not in str(refused.value) and "16x16: 4, 20x20: 2" in str(refused.value)
    assert "data.resize: resize" in str(refused.value)

    adopted = resolve(str(tmp_path / "mixed"), resize_to=8)
    assert (adopted.card.resolution, adopted.card.resize) == (8, True) and ADOPTED_PREFIX in adopted.url
    batch = next(iterate_once(adopted.url, batch_size=6))
    # independent: PIL's centre crop (already square here) and Lanczos resize of the written image
    expected = np.asarray(Image.fromarray(arrays[5][:, :, 0]).resize((8, 8), Image.Resampling.LANCZOS))
    assert tuple(batch["image"].shape) == (6, 1, 8, 8)
    assert np.array_equal(batch["image"][5, 0].numpy(), expected)
    assert verify(adopted.url).ok


def test_the_pixel_cap_holds_before_any_decode_when_resizing(monkeypatch, pil_decodes):
    monkeypatch.setenv("ORBITGEN_MAX_IMAGE_PIXELS", "100")
    raw = {"__key__": "big", "png": encoded(images(1, side=16)[0])}
    with pytest.raises(CorruptSample, match="more than the 100 allowed"):
        decode_sample(raw, ("image",), {"image": (8, 8, 1)}, resize=True)
    assert pil_decodes == []
    with pytest.raises(CorruptSample, match="has 1 band"):   # other bands are refused, not converted
        decode_sample(raw, ("image",), {"image": (8, 8, 3)}, resize=True)


@pytest.mark.parametrize("wrapped", [False, True], ids=["disk", "bucket"])
def test_an_unwritable_folder_puts_the_card_under_the_job_storage(tmp_path, monkeypatch, wrapped):
    shard_writer_set(tmp_path / "readonly", images(6))
    real = adopting._write

    def refuse_beside(folder, *args):
        if folder.startswith(f"file://{tmp_path}/readonly"):
            denied = PermissionError(13, "Permission denied", folder)
            if wrapped:   # as card.py `write_whole` re-raises an object store's AccessDenied: one line
                raise EnvironmentProblem(f"{folder}: access denied") from denied
            raise denied
        return real(folder, *args)

    monkeypatch.setattr(adopting, "_write", refuse_beside)
    adopted = resolve(str(tmp_path / "readonly"), fallback=str(tmp_path / "storage"))
    assert adopted.url.startswith(f"file://{tmp_path}/storage/") and "under the job's storage" in adopted.note
    assert adopted.card.shards_url == f"file://{tmp_path}/readonly"
    assert sum(len(b["__key__"]) for b in iterate_once(adopted.url, batch_size=4)) == 6
    assert not resolve(str(tmp_path / "readonly"), fallback=str(tmp_path / "storage")).written   # found there again
    with pytest.raises(UserError, match="--card-dir"):
        adopt(str(tmp_path / "readonly"), resize_to=8)   # no fallback: one line saying what to do


def test_a_dataset_json_may_point_at_shards_elsewhere(tmp_path):
    shard_writer_set(tmp_path / "theirs", images(8), per_shard=4)
    (tmp_path / "card").mkdir()
    (tmp_path / "card" / "dataset.json").write_text(json.dumps({"shards_url": "../theirs/shard-{000000..000001}.tar"}))
    adopted = resolve(str(tmp_path / "card"), holdout=0.5)
    assert adopted.url == f"file://{tmp_path}/card" and adopted.card.count == 8
    split = adopted.card.split
    assert split["training"] + split["held_out"] == 8 and split["holdout"] == 0.5
    from data_shards.split import holdout_split   # the card's split is the one training uses
    assert holdout_split(adopted.url, 0.5).sizes == (split["training"], split["held_out"])
    assert resolve(str(tmp_path / "card")).written is False


def test_jobs_read_a_brace_url_and_data_resize_decides(tmp_path):
    from jobs.inputs import check_data, resolve_data
    from jobs.spec import SPECS_DIR, SpecError, load_spec

    shard_writer_set(tmp_path / "theirs", images(8), per_shard=4)
    url = str(tmp_path / "theirs" / "shard-{000000..000001}.tar")
    said = []
    spec = load_spec(SPECS_DIR / "quickstart.yaml", [f"workdir={tmp_path}/w", f"data.train={url}", "data.resolution=8"])
    with pytest.raises(SpecError, match=r"16² images.*data\.resize: resize"):
        check_data(spec, resolve_data(spec, say=said.append))
    assert said and "card written beside the shards" in said[0]
    resized = spec.model_copy(update={"data": spec.data.model_copy(update={"resize": "resize"})})
    card = check_data(resized, resolve_data(resized, say=said.append))
    assert (card["resolution"], card["resize"], card["count"]) == (8, True, 8)
