"""benchmarks/scale_curve.py: the scale transforms put the scene where they claim, and a
small real run (240 AID val images, three levels) writes a report with the recorded range.

The geometry tests mark real AID images with coloured squares at known offsets from the
centre and find them again in each view.
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

from tilescan.training.data import decode_rgb, load_dataset, resize
from conftest import REPO

_spec = importlib.util.spec_from_file_location("scale_curve", REPO / "benchmarks" / "scale_curve.py")
sc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sc)

SIZE = 128
RED, BLUE = (255, 0, 0), (0, 0, 255)
OFFSET = 30  # px right of the centre in the stored 150-px image


@pytest.fixture(scope="module")
def val(aid_dir):
    ds = load_dataset(aid_dir)
    items = ds.items("val")
    imgs = [decode_rgb(ds.root / p) for p, _ in items[:3]]
    return ds, items, imgs


def marked(img: np.ndarray) -> np.ndarray:
    """A copy with a red 8-px square at the centre and a blue one OFFSET px to its right."""
    out = img.copy()
    c = img.shape[0] // 2
    out[c - 4 : c + 4, c - 4 : c + 4] = RED
    out[c - 4 : c + 4, c + OFFSET - 4 : c + OFFSET + 4] = BLUE
    return out


def centroid(view: np.ndarray, colour) -> tuple[float, float] | None:
    """Centre (row, col) of the pixels close to ``colour``, None when there are none."""
    d = np.abs(view.astype(int) - np.array(colour)).sum(axis=-1)
    rr, cc = np.nonzero(d < 120)
    return None if len(rr) == 0 else (rr.mean(), cc.mean())


def test_unit_scale_is_the_evaluation_view_in_every_mode(val):
    _, _, imgs = val
    img = imgs[0]
    native = resize(img, SIZE)
    assert np.array_equal(sc.zoom_in(img, 1.0, SIZE), native)
    assert np.array_equal(sc.blur(img, 1.0, SIZE), native)
    assert np.array_equal(sc.context([resize(img, sc.cell_side(SIZE, 1.0))], SIZE), native)


@pytest.mark.parametrize("s", [0.71, 0.5])
def test_zoom_in_magnifies_about_the_centre(val, s):
    img = marked(val[2][0])
    view = sc.zoom_in(img, s, SIZE)
    assert view.shape == (SIZE, SIZE, 3)
    gain = SIZE / round(150 * s)  # output px per stored px
    r_red, c_red = centroid(view, RED)
    r_blue, c_blue = centroid(view, BLUE)
    assert abs(r_red - 63.5) < 2 and abs(c_red - 63.5) < 2
    assert abs(c_blue - (c_red + OFFSET * gain)) < 2 and abs(r_blue - r_red) < 2


def test_zoom_in_crop_leaves_out_what_is_beyond_it(val):
    view = sc.zoom_in(marked(val[2][0]), 0.35, SIZE)  # a 52-px crop: the blue square, 30 px out, is cut off
    assert centroid(view, RED) is not None and centroid(view, BLUE) is None


def test_blur_keeps_the_footprint_and_removes_detail(val):
    img = marked(val[2][1])
    native = resize(img, SIZE)
    views = {s: sc.blur(img, s, SIZE) for s in (1.41, 2.0, 4.0)}
    c_native = centroid(native, BLUE)
    for s in (1.41, 2.0):  # the markers stay where they are in the evaluation view
        c = centroid(views[s], BLUE)
        assert c is not None and abs(c[1] - c_native[1]) < 2.5 and abs(c[0] - c_native[0]) < 2.5

    def detail(x):  # mean absolute difference between horizontal neighbours
        return np.abs(np.diff(x.astype(float), axis=1)).mean()

    assert detail(native) > detail(views[1.41]) > detail(views[2.0]) > detail(views[4.0])


@pytest.mark.parametrize("s, cell, k", [(1.41, 91, 3), (2.0, 64, 3), (4.0, 32, 5)])
def test_context_puts_the_shrunk_image_in_the_centre_of_same_class_neighbours(val, s, cell, k):
    _, items, _ = val
    labels = np.array([c for _, c in items[:120]])
    ds = val[0]
    images = [decode_rgb(ds.root / p) for p, _ in items[:120]]
    i = 0
    images[i] = marked(images[i])
    partners = sc.partner_orders(labels)
    assert sc.cell_side(SIZE, s) == cell and sc.mosaic_k(SIZE, cell) == k
    view = sc.context_batch(images, [i], partners, s, SIZE, {})[0]
    o = (k * cell - SIZE) // 2  # where the crop starts in the mosaic
    c0 = (k // 2) * cell - o  # where the centre cell starts in the view
    assert np.array_equal(view[c0 : c0 + cell, c0 : c0 + cell], resize(images[i], cell))
    # the top-left corner of the view is the first partner's cell, cut by the crop
    first = resize(images[partners[i][0]], cell)
    assert np.array_equal(view[: cell - o, : cell - o], first[o:, o:])
    r, c = centroid(view, BLUE)
    assert abs(c - (63.5 + OFFSET * cell / 150)) < 2 and abs(r - 63.5) < 2


def test_partners_are_other_images_of_the_same_class_and_seeded(val):
    _, items, _ = val
    labels = np.array([c for _, c in items])
    a, b = sc.partner_orders(labels, seed=1), sc.partner_orders(labels, seed=1)
    other = sc.partner_orders(labels, seed=2)
    for i in range(0, len(labels), 97):
        assert i not in a[i] and (labels[a[i]] == labels[i]).all()
        assert len(a[i]) == (labels == labels[i]).sum() - 1
        assert np.array_equal(a[i], b[i])
    assert any(not np.array_equal(a[i], other[i]) for i in range(len(labels)))


def test_edge_interpolates_in_log_scale():
    rows = [{"s": 1.0, "accuracy": 0.92}, {"s": 0.71, "accuracy": 0.90}, {"s": 0.5, "accuracy": 0.70}]
    level = 0.9 * 0.92  # 0.828: crossed between 0.71 and 0.5, 36 % of the way
    t = (0.90 - level) / (0.90 - 0.70)
    assert sc.edge(rows, level) == pytest.approx(math.exp(math.log(0.71) + t * (math.log(0.5) - math.log(0.71))))
    assert sc.edge(rows, 0.5) == 0.5  # never falls: the last level
    assert sc.edge(rows, 0.95) == 1.0  # below already at s = 1


def test_small_run_writes_the_range_and_the_plot(aid_dir, tmp_path):
    out, png = tmp_path / "scale.json", tmp_path / "scale.png"
    sc.main(["--data", str(aid_dir), "--limit", "240", "--levels", "0.5,1,2", "--splits", "val",
             "--extend-below", "0", "--out", str(out), "--plot", str(png)])
    r = json.loads(out.read_text())
    assert r["levels"] == [0.5, 1.0, 2.0]
    for mode, want in (("zoom_in", [1.0, 0.5]), ("blur", [1.0, 2.0]), ("context", [1.0, 2.0])):
        rows = r["results"][mode]["val"]
        assert [row["s"] for row in rows] == want
        assert all(row["n"] == 240 and 0 <= row["macro_f1"] <= 1 for row in rows)
    native = r["results"]["zoom_in"]["val"][0]
    assert native["accuracy"] > 0.8  # the shipped model scores about 0.92 on the whole val split
    assert r["results"]["blur"]["val"][0] == r["results"]["context"]["val"][0] == native
    assert r["results"]["zoom_in"]["val"][1]["accuracy"] < native["accuracy"]
    assert r["peak"]["accuracy"] == max(row["accuracy"] for m in sc.MODES for row in r["results"][m]["val"])
    assert r["threshold"] == 0.9 and r["threshold_accuracy"] == pytest.approx(0.9 * r["peak"]["accuracy"])
    assert 0.5 <= r["s_in"] <= 1.0 <= r["s_out"] <= 2.0 and 1.0 <= r["s_out_blur"] <= 2.0
    assert r["native_gsd_m"] == pytest.approx([2.34375, 37.5])
    assert r["input_gsd_m"] == pytest.approx([2.34375 * r["s_in"], 37.5 * r["s_out"]])
    assert r["tile_footprint_m"] == pytest.approx([128 * g for g in r["input_gsd_m"]])
    assert len(r["model"]["sha256"]) == 64 and r["command"].startswith("python benchmarks/scale_curve.py")
    assert r["date"] and r["seconds"] > 0 and r["dataset"]["scored"] == {"val": 240}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
