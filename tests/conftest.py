"""Shared fixtures and helpers: real data from ../shared/data, tiny models, the CLI in this
process, reports and trees of an output folder, quiet Keras.

Tests that need the real data skip with a clear reason when ``../shared/data`` is missing,
except when ``TILESCAN_REQUIRE_DATA=1`` (set by ``.ci/run``): there a missing folder fails.
Helpers for the batch tests (subprocess runs, a reference run, collected tables) live in
``batch_helpers.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
from pathlib import Path
from typing import Sequence

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# as tilescan.backend.import_keras sets it: tests that import Keras first get the same TensorFlow
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TILESCAN_DATA", REPO.parent / "shared" / "data"))
SCENES = DATA / "scenes"
AID = DATA / "aid"


def unavailable(msg: str, require_var: str):
    """Skip a test whose real part (data, a server, QGIS, Slurm) is missing here, with the
    reason; fail instead when ``require_var`` is 1 (``.ci/run`` sets it: there it must exist)."""
    if os.environ.get(require_var) == "1":
        pytest.fail(f"{msg} -- {require_var}=1, so this is an error, not a skip")
    pytest.skip(msg)


def need_jax() -> None:
    """JAX, the GPU extra's backend (``tilescan[test]`` installs its CPU build): skip without
    it, fail with ``TILESCAN_REQUIRE_JAX=1`` (``.ci/run``)."""
    import importlib.util

    if importlib.util.find_spec("jax") is None:
        unavailable('jax is not installed (pip install -e ".[test]" brings its CPU build)', "TILESCAN_REQUIRE_JAX")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _need(path: Path) -> Path:
    if path.exists():
        return path
    unavailable(f"real data not found at {path} (clone the project beside ../shared, or set TILESCAN_DATA)",
                "TILESCAN_REQUIRE_DATA")


@pytest.fixture(scope="session")
def scenes_dir() -> Path:
    return _need(SCENES)


@pytest.fixture(scope="session")
def aid_dir() -> Path:
    return _need(AID)


def scene(rel: str) -> Path:
    """Path of a real scene under ../shared/data/scenes (skips/fails when missing)."""
    return _need(SCENES / rel)


@pytest.fixture
def scene_path():
    return scene


OUTPUTS = ("tiles.parquet", "labels.tif", "heatmap.tif", "run.json", "quicklook.png")  # of every finished scene
LABEL_NODATA = 255  # the label raster's nodata
HEAT_NODATA = -1.0  # the heatmap's nodata

QUIET_AFFINE = pytest.mark.filterwarnings("ignore:Use `@` matmul:PendingDeprecationWarning")
"""Mark for tests (or ``pytestmark`` of a module) that go through rasterio's or rio-cogeo's
helpers: they use ``Affine * tuple``, which newer affine releases deprecate."""


def invoke(args: Sequence, env: dict | None = None):
    """``tilescan <args>`` through click in this process; click's Result (exit code, output).
    Exceptions other than click's exits propagate, so a crash shows its traceback."""
    from click.testing import CliRunner

    from tilescan.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def quiet(message: str) -> None:
    """A ``log`` callable that drops every message."""


def read_report(out: Path, name: str = "report.json") -> dict:
    """A run's report (``OUT/report.json``, or another JSON file in ``out``)."""
    return json.loads((out / name).read_text())


#: The colour of the quicklook's warning text (tilescan.outputs.quicklook), exactly.
WARNING_RGB = (178, 24, 24)


def warning_ink(image):
    """Rows of a quicklook (an (h, w, 3) array) holding pixels of exactly the warning's colour."""
    import numpy as np

    return np.flatnonzero((np.asarray(image) == WARNING_RGB).all(axis=2).any(axis=1))


def quicklook_has_warning(path: Path) -> bool:
    """Whether the quicklook PNG at ``path`` carries a warning under its legend."""
    from PIL import Image

    with Image.open(path) as im:
        return bool(len(warning_ink(im.convert("RGB"))))


def tree_hashes(root: Path, folders: bool = False) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest); with ``folders``, every
    folder too (as "dir"), hidden ones included."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if folders or p.is_file()}


def grid_shape(width: int, height: int, tile: int, stride: int) -> tuple[int, int]:
    """The tile grid's (rows, cols), stated independently of tilescan: every tile origin
    inside the scene, the last ones may run past the right / bottom edge."""
    return (1 + max(0, math.ceil((height - tile) / stride)), 1 + max(0, math.ceil((width - tile) / stride)))


def tiny_model_file(path: Path, classes: Sequence[str], size: int, *, seed: int, mean: float = 0.5,
                    std: float = 0.25, model_id: str | None = None, half: bool = False, adjust=None) -> Path:
    """A seeded random ResNet-18 for ``classes`` at ``size`` px (RGB, normalisation ``mean`` /
    ``std`` on every band), saved at ``path`` with tilescan metadata; ``adjust(model)`` may
    change its weights before it is saved."""
    import keras

    from tilescan.model import build_resnet18, save_model

    keras.utils.set_random_seed(seed)
    m = build_resnet18((size, size, 3), len(classes), mean=[mean] * 3, std=[std] * 3)
    if adjust is not None:
        adjust(m)
    meta = {"classes": list(classes), "input_size": [size, size], "bands": ["red", "green", "blue"],
            "normalization": {"mean": [mean] * 3, "std": [std] * 3}}
    if model_id is not None:
        meta["id"] = model_id
    save_model(m, path, meta, half=half)
    return path


def same_crs(a, b) -> bool:
    """Whether two CRSs (rasterio's, pyproj's, or anything pyproj reads) are the same, axis order aside."""
    import pyproj

    pa_, pb = (pyproj.CRS.from_user_input(c.to_wkt() if hasattr(c, "to_wkt") else c) for c in (a, b))
    return pa_.equals(pb, ignore_axis_order=True)


def same_unit(got: Path, want: Path, scene_col: bool = True) -> None:
    """Two unit folders hold the same results: every tiles.parquet row (the ``scene`` column
    too unless ``scene_col`` is false), and labels.tif and heatmap.tif pixel for pixel with
    the same profile."""
    import numpy as np
    import pyarrow.parquet as pq
    import rasterio

    a, b = pq.read_table(got / "tiles.parquet"), pq.read_table(want / "tiles.parquet")
    if not scene_col:
        a, b = a.drop(["scene"]), b.drop(["scene"])
    assert a.num_rows > 0 and a.equals(b), f"{got}: tiles.parquet differs from {want}"
    for name in ("labels.tif", "heatmap.tif"):
        with rasterio.open(got / name) as x, rasterio.open(want / name) as y:
            assert x.profile == y.profile
            np.testing.assert_array_equal(x.read(), y.read(), err_msg=f"{got}/{name}")


def check_outputs(folder: Path, scene_file: Path, tile: int, stride: int | None = None) -> dict:
    """Re-read every output of one scene and check it against the scene; returns them.

    - run.json complete, listing the outputs, which all exist;
    - tiles.parquet passes an independent GeoParquet 1.1 checker, loads in geopandas with the
      scene's CRS (none without georeferencing), one row per classified tile, each footprint
      the rasterio window-transform polygon of its pixel window (in a geographic CRS, within
      longitude and latitude), whose origin lies inside the scene; probabilities finite, summing to 1;
    - labels.tif and heatmap.tif pass rio-cogeo's COG validation, carry the scene CRS, the
      label grid has the documented shape and transform and holds each row's class at its
      (row, col), the heatmap covers exactly the scene and holds 0..1 or nodata, no NaN;
    - quicklook.png is a readable PNG.
    """
    import geopandas as gpd
    import numpy as np
    import rasterio
    import shapely
    from affine import Affine
    from PIL import Image
    from rio_cogeo.cogeo import cog_validate

    stride = stride or tile
    man = json.loads((folder / "run.json").read_text())
    assert man["status"] == "complete"
    for name in OUTPUTS:
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, name
        assert name == "run.json" or name in man["outputs"]
    with rasterio.open(scene_file) as ds:
        T, crs, W, H = ds.transform, ds.crs, ds.width, ds.height
    georef = crs is not None and not T.is_identity
    counts = man["counts"]
    n_rows, n_cols = grid_shape(W, H, tile, stride)
    assert counts["tiles_total"] == n_rows * n_cols
    assert counts["tiles_classified"] + counts["tiles_skipped"] == counts["tiles_total"]

    gdf = gpd.read_parquet(folder / "tiles.parquet")
    assert len(gdf) == counts["tiles_classified"]
    assert_geoparquet_conformant(folder / "tiles.parquet")
    if georef:
        assert gdf.crs is not None and same_crs(gdf.crs, crs), (gdf.crs, crs)
    else:
        assert gdf.crs is None
    if len(gdf):
        assert ((gdf.col_off >= 0) & (gdf.col_off < W) & (gdf.row_off >= 0) & (gdf.row_off < H)).all()
        assert (gdf.width == tile).all() and (gdf.height == tile).all()
        assert (gdf.col_off == gdf.col * stride).all() and (gdf.row_off == gdf.row * stride).all()
        c = window_corners(T, gdf.col_off.to_numpy(), gdf.row_off.to_numpy(), tile)
        with rasterio.open(scene_file) as ds:
            box = ds.bounds
        if georef and crs.is_geographic and box.left >= -180 and box.right <= 180 and box.bottom >= -90 and box.top <= 90:
            c = np.clip(c, [-180, -90], [180, 90])  # a world mosaic's edge tiles stop at 180° and the poles
        expected = shapely.polygons(np.concatenate([c, c[:, :1]], axis=1))
        diff = shapely.area(shapely.symmetric_difference(expected, gdf.geometry.values))
        assert (diff <= 1e-9 * shapely.area(expected)).all()
        probs = np.stack(gdf.probabilities.to_numpy())
        assert np.isfinite(probs).all() and np.allclose(probs.sum(axis=1), 1, atol=1e-4)
        assert ((gdf.valid_fraction > 0) & (gdf.valid_fraction <= 1)).all()
        assert np.isfinite(gdf[["confidence", "cam_mean", "cam_max"]].to_numpy()).all()

    for name in ("labels.tif", "heatmap.tif"):
        ok, errors, _ = cog_validate(str(folder / name), quiet=True)
        assert ok, (name, errors)
    with rasterio.open(folder / "labels.tif") as L:
        assert (L.crs is not None and same_crs(L.crs, crs)) if georef else L.crs is None
        assert L.shape == (n_rows, n_cols) and L.nodata == LABEL_NODATA
        half = (tile - stride) / 2  # each cell centred on its tile (overlapping tiles: the middle of it)
        assert L.transform.almost_equals(T * Affine.translation(half, half) * Affine.scale(stride),
                                         precision=1e-6 * max(1.0, abs(T.c), abs(T.f)))
        labels = L.read(1)
    expect = np.full((n_rows, n_cols), LABEL_NODATA, np.uint8)
    expect[gdf.row.to_numpy(), gdf.col.to_numpy()] = gdf.class_index.to_numpy()
    np.testing.assert_array_equal(labels, expect)
    with rasterio.open(folder / "heatmap.tif") as hm:
        assert (hm.crs is not None and same_crs(hm.crs, crs)) if georef else hm.crs is None
        assert hm.nodata == HEAT_NODATA
        far = np.array([hm.transform * (hm.width, hm.height), hm.transform * (0, 0)])
        near = np.array([T * (W, H), T * (0, 0)])
        np.testing.assert_allclose(far, near, rtol=1e-9, atol=1e-6 * max(abs(T.a), abs(T.b), abs(T.e), 1e-9))
        heat = hm.read(1)
    assert np.isfinite(heat).all()
    covered = heat != HEAT_NODATA
    assert ((heat[covered] >= -1e-6) & (heat[covered] <= 1 + 1e-6)).all()
    assert covered.any() == (counts["tiles_classified"] > 0)
    with Image.open(folder / "quicklook.png") as im:
        im.verify()
    return {"gdf": gdf, "manifest": man, "labels": labels, "heat": heat, "crs": crs, "transform": T}


def assert_geoparquet_conformant(path: Path) -> dict:
    """An independent checker's verdict on a GeoParquet file (geoparquet-validator, from the test
    extra): GeoParquet 1.1, and no test of the core, covering or distribution class failed, each
    class with at least one test passed. Skips without the checker, fails instead with
    ``TILESCAN_REQUIRE_VALIDATOR=1`` (``.ci/run``). Returns its report."""
    try:
        import geoparquet_validator as gpv
    except ImportError:
        unavailable('geoparquet-validator is not installed (pip install -e ".[test]" brings it)',
                    "TILESCAN_REQUIRE_VALIDATOR")
    report = gpv.check(str(path))
    assert report["version"] == "1.1.0", report["version"]
    failed = [(o["id"], o["message"]) for o in report["outcomes"] if o["status"] == "fail"]
    assert not failed, (path, failed)
    for kind in ("core", "covering", "distribution"):
        assert any(o["status"] == "pass" and o["id"].startswith(f"/conf/{kind}/") for o in report["outcomes"]), kind
    return report


def window_corners(T, col_off, row_off, size):
    """(N, 4, 2) corners of each window from rasterio.windows.transform (independent of tilescan)."""
    import numpy as np
    import rasterio.windows
    from rasterio.windows import Window

    out = []
    for c0, r0 in zip(col_off, row_off):
        t = rasterio.windows.transform(Window(int(c0), int(r0), size, size), T)
        out.append([t * (0, 0), t * (size, 0), t * (size, size), t * (0, size)])
    return np.array(out, dtype=np.float64)
