"""The finished units under a run's OUT folder, per scene: what ``tilescan collect`` reads
(:mod:`tilescan.outputs.collect`). A unit is a whole scene's folder or a band of its tile
rows (``rows-AAAAA-BBBBB``), finished when its ``run.json`` says complete; and what the
latest run's reports say of them (failed, stopped, made with other settings).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pyarrow.parquet as pq

from .. import layout
from ..config import RERUN_KEYS, nodata_key, output_shaping, resolve_target
from ..config_values import scaling_mode
from ..errors import ConfigError, InputError
from ..layout import COLLECTED, MANIFEST, REPORT
from ..log import some


@dataclass
class _Unit:
    folder: Path
    scene: str  # scene folder name under OUT
    key: str
    manifest: dict
    rows: tuple[int, int]


@dataclass
class _Scene:
    name: str
    units: list[_Unit] = field(default_factory=list)
    n_rows: int | None = None
    missing_rows: list[tuple[int, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    refused: InputError | None = None  # its row parts do not fit together: the scene is not collected, the rest is
    gone: str | None = None  # why its outputs may be stale: its scene file is no longer where it was read


def _complete(folder: Path) -> dict | None:
    m = layout.read_manifest(folder)
    if not isinstance(m, dict) or m.get("status") != "complete" or not (folder / "tiles.parquet").is_file():
        return None
    return m


def _why_unfinished(folder: Path) -> str:
    """Why a folder with a run.json is no finished unit, in words."""
    m = layout.read_manifest(folder)
    if m is None:
        return "run.json is not readable JSON"
    if not isinstance(m, dict) or m.get("status") != "complete":
        return "run.json is not a complete manifest"
    return "tiles.parquet is missing"


def _shaping(m: dict) -> tuple:
    """What shaped a unit's outputs, as its fingerprint counts it: settings and model; settings
    that give the same outputs as one (:func:`_as_read`)."""
    shaping = output_shaping(m.get("config") or {})
    _as_read(shaping["tiling"], m.get("scene_info") or {})
    return json.dumps(shaping, sort_keys=True), (m.get("model") or {}).get("sha256")


def _as_read(tiling: dict, scene_info: dict, bands: list | None = None) -> None:
    """``[tiling]`` settings in the one form of those that give the same outputs: a stride of
    the tile size as 0, the bands as they were read (``bands``, else run.json's ``bands_used``
    in ``scene_info``), no ``allow_pixel_space`` for a scene with a CRS, and the stretch as
    :func:`stretch_as_read` has it."""
    if tiling.get("stride") == tiling.get("tile_size"):
        tiling["stride"] = 0
    if scene_info.get("dtype") and "scaling" in tiling:
        tiling["scaling"], percentiles = stretch_as_read(tiling, scene_info)
        if percentiles is None:
            tiling.pop("percentiles", None)
    if used := bands or scene_info.get("bands_used"):
        tiling["bands"] = used
    if scene_info.get("crs"):
        tiling.pop("allow_pixel_space", None)


def stretch_as_read(tiling: dict, scene_info: dict) -> tuple[str, list | None]:
    """How ``[tiling]`` (run.json's, or a config's as a dict) stretches the scene of run.json's
    ``scene_info``: the mode its ``scaling`` resolves to for the scene's dtype, and the
    percentiles where that mode reads them (None: they change nothing)."""
    mode = scaling_mode(tiling.get("scaling", "auto"), scene_info.get("dtype"))
    return mode, list(tiling.get("percentiles") or []) if mode == "percentile" else None


def _n_rows(folder: Path, m: dict) -> int | None:
    """Tile rows of the whole scene, from the scene height and the tile/stride in pixels."""
    try:
        meta = json.loads(pq.read_schema(folder / "tiles.parquet").metadata[b"tilescan"])
        t, s, h = int(meta["tile_px"]), int(meta["stride_px"]), int(m["scene_info"]["height"])
    except (KeyError, ValueError, TypeError, OSError):
        return None
    return 1 + max(0, -(-(h - t) // s))


def find_units(out: Path, log: Callable[[str], None]) -> tuple[list[_Scene], list[dict]]:
    """Finished units per scene folder, checked for overlaps; and what was skipped, why."""
    scenes: list[_Scene] = []
    skipped: list[dict] = []
    for d in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != COLLECTED):
        sc = _scene_units(d, skipped, log)
        if sc is None:
            continue
        _newest_set(sc, log)
        _check_parts(sc, d)
        if sc.missing_rows:
            log(f"warning: collect: {d.name}: tile rows {sc.missing_rows} have no finished output yet "
                "(a shard still running or failed?)")
        sc.gone = _scene_gone(sc)
        if sc.gone:
            sc.notes.append(sc.gone)
        elif changed := _scene_changed(sc):
            sc.notes.append(changed)
            log(f"warning: collect: {d.name}: {changed}")
        scenes.append(sc)
    _say_gone(scenes, log)
    scenes, twice = _once_per_scene_file(scenes)
    skipped += twice + _in_staging(out)
    for p in skipped:
        log(f"collect: skipped {p['unit']}: {p['reason']}")
    return scenes, skipped


def _scene_units(d: Path, skipped: list[dict], log: Callable[[str], None]) -> _Scene | None:
    """A scene folder's finished units: its whole-scene output, or its row parts where there is
    none, or where all of them were finished after it (a sharded rerun with --overwrite)."""
    sc = _Scene(d.name)
    whole = _complete(d)
    parts = sorted(p for p in d.iterdir() if layout.PART_RE.fullmatch(p.name) and p.is_dir())
    done: list[_Unit] = []
    for p in parts:
        m = _complete(p)
        if m is None:
            if whole is None:
                skipped.append({"unit": f"{d.name}/{p.name}", "reason": "no complete run.json / tiles.parquet"})
            continue
        r = m.get("rows") or [0, 0]
        done.append(_Unit(p, d.name, f"{d.name}/{p.name}", m, (int(r[0]), int(r[1]))))
    if whole is not None and _newer_and_whole(done, whole):
        sc.units = done
        sc.notes.append("the whole-scene output was finished before its row parts, which cover the scene: the row "
                        "parts are used")
        log(f"collect: {d.name}: its row parts were finished after the whole-scene output beside them and cover "
            "the scene: collecting the row parts (remove the folder's own outputs, or the parts, to keep one set)")
    elif whole is not None:
        r = whole.get("rows") or [0, 0]
        sc.units = [_Unit(d, d.name, d.name, whole, (int(r[0]), int(r[1])))]
        if parts:
            sc.notes.append(f"{len(parts)} row part(s) ignored: the whole-scene output is used")
            log(f"collect: {d.name}: a whole-scene output exists; ignoring {len(parts)} row part(s) beside it")
    else:
        if (d / MANIFEST).exists():
            skipped.append({"unit": d.name, "reason": _why_unfinished(d)})
        sc.units = done
    if not sc.units:
        if not parts and not (d / MANIFEST).exists():
            skipped.append({"unit": d.name, "reason": "no finished output in this folder"})
        return None
    sc.units.sort(key=lambda u: u.rows)
    return sc


def _newer_and_whole(parts: list[_Unit], whole: dict) -> bool:
    """Whether finished row parts were all finished after the whole-scene output and cover every tile row."""
    if not parts or any(str(u.manifest.get("finished_at", "")) <= str(whole.get("finished_at", "")) for u in parts):
        return False
    return _covers(parts, gaps=False)


def _covers(parts: list[_Unit], gaps: bool = True) -> bool:
    """Whether the row parts hold every tile row of their scene, each once (``gaps`` False: overlaps allowed)."""
    n_rows = _n_rows(parts[0].folder, parts[0].manifest)
    rows = sorted(u.rows for u in parts)
    return n_rows is not None and rows[0][0] == 0 and rows[-1][1] >= n_rows and all(
        (b[0] == a[1]) if gaps else (b[0] <= a[1]) for a, b in zip(rows, rows[1:]))


def _newest_set(sc: _Scene, log: Callable[[str], None]) -> None:
    """Of row parts made in several runs (another version of the scene file, another shard
    count, other settings), the set of the run finished last where it covers the scene alone:
    it is collected, the others named as ignored."""
    runs: dict[tuple, list[_Unit]] = {}
    for u in sc.units:
        runs.setdefault((json.dumps(u.manifest.get("scene_version"), sort_keys=True), _shaping(u.manifest)), []).append(u)
    if len(runs) < 2:
        return
    ends = {k: max(str(u.manifest.get("finished_at", "")) for u in us) for k, us in runs.items()}
    last = max(ends, key=ends.get)
    if list(ends.values()).count(ends[last]) > 1 or not _covers(runs[last]):
        return
    stale = [u.key for u in sc.units if u not in runs[last]]
    sc.units = sorted(runs[last], key=lambda u: u.rows)
    sc.notes.append(f"row parts of earlier runs ignored ({', '.join(stale)}): the newest set covers the scene")
    log(f"collect: {sc.name}: the row parts finished last cover the scene; ignoring {len(stale)} of earlier runs "
        f"({', '.join(stale[:4])}{', ...' if len(stale) > 4 else ''}; remove them to keep one set)")


def _check_parts(sc: _Scene, d: Path) -> None:
    """Refuse row parts that do not make one scene (other scene files, versions of the file,
    configs or models; overlapping rows), and note the tile rows none of them holds."""
    shaping = {_shaping(u.manifest) for u in sc.units}
    paths = {u.manifest.get("scene") for u in sc.units}
    versions = {json.dumps(u.manifest.get("scene_version"), sort_keys=True) for u in sc.units}
    if len(shaping) > 1 or len(paths) > 1:
        sc.refused = InputError(
            "its row parts come from different scenes, configs or models "
            f"({', '.join(u.key for u in sc.units)}); remove the stale ones or rerun with --overwrite",
            path=str(d))
    elif len(versions) > 1:
        sc.refused = InputError(
            "its row parts were made from different versions of the scene file (its size or modification time "
            f"changed between them: {', '.join(u.key for u in sc.units)}); rerun the job with --update, which "
            "makes again the parts of the older version, then collect", path=str(d))
    for a, b in zip(sc.units, sc.units[1:]):
        if b.rows[0] < a.rows[1] and sc.refused is None:
            sc.refused = InputError(
                f"row parts {a.key} and {b.key} overlap (tile rows {a.rows} and {b.rows}): they come "
                "from sharded runs with different shard counts; remove one set", path=str(d))
    sc.n_rows = _n_rows(sc.units[0].folder, sc.units[0].manifest)
    if sc.n_rows is not None:
        edge = 0
        for u in sc.units:
            if u.rows[0] > edge:
                sc.missing_rows.append((edge, u.rows[0]))
            edge = max(edge, u.rows[1])
        if edge < sc.n_rows:
            sc.missing_rows.append((edge, sc.n_rows))


def _say_gone(scenes: list[_Scene], log: Callable[[str], None]) -> None:
    """A warning per scene whose file is gone; one line where none is there (outputs moved to another machine)."""
    gone = [sc for sc in scenes if sc.gone]
    if len(gone) > 1 and len(gone) == len(scenes):
        log(f"warning: collect: none of the {len(gone)} scene files (or STAC documents) is where its run.json says "
            "(the outputs were moved to another machine, or the scenes moved): their outputs are collected as they were")
        return
    for sc in gone:
        log(f"warning: collect: {sc.name}: {sc.gone}")


def _scene_gone(sc: _Scene) -> str | None:
    """Why a scene's outputs may be stale: its local scene file, or the local STAC document that
    named it (a STAC item's ``scene`` is ``DOCUMENT#ID``, not a file), is no longer where it was read."""
    m = sc.units[0].manifest
    source = m.get("source") or {}
    stac = source.get("kind") == "stac"
    scene = str((source.get("document") if stac else m.get("scene")) or "")
    if not scene or "://" in scene or os.path.exists(scene):
        return None
    return (f"its {'STAC document' if stac else 'scene file'} {scene} is gone (moved, renamed or deleted): its outputs "
            "are collected as they were; remove this folder to leave them out")


def _scene_changed(sc: _Scene) -> str | None:
    """Why a scene's outputs may be stale: its local scene file's size or modification time is
    not what its outputs were made from."""
    version = sc.units[0].manifest.get("scene_version") or {}
    scene = str(sc.units[0].manifest.get("scene") or "")
    try:
        st = os.stat(scene)
    except (OSError, ValueError):
        return None
    if "size" not in version or (st.st_size, st.st_mtime_ns) == (version.get("size"), version.get("mtime_ns")):
        return None
    return (f"its scene file {scene} changed since its outputs were made (its size or modification time): they "
            "are collected as they were; rerun the job with --update to make them again")


def _once_per_scene_file(scenes: list[_Scene]) -> tuple[list[_Scene], list[dict]]:
    """One folder per scene file: of folders made from the same file (done again under another
    name), the one finished last; the others are skipped, so no tile is counted twice."""
    def file(sc: _Scene) -> str:
        return str(sc.units[0].manifest.get("scene"))

    def finished(sc: _Scene) -> str:
        return max(str(u.manifest.get("finished_at", "")) for u in sc.units)

    newest: dict[str, _Scene] = {}
    for sc in scenes:
        if file(sc) not in newest or finished(sc) > finished(newest[file(sc)]):
            newest[file(sc)] = sc
    kept = [sc for sc in scenes if newest[file(sc)] is sc]
    return kept, [{"unit": sc.name, "reason": f"the same scene file ({file(sc)}) as {newest[file(sc)].name}, which was "
                   "finished later and is collected: remove the folder you do not want"}
                  for sc in scenes if newest[file(sc)] is not sc]


def _in_staging(out: Path) -> list[dict]:
    """Units in OUT's staging area: being written by a run (collect may run beside it), or left
    by one that was killed; not collected, and said so (a scene's unit name, or SCENE/rows-…)."""
    try:
        entries = sorted(e.name for e in (out / layout.STAGING).iterdir())
    except OSError:
        return []
    units = [u for u in map(layout.unit_of_slot, entries) if u is not None]
    return [{"unit": u, "reason": "not finished: being written by a run, or left by one that was stopped "
                                  f"(in {layout.STAGING})"} for u in units]


def shards_disagree(listed: list) -> str | None:
    """Why the shards of one run may have missed scenes: their reports' ``scenes_listed``
    (count and hash of the scenes each listed when it started) differ, as when scenes were
    added to or removed from the input between the shards' starts. None when they agree."""
    seen = {(x.get("count"), x.get("sha256")) for x in listed if isinstance(x, dict)}
    if len(seen) < 2:
        return None
    return (f"the shards of the latest run listed different scenes ({', '.join(sorted(str(c) for c, _ in seen))}): "
            "the input changed while they ran, or each was given other scenes (each took its share of "
            "them: run each with --shard 0/1 to do all it is given), and a scene may have been done by none")


def one_legend(scenes: list[_Scene], out: Path) -> None:
    """Refuse, before anything is written, scenes classified in more than one legend (models of
    other classes: one table holds one legend), naming each legend's models and scenes."""
    by: dict[tuple, dict] = {}
    legend_of: dict[str, tuple] = {}  # a model's sha256 -> its classes: one table's footer read per model
    for sc in scenes:
        sha = (sc.units[0].manifest.get("model") or {}).get("sha256") or str(sc.units[0].folder)  # none: its own
        if sha not in legend_of:
            try:
                meta = pq.read_schema(sc.units[0].folder / "tiles.parquet").metadata[b"tilescan"]
                legend_of[sha] = tuple(json.loads(meta)["classes"])
            except (OSError, KeyError, ValueError, TypeError):
                continue  # an unreadable table: the build names it
        group = by.setdefault(legend_of[sha], {"models": set(), "scenes": []})
        group["models"].add(str((sc.units[0].manifest.get("model") or {}).get("id")))
        group["scenes"].append(sc.name)
    if len(by) > 1:
        said = "; ".join(f"{some(list(c), 4)} (model {', '.join(sorted(g['models']))}): scenes {some(g['scenes'])}"
                         for c, g in by.items())
        raise InputError(f"holds scenes classified in {len(by)} legends ({said}); one collected table holds one legend: "
                         "run each model into an output folder of its own (a finished scene's folder may be moved "
                         "into another one), then collect each", path=str(out))


def say_models(scenes: list[_Scene], log: Callable[[str], None]) -> None:
    """A warning when the scenes were classified by more than one model (of one legend: others are refused)."""
    by: dict[tuple, list[str]] = {}
    for sc in scenes:
        m = sc.units[0].manifest.get("model") or {}
        by.setdefault((m.get("id"), str(m.get("sha256"))[:12]), []).append(sc.name)
    if len(by) > 1:
        said = "; ".join(f"{mid} ({sha}): {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                         for (mid, sha), names in by.items())
        log(f"warning: collect: the scenes were classified by {len(by)} models of the same classes ({said}): the "
            "table and summary count their labels together (each scene's model is in summary.json)")


def results_alike(manifest: dict) -> int:
    """The results version a run.json's outputs count as: its own, or this release's where this
    release gives the same results for their scene (version 2's but for a scene stored south-up
    or east-left, whose tiles version 3 turns north-up for the model)."""
    from affine import Affine

    from .quicklook import north_up_flip

    made_by, t = layout.results_version(manifest), (manifest.get("scene_info") or {}).get("transform")
    if made_by == 2 and layout.RESULTS_VERSION == 3 and isinstance(t, list) and len(t) == 6:
        with contextlib.suppress(TypeError, ValueError):
            return 3 if not any(north_up_flip(Affine(*map(float, t)))) else made_by
    return made_by


def say_results_versions(scenes: list[_Scene], log: Callable[[str], None]) -> None:
    """A warning when scenes were made by a tilescan whose results may differ from this one's for
    the same settings and model (run.json's ``results_version``; none: 1)."""
    def made_by(sc: _Scene) -> int:
        return min((results_alike(u.manifest) for u in sc.units), default=1)

    def few(names: list[str]) -> str:
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    now = layout.RESULTS_VERSION
    earlier = [sc.name for sc in scenes if made_by(sc) < now]
    later = [sc.name for sc in scenes if made_by(sc) > now]
    if earlier:
        log(f"warning: collect: {len(earlier)} scene(s) were made by an earlier tilescan, whose results for the same "
            f"settings and model may differ from this one's ({few(earlier)}): the table holds them as they are; "
            "`tilescan run --update` with this one redoes them")
    if later:
        log(f"warning: collect: {len(later)} scene(s) were made by a later tilescan ({few(later)}): collect them "
            "with that release")


def changed_settings(was: dict, now: dict, classes: Sequence[str] | None = None) -> list[str]:
    """The settings that shape outputs (``[tiling]``, ``[cam]``, ``[output]`` but
    :data:`RERUN_KEYS`, the precision) that differ from resolved config ``was`` to ``now``
    (run.json's ``config``), as ``[tiling] stride 0 (the tile size) -> 64``; a key ``was``
    lacks (an older release's) is taken as the same, and so are values alike (:func:`settings_alike`;
    ``classes``: the model's, for the target class)."""
    def said(key, value) -> str:
        """A value as the message shows it: a stride of 0 is the tile size, no bands the automatic pick."""
        if key == "stride" and not value:
            return "0 (the tile size)"
        return "[] (the automatic pick)" if key == "bands" and not value else repr(value)

    shaping = {sec: now.get(sec) or {} for sec in ("tiling", "cam", "output")}
    shaping["inference"] = {"precision": (now.get("inference") or {}).get("precision", "float32")}
    return [f"[{sec}] {key} {said(key, was.get(sec, {}).get(key))} -> {said(key, value)}"
            for sec, values in shaping.items() for key, value in values.items()
            if key not in RERUN_KEYS
            and not settings_alike(sec, key, (was.get(sec) or {}).get(key, value), value, now, classes)]


def settings_alike(sec: str, key: str, was, value, now: dict, classes: Sequence[str] | None) -> bool:
    """Whether two values of a setting give the same outputs: a nodata written two ways (0 and
    0.0), a target class by name or index, any quicklook size where none is made."""
    if was == value:
        return True
    try:
        if (sec, key) == ("tiling", "nodata"):
            return nodata_key(was) == nodata_key(value)
        if (sec, key) == ("cam", "target_class") and classes:
            return resolve_target(was, classes) == resolve_target(value, classes)
    except (ValueError, TypeError, ConfigError):  # not a value of the setting, or a class the model lacks
        return False
    return (sec, key) == ("output", "quicklook_size") and (now.get("output") or {}).get("quicklook") is False


def made_otherwise(manifest: dict, config: dict, model_sha: str | None, results: int | None = None) -> str | None:
    """How a finished unit (its run.json) was made otherwise than a run with resolved
    ``config`` and model (and ``results`` version, where its report says) would make it, or
    None: settings that give the same outputs (a stride of the tile size or 0, the bands as the
    automatic pick read them, ``allow_pixel_space`` for a scene with a CRS) are the same."""
    was, now = (json.loads(json.dumps(c)) for c in (manifest.get("config") or {}, config))
    info = manifest.get("scene_info") or {}
    _as_read(was.setdefault("tiling", {}), info)
    _as_read(now.setdefault("tiling", {}), info, now["tiling"].get("bands"))  # the automatic pick: as it read them
    if changed := changed_settings(was, now, (manifest.get("model") or {}).get("classes")):
        return "made with other settings (" + ", ".join(changed) + ")"
    if model_sha and (manifest.get("model") or {}).get("sha256") not in (None, model_sha):
        return f"made with another model ({(manifest.get('model') or {}).get('id')})"
    if isinstance(results, int) and (made_by := results_alike(manifest)) < results:
        return f"made by an earlier tilescan (results version {made_by}; the run's {results})"
    return None


def stopped_before_redoing(reports: list[tuple[str, dict]], collected: dict[str, dict]) -> list[dict]:
    """The units a stop kept the latest run (its reports, ``(file name, contents)``) from
    redoing whose collected outputs (``collected``: key -> run.json) that run would not have
    kept: made with other settings, another model or by an earlier release (an interrupted ``--update``)."""
    out: list[dict] = []
    for name, data in reports:
        stopped, config = data.get("interrupted") or {}, data.get("config")
        if not isinstance(config, dict):  # a report of a release that did not record its settings
            continue
        for unit in [*(stopped.get("units") or []), *(stopped.get("not_started") or [])]:
            for key in (k for k in collected if covered(k, {unit})):  # its own output, its scene's, its row bands
                if why := made_otherwise(collected[key], config, (data.get("model") or {}).get("sha256"),
                                         data.get("results_version")):
                    out.append({"unit": unit, "scene": None, "error_kind": "interrupted", "report": name, "made": why,
                                "reason": f"its run was stopped by {stopped.get('signal')} before redoing it: the "
                                          f"outputs collected ({key}) were {why}"})
                    break
    return out


def covered(unit, collected: set[str]) -> bool:
    """Whether a run's unit is in the collected set: a row band (``SCENE/rows-…``) itself or its
    scene's whole-scene output (whose key is the scene's name); a whole scene from either."""
    scene, _, part = str(unit).partition("/")
    if part:
        return unit in collected or scene in collected
    return scene in collected or any(k.startswith(scene + "/") for k in collected)


def unfinished_in_run(reports: list[tuple[str, dict]], collected: set[str]) -> list[dict]:
    """What the latest run's reports (``(file name, contents)``) say it left undone and is not
    collected: units a stop (SIGTERM, a time limit) dropped or never started, reports of a run
    that had not ended (still running, or killed) or that ended with an error, the shards
    of ``N`` with no report at all (not run yet), and shards that listed different scenes (a
    scene may have been done by none). summary.json's ``unfinished_in_run``."""
    out: list[dict] = []
    if why := shards_disagree([data.get("scenes_listed") for _, data in reports]):
        out.append({"unit": None, "report": ", ".join(name for name, _ in reports), "why": why})
    shards: set[tuple[int, int]] = set()
    for name, data in reports:
        if isinstance(shard := data.get("shard"), list) and len(shard) == 2:
            shards.add((int(shard[0]), int(shard[1])))
        if data.get("running"):
            out.append({"unit": None, "report": name, "why": f"its run had not ended (pid {data.get('pid')} on "
                        f"{data.get('host')}: still running, or killed)"})
        if isinstance(error := data.get("error"), dict):  # a run that ended before its scenes (a setting, the model)
            out.append({"unit": None, "report": name, "why": f"its run ended with an error (exit {data.get('exit_code')}, "
                        f"{error.get('kind')}): {error.get('message')}"})
        stopped = data.get("interrupted") or {}
        for unit in [*(stopped.get("units") or []), *(stopped.get("not_started") or [])]:
            if not covered(unit, collected):
                out.append({"unit": unit, "report": name, "why": f"its run was stopped by {stopped.get('signal')}"})
    for n in {n for _, n in shards if n > 1}:
        for i in sorted(set(range(n)) - {k for k, m in shards if m == n}):
            out.append({"unit": None, "report": layout.report_name((i, n)),
                        "why": f"no report of shard {i}/{n}: it has not run (or its start failed before one)"})
    return out


#: How a run says that the outputs in a scene's way are another scene file's (``pipeline.made.what_differs``).
OTHER_FILE = "of another scene file of the same name"


def run_failures(out: Path, collected: dict[str, dict], log: Callable[[str], None]) -> tuple[list[dict], list[dict], list[dict]]:
    """The units the latest ``report*.json`` of ``out`` list as failed: those with no finished
    output (summary.json's ``failed_in_run``: the set looks incomplete), and those collected from
    an earlier run's outputs, maybe out of date (``earlier_outputs``, with the units a stop kept
    the run from redoing); what the run left undone (``unfinished_in_run``: stopped, still
    running, shards not run); shards that listed other scenes. ``collected``: key -> run.json."""
    found: dict[str, dict] = {}
    read: list[tuple[str, dict]] = []
    for report in latest_reports(out):
        try:
            failed = (data := json.loads(report.read_text())).get("failed") or []
        except (OSError, ValueError, AttributeError):
            continue  # a report being written, or not tilescan's: the run's log has it
        read.append((report.name, data))
        for f in failed:
            if isinstance(f, dict):
                found[f.get("unit")] = {k: f.get(k) for k in ("unit", "scene", "error_kind", "reason", "outputs_in")
                                        if k != "outputs_in" or f.get(k)} | {"report": report.name}
    if undone := unfinished_in_run(read, collected):
        why: dict[str, list] = {}  # the units (or reports) of each reason, in the order they came
        for u in undone:
            why.setdefault(u["why"], []).append(u["unit"] or u["report"])
        said = "; ".join(f"{some(names, 5)}: {reason}" for reason, names in why.items())
        log(f"warning: collect: the latest run left work undone that the collected set may lack: {said} (rerun the "
            "job: what is finished is skipped; then collect again; summary.json's unfinished_in_run)")
    units = sorted(found, key=str)
    # refused as an earlier tilescan's outputs of it are under another name: collected from there
    renamed = [found[k] for k in units if found[k].get("outputs_in") in collected]
    if renamed:
        log(f"warning: collect: {len(renamed)} scene(s) are collected from the folder an earlier tilescan named them "
            "by, which the latest run left as it was (" + some([f"{u['unit']}: {u['outputs_in']}" for u in renamed], 5, "; ")
            + "): move each to its new name as the run said, then rerun; summary.json's earlier_outputs")
        units = [k for k in units if found[k] not in renamed]
    missing = [found[k] for k in units if not covered(k, collected)]
    earlier = [found[k] for k in units if covered(k, collected)]
    # refused as another file's outputs hold its name: the collected rows are that file's, not this one's
    elsewhere = [u | {"collected_scene": _collected_scene(u["unit"], collected)} for u in earlier
                 if u.get("error_kind") == "exists" and OTHER_FILE in str(u.get("reason"))]
    if elsewhere:
        earlier = [u for u in earlier if u["unit"] not in {e["unit"] for e in elsewhere}]
        log(f"warning: collect: {len(elsewhere)} scene file(s) are not in the collected set: the latest run refused "
            "them, as outputs of another scene file of the same name are in their place, and those are collected ("
            + some([f"{u['scene']}: the rows of {u['unit']} are {u['collected_scene']}'s" for u in elsewhere], 5, "; ")
            + "): rename the file, or see the run's advice in summary.json's failed_in_run")
    refused = [u for u in earlier if u.get("error_kind") == "exists"]  # kept on purpose: said so, not "failed"
    for listed, what, key in (
            (missing, "failed in their run and are not in the collected set", "failed_in_run"),
            ([u for u in earlier if u not in refused], "failed in their run and are collected from an earlier "
             "run's outputs, which may be out of date", "earlier_outputs"),
            (refused, "are collected from the outputs the latest run refused to replace (made with other settings, "
             "another model, another version of the scene file or another tilescan: see the run's advice)",
             "earlier_outputs")):
        if listed:
            log(f"warning: collect: {len(listed)} scene(s) {what} "
                f"({some([u['unit'] for u in listed], 5)}; see summary.json's {key})")
    if stale := stopped_before_redoing(read, collected):
        log(f"warning: collect: {len(stale)} scene(s) the latest run was stopped before redoing are collected from "
            f"outputs made otherwise ({some([str(u['unit']) + ': ' + u['made'] for u in stale], 5, '; ')}): rerun the job, then "
            "collect again; summary.json's earlier_outputs")
    return missing + elsewhere, renamed + earlier + stale, undone


def _collected_scene(unit, collected: dict[str, dict]) -> str | None:
    """The scene file (run.json's ``scene``) of a unit's collected outputs, its own or its row
    bands'; None when not known."""
    for key in (str(unit), *(k for k in collected if k.startswith(f"{unit}/"))):
        if isinstance(manifest := collected.get(key), dict) and manifest.get("scene"):
            return manifest["scene"]
    return None


def latest_reports(out: Path) -> list[Path]:
    """The reports of the latest run: ``report.json``, or the shard reports of one shard count
    (``report-shard-I-of-N.json``, layout.report_name's), whichever was written last; an
    earlier run's, of another shard count, no longer speaks for the scenes."""
    runs: dict[str, list[Path]] = {}
    for report in [out / REPORT, *sorted(out.glob("report-shard-*-of-*.json"))]:
        if report.is_file():
            runs.setdefault(report.name.rpartition("-of-")[2] if report.name != REPORT else "", []).append(report)

    def written(run: str) -> float:
        return max(r.stat().st_mtime for r in runs[run])

    return runs[max(runs, key=written)] if runs else []
