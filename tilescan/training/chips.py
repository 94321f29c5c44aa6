"""``tilescan chips``: a training dataset from scenes and labels drawn over them in a GIS.

Chips are the tiles ``tilescan run`` would classify: each scene is opened through the
(parent) model exactly as ``run`` opens it (:meth:`tilescan.model.LoadedModel.open_scene`:
the same band pick, per-scene scaling, tile size in pixels or metres, resampling to the
model's ground scale, the same grid), and a chip is the array ``SceneReader.read_batch``
returns for a grid tile, stored as a lossless PNG at the model input size (x 255, rounded).

Which tiles become chips of which class: :mod:`tilescan.training.chip_tiles`.

Output (``DATASET``, the folder-per-class layout ``tilescan train`` and ``evaluate`` read):
``images/<class>/<scene>_r<row>_c<col>.png``, ``classes.txt``, ``splits/{train,val,test}.txt``
(see :mod:`tilescan.training.splits`), ``chips.parquet`` (GeoParquet: each chip's scene, window,
footprint in the labels' CRS, class, cover, split and block) and ``chips.json`` (the card:
labels file and hash, model and tiling, per-scene plan and counts, split counts). The
dataset is built in a hidden folder beside ``DATASET`` and renamed into place when whole.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import socket
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import __version__
from ..config import TilingConfig
from ..errors import ConfigError, InputError, OutputError, OutputExistsError
from ..log import catching_warnings, emit
from ..outputs.files import make_folder
from ..outputs.geometry import pyproj_crs
from .chip_tiles import SKIP_REASONS, _cut_scene, _polygons, _transform_corners
from .labels import Labels, crs_name, read_labels
from .splits import SPLITS, assign, auto_block_m, format_counts

CHIPS_FORMAT = "tilescan-chips/1"
CARD = "chips.json"
TABLE = "chips.parquet"


@dataclass(frozen=True)
class ChipOptions:
    min_cover: float = 0.9
    """Share of a tile one class must cover (polygons) for the tile to be a chip."""
    min_valid: float = 0.95
    """Share of a tile that must be valid scene data (not nodata, inside the scene)."""
    split: str = "blocks"
    """``blocks``, ``scene``, ``random`` or ``test`` (all chips in test: a scoring set)."""
    block_m: float | None = None
    """Block edge in metres for ``blocks``; None: four tile footprints."""
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 20261126

    def check(self) -> None:
        for name in ("min_cover", "min_valid"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} ({name} from Python) must be in (0, 1], got {v}")
        if self.split not in ("blocks", "scene", "random", "test"):
            raise ConfigError(f"--split (split from Python) must be blocks, scene, random or test, got {self.split!r}")
        if self.block_m is not None and not self.block_m > 0:
            raise ConfigError(f"--block-size (block_m from Python) must be > 0 metres, got {self.block_m}")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ConfigError(f"--val-fraction and --test-fraction (val_fraction, test_fraction from Python) must be in [0, 1) and sum below 1, "
                              f"got {self.val_fraction} and {self.test_fraction}")


# ---------------------------------------------------------------------------- the dataset


def _warn_what_train_refuses(card: dict, log: Callable[[str], None]) -> None:
    """Say at once what ``train`` would refuse of this dataset (chips of one class only, no val
    chips), and splits that would score little (val or test chips of one class, no test chips)."""
    counts = card.get("split", {}).get("counts", {})
    classes = sorted({c for per in counts.values() for c, n in per.items() if n})
    if len(classes) < 2:
        log(f"warning: the chips hold one class ({', '.join(classes)}): train needs two or more (label another class)")
    elif card["split"].get("method") != "test" and not sum(counts.get("val", {}).values()):
        frac = card["split"].get("val_fraction", 0)
        log("warning: no chip is in val: train needs val chips (" + (
            f"{sum(sum(per.values()) for per in counts.values())} chips at --val-fraction {frac:g} gave none: label "
            "more, or raise --val-fraction)" if frac > 0 else "cut again with a --val-fraction above 0)"))
    for name in ("val", "test") if len(classes) > 1 else ():  # a split that scores one class says little
        held = sorted(c for c, n in counts.get(name, {}).items() if n)
        if name == "test" and not held and card["split"].get("test_fraction", 0) > 0:
            log("warning: no chip is in test, though a test fraction was asked for: evaluate has nothing to score "
                "(more labels, or a smaller --block-size, spread chips over the splits)")
        elif len(held) == 1:
            log(f"warning: the {name} chips are all of one class ({held[0]}) of {len(classes)}: scores on them say "
                "little of the others (more labels, a smaller --block-size or --split random spread the classes)")


def _block_frame(scene_crs: Sequence, centres_lonlat: np.ndarray):
    """The CRS the blocks are laid in: the scenes' own when they share one projected CRS
    in metres, else an azimuthal equidistant one centred on the chips (whole degrees)."""
    import pyproj

    crs = [pyproj_crs(c) for c in scene_crs]
    first = crs[0]
    if all(c == first for c in crs) and first.is_projected and \
            all(a.unit_name in ("metre", "meter") for a in first.axis_info[:2]):
        return first
    lon, lat = np.round(np.nanmean(centres_lonlat, axis=0)).astype(int) if len(centres_lonlat) else (0, 0)
    return pyproj.CRS.from_proj4(f"+proj=aeqd +lat_0={int(lat)} +lon_0={int(lon)} +datum=WGS84 +units=m +no_defs")


def _write_table(path: Path, table_rows: dict[str, list], corners: np.ndarray, crs, meta: dict) -> None:
    """chips.parquet: GeoParquet 1.1 with the footprints (WKB polygons) in ``crs``."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..outputs.files import atomic_output
    from ..outputs.geometry import bbox_column, extent, geo_metadata, wkb_polygons

    pj = pyproj_crs(crs)
    corners = corners.reshape(-1, 4, 2)
    geo = geo_metadata(None if pj is None else pj.to_json_dict(), extent(corners))
    arrays = {
        "chip": pa.array(table_rows["chip"], pa.string()),
        # the legend's order, as tiles.parquet's label: a category's code is its class index
        "class": pa.DictionaryArray.from_arrays(pa.array(table_rows["class_index"], pa.int32()),
                                                pa.array(meta["classes"], pa.string())),
        "class_index": pa.array(table_rows["class_index"], pa.int16()),
        "split": pa.array(table_rows["split"], pa.string()).dictionary_encode(),
        "block": pa.array(table_rows["block"], pa.string()),
        "scene": pa.array(table_rows["scene"], pa.string()).dictionary_encode(),
        "row": pa.array(table_rows["row"], pa.int32()),
        "col": pa.array(table_rows["col"], pa.int32()),
        "col_off": pa.array(table_rows["col_off"], pa.int32()),
        "row_off": pa.array(table_rows["row_off"], pa.int32()),
        "width": pa.array(table_rows["width"], pa.int32()),
        "height": pa.array(table_rows["height"], pa.int32()),
        "input_gsd_m": pa.array(table_rows["input_gsd_m"], pa.float64()),
        "valid_fraction": pa.array(table_rows["valid_fraction"], pa.float32()),
        "cover": pa.array(table_rows["cover"], pa.float32()),
        "label_fids": pa.array(table_rows["label_fids"], pa.list_(pa.int64())),
        "geometry": wkb_polygons(corners),
        "bbox": bbox_column(corners),
    }
    table = pa.table(arrays)
    table = table.replace_schema_metadata({b"geo": json.dumps(geo).encode(), b"tilescan": json.dumps(meta).encode()})
    with atomic_output(path) as tmp:
        pq.write_table(table, str(tmp), compression="zstd")


def _remove_orphans(out: Path) -> None:
    """Remove the staging folders of ``out`` that processes of this machine left when they
    were killed outright (SIGKILL, a lost node): their process is gone. Another machine's,
    or a live one's, are left alone."""
    prefix = f".{out.name}.partial-{socket.gethostname()}-"
    for stage in out.parent.glob(f"{glob.escape(prefix)}*"):
        pid = stage.name[len(prefix):]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stage, ignore_errors=True)
        except OSError:  # alive, someone else's
            pass


def _prepare_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise OutputError("exists and is not a folder", path=str(out))
    if out.is_dir() and any(out.iterdir()):
        if read_card(out) is None:  # --overwrite replaces a chips dataset, never some other folder
            raise OutputExistsError("is not empty and not a tilescan chips dataset (no chips.json): it is not replaced, "
                                    "even with --overwrite; choose another folder", path=str(out))
        if not overwrite:
            raise OutputExistsError("the dataset folder exists and is not empty; pass --overwrite to replace it", path=str(out))
    make_folder(out.parent)
    _remove_orphans(out)
    try:
        stage = out.parent / f".{out.name}.partial-{socket.gethostname()}-{os.getpid()}"
        if stage.exists():
            shutil.rmtree(stage)
        (stage / "images").mkdir(parents=True)
        (stage / "splits").mkdir()
    except OSError as exc:
        raise OutputError(f"cannot create the dataset folder: {exc.strerror or exc}", path=str(out)) from None
    return stage


def cut_chips(
    inputs: Sequence[str | os.PathLike],
    labels_path: str | os.PathLike,
    out: str | os.PathLike,
    tiling: TilingConfig | None = None,
    *,
    class_field: str | None = None,
    layer: str | None = None,
    model_path: str | os.PathLike | None = None,
    opts: ChipOptions = ChipOptions(),
    overwrite: bool = False,
    log: Callable[[str], None] = emit,
) -> dict:
    """Build the chips dataset ``out`` from the scenes in ``inputs`` (files or folders) and
    the labels file; returns the card (also written as ``out/chips.json``)."""
    from .. import layout
    from ..model import describe_model
    from ..outputs.files import write_json
    from ..scene.info import TilingWarning, find_scenes

    opts.check()
    tiling = tiling or TilingConfig()
    out = Path(out)
    scenes = find_scenes(inputs)
    card = describe_model(model_path)
    if card.num_bands != 3:
        raise ConfigError(f"the model takes {card.num_bands} bands; chips are RGB PNGs for 3-band models", path=card.path)
    with catching_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels = read_labels(labels_path, class_field, layer)
    for w in caught:
        log(f"warning: {w.message}")
    log(f"{labels.path.name}: {labels.n_features} features, {labels.usable} usable (a polygon or point with a class in "
        f"'{labels.class_field}'; {len(labels.classes)} classes: {', '.join(labels.classes)})"
        + (f"; left out: {', '.join(f'{len(ids)} {k} ({_features_named(ids)})' for k, ids in labels.dropped_fids.items())}"
           if labels.dropped else ""))
    stage = _prepare_out(out, overwrite)
    try:
        result = _build(scenes, labels, card, tiling, opts, stage, layout.scene_folder_names(scenes), log, TilingWarning)
        _warn_what_train_refuses(result, log)
        write_json(stage / CARD, result)
        try:
            if out.exists():
                aside = out.parent / f".{out.name}.old-{os.getpid()}"
                os.replace(out, aside)
                shutil.rmtree(aside)
            os.replace(stage, out)
        except OSError as exc:
            raise OutputError(f"cannot move the dataset into place: {exc.strerror or exc}", path=str(out)) from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log(f"wrote {result['chips']['total']} chips of {len(result['classes'])} classes to {out}")
    return result


def _build(scenes: list[Path], labels: Labels, card, tiling: TilingConfig, opts: ChipOptions, stage: Path,
           keys: list[str], log: Callable[[str], None], tiling_warning) -> dict:
    """Cut the chips of every scene into ``stage``, split them, write the lists and the table; returns the card."""
    inside = np.zeros(len(labels.geoms), dtype=bool)
    used = np.zeros(len(labels.geoms), dtype=bool)
    rows: list[dict] = []
    scene_cards: list[dict] = []
    scene_crs: list = []
    for si, (scene, key) in enumerate(zip(scenes, keys)):
        scene_rows, scene_card, crs = _cut_one_scene(scene, key, si, labels, card, tiling, opts, stage, inside, used,
                                                     log, tiling_warning)
        rows += scene_rows
        scene_crs.append(crs)
        scene_cards.append(scene_card)
    outside, idle = _check_labels_used(labels, inside, used, rows, scene_cards, len(scenes), opts, log)
    classes, gone, y = _legend(rows, labels, log)
    names = np.array([r["chip"] for r in rows], dtype=object)
    scene_idx = np.array([r["scene_index"] for r in rows])
    corners = np.stack([r["corners"] for r in rows])
    res = _split(corners, scene_idx, scene_crs, scene_cards, y, classes, names, opts, log)
    _write_lists(stage, names, res.split, classes)
    out_crs = labels.crs if labels.crs is not None else pyproj_crs(scene_crs[0])
    table_corners = _corners_in(corners, scene_idx, scene_crs, out_crs)
    kept = res.split != ""
    table = _chip_table(rows, classes, y, res, opts, scene_cards, scene_idx, kept)
    gsd = [r["input_gsd_m"] for r, keep in zip(rows, kept) if keep and r["input_gsd_m"]]
    model_scale = card.scale_range
    result = {
        "format": CHIPS_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tilescan_version": __version__,
        "classes": classes,
        "labels": {
            "file": labels.path.name, "sha256": labels.sha256, "layer": labels.layer, "class_field": labels.class_field,
            "crs": crs_name(labels.crs), "features": labels.n_features,
            "with_class": labels.n_features - labels.dropped.get("no_class", 0),
            "usable": labels.usable,
            "left_out": labels.dropped, "left_out_fids": labels.dropped_fids, "renamed_classes": labels.renamed,
            "outside_scenes": outside, "without_chip": len(idle), "without_chip_fids": idle, "classes_without_chip": gone,
        },
        "model": {"id": card.model_id, "sha256": card.sha256, "input_size": card.input_size,
                  "bands": list(card.meta.get("bands") or []), "scale_input_gsd_m": list(model_scale) if model_scale else None},
        "tiling": {**dataclasses.asdict(tiling), "min_cover": opts.min_cover, "min_valid": opts.min_valid},
        "input_size": card.input_size,
        "input_gsd_m": [min(gsd), max(gsd)] if gsd else None,
        "within_model_scale": bool(model_scale and gsd and all(model_scale[0] - 1e-9 <= g <= model_scale[1] + 1e-9 for g in gsd)
                                   and len(gsd) == int(kept.sum())),
        "scenes": scene_cards,
        "chips": {"total": int(kept.sum()), "per_class": {c: int(np.count_nonzero(y[kept] == i)) for i, c in enumerate(classes)}},
        "split": {k: v for k, v in res.info.items()},
    }
    _write_table(stage / TABLE, table, table_corners[kept], out_crs,
                 {"classes": classes, "format": CHIPS_FORMAT, "labels": labels.path.name})
    return result


def _cut_one_scene(scene: Path, key: str, si: int, labels: Labels, card, tiling: TilingConfig, opts: ChipOptions,
                   stage: Path, inside: np.ndarray, used: np.ndarray, log: Callable[[str], None], tiling_warning):
    """The chip rows of one scene (opened as ``run`` opens it), its entry in the card and its CRS."""
    with catching_warnings(record=True) as caught:
        warnings.simplefilter("always", tiling_warning)
        reader = card.open_scene(scene, dataclasses.replace(tiling, allow_pixel_space=True))  # refused below, as chips says
    with reader:
        info = reader.info
        if not info.georeferenced or info.crs is None:
            lacks = "no geotransform" if info.transform.is_identity else "no CRS"
            raise InputError(f"the scene has {lacks}: labels are placed by map coordinates, so chips need a "
                             "georeferenced scene", path=str(scene))
        for w in caught:
            if issubclass(w.category, tiling_warning):
                log(f"warning: {w.message}")
        plan = reader.plan
        scale_warning = plan.warning(str(scene))
        if scale_warning:
            log(f"warning: {scale_warning['message']}")
        geoms = labels.in_crs(info.crs)
        scene_rows, counts = _cut_scene(reader, key, labels, geoms, opts, stage / "images", inside, used)
        for r in scene_rows:
            r["scene_index"] = si
            r["input_gsd_m"] = plan.input_gsd_m
        skipped = {r: counts[r] for r in SKIP_REASONS}
        log(f"{scene.name}: {counts['tiles']} tiles of {reader.tile_px} px ({plan.scale}"
            + (f", {plan.input_gsd_m:.3g} m per input pixel" if plan.input_gsd_m else "") + f"): {counts['chips']} chips; "
            + "skipped " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in skipped.items() if n))
        scene_card = {
            "scene": scene.name, "key": key, "path": str(scene), "crs": crs_name(info.crs),
            "size": [info.width, info.height], "gsd_m": info.gsd_m, "bands": list(reader.bands),
            "scaling": [list(s) for s in reader.scale], "tiling": plan.to_dict(),
            "tiles": counts["tiles"], "chips": counts["chips"], "skipped": skipped,
        }
    return scene_rows, scene_card, info.crs


def _features_named(fids: list[int], first: int = 5) -> str:
    """``feature 4`` / ``features 2, 5, 9 …``: feature ids as QGIS shows them, the first few."""
    more = " …" if len(fids) > first else ""
    return f"feature{'s' if len(fids) > 1 else ''} {', '.join(map(str, fids[:first]))}{more}"


def _check_labels_used(labels: Labels, inside: np.ndarray, used: np.ndarray, rows: list[dict],
                       scene_cards: list[dict], n_scenes: int, opts: ChipOptions,
                       log: Callable[[str], None]) -> tuple[int, list[int]]:
    """How many label features lie outside every scene, and the ids of those over them that gave no chip;
    refuses labels that miss every scene and scenes that gave no chip."""
    outside = int(np.count_nonzero(~inside))
    if outside == len(labels.geoms):
        raise InputError(f"none of the {len(labels.geoms)} label features lies over any of the {n_scenes} scene(s): "
                         "check that the labels and scenes show the same place (and the labels' CRS)", path=str(labels.path))
    if outside:
        fids = sorted({int(f) for f in labels.fid[~inside]})
        log(f"warning: {outside} of {len(labels.geoms)} label features lie outside every scene ({_features_named(fids)}); "
            "they gave no chip")
    idle = sorted({int(f) for f in labels.fid[inside & ~used]})
    if idle:
        log(f"note: {len(idle)} label features over the scenes gave no chip ({_features_named(idle)}: a polygon smaller "
            f"than {opts.min_cover:.0%} of a tile, tiles mixed or without enough valid data)")
    if not rows:
        raise InputError("no tile qualified as a chip: " + "; ".join(
            f"{s['scene']}: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in s["skipped"].items() if n)
            for s in scene_cards) + f" (min cover {opts.min_cover:g}, min valid {opts.min_valid:g})", path=str(labels.path))
    return outside, idle


def _legend(rows: list[dict], labels: Labels, log: Callable[[str], None]) -> tuple[list[str], list[str], np.ndarray]:
    """The classes with chips in the labels' order, the classes left out, and each chip's index in that legend."""
    present = sorted({r["cls"] for r in rows})
    gone = [labels.classes[c] for c in range(len(labels.classes)) if c not in present]
    if gone:
        log(f"warning: class(es) {', '.join(map(repr, gone))} gave no chip and are left out of the legend")
    classes = [labels.classes[c] for c in present]
    remap = {c: i for i, c in enumerate(present)}
    return classes, gone, np.array([remap[r["cls"]] for r in rows], dtype=np.int64)


def _corners_in(corners: np.ndarray, scene_idx: np.ndarray, scene_crs: list, dst) -> np.ndarray:
    """Points given in their scene's CRS (``scene_idx`` into ``scene_crs``), transformed to ``dst``."""
    moved = np.zeros_like(corners)
    for si, crs in enumerate(scene_crs):
        m = scene_idx == si
        if m.any():
            moved[m] = _transform_corners(corners[m], pyproj_crs(crs), dst)
    return moved


def _split(corners: np.ndarray, scene_idx: np.ndarray, scene_crs: list, scene_cards: list[dict], y: np.ndarray,
           classes: list[str], names: np.ndarray, opts: ChipOptions, log: Callable[[str], None]):
    """Each chip's split (:func:`tilescan.training.splits.assign`), on the block frame shared by all scenes."""
    lonlat = _corners_in(corners.mean(axis=1, keepdims=True), scene_idx, scene_crs, pyproj_crs("EPSG:4326"))[:, 0]
    used = sorted(set(scene_idx.tolist()))  # the scenes that gave chips: one without any changes no split
    frame = _block_frame([scene_crs[i] for i in used], lonlat)
    framed = _corners_in(corners, scene_idx, scene_crs, frame)
    footprint_m = max(scene_cards[i]["tiling"]["tile_footprint_m"] or 0.0 for i in used)
    block_m = opts.block_m if opts.block_m is not None else auto_block_m(footprint_m)
    res = assign(opts.split, y=y, classes=classes, names=names, scene=scene_idx, centres=framed.mean(axis=1),
                 footprints=_polygons(framed), block_m=block_m, val_fraction=opts.val_fraction,
                 test_fraction=opts.test_fraction, seed=opts.seed)
    res.info["frame"] = crs_name(frame) if frame.to_authority() else frame.srs
    if opts.split == "blocks":
        res.info["block_m_auto"] = opts.block_m is None
    log(f"split: {opts.split}"
        + (f" (blocks of {block_m:g} m: {sum(res.info['groups'].values())} blocks)" if opts.split == "blocks" else "")
        + (f"; {res.info['dropped_overlap']} val/test chips dropped for overlapping another split" if res.info.get("dropped_overlap") else "")
        + "\n" + format_counts(res.info["counts"], classes))
    return res


def _write_lists(stage: Path, names: np.ndarray, split: np.ndarray, classes: list[str]) -> None:
    """The split lists and classes.txt; chips in no split (dropped for overlap) are deleted."""
    for s in SPLITS:
        lines = sorted(str(n) for n in names[split == s])
        (stage / "splits" / f"{s}.txt").write_text("".join(f"{ln}\n" for ln in lines))
    for n in names[split == ""]:  # dropped by the overlap rule: not part of the dataset
        (stage / "images" / n).unlink()
    (stage / "classes.txt").write_text("".join(f"{c}\n" for c in classes))


def _chip_table(rows: list[dict], classes: list[str], y: np.ndarray, res, opts: ChipOptions,
                scene_cards: list[dict], scene_idx: np.ndarray, kept: np.ndarray) -> dict[str, list]:
    """The columns of chips.parquet (without the footprints) for the chips kept."""
    table = {
        "chip": [r["chip"] for r in rows], "class": [classes[c] for c in y], "class_index": y.tolist(),
        "split": res.split.tolist(),
        "block": [str(g) for g in res.group] if opts.split == "blocks" else
                 ([scene_cards[i]["scene"] for i in scene_idx] if opts.split == "scene" else [""] * len(rows)),
        "scene": [scene_cards[i]["scene"] for i in scene_idx],
        **{k: [r[k] for r in rows] for k in ("row", "col", "col_off", "row_off", "width", "height", "input_gsd_m",
                                               "valid_fraction", "cover", "label_fids")},
    }
    return {k: [v for v, keep in zip(vals, kept) if keep] for k, vals in table.items()}


def read_card(data: str | os.PathLike) -> dict | None:
    """The ``chips.json`` of a dataset made by ``tilescan chips`` (``data`` is the dataset
    folder or its ``images/`` folder), or None for any other dataset."""
    import json

    data = Path(data)
    for folder in (data, data.parent):
        f = folder / CARD
        if f.is_file() and (folder / "images").is_dir():
            try:
                card = json.loads(f.read_text())
            except (OSError, ValueError) as exc:
                raise InputError(f"cannot read the chips card: {exc}", path=str(f)) from None
            if isinstance(card, dict) and card.get("format") == CHIPS_FORMAT:
                return card
    return None
