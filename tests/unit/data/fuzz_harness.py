"""Mutated shards, zips and GeoTIFFs fed to the data plane's readers, one process for all cases.

`python fuzz_harness.py KIND CASES SEED WORKDIR` runs CASES deterministic mutations (case i uses
`random.Random(SEED + i)`) of a small valid input of KIND (tar, zip, geotiff) through the reader
orbitgen uses for it, and prints one JSON line of figures: cases, mutations tried (by kind),
outcomes, the longest case, the peak RSS above the process's start, and every failure. A failure
is an exception that is not the data plane's user-error class, a refusal whose message does not
name the shard / archive / member, or a case slower than the per-case bound (a timer interrupts
it). test_data_fuzz.py runs this in a child process, so its peak RSS is these cases' only.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import resource
import signal
import struct
import sys
import tarfile
import time
import traceback
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

PER_CASE_S = 2.0
MAX_ITEMS = 64   # items taken from an importer per case: a mutated raster may hold a million tiles
# Caps for the children: small enough that a header claiming a huge image is refused, and that
# what is allowed (then decoded) stays a few tens of MB.
CAPS = {"ORBITGEN_MAX_IMAGE_PIXELS": str(4_000_000), "ORBITGEN_MAX_RASTER_BYTES": str(16 << 20)}


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(buf, format="PNG")
    return buf.getvalue()


def find_all(data: bytes | bytearray, needle: bytes) -> list[int]:
    out, at = [], data.find(needle)
    while at >= 0:
        out.append(at)
        at = data.find(needle, at + 1)
    return out


# --- mutations ------------------------------------------------------------------------------------

def flip_bits(rng: random.Random, data: bytearray, lo: int = 0, hi: int | None = None) -> str:
    hi = len(data) if hi is None else min(hi, len(data))
    for _ in range(rng.randint(1, 8)):
        if hi > lo:
            data[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
    return "bit-flip"


def truncate(rng: random.Random, data: bytearray) -> str:
    del data[rng.randrange(len(data)):]
    return "truncate"


def splice(rng: random.Random, data: bytearray) -> str:
    """Insert random bytes, delete a run, zero a block or repeat one: lengths and offsets move."""
    at = rng.randrange(len(data) or 1)
    how = rng.choice(["insert", "delete", "zero", "repeat"])
    n = rng.choice([1, 7, 100, 512, 1024])
    if how == "insert":
        data[at:at] = bytes(rng.randrange(256) for _ in range(n))
    elif how == "delete":
        del data[at:at + n]
    elif how == "zero":
        data[at:at + n] = bytes(len(data[at:at + n]))
    else:
        data[at:at] = data[at:at + n]
    return f"splice-{how}"


def png_dimensions(rng: random.Random, data: bytearray) -> str:
    """Rewrite the width or height in some PNG's IHDR, its CRC fixed or not."""
    spots = [i for i in find_all(data, b"IHDR") if i + 21 <= len(data)]
    if not spots:
        return flip_bits(rng, data)
    at = rng.choice(spots)
    value = rng.choice([0, 1, 13000, 65535, 2**31 - 1, rng.randrange(2**32)])
    field = at + 4 + 4 * rng.randrange(2)
    data[field:field + 4] = struct.pack(">I", value)
    if rng.random() < 0.8:
        data[at + 17:at + 21] = struct.pack(">I", zlib.crc32(bytes(data[at:at + 17])))
    return "png-dimensions"


# --- tar ------------------------------------------------------------------------------------------

def base_tars() -> list[bytes]:
    """Valid WebDataset shards in pax (long names -> 'x' headers), GNU ('L' long names) and ustar."""
    rng = np.random.default_rng(0)
    out = []
    for fmt, stem in ((tarfile.PAX_FORMAT, "p" * 110), (tarfile.GNU_FORMAT, "g" * 110), (tarfile.USTAR_FORMAT, "u")):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for i in range(3):
                key = f"{stem}-{i:02d}"
                parts = {"image.png": png(rng.integers(0, 255, (8, 8, 1), dtype=np.uint8)),
                         "cls": str(i).encode(), "json": json.dumps({"i": i}).encode()}
                for ext, data in parts.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(data), 0
                    if fmt == tarfile.PAX_FORMAT and ext == "json":
                        info.pax_headers = {"comment": "é" * 3}
                    tar.addfile(info, io.BytesIO(data))
        out.append(buf.getvalue())
    return out


def header_offsets(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, typeflag) of each header block of a pristine tar."""
    out, pos = [], 0
    while pos + 512 <= len(data) and data[pos:pos + 512] != bytes(512):
        size = int(data[pos + 124:pos + 136].split(b"\0")[0].strip() or b"0", 8)
        out.append((pos, data[pos + 156:pos + 157]))
        pos += 512 + -(-size // 512) * 512
    return out


def fix_checksum(data: bytearray, at: int) -> None:
    block = data[at:at + 512]
    if len(block) < 512:
        return
    block[148:156] = b" " * 8
    data[at + 148:at + 156] = b"%06o\0 " % sum(block)


TAR_FIELDS = {"name": (0, 100), "size": (124, 12), "checksum": (148, 8), "type": (156, 1), "magic": (257, 6),
              "prefix": (345, 155)}
HOSTILE = {
    "size": [b"77777777777\0", b"-0000000001\0", b"zzzzzzzzzzz\0", b"\x80" + (2**62).to_bytes(11, "big"),
             b"\xff" * 12, b"00000000000\0", b"0o17\0", b"1_0\0", None],
    "name": [b"\xff\xfe bad utf8", b"../escape.png", b"/abs.png", b"", b"_meta", None],
    "type": [b"x", b"g", b"L", b"K", b"5", b"2", b"S", b"\x7f", b"7", b"0"],
    "checksum": [b"zzzzzz\0 ", b"\xff" * 8, b"0\0", None],
    "magic": [b"ustar\0", b"ustar ", b"\0\0\0\0\0\0", None],
    "prefix": [b"\xff" * 10, b"../..", None],
}


def tar_header_edit(rng: random.Random, data: bytearray, headers) -> str:
    at, _ = rng.choice(headers)
    field = rng.choice(list(TAR_FIELDS))
    start, width = TAR_FIELDS[field]
    value = rng.choice(HOSTILE[field])
    if value is None:  # a random number of the right width
        value = b"%0*o\0" % (width - 1, rng.randrange(8 ** (width - 2)))
    data[at + start:at + start + width] = value[:width].ljust(width, b"\0")
    if field != "checksum" and rng.random() < 0.85:
        fix_checksum(data, at)  # get past the checksum, so the edit itself is what is read
    return f"header-{field}"


PAX_RECORDS = [b"0 ", b"-5 ", b"99999999 ", b"abc ", b"3 ", b" ", b"18446744073709551617 "]


def pax_edit(rng: random.Random, data: bytearray, headers) -> str:
    pax = [at for at, kind in headers if kind == b"x"]
    if not pax:
        return tar_header_edit(rng, data, headers)
    at = rng.choice(pax) + 512
    end = data.find(b"\0", at, at + 512)
    end = at + 512 if end < 0 else end
    how = rng.choice(["length", "newline", "record", "flip"])
    if how == "length":
        space = data.find(b" ", at, end)
        data[at:space + 1] = rng.choice(PAX_RECORDS)
    elif how == "newline":
        nl = data.find(b"\n", at, end)
        if nl >= 0:
            data[nl] = ord(rng.choice(" x="))
    elif how == "record":
        record = rng.choice([b"size=-1", b"size=99999999999", b"size=abc", b"path=../x.png", b"path=\xff\xfe",
                             b"path=", b"=novalue", b"noequals"])
        body = b" " + record + b"\n"
        n = len(body) + len(str(len(body)))
        data[at:at] = str(n).encode() + body   # the pax size field is now short: the rest shifts
    else:
        flip_bits(rng, data, at, end)
    return f"pax-{how}"


def mutate_tar(rng: random.Random, base: bytes) -> tuple[bytes, list[str]]:
    data = bytearray(base)
    headers = header_offsets(base)
    done = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        pick = rng.random()
        if pick < 0.2:
            done.append(flip_bits(rng, data))
        elif pick < 0.35:
            at, _ = rng.choice(headers)
            done.append(flip_bits(rng, data, at, at + 512) + "-header")
        elif pick < 0.5:
            done.append(tar_header_edit(rng, data, headers))
        elif pick < 0.65:
            done.append(pax_edit(rng, data, headers))
        elif pick < 0.75:
            done.append(png_dimensions(rng, data))
        elif pick < 0.88:
            done.append(splice(rng, data))
        else:
            done.append(truncate(rng, data))
    return bytes(data), done


def run_tar(data: bytes, shard: str) -> tuple[str, list[str]]:
    """Read a shard as `data verify` and training do; (outcome, problems with the message)."""
    from data_shards.decode import CorruptSample, decode_sample
    from data_shards.errors import UserError
    from data_shards.shard_reader import tar_samples
    from data_shards.tar_reader import DamagedShard

    problems, corrupt = [], 0
    try:
        for raw in tar_samples(io.BytesIO(data), shard):
            raw["__url__"] = shard
            for shapes in ({"image": (8, 8, 1)}, None):   # against the card, and against the pixel cap
                try:
                    decode_sample(raw, ("image", "cls", "json"), shapes)
                except CorruptSample as exc:
                    corrupt += 1
                    if shard not in str(exc) or repr(raw["__key__"]) not in str(exc):
                        problems.append(f"sample refusal does not name shard and key: {exc}")
    except DamagedShard as exc:
        if shard not in str(exc) or "member" not in str(exc):
            problems.append(f"tar refusal does not name shard and member: {exc}")
        return "refused-damaged", problems
    except UserError as exc:   # unsafe member names
        if shard not in str(exc):
            problems.append(f"refusal does not name the shard: {exc}")
        return f"refused-{type(exc).__name__}", problems
    return ("read-some-corrupt" if corrupt else "read"), problems


# --- zip ------------------------------------------------------------------------------------------

def bomb_png(side: int) -> bytes:
    """A valid 1-band PNG of side x side zeros: a few hundred KB that decode to side² bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z, row = zlib.compressobj(9), bytes(side + 1)   # each row: filter byte 0, then the pixels
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def base_zips() -> list[bytes]:
    """A dataset_tool zip (stored and deflated members), and one that also holds a PNG that decodes
    to 13,000² and a member that inflates to 64 MB."""
    rng = np.random.default_rng(1)
    names = [f"00000/img{i:08d}.png" for i in range(4)]
    out = []
    for hostile in (False, True):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for i, name in enumerate(names):
                z.writestr(name, png(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)),
                           zipfile.ZIP_DEFLATED if i % 2 else zipfile.ZIP_STORED)
            if hostile:
                z.writestr("00000/img00000004.png", bomb_png(13000), zipfile.ZIP_STORED)
                inflates = zipfile.ZipInfo("00000/img00000005.png")
                inflates.compress_type = zipfile.ZIP_DEFLATED
                with z.open(inflates, "w") as member:   # written in pieces: 64 MB never held here
                    for _ in range(64):
                        member.write(bytes(1 << 20))
            labelled = names + (["00000/img00000004.png", "00000/img00000005.png"] if hostile else [])
            z.writestr("dataset.json", json.dumps({"labels": [[n, i % 2] for i, n in enumerate(labelled)]}))
        out.append(buf.getvalue())
    return out


def zip_header_edit(rng: random.Random, data: bytearray) -> str:
    """Sizes, offsets, counts and name lengths of local / central headers and the end record."""
    sigs = {b"PK\x03\x04": [(18, 4), (22, 4), (26, 2), (8, 2)],
            b"PK\x01\x02": [(20, 4), (24, 4), (28, 2), (42, 4), (10, 2)],
            b"PK\x05\x06": [(8, 2), (10, 2), (12, 4), (16, 4)]}
    spots = [(i, sig) for sig in sigs for i in find_all(data, sig)]
    if not spots:
        return flip_bits(rng, data)
    at, sig = rng.choice(spots)
    off, width = rng.choice(sigs[sig])
    value = rng.choice([0, 1, 2**(8 * width) - 1, rng.randrange(2**(8 * width)), len(data), 2**(8 * width - 1)])
    data[at + off:at + off + width] = (value % 2**(8 * width)).to_bytes(width, "little")
    return f"zip-header-{sig[2:].hex()}"


def zip_json_edit(rng: random.Random, base: bytes) -> tuple[bytes, str]:
    """The same images with another dataset.json, accepted or not."""
    doc = rng.choice(['{"labels": null}', '{"labels": [0, 1, 2, 3]}', '[["00000/img00000000.png", 1]]', "{",
                      '{"labels": {"00000/img00000000.png": 1}}', '{"labels": [["a", [0.5, 1.0]]]}', '"text"',
                      '{"labels": [["00000/img00000001.png", -1]]}', '{"labels": "ab"}', '\xff\xfe', "null"])
    src, buf = zipfile.ZipFile(io.BytesIO(base)), io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for info in src.infolist():
            z.writestr(info.filename, doc.encode("utf-8", "surrogatepass") if info.filename == "dataset.json"
                       else src.read(info))
    return buf.getvalue(), "zip-dataset-json"


def mutate_zip(rng: random.Random, bases: list[bytes]) -> tuple[bytes, list[str]]:
    pick = rng.random()
    if pick < 0.1:
        data, what = zip_json_edit(rng, bases[0])
        return data, [what]
    data = bytearray(rng.choice(bases))
    done = []
    for _ in range(rng.choice([1, 1, 2])):
        pick = rng.random()
        if pick < 0.3:
            done.append(zip_header_edit(rng, data))
        elif pick < 0.55:
            done.append(flip_bits(rng, data))
        elif pick < 0.7:
            done.append(png_dimensions(rng, data))   # only reached in stored members; deflated ones get flips
        elif pick < 0.85:
            done.append(splice(rng, data))
        else:
            done.append(truncate(rng, data))
    return bytes(data), done


def run_importer(items_of, path: Path) -> tuple[str, list[str]]:
    """Take up to MAX_ITEMS items of an importer; refusals must name the archive or the member."""
    from data_shards.errors import UserError
    from data_shards.sources import Sample, Skipped

    problems, skipped, samples = [], 0, 0
    try:
        for item in items_of(str(path)):
            if isinstance(item, Skipped):
                skipped += 1
                if not item.item or not item.reason:
                    problems.append(f"a skipped item without a name or reason: {item}")
            elif not isinstance(item, Sample):
                problems.append(f"not a Sample: {item!r}")
            else:
                samples += 1
            if samples + skipped >= MAX_ITEMS:
                break
    except UserError as exc:
        if path.name not in str(exc):
            problems.append(f"refusal does not name {path.name}: {exc}")
        return f"refused-{type(exc).__name__}", problems
    return ("some-skipped" if skipped else "read") if samples else ("all-skipped" if skipped else "empty"), problems


def zip_items(path: str):
    from data_shards.source_zip import read_stylegan_zip

    return read_stylegan_zip(path, 8).items


# --- GeoTIFF --------------------------------------------------------------------------------------

def base_geotiff() -> bytes:
    import tifffile

    geokeys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633)
    buf = io.BytesIO()
    data = np.random.default_rng(2).integers(1, 4000, (24, 24, 3)).astype(np.uint16)
    tifffile.imwrite(buf, data, photometric="minisblack", planarconfig="contig", rowsperstrip=8, extratags=[
        (33550, "d", 3, (10.0, 10.0, 0.0), True), (33922, "d", 6, (0, 0, 0, 500000.0, 4000000.0, 0), True),
        (34735, "H", len(geokeys), geokeys, True), (42113, "s", 0, "0", True)])
    return buf.getvalue()


def ifd_entries(data: bytes) -> list[int]:
    """Offsets of the first IFD's 12-byte entries (little-endian classic TIFF)."""
    ifd = struct.unpack_from("<I", data, 4)[0]
    n = struct.unpack_from("<H", data, ifd)[0]
    return [ifd + 2 + 12 * i for i in range(n)]


def tiff_tag_edit(rng: random.Random, data: bytearray, entries: list[int]) -> str:
    at = rng.choice(entries)
    part = rng.choice(["type", "count", "value"])
    if part == "type":
        data[at + 2:at + 4] = struct.pack("<H", rng.choice([0, 1, 2, 3, 4, 5, 11, 12, 16, 99]))
    elif part == "count":
        data[at + 4:at + 8] = struct.pack("<I", rng.choice([0, 1, 2, 5, 2**31, 2**32 - 1, rng.randrange(2**20)]))
    else:
        data[at + 8:at + 12] = struct.pack("<I", rng.choice([0, 1, 3, 65535, 2**31, 2**32 - 1, len(data),
                                                             rng.randrange(2**32)]))
    tag = struct.unpack_from("<H", data, at)[0]
    return f"tiff-tag-{part}-{tag}"


def mutate_geotiff(rng: random.Random, base: bytes) -> tuple[bytes, list[str]]:
    data = bytearray(base)
    entries = ifd_entries(base)
    done = []
    for _ in range(rng.choice([1, 1, 2])):
        pick = rng.random()
        if pick < 0.45:
            done.append(tiff_tag_edit(rng, data, entries))
        elif pick < 0.6:
            done.append(flip_bits(rng, data, 0, entries[-1] + 12) + "-ifd")
        elif pick < 0.75:
            done.append(flip_bits(rng, data))
        elif pick < 0.87:
            done.append(splice(rng, data))
        else:
            done.append(truncate(rng, data))
    return bytes(data), done


def geotiff_items(path: str):
    from data_shards.source_geotiff import read_geotiff

    return read_geotiff(path, 8).items


# --- the loop -------------------------------------------------------------------------------------

def rss_kib() -> int:
    """Peak RSS of this process. VmHWM, where there is one: `ru_maxrss` keeps the parent's peak
    across fork + exec, so in a child of a large pytest process it says nothing about the child."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run(kind: str, cases: int, seed: int, workdir: Path) -> dict:
    os.environ.update(CAPS)
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)   # it logs every odd tag it meets
    if kind == "tar":
        bases = base_tars()
        mutate = lambda rng: mutate_tar(rng, rng.choice(bases))  # noqa: E731
    elif kind == "zip":
        bases = base_zips()
        mutate = lambda rng: mutate_zip(rng, bases)  # noqa: E731
    else:
        base = base_geotiff()
        mutate = lambda rng: mutate_geotiff(rng, base)  # noqa: E731
    # Warm up (imports, PIL plugins, tifffile) so the memory figure is the cases' own.
    import data_shards.source_geotiff  # noqa: F401
    import data_shards.source_zip  # noqa: F401
    import data_shards.tar_reader  # noqa: F401
    start_rss = rss_kib()
    signal.signal(signal.SIGALRM, _alarm)
    mutations, outcomes, failures = Counter(), Counter(), []
    longest = (0.0, None)
    t_all = time.perf_counter()
    for i in range(cases):
        rng = random.Random(seed + i)
        data, done = mutate(rng)
        mutations.update(done)
        name = f"fuzz-{kind}-{seed + i}." + {"tar": "tar", "zip": "zip", "geotiff": "tif"}[kind]
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, PER_CASE_S)
        try:
            if kind == "tar":
                outcome, problems = run_tar(data, name)
            else:
                path = workdir / name
                path.write_bytes(data)
                outcome, problems = run_importer(zip_items if kind == "zip" else geotiff_items, path)
                path.unlink()
        except CaseTimeout:
            outcome, problems = "timeout", [f"longer than {PER_CASE_S} s"]
        except Exception as exc:  # a crash: anything but the user-error class
            outcome = "crash"
            problems = [f"{type(exc).__name__}: {exc} | " + " / ".join(traceback.format_exc().splitlines()[-4:])]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        took = time.perf_counter() - t0
        longest = max(longest, (took, name))
        outcomes[outcome] += 1
        if problems:
            failures.append({"case": name, "mutations": done, "outcome": outcome, "problems": problems[:3]})
    return {"kind": kind, "cases": cases, "seed": seed, "seconds": round(time.perf_counter() - t_all, 2),
            "mutations": dict(sorted(mutations.items())), "mutations_tried": sum(mutations.values()),
            "outcomes": dict(outcomes), "longest_case_s": round(longest[0], 4), "longest_case": longest[1],
            "peak_rss_growth_mib": round((rss_kib() - start_rss) / 1024, 1),
            "peak_rss_mib": round(rss_kib() / 1024, 1), "failures": failures[:20], "failure_count": len(failures)}


if __name__ == "__main__":
    kind, cases, seed, workdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    print(json.dumps(run(kind, cases, seed, workdir)))
