"""One-block COGs put together by tilescan (outputs/oneblock.py) against GDAL writing the
same file: every byte outside the deflated block, what GDAL reads back, and COG validity."""

from __future__ import annotations

import logging
import struct
import zlib

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine
from rio_cogeo.cogeo import cog_validate

from tilescan.outputs import oneblock
from tilescan.outputs.cog import write_labels_cog
from tilescan.outputs.heatmap import HeatmapWriter

CRSS = ["EPSG:32621", "EPSG:4326", "+proj=aea +lat_1=29.5 +lat_2=45.5 +lat_0=23 +lon_0=-96 +datum=NAD83 +units=m",
        None]
CLASSES = ["Airport", "Bare Land", 'say "hi" & <go>', "x"]


@pytest.fixture(autouse=True)
def _fresh():
    oneblock._known.clear()
    yield
    oneblock._known.clear()


@pytest.fixture
def assembled(monkeypatch):
    """How many files were put together here (not by GDAL)."""
    calls = []
    real = oneblock._assemble
    monkeypatch.setattr(oneblock, "_assemble", lambda *a, **k: (calls.append(a[-1] if len(a) > 5 else None),
                                                               real(*a, **k))[1])
    return calls


def _fields(path):
    """The file's bytes before the IFD, its IFD fields (tag -> type, count, value bytes) but
    the block's offset and size, and the block as stored before deflate."""
    b = open(path, "rb").read()
    off = struct.unpack_from("<I", b, 4)[0]
    fields = {}
    for i in range(struct.unpack_from("<H", b, off)[0]):
        tag, ty, n, value = struct.unpack_from("<HHII", b, off + 2 + 12 * i)
        size = oneblock._SIZES[ty] * n
        fields[tag] = (ty, n, b[off + 10 + 12 * i: off + 10 + 12 * i + size] if size <= 4 else b[value:value + size])
    at, count = (struct.unpack("<I", fields.pop(t)[2])[0] for t in (324, 325))
    return b[:off], fields, zlib.decompress(b[at:at + count]) if count else b""


def _read(path):
    with rasterio.open(path) as s:
        cmap = s.colormap(1) if s.dtypes[0] == "uint8" else None
        return (s.profile, s.tags(), s.tags(1), s.descriptions, cmap, s.read(), s.overviews(1),
                s.tags(ns="IMAGE_STRUCTURE"), s.crs.to_wkt() if s.crs else None)


def _same(ours, gdal):
    assert _fields(ours) == _fields(gdal)
    for a, b in zip(_read(ours), _read(gdal)):
        assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
    ok, errors, _ = cog_validate(str(ours), quiet=True)
    assert ok, errors


@pytest.mark.parametrize("crs", CRSS)
@pytest.mark.parametrize("shape", [(4, 4), (3, 7), (1, 1), (20, 33)])
def test_label_cog_put_together_equals_gdal(tmp_path, crs, shape, assembled):
    rng = np.random.default_rng(sum(shape))
    first = rng.integers(-1, len(CLASSES), shape)
    write_labels_cog(tmp_path / "first.tif", first, Affine(30, 0, 500, 0, -30, 900), crs, CLASSES,
                     tags={"MODEL_ID": "m-1", "TILE_PX": 128})
    assert list(oneblock._known.values()) != [None]  # learned from GDAL's first file
    labels = rng.integers(-1, len(CLASSES), shape)
    labels.flat[0] = 2
    tf = Affine(10.5, 0, -123456.25, 0, -7.25, 4e6 + 0.125)
    tags = {"MODEL_ID": 'another "model" <&> here', "TILE_PX": 64}
    write_labels_cog(tmp_path / "ours.tif", labels, tf, crs, CLASSES, tags=tags)
    assert assembled.count(None) == 2  # both put together here, the first once learnt (learning rebuilds with GDAL's block)
    oneblock._known.clear()  # GDAL writes the same file again
    write_labels_cog(tmp_path / "gdal.tif", labels, tf, crs, CLASSES, tags=tags)
    assert oneblock._known  # this one went through GDAL (and was learned again)
    _same(tmp_path / "ours.tif", tmp_path / "gdal.tif")


def _heat(tmp_path, name, w, h, heat, crs, tf, tags):
    """A heatmap COG of one tile covering a ``w`` x ``h`` scene (the heat at full scale)."""
    hw = HeatmapWriter(tmp_path / name, w, h, tf, crs, 1.0, w, w)
    hw.add((0, 0, w, h), heat)
    return hw.close(tags)


@pytest.mark.parametrize("crs", CRSS[:2] + [None])
@pytest.mark.parametrize("size", [16, 37, 128, 512])
def test_heat_cog_put_together_equals_gdal(tmp_path, crs, size, assembled):
    rng = np.random.default_rng(size)
    tf = Affine(2.0, 0, 1000.0, 0, -2.0, 5000.0)
    _heat(tmp_path, "first.tif", size, size, rng.random((size, size), np.float32), crs, tf, {"CAM_LAYER": "a"})
    heat = rng.random((size, size), np.float32)
    heat[: size // 3] = 0.0
    tf2 = Affine(0.3, 0, -77.5, 0, -0.3, 45.25)
    _heat(tmp_path, "ours.tif", size, size, heat, crs, tf2, {"CAM_LAYER": "b & c"})
    assert assembled.count(None) == 2
    oneblock._known.clear()
    _heat(tmp_path, "gdal.tif", size, size, heat, crs, tf2, {"CAM_LAYER": "b & c"})
    _same(tmp_path / "ours.tif", tmp_path / "gdal.tif")


def test_what_the_rebuild_cannot_match_stays_with_gdal(tmp_path, monkeypatch, assembled):
    labels = np.array([[0, 1], [2, -1]])
    tf = Affine(10, 0, 100, 0, -10, 200)
    # a rebuild that does not match GDAL's first file: the kind is GDAL's from then on
    monkeypatch.setattr(oneblock, "_metadata", lambda tags, desc: b"<GDALMetadata/>\0")
    write_labels_cog(tmp_path / "a.tif", labels, tf, "EPSG:4326", CLASSES)
    assert list(oneblock._known.values()) == [None]
    write_labels_cog(tmp_path / "b.tif", labels, tf, "EPSG:4326", CLASSES)
    assert None not in assembled  # the second file too came from GDAL
    monkeypatch.undo()
    oneblock._known.clear()
    # values GDAL writes its own way (leading space, non-ASCII), a rotated or south-up grid, a block all
    # at nodata (GDAL leaves it out): written by GDAL, readable as before
    for i, (lab, tags, t) in enumerate([(labels, {"NOTE": " padded"}, tf), (labels, {"NOTE": "café"}, tf),
                                        (labels, {}, Affine(1, 0.5, 0, 0.5, -1, 0)),
                                        (labels, {}, Affine(5, 0, 0, 0, 5, 0)),
                                        (np.full((2, 2), -1), {}, tf)]):
        for k in range(2):  # the second of its kind would be put together, if it fitted
            p = tmp_path / f"f{i}-{k}.tif"
            write_labels_cog(p, lab, t, "EPSG:4326", CLASSES, tags=tags)
            with rasterio.open(p) as s:
                assert s.read(1).tolist() == np.where(lab < 0, 255, lab).tolist()
                assert all(s.tags()[key] == v.strip() for key, v in tags.items())  # GDAL drops the space
        assert oneblock._known == {}  # not even learned: none of these is put together
    assembled.clear()
    assert oneblock.write(tmp_path / "x.tif", np.zeros((2, 2), np.uint8), transform=Affine(1, 0.5, 0, 0.5, -1, 0),
                          crs_key="", nodata=255, tags={}, description="d", colormap=(), compress="deflate",
                          block=16, gdal_write=lambda: assembled.append("gdal")) is False
    assert assembled == ["gdal"]


def test_many_small_scenes_get_gdal_identical_cogs(tmp_path, assembled):
    """Two runs' worth of label COGs in one process: the first written by GDAL and learnt, then
    each put together, equal to GDAL writing it but for how the block was deflated."""
    crs = CRS.from_epsg(32621)
    rng = np.random.default_rng(5)
    for k in range(4):
        labels = rng.integers(-1, len(CLASSES), (4, 4))
        tf = Affine(128, 0, 1000 * k, 0, -128, 9000)
        known = dict(oneblock._known)
        write_labels_cog(tmp_path / f"{k}.tif", labels, tf, crs, CLASSES, tags={"SCENE": f"chip-{k:03d}"})
        oneblock._known.clear()
        write_labels_cog(tmp_path / f"{k}-gdal.tif", labels, tf, crs, CLASSES, tags={"SCENE": f"chip-{k:03d}"})
        oneblock._known.update(known or oneblock._known)
        _same(tmp_path / f"{k}.tif", tmp_path / f"{k}-gdal.tif")
    assert assembled.count(None) == 8  # every file (each "-gdal" one too, once learnt from GDAL's)


def test_a_files_bytes_do_not_hang_on_which_came_first(tmp_path):
    """The same label and heat COGs written first of their kind in a process and after
    another (as a resumed run or another shard writes them) are the same bytes."""
    crs = CRS.from_epsg(32621)
    rng = np.random.default_rng(7)
    labels = [rng.integers(-1, len(CLASSES), (4, 4)) for _ in range(2)]
    heats = [rng.random((64, 64), np.float32) for _ in range(2)]
    for order in ((0, 1), (1, 0)):
        oneblock._known.clear()  # a fresh process
        for k in order:
            tf = Affine(128, 0, 1000 * k, 0, -128, 9000)
            write_labels_cog(tmp_path / f"l{k}-{order[0]}.tif", labels[k], tf, crs, CLASSES, tags={"SCENE": f"c{k}"})
            _heat(tmp_path, f"h{k}-{order[0]}.tif", 64, 64, heats[k], crs, tf, {"SCENE": f"c{k}"})
    for name in ("l0", "l1", "h0", "h1"):
        assert (tmp_path / f"{name}-0.tif").read_bytes() == (tmp_path / f"{name}-1.tif").read_bytes(), name


def test_kinds_remembered_are_bounded(tmp_path):
    """Scenes of ever new sizes do not grow the remembered layouts without end."""
    for k in range(oneblock._KINDS + 6):
        write_labels_cog(tmp_path / "l.tif", np.zeros((1, k + 1)), Affine(10, 0, 100, 0, -10, 200), "EPSG:4326", CLASSES)
    assert len(oneblock._known) == oneblock._KINDS
    assert all(v is not None for v in oneblock._known.values())


def test_a_small_block_is_written_without_a_logged_warning(tmp_path, caplog):
    """A label raster of 6 x 8 tiles gets one 16-px block (GDAL writes it, with a notice that
    blocks under 128 px are unusual): the file has that block, and a Python caller's log gets
    no warning about it."""
    labels = np.arange(48, dtype=np.int16).reshape(6, 8) % len(CLASSES)
    with caplog.at_level(logging.INFO):  # GDAL's notices reach rasterio's logger
        write_labels_cog(tmp_path / "labels.tif", labels, Affine(5.0, 0, 0, 0, -5.0, 0), "EPSG:32621", CLASSES)
    with rasterio.open(tmp_path / "labels.tif") as ds:
        assert ds.block_shapes == [(16, 16)] and ds.colormap(1)[0][:3] != (0, 0, 0)
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("rasterio") and r.levelno >= logging.INFO]
