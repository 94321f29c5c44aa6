"""``run --stac-items``: the STAC Item of each scene's outputs, on real local scenes (the
remote and STAC-input cases are in test_remote.py): core schema (pystac's own copy, offline),
footprint, dates, the label COG's classes and both COGs' data type and nodata as the files
have them, and a geostationary scene whose corners lie in space."""

from __future__ import annotations

import datetime
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import rasterio.warp

import tilescan
from conftest import scene

NAIP = "opengeos-naip/m_4709963_se_14_1_20190904.tif"
GEOS = "rio-cogeo/image_geos.tif"  # geostationary: its corners are off the Earth's disc
COG_RGB = "rio-tiler/cog_rgb.tif"


def _item(folder):
    import pystac
    from pystac.validation import validate_dict

    d = json.loads((folder / "item.json").read_text())
    validate_dict({**d, "stac_extensions": []})  # the core Item schema, which pystac ships (extension schemas are online)
    pystac.Item.from_dict(d)
    return d


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    work = tmp_path_factory.mktemp("stac")
    tagged = work / "tagged.tif"
    shutil.copy(scene(COG_RGB), tagged)
    with rasterio.open(tagged, "r+", IGNORE_COG_LAYOUT_BREAK="YES") as ds:
        ds.update_tags(TIFFTAG_DATETIME="2015:07:04 10:20:30")
    report = tilescan.run([scene(NAIP), scene(GEOS), tagged], work / "out", stac_items=True, tile_size=256)
    assert report.exit_code == 0
    return work / "out", json.loads((work / "out" / "report.json").read_text())


def test_item_describes_the_files_as_they_are(items):
    out, _ = items
    folder = out / NAIP.split("/")[-1][:-4]
    item = _item(folder)
    assert "https://stac-extensions.github.io/processing/v1.2.0/schema.json" in item["stac_extensions"]
    assert "https://stac-extensions.github.io/classification/v2.0.0/schema.json" in item["stac_extensions"]
    # footprint: the scene's bounds in lon/lat, its ring counter-clockwise (RFC 7946)
    with rasterio.open(scene(NAIP)) as ds:
        want = rasterio.warp.transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    assert item["bbox"] == pytest.approx(list(want), abs=1e-9)
    x, y = np.array(item["geometry"]["coordinates"][0]).T
    assert np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]) > 0
    # no date in the file: the processing time, said so
    assert item["properties"]["datetime"] == item["properties"]["created"]
    assert item["properties"]["tilescan:datetime_source"].startswith("processing time")
    assets = item["assets"]
    with rasterio.open(folder / "labels.tif") as ds:
        present = set(np.unique(ds.read(1)).tolist())
        assert assets["labels"]["data_type"] == ds.dtypes[0] == "uint8" and assets["labels"]["nodata"] == ds.nodata
        colormap = ds.colormap(1)
        assert assets["labels"]["proj:bbox"] == list(ds.bounds)  # its whole tiles reach past the scene's edge
        assert ds.bounds.right > item["properties"]["proj:bbox"][2]
    with rasterio.open(folder / "heatmap.tif") as ds:
        assert assets["heatmap"]["data_type"] == ds.dtypes[0] and assets["heatmap"]["nodata"] == ds.nodata
        assert assets["heatmap"]["proj:bbox"] == list(ds.bounds)
    classes = {c["value"]: c for c in assets["labels"]["classification:classes"]}
    assert present <= set(classes) and classes[255]["nodata"] is True
    table = pq.read_table(folder / "tiles.parquet", columns=["class_index", "label"]).to_pylist()
    for row in table:  # each pixel value names the class the table gives it, in the COG's own colour
        c = classes[row["class_index"]]
        assert c["title"] == row["label"] and c["name"] == row["label"].replace(" ", "_")
        assert c["color_hint"] == "".join(f"{v:02X}" for v in colormap[row["class_index"]][:3])
    from PIL import Image

    with Image.open(folder / "quicklook.png") as im:  # a picture of its own size, on no CRS
        assert assets["quicklook"]["proj:shape"] == [im.height, im.width] and assets["quicklook"]["proj:code"] is None


def test_item_datetime_is_the_scenes_own_date(items):
    out, _ = items
    item = _item(out / "tagged")
    assert item["properties"]["datetime"] == "2015-07-04T10:20:30Z"
    assert item["properties"]["tilescan:datetime_source"].startswith("TIFFTAG_DATETIME")
    assert datetime.datetime.fromisoformat(item["properties"]["created"].replace("Z", "+00:00")).year >= 2026


def test_geostationary_scene_gets_an_item_without_footprint(items):
    """Its corners are in space: the item was not written at all, and only the log said so."""
    out, report = items
    item = _item(out / "image_geos")
    assert item["geometry"] is None and "bbox" not in item
    assert "corners cannot be put in longitude and latitude" in item["properties"]["tilescan:footprint"]
    assert item["properties"]["proj:code"] is None and item["properties"]["proj:wkt2"].startswith("PROJCRS")
    (unit,) = [u for u in report["done"] if u["scene"].endswith("image_geos.tif")]
    assert any(w["code"] == "stac_item" and "no footprint" in w["message"] for w in unit["warnings"])


def test_a_footprint_follows_its_edges_the_long_way_round_and_across_180(tmp_path):
    """Real NAIP pixels as scenes that span wide or cross 180°: Web Mercator round the whole
    world, from -100° to 100° (its corners alone, 200° apart, would be joined the short way,
    across 180°) and from -200° to 200° (every longitude, once); NAD83 across 180° (whose corners come back as 179.9° and -179.7°); a world in
    0..360 longitudes. Each item's footprint is valid, counter-clockwise, and holds the scene:
    its bbox spans what the scene spans, west > east where it crosses 180°."""
    import shapely
    from affine import Affine
    from rasterio.windows import Window
    from shapely.geometry import shape

    m = 20037508.342789244  # Web Mercator's x at 180°
    cases = {  # name: (crs, transform of 64 x 32 px, expected bbox)
        "merc_world": ("EPSG:3857", Affine(2 * m / 64, 0, -m, 0, -m / 32, m / 2), [-180, -66.51, 180, 66.51]),
        "merc_wide": ("EPSG:3857", Affine(m * 200 / 180 / 64, 0, -m * 100 / 180, 0, -m / 32, m / 2), [-100, -66.51, 100, 66.51]),
        "merc_wider_than_the_world": ("EPSG:3857", Affine(m * 400 / 180 / 64, 0, -m * 200 / 180, 0, -m / 32, m / 2),
                                      [-180, -66.51, 180, 66.51]),
        "nad83_across_180": ("EPSG:4269", Affine(0.4 / 64, 0, 179.9, 0, -0.24 / 32, 52), [179.9, 51.76, -179.7, 52]),
        "world_0_360": ("EPSG:4326", Affine(360 / 64, 0, 0, 0, -180 / 32, 90), [-180, -90, 180, 90]),
    }
    with rasterio.open(scene(NAIP)) as src:
        pixels = src.read((1, 2, 3), window=Window(0, 0, 64, 32))
        profile = {**src.profile, "count": 3, "width": 64, "height": 32}
    (tmp_path / "in").mkdir()
    for name, (crs, t, _) in cases.items():
        with rasterio.open(tmp_path / "in" / f"{name}.tif", "w", **{**profile, "crs": crs, "transform": t}) as dst:
            dst.write(pixels)
    report = tilescan.run([tmp_path / "in"], tmp_path / "out", stac_items=True, tile_size=32, units="px")
    assert report.exit_code == 0
    for name, (_, _, want) in cases.items():
        item = _item(tmp_path / "out" / name)
        footprint = shape(item["geometry"])
        polys = [item["geometry"]["coordinates"]] if item["geometry"]["type"] == "Polygon" else item["geometry"]["coordinates"]
        assert footprint.is_valid and all(shapely.LinearRing(p[0]).is_ccw for p in polys), name
        np.testing.assert_allclose(item["bbox"], want, atol=0.01, err_msg=name)


def test_source_item_of_a_time_range_gives_its_range(tmp_path):
    """A STAC input dated by start and end only (datetime null): the output item keeps both
    (its start alone was kept)."""
    import pystac

    t0, t1 = datetime.datetime(2015, 9, 26, tzinfo=datetime.timezone.utc), datetime.datetime(2015, 9, 27, tzinfo=datetime.timezone.utc)
    src = pystac.Item(id="ranged", geometry=None, bbox=None, datetime=None, start_datetime=t0, end_datetime=t1, properties={})
    src.add_asset("visual", pystac.Asset(href=str(scene(COG_RGB)), media_type=pystac.MediaType.COG))
    (tmp_path / "item.json").write_text(json.dumps(src.to_dict(include_self_link=False)))
    report = tilescan.run([], tmp_path / "out", stac=[str(tmp_path / "item.json")], assets=["visual"], stac_items=True,
                          tile_size=256)
    assert report.exit_code == 0
    props = _item(tmp_path / "out" / "ranged")["properties"]
    assert (props["start_datetime"], props["end_datetime"]) == ("2015-09-26T00:00:00Z", "2015-09-27T00:00:00Z")
    assert props["datetime"] is None  # the source gives no instant: not its start
    assert props["tilescan:datetime_source"] == "source item"


@pytest.mark.parametrize("tag, want", [
    ("2015:07:04 10:20:30", "2015-07-04T10:20:30Z"),  # the TIFF form, no zone: UTC
    ("2020-05-18T10:11:12.5+02:00", "2020-05-18T08:11:12Z"),  # a fraction and a zone: the zone kept
    ("2020-05-18T10:11:12+02:00", "2020-05-18T08:11:12Z"),
    ("0000:00:00 00:00:00", None), ("1970:01:01 00:00:00", None), ("yesterday", None), ("", None)])
def test_a_scenes_date_tag_is_read_in_utc(tmp_path, tag, want):
    path = tmp_path / "tagged.tif"
    shutil.copy(scene("rasterio/RGB.byte.tif"), path)
    if tag:
        with rasterio.open(path, "r+") as ds:
            ds.update_tags(TIFFTAG_DATETIME=tag)
    from tilescan.scene.info import _acquired

    with rasterio.open(path) as ds:
        got = _acquired(ds, str(path))
    assert (got or {}).get("datetime") == want


@pytest.mark.parametrize("boxes, want", [
    ([[179.9, -17, -179.9, -16], [179.95, -17.5, -179.8, -16.2]], [179.9, -17.5, -179.8, -16]),  # all across 180°
    ([[175, 1, 176, 2], [-176, 3, -175, 4]], [175, 1, -175, 4]),  # either side of 180°: 10° across it, not 350°
    ([[-97, 40, -96, 41], [-90, 30, -89, 31]], [-97, 30, -89, 41]),
    ([[-180, -10, 180, 10], [0, 20, 1, 21]], [-180, -10, 180, 21]),  # one round the globe
    ([[-170, 0, 60, 1], [50, 0, 190 - 360, 1]], [-180, 0, 180, 1]),  # together round the globe
    ([[170, 0, -170, 1], [-175, 0, -174, 1]], [170, 0, -170, 1]),  # one inside another across 180°
    ([[160, 0, -150, 1], [-170, 0, -165, 1], [0, 0, 1, 1]], [160, 0, 1, 1]),
    ([[-180, 0, -170, 1], [170, 0, 180, 1]], [170, 0, -170, 1]),  # touching at ±180°
    ([], [-180, -90, 180, 90]),
])
def test_a_collections_extent_is_the_narrowest_span_holding_its_items(boxes, want):
    """The collection's spatial extent holds every item's box, crossing 180° as an item's box
    does (west > east) where that is the narrower way: a Pacific set's extent is not the globe."""
    from tilescan.outputs.stac_items import _union_bbox

    assert _union_bbox(boxes) == pytest.approx(want)


def test_collect_makes_a_collection_gdal_and_pystac_read(items):
    """collect: collection.json links each scene's item (extent theirs), items.json holds them as
    one ItemCollection naming the collection, its assets by absolute path;
    GDAL's STACIT driver mosaics the label COGs of one CRS from it on their own grid."""
    import os

    import pystac
    from pystac.validation import validate_dict

    out, _ = items
    assert tilescan.collect(out)["tiles"] > 0
    c = json.loads((out / "collected" / "collection.json").read_text())
    validate_dict({**c, "stac_extensions": []})  # the core Collection schema, pystac's own copy
    col = pystac.Collection.from_file(str(out / "collected" / "collection.json"))
    got = {i.id: i for i in col.get_items()}
    assert set(got) == {"m_4709963_se_14_1_20190904-tilescan", "image_geos-tilescan", "tagged-tilescan"}
    (box,) = col.extent.spatial.bboxes
    for it in got.values():
        if it.bbox:
            assert box[0] <= it.bbox[0] and box[1] <= it.bbox[1] and it.bbox[2] <= box[2] and it.bbox[3] <= box[3]
    assert col.extent.temporal.intervals[0][0].year == 2015  # the tagged scene's date is the first
    ic = pystac.ItemCollection.from_file(str(out / "collected" / "items.json"))
    assert len(ic.items) == 3 and all(i.collection_id == c["id"] for i in ic.items)
    for it in ic.items:
        for asset in it.assets.values():
            assert os.path.isabs(asset.href) and os.path.isfile(asset.href), asset.href
    if tuple(map(int, rasterio.__gdal_version__.split(".")[:2])) < (3, 10):
        pytest.skip(f"GDAL's STACIT driver reads proj:code from 3.10 on; rasterio's GDAL is {rasterio.__gdal_version__}")
    naip = out / NAIP.split("/")[-1][:-4] / "labels.tif"
    with rasterio.open(f'STACIT:"{out / "collected" / "items.json"}":asset=labels') as ds:
        (one,) = [s for s in ds.subdatasets if s.endswith("crs=EPSG_26914")]
    with rasterio.open(one) as mosaic, rasterio.open(naip) as cog:
        assert mosaic.res == cog.res and tuple(mosaic.bounds) == pytest.approx(tuple(cog.bounds))
        assert (mosaic.read(1) == cog.read(1)).all()


def test_collect_keeps_no_stale_collection_and_names_the_scenes_left_out(items, tmp_path):
    """Collected from inside OUT (`collect .`), the collection is named after OUT; a scene without
    an item (run without --stac-items) is named as left out; once no scene has one, the old
    collection.json and items.json go with the old set (they were kept as files of the user's)."""
    import subprocess
    import sys

    out = tmp_path / "out"
    shutil.copytree(items[0], out, ignore=shutil.ignore_patterns("collected", ".tilescan-*"))
    (out / "tagged" / "item.json").unlink()
    p = subprocess.run([sys.executable, "-m", "tilescan", "collect", "."], cwd=out, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "1 scene folder(s) without a STAC item, left out of collection.json: tagged" in p.stderr, p.stderr
    c = json.loads((out / "collected" / "collection.json").read_text())
    assert c["id"] == "out-tilescan" and len([k for k in c["links"] if k["rel"] == "item"]) == 2
    for f in out.glob("*/item.json"):
        f.unlink()
    tilescan.collect(out)
    assert not (out / "collected" / "collection.json").exists() and not (out / "collected" / "items.json").exists()
