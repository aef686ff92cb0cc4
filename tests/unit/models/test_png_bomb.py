"""A served model's PNG inputs are sized from their header before any pixel is decoded: a
decompression bomb (a few hundred bytes declaring 13,000 x 13,000 pixels) is refused, naming the
input and its index, without decoding it."""
from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from models.png import decode_pngs, encode_png

RES = 16


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, rows: int | None = None, idat: bytes | None = None) -> bytes:
    """An 8-bit grey PNG written by hand: a valid IHDR declaring width x height and an IDAT of
    `rows` zero rows (all of them by default; a bomb carries a tiny one), or the bytes `idat`."""
    rows = height if rows is None else rows
    raw = (b"\0" + b"\0" * width) * rows        # filter byte 0, then the row
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9) if idat is None else idat)
            + chunk(b"IEND", b""))


def test_the_hand_made_png_is_a_valid_png(pil_decodes):
    out = decode_pngs([png(RES, RES)], channels=1, size=RES, what="cond")
    assert out.shape == (1, 1, RES, RES) and int(out.sum()) == 0
    assert pil_decodes and set(pil_decodes) == {(RES, RES)}       # decoding goes through load: the spy sees it


def test_a_13000_square_bomb_is_refused_before_decoding(pil_decodes):
    bomb = png(13_000, 13_000, rows=1)
    assert len(bomb) < 1_000
    with pytest.warns(Image.DecompressionBombWarning):        # PIL alone only warns at this size
        assert Image.open(io.BytesIO(bomb)).size == (13_000, 13_000)
    good = encode_png(np.zeros((RES, RES, 3), np.uint8))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"^cond\[1\]: the model takes 16x16 images, got 13000x13000 "
                                             r"\(refused before decoding\)"):
            decode_pngs([good, bomb], channels=3, size=RES, what="cond")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert set(pil_decodes) == {(RES, RES)}, pil_decodes          # the good input only: the bomb's pixels never
    assert peak < 5_000_000, peak                     # decoded 13,000 x 13,000 would be 169 MB


def test_a_bomb_past_pils_own_limit_is_refused_naming_the_input(pil_decodes):
    # 20,000 x 20,000 is over twice PIL's MAX_IMAGE_PIXELS: PIL itself refuses to open it
    with pytest.raises(ValueError, match=r"^mask\[0\]: .*refused before decoding"):
        decode_pngs([png(20_000, 20_000, rows=1)], channels=1, size=RES, what="mask")
    assert pil_decodes == []


def test_the_pixel_cap_applies_at_the_models_own_size(monkeypatch, pil_decodes):
    monkeypatch.setenv("ORBITGEN_MAX_IMAGE_PIXELS", str(RES * RES - 1))
    with pytest.raises(ValueError, match=r"^cond\[0\]: 16x16 pixels, more than the 255 allowed .*"
                                         r"ORBITGEN_MAX_IMAGE_PIXELS"):
        decode_pngs([png(RES, RES)], channels=1, size=RES, what="cond")
    assert pil_decodes == []


def test_other_formats_and_damaged_pngs_are_refused_naming_the_input():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((RES, RES, 3), np.uint8)).save(buf, format="JPEG")
    with pytest.raises(ValueError, match=r"^cond\[0\]: not a PNG image"):
        decode_pngs([buf.getvalue()], channels=3, size=RES, what="cond")
    with pytest.raises(ValueError, match=r"^cond\[0\]: not a PNG image"):
        decode_pngs([b"\x89PNG\r\n\x1a\n garbage"], channels=3, size=RES, what="cond")
    damaged = png(RES, RES, idat=b"not a zlib stream")      # the right size, pixels that do not inflate
    with pytest.raises(ValueError, match=r"^cond\[0\]: a PNG whose pixels cannot be decoded"):
        decode_pngs([damaged], channels=3, size=RES, what="cond")
