"""A whole run: scenes to units, skip what is done, process the rest, write OUT/report.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import layout, stop
from ..layout import read_manifest
from ..config import Config, resolve_target
from ..errors import ConfigError, InputError, LockedError, ModelError, OutputError, OutputExistsError, TilescanError
from ..log import catching_warnings, emit, logger
from ..model import LoadedModel, describe_model
from ..outputs.qgis import parquet_only_warning, percent_warning
from ..outputs.files import make_folder, write_error, write_json
from ..outputs import fonts
from ..scene import sources
from ..scene.info import TilingWarning
from ..scene.bands import check_band_count
from ..scene.vsi import configure_gdal
from .engine import Engine, shared_engine
from .made import equivalent, redoes, what_differs
from .memory import keep_freed_memory
from .process import UnitJob
from .report import (RunReport, UnitResult, finished_since, interruption, is_scene_folder, overwrite_since,
                     report_failure)
from .stream import Stream
from .threads import one_blas_thread
from .units import Unit, UnitLock, _link_or_file, _occupied, fingerprint, plan_units, sweep_staging

#: GDAL block cache of a run, unless GDAL_CACHEMAX is set. Tiles are read in row-major order,
#: so one row of blocks must fit (16 MB for a 10,000 px wide 3-band uint16 scene); GDAL's own
#: default (5% of RAM) fills with blocks never read again and made peak memory grow with the
#: scene size (benchmarks/README.md).
GDAL_CACHE_MB = 256


def _legacy_outputs(out: Path, unit: Unit, legacy: str) -> Path | None:
    """The unit's finished outputs under the folder name an older tilescan gave it, when
    that differs from today's name (an unusual or case-colliding stem): they are not resumed
    silently in the new place, and not left behind unnoticed either."""
    if legacy in (unit.name, "", "..") or "/" in legacy:
        return None
    old = out / legacy if unit.part is None else out / legacy / unit.part
    m = read_manifest(old)
    if isinstance(m, dict) and m.get("status") == "complete" and m.get("scene") == sources.recorded_path(unit.scene):
        return old
    return None


_cache_runs = [0, None]  # runs of this process inside _bound_gdal_cache, and the bound before the first
_cache_lock = threading.Lock()


@contextlib.contextmanager
def _bound_gdal_cache():
    """GDAL's block cache bounded while runs go on, then as it was (a notebook's own rasterio
    work keeps its cache); unless GDAL_CACHEMAX is set, which is the user's choice."""
    if "GDAL_CACHEMAX" in os.environ:
        yield
        return
    from rasterio.env import get_gdal_config, set_gdal_config

    with _cache_lock:
        if _cache_runs[0] == 0:
            _cache_runs[1] = get_gdal_config("GDAL_CACHEMAX")
            set_gdal_config("GDAL_CACHEMAX", GDAL_CACHE_MB * 2**20)
        _cache_runs[0] += 1
    try:
        yield
    finally:
        with _cache_lock:
            _cache_runs[0] -= 1
            if _cache_runs[0] == 0:
                set_gdal_config("GDAL_CACHEMAX", _cache_runs[1])


def _huge_page_switch() -> Callable[[bool], bool] | None:
    """numpy's switch of its transparent-huge-page advice (returns the setting before), or
    None where this numpy has none."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    return getattr(core.multiarray, "_set_madvise_hugepage", None)


@contextlib.contextmanager
def _small_pages():
    """numpy's advice for transparent huge pages off while a run streams its buffers, then
    as before: such a page is zeroed whole on its first write (after compacting memory where
    no free one is at hand), and that cost a run more than it gained (benchmarks/README.md,
    "Huge pages"). NUMPY_MADVISE_HUGEPAGE, when set, is the user's choice and is kept."""
    switch = _huge_page_switch()
    if switch is None or "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        yield
        return
    before = switch(False)
    try:
        yield
    finally:
        switch(before)


def _check_output_dir(out: Path) -> None:
    if is_scene_folder(out):  # -o OUT/<scene> by mistake: outputs would nest in a finished scene's folder
        raise OutputError(f"is a scene's output folder (it holds {layout.MANIFEST}), not a run's: give the folder "
                          f"that holds it, {out.parent}", path=str(out))
    make_folder(out)
    probe = out / f".tilescan-write-test-{os.getpid()}-{threading.get_ident()}"  # runs in other threads probe too
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
    engine: Engine | None = None,
    ctrl_c_raises: bool = False,
) -> RunReport:
    """Process every scene of ``inputs`` (files, folders, URLs, STAC documents) and ``stac``
    (STAC documents) into ``out``; see the module doc. ``assets``: the STAC asset(s) to read;
    ``stac_items``: also write a STAC Item describing each finished scene's outputs;
    ``engine``: the model step to use instead of the process's shared one (benchmarks);
    ``ctrl_c_raises`` (the Python API): a SIGINT stops the run as a SIGTERM does, then raises
    :class:`KeyboardInterrupt`, also when the run had finished meanwhile; a second raises at once."""
    shard = _checked_shard(shard)
    keep_freed_memory()  # a scene's arrays reuse the last scene's memory
    # SIGTERM/SIGINT: stop between batches, report, exit 75
    with stop.handling("raise" if ctrl_c_raises else "end") as seen, _small_pages(), one_blas_thread(), _bound_gdal_cache():
        report = RunReport()
        try:
            _run(inputs, out, cfg, model_path, shard, progress, log, stac, assets, stac_items, engine, report)
        except Exception as exc:
            report_failure(Path(out), shard, exc, report)
            raise
    if ctrl_c_raises and seen.signal == "SIGINT":
        raise KeyboardInterrupt(f"tilescan.run stopped by SIGINT; finished scenes are kept ({Path(out) / layout.report_name(shard)})")
    return report


def _checked_shard(shard) -> tuple[int, int]:
    """``shard`` as ``(i, n)`` with ``0 <= i < n``, or a :class:`ConfigError` (as ``--shard``)."""
    try:
        i, n = shard
        ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (i, n)) and 0 <= i < n
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"shard must be (I, N), two integers with 0 <= I < N, got {shard!r}")
    return int(i), int(n)


def _run(inputs, out, cfg, model_path, shard, progress, log, stac, assets, stac_items, engine,
         report: RunReport) -> RunReport:
    started = time.monotonic()
    out = Path(out).absolute()  # reports name folders a monitor elsewhere can find
    # A named input that does not exist (or a folder URL that cannot be listed) fails alone
    # (listed in report.json) unless no input gives a scene; then this raises before
    # anything is created.
    scenes, missing = sources.find_inputs(inputs, stac, assets, out=out)
    # the metadata and hash decide what is already done; Keras and the model load only
    # when a unit needs them (a rerun with nothing to do never imports TensorFlow)
    card = describe_model(model_path)  # a model that is not one: OUT is not made for it
    if resolve_target(cfg.cam.target_class, card.classes, cfg.cam.origin("target_class")) is not None \
            and cfg.cam.method == "eigencam":  # a target is checked before any scene; eigencam has no use for it
        log(f"warning: {cfg.cam.origin('target_class')} changes nothing with eigencam: it maps the first principal "
            "component of the layer's activations, the same map for every class")
    check_band_count(cfg.tiling, card.num_bands)
    if cfg.output.quicklook:
        fonts.check_names(card.classes, log, "the quicklooks' legends")
    if cfg.output.styles and not cfg.output.gpkg:
        log(parquet_only_warning("the scenes' QGIS projects"))
    if cfg.output.gpkg and (said := percent_warning(out, "the scenes' tiles.gpkg")):
        log(said)
    _check_output_dir(out)
    report.held_by = _live_report_holder(out / layout.report_name(shard))
    since = None if report.held_by is not None else overwrite_since(out / layout.report_name(shard), cfg.to_dict(),
                                                                     card.sha256)  # an --overwrite stopped or killed
    if cfg.output.overwrite:  # what a run of the same command resumes from, should this one be killed
        report.extra.update(config=cfg.to_dict(), model={"id": card.model_id, "sha256": card.sha256},
                            overwrite_since=since or report.started_at)
    if report.held_by is None:  # a report of this run
        write_json(out / layout.report_name(shard), {**report.running(), "shard": list(shard), **report.extra})
    else:  # a second run over the same OUT: the report stays the first one's, which is still at work
        log(f"warning: another tilescan run (pid {report.held_by}) is writing into {out}: its "
            f"{layout.report_name(shard)} is left to it while it runs (this run's replaces it only if it has ended)")
    configure_gdal(watch=False)  # remote scenes turn the transfer watch on themselves
    units = _plan(scenes, card, cfg, shard, out)
    if shard[1] > 1:  # which share this process does, as the scheduler or --shard gave it
        log(f"shard {shard[0]}/{shard[1]}: {len(units)} unit(s) of {len(scenes)} scene(s)")
    for err in missing if shard[0] == 0 else []:
        report.results.append(UnitResult(err.path, err.path, "failed", reason=str(err), error_kind=err.kind))
        log(f"error: {err}")
    book = _Units(out, cfg, card, units, layout.legacy_folder_names(scenes), scenes, log, engine, since)
    try:
        stats = book.process(progress, started, report)
    finally:  # also when an error ends the run: its report lists what was done
        report.results.extend(book.results[k] for k in sorted(book.results))
    if stac_items:  # OUT/<scene>/item.json: the outputs as a STAC Item (outputs.stac_items)
        from ..outputs.stac_items import write_items

        finished = {Path(r.out_dir): r for r in report.results if r.status in ("done", "skipped") and r.out_dir}
        for folder, warning in write_items(out, list(finished), log).items():
            finished[folder].warnings.append(warning)  # report.json says it, not the log alone
    if left := sweep_staging(out):
        log(f"removed what stopped runs had left in {layout.STAGING}: {', '.join(sorted(left))}")
    layout.tidy(out)
    listed = "\n".join(sorted(sources.recorded_path(s) for s in scenes))  # shards of one job must list the same
    digest = hashlib.sha256(listed.encode("utf-8", "surrogateescape")).hexdigest()  # a name's bytes as they are
    if (sig := stop.requested()) and not report.interrupted:  # it came once every tile was classified
        log(f"stopped by {sig} after every scene's tiles were classified: their outputs were finished, nothing "
            "was left to stop (a rerun of the same command skips them)")
        report.interrupted = {"signal": sig, "unit": None, "scene": None, "units": [], "not_started": []}
    report.finish(shard=list(shard), model={"id": card.model_id, "sha256": card.sha256}, config=cfg.to_dict(),
                  scenes_listed={"count": len(scenes), "sha256": digest},
                  timings_s={"wall": round(time.monotonic() - started, 3), "streams": stats})
    if report.held_by is not None and _live_report_holder(out / layout.report_name(shard)) is None:
        report.held_by = None  # the run that held the report is gone (killed): this one's is the last word
    if report.held_by is None:
        write_json(out / layout.report_name(shard), report.to_dict())
    return report


def _live_report_holder(path: Path) -> int | None:
    """The pid of another process on this host whose run's report ``path`` is and which still
    runs (its report says ``running``); None when there is none."""
    m = layout.read_json(path)
    try:
        pid = int(m["pid"]) if m.get("running") and m.get("host") == os.uname().nodename else None
    except (ValueError, TypeError, KeyError, AttributeError):  # not a running report of tilescan's
        return None
    if pid is None or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    try:  # a killed run's pid taken by another program since
        if b"tilescan" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return None
    except OSError:  # no /proc here (macOS): alive is all there is to know
        pass
    return pid


def _plan(scenes: list, card, cfg: Config, shard: tuple[int, int], out: Path) -> list[Unit]:
    """The units of this shard (row bands need each scene's grid: opened without Keras)."""
    def rows_of(scene: Path) -> int | None:
        try:
            with card.open_scene(scene, cfg.tiling) as r:
                return r.grid.n_rows
        except TilescanError:
            return None

    def holds(name: str, scene) -> bool:  # OUT/name has this scene's finished outputs, whole or a row band
        folder = out / name
        for m in (read_manifest(folder), *(read_manifest(band) for band in sorted(folder.glob("rows-*"))[:1])):
            if isinstance(m, dict) and m.get("status") == "complete":
                return m.get("scene") == sources.recorded_path(scene)
        return False

    with catching_warnings():
        warnings.simplefilter("ignore", TilingWarning)
        return plan_units(scenes, cfg, shard, rows_of, holds)


class _Units:
    """A run's units and their results: the checks before a unit opens, errors as results,
    remote scenes tried again, and the streams that process them."""

    def __init__(self, out: Path, cfg: Config, card, units: list[Unit], legacy: list[str], scenes: list,
                 log: Callable[[str], None], engine: Engine | None, since: str | None = None):
        self.out, self.cfg, self.card, self.units, self.log, self.engine = out, cfg, card, units, log, engine
        self.since = since  # when the --overwrite run began that this one resumes: what it finished is kept
        self.legacy = dict(zip(scenes, legacy))
        self.results: dict[int, UnitResult] = {}
        self.retries = sources.SceneRetries()
        self.retry: list[int] = []
        self.locked: list[int] = []  # units another process was writing: taken up once it lets go
        self.unanswered: dict[str, InputError] = {}  # a server that did not answer a check -> why (this run)

    def process(self, progress: bool, started: float, report: RunReport) -> list[dict]:
        """Stream every unit (then the remote ones to try again, and those another process was
        writing, once it lets go of them); the streams' timings."""
        bar = _progress_bar() if progress else None
        todo, stats = list(enumerate(self.units)), []
        try:
            while todo:
                stream = Stream(self.make_engine, self.cfg, self.prepare, self.fail, self.on_result, bar, started)
                stream.run(todo)
                stats.append(stream.stats.to_dict())
                if stream.interrupted is not None:
                    report.interrupted = interruption(stream, self.log)
                    report.interrupted["not_started"] += [self.units[k].key for k in sorted(self.locked)]
                    break
                retry, locked = sorted(self.retry), sorted(self.locked)
                self.retry.clear()
                self.locked.clear()
                todo = [(k, self.units[k]) for k in sorted(retry + locked)]
                if ((retry and not self.retries.wait([self.units[k].scene for k in retry], self.log))
                        or not all(UnitLock(self.out, self.units[k]).wait_free(self.log) for k in locked)):
                    report.interrupted = {"signal": stop.requested(), "unit": None, "scene": None, "units": [],
                                          "not_started": [u.key for _, u in todo]}  # a stop while waiting
                    break
        finally:
            if bar is not None:
                bar.close()
        return stats

    def make_engine(self) -> Engine:
        got = self.engine if self.engine is not None else shared_engine(self.cfg, self.card.path)
        if got.runtime.get("warning"):  # a GPU this backend cannot use
            self.log(got.runtime["warning"])
        return got

    def prepare(self, k: int, unit: Unit) -> UnitJob | UnitResult:
        """On the opener thread: the unit's checks; a locked job, or why there is nothing to do."""
        final = unit.out_dir(self.out)
        server = sources.server_of(unit.scene)
        if server in self.unanswered and (kept := self._kept_unchecked(unit, final, self.unanswered[server])):
            return kept  # a hung server is waited for once a run, not once for each of its finished scenes
        if server in self.unanswered and sources.timed_out(self.unanswered[server]):  # nor for each new one
            raise InputError(f"not asked, as its server did not answer for {self.unanswered[server]}", path=str(unit.scene))
        try:
            with sources.remote_errors(unit.scene):  # a URL's network failures: named, with the cause
                version = sources.scene_identity(unit.scene)
        except InputError as exc:
            if getattr(exc, "transient", False) and server and (server not in self.unanswered or sources.timed_out(exc)):
                self.unanswered[server] = exc  # a timeout kept over another cause: it fails the server's new scenes
            if (kept := self._kept_unchecked(unit, final, exc)) is not None:
                return kept
            raise
        fp = fingerprint(unit, self.cfg, self.card.sha256, version)
        lock = UnitLock(self.out, unit).acquire()
        try:
            done, replaces = _already_done(self.out, unit, final, fp, self.cfg, self.legacy[unit.scene], self.card, version,
                                           since=self.since)
            other = None if done or replaces or self.cfg.output.overwrite else \
                _finished_otherwise(unit, final, self.cfg, self.card, version)
            if done or other:
                lock.release()
                logger.debug(f"{unit.key}: already complete, skipped")  # -v: a rerun of 500 chips printed 500 lines
                made = read_manifest(final) or {}
                how, counts = other or ("", made.get("counts", {}))
                return UnitResult(unit.key, str(unit.scene), "skipped", str(final), counts=counts,
                                  reason=f"already complete{' ' + how if how else ''} with the same config and model",
                                  warnings=list(made.get("warning_details") or []))  # its outputs' warnings still hold
        except BaseException:
            lock.release()
            raise
        if replaces:
            self.log(f"{unit.key}: redoing its finished outputs, {replaces}")
        job = UnitJob(k, unit, self.out, self.cfg, self.card, fp, lock, self.log, version)
        job.replaces = replaces
        return job

    def _kept_unchecked(self, unit: Unit, final: Path, exc: InputError) -> UnitResult | None:
        """A finished unit whose remote scene could not be reached to check it for changes (a
        network failure that may pass): kept as it is, with a warning, instead of failed, so an
        outage does not fail a rerun with nothing to do; None when it is not such a unit."""
        old = read_manifest(final) or {}
        version = old.get("scene_version")
        if (not getattr(exc, "transient", False) or self.cfg.output.overwrite or old.get("status") != "complete"
                or version is None or (old.get("fingerprint") != fingerprint(unit, self.cfg, self.card.sha256, version)
                                       and not equivalent(old, unit, self.cfg, self.card, version))):
            return None
        said = str(exc) if exc.path in (None, str(unit.scene)) else f"not asked, as its server did not answer for {exc}"
        reason = ("already complete; kept unchecked, as its scene could not be reached to check it for changes "
                  f"(the next run checks it): {said}")
        self.log(f"warning: {unit.key}: {reason}")
        return UnitResult(unit.key, str(unit.scene), "skipped", str(final), reason=reason, counts=old.get("counts", {}),
                          warnings=list(old.get("warning_details") or []))

    def fail(self, what: UnitJob | Unit, exc: BaseException) -> UnitResult:
        """A unit's error as its result; errors of the model (no later unit can do better) end the run."""
        job = what if isinstance(what, UnitJob) else None
        unit = job.unit if job else what
        seconds = round(time.monotonic() - job.t0, 2) if job else None
        if isinstance(exc, ModelError):
            raise exc
        if isinstance(exc, OSError):
            exc = write_error(exc, getattr(exc, "filename", None) or unit.out_dir(self.out))
        if not isinstance(exc, TilescanError):  # a bug: one scene never kills the batch
            msg = f"{unit.scene}: unexpected error {type(exc).__name__}: {exc}"
            self.log("error: " + msg)
            self.log("".join(traceback.format_exception(exc, limit=5)))
            return UnitResult(unit.key, str(unit.scene), "failed", reason=msg, error_kind="internal", seconds=seconds)
        if not exc.path:
            exc.path = str(unit.scene)
        if isinstance(exc, LockedError):  # another run is writing it: once it lets go, skipped if finished, else done
            self.log(f"warning: {unit.key}: {getattr(exc, 'who', 'another tilescan process')} is writing {exc.path}; "
                     "this run waits for it after its other scenes")
            self.locked.append(self.units.index(unit))
            return UnitResult(unit.key, str(unit.scene), "waiting", reason=str(exc), error_kind=exc.kind)
        if self.retries.wants(unit.scene, exc):  # a network failure, in the scene's checks (its HEAD) or its work
            self.log(f"warning: {exc}; the scene will be tried again ({self.retries.attempt + 1} of {self.retries.retries})")
            self.retry.append(job.index if job is not None else self.units.index(unit))
        else:
            self.retries.annotate(exc)
            self.log(f"error: {exc}")
        return UnitResult(unit.key, str(unit.scene), "failed", reason=str(exc), error_kind=exc.kind, seconds=seconds,
                          outputs_in=exc.outputs_in if isinstance(exc, OutputExistsError) else None)

    def on_result(self, k: int, res: UnitResult) -> None:
        if res.status == "waiting":  # another process's until it lets go: this run's result comes later, or never
            return
        self.results[k] = res
        if res.status == "done":
            c = res.counts
            self.log(f"{res.unit}: {c['tiles_classified']} tiles classified, {c['tiles_skipped']} skipped, "
                     f"{res.seconds:.1f} s -> {res.out_dir}")


def _finished_otherwise(unit: Unit, final: Path, cfg: Config, card: LoadedModel,
                        version: dict | None) -> tuple[str, dict] | None:
    """How the unit's tiles are already finished in the other shape a shard count gives a scene
    (the scene count changed between runs: fewer scenes than shards bands them): a whole unit
    by row bands that cover every tile row (and their counts added up), a band by its scene's
    whole output (no counts: the whole's are the scene's); each made from the same scene,
    settings and model with none of its outputs missing. None otherwise."""
    from ..outputs.finished import _covers, _Unit

    def same(folder: Path, u: Unit) -> dict | None:
        m = read_manifest(folder)
        ok = (isinstance(m, dict) and m.get("status") == "complete"
              and (m.get("fingerprint") == fingerprint(u, cfg, card.sha256, version) or equivalent(m, u, cfg, card, version))
              and all(os.path.lexists(folder / f) for f in m.get("outputs") or ["tiles.parquet"]))
        return m if ok else None

    if unit.part is not None:
        return ("as its scene's whole output", {}) if same(final.parent, Unit(unit.scene, unit.name)) else None
    bands = []
    for p in sorted(final.iterdir()) if final.is_dir() else ():
        if layout.PART_RE.fullmatch(p.name) and (m := same(p, Unit(unit.scene, unit.name, *map(int, p.name.split("-")[1:])))):
            bands.append(_Unit(p, unit.name, p.name, m, tuple(m["rows"])))
    if not (bands and _covers(bands)):
        return None
    counts: dict = {}
    for b in bands:
        for k, v in (b.manifest.get("counts") or {}).items():
            if isinstance(v, dict):
                for c, n in v.items():
                    counts.setdefault(k, {})[c] = counts.get(k, {}).get(c, 0) + n
            elif isinstance(v, (int, float)):
                counts[k] = counts.get(k, 0) + v
    return f"as {len(bands)} row bands", counts


def _already_done(out: Path, unit: Unit, final: Path, fp: str, cfg: Config, legacy: str, card: LoadedModel,
                  version: dict | None = None, since: str | None = None) -> tuple[bool, str | None]:
    """Whether the unit's outputs are in place from the same scene, config and model (or
    settings that give the same outputs), and when finished outputs are to be redone
    (``overwrite``, but not those finished ``since`` the --overwrite run this one resumes; ``update``), what
    they were made from; raises when something else is in the way (it is left alone), or made
    otherwise without ``overwrite`` or ``update``."""
    if unit.part is not None and _link_or_file(final.parent):  # its row band would land outside OUT
        raise OutputExistsError("is a link or a file, not a scene folder tilescan made; it was left alone",
                                path=str(final.parent))
    if not os.path.lexists(final) and (old_place := _legacy_outputs(out, unit, legacy)):
        raise OutputExistsError(
            f"finished outputs of this scene from an earlier tilescan version are in {old_place}; this "
            f"version writes them to {final} (a name safe on every filesystem): move or remove them, then rerun",
            path=str(final), outputs_in=old_place.relative_to(out).as_posix())  # report.json: collect finds them there
    old = read_manifest(final)
    if old is not None and old.get("status") == "complete":
        same = old.get("fingerprint") == fp
        if (not cfg.output.overwrite or finished_since(old, since)) and (same or equivalent(old, unit, cfg, card, version)):
            gone = [f for f in old.get("outputs") or [] if not os.path.lexists(final / f)]
            if not gone:
                return True, None
            return False, f"as {', '.join(gone)} {'is' if len(gone) == 1 else 'are'} missing (deleted since)"
        what, advice = what_differs(old, unit, cfg, card, version)
        if redoes(old, unit, cfg):
            return False, ("as --overwrite asks (made with the same scene, settings and model)" if same else what)
        raise OutputExistsError(f"finished outputs {what} exist: {advice}", path=str(final))
    elif _occupied(final):
        if old is None and not (final / layout.MANIFEST).is_file():  # something else's: --overwrite leaves it too
            raise OutputExistsError(
                "exists but is not a tilescan output (no run.json); it was left alone, even with "
                "--overwrite: move it away, or choose another output folder", path=str(final))
        if not redoes(old, unit, cfg):
            raise OutputExistsError(
                "holds unfinished tilescan outputs (run.json not complete); it was left alone: "
                "pass --overwrite (overwrite=True from Python) to replace them", path=str(final))
    return False, None


def _progress_bar():
    from tqdm import tqdm

    from ..log import ReaderGoneSafe

    return tqdm(total=0, desc="tiles", unit="tile", leave=False, dynamic_ncols=True, file=ReaderGoneSafe(sys.stderr))
