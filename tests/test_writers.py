"""Tests for tilescan.outputs: real files written and read back with the tools users load
them with (geopandas, pyarrow, rasterio, rio-cogeo, GDAL through VRT copies). No mocks."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyproj
import pytest
import rasterio
import rasterio.shutil
from PIL import Image
from rasterio.transform import Affine, from_origin
from rio_cogeo.cogeo import cog_validate

from tilescan.errors import OutputError
from tilescan.outputs.cog import HEATMAP_NODATA, LABEL_NODATA, write_labels_cog
from tilescan.outputs import heatmap as heatmap_mod, oneblock
from tilescan.outputs.heatmap import HeatmapWriter, _HeatGrid, read_heatmap_preview
from tilescan.outputs.table import TileTable
from tilescan.outputs.files import atomic_output, write_json
from tilescan.outputs.palette import class_colors
from tilescan.outputs.quicklook import quicklook_layout, write_quicklook
from tilescan.outputs.geometry import wkb_polygons
from conftest import REPO, assert_geoparquet_conformant

gpd = pytest.importorskip("geopandas")
shapely = pytest.importorskip("shapely")

CLASSES = ["Airport", "BareLand", "Beach", "Forest", "Bridge & Road"]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".strips-" in p.name)


# --------------------------------------------------------------------------- helpers


def tile_batch(transform: Affine, width: int, height: int, tile: int, stride: int,
               rng: np.random.Generator, k: int = len(CLASSES)) -> dict:
    """Tiles of a scene grid as TileTable columns (footprints from the window transforms)."""
    rows = np.arange(0, max(height - tile, 0) + 1, stride)
    cols = np.arange(0, max(width - tile, 0) + 1, stride)
    r, c = np.meshgrid(np.arange(rows.size), np.arange(cols.size), indexing="ij")
    r, c = r.ravel(), c.ravel()
    row_off, col_off = rows[r], cols[c]
    px = np.stack([col_off, col_off + tile, col_off + tile, col_off], axis=1).astype(float)
    py = np.stack([row_off, row_off, row_off + tile, row_off + tile], axis=1).astype(float)
    xs, ys = transform @ (px, py)
    n = r.size
    logits = rng.normal(size=(n, k))
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    ci = probs.argmax(1)
    return {
        "tile_index": np.arange(n, dtype=np.int64), "row": r, "col": c,
        "col_off": col_off, "row_off": row_off, "width": np.full(n, tile), "height": np.full(n, tile),
        "corners": np.stack([xs, ys], axis=-1),
        "valid_fraction": rng.uniform(0.5, 1, n).astype(np.float32),
        "class_index": ci.astype(np.int16), "confidence": probs.max(1),
        "probabilities": probs,
        "cam_mean": rng.uniform(0, 1, n).astype(np.float32),
        "cam_max": rng.uniform(0, 1, n).astype(np.float32),
        "cam_raw_max": rng.uniform(0, 5, n).astype(np.float32),
        "cam_peak_x": xs.mean(1), "cam_peak_y": ys.mean(1),
    }


def subset(batch: dict, idx) -> dict:
    return {key: np.asarray(v)[idx] for key, v in batch.items()}


# --------------------------------------------------------------------------- atomic / json


def test_atomic_output_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.txt.tmp-")
            tmp.write_text("half written")
            raise RuntimeError("killed")
    assert not target.exists()
    assert leftovers(tmp_path) == []

    target.write_text("old")
    with atomic_output(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"  # not visible until the body finishes
    assert target.read_text() == "new"
    assert leftovers(tmp_path) == []


def test_first_write_loads_no_pyogrio_and_its_errors_still_name_the_file(tmp_path):
    """A run's first file does not pay for importing pyogrio (and geopandas and pandas, where
    installed): atomic_output looks its error types up only when something raises. A GDAL
    error from a body that loaded pyogrio is still an OutputError naming the file."""
    code = textwrap.dedent(f"""
        import sys
        from tilescan.errors import OutputError
        from tilescan.outputs.files import atomic_output, write_json
        write_json({str(tmp_path / "a.json")!r}, {{"a": 1}})
        print("pyogrio" in sys.modules)
        try:
            with atomic_output({str(tmp_path / "t.gpkg")!r}) as tmp:
                open(tmp, "w").write("half")
                import pyogrio.errors
                raise pyogrio.errors.DataSourceError("no such layer")
        except OutputError as e:
            print(e)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    loaded, message = res.stdout.strip().splitlines()
    assert loaded == "False"
    assert message == f"{tmp_path / 't.gpkg'}: cannot write (no such layer)"
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_staging_folder_is_synced_once_after_its_files(tmp_path, monkeypatch):
    """Inside ``folder_synced_once`` each file is still fsync'ed, but its folder only once, at
    the end (not after a failed block); other folders as before."""
    from tilescan.outputs import files

    synced: list[tuple[str, str]] = []
    monkeypatch.setattr(files, "_fsync_path", lambda p: synced.append(("file", Path(p).name)))
    monkeypatch.setattr(files, "_fsync_dir", lambda d: synced.append(("dir", Path(d).name)))
    stage, other = tmp_path / "stage", tmp_path / "other"
    stage.mkdir()
    other.mkdir()
    with files.folder_synced_once(stage):
        write_json(stage / "a.json", {"a": 1})
        write_json(stage / "b.json", {"b": 2})
        write_json(other / "c.json", {"c": 3})
        assert ("dir", "stage") not in synced and ("dir", "other") in synced
    assert [k for k, n in synced if k == "file"] == ["file"] * 3
    assert synced[-1] == ("dir", "stage") and synced.count(("dir", "stage")) == 1
    synced.clear()
    with pytest.raises(RuntimeError), files.folder_synced_once(stage):
        write_json(stage / "d.json", {"d": 4})
        raise RuntimeError("the unit failed")
    assert [k for k, _ in synced] == ["file"]  # the file, and no folder sync
    write_json(stage / "e.json", {"e": 5})  # after the block: synced per file again
    assert synced[-1] == ("dir", "stage")


def test_write_json_numpy_and_strict(tmp_path):
    p = write_json(tmp_path / "m.json", {"a": np.float32(1.5), "b": np.arange(3), "c": np.int64(7),
                                         "d": float("nan"), "e": Path("x/y"), "f": (np.bool_(True),)})
    text = p.read_text()
    assert json.loads(text) == {"a": 1.5, "b": [0, 1, 2], "c": 7, "d": None, "e": "x/y", "f": [True]}
    assert "\n  " in text  # indented
    with pytest.raises(TypeError):
        write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists() and leftovers(tmp_path) == []


def _writers(parent: Path):
    rng = np.random.default_rng(0)
    table = TileTable()
    table.add(tile_batch(from_origin(0, 100, 1, 1), 64, 64, 32, 32, rng))
    yield "json", lambda: write_json(parent / "m.json", {"a": 1})
    yield "parquet", lambda: table.write_geoparquet(parent / "t.parquet", "EPSG:32618", CLASSES, "s", "m")
    yield "gpkg", lambda: table.write_gpkg(parent / "t.gpkg", "EPSG:32618", CLASSES, "s", "m")
    yield "labels", lambda: write_labels_cog(parent / "l.tif", np.zeros((2, 2), int), from_origin(0, 10, 1, 1),
                                             "EPSG:32618", CLASSES)
    yield "heat", lambda: HeatmapWriter(parent / "h.tif", 64, 64, from_origin(0, 64, 1, 1), None, 0.5, 32, 32)
    yield "quicklook", lambda: write_quicklook(parent / "q.png", np.zeros((8, 8, 3), np.uint8), None,
                                               None, None, CLASSES)


@pytest.mark.parametrize("which", ["json", "parquet", "gpkg", "labels", "heat", "quicklook"])
def test_unwritable_destination_raises_output_error(tmp_path, which):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a regular file")  # a parent that is a file fails even for root
    write = dict(_writers(blocker))[which]
    with pytest.raises(OutputError) as info:
        write()
    assert str(blocker) in str(info.value) and info.value.path.startswith(str(blocker))
    assert info.value.exit_code == 6


def test_file_too_large_becomes_output_error(tmp_path):
    """A real EFBIG (RLIMIT_FSIZE) in a child process: OutputError naming the file, no
    partial file left at the final path or as a temporary."""
    script = textwrap.dedent(f"""
        import resource, signal, numpy as np
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        from rasterio.transform import from_origin
        from tilescan.errors import OutputError
        from tilescan.outputs.table import TileTable; from tilescan.outputs.files import write_json
        out = {str(tmp_path)!r}
        try:
            write_json(out + "/big.json", {{"x": list(range(100000))}})
        except OutputError as e:
            print("JSON", e.path, e.message)
        rng = np.random.default_rng(1)
        t = TileTable()
        n = 20000
        t.add({{"tile_index": np.arange(n), "row": np.zeros(n), "col": np.arange(n), "col_off": np.arange(n),
               "row_off": np.zeros(n), "width": np.ones(n), "height": np.ones(n),
               "corners": rng.normal(size=(n, 4, 2)), "class_index": np.zeros(n), "confidence": rng.random(n),
               "probabilities": rng.random((n, 3))}})
        try:
            t.write_geoparquet(out + "/big.parquet", None, ["a", "b", "c"], "s", "m")
        except OutputError as e:
            print("PARQUET", e.path, e.message)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"JSON {tmp_path}/big.json cannot write (File too large)" in res.stdout
    assert f"PARQUET {tmp_path}/big.parquet cannot write" in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- colours


def test_class_colors_distinct_and_stable():
    a, b = class_colors(60), class_colors(60)
    assert a == b and class_colors(5) == a[:5]
    assert len(set(a)) == 60
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in a)
    arr = np.array(a[:30], float)
    d = np.sqrt(((arr[:, None] - arr[None]) ** 2).sum(-1))
    assert d[np.triu_indices(30, 1)].min() > 40  # the fixed palette is well separated


# --------------------------------------------------------------------------- GeoParquet


def test_wkb_matches_shapely():
    corners = np.array([[[0, 1], [1, 1], [1, 0], [0, 0]], [[5, 5], [6, 7], [4, 9], [3, 6]]], float)
    geoms = shapely.from_wkb(np.array(wkb_polygons(corners).to_pylist(), dtype=object))
    for g, c in zip(geoms, corners):
        assert g.geom_type == "Polygon" and g.is_valid
        assert g.equals(shapely.Polygon(c)) and shapely.is_ccw(g.exterior)


@pytest.mark.parametrize("epsg,transform", [
    (32618, from_origin(500000.0, 4500000.0, 5.0, 5.0)),
    (4326, Affine(0.001, 0.0002, -75.0, 0.0001, -0.001, 40.0)),  # rotated/sheared pixels
])
def test_geoparquet_roundtrip(tmp_path, epsg, transform):
    rng = np.random.default_rng(epsg)
    full = tile_batch(transform, 300, 200, 64, 32, rng)
    n = full["tile_index"].size
    labels = np.array(CLASSES)[full["class_index"]]
    table = TileTable(CLASSES)
    order = rng.permutation(n)  # batches arrive out of tile order: the file is sorted anyway
    first, second = order[: n // 2], order[n // 2:]
    table.add({**subset(full, first), "label": labels[first]})
    table.add(subset(full, second))  # labels derived from the class list
    crs = rasterio.crs.CRS.from_epsg(epsg)
    path = table.write_geoparquet(tmp_path / "tiles.parquet", crs, CLASSES, "scene_a", "resnet18@abc",
                                  {"tile_px": np.int64(64), "stride_px": 32}, scale_check="coarser")
    assert leftovers(tmp_path) == []

    gdf = gpd.read_parquet(path)
    assert len(gdf) == n
    assert gdf.crs == pyproj.CRS.from_epsg(epsg) and gdf.crs.to_epsg() == epsg
    assert (gdf["tile_index"].to_numpy() == np.arange(n)).all()
    expect = shapely.polygons(full["corners"])
    assert shapely.equals(gdf.geometry.values, expect).all()
    assert shapely.is_ccw(shapely.get_exterior_ring(gdf.geometry.values)).all()
    assert (gdf["label"].astype(str).to_numpy() == labels).all()
    assert (gdf["scene"].astype(str) == "scene_a").all()
    assert (gdf["scale_check"].astype(str) == "coarser").all()  # the scene's, on every tile a GIS user clicks
    np.testing.assert_array_equal(np.stack(gdf["probabilities"].to_numpy()), full["probabilities"])
    np.testing.assert_array_equal(gdf["cam_peak_x"].to_numpy(), full["cam_peak_x"])
    assert "bbox" not in gdf.columns  # geopandas recognises the covering column
    bbox = pq.read_table(path, columns=["bbox"]).column("bbox").combine_chunks()
    np.testing.assert_array_equal(bbox.field("xmin").to_numpy(), full["corners"][..., 0].min(1))
    np.testing.assert_array_equal(bbox.field("ymin").to_numpy(), full["corners"][..., 1].min(1))
    np.testing.assert_array_equal(bbox.field("xmax").to_numpy(), full["corners"][..., 0].max(1))
    np.testing.assert_array_equal(bbox.field("ymax").to_numpy(), full["corners"][..., 1].max(1))

    # metadata against GeoParquet 1.1
    pf = pq.ParquetFile(path)
    md = pf.schema_arrow.metadata
    geo = json.loads(md[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    col = geo["columns"]["geometry"]
    assert col["encoding"] == "WKB" and col["geometry_types"] == ["Polygon"]
    assert pyproj.CRS.from_json_dict(col["crs"]) == pyproj.CRS.from_epsg(epsg)
    assert col["bbox"] == pytest.approx([full["corners"][..., 0].min(), full["corners"][..., 1].min(),
                                         full["corners"][..., 0].max(), full["corners"][..., 1].max()])
    assert col["covering"] == {"bbox": {"xmin": ["bbox", "xmin"], "ymin": ["bbox", "ymin"],
                                        "xmax": ["bbox", "xmax"], "ymax": ["bbox", "ymax"]}}
    ts = json.loads(md[b"tilescan"])
    assert ts["classes"] == CLASSES and ts["model_id"] == "resnet18@abc" and ts["scene"] == "scene_a"
    assert ts["tile_px"] == 64 and ts["n_tiles"] == n
    assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
    schema = pf.schema_arrow
    ptype = schema.field("probabilities").type
    assert pa.types.is_list(ptype) and ptype.value_type == pa.float32()
    assert str(schema.field("scene").type) == "dictionary<values=string, indices=int32, ordered=0>"
    assert str(schema.field("row").type) == "int32" and str(schema.field("class_index").type) == "int16"
    assert str(schema.field("geometry").type) == "binary"
    # only the names carry a dictionary: on numbers and geometry one made the file larger and slower
    rg = pf.metadata.row_group(0)
    dictionary = {rg.column(i).path_in_schema for i in range(rg.num_columns) if rg.column(i).has_dictionary_page}
    assert dictionary == {"scene", "label", "scale_check"}

    # the covering column makes bbox-filtered reads work
    xmin, ymin, xmax, ymax = col["bbox"]
    box = (xmin, ymin, xmin + (xmax - xmin) / 3, ymin + (ymax - ymin) / 3)
    part = gpd.read_parquet(path, bbox=box)
    assert 0 < len(part) < n
    assert gdf.geometry.envelope.intersects(shapely.box(*box)).sum() == len(part)  # bbox filter


def test_geoparquet_pixel_space_and_empty(tmp_path):
    rng = np.random.default_rng(3)
    table = TileTable()
    table.add(tile_batch(Affine.identity(), 64, 64, 32, 32, rng))
    table.write_geoparquet(tmp_path / "px.parquet", None, CLASSES, "s", "m")
    geo = json.loads(pq.read_schema(tmp_path / "px.parquet").metadata[b"geo"])
    assert "crs" in geo["columns"]["geometry"] and geo["columns"]["geometry"]["crs"] is None
    gdf = gpd.read_parquet(tmp_path / "px.parquet")
    assert gdf.crs is None and len(gdf) == 4
    assert gdf.geometry.iloc[0].equals(shapely.box(0, 0, 32, 32))
    assert gdf["scale_check"].isna().all()  # not given: null, the column still there

    empty = TileTable(CLASSES)
    empty.write_geoparquet(tmp_path / "empty.parquet", "EPSG:32618", CLASSES, "s", "m")
    gdf = gpd.read_parquet(tmp_path / "empty.parquet")
    assert len(gdf) == 0 and gdf.crs.to_epsg() == 32618
    assert pq.ParquetFile(tmp_path / "empty.parquet").num_row_groups == 0  # no group without statistics
    assert_geoparquet_conformant(tmp_path / "empty.parquet")
    empty.write_gpkg(tmp_path / "empty.gpkg", "EPSG:32618", CLASSES, "s", "m")
    gdf = gpd.read_file(tmp_path / "empty.gpkg")
    assert len(gdf) == 0 and gdf.crs.to_epsg() == 32618 and "p_Airport" in gdf.columns
    full_schema = pq.read_schema(tmp_path / "px.parquet")
    assert pq.read_schema(tmp_path / "empty.parquet").names == full_schema.names

    with pytest.raises(ValueError, match="classes"):
        table.write_geoparquet(tmp_path / "x.parquet", None, CLASSES[:2], "s", "m")
    with pytest.raises(ValueError, match="unknown columns"):
        table.add({"bogus": np.zeros(1)})


def test_gpkg_roundtrip(tmp_path):
    rng = np.random.default_rng(5)
    transform = from_origin(500000.0, 4500000.0, 5.0, 5.0)
    batch = tile_batch(transform, 200, 160, 64, 32, rng)
    table = TileTable(CLASSES)
    table.add(batch)
    table.write_gpkg(tmp_path / "tiles.gpkg", "EPSG:32618", CLASSES, "scene_a", "m1", {"run": 1},
                     scale_check="in_range")
    assert leftovers(tmp_path) == []
    gdf = gpd.read_file(tmp_path / "tiles.gpkg", layer="tiles")
    assert (gdf["scale_check"] == "in_range").all()
    n = batch["tile_index"].size
    assert len(gdf) == n and gdf.crs.to_epsg() == 32618
    assert shapely.equals(gdf.geometry.values, shapely.polygons(batch["corners"])).all()
    assert (gdf["label"].to_numpy() == np.array(CLASSES)[batch["class_index"]]).all()
    assert "p_Bridge_Road" in gdf.columns and "probabilities" not in gdf.columns
    np.testing.assert_allclose(gdf["p_Airport"].to_numpy(), batch["probabilities"][:, 0])
    np.testing.assert_array_equal(gdf["col_off"].to_numpy(), batch["col_off"])
    import pyogrio
    meta = pyogrio.read_info(tmp_path / "tiles.gpkg", layer="tiles")["layer_metadata"]
    assert json.loads(meta["tilescan"])["model_id"] == "m1"


# --------------------------------------------------------------------------- label COG


@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (600, 700)])
def test_labels_cog(tmp_path, shape):
    rng = np.random.default_rng(shape[0])
    labels = rng.integers(-1, len(CLASSES), size=shape)
    labels.flat[0] = 0
    gt = from_origin(500000.0, 4500000.0, 160.0, 160.0)
    path = write_labels_cog(tmp_path / "labels.tif", labels, gt, "EPSG:32618", CLASSES)
    assert leftovers(tmp_path) == []
    ok, errors, warnings = cog_validate(path)
    assert ok and errors == []
    with rasterio.open(path) as src:
        assert src.crs.to_epsg() == 32618 and src.transform == gt
        assert src.nodata == LABEL_NODATA and src.dtypes[0] == "uint8"
        left, bottom, right, top = src.bounds
        assert (left, top, right, bottom) == (gt.c, gt.f, gt.c + 160 * shape[1], gt.f - 160 * shape[0])
        data = src.read(1)
        np.testing.assert_array_equal(data, np.where(labels < 0, 255, labels))
        cmap = src.colormap(1)
        assert cmap[0][:3] == class_colors(5)[0] and cmap[LABEL_NODATA][3] == 0
        assert json.loads(src.tags()["CLASS_NAMES"]) == CLASSES and src.tags()["CLASS_4"] == "Bridge & Road"
        assert src.descriptions == ("class",)
        if max(shape) > 512:
            assert src.overviews(1) == [2] and src.block_shapes[0] == (512, 512)
        else:  # one block just big enough: no padding to compress
            assert src.block_shapes[0] == (16, 16)
    # GDAL itself picks up category names and the attribute table from the sidecar
    vrt = tmp_path / "copy.vrt"
    rasterio.shutil.copy(path, vrt, driver="VRT")
    band = ET.parse(vrt).getroot().find("VRTRasterBand")
    assert [c.text for c in band.find("CategoryNames")] == CLASSES
    rat_rows = band.find("GDALRasterAttributeTable").findall("Row")
    assert [r.findall("F")[1].text for r in rat_rows] == CLASSES


def test_labels_cog_pixel_space_and_bad_values(tmp_path):
    write_labels_cog(tmp_path / "px.tif", np.array([[0, -1, 2]]), Affine.identity(), None, CLASSES)
    assert cog_validate(tmp_path / "px.tif")[0]
    with rasterio.open(tmp_path / "px.tif") as src:
        assert src.crs is None and src.read(1).tolist() == [[0, 255, 2]]
    with pytest.raises(ValueError):
        write_labels_cog(tmp_path / "l.tif", np.array([[7]]), Affine.identity(), None, CLASSES)
    assert not (tmp_path / "l.tif").exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- heatmap


def run_tiles(writer, width, height, tile, stride, rng, cam_px, nodata_p=0.2):
    """Feed a row-major grid of overlapping tiles (edge tiles run past the scene)."""
    tiles = []
    for r0 in range(0, height, stride):
        for c0 in range(0, width, stride):
            cam = rng.uniform(0, 1, (cam_px, cam_px)).astype(np.float32)
            valid = rng.uniform(size=(tile, tile)) > nodata_p
            valid[:, max(0, width - c0):] = False  # padding beyond the scene is nodata
            valid[max(0, height - r0):, :] = False
            tiles.append(((c0, r0, tile, tile), cam, valid))
            if writer is not None:
                writer.add((c0, r0, tile, tile), cam, valid)
    return tiles


def test_heatmap_matches_naive_accumulation_aligned(tmp_path):
    """Integer geometry: an independent numpy/cv2 reference (cv2.resize of the CAM, block
    mean of the valid mask) over a full-scene array."""
    W, H, tile, stride, scale, cam_px = 200, 168, 32, 16, 0.25, 4
    gt = from_origin(600000.0, 5000000.0, 2.0, 2.0)
    rng = np.random.default_rng(11)
    with HeatmapWriter(tmp_path / "heat.tif", W, H, gt, "EPSG:32618", scale, tile, stride) as hw:
        tiles = run_tiles(hw, W, H, tile, stride, rng, cam_px)
    f = int(1 / scale)
    pad = tile // f
    acc = np.zeros((H // f + pad, W // f + pad))
    wsum = np.zeros_like(acc)
    for (c0, r0, tw, th), cam, valid in tiles:
        v = cv2.resize(cam, (tw // f, th // f), interpolation=cv2.INTER_LINEAR).astype(np.float64)
        w = valid.reshape(th // f, f, tw // f, f).mean(axis=(1, 3))
        acc[r0 // f:(r0 + th) // f, c0 // f:(c0 + tw) // f] += w * v
        wsum[r0 // f:(r0 + th) // f, c0 // f:(c0 + tw) // f] += w
    acc, wsum = acc[:H // f, :W // f], wsum[:H // f, :W // f]
    expect = np.where(wsum > 0, acc / np.where(wsum > 0, wsum, 1), HEATMAP_NODATA)
    with rasterio.open(tmp_path / "heat.tif") as src:
        got = src.read(1)
        assert src.crs.to_epsg() == 32618 and src.nodata == HEATMAP_NODATA
        assert src.transform == gt @ Affine.scale(4, 4)
        assert (src.width, src.height) == (50, 42)
        assert src.block_shapes[0] == (64, 64)  # one block that just holds it
    np.testing.assert_allclose(got, expect, atol=1e-6)
    assert (got == HEATMAP_NODATA).sum() == (wsum == 0).sum()
    assert cog_validate(tmp_path / "heat.tif")[0]
    assert leftovers(tmp_path) == []


def test_heatmap_strips_equal_full_array_unaligned(tmp_path):
    """Odd sizes and scale: strip output equals one full-array accumulation of the same
    per-tile contributions, values stay in the CAM range, and memory stays bounded."""
    W, H, tile, stride, scale, cam_px = 203, 457, 40, 25, 0.3, 5
    gt = from_origin(10.0, 50.0, 0.001, 0.001)
    rng = np.random.default_rng(7)
    hw = HeatmapWriter(tmp_path / "heat.tif", W, H, gt, "EPSG:4326", scale, tile, stride)
    tiles = run_tiles(hw, W, H, tile, stride, rng, cam_px, nodata_p=0.5)
    hw.close()
    grid = _HeatGrid.make(W, H, scale)
    acc = np.zeros((grid.out_h, grid.out_w))
    wsum = np.zeros_like(acc)
    for window, cam, valid in tiles:
        got = grid.contribution(window, cam, valid)
        if got:
            j0, i0, v, w = got
            acc[j0:j0 + v.shape[0], i0:i0 + v.shape[1]] += w * v
            wsum[j0:j0 + v.shape[0], i0:i0 + v.shape[1]] += w
    expect = np.where(wsum > 0, acc / np.where(wsum > 0, wsum, 1), HEATMAP_NODATA)
    with rasterio.open(tmp_path / "heat.tif") as src:
        got = src.read(1)
        assert (src.width, src.height) == (math.ceil(W * scale), math.ceil(H * scale))
        assert src.transform.almost_equals(gt @ Affine.scale(W / src.width, H / src.height))
        left, bottom, right, top = src.bounds
        assert (left, top) == pytest.approx((10.0, 50.0)) and right == pytest.approx(10.0 + W * 0.001)
        assert bottom == pytest.approx(50.0 - H * 0.001)
    np.testing.assert_allclose(got, expect, atol=1e-6)
    heat = got[got != HEATMAP_NODATA]
    assert heat.size > 0.9 * got.size and heat.min() >= 0 and heat.max() <= 1
    bound = math.ceil((tile + stride) * scale) + 2
    assert hw.peak_buffer_rows <= bound < grid.out_h


def test_heatmap_memory_bounded_on_tall_scene(tmp_path, monkeypatch):
    monkeypatch.setattr(heatmap_mod, "HEAT_IN_MEMORY_PX", 0)  # the scratch-file way, whatever the size
    W, H, tile, stride, scale = 256, 4096, 64, 32, 0.25
    rng = np.random.default_rng(2)
    hw = HeatmapWriter(tmp_path / "tall.tif", W, H, from_origin(0, H, 1, 1), None, scale, tile, stride)
    cam = rng.uniform(0, 1, (2, 2)).astype(np.float32)
    for r0 in range(0, H - tile + 1, stride):
        for c0 in range(0, W - tile + 1, stride):
            hw.add((c0, r0, tile, tile), cam, None)
    assert hw.peak_buffer_rows <= (tile + stride) * scale + 2  # 26 rows, not 1024
    assert hw.buffer_nbytes <= 2 * 8 * (W * scale) * ((tile + stride) * scale + 2)
    hw.close()
    ok, errors, warnings = cog_validate(tmp_path / "tall.tif")
    assert ok and not errors and not warnings, (errors, warnings)
    with rasterio.open(tmp_path / "tall.tif") as src:
        assert src.overviews(1) and src.crs is None
        assert np.all(src.read(1) >= 0)


def test_heatmap_tiny_order_and_abort(tmp_path):
    # a scene smaller than one heat pixel's worth still gives a valid 1x1 COG
    with HeatmapWriter(tmp_path / "one.tif", 3, 3, from_origin(0, 3, 1, 1), "EPSG:32618", 0.25, 8, 8) as hw:
        hw.add((0, 0, 8, 8), np.full((2, 2), 0.5, np.float32), None)
    assert cog_validate(tmp_path / "one.tif")[0]
    with rasterio.open(tmp_path / "one.tif") as src:
        assert src.shape == (1, 1) and src.read(1)[0, 0] == pytest.approx(0.5)

    hw = HeatmapWriter(tmp_path / "h.tif", 64, 64, from_origin(0, 64, 1, 1), None, 0.5, 16, 16)
    hw.add((0, 32, 16, 16), np.ones((2, 2), np.float32), None)
    with pytest.raises(ValueError, match="row-major"):
        hw.add((0, 0, 16, 16), np.ones((2, 2), np.float32), None)
    hw.abort()
    assert sorted(os.listdir(tmp_path)) == ["one.tif"]

    with pytest.raises(KeyError):
        with HeatmapWriter(tmp_path / "h.tif", 64, 64, from_origin(0, 64, 1, 1), None, 0.5, 16, 16) as hw:
            hw.add((0, 0, 16, 16), np.ones((2, 2), np.float32), None)
            raise KeyError("crash mid-scene")
    assert sorted(os.listdir(tmp_path)) == ["one.tif"]


def test_read_heatmap_preview(tmp_path):
    W = H = 2048
    hw = HeatmapWriter(tmp_path / "h.tif", W, H, from_origin(0, H, 1, 1), None, 0.5, 256, 256)
    for r0 in range(0, H, 256):
        for c0 in range(0, W, 256):
            if (r0, c0) != (0, 0):  # leave one tile empty: nodata
                hw.add((c0, r0, 256, 256), np.full((4, 4), (c0 + r0) / (2 * W), np.float32), None)
    hw.close()
    prev = read_heatmap_preview(tmp_path / "h.tif", 256)
    assert prev.shape == (256, 256) and prev.dtype == np.float32
    assert np.isnan(prev[:16, :16]).all() and np.isfinite(prev[40:, 40:]).all()
    assert np.nanmax(prev) <= 1


@pytest.mark.parametrize("pattern", ["speckle", "blocks", "stripes", "almost_all_nodata"])
def test_heat_preview_equals_the_masked_read(tmp_path, pattern):
    """The quicklook's heat is read without the nodata mask (GDAL's average leaves nodata out
    by itself): the same pixels and the same NaNs as the masked read, at sizes whose ratios
    are not whole numbers, over any nodata pattern."""
    rng = np.random.default_rng(len(pattern))
    h, w = 1031, 1277
    heat = rng.uniform(0, 1, (h, w)).astype(np.float32)
    if pattern == "speckle":
        heat[rng.uniform(size=(h, w)) < 0.6] = HEATMAP_NODATA
    elif pattern == "blocks":
        for _ in range(6):
            r0, c0 = rng.integers(0, h), rng.integers(0, w)
            heat[r0:r0 + rng.integers(1, h // 2), c0:c0 + rng.integers(1, w // 2)] = HEATMAP_NODATA
    elif pattern == "stripes":
        heat[:, ::3] = HEATMAP_NODATA
        heat[::7] = HEATMAP_NODATA
        heat[500:540] = HEATMAP_NODATA
    else:
        heat[rng.uniform(size=(h, w)) < 0.999] = HEATMAP_NODATA
    path = tmp_path / "heat.tif"
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=1, dtype="float32",
                       nodata=HEATMAP_NODATA, crs="EPSG:32618", transform=from_origin(0, h, 1, 1),
                       tiled=True, blockxsize=256, blockysize=256) as dst:
        dst.write(heat, 1)
    nans = []
    with rasterio.open(path) as src:
        for size in (1024, 997, 333, 64, 7):
            got = heatmap_mod._preview_of(src, size)
            f = max(w, h) / size
            masked = src.read(1, out_shape=(round(h / f), round(w / f)), masked=True,
                              resampling=rasterio.enums.Resampling.average)
            want = np.ma.filled(masked.astype(np.float32), np.nan)
            assert got.shape == want.shape and got.dtype == np.float32
            np.testing.assert_array_equal(got, want)  # NaNs in the same places
            assert np.isfinite(got).any()
            nans.append(int(np.isnan(got).sum()))
    assert nans[0] > 0  # at the largest size some preview pixels see nodata only


def test_heatmap_preview_before_the_cog(tmp_path):
    """finish() + preview() give the quicklook's heat before close() writes the COG (the job
    draws the quicklook while the COG is written): the same picture as the COG's preview,
    and the COG keeps the tags given to finish()."""
    W, H = 1500, 1100
    hw = HeatmapWriter(tmp_path / "h.tif", W, H, from_origin(0, H, 1, 1), "EPSG:32618", 0.5, 100, 100)
    rng = np.random.default_rng(3)
    for r0 in range(0, H, 100):
        for c0 in range(0, W, 100):
            if (r0 // 100 + c0 // 100) % 7:  # some tiles left out: nodata
                hw.add((c0, r0, 100, 100), rng.uniform(0, 1, (4, 4)).astype(np.float32), None)
    with pytest.raises(RuntimeError, match="finish"):
        hw.preview(200)
    hw.finish(tags={"MODEL_ID": "m1"})
    early = hw.preview(200)
    assert not (tmp_path / "h.tif").exists()
    hw.close(tags={"MODEL_ID": "ignored"})
    assert cog_validate(tmp_path / "h.tif")[0] and leftovers(tmp_path) == []
    with rasterio.open(tmp_path / "h.tif") as src:
        assert src.tags()["MODEL_ID"] == "m1"
    late = read_heatmap_preview(tmp_path / "h.tif", 200)
    assert early.shape == late.shape == (147, 200)
    np.testing.assert_array_equal(np.isnan(early), np.isnan(late))
    ok = np.isfinite(early)
    assert ok.mean() > 0.7 and np.abs(early[ok] - late[ok]).mean() < 0.05  # full-res vs overview average


@pytest.mark.parametrize("held", ["memory", "file"])
def test_heatmap_cog_failing_beside_the_preview_leaves_the_preview_and_fails_as_output(tmp_path, monkeypatch, held):
    """The job draws the quicklook from preview() while close() writes the COG on another
    thread (keep_scratch). When that COG fails (a full disk), the preview being read is not
    taken away: it is the disk, an OutputError naming the heatmap, that fails the scene, not a
    "preview needs finish()" error from a scratch file removed under it."""
    import threading

    if held == "file":
        monkeypatch.setattr(heatmap_mod, "HEAT_IN_MEMORY_PX", 0)
    W, H = 600, 400
    hw = HeatmapWriter(tmp_path / "h.tif", W, H, from_origin(0, H, 1, 1), "EPSG:32618", 0.5, 100, 100)
    assert (hw._mem is not None) == (held == "memory")
    rng = np.random.default_rng(5)
    for r0 in range(0, H, 100):
        for c0 in range(0, W, 100):
            hw.add((c0, r0, 100, 100), rng.uniform(0, 1, (4, 4)).astype(np.float32), None)
    hw.finish()
    failed = threading.Event()

    def full_disk(*args, **kwargs):
        failed.set()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(heatmap_mod, "_cog_copy", full_disk)
    monkeypatch.setattr(heatmap_mod, "write_cog", lambda tmp, data, gdal_write, **kw: gdal_write())
    previewed, raised = threading.Event(), []

    def close():
        try:
            hw.close(keep_scratch=previewed)
        except Exception as exc:  # noqa: BLE001 - looked at below
            raised.append(exc)

    t = threading.Thread(target=close)
    t.start()
    assert failed.wait(10)
    t.join(0.5)  # the failed close waits for the preview before it removes anything
    try:
        preview = hw.preview(100)
    finally:
        previewed.set()
    t.join(10)
    assert preview.shape == (67, 100) and np.isfinite(preview).all()
    assert len(raised) == 1 and isinstance(raised[0], OutputError) and "h.tif" in str(raised[0])
    assert "No space left" in str(raised[0])
    assert leftovers(tmp_path) == [] and not (tmp_path / "h.tif").exists()


@pytest.mark.parametrize("W, H, tile, stride, scale", [(203, 457, 40, 25, 0.3), (512, 512, 128, 128, 0.25),
                                                       (1500, 1100, 100, 100, 0.5)])
def test_heatmap_held_in_memory_equals_the_scratch_file_way(tmp_path, monkeypatch, W, H, tile, stride, scale):
    """A small heatmap is kept whole in memory instead of a scratch file: the same COG, byte
    for byte, and the same quicklook previews, full size and decimated."""
    got = {}
    for way, limit in (("memory", heatmap_mod.HEAT_IN_MEMORY_PX), ("file", 0)):
        monkeypatch.setattr(heatmap_mod, "HEAT_IN_MEMORY_PX", limit)
        monkeypatch.setattr(oneblock, "_fits", lambda *a: False)  # both written by GDAL (oneblock deflates otherwise)
        folder = tmp_path / way
        folder.mkdir()
        hw = HeatmapWriter(folder / "heat.tif", W, H, from_origin(0, H, 1, 1), "EPSG:32618", scale, tile, stride)
        assert (hw._mem is not None) == (way == "memory")
        rng = np.random.default_rng(4)
        for r0 in range(0, H, stride):
            for c0 in range(0, W, stride):
                if (r0 // stride + c0 // stride) % 5:  # some tiles left out: nodata
                    hw.add((c0, r0, tile, tile), rng.uniform(0, 1, (4, 4)).astype(np.float32), None)
        hw.finish(tags={"MODEL_ID": "m1"})
        previews = [hw.preview(n) for n in (1024, 64)]
        hw.close()
        assert leftovers(folder) == []
        got[way] = ((folder / "heat.tif").read_bytes(), previews)
    assert got["memory"][0] == got["file"][0]
    for a, b in zip(got["memory"][1], got["file"][1]):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(got["memory"][1][0]).any()
    assert np.isnan(got["memory"][1][0]).any() or stride < tile  # overlapping tiles may fill the gaps


@pytest.mark.parametrize("kind", ["heat", "labels"])
def test_cog_overviews_do_not_depend_on_the_temporary_codec(tmp_path, monkeypatch, kind):
    """The COG copy has GDAL build its overviews through a PackBits temporary file instead of
    its default (ZSTD or LZW), for speed: the same file, byte for byte. Sizes whose halves
    round down (non-integer ratios at the edge) and nodata gaps, where another overview
    path of GDAL's gives other pixels."""
    from tilescan.outputs import cog

    w, h = 3062, 2790  # the heat of a 12,246 x 11,160 px scene: three overview levels
    rng = np.random.default_rng(5)
    if kind == "heat":
        data = rng.uniform(0, 1, (h, w)).astype(np.float32)
        data[:, :700] = HEATMAP_NODATA
        data[1000:1400] = HEATMAP_NODATA
        profile = dict(dtype="float32", nodata=HEATMAP_NODATA)
        resampling = "average"
    else:
        data = rng.integers(0, 30, (h, w)).astype(np.uint8)
        data[:500] = LABEL_NODATA
        profile = dict(dtype="uint8", nodata=LABEL_NODATA)
        resampling = "nearest"
    src = tmp_path / "src.tif"
    with rasterio.open(src, "w", driver="GTiff", width=w, height=h, count=1, crs="EPSG:32621",
                       transform=from_origin(717345, -2776995, 120, 120), tiled=True, blockxsize=256,
                       blockysize=256, **profile) as dst:
        dst.write(data, 1)
    levels = cog._overview_level(w, h)
    assert levels == 3
    cog._cog_copy(src, tmp_path / "packbits.tif", "deflate", resampling, levels, (w, h))
    calls = []

    def gdal_default(**options):  # the copy with GDAL's own temporary codec
        calls.append(options)
        return contextlib.nullcontext()

    monkeypatch.setattr(rasterio, "Env", gdal_default)
    cog._cog_copy(src, tmp_path / "default.tif", "deflate", resampling, levels, (w, h))
    monkeypatch.undo()
    assert (tmp_path / "packbits.tif").read_bytes() == (tmp_path / "default.tif").read_bytes()
    assert calls == [{"COG_TMP_COMPRESSION": "PACKBITS"}]  # the option was set (and bypassed above)
    with rasterio.open(tmp_path / "packbits.tif") as ds:
        assert ds.overviews(1) == [2, 4, 8]
        assert np.array_equal(ds.read(1), data)
    assert cog_validate(str(tmp_path / "packbits.tif"))[0]


# --------------------------------------------------------------------------- quicklook


def test_quicklook(tmp_path):
    rng = np.random.default_rng(4)
    h, w = 240, 320
    rgb = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    valid = np.ones((h, w), bool)
    valid[:, :10] = False
    labels = rng.integers(-1, len(CLASSES), (6, 8))
    heat = rng.uniform(0, 1, (30, 40)).astype(np.float32)
    heat[:5] = np.nan
    # a 640 x 480 scene of 80 px tiles: 6 x 8 tiles
    p = write_quicklook(tmp_path / "q.png", rgb, valid, labels, heat, CLASSES, scene_size=(640, 480), tile_px=80)
    img = np.asarray(Image.open(p))
    lay = quicklook_layout(w, h)
    assert img.ndim == 3 and img.shape[2] == 3
    assert img.shape[1] == lay.width and 3 * w <= img.shape[1] <= 3 * w + 20 and img.shape[0] > h
    assert img.std() > 10
    panels = [img[lay.origin(k)[1]:lay.origin(k)[1] + h, lay.origin(k)[0]:lay.origin(k)[0] + w].astype(int)
              for k in range(3)]
    assert np.abs(panels[0] - panels[1]).mean() > 5 and np.abs(panels[0] - panels[2]).mean() > 5
    # no heatmap, no labels: still three panels
    p2 = write_quicklook(tmp_path / "q2.png", rgb, None, None, None, CLASSES)
    assert np.asarray(Image.open(p2)).shape[1] == img.shape[1]
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- real scene


def test_outputs_for_real_scene(tmp_path, scene_path):
    """RGB.byte.tif (EPSG:32618, nodata border): all outputs line up with the scene."""
    path = scene_path("rasterio/RGB.byte.tif")
    tile, stride = 64, 64
    with rasterio.open(path) as src:
        W, H, gt, crs = src.width, src.height, src.transform, src.crs
        preview = src.read(out_shape=(3, H // 4, W // 4)).transpose(1, 2, 0)
        pvalid = src.dataset_mask(out_shape=(H // 4, W // 4)) > 0
        mask = src.dataset_mask() > 0
    rng = np.random.default_rng(9)
    batch = tile_batch(gt, W, H, tile, stride, rng)
    n_rows, n_cols = batch["row"].max() + 1, batch["col"].max() + 1
    table = TileTable(CLASSES)
    table.add(batch)
    table.write_geoparquet(tmp_path / "tiles.parquet", crs, CLASSES, path.stem, "m")
    gdf = gpd.read_parquet(tmp_path / "tiles.parquet")
    assert gdf.crs.to_epsg() == 32618
    sb = rasterio.open(path).bounds
    assert gdf.total_bounds[0] >= sb.left - 1e-6 and gdf.total_bounds[3] <= sb.top + 1e-6

    labels = np.full((n_rows, n_cols), -1)
    labels[batch["row"], batch["col"]] = batch["class_index"]
    grid = gt @ Affine.scale(stride)
    write_labels_cog(tmp_path / "labels.tif", labels, grid, crs, CLASSES)
    with rasterio.open(tmp_path / "labels.tif") as lab:
        assert lab.crs == crs and lab.transform == grid
        assert (lab.bounds.left, lab.bounds.top) == (sb.left, sb.top)

    with HeatmapWriter(tmp_path / "heat.tif", W, H, gt, crs, 0.25, tile, stride) as hw:
        for (c0, r0) in zip(batch["col_off"], batch["row_off"]):
            win = mask[r0:r0 + tile, c0:c0 + tile]
            hw.add((c0, r0, tile, tile), rng.uniform(0, 1, (2, 2)).astype(np.float32), win)
    with rasterio.open(tmp_path / "heat.tif") as heat:
        assert heat.crs == crs
        assert heat.bounds == pytest.approx(tuple(sb))
        h = heat.read(1)
        assert (h[0, 0] == HEATMAP_NODATA) and (h >= 0).mean() > 0.5  # nodata corner of the scene
    assert cog_validate(tmp_path / "heat.tif")[0] and cog_validate(tmp_path / "labels.tif")[0]
    # the quicklook takes the run's grid, whose last row / column runs past the scene edge
    ql_labels = np.full((1 + math.ceil((H - tile) / stride), 1 + math.ceil((W - tile) / stride)), -1)
    ql_labels[:n_rows, :n_cols] = labels
    write_quicklook(tmp_path / "q.png", preview, pvalid, ql_labels,
                    read_heatmap_preview(tmp_path / "heat.tif", 256), CLASSES,
                    scene_size=(W, H), tile_px=tile, stride=stride)
    assert Image.open(tmp_path / "q.png").size[0] >= 3 * (W // 4)


def test_csv_text_a_spreadsheet_would_run_as_a_formula_is_kept_as_text():
    """A class named like a formula (from a shared model's metadata or a dataset's folder names)
    in summary.csv or evaluate's CSVs: Excel and LibreOffice would run it on opening; written
    with a leading ' it reads as text there, and as itself plus the ' elsewhere. Numbers,
    negative ones written as text too, and ordinary names are as they were."""
    import csv
    import io

    from tilescan.outputs.files import csv_text

    rows = [["class", "n"], ['=HYPERLINK("http://x","y")', 1], ["+1+cmd", 2], ["@SUM(A1)", 3], ["-0.5", -4],
            ["Farmland", 0.25], ["-2 m", 5]]
    back = list(csv.reader(io.StringIO(csv_text(rows))))
    assert [r[0] for r in back[1:]] == ["'=HYPERLINK(\"http://x\",\"y\")", "'+1+cmd", "'@SUM(A1)", "-0.5", "Farmland",
                                        "'-2 m"]
    assert [r[1] for r in back[1:]] == ["1", "2", "3", "-4", "0.25", "5"]
