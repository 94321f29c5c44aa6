"""A scene stored in one big compressed strip (as some exporters write): where GDAL shows it as
strips of a row, the first holding all the bytes, the rest must not be taken for absent (empty)
blocks: its tiles are those of a tiled copy; where GDAL shows the big strip, opening it says it
reads slowly and how to make a tiled copy. Tiled files, strips of a few rows and uncompressed
strips are not warned about."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pyarrow.parquet as pq
import rasterio

import tilescan
from conftest import scene
from tilescan.config import TilingConfig
from tilescan.scene.info import TilingWarning
from tilescan.scene.plan import open_scene


def _copy(src, dst, dtype="uint8", **layout):
    """The real scene tiled 6 x 5 times over (6,000 x 3,955 px: 71 MB of pixels, 142 MB as uint16), in ``layout``."""
    with rasterio.open(src) as ds:
        data, profile = ds.read().astype(dtype), ds.profile
    big = np.tile(data, (1, 6000 // data.shape[1] + 1, 5))[:, :6000]
    for key in ("blockxsize", "blockysize", "tiled", "compress"):
        profile.pop(key, None)
    profile.update(height=big.shape[1], width=big.shape[2], dtype=dtype, **layout)
    with rasterio.open(dst, "w", **profile) as out:
        out.write(big)
    return dst


def _strip_warnings(path) -> list[str]:
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        open_scene(path, TilingConfig(), 3, 128).close()
    return [str(w.message) for w in got if issubclass(w.category, TilingWarning) and "stored in compressed strips" in str(w.message)]


def _labels(out, name):
    return pq.read_table(out / name / "tiles.parquet", columns=["tile_index", "class_index"]).to_pylist()


def test_one_big_compressed_strip_is_read_whole(tmp_path):
    """GDAL shows this 71 MB strip as 6,000 strips of a row: all but the first were taken for
    absent blocks, and 88 of 96 tiles were skipped unread as empty."""
    src = scene("rasterio/RGB.byte.tif")
    one = _copy(src, tmp_path / "one.tif", tiled=False, blockysize=6000, compress="lzw")
    tiled = _copy(src, tmp_path / "tiled.tif", tiled=True, blockxsize=256, blockysize=256, compress="lzw")
    report = tilescan.run([one, tiled], tmp_path / "out", tile_size=512, gpkg=False)
    assert report.exit_code == 0
    assert _labels(tmp_path / "out", "one") == _labels(tmp_path / "out", "tiled")
    counts = [json.loads((tmp_path / "out" / n / "run.json").read_text())["counts"] for n in ("one", "tiled")]
    assert counts[0] == counts[1] and counts[0]["tiles_classified"] > 0.8 * counts[0]["tiles_total"], counts


def test_big_compressed_strips_are_said(tmp_path):
    src = scene("rasterio/RGB.byte.tif")
    one = _copy(src, tmp_path / "one.tif", "uint16", tiled=False, blockysize=6000, compress="lzw")
    (msg,) = _strip_warnings(one)
    assert "stored in compressed strips of 6000 rows (one strip holds the whole scene), 136 MiB each when decoded" in msg
    assert "gdal_translate -co TILED=YES -co COMPRESS=DEFLATE one.tif tiled.tif (or gdal_translate -of COG one.tif cog.tif)" in msg
    for name, layout in (("tiled", dict(tiled=True, blockxsize=256, blockysize=256, compress="lzw")),
                         ("rows", dict(tiled=False, blockysize=16, compress="lzw")),
                         ("raw", dict(tiled=False, blockysize=6000, compress=None))):
        assert _strip_warnings(_copy(src, tmp_path / f"{name}.tif", "uint16", **layout)) == [], name
