"""Damaged and hostile shards: malformed tar / pax headers are refused in bounded time naming
the shard and member; images are checked by their header (size, bands) against the card and
the pixel cap before any pixel is decoded, and errors name the file or sample, not a buffer."""
from __future__ import annotations

import io
import os
import signal
import tarfile
import time
from contextlib import contextmanager

import numpy as np
import pytest
from fuzz_harness import bomb_png, fix_checksum, png
from PIL import Image
from shard_helpers import write_craters

from data_shards.card import read_manifest, write_manifest
from data_shards.decode import CorruptSample, decode_npy, decode_png, decode_sample
from data_shards.errors import UserError
from data_shards.shard_reader import read_piece, tar_samples
from data_shards.sources import decode_image
from data_shards.tar_reader import DamagedShard, tar_files
from data_shards.verify import verify


@contextmanager
def within(seconds: float):
    """Fail (instead of hanging the suite) when the block runs longer than `seconds`."""
    def stop(signum, frame):
        raise AssertionError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, stop)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)   # pytest-timeout's own alarm, if set
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer:   # put the outer alarm back, less the time spent here
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 0.001))


def pax_tar(name: str = "k" * 120 + ".png", data: bytes = b"x" * 100) -> bytearray:
    """A one-member pax tar whose long name needs a pax 'x' header (its data starts at byte 512)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return bytearray(buf.getvalue())


def with_pax_length(length: bytes) -> bytes:
    data = pax_tar()
    space = data.index(b" ", 512)
    return bytes(data[:512] + length + data[space:])


@pytest.mark.parametrize("length", [b"0", b"-5", b"abc", b"", b"99999", b"3"])
def test_a_malformed_pax_record_is_refused_at_once_naming_shard_and_member(length):
    data = with_pax_length(length)
    with within(5), pytest.raises(DamagedShard) as err:
        list(tar_files(io.BytesIO(data), "s3://bucket/set/shard-000007.tar"))
    text = str(err.value)
    assert text.startswith("s3://bucket/set/shard-000007.tar: member ") and "PaxHeader" in text and "pax record" in text
    assert isinstance(err.value, UserError) and isinstance(err.value, tarfile.ReadError)


def header(name: bytes, size: int, kind: bytes) -> bytes:
    """A ustar header block with a right checksum."""
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108], block[124:136], block[136:148] = b"0000644\0", b"%011o\0" % size, b"%011o\0" % 0
    block[156:157], block[257:263] = kind, b"ustar\0"
    fix_checksum(block, 0)
    return bytes(block)


def pax_member(records: bytes, name: bytes = b"a.png", data: bytes = b"x" * 100) -> bytes:
    """A pax 'x' header holding exactly `records`, then the member it describes, then the end."""
    def padded(b: bytes) -> bytes:
        return b + bytes(-len(b) % 512)
    return (header(b"PaxHeader/a", len(records), b"x") + padded(records)
            + header(name, len(data), b"0") + padded(data) + bytes(1024))


def test_pax_member_makes_a_tar_both_readers_read():
    data = pax_member(b"16 path=b/c.png\n")
    assert [m.name for m in tarfile.open(fileobj=io.BytesIO(data))] == ["b/c.png"]
    assert list(tar_files(io.BytesIO(data))) == [("b/c.png", b"x" * 100)]


@pytest.mark.parametrize("records, says", [
    (b"11 size=-1\n", "pax size"), (b"20 size=99999999999\n", "unexpected end"), (b"14 size=12abc\n", "pax size"),
    (b"12 noequals\n", "not 'LENGTH KEY=VALUE"), (b"11 path=a.png", "pax record"), (b"0 path=a\n", "says 0 bytes"),
    (b"-9 path=a\n", "no decimal length"), (b"99999 path=a\n", "says 99999 bytes"), (b"9 \xff=a\n", "says 9"),
])
def test_a_pax_record_with_a_hostile_value_is_refused(records, says):
    with within(5), pytest.raises(DamagedShard, match=says) as err:
        list(tar_files(io.BytesIO(pax_member(records)), "shard.tar"))
    assert str(err.value).startswith("shard.tar: member ")


@pytest.mark.parametrize("field, value, says", [
    ((124, 12), b"77777777777\0", "unexpected end"),             # larger than the file
    ((124, 12), b"\xff" * 12, "negative size"),                  # GNU base-256, negative
    ((124, 12), b"0o17\0\0\0\0\0\0\0\0", "not an octal number"),  # Python's int() would take it
    ((124, 12), b"zzzzzzzzzzz\0", "not an octal number"),
    ((148, 8), b"zzzzzz\0 ", "not an octal number"),
    ((0, 100), b"\xff\xfe.png".ljust(100, b"\0"), "not UTF-8"),
])
def test_hostile_header_fields_are_refused_naming_the_member(field, value, says):
    data = bytearray(tarfile_bytes({"a.png": b"x" * 600, "b.png": b"y" * 10}))
    at = 1024 + 512   # the second member's header
    start, width = field
    data[at + start:at + start + width] = value
    if start != 148:
        fix_checksum(data, at)
    with within(5), pytest.raises(DamagedShard, match=says) as err:
        list(tar_files(io.BytesIO(bytes(data)), "shard.tar"))
    assert "shard.tar: member " in str(err.value) and f"header at byte {at}" in str(err.value)


def tarfile_bytes(files: dict[str, bytes], fmt=tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Unseekable(io.RawIOBase):
    """A stream that cannot tell its size (a pipe): reads must still not trust a header's size."""

    def __init__(self, data: bytes):
        self.inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self.inner.readinto(b)


def test_a_huge_size_on_a_stream_that_cannot_seek_reads_only_what_is_there():
    data = bytearray(tarfile_bytes({"a.png": b"x" * 600}))
    data[124:136] = b"\x80" + (2**62).to_bytes(11, "big")   # 4 EiB, base-256
    fix_checksum(data, 0)
    with within(5), pytest.raises(DamagedShard, match="unexpected end"):
        list(tar_files(Unseekable(bytes(data)), "pipe"))


def test_a_malformed_pax_shard_is_one_finding_of_verify_and_a_bounded_read(tmp_path):
    """Today's reader looped forever on a zero-length pax record (`data verify` ran > 120 s)."""
    dest = tmp_path / "set"
    write_craters(dest, count=4, shard_samples=4, resolution=8)
    shard = dest / "shard-000000.tar"
    good = tarfile.open(shard)
    members = [(m, good.extractfile(m).read()) for m in good.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m, data in members:
            m.pax_headers = {"comment": "camera"}      # every member gets a pax header
            tar.addfile(m, io.BytesIO(data))
    data = bytearray(buf.getvalue())
    last = data.rindex(b"PaxHeader")   # the last sample's last member: three samples come before it
    at = (last // 512) * 512 + 512
    space = data.index(b" ", at)
    data[at:space] = b"0".rjust(space - at, b"0")
    shard.write_bytes(bytes(data))
    rows = read_manifest(str(dest)).to_dict("records")
    write_manifest(str(dest), [{**rows[0], "url": "shard-000000.tar", "bytes": len(data)}])
    t0 = time.perf_counter()
    with within(20):
        report = verify(str(dest))
        pieces = list(read_piece(str(shard), 0, 4, budget_s=0))
    assert time.perf_counter() - t0 < 20
    damaged = [str(p) for p in report.problems if "damaged tar" in str(p)]
    assert len(damaged) == 1 and "shard-000000.tar" in damaged[0] and "pax record" in damaged[0], report.problems
    assert [p["__key__"] for p in pieces][:3] == ["crater-000000", "crater-000001", "crater-000002"]
    assert "__missing__" in pieces[3] and "pax record" in pieces[3]["__missing__"]  # counted, not retried


def test_a_member_named_with_a_dot_dot_names_the_shard_once():
    data = tarfile_bytes({"../evil.png": b"x"})
    with pytest.raises(UserError, match=r"^/data/shard-000000.tar: member '../evil.png'"):
        list(tar_samples(io.BytesIO(data), "/data/shard-000000.tar"))


# --- images: by header first ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = bomb_png(13000)
    assert len(data) < 400_000
    return data


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def test_a_png_bomb_in_a_shard_is_refused_by_its_header_against_the_card(bomb, pil_decodes):
    raw = {"__key__": "crater-000003", "__url__": "s3://b/set/shard-000000.tar", "image.png": bomb}
    t0, before = time.perf_counter(), peak_rss_mib()
    with pytest.raises(CorruptSample) as err:
        decode_sample(raw, ("image",), {"image": (16, 16, 1)})
    assert time.perf_counter() - t0 < 1 and peak_rss_mib() - before < 100
    assert pil_decodes == []
    text = str(err.value)
    assert "s3://b/set/shard-000000.tar: sample 'crater-000003' part image.png" in text
    assert "(13000, 13000, 1)" in text and "(16, 16, 1)" in text and "BytesIO" not in text


def test_a_png_bomb_is_refused_by_the_pixel_cap_when_no_card_is_given(bomb, pil_decodes, monkeypatch):
    with pytest.raises(CorruptSample, match=r"x.png: 13000x13000 pixels, more than the 100,000,000 allowed"):
        decode_png(bomb, "x.png")
    with pytest.raises(UserError, match=r"^photos/big.png: 13000x13000 pixels"):
        decode_image(bomb, "photos/big.png")
    assert pil_decodes == []
    monkeypatch.setenv("ORBITGEN_MAX_IMAGE_PIXELS", "63")   # the cap is the environment's to set
    with pytest.raises(UserError, match="8x8 pixels, more than the 63 allowed"):
        decode_image(png(np.zeros((8, 8, 1), np.uint8)), "small.png")


def test_a_broken_image_names_the_file_not_a_buffer():
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for name, data in (("photos/notes.png", b"this is text"), ("photos/cut.png", png(noise)[:200])):
        with pytest.raises(UserError) as err:
            decode_image(data, name)
        assert str(err.value).startswith(f"{name}: ") and "BytesIO" not in str(err.value)
    with pytest.raises(CorruptSample) as err:
        decode_sample({"__key__": "k1", "image.png": b"not a png"}, ("image",))
    assert "sample 'k1' part image.png" in str(err.value) and "BytesIO" not in str(err.value)


def test_an_npy_part_is_checked_by_its_header_before_it_is_allocated():
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 4, 6), np.uint8))
    good = buf.getvalue()
    assert decode_npy(good, "a.npy", (4, 4, 6)).shape == (4, 4, 6)
    with pytest.raises(CorruptSample, match=r"a.npy is \(6, 4, 4\) \(from its header.*promises \(4, 4, 6\)"):
        decode_npy(good.replace(b"(4, 4, 6)", b"(6, 4, 4)"), "a.npy", (4, 4, 6))
    # A header may claim any shape (here 9 GB); only the bytes that follow it are believed.
    with pytest.raises(CorruptSample, match=r"says \(99999, 99999, 1\), but 96 bytes of data follow"):
        decode_npy(good.replace(b"(4, 4, 6), }" + b" " * 8, b"(99999, 99999, 1), }"), "a.npy")


def test_card_checks_read_only_the_header_for_a_good_sample_too():
    raw = {"__key__": "k", "image.png": png(np.full((16, 16, 1), 7, np.uint8))}
    out = decode_sample(raw, ("image",), {"image": (16, 16, 1)})
    assert out["image"].shape == (16, 16, 1) and int(out["image"][0, 0, 0]) == 7
    says = r"\(16, 16, 1\) \(from its header, not decoded\), the set promises \(16, 16, 3\)"
    with pytest.raises(CorruptSample, match=says):
        decode_sample(raw, ("image",), {"image": (16, 16, 3)})


def test_a_bomb_source_image_stops_a_build_in_one_line_without_decoding(tmp_path, bomb, pil_decodes):
    from data_shards.build import SourceItemError, build

    src = tmp_path / "photos"
    src.mkdir()
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(src / "a.png")
    (src / "big.png").write_bytes(bomb)
    before = peak_rss_mib()
    with pytest.raises(SourceItemError) as err:
        build(str(src), str(tmp_path / "out"), layout="folder", resolution=8, progress=False)
    assert peak_rss_mib() - before < 300 and not os.path.exists(tmp_path / "out")
    assert str(err.value).startswith("big.png: cannot read image: 13000x13000 pixels, more than the")
    assert all(size != (13000, 13000) for size in pil_decodes)


def non_utf8_name() -> bytes:
    data = bytearray(tarfile_bytes({"a.png": b"x"}))
    data[0:2] = b"\xff\xfe"
    fix_checksum(data, 0)
    return bytes(data)


@pytest.mark.parametrize("damage", ["zero-length pax record", "non-UTF-8 name"])
def test_a_shard_damaged_before_its_first_sample_is_one_user_error_not_a_retry(tmp_path, damage):
    """Today: the pax record loops for ever; the name's UnicodeDecodeError is retried for 3 minutes
    as if it were a network error."""
    from data_shards.shard_reader import DamagedShardError, ShardReadError

    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes(with_pax_length(b"0") if damage.startswith("zero") else non_utf8_name())
    t0 = time.perf_counter()
    with within(10), pytest.raises(DamagedShardError) as err:
        list(read_piece(str(shard), 0, 1))          # the default 3-minute retry budget is not used
    assert time.perf_counter() - t0 < 5
    assert isinstance(err.value, UserError) and isinstance(err.value, ShardReadError)
    member = "'././@PaxHeader'" if damage.startswith("zero") else "'\ufffd\ufffdpng'"
    assert str(err.value).startswith(f"cannot read shard {shard}: damaged at member {member}"), str(err.value)
    assert "data verify" in str(err.value)
