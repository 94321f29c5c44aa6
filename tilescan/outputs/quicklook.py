"""The quicklook PNG: the scene with its labels and heatmap side by side, a legend and a colour bar.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

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
    palette = _palette(len(classes))
    scene_panel = _scene_panel(rgb, valid)
    label_panel, present = _label_panel(rgb, valid, scene_panel, labels, len(classes), scene_size, tile_px,
                                        stride, row_offset, outlines)
    heat_panel, has_heat = _heat_panel(rgb, valid, scene_panel, heat)
    image = _compose((scene_panel, label_panel, heat_panel), has_heat, present, classes, palette)
    _write_png(path, image)
    return Path(path)


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


# The panels are drawn in uint8 through look-up tables. Each table entry is computed with
# the float32 operations, in the order, of the straightforward drawing (the scene as
# float32, nodata dimmed, colours blended, + 0.5, clipped, truncated; see
# tests/test_outputs_speed.py), so a pixel is the same as that drawing would give, at a
# fraction of the cost of blending float images through boolean masks.

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
def _palette(n_classes: int) -> np.ndarray:
    """The class colours as float32 (n, 3); black when there is no class."""
    palette = np.array(class_colors(n_classes) or [(0, 0, 0)], dtype=np.float32)
    palette.setflags(write=False)
    return palette


@functools.lru_cache(maxsize=1)
def _dim_lut() -> np.ndarray:
    """uint8 value -> the scene panel's value at nodata."""
    return _to_u8(_scene_f32(False))


@functools.lru_cache(maxsize=8)
def _label_lut(n_classes: int) -> np.ndarray:
    """(n + 3, 3, 256) uint8: the label panel's value of a pixel of class ``c`` (rows
    ``0 .. n-1``), of an unlabelled valid pixel (row ``n``), of an unlabelled nodata pixel
    (row ``n + 1``) and of a tile border (row ``n + 2``), per channel and scene value."""
    palette = _palette(n_classes)
    n = len(palette) if n_classes else 0
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
    """(256, 256) uint8: the heat panel's value for scene value ``v`` (rows) under jet value
    ``j`` (columns); and whether it is ``(v + j + 1) >> 1`` (so with ``HEAT_BLEND = 0.5``),
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


def _put(dst: np.ndarray, src: np.ndarray, where: np.ndarray) -> None:
    """``dst[where] = src[where]`` for (h, w, 3) uint8 images and an (h, w) bool mask."""
    import cv2

    cv2.copyTo(src, where.view(np.uint8), dst)


def _scene_panel(rgb: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The scene as drawn: nodata dimmed."""
    import cv2

    panel = rgb.copy()
    if not valid.all():
        _put(panel, cv2.LUT(rgb, _lut3(_dim_lut())), ~valid)
    return panel


def _label_panel(rgb: np.ndarray, valid: np.ndarray, scene_panel: np.ndarray, labels, n_classes: int,
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
    lab, rows, cols = _label_image(grid_labels, h, w, scene_size, tile_px,
                                   tile_px if stride is None else stride, row_offset)
    # each pixel's row of the label table: its class, else unlabelled valid / nodata, or a border
    n = n_classes
    code = np.where(valid, n, n + 1).astype(np.intp)
    hit = (lab >= 0) & (lab < n) & valid
    np.copyto(code, lab, where=hit)
    if outlines:  # a border on the first preview pixel of each tile
        code[1:][rows[1:] != rows[:-1]] = n + 2
        code[:, 1:][:, cols[1:] != cols[:-1]] = n + 2
    lut = _label_lut(n).reshape(-1)
    code *= 3 * 256
    panel = np.empty((h, w, 3), np.uint8)
    for ch in range(3):
        idx = code + rgb[:, :, ch]
        if ch:
            idx += ch * 256
        panel[:, :, ch] = lut.take(idx)
    flat = grid_labels.ravel()
    flat = flat[(flat >= 0) & (flat < n_classes)]
    counts = np.bincount(flat, minlength=n_classes)
    present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    return panel, present


def _heat_panel(rgb: np.ndarray, valid: np.ndarray, scene_panel: np.ndarray, heat) -> tuple[np.ndarray, bool]:
    """The Grad-CAM panel (jet over the scene; the scene darkened when there is no heat) and whether there is heat."""
    import cv2

    h, w = valid.shape
    has_heat = heat is not None and np.asarray(heat).size > 0
    if not has_heat:
        dark = _no_heat_luts()
        panel = cv2.LUT(rgb, _lut3(dark[0]))
        if not valid.all():
            _put(panel, cv2.LUT(rgb, _lut3(dark[1])), ~valid)
        return panel, False
    hm = np.asarray(heat, dtype=np.float32)
    ok = np.isfinite(hm) & (hm >= 0)
    hm_r = cv2.resize(np.where(ok, hm, 0).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    ok_r = cv2.resize(ok.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool) & valid
    jet = cv2.applyColorMap(np.clip(hm_r * 255 + 0.5, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    jet = jet[..., ::-1]  # BGR -> RGB
    lut, halves = _heat_blend_lut()
    if halves:
        panel = np.add(rgb, jet, dtype=np.uint16)
        panel += 1
        panel >>= 1
        panel = panel.astype(np.uint8)
    else:
        idx = rgb.astype(np.intp)
        idx <<= 8
        idx += jet
        panel = lut.reshape(-1).take(idx)
    if not ok_r.all():  # the scene where there is no heat
        _put(panel, scene_panel, ~ok_r)
    return panel, True


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
    """The quicklook as a Pillow image: the three (h, w, 3) uint8 panels under their titles,
    the legend and the colour bar."""
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
        canvas[y:y + h, x:x + w] = panel
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


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC of type + data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def png_bytes(rgb: np.ndarray) -> bytes:
    """An (h, w, 3) uint8 image as an 8-bit RGB PNG: every row with the "Up" filter (its
    difference to the row above, computed at once for the whole image), deflated at zlib
    level 1 with the RLE strategy. The cheapest encoding measured for the quicklook, a tenth
    larger than libpng's adaptive filters (benchmarks/README.md)."""
    a = np.ascontiguousarray(rgb, dtype=np.uint8)
    if a.ndim != 3 or a.shape[2] != 3 or not a.size:
        raise ValueError(f"png_bytes needs a non-empty (h, w, 3) uint8 image, got shape {a.shape}")
    h, w = a.shape[:2]
    rows = a.reshape(h, w * 3)
    raw = np.empty((h, 1 + w * 3), np.uint8)
    raw[:, 0] = 2  # filter type Up; the row above the first is zeros, so its bytes stay as they are
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])  # modulo 256, as PNG defines it
    z = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    idat = z.compress(raw) + z.flush()
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def _write_png(path: str | os.PathLike, image) -> None:
    """Encode the image as PNG (:func:`png_bytes`) and write it atomically to ``path``."""
    data = png_bytes(np.asarray(image))
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
