"""Blocks of a tiled GeoTIFF known to hold no valid pixel, found from the block index before anything is decoded.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
from rasterio.windows import Window

from .grid import _ceil_div
from .info import open_quiet, pixel_interleaved

#: A stored block is compared byte for byte with the others of its size only when it is at
#: most this share of its raw size (a block of one value compresses to a sliver of it).
REPEAT_MAX_SHARE = 0.125


#: Most bytes read from the file to compare such blocks.
REPEAT_MAX_BYTES = 64 * 2**20


#: Most blocks decoded to prove that a group of identical (or absent) blocks is empty.
MAX_PROOF_READS = 64


#: Scenes of more blocks than this are not scanned for empty blocks (the scan walks the
#: block index in Python).
MAX_SCAN_BLOCKS = 2**22


# --------------------------------------------------------------------------------------
# finding the data


@dataclass(frozen=True)
class BlockCoverage:
    """The blocks of a scene's file proven to hold no valid pixel, found without decoding them.

    Evidence, cheapest first: the TIFF block index (GDAL's ``BLOCK_SIZE_x_y`` /
    ``BLOCK_OFFSET_x_y`` items of the ``TIFF`` metadata domain, read from the file's header,
    so a remote COG costs no range request per block): a block with no bytes (a sparse
    file) reads as the fill value; blocks whose compressed bytes are identical decode to the
    same pixels (compared only for small blocks of a repeated size, in a local file). Each
    such group is proven empty by decoding one block of it with the reader's own validity
    rule (nodata, alpha, internal mask, NaN). Overviews are not used as evidence: an
    overview pixel at nodata does not prove that the full-resolution pixels under it are.

    ``empty[i, j]`` is True when block row ``i``, column ``j`` (``block_h`` x ``block_w``
    scene pixels, cut at the scene's edge) holds no valid pixel; False means "not known to
    be empty", read as usual.
    """

    block_h: int
    block_w: int
    empty: np.ndarray
    absent: int = 0
    """Empty blocks with no bytes in the file (sparse)."""
    repeated: int = 0
    """Empty blocks found through bytes identical to a block decoded as empty."""
    proof_reads: int = 0
    """Blocks decoded to prove that their group is empty."""
    seconds: float = 0.0
    last_block: tuple[int, int] | None = None
    """The stored block at the highest file offset (a truncated file lacks it)."""

    @property
    def n_blocks(self) -> int:
        return int(self.empty.size)

    @property
    def n_empty(self) -> int:
        return int(np.count_nonzero(self.empty))

    @property
    def all_empty(self) -> bool:
        return bool(self.empty.all())

    def to_dict(self) -> dict:
        return {"block_shape": [self.block_h, self.block_w], "blocks": self.n_blocks,
                "blocks_empty": self.n_empty, "absent": self.absent, "repeated": self.repeated,
                "proof_reads": self.proof_reads, "seconds": round(self.seconds, 4)}


def _block_index(ds, bidx: int, nbr: int, nbc: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte count and file offset of every block of band ``bidx`` (0 for a block not stored)."""
    sizes = np.zeros((nbr, nbc), np.int64)
    offsets = np.zeros((nbr, nbc), np.int64)
    get = ds.get_tag_item
    for i in range(nbr):
        for j in range(nbc):
            s = get(f"BLOCK_SIZE_{j}_{i}", "TIFF", bidx=bidx)
            if s and s != "0":
                sizes[i, j] = int(s)
                offsets[i, j] = int(get(f"BLOCK_OFFSET_{j}_{i}", "TIFF", bidx=bidx) or 0)
    return sizes, offsets


def _content_tokens(sizes: np.ndarray, offsets: np.ndarray, raw_bytes: int, fh, budget: list[int]) -> np.ndarray:
    """Per block: 0 not stored, ``k > 0`` the ``k``-th distinct content among the small
    blocks of a repeated size (compared by a hash of their bytes), -1 unknown."""
    tok = np.full(sizes.size, -1, np.int64)
    flat_s, flat_o = sizes.ravel(), offsets.ravel()
    tok[flat_s == 0] = 0
    if fh is None:
        return tok
    small = np.flatnonzero((flat_s > 0) & (flat_s <= raw_bytes * REPEAT_MAX_SHARE))
    if small.size < 2:
        return tok
    values, counts = np.unique(flat_s[small], return_counts=True)
    cand = small[np.isin(flat_s[small], values[counts >= 2])]
    ids: dict[bytes, int] = {}
    for k in cand[np.argsort(flat_o[cand], kind="stable")]:  # in file order: sequential reads
        size = int(flat_s[k])
        if size > budget[0]:
            break
        budget[0] -= size
        fh.seek(int(flat_o[k]))
        digest = hashlib.blake2b(fh.read(size), digest_size=16).digest()
        tok[k] = ids.setdefault(digest, len(ids) + 1)
    return tok


def _mask_ifd(path: str, ds):
    """The internal mask's own TIFF directory (``GTIFF_DIR:k``), opened, or None: the first
    directory after the image's of the image's size and one band (a multi-page file, where
    that could be another image, has subdatasets and is left out)."""
    if ds.subdatasets:
        return None
    for k in range(2, 2 * (1 + len(ds.overviews(1))) + 2):
        try:
            m = open_quiet(f"GTIFF_DIR:{k}:{path}")
        except Exception:
            return None
        if (m.width, m.height, m.count) == (ds.width, ds.height, 1):
            return m
        m.close()
    return None


def find_empty_blocks(reader) -> BlockCoverage | None:
    """The blocks of ``reader``'s scene (a :class:`~tilescan.scene.reader.SceneReader`) that hold no
    valid pixel, from the TIFF block index and a few decoded blocks; None when not a tiled
    GeoTIFF with one block shape or too many blocks."""
    ds = reader._ds()
    if ds.driver != "GTiff":
        return None
    H, W = reader.info.height, reader.info.width
    shapes = {ds.block_shapes[b - 1] for b in reader._read_idx}
    if len(shapes) != 1:
        return None
    fbh, fbw = shapes.pop()  # the blocks as stored (may exceed a small scene)
    bh, bw = min(fbh, H), min(fbw, W)
    nbr, nbc = _ceil_div(H, bh), _ceil_div(W, bw)
    if nbr * nbc > MAX_SCAN_BLOCKS:
        return None
    pixel = pixel_interleaved(ds)
    planes = [1] if pixel else list(reader._read_idx)
    raw_bytes = fbh * fbw * reader._dtype.itemsize * (ds.count if pixel else 1)
    path = str(reader.info.path)
    fh = open(path, "rb") if os.path.isfile(path) else None  # remote: absent blocks only
    budget = [REPEAT_MAX_BYTES]
    tokens, last, last_off = [], None, -1
    use_mask, mask_ds = False, None
    try:
        indexes = [(ds, b, raw_bytes) for b in planes]
        mask_ds = _mask_ifd(path, ds) if reader.internal_mask else None
        if mask_ds is not None and mask_ds.block_shapes[0] == (fbh, fbw):
            indexes.append((mask_ds, 1, fbh * fbw))
            use_mask = True
        for src, b, raw in indexes:
            sizes, offsets = _block_index(src, b, nbr, nbc)
            if sizes.max(initial=0) > 2 * raw + 4096:
                # more bytes than a block can hold: GDAL shows one big stored strip as strips of a
                # row (or a few), the first with all the bytes and the rest with none, not absent
                return None
            k = int(np.argmax(offsets))
            if sizes.flat[k] and offsets.flat[k] > last_off:
                last_off, last = int(offsets.flat[k]), divmod(k, nbc)
            tokens.append(_content_tokens(sizes, offsets, raw, fh, budget))
    finally:
        if fh is not None:
            fh.close()
        if mask_ds is not None:
            mask_ds.close()
    # blocks with the same content in every plane decode alike: prove one per group
    keys = np.stack(tokens, axis=1)
    known = np.flatnonzero((keys >= 0).all(axis=1))
    empty = np.zeros(nbr * nbc, bool)
    absent = repeated = reads = 0
    if known.size:
        groups, inv = np.unique(keys[known], axis=0, return_inverse=True)
        inv = inv.ravel()
        rows, cols = np.divmod(known, nbc)
        vis_h, vis_w = np.minimum(bh, H - rows * bh), np.minimum(bw, W - cols * bw)
        for g in np.argsort(-np.bincount(inv), kind="stable"):
            members = np.flatnonzero(inv == g)
            while members.size and reads < MAX_PROOF_READS:
                # the member showing most of the block: an edge block shows a corner of
                # the same content, so it is proven by any member showing at least as much
                rep = members[np.argmax(vis_h[members] * vis_w[members])]
                reads += 1
                try:
                    _, valid = reader._read_raw(Window(int(cols[rep] * bw), int(rows[rep] * bh),
                                                     int(vis_w[rep]), int(vis_h[rep])), use_mask=use_mask)
                except Exception:
                    break
                if valid.any():
                    break
                ok = (vis_h[members] <= vis_h[rep]) & (vis_w[members] <= vis_w[rep])
                empty[known[members[ok]]] = True
                if not groups[g].any():
                    absent += int(ok.sum())
                else:
                    repeated += int(ok.sum())
                members = members[~ok]
    return BlockCoverage(bh, bw, empty.reshape(nbr, nbc), absent, repeated, reads, 0.0, last)
