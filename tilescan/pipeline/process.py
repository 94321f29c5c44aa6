"""One unit in flight, from its scene to its outputs (:class:`UnitJob`).

A job is opened (scene checks, band stretch, staging folder), takes its tiles' model results
batch by batch (table rows, label cells, blended heat; on the writer thread), and is then
finished (tables, COGs, quicklook, QGIS files, run.json) and moved into place, or aborted
(nothing of it left). :mod:`tilescan.pipeline.stream` decides when each step runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from affine import Affine
from rasterio.transform import array_bounds

from .. import faults, layout
from ..config import Config
from ..errors import ModelError
from ..layout import MANIFEST, STAGING
from ..model import LoadedModel
from ..outputs.cog import write_labels_cog
from ..outputs.files import folder_synced_once, nodata_json, write_json
from ..outputs.geometry import crs_text, lonlat_limits, window_corners
from ..outputs.heatmap import HeatmapWriter
from ..outputs.qgis import qgis_alpha_band, scene_source, write_scene_files
from ..outputs.quicklook import north_up_flip, turned, write_scene_quicklook
from ..outputs.table import TileTable, check_gpkg_fits
from ..scene import sources
from ..scene.info import collecting_tiling_warnings
from ..scene.plan import check_scene_file, fill_note
from ..scene.grid import TileSet, _metres, scale_note
from ..scene.reader import SceneReader
from ..scene.scaling import preview_rgb
from .engine import Engine, switch_ms_used
from .readers import open_scene, read_batch
from .report import UnitResult
from .units import Unit, UnitLock, move_into_place, package_versions

#: A unit's tiles below --min-valid holding more than this share of the data it read are warned about.
UNLABELLED_DATA_WARN = 0.05


class UnitJob:
    """A unit in flight: its reader, staging folder and lock, and what its tiles gave so far.

    ``open`` (opener thread) -> ``read`` (reader threads, in tile order) -> ``consume`` (the
    writer thread, in tile order) -> ``finish`` (a finisher thread) or ``abort``."""

    def __init__(self, index: int, unit: Unit, out: Path, cfg: Config, card: LoadedModel, fingerprint: str,
                 lock: UnitLock, log: Callable[[str], None], version: dict | None = None):
        # ``card``: the model's metadata (classes, bands, input size, scale), all that opening
        # needs, so the scene opens while Keras and the model load; the engine comes with use()
        self.index, self.unit, self.out, self.cfg, self.card = index, unit, out, cfg, card
        self.engine: Engine | None = None
        self.fingerprint, self.lock, self.log = fingerprint, lock, log
        self.version = version  # the scene's identity in the fingerprint (run.json's scene_version)
        self.replaces: str | None = None  # what the finished outputs it redoes were made from (report.json)
        self.final = unit.out_dir(out)
        self.stage = out / STAGING / unit.slot
        self.stack = contextlib.ExitStack()  # what abort() must undo, newest first
        self.stack.callback(lock.release)
        self.timings = {"read": 0.0, "compute": 0.0, "write": 0.0}
        self.t0 = time.monotonic()
        self.reader: SceneReader | None = None
        self.tiles: TileSet | None = None
        self.n_kept = self.n_sent = self.n_consumed = 0
        self.best_fraction = 0.0  # the largest valid share of a tile read (what --min-valid would need)
        self.data_read = self.data_dropped = 0.0  # valid area of the tiles read, and of those below --min-valid
        self.reading_done = False  # every tile read and counted (the job can finish)
        self.reads_over = False  # no reader holds the job any more (a failed job can be removed)
        self.failed: BaseException | None = None
        self.abort_queued = False
        self.run_timings: Callable[[], dict] | None = None  # the run's start-up times (set by the stream)
        # the stream's threads for the tail's parallel writes, kept for the whole run: a
        # new thread pays GDAL's and PROJ's per-thread set-up again (several ms per scene)
        self.tail_pool: ThreadPoolExecutor | None = None
        self.workers = None  # the stream's output helper processes, if it has them
        self.batch_memory = None  # the stream's ArrayPool for the model inputs, if it has one
        self._finishing = False
        self.state = threading.Lock()

    # -- open (the opener thread)

    def check_file(self) -> None:
        """Refuse a local file that is no scene before the model is loaded for it."""
        check_scene_file(self.unit.scene)

    def open(self) -> None:
        """Open the scene (checks, bands, tiling plan, stretch) and stage its outputs."""
        self.t0 = time.monotonic()
        cfg, unit = self.cfg, self.unit
        if cfg.output.gpkg:  # a GeoPackage SQLite cannot open fails the scene now, not after its work
            check_gpkg_fits(self.stage / "tiles.gpkg", shown=self.final / "tiles.gpkg")
        with sources.remote_errors(unit.scene):
            self.reader, self.scene_warnings, self.details = _open_unit(unit, cfg, self.card, self.log)
        reader = self.reader
        self.stack.callback(reader.close)
        self.timings.update(reader.timings)  # scan (finding the data) and stats
        info, grid = reader.info, reader.grid
        # a scene stored south-up or east-left: the model sees each tile north-up, as the same
        # ground stored the usual way (its heat is turned back to the scene's pixels)
        self.turn = north_up_flip(info.transform)
        self.r0 = unit.row_start or 0
        self.r1 = grid.n_rows if unit.row_stop is None else min(unit.row_stop, grid.n_rows)
        self.n_tiles = (self.r1 - self.r0) * grid.n_cols
        # tiles inside blocks known to be empty are skipped unread (valid fraction 0)
        self.tiles, self.n_empty = reader.tiles_with_data(self.r0, self.r1)
        self.block_h = max(1, reader.block_height)
        self.skipped = self.n_empty
        if self.stage.exists():
            shutil.rmtree(self.stage)
        self.stage.mkdir(parents=True)
        self.stack.callback(shutil.rmtree, self.stage, ignore_errors=True)
        self.labels = np.full((self.r1 - self.r0, grid.n_cols), -1, dtype=np.int32)
        self.limits = lonlat_limits(info.crs, array_bounds(info.height, info.width, info.transform))
        self.table = TileTable(self.card.classes)
        self.heat = HeatmapWriter(self.stage / "heatmap.tif", info.width, info.height, info.transform, info.crs,
                                  cfg.output.heatmap_scale, reader.tile_px, grid.stride, compress=cfg.output.compress,
                                  preview_size=cfg.output.quicklook_size if cfg.output.quicklook else None)
        self.stack.callback(_quietly, self.heat.abort)
        if cfg.output.quicklook and unit.part is None:
            reader.gather_preview(cfg.output.quicklook_size)  # from the tiles: no second decode

    def use(self, engine: Engine, ready_at: float = 0.0) -> None:
        """The engine that classifies the job's tiles (once it is made, after ``open``);
        ``ready_at``: when it was ready (time.monotonic). A scene opened while the model
        loaded counts its time from then: its opening is part of the start-up."""
        if engine.loaded.sha256 != self.card.sha256:  # the file was replaced since the run read its metadata
            raise ModelError("the model file changed while the run started; run again", path=str(engine.loaded.path))
        self.engine = engine
        self.t0 = max(self.t0, ready_at)
        if engine.pipeline == "lockstep":  # reads run between model steps: GDAL may use every core
            self.reader.decode_threads = engine.cores

    # -- read (reader threads)

    def chunks(self, size: int) -> list[TileSet]:
        """The job's tiles with data, ``size`` at a time, in row-major order."""
        return [self.tiles[i:i + size] for i in range(0, len(self.tiles), size)]

    def band_chunks(self, size: int) -> list[TileSet]:
        """The job's tiles with data in row-major order, cut where a tile starts in another
        band of block rows (and every ``size`` tiles): a band's blocks are then decoded by
        the one reader that reads it (``band``)."""
        bands = self.tiles.row_off // self.block_h
        cut = np.flatnonzero(np.diff(bands)) + 1
        return [self.tiles[i:min(i + size, int(b))]
                for a, b in zip(np.r_[0, cut], np.r_[cut, len(self.tiles)]) for i in range(int(a), int(b), size)]

    def band(self, tiles: TileSet) -> int:
        """The band of block rows the first of ``tiles`` starts in."""
        return int(tiles.row_off[0]) // self.block_h

    def read(self, chunk: TileSet) -> tuple[TileSet, np.ndarray, np.ndarray, np.ndarray, int]:
        """Read ``chunk`` into one array; drop tiles with too little valid area (or none).
        Returns (kept tiles, their inputs (n, S, S, C), their valid masks, their valid
        fractions, tiles read)."""
        t = time.monotonic()
        with sources.remote_errors(self.unit.scene):
            x, v = read_batch(self.reader, chunk, self.batch_memory.empty if self.batch_memory else np.empty,
                              remote=getattr(self.unit.scene, "remote", False))
        frac = np.count_nonzero(v.reshape(len(v), -1), axis=1) / float(self.reader.tile_px ** 2)
        keep = np.flatnonzero((frac >= self.cfg.tiling.min_valid_fraction) & (frac > 0))
        if len(keep) < len(chunk):
            x, v = x[keep], v[keep]
        if any(self.turn):
            x[...] = turned(x, self.turn)
        read = float(frac.sum())
        dropped = read - float(frac[keep].sum())
        with self.state:  # readers of different bands add up here at once
            self.timings["read"] += time.monotonic() - t
            self.best_fraction = max(self.best_fraction, float(frac.max(initial=0.0)))
            self.data_read += read
            self.data_dropped += dropped
        return chunk[keep], x, v, frac[keep], len(chunk)

    # -- consume (the writer thread)

    def consume(self, tiles: TileSet, valid: np.ndarray, fractions: np.ndarray, res) -> None:
        """One batch's share of model results: table rows, label cells, blended heat."""
        if any(self.turn):  # the maps of tiles turned north-up, as the scene's pixels lie
            res = dataclasses.replace(res, cam=np.ascontiguousarray(turned(res.cam, self.turn)),
                                      raw=np.ascontiguousarray(turned(res.raw, self.turn)))
        rows, cls, cam = _batch_rows(tiles, fractions, res, self.reader.info.transform, valid, self.limits)
        self.labels[rows["row"] - self.r0, rows["col"]] = cls
        self.heat.add_batch(tiles.col_off, tiles.row_off, tiles.grid.tile_size, cam, valid)
        self.table.add(rows)
        self.n_consumed += len(tiles)

    def ready_to_finish(self) -> bool:
        """True once, when every tile is read and consumed (the caller then finishes it)."""
        with self.state:
            if self._finishing or self.failed is not None or not self.reading_done or self.n_consumed < self.n_kept:
                return False
            self._finishing = True
            return True

    # -- finish (a finisher thread) / abort

    def finish(self) -> UnitResult:
        """Write the outputs and run.json in staging, move the folder into place, unlock."""
        unit = self.unit
        said = None
        if len(self.table) == 0:
            said = _why_no_tiles(self.reader, self.n_tiles, self.cfg.tiling.min_valid_fraction, self.best_fraction)
        elif self.data_dropped > UNLABELLED_DATA_WARN * self.data_read:
            said = _unlabelled_data(self)
        if said is not None:
            self.scene_warnings.append(said["message"])
            self.details.append(said)
            self.log(f"warning: {said['message']}")
        self.reader.release_handles()  # every tile is read: the scene's cached blocks go
        tw = time.monotonic()
        with folder_synced_once(self.stage):  # before the folder is renamed into place
            with sources.remote_errors(unit.scene):
                _write_outputs(self)
            self.timings["write"] = time.monotonic() - tw
            total = time.monotonic() - self.t0
            manifest = _manifest(self, total)
            manifest.update(sources.manifest_fields(unit.scene))  # a URL's or STAC item's source
            write_json(self.stage / MANIFEST, manifest)
        faults.point("before-rename")
        if kept := move_into_place(self.stage, self.final, self.out):
            self.log(f"{unit.key}: kept what was added beside its outputs: {', '.join(kept)}")
        self.stack.pop_all()  # in place: nothing to undo but the reader and the lock
        self.reader.close()
        self.lock.release()
        return UnitResult(unit.key, str(unit.scene), "done", str(self.final), counts=manifest["counts"],
                          seconds=round(total, 2), warnings=list(self.details), replaced=self.replaces)

    def in_helper(self, fn: Callable, *args, **kwargs) -> Any:
        """``fn(*args, **kwargs)`` in one of the stream's output helper processes, if it has
        them (``[inference] output_workers``, :class:`~tilescan.outputs.workers.OutputWorkers`),
        else on this thread."""
        if self.workers is None:
            return fn(*args, **kwargs)
        return self.workers.call(fn, *args, **kwargs)

    def abort(self) -> None:
        """Remove everything of the job (staging folder, scratch files), close, unlock."""
        self.stack.close()


def _open_unit(unit: Unit, cfg: Config, card: LoadedModel, log: Callable[[str], None]) -> tuple[SceneReader, list[str], list[dict]]:
    """The scene's reader, and what the user should know about it (logged once here):
    the messages, and the same as structured warnings (``code``, ``message``, ...)."""
    with collecting_tiling_warnings() as caught:  # this thread's, not process-wide
        reader = open_scene(card, unit.scene, cfg.tiling)  # in the opener's process, if it has one
    details = list(caught)
    scene_warnings = [d["message"] for d in details]
    for note in (reader.plan.warning(str(unit.scene)), card.band_warning(reader, str(unit.scene))):
        if note:
            scene_warnings.append(note["message"])
            details.append(note)
    for w in scene_warnings:
        log(f"warning: {w}" if w.startswith(str(unit.scene)) else f"warning: {unit.scene}: {w}")
    return reader, scene_warnings, details

def _cam_cover(valid: np.ndarray, h: int, w: int) -> np.ndarray:
    """(n, h, w) share of valid pixels in each CAM cell of tiles' (n, S, S) valid masks."""
    n, sh, sw = valid.shape
    ey, ex = np.arange(h) * sh // h, np.arange(w) * sw // w  # each cell's first mask row / column
    counts = np.add.reduceat(np.add.reduceat(valid.view(np.uint8), ey, axis=1, dtype=np.int32), ex, axis=2)
    # a mask smaller than the CAM (tiles of a few pixels): a cell's count is its one pixel's
    area = np.maximum(np.outer(np.diff(np.r_[ey, sh]), np.diff(np.r_[ex, sw])), 1)
    return counts / area


def cam_stats(cam: np.ndarray, raw: np.ndarray, fractions: np.ndarray, valid: np.ndarray | None) -> tuple:
    """Mean (weighted by each cell's valid share), max, raw max and peak cell of each tile's
    CAM over its valid pixels, as the heatmap shows it: padding past the scene's edge and
    nodata count for nothing."""
    n, h, w = cam.shape
    mean, top, raw_top = cam.mean(axis=(1, 2)), cam.max(axis=(1, 2)), raw.max(axis=(1, 2))
    peak = cam.reshape(n, -1).argmax(axis=1)
    part = np.flatnonzero(fractions < 1) if valid is not None else np.empty(0, np.intp)
    if len(part):  # tiles with padding or nodata: their stats over the cells holding data
        cover = _cam_cover(valid[part], h, w)
        c, seen = cam[part], cover > 0
        mean[part] = (c * cover).sum(axis=(1, 2)) / cover.sum(axis=(1, 2))
        top[part] = np.where(seen, c, -np.inf).max(axis=(1, 2))
        raw_top[part] = np.where(seen, raw[part], -np.inf).max(axis=(1, 2))
        peak[part] = np.where(seen, c, -np.inf).reshape(len(part), -1).argmax(axis=1)
    return mean, top, raw_top, peak


def _batch_rows(tiles: TileSet, fractions: Sequence[float], res, transform: Affine,
                valid: np.ndarray | None = None, limits=None) -> tuple[dict, np.ndarray, np.ndarray]:
    """One batch's table columns, and its class indexes and CAMs, from the model step's result
    (``valid``: the tiles' (n, S, S) valid masks; None, all valid; ``limits``: footprints held
    within longitude and latitude, :func:`~tilescan.outputs.geometry.lonlat_limits`)."""
    probs = np.asarray(res.probs, dtype=np.float32)
    cls = probs.argmax(axis=1)
    conf = probs[np.arange(len(cls)), cls]
    cam = np.asarray(res.cam, dtype=np.float32)
    raw = np.asarray(res.raw, dtype=np.float32)
    n, h, w = cam.shape
    col_off, row_off = tiles.col_off, tiles.row_off
    size = np.full(n, tiles.grid.tile_size, dtype=np.int64)
    fractions = np.asarray(fractions, dtype=np.float32)
    cam_mean, cam_max, cam_raw_max, peak = cam_stats(cam, raw, fractions, valid)
    py, px = np.divmod(peak, w)
    pcol = col_off + (px + 0.5) * size / w
    prow = row_off + (py + 0.5) * size / h
    a, b, c, d, e, f = transform[:6]
    rows = {
        "tile_index": tiles.index,
        "row": tiles.row.astype(np.int32),
        "col": tiles.col.astype(np.int32),
        "col_off": col_off.astype(np.int32),
        "row_off": row_off.astype(np.int32),
        "width": size.astype(np.int32),
        "height": size.astype(np.int32),
        "corners": window_corners(transform, col_off, row_off, size, size, limits),
        "valid_fraction": fractions,
        "class_index": cls.astype(np.int16),
        "confidence": conf.astype(np.float32),
        "probabilities": probs,
        "cam_mean": cam_mean.astype(np.float32),
        "cam_max": cam_max,
        "cam_raw_max": cam_raw_max,
        "cam_peak_x": a * pcol + b * prow + c,
        "cam_peak_y": d * pcol + e * prow + f,
    }
    return rows, cls, cam



def _write_outputs(job: UnitJob) -> None:
    """Tables, label and heatmap COGs, quicklook and QGIS files into the staging folder."""
    unit, stage, cfg, engine, reader = job.unit, job.stage, job.cfg, job.engine, job.reader
    info, grid = reader.info, reader.grid
    transform, crs, stride, r0 = info.transform, info.crs, grid.stride, job.r0
    model_id = engine.loaded.model_id
    extra = {
        "tile_px": reader.tile_px,
        "stride_px": stride,
        "rows": [job.r0, job.r1],
        "bands": list(reader.bands),
        "cam_method": cfg.cam.method,
        "cam_layer": engine.cam.layer,
    }
    colors = engine.loaded.colors
    if own := engine.loaded.own_colors:  # the model's legend colours: collect styles its table with them too
        extra["class_colors"] = own
    # labels outside the model's scale say so in every output, not only in run.json
    note = scale_note(job.details)
    scale_tag = {} if note is None else {"SCALE_WARNING": note.replace("–", "-")}  # TIFF tags stay ASCII
    if note is not None:
        extra["scale_warning"] = note

    helper = job.in_helper  # the writers that hold the GIL: in a helper process, if the run has them

    def write_parquet():
        helper(TileTable.write_geoparquet, job.table, stage / "tiles.parquet", crs, engine.classes, unit.scene.name,
               model_id, extra, scale_check=reader.plan.scale)
        faults.point("writing")

    def write_gpkg():
        helper(TileTable.write_gpkg, job.table, stage / "tiles.gpkg", crs, engine.classes, unit.scene.name,
               model_id, extra, scale_check=reader.plan.scale)

    def write_labels():
        # each cell centred on its tile's centre: with overlapping tiles (stride < tile) the
        # part of the scene nearest that tile, as the quicklook draws it; else the tile itself
        half = (reader.tile_px - stride) / 2
        grid_tf = transform @ Affine.translation(half, r0 * stride + half) @ Affine.scale(stride)
        helper(write_labels_cog, stage / "labels.tif", job.labels, grid_tf, crs, engine.classes,
            compress=cfg.output.compress, colors=colors,
            tags={"MODEL_ID": model_id, "TILE_PX": reader.tile_px, "STRIDE_PX": stride, **scale_tag})

    # The scene's tail, off the model's thread: each table, the label and heatmap COGs and
    # the quicklook at once (GDAL, zlib and the Parquet writer release the GIL). The
    # quicklook's heat is read from the heatmap's scratch file while the COG is written.
    heat = job.heat
    heat.finish(tags={"MODEL_ID": model_id, "CAM_METHOD": cfg.cam.method, "CAM_LAYER": engine.cam.layer, **scale_tag})
    job.table.seal()  # its columns put together once, before both table writers read them
    previewed = threading.Event()
    futures = [job.tail_pool.submit(write_parquet), job.tail_pool.submit(heat.close, keep_scratch=previewed),
               job.tail_pool.submit(write_labels)]
    if cfg.output.gpkg:
        futures.append(job.tail_pool.submit(write_gpkg))
    try:
        try:
            hp = heat.preview(cfg.output.quicklook_size) if cfg.output.quicklook else None
        finally:
            previewed.set()
        if cfg.output.quicklook:
            empty = next((d["message"].removeprefix(f"{reader.info.path}: ") for d in job.details
                          if d["code"] == "no_tiles"), None)  # the scene drawn thrice, and why no label
            _write_quicklook(job, hp, "; ".join(filter(None, (empty, note, fill_note(job.details)))) or None)
    finally:
        wait(futures)  # a failed step still lets the others end before the job is removed
    for f in futures:
        f.result()
    if cfg.output.styles:  # .qml styles beside the outputs and, per whole scene, a QGIS project
        labels = job.labels
        helper(write_scene_files, stage, classes=engine.classes, present=np.unique(labels[labels >= 0]), crs=crs,
               bounds=array_bounds(info.height, info.width, transform), scene=unit.scene,
               bands=reader.bands, scale=reader.scale, nodata=info.nodata, nodata_from=info.nodata_from,
               alpha=qgis_alpha_band(info.count, info.alpha_band, reader.internal_mask),
               location=job.final, project=unit.name if unit.part is None else None, colors=colors,
               scale_check=reader.plan.scale)


def warm_writers(cfg: Config) -> None:
    """Once per run, on a tail thread while the first unit is read: load what its writers
    would otherwise load at its end, on its critical path (the CRS library, the GeoPackage
    writer and index helper). Best effort: a failure shows where the writer itself runs."""
    try:
        importlib.import_module("pyproj")
        if cfg.output.gpkg and not cfg.inference.output_workers:  # else helper processes write it
            from ..outputs import gpkg

            gpkg.warm_up()
    except Exception:  # noqa: BLE001 - the writer reports it, with its file
        pass


def _write_quicklook(job: UnitJob, heat_preview: np.ndarray | None, warning: str | None) -> None:
    """The unit's quicklook.png in staging: the scene's preview, its labels and the heat
    (and ``warning`` under its legend)."""
    reader, grid, info = job.reader, job.reader.grid, job.reader.info
    read, pvalid = reader.overview_read(job.cfg.output.quicklook_size)
    stretch = reader.preview_stretch()
    if read.dtype.itemsize > 2:  # a helper draws 8/16-bit reads; a wider one costs more to send than to draw here
        read, stretch = preview_rgb(read, pvalid, *stretch), None
    full_labels = job.labels
    if job.unit.part is not None:  # a row band: show only its part of the grid
        full_labels = np.full((grid.n_rows, grid.n_cols), -1, np.int32)
        full_labels[job.r0:job.r1] = job.labels
    job.in_helper(write_scene_quicklook, job.stage / "quicklook.png", read, pvalid, stretch, full_labels, heat_preview,
                  job.engine.classes, scene_size=(info.width, info.height), tile_px=reader.tile_px, stride=grid.stride,
                  warning=warning, flip=job.turn, cam=job.cfg.cam.method,
                  colors=job.engine.loaded.colors, size=job.cfg.output.quicklook_size)


def _manifest(job: UnitJob, total: float) -> dict:
    """``run.json``: what was done, with what, how long it took, and what to know."""
    unit, engine, reader = job.unit, job.engine, job.reader
    info, labels = reader.info, job.labels
    n_done = len(job.table)
    return {
        "status": "complete",
        "fingerprint": job.fingerprint,
        "results_version": layout.RESULTS_VERSION,
        "scene_version": job.version,
        "scene": sources.recorded_path(unit.scene),
        # where GIS tools read a remote scene (None with credentials in its URL): collect's project
        **({"scene_layer": scene_source(unit.scene)} if getattr(unit.scene, "remote", False) else {}),
        "unit": unit.key,
        "rows": [job.r0, job.r1],
        "scene_info": {
            "width": info.width,
            "height": info.height,
            "count": info.count,
            "dtype": str(info.dtype),
            "crs": crs_text(info.crs),
            "transform": list(info.transform[:6]),
            "nodata": nodata_json(info.nodata),
            "nodata_from": info.nodata_from,
            "alpha_band": reader.info.alpha_band,
            "internal_mask": reader.internal_mask,
            "gsd_m": info.gsd_m,
            "bands_used": list(reader.bands),
            "scale": [list(s) for s in reader.scale],
            "coverage": reader.coverage.to_dict() if reader.coverage is not None else None,
            "acquired": info.acquired,
        },
        "tiling": reader.plan.to_dict(),
        "model": {"id": engine.loaded.model_id, "path": engine.loaded.path, "sha256": engine.loaded.sha256,
                  "classes": engine.classes, "precision": engine.precision},
        "runtime": {**engine.runtime, "reader_threads": engine.readers(job.cfg.inference.reader_threads)
                    if engine.pipeline == "overlap" else None, "reader_processes": reader.process_key is not None,
                    "switch_interval_ms": switch_ms_used(engine.switch_interval(job.cfg.inference.switch_interval_ms)),
                    **(job.run_timings() if job.run_timings else {})},
        "config": job.cfg.to_dict(),
        "versions": package_versions(),
        "counts": {
            "tiles_total": job.n_tiles,
            "tiles_skipped": job.skipped,
            "tiles_empty": job.n_empty,  # of the skipped: in empty blocks, never read
            "tiles_classified": n_done,
            "per_class": {c: int((labels == i).sum()) for i, c in enumerate(engine.classes) if (labels == i).any()},
        },
        # this unit's own seconds; units overlap (one opens while another is classified or
        # written), so they do not add up to the run's wall time (report.json has that)
        "timings_s": {k: round(v, 3) for k, v in {**job.timings, "total": total}.items()},
        "reads": {"windows": reader.windows_read, "pixels": reader.pixels_read},  # decoded from the scene
        "tiles_per_s": round(n_done / total, 2) if total > 0 else None,
        "warnings": job.scene_warnings,
        "warning_details": job.details,
        "outputs": sorted(p.name for p in job.stage.iterdir()),
        "finished_at": time.strftime(layout.TIME_FORMAT, time.gmtime()),
    }


def _unlabelled_data(job: UnitJob) -> dict:
    """A warning for a unit whose tiles below ``--min-valid`` (at the scene's edges, round its
    nodata) hold more than :data:`UNLABELLED_DATA_WARN` of the data it read."""
    share = round(job.data_dropped / job.data_read, 4)  # the message says what run.json records
    return {"code": "unlabelled_data", "share": share,
            "message": f"{job.reader.info.path}: {share:.1%} of the scene's data lies in tiles below min_valid_fraction "
                       f"{job.cfg.tiling.min_valid_fraction:g} (at its edges or round its nodata), left without a label; "
                       "a lower --min-valid (min_valid from Python) labels them, the less surely the less data a tile "
                       "holds (README, \"What the labels mean\")"}


def _why_no_tiles(reader: SceneReader, n_tiles: int, min_valid: float, best: float) -> dict:
    """A warning for a unit that classified no tile, saying why (``best``: the largest valid
    share of a tile read)."""
    info, t = reader.info, reader.tile_px
    if n_tiles == 0:
        why = "its share of the tile grid is empty"
    elif t > info.width or t > info.height:
        best = min(1.0, info.width / t) * min(1.0, info.height / t)
        if reader.plan.scale == "resampled":  # grown to the model's finest scale: smaller ones leave it
            fix = (f"the scene is smaller than one tile at the model's finest scale ({_metres(reader.plan.tile_footprint_m)}): "
                   f"--min-valid {(mv := math.floor(best * 100) / 100):.2f} (min_valid={mv:.2f} from Python) classifies it "
                   "as one padded tile, --units px --tile-size N (units='px', tile_size=N) tiles it outside the model's scale")
        elif reader.plan.coarse_pixels:  # smaller tiles would only enlarge its coarse pixels
            fix = (f"--min-valid {(mv := math.floor(best * 100) / 100):.2f} (min_valid={mv:.2f} from Python) classifies "
                   "it as one padded tile; its pixels are coarser than the model's range, so its labels say little at any tile size")
        else:
            fix = "use a smaller --tile-size or --min-valid (tile_size, min_valid from Python)"
        why = (f"the {t}-px tiles are larger than the scene ({info.width} x {info.height} px): a tile "
               f"holds at most {best:.0%} scene pixels, below min_valid_fraction {min_valid:g}; {fix}")
    elif best == 0:
        why = "no tile holds a valid pixel: nodata, alpha or a mask cover all of it"
        if info.nodata is not None and info.nodata_from == "file":
            why += (f" (if the file's nodata value {info.nodata:g} is data here, --nodata none (nodata='none' from "
                    "Python) reads it as data)")
    else:
        why = (f"no tile has at least {min_valid:.0%} valid pixels (nodata, alpha or a mask cover the rest); "
               f"the fullest has {best:.1%}: --min-valid {(mv := math.floor(best * 1000) / 1000):g} (min_valid={mv:g} "
               "from Python) classifies it")
    return {"code": "no_tiles", "message": f"{info.path}: no tile classified (of {n_tiles}): {why}"}

def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:  # cleanup after a failure must not hide that failure
        pass
