"""The quicklook and the QGIS files are written through fast paths (look-up tables, a
hand-written PNG, a one-pass XML serialiser, memoised styles). Each is checked here against the
straightforward computation it replaces: the same pixels, the same bytes."""

from __future__ import annotations

import io
import sys
from xml.etree import ElementTree as ET

import cv2
import numpy as np
import pytest
import rasterio
from PIL import Image, ImageDraw

import tilescan.outputs.quicklook as Q
from tilescan.outputs import qgis, qgis_style as QS
from tilescan.outputs.palette import class_colors
from tilescan.outputs.png import png_bytes
from conftest import grid_shape
from test_quicklook import CLASSES, RGB_BYTE, distinct_labels, preview_of

# ----------------------------------------------------------------------------- quicklook


def reference_panels(rgb, valid, labels, heat, n_classes, scene_size=None, tile_px=None, stride=None,
                     row_offset=0, outlines=False):
    """The three panels drawn the plain way: the scene as float32 with nodata dimmed, class
    and heat colours blended in through boolean masks, then rounded to uint8."""
    h, w = valid.shape
    palette = np.array(class_colors(n_classes) or [(0, 0, 0)], dtype=np.float32)
    base = rgb.astype(np.float32)
    base[~valid] *= 0.35
    label = base.copy()
    if labels is not None:
        grid = np.asarray(labels)
        rows = Q._preview_tiles(h, scene_size[1], tile_px, stride or tile_px, grid_shape(
            scene_size[0], scene_size[1], tile_px, stride or tile_px)[0])
        cols = Q._preview_tiles(w, scene_size[0], tile_px, stride or tile_px, grid.shape[1])
        lab = np.full((h, w), -1)
        for i in range(h):
            if 0 <= rows[i] - row_offset < len(grid):
                for j in range(w):
                    lab[i, j] = grid[rows[i] - row_offset, cols[j]]
        hit = (lab >= 0) & (lab < n_classes) & valid
        label[hit] = (1.0 - Q.LABEL_BLEND) * base[hit] + Q.LABEL_BLEND * palette[lab[hit]]
        if outlines:
            edge = np.zeros((h, w), bool)
            edge[1:][rows[1:] != rows[:-1]] = True
            edge[:, 1:][:, cols[1:] != cols[:-1]] = True
            label[edge] = (24, 24, 24)
    heat_panel = base.copy()
    if heat is not None:
        hm = np.asarray(heat, dtype=np.float32)
        ok = np.isfinite(hm) & (hm >= 0)
        hm_r = cv2.resize(np.where(ok, hm, 0).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        ok_r = cv2.resize(ok.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool) & valid
        hot = cv2.applyColorMap(np.clip(hm_r * 255 + 0.5, 0, 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
        hot = hot[..., ::-1].astype(np.float32)
        heat_panel[ok_r] = (1.0 - Q.HEAT_BLEND) * base[ok_r] + Q.HEAT_BLEND * hot[ok_r]
    else:
        heat_panel *= 0.5
    return [np.clip(p + 0.5, 0, 255).astype(np.uint8) for p in (base, label, heat_panel)]


def synthetic_preview(h=61, w=83, seed=0):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    rgb[:5] = 255
    rgb[-4:, :7] = 0
    valid = np.ones((h, w), bool)
    yy, xx = np.mgrid[:h, :w]
    valid[(yy - 20) ** 2 + (xx - 60) ** 2 < 90] = False  # a nodata hole
    valid[:, :3] = False
    heat = rng.random((17, 23)).astype(np.float32)
    heat[2:5, 3:9] = np.nan
    heat[10, :] = -1  # nodata
    return rgb, valid, heat


@pytest.mark.parametrize("tile, stride, row_offset, outlines", [
    (100, 100, 0, False),  # cells of 10 x 10 preview px: looked up pixel by pixel
    (100, 70, 2, True),    # overlapping tiles, a row band, outlines; per pixel
    (300, 300, 0, True),   # cells of 30 x 30 px: through OpenCV's LUT cell by cell
    (300, 200, 1, False),  # overlapping, a row band; cell by cell
])
def test_panels_equal_the_plain_float_drawing(tile, stride, row_offset, outlines):
    rgb, valid, heat = synthetic_preview()
    h, w = valid.shape
    scene_size = (830, 610)  # the preview at a tenth
    n_rows, n_cols = grid_shape(*scene_size, tile, stride)
    rng = np.random.default_rng(tile + stride)
    labels = rng.integers(-1, 33, (n_rows - row_offset - (row_offset > 0), n_cols))  # some >= 30: no class
    n_cells = len(Q._runs(Q._preview_tiles(h, scene_size[1], tile, stride, n_rows))) * n_cols
    per_cell = h * w >= Q._MIN_CELL_PX * n_cells
    assert per_cell == (tile == 300)  # both ways of drawing the label panel are covered

    want = reference_panels(rgb, valid, labels, heat, 30, scene_size, tile, stride, row_offset, outlines)
    scene = Q._scene_panel(rgb, valid)
    colors = tuple(class_colors(30))
    label, present = Q._label_panel(rgb, valid, scene, labels, colors, scene_size, tile, stride, row_offset, outlines)
    heat_panel, has_heat = Q._heat_panel(rgb, valid, scene, heat)
    no_heat, _ = Q._heat_panel(rgb, valid, scene, None)
    assert has_heat and present and set(present) <= set(range(30))
    np.testing.assert_array_equal(scene, want[0])
    np.testing.assert_array_equal(label, want[1])
    np.testing.assert_array_equal(heat_panel, want[2])
    np.testing.assert_array_equal(no_heat, reference_panels(rgb, valid, None, None, 30)[2])


def test_tables_equal_the_float_blends_for_every_value():
    """The heat blend's integer shortcut, and each class's label table, for all 256 values."""
    v = np.arange(256, dtype=np.float32)
    lut, halves = Q._heat_blend_lut()
    assert halves
    a, b = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    np.testing.assert_array_equal((a | b) - ((a ^ b) >> 1), lut)
    want = np.clip((1.0 - Q.HEAT_BLEND) * v[:, None] + Q.HEAT_BLEND * v[None] + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(lut, want)
    palette = np.array(class_colors(30), np.float32)
    for c in (0, 7, 29):
        for ch in range(3):
            blend = (1.0 - Q.LABEL_BLEND) * v + Q.LABEL_BLEND * palette[c, ch]
            np.testing.assert_array_equal(Q._label_lut(tuple(class_colors(30)))[c, ch],
                                          np.clip(blend + 0.5, 0, 255).astype(np.uint8))
    np.testing.assert_array_equal(Q._label_lut(tuple(class_colors(30)))[30, 0], np.arange(256))  # valid, unlabelled: the scene


def reference_quicklook(rgb, valid, labels, heat, classes, **kw):
    """The whole quicklook as it was drawn before: float panels, then every title, the colour
    bar and the legend drawn by Pillow on the whole image."""
    panels = reference_panels(rgb, valid, labels, heat, len(classes), kw["scene_size"], kw["tile_px"],
                              kw.get("stride"), kw.get("row_offset", 0), kw.get("outlines", False))
    flat = np.asarray(labels).ravel()
    counts = np.bincount(flat[(flat >= 0) & (flat < len(classes))], minlength=len(classes))
    present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    h, w = valid.shape
    lay = Q.quicklook_layout(w, h)
    s, pad, font, row_h = lay.font_px, lay.pad, Q.qt.font(lay.font_px), round(lay.font_px * 1.5)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    has_heat = heat is not None
    legend_w = (2 * w + lay.gap if has_heat else lay.width) - 2 * pad
    lines = []
    for i in present:
        width = s + s // 2 + round(probe.textlength(classes[i], font=font)) + s
        if lines and sum(e[1] for e in lines[-1]) + width <= legend_w:
            lines[-1].append((i, width))
        else:
            lines.append([(i, width)])
    bx, by, bx1, by1 = lay.colorbar_box()
    bar_w, bar_h, tick = bx1 - bx, by1 - by, max(3, s // 3)
    caption = []
    title = Q.CAM_METHOD_TITLES[kw.get("cam", "gradcam")]
    for word in Q._HEAT_CAPTION.format(title).split() if has_heat else []:
        if caption and probe.textlength(f"{caption[-1]} {word}", font=font) <= bar_w:
            caption[-1] = f"{caption[-1]} {word}"
        else:
            caption.append(word)
    legend_h = (len(lines) * row_h + 2 * pad) if lines else 0
    bar_band = (2 * pad + bar_h + tick + row_h * (1 + len(caption))) if has_heat else 0
    canvas = np.full((lay.title_h + h + max(legend_h, bar_band), lay.width, 3), 255, np.uint8)
    for k, panel in enumerate(panels):
        x, y = lay.origin(k)
        canvas[y:y + h, x:x + w] = panel
    if has_heat:
        Q._paint_colorbar(canvas, bx, by, bar_w, bar_h)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for k, name in enumerate(("scene", "labels", title if has_heat else "no heatmap")):
        draw.text((lay.origin(k)[0] + pad, (lay.title_h - s) // 2), name, fill=(0, 0, 0), font=font)
    if has_heat:
        Q._draw_colorbar_text(draw, font, bx, by, bar_w, bar_h, tick, row_h, caption)
    step = max(1, max(rgb.shape[:2]) // 128)  # swatches' right halves: over the scene's mean, from a sample
    under = rgb[::step, ::step][valid[::step, ::step]].astype(float).mean(axis=0)
    Q._draw_legend(draw, font, lines, classes, np.array(class_colors(len(classes)), np.float32), pad,
                   lay.title_h + h + pad, s, row_h, under)
    return np.asarray(image)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # GDAL reading the PNG
@pytest.mark.parametrize("with_heat, cam", [(True, "gradcam"), (True, "layercam"), (False, "gradcam")])
def test_quicklook_of_a_real_scene_equals_the_plain_drawing(tmp_path, scene_path, with_heat, cam):
    """RGB.byte.tif (a nodata border) with a row band of labels, outlines and heat with holes:
    the PNG decodes (Pillow, OpenCV, GDAL) to the plain drawing's pixels; the heat panel and its
    caption name the CAM method."""
    rgb, valid, (W, H) = preview_of(scene_path(RGB_BYTE), 500)
    assert not valid.all()
    n_rows, n_cols = grid_shape(W, H, 96, 80)
    labels = distinct_labels(n_rows, n_cols)[1:]
    heat = None
    if with_heat:
        heat = np.linspace(0, 1, 40 * 50, dtype=np.float32).reshape(40, 50)
        heat[5:9] = np.nan
    kw = dict(scene_size=(W, H), tile_px=96, stride=80, row_offset=1, outlines=True, cam=cam)
    classes = [f"class {i}" if i % 4 else f"a much longer class name {i}" for i in range(30)]
    p = Q.write_quicklook(tmp_path / "q.png", rgb, valid, labels, heat, classes, **kw)
    want = reference_quicklook(rgb, valid, labels, heat, classes, **kw)
    np.testing.assert_array_equal(np.asarray(Image.open(p)), want)
    np.testing.assert_array_equal(cv2.imread(str(p))[..., ::-1], want)
    with rasterio.open(p) as src:
        np.testing.assert_array_equal(src.read().transpose(1, 2, 0), want)


@pytest.mark.parametrize("deflate", ["isal", "zlib"])
def test_png_decodes_everywhere_and_stays_small(tmp_path, scene_path, monkeypatch, deflate):
    if deflate == "zlib":  # an install without the isal wheel
        monkeypatch.setitem(sys.modules, "isal", None)
    else:
        pytest.importorskip("isal")
    rng = np.random.default_rng(3)
    for shape in [(1, 1, 3), (1, 7, 3), (9, 1, 3), (33, 45, 3)]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        data = png_bytes(img)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), img)
        np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1],
                                      img)
    with pytest.raises(ValueError, match=r"\(h, w, 3\) uint8"):
        png_bytes(np.zeros((4, 4), np.uint8))
    # a real quicklook: about the size libpng's adaptive filters give
    rgb, valid, (W, H) = preview_of(scene_path(RGB_BYTE), 800)
    p = Q.write_quicklook(tmp_path / "q.png", rgb, valid, distinct_labels(*grid_shape(W, H, 128, 128)),
                          np.ones((30, 30), np.float32) * 0.3, CLASSES, scene_size=(W, H), tile_px=128)
    img = np.asarray(Image.open(p))
    _, libpng = cv2.imencode(".png", np.ascontiguousarray(img[..., ::-1]),
                             [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
    assert p.stat().st_size <= 1.3 * libpng.size


# ----------------------------------------------------------------------------- QGIS files


def et_bytes(root: ET.Element) -> bytes:
    """What the files held before: ElementTree's indent and serialiser."""
    ET.indent(root, space=" ")
    return (QS._DOCTYPE + ET.tostring(root, encoding="unicode") + "\n").encode("utf-8")


def test_serialiser_writes_what_elementtree_writes():
    root = ET.Element("qgis", a='x & "y" <z>\n\t', b="")
    ET.SubElement(root, "empty")
    ET.SubElement(root, "blank", v="1").text = ""
    ET.SubElement(root, "text").text = "a < b & c > d"
    mixed = ET.SubElement(root, "mixed")
    mixed.text = "kept text"
    ET.SubElement(mixed, "child").tail = "kept tail"
    ET.SubElement(mixed, "child2", k="v")
    deep = ET.SubElement(ET.SubElement(ET.SubElement(root, "l1"), "l2"), "l3")
    deep.text = "   "  # whitespace only in a leaf: kept
    styles = [QS.heatmap_style(), QS.labels_style(CLASSES, [0, 5, 29]), QS.tiles_style(CLASSES, [2, 3]),
              QS.tiles_style(CLASSES, by="confidence"), QS.scene_style([3, 2, 1], [(1.5, 200.0)] * 3),
              QS.scene_style([1], None), root]
    for style in styles:
        ours = QS._to_bytes(style)
        assert ours == et_bytes(style)
        assert QS._to_bytes(style) == ours  # ET.indent changed the tree; the result did not


@pytest.mark.parametrize("present", [(), (0,), (4, 9, 17, 28), tuple(range(30))])
def test_memoised_styles_and_projects_are_the_same_bytes(tmp_path, present):
    crs = rasterio.crs.CRS.from_epsg(32618)
    key_scale = ((10.0, 200.5), (11.0, 190.0), (12.0, 180.25))
    plain = {"heatmap": QS.heatmap_style(), "labels": QS.labels_style(CLASSES, present),
             "tiles": QS.tiles_style(CLASSES, present)}
    for round_ in range(2):  # built, then from the memo
        for name, style in plain.items():
            args = () if name == "heatmap" else (tuple(CLASSES), present)
            p = QS.write_style(tmp_path / f"{name}.qml", QS.memo_style(name, *args))
            assert p.read_bytes() == et_bytes(style), (name, round_)

        def layers(memo: bool):
            style = QS.memo_style if memo else (lambda kind, *a: {
                "heatmap": QS.heatmap_style, "labels": QS.labels_style, "tiles": QS.tiles_style,
                "confidence": lambda: QS.tiles_style(CLASSES, by="confidence"), "scene": QS.scene_style}[kind](*a))
            return [qgis.Layer("tiles", str(tmp_path / "tiles.gpkg"), "vector", style("tiles", tuple(CLASSES), present),
                               crs=crs, bounds=(0, 0, 10, 10), sublayer="tiles", style_name="label",
                               alt_styles={"confidence": style("confidence")}),
                    qgis.Layer("heatmap", str(tmp_path / "heatmap.tif"), "raster", style("heatmap"), crs=crs,
                               bounds=(0, 0, 10, 10), visible=False),
                    qgis.Layer("scene", str(tmp_path / "s.tif"), "raster", style("scene", (3, 2, 1), key_scale),
                               crs=crs, bounds=(0, 0, 10, 10))]

        args = dict(title="t", crs=crs, bounds=(0.0, 0.0, 10.0, 10.0), location=tmp_path)
        p = qgis.write_project(tmp_path / "memo.qgs", layers=layers(True), **args)
        want = et_bytes(qgis._project_tree(tmp_path / "plain.qgs", layers=layers(False), groups=(), **args))
        assert p.read_bytes() == want
