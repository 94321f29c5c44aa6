"""COGs that fit one block (no overviews), written without GDAL's per-file set-up.

A small scene's label and heat COGs are a few kB, yet GDAL's COG driver spends more on each
(a source dataset, the CRS turned into GeoKeys, the copy) than on encoding the pixels. Here
the first file of each kind (shape, type, CRS, colour table, band description, tag names)
is written by GDAL as before and taken apart; once the same file rebuilt here equals it,
byte for byte apart from how the block was deflated, later files of that kind are put
together from its parts: GDAL's header and IFD entries with this file's georeferencing,
metadata and block. Anything the rebuild cannot match stays with GDAL.
"""

from __future__ import annotations

import os
import re
import struct
import threading
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from xml.sax.saxutils import escape

import numpy as np

from .png import _deflater

# TIFF field types and their sizes in bytes
_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8}
_OFFSETS, _COUNTS, _SCALE, _TIEPOINT, _METADATA = 324, 325, 33550, 33922, 42112
_KEY = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True)
class _Layout:
    """A one-block COG as GDAL wrote it: the bytes before the IFD (header, ghost area), the
    IFD entries (tag, type, count, value bytes) in tag order, the tags whose values lie
    after the IFD in the order they lie there, and the block's shape and encoding."""

    head: bytes
    entries: tuple[tuple[int, int, int, bytes], ...]
    outside: tuple[int, ...]
    block: tuple[int, int]
    predictor: int


_known: dict[tuple, _Layout | None] = {}  # kind -> its layout, or None: GDAL writes that kind
_lock = threading.Lock()
_KINDS = 64  # kinds remembered (a few kB each); scenes of ever new sizes evict the oldest


def write(path: str | os.PathLike, data: np.ndarray, *, transform: Any, crs_key: str, nodata: float,
          tags: Mapping[str, str], description: str, colormap: tuple, compress: str,
          block: int, gdal_write: Callable[[], None]) -> bool:
    """Write the 2-D ``data`` at ``path`` as the COG ``gdal_write()`` would write there (one
    block of ``block`` px, deflate with predictor, ``tags`` and ``description`` on band 1).
    Returns True when it was put together here (the first of its kind too, once learnt from
    GDAL's), False when ``gdal_write`` wrote it."""
    kind = (data.dtype.str, data.shape, crs_key, nodata, colormap, description, compress, block,
            tuple(sorted(tags)))
    layout = _known.get(kind, False)
    fast = layout is not None and _fits(data, transform, tags, description, compress, nodata)
    if fast and layout is not False:
        with open(path, "wb") as f:
            f.write(_assemble(layout, data, transform, tags, description))
        return True
    gdal_write()
    if fast:  # the first of its kind: learn it, if the rebuild matches GDAL's file
        with open(path, "rb") as f:
            written = f.read()
        learned = _learn(written, data, transform, tags, description)
        with _lock:
            while len(_known) >= _KINDS:
                _known.pop(next(iter(_known)))
            _known.setdefault(kind, learned)
        if learned is not None:  # its block deflated here too, as the others' are: a file's bytes do not
            with open(path, "wb") as f:  # hang on which scene of a run came first (a resumed run, shards)
                f.write(_assemble(learned, data, transform, tags, description))
            return True
    return False


def _fits(data: np.ndarray, transform: Any, tags: Mapping[str, str], description: str, compress: str,
          nodata: float) -> bool:
    """Whether a file can be put together here: deflate, north-up (x east, y south), ASCII metadata,
    and a block that holds data (GDAL leaves a block all at nodata out of the file)."""
    if compress != "deflate" or data.dtype not in (np.uint8, np.float32):
        return False
    if transform.b or transform.d or not (transform.a > 0 > transform.e):  # GDAL stores others another way
        return False
    for text in (*tags.values(), description):
        if not (text.isascii() and text.isprintable() and text == text.strip()):
            return False
    if not all(_KEY.fullmatch(k) for k in tags) or len({k.lower() for k in tags}) != len(tags):
        return False
    return not bool(np.all(data == nodata))


def _esc(text: str) -> str:
    return escape(text, {'"': "&quot;"})


def _metadata(tags: Mapping[str, str], description: str) -> bytes:
    """GDAL's metadata tag: items in case-blind name order, values escaped twice as GDAL
    does, then the band description; NUL-terminated."""
    items = "".join(f'  <Item name="{k}">{_esc(_esc(tags[k]))}</Item>\n' for k in sorted(tags, key=str.lower))
    desc = f'  <Item name="DESCRIPTION" sample="0" role="description">{_esc(_esc(description))}</Item>\n'
    return f"<GDALMetadata>\n{items}{desc}</GDALMetadata>\n\x00".encode("ascii")


def _block(data: np.ndarray, block: tuple[int, int], predictor: int) -> bytes:
    """The block as stored before deflate: the raster zero-padded to the block, then
    TIFF's horizontal (2) or floating-point (3) predictor applied row by row."""
    h, w = block
    a = np.zeros((h, w), data.dtype)
    a[:data.shape[0], :data.shape[1]] = data
    if predictor == 3:  # bytes of each row regrouped most significant first, then differenced
        size = a.dtype.itemsize
        b = a.astype(a.dtype.newbyteorder("<"), copy=False).view(np.uint8).reshape(h, w, size)
        rows = np.ascontiguousarray(b[:, :, ::-1].transpose(0, 2, 1)).reshape(h, w * size)
    else:
        rows = a.view(np.uint8).reshape(h, -1) if predictor == 2 else None
    if rows is None:
        return a.tobytes()
    out = rows.copy()
    np.subtract(rows[:, 1:], rows[:, :-1], out=out[:, 1:])  # modulo 256
    return out.tobytes()


def _deflate(raw: bytes) -> bytes:
    z = _deflater()  # the quicklook's: ISA-L at level 1, else zlib
    return z.compress(raw) + z.flush()


def _values(transform: Any, tags: Mapping[str, str], description: str) -> dict[int, bytes]:
    """This file's own tag values (all but the block's offset and size)."""
    return {_SCALE: struct.pack("<3d", transform.a, -transform.e, 0.0),
            _TIEPOINT: struct.pack("<6d", 0.0, 0.0, 0.0, transform.c, transform.f, 0.0),
            _METADATA: _metadata(tags, description)}


def _assemble(layout: _Layout, data: np.ndarray, transform: Any, tags: Mapping[str, str],
              description: str, stored: bytes | None = None) -> bytes:
    """The whole file: ``layout`` with this file's values and block (``stored``: the
    deflated block to use, else deflated here)."""
    own = _values(transform, tags, description)
    if stored is None:
        stored = _deflate(_block(data, layout.block, layout.predictor))
    entries = [(t, ty, len(own[t]) // _SIZES[ty], own[t]) if t in own else (t, ty, n, v)
               for t, ty, n, v in layout.entries]
    at = len(layout.head) + 2 + 12 * len(entries) + 4
    where, tail = {}, []
    values = {t: v for t, _, _, v in entries}
    for t in layout.outside:
        if at % 2:  # values start on a word boundary; the block's leader follows the last at once
            tail.append(b"\0")
            at += 1
        where[t] = at
        tail.append(values[t])
        at += len(values[t])
    data_at = at + 4  # after the block's 4-byte size (GDAL's block leader)
    ifd = [struct.pack("<H", len(entries))]
    for t, ty, n, v in entries:
        if t == _OFFSETS:
            v = struct.pack("<I", data_at)
        elif t == _COUNTS:
            v = struct.pack("<I", len(stored))
        if t in where:
            ifd.append(struct.pack("<HHII", t, ty, n, where[t]))
        else:
            ifd.append(struct.pack("<HHI", t, ty, n) + v.ljust(4, b"\0"))
    ifd.append(b"\0\0\0\0")
    # the block with GDAL's leader (its size) and trailer (its last 4 bytes again)
    return b"".join([layout.head, *ifd, *tail, struct.pack("<I", len(stored)), stored, stored[-4:]])


def _learn(written: bytes, data: np.ndarray, transform: Any, tags: Mapping[str, str],
           description: str) -> _Layout | None:
    """The layout of GDAL's ``written`` file, if rebuilding that file here gives the same
    bytes (with GDAL's deflated block); None if not (GDAL then writes every file of its kind)."""
    try:
        if written[:4] != b"II*\0":
            return None
        off = struct.unpack_from("<I", written, 4)[0]
        n = struct.unpack_from("<H", written, off)[0]
        entries, outside = [], []
        for i in range(n):
            tag, ty, count, value = struct.unpack_from("<HHII", written, off + 2 + 12 * i)
            size = _SIZES[ty] * count
            if size <= 4:
                entries.append((tag, ty, count, written[off + 10 + 12 * i: off + 10 + 12 * i + size]))
            else:
                entries.append((tag, ty, count, written[value:value + size]))
                outside.append((value, tag))
        tags_of = {t: v for t, _, _, v in entries}
        if struct.unpack_from("<I", written, off + 2 + 12 * n)[0] != 0 or 330 in tags_of:
            return None  # overviews or sub-images: not one block
        if _SCALE not in tags_of or _TIEPOINT not in tags_of:
            return None  # georeferenced another way (or not at all)
        (data_at,), (count,) = struct.unpack("<I", tags_of[_OFFSETS]), struct.unpack("<I", tags_of[_COUNTS])
        block = (struct.unpack("<H", tags_of[323])[0], struct.unpack("<H", tags_of[322])[0])
        predictor = struct.unpack("<H", tags_of.get(317, b"\1\0"))[0]
        layout = _Layout(written[:off], tuple(entries), tuple(t for _, t in sorted(outside)), block, predictor)
        stored = written[data_at:data_at + count]
        if zlib.decompress(stored) != _block(data, block, predictor):
            return None
        return layout if _assemble(layout, data, transform, tags, description, stored) == written else None
    except (struct.error, KeyError, zlib.error, ValueError):
        return None
