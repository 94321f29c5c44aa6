"""Units of work: one per scene (or per row band under shards), their fingerprints, manifests and locks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .. import __version__, layout, stop
from ..config import Config, output_shaping
from ..errors import ConfigError, LockedError, OutputError, OutputExistsError
from ..layout import LOCKS, STAGING
from ..scene import sources

OUTPUT_FILES = ("tiles.parquet", "labels.tif", "heatmap.tif")


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
                "numbering: submit a contiguous array like --array=0-<N-1>, or one task as a job of its own with --shard I/N")
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
    if count is not None:  # a shard count with no index to go with it would run every unit, N times over
        raise ConfigError(f"--shard-count {count} needs JOB_COMPLETION_INDEX (a Kubernetes Indexed Job sets it); "
                          "elsewhere pass --shard I/N")
    return 0, 1


def plan_units(scenes: Sequence[Path], cfg: Config, shard: tuple[int, int], rows_of: Callable[[Path], int | None],
               holds: Callable[[str, Path], bool] | None = None) -> list[Unit]:
    """All units of the run (every shard computes the same list), then this shard's share.
    ``holds``: as in :func:`tilescan.layout.scene_folder_names`.

    With N > 1 shards and fewer scenes than shards, a scene with at least ``2 N`` tile rows
    is split into N bands of tile rows (sizes differing by at most one), so N workers can
    share one huge scene; units are dealt round-robin.
    """
    i, n = shard
    names = unique_names(scenes, holds)
    units: list[Unit] = []
    for scene, name in zip(scenes, names):
        rows = rows_of(scene) if 1 < n and len(scenes) < n else None
        if rows and rows >= 2 * n:
            bounds = [k * rows // n for k in range(n + 1)]
            units.extend(Unit(scene, name, r0, r1) for r0, r1 in zip(bounds, bounds[1:]))
        else:
            units.append(Unit(scene, name))
    return [u for j, u in enumerate(units) if j % n == i]


# ----------------------------------------------------------------------------- helpers


def package_versions() -> dict[str, str]:
    """The versions of what shapes the outputs (run.json); looked up once per process."""
    return dict(_package_versions())


@functools.lru_cache(maxsize=1)
def _package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"tilescan": __version__}
    for name in ("keras", "tensorflow-cpu", "tensorflow", "jax", "torch", "numpy", "rasterio", "pyarrow", "opencv-python-headless"):
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


def fingerprint(unit: Unit, cfg: Config, model_sha: str, version: dict | None = None, results: int | None = None) -> str:
    """What the outputs depend on: the scene file, the unit's rows, the result-shaping
    config (not batch size or threads), the model file and :data:`~tilescan.layout.RESULTS_VERSION`
    (or ``results``, an earlier one's). ``version``: the scene's :func:`sources.scene_identity`
    (path, size, mtime; or URL and validators), when known."""
    scene = sources.scene_identity(unit.scene) if version is None else version
    blob = json.dumps(
        {
            **scene,
            "rows": [unit.row_start, unit.row_stop],
            "config": output_shaping(cfg.to_dict()),
            "model": model_sha,
            "results": layout.RESULTS_VERSION if results is None else results,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class UnitLock:
    """An exclusive, non-blocking ``flock`` on ``OUT/.tilescan-locks/<unit slot>.lock``,
    removed again when released (layout.FileLock)."""

    def __init__(self, out: Path, unit: Unit):
        self.path = out / LOCKS / (unit.slot + ".lock")
        self.target = unit.out_dir(out)
        self.lock = layout.FileLock(self.path)

    def acquire(self) -> "UnitLock":
        try:
            self.lock.acquire()
        except layout.Busy as busy:
            who = ("another run in this process (a thread of yours)" if busy.holder == layout.lock_holder()
                   else f"another tilescan process ({busy.holder or 'unknown pid'})")
            err = LockedError(f"{who} is writing this output; it was left alone (lock {self.path})",
                              path=str(self.target))
            err.holder, err.who = busy.holder or "unknown pid", who
            raise err from None
        return self

    def wait_free(self, log: Callable[[str], None], every_s: float = 300.0) -> bool:
        """Wait until no process holds the lock (a process that ends lets go of it, however it
        ends), polled twice a second and said in the log every ``every_s``; False when a stop
        request (SIGTERM, SIGINT) comes first."""
        said = None
        while not stop.requested():
            try:
                self.lock.acquire()
            except layout.Busy as busy:
                if said is None or time.monotonic() - said >= every_s:
                    log(f"{'still ' if said else ''}waiting for {busy.holder or 'another tilescan process'} "
                        f"to finish {self.target}")
                    said = time.monotonic()
                time.sleep(0.5)
                continue
            self.lock.release()
            return True
        return False

    def release(self) -> None:
        self.lock.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def sweep_staging(out: Path) -> list[str]:
    """Remove what no process is writing from the staging area (its writer's lock is free): a
    SIGKILLed run's unit that no later run included (its scene gone, another shard count), an
    old output it had parked aside, a killed collect's set would otherwise stay forever.
    Returns their names. Every writer of a staging entry holds its lock
    (:func:`~tilescan.layout.staging_lock`), so one being written is never touched."""
    try:
        entries = list((out / STAGING).iterdir())
    except OSError:
        return []
    removed = []
    for entry in entries:
        guard = layout.staging_lock(entry.name)
        if guard is None:  # not tilescan's
            continue
        lock = layout.FileLock(out / LOCKS / guard)
        try:
            lock.acquire()
        except layout.Busy:
            continue
        try:
            layout.discard(entry)
            removed.append(entry.name)
        finally:
            lock.release()
    return removed


def _rename_into(stage: Path, final: Path) -> None:
    """``os.replace``; a folder that refuses it is named as the one that cannot be written
    (the staging folder is writable: it was just written)."""
    try:
        os.replace(stage, final)
    except PermissionError as exc:
        raise PermissionError(exc.errno, exc.strerror, str(final.parent)) from exc


def move_into_place(stage: Path, final: Path, out: Path) -> list[str]:
    """Rename the finished staging folder to ``final``: a scene folder ``OUT/<name>`` or a row
    band ``OUT/<name>/rows-…``. What was there is parked in the staging area, then removed
    (row-band parts inside an old scene folder, and what a user added beside tilescan's
    outputs, are kept: their names are returned). Any other target is refused, so
    nothing outside the unit's own folder and tilescan's staging area is renamed or removed."""
    kept: list[str] = []
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
        if aside.is_dir() and not aside.is_symlink():
            kept = layout.carry_over(aside, stage, layout.UNIT_FILES, f"{scene_dir.name}.qgs")
        _rename_into(stage, final)
        layout.discard(aside)
    else:
        _rename_into(stage, final)
    try:
        fd = os.open(final.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass
    return kept


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
