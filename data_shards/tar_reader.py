"""The regular files of a tar stream, read with a few struct-free slices per header.

Python's `tarfile` builds a TarInfo object and several buffered reads per member: for 64x64
PNGs that was a third of a shard stream's CPU. This reader handles what shard writers
produce: ustar / GNU / pax headers, GNU long names ('L') and pax `path` / `size` records.

Shards come from object stores and other people's disks, so every header is distrusted: a
number that is not octal, a bad checksum, a size that runs past the end of the shard, a pax
record whose length is zero, negative or out of its header, a name that is not UTF-8 — each
raises `DamagedShard` naming the shard, the member and the byte offset of its header. Every
step reads at least one 512-byte block and nothing is read past what the shard holds, so a
damaged shard is refused in time and memory proportional to its size, never in a loop.
`DamagedShard` is a `tarfile.ReadError` (callers that count damage keep doing so) and a
`UserError` (where it reaches the CLI it is one `error:` line).
"""
from __future__ import annotations

import re
import tarfile
from typing import IO, Iterator

from .errors import UserError
from .member_names import refuse_unsafe

BLOCK = 512
_ZERO_BLOCK = b"\0" * BLOCK
_FILE_TYPES = (b"0", b"\0", b"7")  # regular file (and "contiguous file", read as one)
# pax headers and GNU long names hold a few hundred bytes; more is damage, not metadata.
MAX_METADATA_BYTES = 1 << 20
# Reads of a stream that cannot tell its size grow with what arrives, not with what a header claims.
_CHUNK = 1 << 20
_OCTAL = re.compile(rb"[0-7]*")
_DECIMAL = re.compile(rb"[0-9]{1,20}")


class DamagedShard(UserError, tarfile.ReadError):
    """A shard whose tar structure is broken; the message names the shard, member and offset."""


def _remaining(f: IO[bytes]) -> int | None:
    """Bytes from the current position to the end, or None for a stream that cannot seek."""
    try:
        if f.seekable():
            here = f.tell()
            end = f.seek(0, 2)
            f.seek(here)
            return end - here
    except (AttributeError, OSError, ValueError):
        pass
    return None


class _Cursor:
    """The stream, the shard's name and where we are, so every refusal can say all three."""

    def __init__(self, f: IO[bytes], shard: str):
        self.f, self.shard, self.offset = f, shard, 0
        self.left = _remaining(f)
        self.member: str | bytes = ""   # bytes: the raw name field, decoded only for a message
        self.header_at = 0

    def damaged(self, what: str) -> DamagedShard:
        member = self.member
        if isinstance(member, bytes):
            member = member.split(b"\0", 1)[0].decode("utf-8", "replace")
        member = member if len(member) <= 80 else member[:77] + "..."   # a garbage name can be long
        return DamagedShard(f"{self.shard}: member {member!r} (header at byte {self.header_at}): {what}")

    def read(self, n: int, what: str) -> bytes:
        if n < 0:
            raise self.damaged(f"negative length {n} for {what}")
        if self.left is not None and n > self.left:
            raise self.damaged(f"unexpected end of data: {what} needs {n} bytes, the shard has {self.left} "
                               "left (cut short, or a wrong size in the header)")
        if self.left is not None or n <= _CHUNK:
            data = self.f.read(n)
        else:
            parts, got = [], 0
            while got < n:
                part = self.f.read(min(_CHUNK, n - got))
                if not part:
                    break
                parts.append(part)
                got += len(part)
            data = b"".join(parts)
        if len(data) != n:
            raise self.damaged(f"unexpected end of data ({len(data)} of {n} bytes of {what})")
        self.offset += n
        if self.left is not None:
            self.left -= n
        return data

    def number(self, field: bytes, what: str) -> int:
        if field[0] & 0x80:  # GNU base-256 for sizes beyond the octal field; 0xff starts a negative one
            if field[0] == 0xFF:
                raise self.damaged(f"negative {what} (base-256)")
            return int.from_bytes(field[1:], "big")
        digits = field.split(b"\0", 1)[0].strip()
        if not _OCTAL.fullmatch(digits):
            raise self.damaged(f"{what} {digits[:16]!r} is not an octal number")
        return int(digits, 8) if digits else 0

    def text(self, raw: bytes, what: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.damaged(f"{what} {raw[:60]!r} is not UTF-8") from None


def _checksum_ok(cur: _Cursor, header: bytes) -> bool:
    stored = cur.number(header[148:156], "checksum")
    rest = header[:148] + header[156:]
    unsigned = sum(rest) + 8 * 32  # the checksum field itself counts as spaces
    signed = unsigned - 256 * sum(1 for b in rest if b >= 128)  # what some old writers summed
    return stored in (unsigned, signed)


def _pax(cur: _Cursor, data: bytes) -> dict[bytes, bytes]:
    """`"%d %s=%s\\n"` records of a pax extended header, each length checked before it is used."""
    out, pos = {}, 0
    while pos < len(data):
        if not data[pos:].strip(b"\0"):
            break  # NUL padding after the last record
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        if not _DECIMAL.fullmatch(digits):
            raise cur.damaged(f"pax record at byte {pos} of the header has no decimal length")
        length = int(digits)
        end = pos + length
        if length < len(digits) + 4 or end > len(data):  # shortest record: "N k=\n"
            raise cur.damaged(f"pax record at byte {pos} of the header says {length} bytes; "
                              f"the header holds {len(data) - pos} from there")
        record = data[space + 1:end]
        key, eq, value = record[:-1].partition(b"=")
        if not record.endswith(b"\n") or not eq or not key:
            raise cur.damaged(f"pax record at byte {pos} of the header is not 'LENGTH KEY=VALUE\\n'")
        out[key] = value
        pos = end
    return out


def tar_files(f: IO[bytes], shard: str = "shard") -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file, in order; directories, links and metadata skipped.
    `shard` names the stream in errors (a URL or file name)."""
    cur = _Cursor(f, shard)
    long_name: str | None = None
    pax: dict[bytes, bytes] = {}
    while True:
        cur.header_at, cur.member = cur.offset, ""
        header = f.read(BLOCK)
        if not header or header == _ZERO_BLOCK:
            return  # end-of-archive blocks (or a stream that ends cleanly between members)
        cur.offset += len(header)
        if cur.left is not None:
            cur.left -= len(header)
        cur.member = header[:100]
        if len(header) != BLOCK:
            raise cur.damaged(f"unexpected end of data in a header ({len(header)} of {BLOCK} bytes)")
        if not _checksum_ok(cur, header):
            raise cur.damaged("bad checksum in a tar header")
        kind = header[156:157]
        size = cur.number(header[124:136], "size")
        if b"size" in pax:
            if not _DECIMAL.fullmatch(pax[b"size"]):
                raise cur.damaged(f"pax size {pax[b'size'][:24]!r} is not a decimal number of bytes")
            size = int(pax[b"size"])
        if kind in (b"L", b"x", b"g") and size > MAX_METADATA_BYTES:
            raise cur.damaged(f"a {size}-byte {'long name' if kind == b'L' else 'pax header'} "
                              f"(at most {MAX_METADATA_BYTES} bytes)")
        data = cur.read(size, "the member's data")
        cur.read(-size % BLOCK, "the padding after the member's data")
        if kind == b"L":
            long_name = cur.text(data.rstrip(b"\0"), "long name")
            if not long_name:
                raise cur.damaged("an empty GNU long name")
        elif kind == b"x":
            pax = _pax(cur, data)
        elif kind == b"g":
            _pax(cur, data)  # global pax header: checked, but nothing a sample needs
        else:
            name = cur.text(header[:100].split(b"\0", 1)[0], "name")
            prefix = cur.text(header[345:500].split(b"\0", 1)[0], "name prefix") if header[257:262] == b"ustar" else ""
            path = cur.text(pax[b"path"], "pax path") if b"path" in pax else None
            name = path or long_name or (f"{prefix}/{name}" if prefix else name)
            cur.member = name
            long_name, pax = None, {}
            if kind in _FILE_TYPES:
                if not name:
                    raise cur.damaged("a file without a name")
                refuse_unsafe([name], shard)
                yield name, data
