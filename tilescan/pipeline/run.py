"""A whole run: scenes to units, skip what is done, process the rest, write OUT/report.json.
"""

from __future__ import annotations

import os
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Sequence
from .. import layout, stop
from ..scene import sources
from ..config import Config
from ..errors import ModelError, OutputError, OutputExistsError, TilescanError
from ..log import emit
from ..model import describe_model
from ..scene.info import TilingWarning
from ..outputs.files import write_json
from .engine import Engine, resolve_target
from .process import process_unit
from .report import RunReport, UnitResult
from .units import Unit, UnitLock, _link_or_file, _occupied, fingerprint, plan_units, read_manifest


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
        from ..outputs.stac_items import write_items

        write_items(out, [Path(r.out_dir) for r in report.results if r.status in ("done", "skipped") and r.out_dir], log)
    layout.tidy(out)
    data = report.to_dict()
    data["shard"] = list(shard)
    data["model"] = {"id": card.model_id, "sha256": card.sha256}
    write_json(out / layout.report_name(shard), data)
    return report
