"""Run scenes: read tiles → model + CAM in batches → GeoParquet, COGs, manifest.

One *unit* of work is a scene, or a band of tile rows of a scene when a sharded run splits
a large scene across workers. Each unit is written into a staging folder and renamed into
place only when complete, with ``run.json`` (the manifest) inside; so an output folder
either does not exist or is complete. A rerun skips units whose manifest matches the
current fingerprint (scene, tiling/CAM/output config, model hash) and redoes the rest.
A per-unit lock (``flock``) keeps two processes off the same unit.

The pipeline per unit: reader threads (GDAL releases the GIL) read tiles ahead into a
bounded window, the main thread runs the model + CAM step on full batches back to back,
and a writer thread blends heatmaps and collects table rows, so no stage waits on another
in the steady state, and memory is bounded by the queue sizes, not the scene size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import queue
import shutil
import threading
import time
import traceback
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from affine import Affine
from rasterio.transform import array_bounds

from . import __version__, faults, layout, sources, stop
from .backend import cpu_has_bf16
from .cam import model_on_accelerator
from .cam import resolve_target as _resolve_class
from .config import Config
from .errors import (
    EXIT_ALL_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_PARTIAL,
    ConfigError,
    LockedError,
    ModelError,
    OutputError,
    OutputExistsError,
    TilescanError,
)
from .layout import LOCKS, MANIFEST, STAGING
from .log import emit
from .model import describe_model
from .qgis import write_scene_files
from .tiling import SceneReader, TilingWarning
from .writers import HeatmapWriter, TileTable, write_json, write_labels_cog, write_quicklook

OUTPUT_FILES = ("tiles.parquet", "labels.tif", "heatmap.tif")
#: GDAL block cache of a run, unless GDAL_CACHEMAX is set. Tiles are read in row-major order,
#: so one row of blocks must fit (16 MB for a 10,000 px wide 3-band uint16 scene); GDAL's own
#: default (5% of RAM) fills with blocks never read again and made peak memory grow with the
#: scene size (benchmarks/README.md).
GDAL_CACHE_MB = 256


# ----------------------------------------------------------------------------- units


@dataclass(frozen=True)
class Unit:
    """A scene, or the tile rows [row_start, row_stop) of it."""

    scene: Path
    name: str  # output folder name (layout.scene_folder_names: safe, unique in the invocation)
    row_start: int | None = None
    row_stop: int | None = None

    @property
    def part(self) -> str | None:
        if self.row_start is None:
            return None
        return f"rows-{self.row_start:05d}-{self.row_stop:05d}"

    @property
    def key(self) -> str:
        return self.name if self.part is None else f"{self.name}/{self.part}"

    @property
    def slot(self) -> str:
        """The unit's entry name in OUT/.tilescan-staging and (+ ``.lock``) OUT/.tilescan-locks."""
        return layout.slot(self.name, self.part)

    def out_dir(self, out: Path) -> Path:
        return out / self.name if self.part is None else out / self.name / self.part


unique_names = layout.scene_folder_names


def parse_shard(text: str | None, environ: dict[str, str] | None = None, count: int | None = None) -> tuple[int, int]:
    """``I/N`` (0-based I) from a flag, else from Slurm or Kubernetes variables, else 0/1."""
    env = os.environ if environ is None else environ
    if text:
        try:
            i, n = (int(v) for v in text.split("/"))
        except ValueError:
            raise ConfigError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
        if n < 1 or not 0 <= i < n:
            raise ConfigError(f"--shard I/N needs 0 <= I < N, got {text!r}")
        return i, n

    def num(name: str, default: str | None = None) -> int:
        try:
            return int(env[name] if default is None else env.get(name, default) or default)
        except ValueError:
            raise ConfigError(f"environment variable {name}={env.get(name)!r} is not an integer") from None

    if "SLURM_ARRAY_TASK_ID" in env:
        # --array=A-B[:S] gives ids A, A+S, ..., B: shard i is (id - min) / step.
        tid = num("SLURM_ARRAY_TASK_ID")
        lo = num("SLURM_ARRAY_TASK_MIN", "0")
        step = max(1, num("SLURM_ARRAY_TASK_STEP", "1"))
        if "SLURM_ARRAY_TASK_COUNT" in env:
            n = num("SLURM_ARRAY_TASK_COUNT")
        elif "SLURM_ARRAY_TASK_MAX" in env:
            n = (num("SLURM_ARRAY_TASK_MAX") - lo) // step + 1
        else:
            raise ConfigError("SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor _MAX is")
        i, rem = divmod(tid - lo, step)
        # a list like --array=1,3,5 has COUNT 3 but MIN..MAX spans 5 ids: not numberable
        span = (num("SLURM_ARRAY_TASK_MAX") - lo) // step + 1 if "SLURM_ARRAY_TASK_MAX" in env else n
        if rem or span != n or not 0 <= i < n:
            raise ConfigError(
                f"Slurm array task {tid} (min {lo}, step {step}, count {n}) is not one of 0..{n - 1} after "
                "numbering: submit a contiguous array like --array=0-{N-1}, or pass --shard I/N")
        return i, n
    if "JOB_COMPLETION_INDEX" in env:
        n = count or num("TILESCAN_SHARD_COUNT", "0")
        if n < 1:
            raise ConfigError(
                "JOB_COMPLETION_INDEX is set but the shard count is unknown: pass --shard-count N "
                "or set TILESCAN_SHARD_COUNT (the Job's completions)"
            )
        i = num("JOB_COMPLETION_INDEX")
        if not 0 <= i < n:
            raise ConfigError(f"JOB_COMPLETION_INDEX={i} is outside 0..{n - 1}")
        return i, n
    return 0, 1


def plan_units(scenes: Sequence[Path], cfg: Config, shard: tuple[int, int], rows_of: Callable[[Path], int | None]) -> list[Unit]:
    """All units of the run (every shard computes the same list), then this shard's share.

    With N > 1 shards and fewer scenes than shards, a scene with at least ``2 N`` tile rows
    is split into N bands of tile rows (sizes differing by at most one), so N workers can
    share one huge scene; units are dealt round-robin.
    """
    i, n = shard
    names = unique_names(scenes)
    units: list[Unit] = []
    for scene, name in zip(scenes, names):
        rows = rows_of(scene) if 1 < n and len(scenes) < n else None
        if rows and rows >= 2 * n:
            bounds = [k * rows // n for k in range(n + 1)]
            units.extend(Unit(scene, name, r0, r1) for r0, r1 in zip(bounds, bounds[1:]))
        else:
            units.append(Unit(scene, name))
    return [u for j, u in enumerate(units) if j % n == i]


# ----------------------------------------------------------------------------- results


@dataclass
class UnitResult:
    unit: str
    scene: str
    status: str  # done | skipped (already complete) | failed
    out_dir: str | None = None
    reason: str | None = None
    error_kind: str | None = None
    counts: dict = field(default_factory=dict)
    seconds: float = 0.0
    warnings: list = field(default_factory=list)  # structured: {"code", "message", ...}

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, {}, "", [])}


@dataclass
class RunReport:
    results: list[UnitResult] = field(default_factory=list)
    interrupted: dict | None = None  # set when a signal stopped the run (tilescan.stop)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        failed = [r for r in self.results if r.status == "failed"]
        if not failed:
            return EXIT_OK
        if len(failed) == len(self.results):
            # nothing written because of the output side only (exists, locked, disk full)
            output_kinds = {OutputError.kind, OutputExistsError.kind, LockedError.kind}
            if all(r.error_kind in output_kinds for r in failed):
                return EXIT_OUTPUT
            return EXIT_ALL_FAILED
        return EXIT_PARTIAL

    def to_dict(self) -> dict:
        by = lambda s: [r.to_dict() for r in self.results if r.status == s]  # noqa: E731
        return {
            "tilescan": __version__,
            "done": by("done"),
            "skipped": by("skipped"),
            "failed": by("failed"),
            "counts": {s: sum(r.status == s for r in self.results) for s in ("done", "skipped", "failed")},
            "exit_code": self.exit_code,
            **({"interrupted": self.interrupted} if self.interrupted else {}),
        }


# ----------------------------------------------------------------------------- helpers


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"tilescan": __version__}
    for name in ("keras", "tensorflow-cpu", "tensorflow", "jax", "torch", "numpy", "rasterio", "pyarrow", "rio-cogeo", "opencv-python-headless"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    try:
        import rasterio

        out["gdal"] = rasterio.__gdal_version__
    except Exception:  # pragma: no cover
        pass
    try:
        import keras

        out["keras_backend"] = keras.backend.backend()
    except Exception:  # pragma: no cover
        pass
    return out


def fingerprint(unit: Unit, cfg: Config, model_sha: str) -> str:
    """What the outputs depend on: the scene file, the unit's rows, the result-shaping
    config (not batch size or threads), the model file."""
    scene = sources.scene_identity(unit.scene)  # path, size, mtime; or URL and validators
    d = cfg.to_dict()
    shaping = {"tiling": d["tiling"], "cam": d["cam"], "output": {k: v for k, v in d["output"].items() if k != "overwrite"}}
    if d["inference"].get("precision", "float32") != "float32":  # bf16 changes the numbers slightly
        shaping["precision"] = d["inference"]["precision"]
    blob = json.dumps(
        {
            **scene,
            "rows": [unit.row_start, unit.row_stop],
            "config": shaping,
            "model": model_sha,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


class UnitLock:
    """An exclusive, non-blocking ``flock`` on ``OUT/.tilescan-locks/<unit slot>.lock``,
    removed again when released (layout.FileLock)."""

    def __init__(self, out: Path, unit: Unit):
        self.path = out / LOCKS / (unit.slot + ".lock")
        self.target = unit.out_dir(out)
        self.lock = layout.FileLock(self.path)

    def __enter__(self):
        try:
            self.lock.acquire()
        except layout.Busy as busy:
            raise LockedError(
                f"another tilescan process ({busy.holder or 'unknown pid'}) is writing this output; "
                f"it was left alone (lock {self.path})", path=str(self.target)
            ) from None
        return self

    def __exit__(self, *exc):
        self.lock.release()


def resolve_target(target: str, classes: Sequence[str], origin: str = "[cam] target_class") -> int | None:
    """``[cam] target_class`` -> class index (None = each tile's prediction), through the
    resolver ``tilescan explain`` uses; errors name where the value came from (``origin``)."""
    try:
        return _resolve_class(target, classes)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc.message}") from None


# ----------------------------------------------------------------------------- engine


def resolve_pipeline(pipeline: str, backend: str) -> str:
    """``[inference] pipeline`` -> "lockstep" or "overlap" (``auto``: lockstep on the CPU)."""
    if pipeline != "auto":
        return pipeline
    return "overlap" if model_on_accelerator(backend) else "lockstep"


def resolve_precision(precision: str, backend: str) -> str:
    """``[inference] precision`` -> "float32" or "bf16". ``auto`` picks bf16 only where it
    was measured faster within tolerance (benchmarks/README.md): TensorFlow on a CPU with
    AVX512_BF16/AMX and no GPU. JAX/torch and GPUs were not measured, so they stay float32."""
    if precision != "auto":
        return precision
    if backend != "tensorflow" or not cpu_has_bf16():
        return "float32"
    return "float32" if model_on_accelerator(backend) else "bf16"


def with_precision(model, precision: str):
    """``model`` itself for float32; for bf16 a clone whose layers compute in bfloat16
    (``mixed_bfloat16``: float32 weights, bf16 activations) except the input normalisation
    and the ``logits``/``predictions`` head, which stay float32, with the same weights."""
    if precision == "float32":
        return model
    import keras

    keep = {"normalize", "logits", "predictions"}

    def clone(layer):
        config = layer.get_config()
        if layer.name not in keep and "dtype" in config and type(layer).__name__ != "InputLayer":
            config["dtype"] = "mixed_bfloat16"
        return type(layer).from_config(config)

    out = keras.models.clone_model(model, clone_function=clone)
    out.set_weights(model.get_weights())
    return out


class Engine:
    """The model + CAM step, loaded once per invocation."""

    def __init__(self, cfg: Config, model_path: str | None = None):
        from .backend import import_keras

        keras = import_keras()
        from .cam import get_cam
        from .model import load_model

        self.loaded = load_model(model_path)
        lm = self.loaded
        self.classes = lm.classes
        self.input_size = lm.input_size
        self.bands = lm.num_bands
        self.target = resolve_target(cfg.cam.target_class, self.classes)

        self.precision = resolve_precision(cfg.inference.precision, keras.backend.backend())
        self.pipeline = resolve_pipeline(cfg.inference.pipeline, keras.backend.backend())
        self.model = with_precision(lm.model, self.precision)
        self.cam = get_cam(cfg.cam.method, self.model, layer=cfg.cam.layer or lm.cam_layer, jit_compile=cfg.inference.jit_compile)
        self.batch_size = cfg.inference.batch_size
        # Trace/compile the step for the run's one batch shape on a side thread while the
        # caller goes on (run() plans its units meanwhile); joined by ready() or first use.
        self._warm: threading.Thread | None = threading.Thread(target=self._warmup, name="tilescan-warmup", daemon=True)
        self._warm.start()

    def ready(self) -> None:
        """Wait until the step is traced/compiled (a one-time start-up cost, not a scene's)."""
        warm, self._warm = self._warm, None
        if warm is not None:
            warm.join()

    def _warmup(self) -> None:
        try:
            self._step(np.zeros((self.batch_size, self.input_size, self.input_size, self.bands), np.float32))
        except Exception:  # the first real batch raises it again, where it is handled
            pass

    def __call__(self, x: np.ndarray):
        self.ready()
        return self._step(x)

    def _step(self, x: np.ndarray):
        n = len(x)
        if 0 < n < self.batch_size:  # a short last batch: padded, so the step keeps one shape (no retrace)
            x = np.concatenate([x, np.zeros((self.batch_size - n, *x.shape[1:]), x.dtype)])
        target = None if self.target is None else np.full(len(x), self.target, dtype=np.int32)
        res = self.cam(x, target=target)
        if len(x) != n:
            res = dataclasses.replace(res, probs=res.probs[:n], target=res.target[:n], raw=res.raw[:n], cam=res.cam[:n],
                                      logits=None if res.logits is None else res.logits[:n])
        return res


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


def _move_into_place(stage: Path, final: Path, out: Path) -> None:
    """Rename the finished staging folder to ``final``: a scene folder ``OUT/<name>`` or a row
    band ``OUT/<name>/rows-…``. What was there is parked in the staging area, then removed
    (row-band parts inside an old scene folder are kept). Any other target is refused, so
    nothing outside the unit's own folder and tilescan's staging area is renamed or removed."""
    scene_dir = final if final.parent == out else final.parent
    if not (scene_dir.parent == out and layout.is_safe_name(scene_dir.name)
            and (final == scene_dir or layout.PART_RE.fullmatch(final.name))):
        raise OutputError(f"refusing to move {stage} there: not a scene folder directly inside {out}", path=str(final))
    if final != scene_dir:
        try:
            scene_dir.mkdir()
        except FileExistsError:
            pass
        if _link_or_file(scene_dir):  # a row band must stay inside OUT
            raise OutputExistsError("is a link or a file, not a scene folder tilescan made; it was left alone",
                                    path=str(scene_dir))
    if os.path.lexists(final):
        aside = stage.parent / layout.aside_name(stage.name)
        layout.discard(aside)  # left by a killed process that had this pid
        os.replace(final, aside)
        if final == scene_dir and aside.is_dir() and not aside.is_symlink():
            for part in aside.iterdir():  # row-band parts of a sharded run stay with the scene
                if layout.PART_RE.fullmatch(part.name) and part.is_dir() and not part.is_symlink():
                    os.replace(part, stage / part.name)
        os.replace(stage, final)
        layout.discard(aside)
    else:
        os.replace(stage, final)
    try:
        fd = os.open(final.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def _link_or_file(path: Path) -> bool:
    return os.path.lexists(path) and (path.is_symlink() or not path.is_dir())


def _occupied(final: Path) -> bool:
    """True when something not made by tilescan sits where a unit's outputs go: a file, a
    link, or a folder with entries other than hidden files and row-band parts of a sharded run."""
    if not os.path.lexists(final):
        return False
    if final.is_symlink() or not final.is_dir():
        return True
    return any(not (p.name.startswith(".") or (layout.PART_RE.fullmatch(p.name) and p.is_dir())) for p in final.iterdir())


def _legacy_outputs(out: Path, unit: Unit, legacy: str) -> Path | None:
    """The unit's finished outputs under the folder name an older tilescan gave it, when
    that differs from today's name (an unusual or case-colliding stem): they are not resumed
    silently in the new place, and not left behind unnoticed either."""
    if legacy in (unit.name, "", "..") or "/" in legacy:
        return None
    old = out / legacy if unit.part is None else out / legacy / unit.part
    m = read_manifest(old)
    if isinstance(m, dict) and m.get("status") == "complete" and m.get("scene") == str(unit.scene.resolve()):
        return old
    return None


def _bound_gdal_cache() -> None:
    if "GDAL_CACHEMAX" not in os.environ:
        from rasterio.env import set_gdal_config

        set_gdal_config("GDAL_CACHEMAX", GDAL_CACHE_MB * 2**20)


def _check_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError("output path exists and is not a folder", path=str(out)) from None
    except OSError as exc:
        raise OutputError(f"cannot create the output folder: {exc.strerror}", path=str(out)) from None
    if not out.is_dir():
        raise OutputError("output path is not a folder", path=str(out))
    probe = out / f".tilescan-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"output folder is not writable: {exc.strerror}", path=str(out)) from None


def run(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    cfg: Config,
    model_path: str | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = False,
    log: Callable[[str], None] = emit,
    stac: Sequence[str] = (),
    assets: Sequence[str] | None = None,
    stac_items: bool = False,
) -> RunReport:
    """Process every scene of ``inputs`` (files, folders, URLs, STAC documents) and ``stac``
    (STAC documents) into ``out``; see the module doc. ``assets``: the STAC asset(s) to read;
    ``stac_items``: also write a STAC Item describing each finished scene's outputs."""
    with stop.handling():  # SIGTERM/SIGINT: stop between batches, report, exit 75
        return _run(inputs, out, cfg, model_path, shard, progress, log, stac, assets, stac_items)


def _run(inputs, out, cfg, model_path, shard, progress, log, stac, assets, stac_items) -> RunReport:
    out = Path(out)
    # A named input that does not exist (or a folder URL that cannot be listed) fails alone
    # (listed in report.json) unless no input gives a scene; then this raises before
    # anything is created.
    scenes, missing = sources.find_inputs(inputs, stac, assets)
    _check_output_dir(out)
    _bound_gdal_cache()
    sources.configure_gdal()
    # the metadata and hash decide what is already done; Keras and the model load only
    # when a unit needs them (a rerun with nothing to do never imports TensorFlow)
    card = describe_model(model_path)
    resolve_target(cfg.cam.target_class, card.classes, cfg.cam.origin("target_class"))  # fails before any scene
    engine: Engine | None = None

    def rows_of(scene: Path) -> int | None:
        try:
            with card.open_scene(scene, cfg.tiling) as r:
                return r.grid.n_rows
        except TilescanError:
            return None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TilingWarning)
        units = plan_units(scenes, cfg, shard, rows_of)
    legacy_names = dict(zip(scenes, layout.legacy_folder_names(scenes)))
    report = RunReport()
    for err in missing if shard[0] == 0 else []:
        report.results.append(UnitResult(err.path, err.path, "failed", reason=str(err), error_kind=err.kind))
        log(f"error: {err}")
    for k, unit in enumerate(units):
        if stop.requested():
            report.interrupted = {"signal": stop.requested(), "unit": None, "not_started": [u.key for u in units[k:]]}
            break
        t0 = time.monotonic()
        final = unit.out_dir(out)
        try:
            with sources.remote_errors(unit.scene):  # a URL's network failures: named, with the cause
                fp = fingerprint(unit, cfg, card.sha256)
            with UnitLock(out, unit):
                if unit.part is not None and _link_or_file(final.parent):  # its row band would land outside OUT
                    raise OutputExistsError("is a link or a file, not a scene folder tilescan made; it was left alone",
                                            path=str(final.parent))
                if not os.path.lexists(final) and (old_place := _legacy_outputs(out, unit, legacy_names[unit.scene])):
                    raise OutputExistsError(
                        f"finished outputs of this scene from an earlier tilescan version are in {old_place}; this "
                        f"version writes them to {final} (a name safe on every filesystem): move or remove them, then rerun",
                        path=str(final))
                old = read_manifest(final)
                if old is not None and old.get("status") == "complete":
                    if old.get("fingerprint") == fp and not cfg.output.overwrite:
                        report.results.append(UnitResult(unit.key, str(unit.scene), "skipped", str(final), reason="already complete with the same config and model", counts=old.get("counts", {})))
                        log(f"{unit.key}: already complete, skipped")
                        continue
                    if not cfg.output.overwrite:
                        raise OutputExistsError(
                            "finished outputs from a different config, model or scene version exist; "
                            "pass --overwrite to replace them", path=str(final))
                elif not cfg.output.overwrite and _occupied(final):
                    raise OutputExistsError(
                        "exists but is not a finished tilescan output (no complete run.json); it was "
                        "left alone: move it away, or pass --overwrite to replace it", path=str(final))
                if engine is None:
                    engine = Engine(cfg, card.path)
                    engine.ready()  # start-up done: a scene's time (run.json) is the scene's own work
                res = sources.with_retries(unit.scene, lambda: process_unit(unit, out, cfg, engine, fp, progress, log), log)
                report.results.append(res)
                c = res.counts
                log(f"{unit.key}: {c['tiles_classified']} tiles classified, {c['tiles_skipped']} skipped, "
                    f"{res.seconds:.1f} s -> {final}")
        except stop.Interrupted as intr:  # the unit was dropped: nothing of it is in place
            report.interrupted = {"signal": intr.signame, "unit": unit.key, "scene": str(unit.scene),
                                  "not_started": [u.key for u in units[k + 1:]]}
            log(f"{unit.key}: stopped by {intr.signame}; its partial outputs were removed")
            break
        except (TilescanError, OSError) as exc:
            if isinstance(exc, ModelError):  # the model, not the scene: no later unit can do better
                raise
            if isinstance(exc, OSError):
                exc = OutputError(f"{exc.strerror or exc}", path=str(getattr(exc, 'filename', None) or final))
            if not exc.path:
                exc.path = str(unit.scene)
            report.results.append(UnitResult(unit.key, str(unit.scene), "failed", reason=str(exc), error_kind=exc.kind, seconds=round(time.monotonic() - t0, 2)))
            log(f"error: {exc}")
        except Exception as exc:  # a bug or an unexpected library error: one scene never kills the batch
            msg = f"{unit.scene}: unexpected error {type(exc).__name__}: {exc}"
            report.results.append(UnitResult(unit.key, str(unit.scene), "failed", reason=msg, error_kind="internal", seconds=round(time.monotonic() - t0, 2)))
            log("error: " + msg)
            log(traceback.format_exc(limit=5))
    if stac_items:  # OUT/<scene>/item.json: the outputs as a STAC Item (tilescan.stac_out)
        from .stac_out import write_items

        write_items(out, [Path(r.out_dir) for r in report.results if r.status in ("done", "skipped") and r.out_dir], log)
    layout.tidy(out)
    data = report.to_dict()
    data["shard"] = list(shard)
    data["model"] = {"id": card.model_id, "sha256": card.sha256}
    write_json(out / layout.report_name(shard), data)
    return report
