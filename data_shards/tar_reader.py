"""The regular files of a tar stream, read with a few struct-free slices per header.

Python's `tarfile` builds a TarInfo object and several buffered reads per member: for 64x64
PNGs that was a third of a shard stream's CPU. This reader handles what shard writers
produce: ustar / GNU / pax headers, GNU long names ('L') and pax `path` / `size` records. A
damaged stream (bad checksum, cut short) raises `tarfile.ReadError`, as `tarfile` does.
"""
from __future__ import annotations

import tarfile
from typing import IO, Iterator

from .member_names import refuse_unsafe

BLOCK = 512
_FILE_TYPES = (b"0", b"\0", b"7")  # regular file (and "contiguous file", read as one)


def _read(f: IO[bytes], n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise tarfile.ReadError(f"unexpected end of data ({len(data)} of {n} bytes)")
    return data


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes beyond the octal field
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _checksum_ok(header: bytes) -> bool:
    stored = _number(header[148:156])
    rest = header[:148] + header[156:]
    unsigned = sum(rest) + 8 * 32  # the checksum field itself counts as spaces
    signed = unsigned - 256 * sum(1 for b in rest if b >= 128)  # what some old writers summed
    return stored in (unsigned, signed)


def _pax(data: bytes) -> dict[str, str]:
    """`"%d %s=%s\\n"` records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8")
        pos += length
    return out


def tar_files(f: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file, in order; directories, links and metadata skipped."""
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = f.read(BLOCK)
        if not header or header == b"\0" * BLOCK:
            return  # end-of-archive blocks (or a stream that ends cleanly between members)
        if len(header) != BLOCK:
            raise tarfile.ReadError("unexpected end of data in a header")
        if not _checksum_ok(header):
            raise tarfile.ReadError("bad checksum in a tar header")
        size, kind = _number(header[124:136]), header[156:157]
        size = int(pax.get("size", size))
        data = _read(f, size)
        _read(f, -size % BLOCK)  # padding to the next block
        if kind == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8")
        elif kind == b"x":
            pax = _pax(data)
        elif kind == b"g":
            pass  # global pax header: nothing a sample needs
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8") if header[257:262] == b"ustar" else ""
            name = pax.get("path") or long_name or (f"{prefix}/{name}" if prefix else name)
            long_name, pax = None, {}
            if kind in _FILE_TYPES:
                refuse_unsafe([name], "shard")
                yield name, data
