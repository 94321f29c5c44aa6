"""Finished outputs in a scene's way against what this run would make of it: settings that give
the same outputs (so the scene is skipped), what differs when they do not (the refusal's
words and advice), and when a run may redo them (--overwrite, --update).
"""

from __future__ import annotations

import os
import time

from .. import layout
from ..config import Config
from ..model import LoadedModel
from ..outputs.finished import OTHER_FILE, changed_settings, results_alike, settings_alike, stretch_as_read
from ..scene import sources
from .units import Unit, fingerprint


_VERSION_KEYS = {"mtime_ns": "modified", "last_modified": "Last-Modified", "etag": "ETag"}


def _said(key: str, value) -> str:
    """A scene version's value as a message shows it: a modification time in UTC, to the second."""
    if key == "mtime_ns" and isinstance(value, int):
        return time.strftime(layout.TIME_FORMAT, time.gmtime(value / 1e9))
    return str(value)


def what_differs(old: dict, unit: Unit, cfg: Config, card: LoadedModel, version: dict | None = None) -> tuple[str, str]:
    """What the finished outputs in the way were made from, where it differs from this run's
    (the fingerprint says only that something does): the scene file, the model, settings, the
    scene's version (its ``version`` now against run.json's: what changed, old -> new); and
    what to do about it."""
    scene = sources.recorded_path(unit.scene)
    if old.get("scene") != scene:
        if file_gone(old):
            return (f"{OTHER_FILE} ({old.get('scene')}, gone since)", "if this file takes its place (it moved, or "
                    "replaces it), pass --update to redo it here (update=True from Python); if it is another scene, "
                    "rename it or run it into another output folder")
        return (f"{OTHER_FILE} ({old.get('scene')})", "if this is that file moved, run "
                "it alone with --overwrite (overwrite=True from Python) to redo it here; if it is another scene, rename "
                "it or run it into another output folder: --overwrite would replace the other scene's outputs")
    redo = "pass --update to redo the scenes that changed (update=True from Python), or --overwrite to redo all"
    made_by, now = results_alike(old), layout.RESULTS_VERSION
    if _newer(old):  # --update would put this release's results over a later one's
        return (f"made by a later tilescan (results version {made_by}; this one's {now})", "run them with that "
                "release (upgrade tilescan), or pass --overwrite to redo them with this one")
    if made_by != now:  # the same settings may give other results in this release
        since = "; ".join(layout.RESULTS_CHANGES[v] for v in range(made_by + 1, now + 1) if v in layout.RESULTS_CHANGES)
        return (f"made by an earlier tilescan, whose results for the same scene, settings and model may differ "
                f"(results version {made_by}; this one's {now}{': since, ' + since if since else ''})", redo)
    changed = changed_settings(old.get("config") or {}, as_made(old, unit, cfg, card).to_dict(), card.classes)
    if changed:
        return "made with other settings (" + ", ".join(changed) + ")", redo
    model = old.get("model") or {}
    if model.get("sha256") != card.sha256:
        return f"made with another model ({model.get('id')}, sha256 {str(model.get('sha256'))[:12]})", redo
    was = old.get("scene_version") or {}
    moved = [f"{_VERSION_KEYS.get(k, k)} {_said(k, was.get(k))} -> {_said(k, v)}" for k, v in (version or {}).items()
             if k != "scene" and was.get(k) != v]
    remote = getattr(unit.scene, "remote", False)
    unknown = "its size, ETag or Last-Modified differ" if remote else "its size or modification time differ"
    return f"made from another version of the scene{'' if remote else ' file'} ({'; '.join(moved) or unknown})", redo


def file_gone(old: dict) -> bool:
    """Whether the local scene file finished outputs ``old`` (their run.json) were made from is
    gone: moved, renamed or deleted since (a URL is never taken for gone)."""
    was = old.get("scene")
    return isinstance(was, str) and os.path.isabs(was) and not os.path.lexists(was)


def _newer(old: dict) -> bool:
    """Whether finished outputs were made by a later tilescan, whose results this one's would replace."""
    return layout.results_version(old) > layout.RESULTS_VERSION


def redoes(old: dict | None, unit: Unit, cfg: Config) -> bool:
    """Whether this run may replace outputs ``old`` that differ from what it makes: --overwrite,
    or --update where they are this scene file's, or a file's that is gone (one moved into
    another folder, or replaced there), and not a later tilescan's; --update never replaces
    another scene file's that is there."""
    if cfg.output.overwrite:
        return True
    if not isinstance(old, dict):
        return cfg.output.update
    mine = old.get("scene") in (None, sources.recorded_path(unit.scene)) or file_gone(old)
    return cfg.output.update and mine and not _newer(old)


def as_made(old: dict, unit: Unit, cfg: Config, card: LoadedModel) -> Config:
    """``cfg`` with the settings that give the finished outputs ``old`` as they are set back to
    how ``old`` had them: a stride equal to the tile size given or left 0, bands given as the
    automatic pick chose them, or left to it where it picks those given; fewer outputs asked
    for (a quicklook, GeoPackage or QGIS files made then, --no-quicklook now: what is asked is there);
    units, tile size or resampling that cut the scene into the same tiles (``--units px`` where
    ``auto`` chose those pixels); a scaling that stretches the scene alike (``auto`` and ``dtype``
    for uint8; percentiles where the stretch reads none); a target class written otherwise
    (:func:`_same_target`)."""
    was_out, out_now = (old.get("config") or {}).get("output") or {}, cfg.output
    fewer = {k: True for k in ("quicklook", "gpkg", "styles") if was_out.get(k) is True and getattr(out_now, k) is False}
    if fewer.get("quicklook"):
        fewer["quicklook_size"] = was_out.get("quicklook_size", out_now.quicklook_size)
    was = (old.get("config") or {}).get("tiling") or {}
    now, same = cfg.tiling, {}
    if was.get("tile_size") == now.tile_size and {was.get("stride"), now.stride} <= {0, now.tile_size}:
        same["stride"] = was.get("stride")
    before, used = list(was.get("bands") or []), (old.get("scene_info") or {}).get("bands_used")
    if before != list(now.bands) and used and list(now.bands or card.auto_bands(unit.scene, now) or [None]) == used:
        same["bands"] = tuple(before)
    info, stretch = old.get("scene_info") or {}, ("scaling", "percentiles")
    if info.get("dtype") and all(k in was for k in stretch) and \
            stretch_as_read(was, info) == stretch_as_read({k: getattr(now, k) for k in stretch}, info):
        same.update(scaling=was["scaling"], percentiles=tuple(was["percentiles"]))  # e.g. percentiles a uint8 scene does not use
    if was.get("allow_pixel_space", now.allow_pixel_space) != now.allow_pixel_space and info.get("crs"):
        same["allow_pixel_space"] = was["allow_pixel_space"]  # a scene with a CRS: the setting changes nothing
    sizing, made = ("units", "tile_size", "resample_to_gsd"), old.get("tiling") or {}
    if any(was.get(k, getattr(now, k)) != getattr(now, k) for k in sizing) and "tile_px" in made and \
            card.tile_sizes(unit.scene, now) == (made["tile_px"], made.get("stride_px")):
        same.update({k: was[k] for k in (*sizing, "stride") if k in was})  # e.g. --units px where auto chose pixels
    target = _same_target(old, cfg, card)
    if target is not None:
        cfg = cfg.replace("cam", target_class=target)
    return cfg.replace("tiling", **same).replace("output", **fewer) if same or fewer else cfg


def _same_target(old: dict, cfg: Config, card: LoadedModel) -> str | None:
    """``old``'s ``[cam] target_class`` where it is written otherwise than this run's but names the
    same class of the model (``Farmland``, ``farmland``, its index): else None."""
    was = ((old.get("config") or {}).get("cam") or {}).get("target_class")
    if not isinstance(was, str) or was == cfg.cam.target_class:
        return None
    return was if settings_alike("cam", "target_class", was, cfg.cam.target_class, {}, card.classes) else None


def equivalent(old: dict, unit: Unit, cfg: Config, card: LoadedModel, version: dict | None) -> bool:
    """Whether finished outputs whose fingerprint differs were made with settings that give the
    same outputs (:func:`as_made`), by an earlier release that gives the same results for
    their scene (:func:`results_alike`), or from the same remote object (its ETag) whose size
    an earlier release read wrong."""
    asked = as_made(old, unit, cfg, card)
    now = layout.RESULTS_VERSION
    results = layout.results_version(old) if results_alike(old) == now else now
    was_version = old.get("scene_version") or {}
    if version is not None and version.get("etag") and {**was_version, "size": None} == {**version, "size": None}:
        version = was_version  # the same object by its ETag: size as an earlier release read it (a range's on S3)
    elif (asked is cfg and results == now) or version is None:
        return False
    return old.get("fingerprint") == fingerprint(unit, asked, card.sha256, version, results)
