"""One unit from scene to outputs: open, read batches ahead, classify, write rows and heat, write outputs, manifest.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
import numpy as np
from affine import Affine
from rasterio.transform import array_bounds
from .. import faults, stop
from ..scene import sources
from ..config import Config
from ..layout import MANIFEST, STAGING
from ..outputs.qgis import write_scene_files
from ..scene.reader import SceneReader
from ..scene.info import TilingWarning
from ..outputs.heatmap import HeatmapWriter
from ..outputs.table import TileTable
from ..outputs.files import write_json
from ..outputs.cog import write_labels_cog
from ..outputs.quicklook import write_quicklook
from .engine import Engine
from .report import UnitResult
from .units import Unit, _move_into_place, package_versions


def _read_chunk(reader: SceneReader, chunk: Sequence, min_valid: float) -> tuple[list, np.ndarray, list, np.ndarray, int]:
    """Read ``chunk`` tiles into one array; drop tiles with too little valid area (or none).
    Returns (kept tiles, their inputs (n, S, S, C), their valid masks, their valid
    fractions, tiles read)."""
    x, v = reader.read_batch(chunk)
    frac = np.count_nonzero(v.reshape(len(v), -1), axis=1) / float(reader.tile_px ** 2)
    keep = np.flatnonzero((frac >= min_valid) & (frac > 0))
    if len(keep) < len(chunk):
        x = x[keep]
    return [chunk[i] for i in keep], x, [v[i] for i in keep], frac[keep], len(chunk)


def _prefetch(reader: SceneReader, tiles: Sequence, threads: int, ahead: int, chunk: int = 1,
              min_valid: float = 0.0) -> Iterator[tuple[list, np.ndarray, list, np.ndarray, int]]:
    """Read ``tiles`` in order, ``chunk`` at a time (a model batch), on ``threads`` reader
    threads with at most ``ahead`` chunks in flight; yields what :func:`_read_chunk` returns.
    Whole chunks keep the main thread's per-tile work to nothing: a full chunk is a batch."""
    chunks = (tiles[i:i + chunk] for i in range(0, len(tiles), chunk))
    if threads == 0:  # on the caller's thread, each chunk when it is asked for
        for c in chunks:
            yield _read_chunk(reader, c, min_valid)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tilescan-read") as pool:
        pending: deque = deque()
        for c in chunks:
            pending.append(pool.submit(_read_chunk, reader, c, min_valid))
            if len(pending) >= ahead:
                break
        while pending:
            fut = pending.popleft()
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append(pool.submit(_read_chunk, reader, nxt, min_valid))
            yield fut.result()


class _Writer(threading.Thread):
    """Drains computed batches off the model's thread: ``handle(item)`` turns one batch's
    model output into table rows, label cells and blended heat, so the main thread goes
    straight back to the model."""

    def __init__(self, handle: Callable[[Any], None], maxsize: int):
        super().__init__(name="tilescan-write", daemon=True)
        self.q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.handle = handle
        self.error: BaseException | None = None

    def run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue
            try:
                self.handle(item)
            except BaseException as exc:  # surfaced by the main thread
                self.error = exc
            finally:
                self.q.task_done()

    def put(self, item):
        if self.error is not None:
            raise self.error
        self.q.put(item)

    def wait_idle(self):
        """Return when every batch put so far has been handled."""
        self.q.join()
        if self.error is not None:
            raise self.error

    def finish(self):
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def _corners(transform: Affine, col_off: np.ndarray, row_off: np.ndarray, w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """(B, 4, 2) map coordinates of UL, UR, LR, LL of pixel windows."""
    cols = np.stack([col_off, col_off + w, col_off + w, col_off], axis=1).astype(np.float64)
    rows = np.stack([row_off, row_off, row_off + h, row_off + h], axis=1).astype(np.float64)
    a, b, c, d, e, f = transform[:6]
    return np.stack([a * cols + b * rows + c, d * cols + e * rows + f], axis=-1)


@dataclass
class _Classified:
    """What the batch loop of one unit leaves for its outputs."""

    r0: int
    r1: int
    labels: np.ndarray  # (rows, cols) class index per tile of the unit's rows, -1 = not classified
    table: TileTable
    heat: HeatmapWriter
    n_tiles: int
    skipped: int
    n_empty: int  # of the skipped: in blocks known to be empty, never read


def process_unit(unit: Unit, out: Path, cfg: Config, engine: Engine, model_fp: str, progress: bool, log: Callable[[str], None]) -> UnitResult:
    """Run one unit into a staging folder, then move it into place (atomic per unit):
    open the scene, classify its tiles batch by batch, write the outputs, then the manifest."""
    t0 = time.monotonic()
    final = unit.out_dir(out)
    stage = out / STAGING / unit.slot
    timings = {"read": 0.0, "compute": 0.0, "write": 0.0}
    with contextlib.ExitStack() as stack:
        reader, scene_warnings, details = _open_unit(unit, cfg, engine, log)
        stack.callback(reader.close)
        timings = {**reader.timings, **timings}  # scan (finding the data) and stats, from the open
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        stack.push(lambda *exc: exc[0] is not None and shutil.rmtree(stage, ignore_errors=True))  # failed: nothing staged
        done = _classify(unit, reader, cfg, engine, stage, stack, progress, timings)
        if len(done.table) == 0:
            empty = _why_no_tiles(reader, done.n_tiles, cfg.tiling.min_valid_fraction)
            scene_warnings.append(empty["message"])
            details.append(empty)
            log(f"warning: {empty['message']}")
        tw = time.monotonic()
        _write_outputs(unit, stage, final, cfg, engine, reader, done)
        timings["write"] = time.monotonic() - tw
        total = time.monotonic() - t0
        manifest = _manifest(unit, model_fp, cfg, engine, reader, done, stage, timings, total, scene_warnings, details)
        manifest.update(sources.manifest_fields(unit.scene))  # a URL's or STAC item's source
        write_json(stage / MANIFEST, manifest)
    faults.point("before-rename")
    _move_into_place(stage, final, out)
    return UnitResult(unit.key, str(unit.scene), "done", str(final), counts=manifest["counts"], seconds=round(total, 2),
                      warnings=[d for d in details if d["code"] != "tiling"])


def _open_unit(unit: Unit, cfg: Config, engine: Engine, log: Callable[[str], None]) -> tuple[SceneReader, list[str], list[dict]]:
    """The scene's reader, and what the user should know about it (logged once here):
    the messages, and the same as structured warnings (``code``, ``message``, ...)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TilingWarning)
        reader = engine.loaded.open_scene(unit.scene, cfg.tiling)
    # what the user should know about the scene, not library deprecation notices
    scene_warnings = [str(w.message) for w in caught
                      if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))]
    details = [{"code": "tiling", "message": w} for w in scene_warnings]
    scale_warning = reader.plan.warning(str(unit.scene))
    if scale_warning:
        scene_warnings.append(scale_warning["message"])
        details.append(scale_warning)
    for w in scene_warnings:
        log(f"warning: {w}" if w.startswith(str(unit.scene)) else f"warning: {unit.scene}: {w}")
    return reader, scene_warnings, details


def _batch_rows(tiles: Sequence, fractions: Sequence[float], res, transform: Affine) -> tuple[dict, np.ndarray, np.ndarray]:
    """One batch's table columns, and its class indexes and CAMs, from the model step's result."""
    probs = np.asarray(res.probs, dtype=np.float32)
    cls = probs.argmax(axis=1)
    conf = probs[np.arange(len(cls)), cls]
    cam = np.asarray(res.cam, dtype=np.float32)
    raw = np.asarray(res.raw, dtype=np.float32)
    n, h, w = cam.shape
    col_off = np.array([t.window.col_off for t in tiles], dtype=np.int64)
    row_off = np.array([t.window.row_off for t in tiles], dtype=np.int64)
    size = np.array([t.window.width for t in tiles], dtype=np.int64)
    peak = cam.reshape(n, -1).argmax(axis=1)
    py, px = np.divmod(peak, w)
    pcol = col_off + (px + 0.5) * size / w
    prow = row_off + (py + 0.5) * size / h
    a, b, c, d, e, f = transform[:6]
    rows = {
        "tile_index": np.array([t.index for t in tiles], dtype=np.int64),
        "row": np.array([t.row for t in tiles], dtype=np.int32),
        "col": np.array([t.col for t in tiles], dtype=np.int32),
        "col_off": col_off.astype(np.int32),
        "row_off": row_off.astype(np.int32),
        "width": size.astype(np.int32),
        "height": size.astype(np.int32),
        "corners": _corners(transform, col_off, row_off, size, size),
        "valid_fraction": np.asarray(fractions, dtype=np.float32),
        "class_index": cls.astype(np.int16),
        "confidence": conf.astype(np.float32),
        "probabilities": probs,
        "cam_mean": cam.mean(axis=(1, 2)),
        "cam_max": cam.max(axis=(1, 2)),
        "cam_raw_max": raw.max(axis=(1, 2)),
        "cam_peak_x": a * pcol + b * prow + c,
        "cam_peak_y": d * pcol + e * prow + f,
    }
    return rows, cls, cam


def _classify(unit: Unit, reader: SceneReader, cfg: Config, engine: Engine, stage: Path,
              stack: contextlib.ExitStack, progress: bool, timings: dict) -> _Classified:
    """The batch loop: tiles with data are read into full batches, the model + CAM step runs
    on each, and a writer thread turns results into table rows, labels and blended heat."""
    info, grid = reader.info, reader.grid
    r0 = unit.row_start or 0
    r1 = grid.n_rows if unit.row_stop is None else min(unit.row_stop, grid.n_rows)
    # tiles inside blocks known to be empty are skipped unread (valid fraction 0)
    tiles, n_empty = reader.tiles_with_data(r0, r1)
    done = _Classified(r0, r1, np.full((r1 - r0, grid.n_cols), -1, dtype=np.int32), TileTable(engine.classes),
                       HeatmapWriter(stage / "heatmap.tif", info.width, info.height, info.transform, info.crs,
                                     cfg.output.heatmap_scale, reader.tile_px, grid.stride, compress=cfg.output.compress),
                       (r1 - r0) * grid.n_cols, n_empty, n_empty)
    stack.push(lambda *exc: exc[0] is not None and _quietly(done.heat.abort))
    if cfg.output.quicklook and unit.part is None:
        reader.gather_preview(cfg.output.quicklook_size)  # from the tiles: no second decode
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=done.n_tiles, initial=n_empty, desc=unit.key, unit="tile", leave=False, dynamic_ncols=True)
        stack.callback(bar.close)

    def consume(item):  # on the writer thread
        batch, valid, fractions, res = item
        rows, cls, cam = _batch_rows(batch, fractions, res, info.transform)
        for t, k in zip(batch, cls):
            done.labels[t.row - r0, t.col] = int(k)
        for j, t in enumerate(batch):
            done.heat.add((t.window.col_off, t.window.row_off, t.window.width, t.window.height), cam[j], valid[j])
        done.table.add(rows)

    writer = _Writer(consume, maxsize=max(2, cfg.inference.queue_size))
    # lockstep: a batch is read (GDAL decoding on every core) while the writer drains the
    # last one, then the model runs alone; overlap: reader threads run beside the model
    lockstep = engine.pipeline == "lockstep"
    if lockstep:
        reader.decode_threads = os.cpu_count() or 1
    writer.start()

    def step(batch: list, x: np.ndarray, valid: list, fractions: list) -> None:  # one full batch
        if lockstep:
            writer.wait_idle()
        tc = time.monotonic()
        res = engine(x)
        timings["compute"] += time.monotonic() - tc
        faults.point("inference")
        writer.put((batch, valid, fractions, res))
        if bar is not None:
            bar.update(len(batch))

    batches = _Batches(cfg.inference.batch_size, step)
    tr = time.monotonic()
    for kept, xs, vs, fs, n_read in _prefetch(reader, tiles, 0 if lockstep else cfg.inference.reader_threads,
                                          ahead=cfg.inference.queue_size, chunk=batches.size,
                                          min_valid=cfg.tiling.min_valid_fraction):
        stop.check()  # SIGTERM/SIGINT: drop this unit between batches
        for _ in range(n_read):
            faults.point("reading")
        done.skipped += n_read - len(kept)
        if bar is not None and n_read > len(kept):
            bar.update(n_read - len(kept))
        batches.add(kept, xs, vs, fs)
    batches.flush()
    tw = time.monotonic()
    writer.finish()
    timings["read"] = max(0.0, tw - tr - timings["compute"])
    return done


class _Batches:
    """Tiles gathered into batches of exactly ``size`` (the reader's chunks lose the tiles
    they skip); ``step(tiles, x, valid_masks, valid_fractions)`` gets each full batch."""

    def __init__(self, size: int, step: Callable[[list, np.ndarray, list, list], None]):
        self.size, self.step = size, step
        self._t: list = []
        self._x: list = []
        self._v: list = []
        self._f: list = []

    def add(self, tiles: Sequence, x: np.ndarray, valid: Sequence, fractions: Sequence) -> None:
        i = 0
        while i < len(tiles):
            take = min(self.size - len(self._t), len(tiles) - i)
            self._t.extend(tiles[i:i + take])
            self._x.append(x[i:i + take])
            self._v.extend(valid[i:i + take])
            self._f.extend(fractions[i:i + take])
            i += take
            if len(self._t) == self.size:
                self.flush()

    def flush(self) -> None:
        """Hand over what is gathered (a short last batch too)."""
        if not self._t:
            return
        x = self._x[0] if len(self._x) == 1 else np.concatenate(self._x)  # one full chunk: no copy
        batch, valid, fractions = self._t, self._v, self._f
        self._t, self._x, self._v, self._f = [], [], [], []
        self.step(batch, x, valid, fractions)


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:  # cleanup after a failure must not hide that failure
        pass


def _write_outputs(unit: Unit, stage: Path, final: Path, cfg: Config, engine: Engine, reader: SceneReader,
                   done: _Classified) -> None:
    """Tables, label and heatmap COGs, quicklook and QGIS files into the staging folder."""
    info, grid = reader.info, reader.grid
    transform, crs, stride, r0 = info.transform, info.crs, grid.stride, done.r0
    model_id = engine.loaded.model_id
    extra = {
        "tile_px": reader.tile_px,
        "stride_px": stride,
        "rows": [done.r0, done.r1],
        "bands": list(reader.bands),
        "cam_method": cfg.cam.method,
        "cam_layer": engine.cam.layer,
    }

    def write_tables():
        done.table.write_geoparquet(stage / "tiles.parquet", crs, engine.classes, unit.scene.name, model_id, extra)
        faults.point("writing")
        if cfg.output.gpkg:
            done.table.write_gpkg(stage / "tiles.gpkg", crs, engine.classes, unit.scene.name, model_id, extra)
        grid_tf = transform @ Affine.translation(0, r0 * stride) @ Affine.scale(stride)
        write_labels_cog(stage / "labels.tif", done.labels, grid_tf, crs, engine.classes, compress=cfg.output.compress,
                         tags={"MODEL_ID": model_id, "TILE_PX": reader.tile_px, "STRIDE_PX": stride})

    # The scene's serial tail (the model has nothing left to do): the tables, the
    # heatmap COG and the quicklook at once, on both cores (GDAL, zlib and the Parquet
    # writer release the GIL). The quicklook's heat comes from the heatmap's scratch file.
    heat = done.heat
    heat.finish(tags={"MODEL_ID": model_id, "CAM_METHOD": cfg.cam.method, "CAM_LAYER": engine.cam.layer})
    hp = heat.preview(cfg.output.quicklook_size) if cfg.output.quicklook else None
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="tilescan-tail") as side:
        tables = side.submit(write_tables)
        cog = side.submit(heat.close)
        if cfg.output.quicklook:
            rgb, pvalid = reader.read_overview(cfg.output.quicklook_size)
            full_labels = done.labels
            if unit.part is not None:  # a row band: show only its part of the grid
                full_labels = np.full((grid.n_rows, grid.n_cols), -1, np.int32)
                full_labels[r0:done.r1] = done.labels
            write_quicklook(stage / "quicklook.png", rgb, pvalid, full_labels, hp, engine.classes,
                            scene_size=(info.width, info.height), tile_px=reader.tile_px, stride=stride)
        cog.result()
        tables.result()
    if cfg.output.styles:  # .qml styles beside the outputs and, per whole scene, a QGIS project
        labels = done.labels
        write_scene_files(stage, classes=engine.classes, present=np.unique(labels[labels >= 0]), crs=crs,
                          bounds=array_bounds(info.height, info.width, transform), scene=unit.scene,
                          bands=reader.bands, scale=reader.scale, location=final,
                          project=unit.name if unit.part is None else None)


def _manifest(unit: Unit, model_fp: str, cfg: Config, engine: Engine, reader: SceneReader, done: _Classified,
              stage: Path, timings: dict, total: float, scene_warnings: list[str], details: list[dict]) -> dict:
    """``run.json``: what was done, with what, how long it took, and what to know."""
    info, labels = reader.info, done.labels
    n_done = len(done.table)
    return {
        "status": "complete",
        "fingerprint": model_fp,
        "scene": str(unit.scene.resolve()),
        "unit": unit.key,
        "rows": [done.r0, done.r1],
        "scene_info": {
            "width": info.width,
            "height": info.height,
            "count": info.count,
            "dtype": str(info.dtype),
            "crs": info.crs.to_string() if info.crs else None,
            "transform": list(info.transform[:6]),
            "nodata": info.nodata,
            "gsd_m": info.gsd_m,
            "bands_used": list(reader.bands),
            "scale": [list(s) for s in reader.scale],
            "coverage": reader.coverage.to_dict() if reader.coverage is not None else None,
        },
        "tiling": reader.plan.to_dict(),
        "model": {"id": engine.loaded.model_id, "path": engine.loaded.path, "sha256": engine.loaded.sha256,
                  "classes": engine.classes, "precision": engine.precision},
        "config": cfg.to_dict(),
        "versions": package_versions(),
        "counts": {
            "tiles_total": done.n_tiles,
            "tiles_skipped": done.skipped,
            "tiles_empty": done.n_empty,  # of the skipped: in empty blocks, never read
            "tiles_classified": n_done,
            "per_class": {c: int((labels == i).sum()) for i, c in enumerate(engine.classes) if (labels == i).any()},
        },
        "timings_s": {k: round(v, 3) for k, v in {**timings, "total": total}.items()},
        "reads": {"windows": reader.windows_read, "pixels": reader.pixels_read},  # decoded from the scene
        "tiles_per_s": round(n_done / total, 2) if total > 0 else None,
        "warnings": scene_warnings,
        "warning_details": details,
        "outputs": sorted(p.name for p in stage.iterdir()),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _why_no_tiles(reader: SceneReader, n_tiles: int, min_valid: float) -> dict:
    """A warning for a unit that classified no tile, saying why."""
    info, t = reader.info, reader.tile_px
    if n_tiles == 0:
        why = "its share of the tile grid is empty"
    elif t > info.width or t > info.height:
        best = min(1.0, info.width / t) * min(1.0, info.height / t)
        why = (f"the {t}-px tiles are larger than the scene ({info.width} x {info.height} px): a tile "
               f"holds at most {best:.0%} scene pixels, below min_valid_fraction {min_valid:g}; use a "
               "smaller --tile-size or --min-valid")
    else:
        why = (f"no tile has at least {min_valid:.0%} valid pixels (nodata, alpha or a mask cover the "
               "rest; --min-valid lowers the bar)")
    return {"code": "no_tiles", "message": f"{info.path}: no tile classified (of {n_tiles}): {why}"}
