"""Explanation figures: what did the model look at, for an image or for scene tiles?

``run_explain`` takes ordinary images (the whole image resized to the model input, as in
evaluation) and GeoTIFF scenes (``.tif`` / ``.tiff``: the named tiles, or the ``top`` most
confident tiles with at least half of their pixels valid). For each input it writes one
figure, a row per image or tile::

    original | <method> heatmap | <method> overlay | <method 2> heatmap | ...

and a JSON file with the labels, confidences and (for tiles) the pixel windows and bounds.
The CAMs of a figure are computed as ONE batch per method (:mod:`tilescan.explain.cam`).

The figure helpers here (:func:`render_rows`, :func:`save_figure`) are also used by
:mod:`tilescan.training.evaluate`. Figures are drawn with matplotlib's object API on an Agg canvas
(no pyplot, no global backend switch), and written atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import math
import os
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..config import CAM_METHOD_TITLES, resolve_target
from ..errors import ConfigError, InputError
from ..log import catching_warnings, emit
from ..outputs.files import folder_kept_if_used, nodata_json, write_bytes, write_json
from ..outputs.quicklook import HEAT_COLORMAP, read_north_up
from ..outputs.fonts import check_names, family_for
from ..scene import sources
from ..scene.grid import scale_note
from ..scene.info import TIFF_SUFFIXES

#: A TIFF without georeferencing, 8-bit and up to this many px a side, is an image (as train
#: reads one: a UC Merced chip, an exported photo) and is explained whole.
IMAGE_TIFF_MAX_PX = 1024
HEATMAP_CMAP = HEAT_COLORMAP  # as the quicklook and heatmap.qml draw heat
OVERLAY_ALPHA = 0.45  # weight of the heatmap colour in the overlay
WRONG_COLOR = "#c62828"
RIGHT_COLOR = "black"


def figure_fonts(fig) -> None:
    """Each text of ``fig`` that DejaVu Sans cannot draw (class names in Chinese...) in a font
    that can (:func:`fonts.family_for`). Before a layout measures the texts; save_figure calls it."""
    from matplotlib.text import Text

    for t in fig.findobj(Text):
        family = family_for(t.get_text())
        if family:
            t.set_fontfamily([family, "DejaVu Sans"])


@contextlib.contextmanager
def glyphs_said():
    """matplotlib's warnings about characters no font has kept quiet while drawing: check_names
    said so once, by name (as a warning on the command line)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from", category=UserWarning)
        yield


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Render a matplotlib Figure to PNG (:func:`figure_fonts` first) and write it atomically."""
    figure_fonts(fig)
    buf = io.BytesIO()
    with glyphs_said():
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return write_bytes(path, buf.getvalue())


def new_figure(width_in: float, height_in: float, layout: str | None = None):
    """A matplotlib Figure on its own Agg canvas (no pyplot state, safe in threads)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), layout=layout)
    FigureCanvasAgg(fig)
    return fig


# ------------------------------------------------------------------------ drawing


def method_title(name: str) -> str:
    return CAM_METHOD_TITLES.get(str(name).lower(), str(name))


def display_rgb(x: np.ndarray) -> np.ndarray:
    """A model input (H, W, C) in 0..1 as an RGB image: the first three bands, a single
    band as grey."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2:
        x = x[..., None]
    c = x.shape[-1]
    pick = [0, 1, 2] if c >= 3 else ([0, 0, 0] if c == 1 else [0, 1, 1])
    return np.clip(x[..., pick], 0.0, 1.0)


def colorize(cam: np.ndarray, cmap: str = HEATMAP_CMAP) -> np.ndarray:
    """A map (H, W) in [0, 1] as RGB colours of ``cmap``."""
    import matplotlib

    return matplotlib.colormaps[cmap](np.clip(cam, 0.0, 1.0))[..., :3].astype(np.float32)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The heatmap colours blended over the image."""
    return np.clip((1.0 - alpha) * display_rgb(image) + alpha * colorize(cam), 0.0, 1.0)


@dataclass
class FigureRow:
    """One row of an explanation figure: the input image (H, W, C) in 0..1, its maps
    {method: (H, W) in [0, 1]} at the image size, a title and its colour."""

    image: np.ndarray
    maps: dict[str, np.ndarray]
    title: str
    color: str = RIGHT_COLOR
    map_titles: dict[str, str] = field(default_factory=dict)
    outside_data_mask: np.ndarray | None = None  # (H, W) True outside the data (past the scene's edge), where the model saw it mirrored


def _shaded(rgb: np.ndarray, outside_data_mask: np.ndarray | None) -> np.ndarray:
    """``rgb`` with the part outside the data washed out towards grey."""
    if outside_data_mask is None or not outside_data_mask.any():
        return rgb
    out = rgb.copy()
    out[outside_data_mask] = 0.35 * out[outside_data_mask] + 0.65 * 0.6
    return out


def _title_lines(title: str, cell_in: float) -> list[str]:
    """A tile's title wrapped to its panel's width (a long class name over lines, whole, with
    its score), so it does not run over the next panel's title."""
    width = max(12, int(cell_in * 13))
    return [part for line in title.split("\n") for part in (textwrap.wrap(line, width) or [""])]


def render_rows(rows: Sequence[FigureRow], methods: Sequence[str], suptitle: str | None = None, cell_in: float = 2.4,
                warning: str | None = None):
    """The figure: one row per :class:`FigureRow`, columns original | heatmap | overlay
    per method; from three methods on, each row is two lines (heatmaps above their overlays)
    so the figure stays readable, not 15 panels wide; ``warning`` in red under the tiles
    (labels outside the model's scale), so the figure never travels without it. Returns the
    matplotlib Figure."""
    if not rows:
        raise ValueError("nothing to draw")
    lines = 1 if len(methods) <= 2 else 2
    n_cols = 1 + len(methods) * (3 - lines)
    head_in = (0.45 if suptitle else 0.0) + (0.35 if warning else 0.0)  # room for the title and the warning
    height = cell_in * 1.12 * len(rows) * lines + head_in + 0.55  # and the colour bar
    fig = new_figure(cell_in * n_cols, height, layout="constrained")  # titles kept clear of the row above
    axes = fig.subplots(len(rows) * lines, n_cols, squeeze=False)
    for r, row in enumerate(rows):
        ax = axes[r * lines, 0]
        ax.imshow(_shaded(display_rgb(row.image), row.outside_data_mask), interpolation="nearest")
        pale = row.outside_data_mask is not None and row.outside_data_mask.any()
        title = row.title + ("\n(pale: no data, the model saw the data mirrored)" if pale else "")
        ax.set_title("\n".join(_title_lines(title, cell_in)), fontsize=9, color=row.color)
        for m_i, m in enumerate(methods):
            cam = row.maps[m]
            name = row.map_titles.get(m, method_title(m))
            if lines == 1:
                ax_h, ax_o = axes[r, 1 + 2 * m_i], axes[r, 2 + 2 * m_i]
            else:
                ax_h, ax_o = axes[2 * r, 1 + m_i], axes[2 * r + 1, 1 + m_i]
            ax_h.imshow(cam, cmap=HEATMAP_CMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax_h.set_title(name, fontsize=9)
            ax_o.imshow(_shaded(overlay(row.image, cam), row.outside_data_mask), interpolation="nearest")
            ax_o.set_title(f"{name} overlay", fontsize=9)
        for ax in axes[r * lines:(r + 1) * lines].ravel():
            ax.set_xticks([])
            ax.set_yticks([])
        if lines == 2:
            axes[2 * r + 1, 0].set_axis_off()  # under the original: nothing
    _colour_bar(fig, axes, "eigencam" in methods)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    if warning:  # under the figure, in red, wrapped to its width
        fig.supxlabel("\n".join(textwrap.wrap(f"Warning: {warning}", width=int(cell_in * n_cols * 14))),
                      fontsize=8.5, color="#c00000")
    return fig


def _colour_bar(fig, axes, eigen: bool = False) -> None:
    """The maps' colour scale under the figure, and what 0 and 1 mean: each map divided by its own
    peak (``eigen``: an Eigen-CAM map among them, which shows the layer's response, whatever the class)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), HEATMAP_CMAP), ax=list(axes.ravel()), location="bottom",
                       shrink=0.6, aspect=45, pad=0.02)
    bar.set_label("each map divided by its own peak: 0 = no evidence for the class, 1 = the map's strongest "
                  "(compare places within a map, not maps)" + ("\nEigen-CAM: what the layer responds to, the same "
                                                                "for every class, not evidence for one" if eigen else ""),
                  fontsize=8)
    bar.ax.tick_params(labelsize=7)


# ------------------------------------------------------------------------ inputs


def _predict(model, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    out = [np.asarray(model.predict_on_batch(x[s : s + batch_size]), np.float32) for s in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, int(model.output_shape[-1])), np.float32)


@dataclass
class _Item:
    x: np.ndarray  # (S, S, C) model input (a scene tile turned north-up, as run gives it to the model)
    info: dict[str, Any]
    outside_data_mask: np.ndarray | None = None  # (S, S) True outside the tile's data (past the scene's edge), seen mirrored
    valid: np.ndarray | None = None  # a scene tile's valid pixels, as run's reader gives them (None: an image, all valid)


def _image_items(path: Path, lm, log: Callable[[str], None] = emit) -> list[_Item]:
    from PIL import Image

    from ..training.data import load_eval_image

    if lm.num_bands != 3:
        raise ConfigError(f"the model takes {lm.num_bands} bands; ordinary images are RGB (use a GeoTIFF)", path=str(path))
    x = load_eval_image(path, lm.input_size)
    with contextlib.suppress(Exception), Image.open(path) as im:  # (unreadable: load_eval_image said so)
        if max(im.size) > IMAGE_TIFF_MAX_PX:
            log(f"note: {path.name} is {im.width} x {im.height} px, explained whole as one {lm.input_size}-px image "
                f"({max(im.size) / lm.input_size:.0f}x smaller): for its parts, crop it, or give a GeoTIFF, whose tiles are explained")
    return [_Item(x, {"source": str(path)})]


def _tiling(config, given: Mapping[str, Any], flags: Mapping[str, str]):
    """The scenes' tiling settings as run reads them: ``config`` (a Config, a TOML file or None),
    the ``TILESCAN_TILING__*`` variables, then the settings ``given`` (None: not given), checked
    as run checks them (``bands`` also as "3,2,1"); so the tiles are the ones run reads."""
    from ..config import Config, load_config

    given = {k: v for k, v in given.items() if v is not None and v != ()}
    if isinstance(config, Config):
        cfg = config.replace("tiling", **given).tiling if given else config.tiling
    else:
        cfg = load_config(config, {"tiling": given} if given else None).tiling
    origins = {**getattr(cfg, "_origins", {}), **flags}  # the options as typed, for messages
    cfg = dataclasses.replace(cfg, allow_pixel_space=True)  # a plain image's tiles are explained too
    object.__setattr__(cfg, "_origins", origins)
    return cfg


def _scene_items(path: Path, lm, tiles, top: int, cfg, target: int | None, log) -> tuple[list[_Item], dict]:
    import warnings

    from ..scene.info import TilingWarning

    with catching_warnings(record=True) as caught:
        warnings.simplefilter("always", TilingWarning)
        reader = lm.open_scene(path, cfg)
    for w in caught:
        log(f"warning: {w.message}")
    scale = reader.plan.warning(str(path))
    for note in (scale, lm.band_warning(reader, str(path))):
        if note:
            log(f"warning: {note['message']}")
    with reader:
        grid = reader.grid
        if tiles:
            chosen = []
            for rc in tiles:
                try:
                    r, c = (int(v) for v in rc)
                    chosen.append(grid.tile(r, c))
                except (IndexError, TypeError, ValueError):
                    raise ConfigError(
                        f"tile {rc!r} is not in the {grid.n_rows}x{grid.n_cols} grid of this scene "
                        f"(tile size {grid.tile_size} px; rows 0..{grid.n_rows - 1}, cols 0..{grid.n_cols - 1})",
                        path=str(path),
                    ) from None
        else:
            # classify every tile (in batches) and keep the `top` most confident valid ones
            all_tiles = list(grid.tiles())
            scores, fracs = [], []
            for s in range(0, len(all_tiles), 64):
                x, valid = read_north_up(reader, all_tiles[s : s + 64])  # as run scores them
                p = _predict(lm.model, x)
                scores.append(p[:, target] if target is not None else p.max(axis=1))
                fracs.append(valid.reshape(len(valid), -1).mean(axis=1))
            score, frac = np.concatenate(scores), np.concatenate(fracs)
            ok = np.flatnonzero(frac >= cfg.min_valid_fraction)
            if ok.size == 0:
                full, at = float(frac.max(initial=0)), all_tiles[int(np.argmax(frac))] if len(frac) else None
                raise InputError(f"no tile of its {len(all_tiles)} ({grid.tile_size} px) has at least "
                                 f"{cfg.min_valid_fraction:.0%} valid pixels" + (
                                     f"; the fullest, ({at.row}, {at.col}), has {full:.0%}: --tiles {at.row},{at.col} "
                                     f"explains it, or --min-valid {math.floor(full * 100) / 100:g} lets --top pick"
                                     if at is not None and full > 0 else " (none holds any: nodata or alpha cover the scene)"),
                                 path=str(path))
            best = ok[np.argsort(-score[ok], kind="stable")[: max(1, int(top))]]
            chosen = [all_tiles[i] for i in best]
        (x, valid), items = read_north_up(reader, chosen), []  # the model sees each tile north-up, as run's does
        for tile, xi, vi in zip(chosen, x, valid):
            w = tile.window
            info = {
                "source": str(path),
                "tile": [tile.row, tile.col],
                "window": {"col_off": int(w.col_off), "row_off": int(w.row_off), "width": int(w.width), "height": int(w.height)},
                "bounds": [float(v) for v in reader.tile_bounds(tile)],
                "valid_fraction": float(vi.mean()),
            }
            if tiles and vi.mean() < cfg.min_valid_fraction:  # asked for by name: explained, but said
                log(f"warning: {path.name}: tile ({tile.row}, {tile.col}) " + (
                    "holds no valid pixel: the model sees only fill, and its label means nothing" if not vi.any() else
                    f"is {vi.mean():.0%} valid data") + f"; run leaves tiles under {cfg.min_valid_fraction:.0%} "
                    "unlabelled (its table has no row for it)")
            items.append(_Item(xi, info, outside_data_mask=_outside_data(vi, xi.shape[0]), valid=vi))
        scene = {
            "width": reader.info.width,
            "height": reader.info.height,
            "crs": reader.info.crs.to_string() if reader.info.crs else None,
            "grid": [grid.n_rows, grid.n_cols],
            "tile_size_px": grid.tile_size,
            "bands": list(reader.bands),
            "nodata": nodata_json(reader.info.nodata),
            "nodata_from": reader.info.nodata_from,  # "file", or the setting that replaced it
            "scale_warning": scale,  # labels outside the model's scale: also in red on the figure
        }
    return items, scene


def _outside_data(valid: np.ndarray, s: int) -> np.ndarray | None:
    """(s, s) True outside the box of a tile's ``valid`` pixels (past the scene's edge, or a
    frame's nodata round the data), drawn at ``s`` px, where the model saw the box mirrored; None: nowhere."""
    from ..scene.reader import data_box

    if (box := data_box(valid)) is None:
        return None
    r0, r1, c0, c1 = box
    t = valid.shape[0]
    out = np.ones((s, s), bool)
    out[r0 * s // t:math.ceil(r1 * s / t), c0 * s // t:math.ceil(c1 * s / t)] = False
    return out


def _unique_name(stem: str, suffix: str, used: set[str]) -> str:
    name, n = f"{stem}{suffix}", 2
    while name in used:
        name, n = f"{stem}-{n}{suffix}", n + 1
    used.add(name)
    return name


# ------------------------------------------------------------------------ the command


def run_explain(
    inputs: Sequence[str],
    out_dir: str,
    model_path: str | None = None,
    methods: Sequence[str] = ("gradcam",),
    layer: str | None = None,
    target: str | int | None = None,
    tiles: Sequence[tuple[int, int]] = (),
    top: int = 4,
    tile_size: int | None = None,
    units: str | None = None,
    nodata: str | None = None,
    bands: Sequence[int] = (),
    stride: int | None = None,
    min_valid: float | None = None,
    config=None,
    log: Callable[[str], None] = emit,
    flags: Mapping[str, str] | None = None,
) -> list[Path]:
    """Explanation figures for images and GeoTIFF scene tiles; returns the PNG paths.

    ``methods``: CAM method names (:data:`tilescan.explain.cam.CAM_METHODS`), a heatmap and its
    overlay each (:func:`render_rows`). ``layer``: CAM layer (default: the model's).
    ``target``: class name or index to explain (default: each image's predicted class). ``tiles``: (row, col) tiles of
    every scene; empty: the ``top`` most confident tiles (confidence in ``target`` when it
    is given) among those with at least ``[tiling] min_valid_fraction`` valid pixels. ``config``
    (a Config, a TOML file or None), the ``TILESCAN_TILING__*`` variables, then ``tile_size``,
    ``stride``, ``units``, ``nodata``, ``bands`` and ``min_valid`` (None or empty: not given) set
    the tiling as they set run's, so a tile's (row, col) is the one in run's table. ``flags``:
    the option each of those came from as typed (``{"bands": "--bands 4,2"}``), for messages.

    Writes ``<stem>_explain.png`` + ``.json`` per image and
    ``<scene-stem>_tiles_explain.png`` + ``.json`` per scene into ``out_dir``.
    """
    flags = dict(flags or {})
    methods = _checked_methods(inputs, methods, top, tile_size, nodata, flags)
    tiling = _tiling(config, {"tile_size": tile_size, "units": units, "nodata": nodata, "bands": bands or None,
                              "stride": stride, "min_valid_fraction": min_valid}, flags)
    tiles = parse_tiles(tiles) if isinstance(tiles, str) else tiles
    paths = [_input_path(inp) for inp in inputs]  # a missing one or a folder: before anything is made
    lm, target_idx, cams = _load_explainer(model_path, methods, layer, target)
    if target_idx is not None and "eigencam" in methods:
        log("warning: the target changes nothing for eigencam: it maps the first principal component of the "
            "layer's activations, the same map for every class")
    check_names(lm.classes, log, "the figures' titles")
    used: set[str] = set()
    written: list[Path] = []
    with folder_kept_if_used(out_dir) as out:  # none left empty by a stop before the first figure
        for path in paths:
            is_scene = _is_scene(path, forced=bool(tiles or tile_size or bands), log=log)
            scene_info = None
            if is_scene:
                items, scene_info = _scene_items(path, lm, tiles, top, tiling, target_idx, log)
                stem = _unique_name(path.stem, "_tiles_explain", used)
            else:
                asked = set(flags) | {k for k, v in (("tile_size", tile_size), ("stride", stride), ("units", units),
                                                      ("bands", bands), ("nodata", nodata), ("min_valid", min_valid)) if v}
                given = (["--tiles"] if tiles else []) + [flags.get(k, k) for k in sorted(asked)]
                if given:  # for scene tiles only: said, not dropped without a word
                    log(f"warning: {path}: {', '.join(given)} apply to the tiles of GeoTIFF scenes; an image is "
                        "explained whole, as train reads one")
                items = _image_items(path, lm, log)
                stem = _unique_name(path.stem, "_explain", used)
            first, maps, results = _explain_batch(items, cams, methods, target_idx)
            rows, records = _rows_and_records(items, first, maps, results, methods, lm.classes, target_idx)
            title = path.name if not is_scene else f"{path.name}: {len(items)} tile{'s' * (len(items) != 1)}"
            note = scale_note([scene_info["scale_warning"]]) if scene_info and scene_info["scale_warning"] else None
            note = note and note.replace("run.json: warning_details", f"{stem}.json: scene.scale_warning")
            png = save_figure(render_rows(rows, methods, suptitle=title, warning=note), out / f"{stem}.png")
            write_json(out / f"{stem}.json", {
                "input": str(path), "kind": "scene" if is_scene else "image",
                "model": {"id": lm.model_id, "path": lm.path, "sha256": lm.sha256},
                "methods": methods, "layer": first.layer, "target": None if target_idx is None else lm.classes[target_idx],
                "input_size": lm.input_size, "scene": scene_info, "rows": records})
            what = ("tile" + "s" * (len(items) != 1)) if is_scene else "image"
            log(f"{path.name}: {len(items)} {what} explained -> {png}")
            written.append(png)
    return written


def parse_tiles(text: str) -> list[tuple[int, int]]:
    """Tiles written as on the command line, ROW,COL pairs separated by spaces or ';'
    ("0,1;2,3"), as (row, col) pairs in the order given."""
    out = []
    for part in text.replace(";", " ").split():
        try:
            r, c = part.split(",")
            out.append((int(r), int(c)))
        except ValueError:
            raise ConfigError(f"tiles are ROW,COL pairs separated by spaces or ';', got {part!r}") from None
    return out


def _checked_methods(inputs: Sequence[str], methods: Sequence[str], top: int, tile_size: int | None,
                     nodata: str | None = None, flags: Mapping[str, str] = {}) -> list[str]:
    """The CAM method names, lower-cased without repeats, after checking the arguments."""
    from ..config import is_nodata_setting, positive_int
    from .cam import checked_methods

    if not inputs:
        raise InputError("nothing to explain: no inputs given")
    methods = checked_methods(methods)
    positive_int("top", top)
    if tile_size is not None:
        positive_int("tile_size", tile_size)
    if nodata is not None and not is_nodata_setting(nodata):
        raise ConfigError(f"{flags.get('nodata', 'nodata')}: must be file, none or a number, got {nodata!r}")
    return methods


def _load_explainer(model_path: str | None, methods: list[str], layer: str | None, target):
    """The loaded model, the target's class index (None: each prediction) and a CAM per method."""
    from ..model import model_path as model_path_of
    from ..model import read_metadata

    path = model_path_of(model_path)  # "default" or None: the packaged model
    resolve_target(target, read_metadata(path)["classes"])  # the target checked before the slow Keras load
    st = os.stat(path) if os.path.exists(path) else None
    lm, cams = _explainer(path, None if st is None else (st.st_mtime_ns, st.st_size), tuple(methods), layer)
    return lm, resolve_target(target, lm.classes), cams


@functools.lru_cache(maxsize=2)
def _explainer(path: str, version: tuple | None, methods: tuple[str, ...], layer: str | None):
    """The loaded model and a CAM per method, kept for the next call with the same file (as
    it was: ``version``), methods and layer: figures made again and again in a notebook load
    and trace once."""
    from ..model import load_model
    from .cam import get_cam

    lm = load_model(path)
    return lm, {m: get_cam(m, lm.model, layer=layer or lm.cam_layer) for m in methods}


def _is_scene(path, forced: bool, log) -> bool:
    """Whether to explain ``path`` as a scene's tiles: a TIFF (by its name, or a local file by its
    first bytes, as run tells one), unless it is an image (no georeferencing, 8-bit, at most
    :data:`IMAGE_TIFF_MAX_PX` a side) and neither --tiles, --tile-size nor --bands asks for tiles."""
    import rasterio

    from ..scene.info import _is_georeferenced, open_quiet, scene_by_content

    remote = getattr(path, "remote", False)
    if path.suffix.lower() not in TIFF_SUFFIXES and (remote or not scene_by_content(path)):
        return False
    if forced or remote:
        return True

    try:
        with open_quiet(path) as ds:  # no georeferencing is what is asked here, not rasterio's to say
            image = (not _is_georeferenced(ds) and not ds.gcps[0] and not ds.rpcs and max(ds.width, ds.height) <= IMAGE_TIFF_MAX_PX
                     and set(ds.dtypes) == {"uint8"} and ds.count in (1, 3, 4))
    except rasterio.errors.RasterioError:
        return True  # the scene reader says what is wrong with it
    if image:
        log(f"{path.name}: not georeferenced: explained whole, as an image (as train reads one); "
            "--tile-size or --tiles explains its tiles")
    return not image


def _input_path(inp: str):
    """The input as a Path (a RemoteScene for a URL), refused when missing or a folder."""
    path = sources.scene_path(inp)
    if not path.exists():
        from ..scene.info import missing_input

        raise missing_input(path)  # a broken link named so
    if path.is_dir():
        raise InputError("input is a folder; name image or scene files", path=str(path))
    return path


def _explain_batch(items: list[_Item], cams: dict, methods: list[str], target_idx: int | None):
    """The first method's result, each method's maps at the input size and all results."""
    from .cam import upsample

    x = np.stack([it.x for it in items])
    t = None if target_idx is None else np.full(len(items), target_idx, dtype=np.int32)
    maps: dict[str, np.ndarray] = {}
    results = {}
    for m, cam in cams.items():  # one batch per method
        res = cam(x, target=t)
        results[m] = res
        maps[m] = upsample(res.cam, x.shape[1:3])
    return results[methods[0]], maps, results


def _rows_and_records(items: list[_Item], first, maps: dict, results: dict, methods: list[str],
                      classes: Sequence[str], target_idx: int | None) -> tuple[list[FigureRow], list[dict]]:
    """The figure rows and the JSON records of the explained items."""
    from ..pipeline.process import cam_stats

    probs, explained = first.probs, first.target
    pred = probs.argmax(axis=1)
    rows, records = [], []
    valid = np.stack([it.valid for it in items]) if all(it.valid is not None for it in items) else None
    fractions = np.array([it.info.get("valid_fraction", 1.0) or 1.0 for it in items])  # no data: the whole map, as drawn
    # each map's statistics over the cells holding data, as run's table has them (tiles.parquet)
    stats = {m: cam_stats(np.asarray(results[m].cam, np.float32), np.asarray(results[m].raw, np.float32), fractions, valid)
             for m in methods}
    for i, it in enumerate(items):
        c = int(explained[i])
        conf = float(probs[i, c])
        label = f"{classes[c]} {conf:.2f}"
        if target_idx is not None and int(pred[i]) != c:
            label = f"target {classes[c]} {conf:.2f}\n(pred {classes[int(pred[i])]} {probs[i, pred[i]]:.2f})"
        if "tile" in it.info:
            r_, c_ = it.info["tile"]
            label = f"tile ({r_}, {c_}): {label}"
            if it.info.get("valid_fraction") == 0:  # asked for by name; run leaves it unlabelled
                label += "\n(no data: the model saw only fill, the label means nothing)"
        rows.append(FigureRow(it.x, {m: maps[m][i] for m in methods}, label, outside_data_mask=it.outside_data_mask))
        top3 = np.argsort(-probs[i])[:3]
        records.append(
            {
                **it.info,
                "label": classes[c],
                "class_index": c,
                "confidence": conf,
                "predicted": classes[int(pred[i])],
                "predicted_confidence": float(probs[i, pred[i]]),
                "top3": [{"label": classes[int(k)], "probability": float(probs[i, k])} for k in top3],
                "cam_raw_max": {m: float(stats[m][2][i]) for m in methods},
                "cam_max": {m: float(stats[m][1][i]) for m in methods},
            }
        )
    return rows, records
