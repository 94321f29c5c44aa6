"""The quicklook PNG: the scene with its labels and heatmap side by side, a legend and a colour bar.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import CAM_METHOD_TITLES
from . import quicklook_text as qt
from .palette import colors_for
from .png import write_png as _write_png

# --------------------------------------------------------------------------- quicklook

LABEL_BLEND = 0.55
"""Weight of the class colour in the quicklook's label panel; the scene shows through with
the rest (a labelled pixel is ``(1 - LABEL_BLEND) * scene + LABEL_BLEND * colour``)."""

HEAT_BLEND = 0.5
"""Weight of the colour-mapped heat in the quicklook's Grad-CAM panel."""

HEAT_COLORMAP = "inferno"
"""The heat's colours, dark (no evidence) to bright (strongest), in the quicklook, heatmap.qml
and explain's figures: lightness rises with heat, so it reads in grey and to colour-blind eyes
(jet, used before, was brightest at 0.6 and its 0 and 1 looked alike in grey)."""


def _heat_map_id() -> int:
    import cv2

    return getattr(cv2, f"COLORMAP_{HEAT_COLORMAP.upper()}")


def heat_colours(index: np.ndarray) -> np.ndarray:
    """RGB uint8 of the heat colour map at ``index`` (uint8, 0..255 for heat 0..1)."""
    import cv2

    flat = np.ascontiguousarray(index, dtype=np.uint8).reshape(1, -1)
    return cv2.applyColorMap(flat, _heat_map_id())[0, :, ::-1].reshape(*np.shape(index), 3)


_OUTLINE_RGB = (24, 24, 24)


_HEAT_CAPTION = "{} in each tile (0 = no evidence, 1 = the tile's strongest)"

_WARNING_RGB = (178, 24, 24)  # the warning under the legend


@dataclasses.dataclass(frozen=True)
class QuicklookLayout:
    """Where :func:`write_quicklook` puts things: three ``panel_w`` x ``panel_h`` panels
    (scene, labels, Grad-CAM) side by side below a title row, ``gap`` pixels apart; the
    legend and the heat colour bar below them."""

    panel_w: int
    panel_h: int
    font_px: int
    gap: int
    title_h: int
    pad: int

    @property
    def width(self) -> int:
        return 3 * self.panel_w + 2 * self.gap

    def origin(self, k: int) -> tuple[int, int]:
        """``(x, y)`` of panel ``k``'s top-left pixel in the PNG (0 scene, 1 labels, 2 heat)."""
        if k not in (0, 1, 2):
            raise ValueError(f"panel must be 0, 1 or 2, got {k}")
        return k * (self.panel_w + self.gap), self.title_h

    def colorbar_box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` (exclusive ends) of the heat colour bar, under the heat
        panel: heat 0 at column ``x0``, 1 at ``x1 - 1``."""
        x0, y0 = self.origin(2)
        x0, y0 = x0 + self.pad, y0 + self.panel_h + self.pad
        return x0, y0, x0 + max(1, self.panel_w - 2 * self.pad), y0 + self.font_px


def quicklook_layout(panel_w: int, panel_h: int) -> QuicklookLayout:
    """The layout of a quicklook whose preview is ``panel_w`` x ``panel_h`` pixels; the
    font grows with the panel (``panel_w / 40``, between 11 and 26 px), so it stays legible when
    the three panels side by side are shrunk to fit a screen."""
    font_px = int(min(26, max(11, round(panel_w / 40))))
    return QuicklookLayout(panel_w, panel_h, font_px, gap=max(4, font_px // 2),
                           title_h=round(font_px * 1.7), pad=max(4, font_px // 3))


def _preview_tiles(n_preview: int, n_scene: int, tile_px: int, stride: int, n_tiles: int) -> np.ndarray:
    """The grid column (or row) drawn at each preview pixel along one axis: the tile whose
    window centre is nearest to the scene pixel the preview pixel shows (the pixel the
    preview reader samples); on a tie, the later tile. With ``stride == tile_px`` that is
    the one tile whose window holds the pixel."""
    from ..scene.decimate import sample_index

    sp = sample_index(n_preview, n_scene)
    # nearest of the centres k * stride + tile_px / 2 to sp + 0.5, in integers
    k = (2 * sp + 1 - tile_px + stride) // (2 * stride)
    return np.clip(k, 0, n_tiles - 1)


def write_quicklook(path: str | os.PathLike, preview_rgb: np.ndarray, preview_valid: np.ndarray | None,
                    labels: np.ndarray | None, heat: np.ndarray | None, classes: Sequence[str], *,
                    scene_size: tuple[int, int] | None = None, tile_px: int | None = None,
                    stride: int | None = None, row_offset: int = 0, outlines: bool = False,
                    warning: str | None = None, flip: tuple[bool, bool] = (False, False), cam: str = "gradcam",
                    colors: Sequence[Sequence[int]] | None = None, size: int | None = None) -> Path:
    """Write a PNG: scene | scene with label colours | Grad-CAM heat (HEAT_COLORMAP) over the scene,
    with panel titles (layout: :func:`quicklook_layout`), a legend of the classes present
    (most frequent first) and a colour bar for the heat.

    ``preview_rgb`` (h, w, 3) uint8 and ``preview_valid`` (h, w) bool cover the whole
    scene, sampled as the scene reader's preview samples it. ``labels`` holds the class of
    each tile (-1: skipped) for grid rows ``row_offset ..`` of the tile grid that
    ``scene_size`` (width, height in scene pixels), ``tile_px`` and ``stride`` (default
    ``tile_px``) define; each tile is drawn over its own window, clipped to the scene
    (where tiles overlap, each pixel shows the tile whose centre is nearest, the later
    one on a tie).
    ``outlines`` draws the tile borders. ``heat`` (any size, NaN or negative = nodata;
    e.g. from :func:`read_heatmap_preview`) is stretched over the scene. ``warning`` (e.g.
    that the labels are outside the model's scale) is written in red under the legend, so
    the picture does not travel without it. ``flip`` (rows, columns): turn the panels over,
    for a scene stored south-up or east-left, so north is up as on a map (:func:`north_up_flip`).
    ``cam``: the CAM method the heat is of, as its panel and caption name it. ``colors``: an
    (r, g, b) per class (the model's own legend colours), else the palette (:func:`~tilescan.outputs.palette.colors_for`).
    ``size``: the panels' largest side asked for (``[output] quicklook_size``), which a small
    scene's enlargement stays within.
    """
    rgb, valid = _checked_preview(preview_rgb, preview_valid)
    classes = [str(c) for c in classes]
    colors = colors_for(len(classes), colors)
    palette = _palette(colors)
    scene_panel = _scene_panel(rgb, valid)
    label_panel, present = _label_panel(rgb, valid, scene_panel, labels, colors, scene_size, tile_px,
                                        stride, row_offset, outlines)
    heat_panel, has_heat = _heat_panel(rgb, valid, scene_panel, heat)
    maps = (scene_panel, label_panel, heat_panel)
    if flip[0]:
        maps = tuple(p[::-1] for p in maps)
    if flip[1]:
        maps = tuple(p[:, ::-1] for p in maps)
    whole = scene_size is None or max(scene_size) <= max(maps[0].shape[:2])  # not one quicklook_size shrank
    side = max(maps[0].shape[:2])
    k = min(-(-MIN_PANEL_PX // side), size // side if size else MIN_PANEL_PX)
    if whole and k > 1:  # a small scene: each pixel a k x k block
        maps = tuple(np.repeat(np.repeat(p, k, axis=0), k, axis=1) for p in maps)
    if (short := min(MIN_PANEL_W, maps[0].shape[0]) - maps[0].shape[1]) > 0:
        maps = tuple(np.pad(p, ((0, 0), (short // 2, short - short // 2), (0, 0)), constant_values=255) for p in maps)
    image = _compose(maps, CAM_METHOD_TITLES.get(cam, cam) if has_heat else None, present, classes, palette, warning,
                     _mean_scene(rgb, valid))
    _write_png(path, image)
    return Path(path)


def north_up_flip(transform) -> tuple[bool, bool]:
    """Whether a scene's pixel rows, and its columns, run against north-up, east-right (a
    south-up scene: rows northward); a rotated scene (shear terms), and one without a
    geotransform (rasterio's identity: pixel space), are drawn as stored. Shear terms under a
    millionth of the pixel size (float residue of a fitted transform: a tenth of a pixel over
    100,000) are no rotation."""
    a, b, _, d, e, _ = tuple(transform)[:6]
    if abs(b) > 1e-6 * abs(a) or abs(d) > 1e-6 * abs(e) or transform.is_identity:
        return False, False
    return e > 0, a < 0


def turned(tiles: np.ndarray, flip: tuple[bool, bool]) -> np.ndarray:
    """Tiles (n, rows, columns, ...) with their rows and/or columns turned over as ``flip``
    says (:func:`north_up_flip`): a view."""
    return tiles[:, ::-1 if flip[0] else 1, ::-1 if flip[1] else 1]


def read_north_up(reader, tiles) -> tuple[np.ndarray, np.ndarray]:
    """``reader.read_batch(tiles)`` with each tile turned north-up, east-right as run gives it to
    the model (:func:`north_up_flip` of the scene's transform): its inputs and valid masks."""
    x, valid = reader.read_batch(tiles)
    flip = north_up_flip(reader.info.transform)
    return turned(x, flip), turned(valid, flip)


def write_scene_quicklook(path: str | os.PathLike, read: np.ndarray, valid: np.ndarray, stretch, labels, heat,
                          classes: Sequence[str], **kw) -> Path:
    """:func:`write_quicklook` of ``SceneReader.overview_read``'s read and mask, scaled here by ``stretch``
    (``preview_stretch``; None: ``read`` is the RGB already), so an output helper does that too."""
    from ..scene.scaling import preview_rgb

    rgb = read if stretch is None else preview_rgb(read, valid, *stretch)
    return write_quicklook(path, rgb, valid, labels, heat, classes, **kw)


def _checked_preview(preview_rgb, preview_valid) -> tuple[np.ndarray, np.ndarray]:
    """The preview as (h, w, 3) uint8 and its (h, w) bool mask (all valid when None), checked."""
    rgb = np.ascontiguousarray(preview_rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"preview_rgb must be (h, w, 3) uint8, got {rgb.shape} {rgb.dtype}")
    h, w = rgb.shape[:2]
    valid = np.ones((h, w), bool) if preview_valid is None else np.asarray(preview_valid, bool)
    if valid.shape != (h, w):
        raise ValueError(f"preview_valid must be {(h, w)}, got {valid.shape}")
    return rgb, valid


# The panels are drawn in uint8 through look-up tables whose entries come from the float32
# operations, in order, of the plain drawing (scene as float32, nodata dimmed, colours blended,
# + 0.5, clipped, truncated): the same pixels (tests/test_outputs_speed.py), far cheaper.

#: A panel whose longer side is shorter is enlarged by a whole factor (a chip of 64 px: 4x), so
#: its labels and heat can be told apart and the legend fits beneath.
MIN_PANEL_PX = 256
#: A narrower panel (a tall strip of a scene) is centred in white to this width, or to its
#: height if less (its largest side stays as asked), so that its title, and the colour bar
#: with its caption, fit over and under it.
MIN_PANEL_W = 160

_DIM = 0.35  # nodata is dimmed to this fraction of its brightness, so the footprint is visible
_NO_HEAT_DIM = 0.5  # the heat panel without heat: the scene at half brightness


def _to_u8(x: np.ndarray) -> np.ndarray:
    """A float32 panel value as the quicklook stores it: rounded half up, clipped to 0..255."""
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def _scene_f32(valid: bool) -> np.ndarray:
    """The scene panel's float32 value for each uint8 value 0..255, valid or nodata."""
    v = np.arange(256, dtype=np.float32)
    if not valid:
        v *= _DIM
    return v


@functools.lru_cache(maxsize=8)
def _palette(colors: tuple) -> np.ndarray:
    """The class colours as float32 (n, 3); black when there is no class."""
    palette = np.array(colors or [(0, 0, 0)], dtype=np.float32)
    palette.setflags(write=False)
    return palette


@functools.lru_cache(maxsize=1)
def _dim_lut() -> np.ndarray:
    """uint8 value -> the scene panel's value at nodata."""
    return _to_u8(_scene_f32(False))


@functools.lru_cache(maxsize=8)
def _label_lut(colors: tuple) -> np.ndarray:
    """(n + 3, 3, 256) uint8: the label panel's value of a pixel of class ``c`` (rows
    ``0 .. n-1``), of an unlabelled valid pixel (row ``n``), of an unlabelled nodata pixel
    (row ``n + 1``) and of a tile border (row ``n + 2``), per channel and scene value."""
    palette = _palette(colors)
    n = len(colors)
    v = _scene_f32(True)
    lut = np.empty((n + 3, 3, 256), np.uint8)
    lut[:n] = _to_u8((1.0 - LABEL_BLEND) * v[None, None, :] + LABEL_BLEND * palette[:n, :, None])
    lut[n] = _to_u8(v)
    lut[n + 1] = _dim_lut()
    lut[n + 2] = _to_u8(np.array(_OUTLINE_RGB, dtype=np.float32))[:, None]
    lut.setflags(write=False)
    return lut


@functools.lru_cache(maxsize=1)
def _heat_blend_lut() -> tuple[np.ndarray, bool]:
    """(256, 256) uint8: the heat panel's value for scene value ``v`` (rows) under heat colour
    value ``j`` (columns); and whether it is ``(v + j + 1) >> 1`` (so with ``HEAT_BLEND = 0.5``),
    which is cheaper to compute than a look-up."""
    v, j = _scene_f32(True), np.arange(256, dtype=np.float32)
    lut = _to_u8((1.0 - HEAT_BLEND) * v[:, None] + HEAT_BLEND * j[None, :])
    halves = (np.arange(256)[:, None] + np.arange(256)[None, :] + 1) >> 1
    return lut, bool(np.array_equal(lut, halves))


@functools.lru_cache(maxsize=2)
def _no_heat_luts() -> np.ndarray:
    """(2, 256) uint8: the heat panel without heat, for valid (row 0) and nodata (row 1) values."""
    return np.stack([_to_u8(_scene_f32(ok) * _NO_HEAT_DIM) for ok in (True, False)])


def _lut3(lut: np.ndarray) -> np.ndarray:
    """A (256,) table as OpenCV's LUT takes it for a three-channel image."""
    return np.ascontiguousarray(np.broadcast_to(lut.reshape(256, 1, 1), (256, 1, 3)))


def _scene_panel(rgb: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The scene as drawn: nodata dimmed."""
    import cv2

    panel = rgb.copy()
    if not valid.all():
        cv2.copyTo(cv2.LUT(rgb, _lut3(_dim_lut())), (~valid).view(np.uint8), panel)  # panel[~valid] = ...
    return panel


def _label_panel(rgb: np.ndarray, valid: np.ndarray, scene_panel: np.ndarray, labels, colors: tuple,
                 scene_size, tile_px, stride, row_offset: int, outlines: bool) -> tuple[np.ndarray, list[int]]:
    """The label panel (class colours blended over the scene) and the classes present, most frequent first."""
    h, w = valid.shape
    if labels is None or not np.asarray(labels).size:
        return scene_panel.copy(), []
    if scene_size is None or tile_px is None:
        raise ValueError("write_quicklook needs scene_size and tile_px to place the labels")
    grid_labels = np.asarray(labels, dtype=np.int64)
    if grid_labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D tile grid, got shape {grid_labels.shape}")
    stride = tile_px if stride is None else stride
    rows, cols = _preview_cells(grid_labels.shape, h, w, scene_size, tile_px, stride, row_offset)
    row_runs, col_runs, n = _runs(rows), _runs(cols), len(colors)
    if h * w >= _MIN_CELL_PX * len(row_runs) * len(col_runs):
        panel = _label_cells(rgb, valid, scene_panel, grid_labels, colors, rows - row_offset, row_runs, col_runs, cols)
    else:  # many tiny cells: one look-up per pixel costs less than one call per cell
        panel = _label_pixels(rgb, valid, grid_labels, colors, rows - row_offset, cols)
    if outlines:  # a border on the first preview pixel of each tile
        border = _label_lut(colors)[n + 2, :, 0]
        panel[1:][rows[1:] != rows[:-1]] = border
        panel[:, 1:][:, cols[1:] != cols[:-1]] = border
    flat = grid_labels.ravel()
    flat = flat[(flat >= 0) & (flat < n)]
    counts = np.bincount(flat, minlength=n)
    present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    return panel, present


_MIN_CELL_PX = 256  # below this many preview pixels per tile cell, the label panel is looked up per pixel


def _preview_cells(shape: tuple[int, int], h: int, w: int, scene_size, tile_px: int, stride: int,
                   row_offset: int) -> tuple[np.ndarray, np.ndarray]:
    """The grid row and column drawn at each preview row / column, for labels of ``shape``
    (grid rows ``row_offset ..``); an error when they do not fit the grid."""
    from ..scene.grid import TileGrid

    grid = TileGrid(int(scene_size[0]), int(scene_size[1]), int(tile_px), int(stride))
    n_band, n_cols = shape
    if n_cols != grid.n_cols or row_offset < 0 or row_offset + n_band > grid.n_rows:
        raise ValueError(
            f"labels of shape {shape} at grid row {row_offset} do not fit the "
            f"{grid.n_rows} x {grid.n_cols} grid of {tile_px} px tiles (stride {stride}) "
            f"over a {scene_size[0]} x {scene_size[1]} scene")
    rows = _preview_tiles(h, grid.height, grid.tile_size, grid.stride, grid.n_rows)
    cols = _preview_tiles(w, grid.width, grid.tile_size, grid.stride, grid.n_cols)
    return rows, cols


def _runs(cells: np.ndarray) -> list[tuple[int, int, int]]:
    """``(start, end, cell)`` of each run of equal values in ``cells`` (preview pixels of one tile)."""
    edges = [0, *(np.flatnonzero(cells[1:] != cells[:-1]) + 1).tolist(), len(cells)]
    return [(a, b, int(cells[a])) for a, b in zip(edges[:-1], edges[1:])]


@functools.lru_cache(maxsize=8)
def _label_luts3(colors: tuple) -> np.ndarray:
    """The label table of each class as OpenCV's LUT takes it: (n, 256, 1, 3) uint8."""
    lut = _label_lut(colors)[:len(colors)]
    return np.ascontiguousarray(lut.transpose(0, 2, 1)[:, :, None, :])


def _label_cells(rgb, valid, scene_panel, grid_labels, colors: tuple, band_rows, row_runs, col_runs, cols) -> np.ndarray:
    """The label panel drawn tile cell by tile cell: each labelled cell's pixels through its
    class's table, nodata left as the scene shows it."""
    import cv2

    luts, n = _label_luts3(colors), len(colors)
    panel = scene_panel.copy()
    n_band = len(grid_labels)
    for r0, r1, _ in row_runs:
        band = int(band_rows[r0])
        if not 0 <= band < n_band:
            continue
        row = grid_labels[band]
        for c0, c1, col in col_runs:
            c = int(row[col])
            if 0 <= c < n:
                cv2.LUT(rgb[r0:r1, c0:c1], luts[c], dst=panel[r0:r1, c0:c1])
    if not valid.all():  # nodata shows the scene
        cv2.copyTo(scene_panel, (~valid).view(np.uint8), panel)
    return panel


def _label_pixels(rgb, valid, grid_labels, colors: tuple, band_rows, cols) -> np.ndarray:
    """The label panel looked up pixel by pixel."""
    h, w, n = *valid.shape, len(colors)
    inside = (band_rows >= 0) & (band_rows < len(grid_labels))
    lab = np.full((h, w), -1, dtype=np.int64)  # the class drawn at each pixel (-1: none)
    lab[inside] = grid_labels[band_rows[inside]][:, cols]
    code = np.where(valid, n, n + 1).astype(np.intp)  # rows of the label table: unlabelled valid / nodata
    np.copyto(code, lab, where=(lab >= 0) & (lab < n) & valid)
    lut = _label_lut(colors).reshape(-1)
    code *= 3 * 256
    panel = np.empty((h, w, 3), np.uint8)
    for ch in range(3):
        idx = code + rgb[:, :, ch]
        if ch:
            idx += ch * 256
        panel[:, :, ch] = lut.take(idx)
    return panel


def _heat_panel(rgb: np.ndarray, valid: np.ndarray, scene_panel: np.ndarray, heat) -> tuple[np.ndarray, bool]:
    """The Grad-CAM panel (heat colours over the scene; the scene darkened when there is no heat) and whether there is heat."""
    import cv2

    h, w = valid.shape
    has_heat = heat is not None and np.asarray(heat).size > 0
    if not has_heat:
        dark = _no_heat_luts()
        panel = cv2.LUT(rgb, _lut3(dark[0]))
        if not valid.all():
            cv2.copyTo(cv2.LUT(rgb, _lut3(dark[1])), (~valid).view(np.uint8), panel)
        return panel, False
    hm = np.asarray(heat, dtype=np.float32)
    ok = np.isfinite(hm) & (hm >= 0)
    hm_r = cv2.resize(np.where(ok, hm, 0).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    ok_r = cv2.resize(ok.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool) & valid
    hm_r *= 255  # the colour map's index: heat * 255 + 0.5, clipped, truncated
    hm_r += 0.5
    np.clip(hm_r, 0, 255, out=hm_r)
    hot = cv2.cvtColor(cv2.applyColorMap(hm_r.astype(np.uint8), _heat_map_id()), cv2.COLOR_BGR2RGB)
    lut, halves = _heat_blend_lut()
    if halves:  # (v + j + 1) >> 1 without leaving uint8: (v | j) - ((v ^ j) >> 1)
        diff = np.bitwise_xor(rgb, hot)
        diff >>= 1
        panel = np.bitwise_or(rgb, hot)
        panel -= diff
    else:
        idx = rgb.astype(np.intp)
        idx <<= 8
        idx += hot
        panel = lut.reshape(-1).take(idx)
    if not ok_r.all():  # the scene where there is no heat
        cv2.copyTo(scene_panel, (~ok_r).view(np.uint8), panel)
    return panel, True


def _legend_lines(s: int, present: list[int], classes: list[str], legend_w: int) -> list[list[tuple[int, int]]]:
    """The legend's entries (class, width in px) packed into lines at most ``legend_w`` px wide."""
    lines: list[list[tuple[int, int]]] = []
    for i in present:
        width = s + s // 2 + round(qt.text_len(s, classes[i])) + s
        if lines and sum(e[1] for e in lines[-1]) + width <= legend_w:
            lines[-1].append((i, width))
        else:
            lines.append([(i, width)])
    return lines


def _mean_scene(rgb: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The scene's mean colour over its valid pixels (a sample of them); white without any."""
    step = max(1, max(rgb.shape[:2]) // 128)
    sample = rgb[::step, ::step][valid[::step, ::step]]
    return sample.mean(axis=0) if len(sample) else np.full(3, 255.0)


def _compose(panels, heat_title: str | None, present: list[int], classes: list[str], palette: np.ndarray,
             warning: str | None = None, under: np.ndarray | None = None) -> np.ndarray:
    """The quicklook (H, W, 3) uint8: the three (h, w, 3) uint8 panels under their titles,
    the legend (and the warning under it) and the colour bar. ``under``: the colour a legend
    swatch's right half shows its class blended over, as the label panel blends it over the scene."""
    h, w = panels[0].shape[:2]
    lay = quicklook_layout(w, h)
    has_heat = heat_title is not None
    s, pad = lay.font_px, lay.pad
    font = qt.font(s)
    row_h = round(s * 1.5)
    # the legend goes under the scene and label panels, the colour bar under the heat panel
    legend_w = (2 * w + lay.gap if has_heat else lay.width) - 2 * pad
    names = list(classes)  # each as the legend shows it: cut to the legend's width
    for i in present:
        names[i] = qt.fit(s, classes[i], legend_w - s - s // 2)
    lines = _legend_lines(s, present, names, legend_w)
    warned = qt.wrap(s, f"Warning: {warning}", legend_w) if warning else []
    legend_h = ((len(lines) + len(warned)) * row_h + 2 * pad) if lines or warned else 0
    bx, by, bx1, by1 = lay.colorbar_box()
    bar_w, bar_h, tick = bx1 - bx, by1 - by, max(3, s // 3)
    caption = qt.wrap(s, _HEAT_CAPTION.format(heat_title), bar_w) if has_heat else []
    bar_band = (2 * pad + bar_h + tick + row_h * (1 + len(caption))) if has_heat else 0
    total_h = lay.title_h + h + max(legend_h, bar_band)

    canvas = np.full((total_h, lay.width, 3), 255, dtype=np.uint8)
    for k, panel in enumerate(panels):
        x, y = lay.origin(k)
        canvas[y:y + h, x:x + w] = panel
    if has_heat:
        _paint_colorbar(canvas, bx, by, bar_w, bar_h)

    def titles(draw):
        _draw_titles(draw, lay, heat_title, font)

    def below(draw):
        if has_heat:
            _draw_colorbar_text(draw, font, bx, by, bar_w, bar_h, tick, row_h, caption)
        _draw_legend(draw, font, lines, names, palette, pad, lay.title_h + h + pad, s, row_h, under)
        y = lay.title_h + h + pad + len(lines) * row_h + (row_h - s) // 2
        for j, line in enumerate(warned):
            draw.text((pad, y + j * row_h), line, fill=_WARNING_RGB, font=font)

    # Pillow draws on the rows above and below the panels only, unless something drawn there
    # would reach into the panels (then on the whole image: the same pixels either way)
    below_y = lay.title_h + h
    try:
        top, bottom = _title_row(w, heat_title), qt.drawn(canvas, below_y, total_h, s, below)
    except qt.Overflow:
        return np.array(qt.drawn(canvas, 0, total_h, s, lambda d: (titles(d), below(d))))
    canvas[:lay.title_h] = top
    canvas[below_y:] = bottom
    return canvas


def _draw_titles(draw, lay: QuicklookLayout, heat_title: str | None, font) -> None:
    ty = (lay.title_h - lay.font_px) // 2
    for k, title in enumerate(("scene", "labels", heat_title or "no heatmap")):
        draw.text((lay.origin(k)[0] + lay.pad, ty), title, fill=(0, 0, 0), font=font)


@functools.lru_cache(maxsize=16)
def _title_row(panel_w: int, heat_title: str | None) -> np.ndarray:
    """The quicklook's rows above the panels: the same for every quicklook of this width."""
    lay = quicklook_layout(panel_w, 1)  # the panel height moves nothing in these rows
    row = np.full((lay.title_h, lay.width, 3), 255, dtype=np.uint8)
    row = qt.drawn(row, 0, lay.title_h, lay.font_px, lambda d: _draw_titles(d, lay, heat_title, qt.font(lay.font_px)))
    row.setflags(write=False)
    return row


def _paint_colorbar(canvas: np.ndarray, bx: int, by: int, bar_w: int, bar_h: int) -> None:
    """The heat colour ramp from 0 (left) to 1 (right) into ``canvas`` at ``(bx, by)``."""
    ramp = np.clip(np.arange(bar_w) * (255.0 / max(1, bar_w - 1)) + 0.5, 0, 255).astype(np.uint8)
    canvas[by:by + bar_h, bx:bx + bar_w] = heat_colours(ramp)[None]


def _draw_colorbar_text(draw, font, bx: int, by: int, bar_w: int, bar_h: int, tick: int, row_h: int,
                        caption: list[str]) -> None:
    """The colour bar's frame, its ticks at 0, 0.5 and 1 with their values, and the caption under them."""
    draw.rectangle([bx - 1, by - 1, bx + bar_w, by + bar_h], outline=(0, 0, 0))
    ly = by + bar_h + tick
    for v in (0.0, 0.5, 1.0):  # tick labels: 0 left-aligned, 0.5 centred, 1 right-aligned
        tx = bx + round(v * (bar_w - 1))
        draw.line([tx, by + bar_h, tx, ly - 1], fill=(0, 0, 0))
        text = f"{v:g}"
        draw.text((tx - round(v * draw.textlength(text, font=font)), ly + 1), text, fill=(0, 0, 0), font=font)
    for j, line in enumerate(caption):
        draw.text((bx, ly + row_h * (j + 1)), line, fill=(0, 0, 0), font=font)


def _draw_legend(draw, font, lines: list[list[tuple[int, int]]], classes: list[str], palette: np.ndarray,
                 pad: int, y: int, s: int, row_h: int, under: np.ndarray | None = None) -> None:
    """A colour swatch and the name of each class present, line by line from ``y`` down: the
    swatch's left half the class colour (as labels.tif has it), its right half that colour as
    the label panel draws it, blended over ``under`` (the scene's mean colour), which can be far
    from the pure colour (a pink over green fields reads brown)."""
    for line in lines:
        x = pad
        for i, width in line:
            color = tuple(int(c) for c in palette[i])
            y0 = y + (row_h - s) // 2
            draw.rectangle([x, y0, x + s, y0 + s], fill=color)
            if under is not None:
                mixed = LABEL_BLEND * np.asarray(palette[i], np.float64) + (1.0 - LABEL_BLEND) * under
                draw.rectangle([x + s // 2 + 1, y0, x + s, y0 + s], fill=tuple(int(c + 0.5) for c in mixed))
            draw.rectangle([x, y0, x + s, y0 + s], outline=(0, 0, 0))
            draw.text((x + s + s // 2, y + (row_h - s) // 2), classes[i], fill=(0, 0, 0), font=font)
            x += width
        y += row_h
