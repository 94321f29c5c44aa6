"""The quicklook PNG: the scene with its labels and heatmap side by side, a legend and a colour bar.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import OutputError
from .files import atomic_output
from .palette import class_colors

# --------------------------------------------------------------------------- quicklook

LABEL_BLEND = 0.55
"""Weight of the class colour in the quicklook's label panel; the scene shows through with
the rest (a labelled pixel is ``(1 - LABEL_BLEND) * scene + LABEL_BLEND * colour``)."""

HEAT_BLEND = 0.5
"""Weight of the colour-mapped heat in the quicklook's Grad-CAM panel."""

_OUTLINE_RGB = (24, 24, 24)


_HEAT_CAPTION = "Grad-CAM (0 = no evidence, 1 = strongest)"


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
    font grows with the panel (``panel_w / 64``, between 11 and 24 px)."""
    font_px = int(min(24, max(11, round(panel_w / 64))))
    return QuicklookLayout(panel_w, panel_h, font_px, gap=max(4, font_px // 2),
                           title_h=round(font_px * 1.7), pad=max(4, font_px // 3))


@functools.lru_cache(maxsize=1)
def _font_path() -> str | None:
    """DejaVu Sans as shipped with matplotlib (found without importing it), or None."""
    import importlib.util

    spec = importlib.util.find_spec("matplotlib")
    for root in (spec.submodule_search_locations or []) if spec else []:
        p = Path(root) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if p.is_file():
            return str(p)
    return None


def _font(size: int):
    """A TrueType font of ``size`` px; Pillow's own font if DejaVu Sans is missing. Not
    cached: a font object is not shared between the threads that draw quicklooks."""
    from PIL import ImageFont

    path = _font_path()
    if path is not None:
        with contextlib.suppress(OSError):
            return ImageFont.truetype(path, size)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _preview_tiles(n_preview: int, n_scene: int, tile_px: int, stride: int, n_tiles: int) -> np.ndarray:
    """The grid column (or row) drawn at each preview pixel along one axis: the tile whose
    window centre is nearest to the scene pixel the preview pixel shows (the pixel the
    preview reader samples); on a tie, the later tile. With ``stride == tile_px`` that is
    the one tile whose window holds the pixel."""
    from ..scene.reader import _sample_index

    sp = _sample_index(n_preview, n_scene)
    # nearest of the centres k * stride + tile_px / 2 to sp + 0.5, in integers
    k = (2 * sp + 1 - tile_px + stride) // (2 * stride)
    return np.clip(k, 0, n_tiles - 1)


def _label_image(labels: np.ndarray, h: int, w: int, scene_size: tuple[int, int], tile_px: int,
                 stride: int, row_offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class index per preview pixel (-1: no tile or a skipped one), and the grid row and
    column drawn at each preview row / column."""
    from ..scene.grid import TileGrid

    grid = TileGrid(int(scene_size[0]), int(scene_size[1]), int(tile_px), int(stride))
    n_band, n_cols = labels.shape
    if n_cols != grid.n_cols or row_offset < 0 or row_offset + n_band > grid.n_rows:
        raise ValueError(
            f"labels of shape {labels.shape} at grid row {row_offset} do not fit the "
            f"{grid.n_rows} x {grid.n_cols} grid of {tile_px} px tiles (stride {stride}) "
            f"over a {scene_size[0]} x {scene_size[1]} scene")
    rows = _preview_tiles(h, grid.height, grid.tile_size, grid.stride, grid.n_rows)
    cols = _preview_tiles(w, grid.width, grid.tile_size, grid.stride, grid.n_cols)
    band = rows - row_offset
    inside = (band >= 0) & (band < n_band)
    out = np.full((h, w), -1, dtype=np.int64)
    out[inside] = labels[band[inside]][:, cols]
    return out, rows, cols


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` px wide (a longer word
    stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def write_quicklook(path: str | os.PathLike, preview_rgb: np.ndarray, preview_valid: np.ndarray | None,
                    labels: np.ndarray | None, heat: np.ndarray | None, classes: Sequence[str], *,
                    scene_size: tuple[int, int] | None = None, tile_px: int | None = None,
                    stride: int | None = None, row_offset: int = 0, outlines: bool = False) -> Path:
    """Write a PNG: scene | scene with label colours | Grad-CAM heat (jet) over the scene,
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
    e.g. from :func:`read_heatmap_preview`) is stretched over the scene.
    """
    rgb, valid = _checked_preview(preview_rgb, preview_valid)
    classes = [str(c) for c in classes]
    palette = np.array(class_colors(len(classes)) or [(0, 0, 0)], dtype=np.float32)
    base = rgb.astype(np.float32)
    base[~valid] *= 0.35  # dim nodata so the footprint is visible
    label_panel, present = _label_panel(base, valid, labels, len(classes), palette, scene_size, tile_px,
                                        stride, row_offset, outlines)
    heat_panel, has_heat = _heat_panel(base, valid, heat)
    image = _compose((base, label_panel, heat_panel), has_heat, present, classes, palette)
    _write_png(path, image)
    return Path(path)


def _checked_preview(preview_rgb, preview_valid) -> tuple[np.ndarray, np.ndarray]:
    """The preview as (h, w, 3) uint8 and its (h, w) bool mask (all valid when None), checked."""
    rgb = np.asarray(preview_rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"preview_rgb must be (h, w, 3) uint8, got {rgb.shape} {rgb.dtype}")
    h, w = rgb.shape[:2]
    valid = np.ones((h, w), bool) if preview_valid is None else np.asarray(preview_valid, bool)
    if valid.shape != (h, w):
        raise ValueError(f"preview_valid must be {(h, w)}, got {valid.shape}")
    return rgb, valid


def _label_panel(base: np.ndarray, valid: np.ndarray, labels, n_classes: int, palette: np.ndarray,
                 scene_size, tile_px, stride, row_offset: int, outlines: bool) -> tuple[np.ndarray, list[int]]:
    """The label panel (class colours blended over the scene) and the classes present, most frequent first."""
    h, w = valid.shape
    label_panel = base.copy()
    present: list[int] = []
    cells = None  # the grid row / column drawn at each preview row / column
    if labels is not None and np.asarray(labels).size:
        if scene_size is None or tile_px is None:
            raise ValueError("write_quicklook needs scene_size and tile_px to place the labels")
        grid_labels = np.asarray(labels, dtype=np.int64)
        if grid_labels.ndim != 2:
            raise ValueError(f"labels must be a 2-D tile grid, got shape {grid_labels.shape}")
        lab, *cells = _label_image(grid_labels, h, w, scene_size, tile_px,
                                   tile_px if stride is None else stride, row_offset)
        hit = (lab >= 0) & (lab < n_classes) & valid
        label_panel[hit] = (1.0 - LABEL_BLEND) * base[hit] + LABEL_BLEND * palette[lab[hit]]
        flat = grid_labels.ravel()
        flat = flat[(flat >= 0) & (flat < n_classes)]
        counts = np.bincount(flat, minlength=n_classes)
        present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    if outlines and cells is not None:
        rows, cols = cells  # a border on the first preview pixel of each tile
        edge = np.zeros((h, w), bool)
        edge[1:][rows[1:] != rows[:-1]] = True
        edge[:, 1:][:, cols[1:] != cols[:-1]] = True
        label_panel[edge] = _OUTLINE_RGB
    return label_panel, present


def _heat_panel(base: np.ndarray, valid: np.ndarray, heat) -> tuple[np.ndarray, bool]:
    """The Grad-CAM panel (jet over the scene; the scene darkened when there is no heat) and whether there is heat."""
    import cv2

    h, w = valid.shape
    heat_panel = base.copy()
    has_heat = heat is not None and np.asarray(heat).size > 0
    if has_heat:
        hm = np.asarray(heat, dtype=np.float32)
        ok = np.isfinite(hm) & (hm >= 0)
        hm_r = cv2.resize(np.where(ok, hm, 0).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        ok_r = cv2.resize(ok.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool) & valid
        jet = cv2.applyColorMap(np.clip(hm_r * 255 + 0.5, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
        jet = jet[..., ::-1].astype(np.float32)  # BGR -> RGB
        heat_panel[ok_r] = (1.0 - HEAT_BLEND) * base[ok_r] + HEAT_BLEND * jet[ok_r]
    else:
        heat_panel *= 0.5
    return heat_panel, has_heat


def _legend_lines(probe, font, s: int, present: list[int], classes: list[str],
                  legend_w: int) -> list[list[tuple[int, int]]]:
    """The legend's entries (class, width in px) packed into lines at most ``legend_w`` px wide."""
    lines: list[list[tuple[int, int]]] = []
    for i in present:
        width = s + s // 2 + round(probe.textlength(classes[i], font=font)) + s
        if lines and sum(e[1] for e in lines[-1]) + width <= legend_w:
            lines[-1].append((i, width))
        else:
            lines.append([(i, width)])
    return lines


def _compose(panels, has_heat: bool, present: list[int], classes: list[str], palette: np.ndarray):
    """The quicklook as a Pillow image: the three panels under their titles, the legend and the colour bar."""
    from PIL import Image, ImageDraw

    h, w = panels[0].shape[:2]
    lay = quicklook_layout(w, h)
    s, pad = lay.font_px, lay.pad
    font = _font(s)
    row_h = round(s * 1.5)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # the legend goes under the scene and label panels, the colour bar under the heat panel
    legend_w = (2 * w + lay.gap if has_heat else lay.width) - 2 * pad
    lines = _legend_lines(probe, font, s, present, classes, legend_w)
    legend_h = (len(lines) * row_h + 2 * pad) if lines else 0
    bx, by, bx1, by1 = lay.colorbar_box()
    bar_w, bar_h, tick = bx1 - bx, by1 - by, max(3, s // 3)
    caption = _wrap(probe, _HEAT_CAPTION, font, bar_w) if has_heat else []
    bar_band = (2 * pad + bar_h + tick + row_h * (1 + len(caption))) if has_heat else 0
    total_h = lay.title_h + h + max(legend_h, bar_band)

    canvas = np.full((total_h, lay.width, 3), 255, dtype=np.uint8)
    for k, panel in enumerate(panels):
        x, y = lay.origin(k)
        canvas[y:y + h, x:x + w] = np.clip(panel + 0.5, 0, 255).astype(np.uint8)
    if has_heat:
        _paint_colorbar(canvas, bx, by, bar_w, bar_h)
    image = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(image)
    ty = (lay.title_h - s) // 2
    for k, title in enumerate(("scene", "labels", "Grad-CAM" if has_heat else "no heatmap")):
        draw.text((lay.origin(k)[0] + pad, ty), title, fill=(0, 0, 0), font=font)
    if has_heat:
        _draw_colorbar_text(draw, font, bx, by, bar_w, bar_h, tick, row_h, caption)
    _draw_legend(draw, font, lines, classes, palette, pad, lay.title_h + h + pad, s, row_h)
    return image


def _paint_colorbar(canvas: np.ndarray, bx: int, by: int, bar_w: int, bar_h: int) -> None:
    """The jet ramp from heat 0 (left) to 1 (right) into ``canvas`` at ``(bx, by)``."""
    import cv2

    ramp = np.clip(np.arange(bar_w) * (255.0 / max(1, bar_w - 1)) + 0.5, 0, 255).astype(np.uint8)
    colors = cv2.applyColorMap(ramp[None, :], cv2.COLORMAP_JET)[0, :, ::-1]
    canvas[by:by + bar_h, bx:bx + bar_w] = colors[None]


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
                 pad: int, y: int, s: int, row_h: int) -> None:
    """A colour swatch and the name of each class present, line by line from ``y`` down."""
    for line in lines:
        x = pad
        for i, width in line:
            color = tuple(int(c) for c in palette[i])
            draw.rectangle([x, y + (row_h - s) // 2, x + s, y + (row_h - s) // 2 + s], fill=color, outline=(0, 0, 0))
            draw.text((x + s + s // 2, y + (row_h - s) // 2), classes[i], fill=(0, 0, 0), font=font)
            x += width
        y += row_h


def _write_png(path: str | os.PathLike, image) -> None:
    """Encode the image as PNG and write it atomically to ``path``."""
    import cv2

    # libpng through OpenCV, zlib level 1 with the RLE strategy: faster than Pillow at any
    # level for about the same size (benchmarks/README.md)
    ok, png = cv2.imencode(".png", np.ascontiguousarray(np.asarray(image)[:, :, ::-1]),
                           [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
    if not ok:  # pragma: no cover - OpenCV reports no reason
        raise OutputError("cannot encode the quicklook PNG", path=str(path))
    with atomic_output(path) as tmp:
        tmp.write_bytes(png.tobytes())
