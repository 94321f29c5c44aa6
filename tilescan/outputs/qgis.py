"""QGIS projects and styles for tilescan's outputs, written as plain XML (QGIS not needed);
the styles themselves are built in :mod:`tilescan.outputs.qgis_style`.

Per output folder (:func:`write_scene_files`):

* ``heatmap.qml``, ``labels.qml``, ``tiles.qml``: QGIS applies ``<name>.qml`` beside a file
  as that layer's default style when the file is added, so ``heatmap.tif`` opens as a
  pseudocolour ramp over 0..1 (the quicklook's heat colours, transparent for low heat and
  nodata), ``labels.tif`` as a palette with class names, and ``tiles.parquet`` /
  ``tiles.gpkg`` filled by ``label`` in the same colours (:func:`tilescan.outputs.palette.class_colors`),
  at the quicklook's label opacity;
* ``<scene>.qgs``: a QGIS project with the scene's RGB bands (stretched as the model saw
  them), the labels, the heatmap and the tile table, each styled as above, referenced by
  paths relative to the project, so the folder (moved together with the scenes) opens as
  the quicklook shows it. The tile layer carries a second style, ``confidence``
  (Layer > Styles), graduated by the model's confidence.

:func:`write_collect_files` writes one project for ``tilescan collect``'s dataset.

The XML follows what QGIS 3.22 writes (``.qml``: a ``<qgis>`` document holding the
renderer; ``.qgs``: ``<projectCrs>``, ``<layer-tree-group>``, ``<mapcanvas>``,
``<projectlayers>``, relative ``./`` paths), with the elements older QGIS 3 releases read too
(symbol-layer properties both as ``<Option>`` maps and ``<prop>`` pairs). Every file is
written atomically (:func:`tilescan.outputs.files.atomic_output`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence
from xml.etree import ElementTree as ET

from .files import atomic_output, nodata_read
from .geometry import pyproj_crs
from .qgis_style import (QGIS_VERSION, _crs_facts, _el, _extent, _memo, _Memo, _srs, _to_bytes, _units, memo_attrib,
                         memo_style, write_style)

__all__ = [
    "Layer",
    "write_collect_files",
    "write_project",
    "write_scene_files",
]


# ----------------------------------------------------------------------------- projects


@dataclass
class Layer:
    """One layer of a project: ``path`` is the file (absolute, or relative to the project
    folder), ``kind`` ``raster`` or ``vector``, ``style`` a style root from :mod:`tilescan.outputs.qgis_style`."""

    name: str
    path: str
    kind: str
    style: ET.Element
    crs: Any = None
    bounds: Sequence[float] | None = None
    visible: bool = True
    sublayer: str | None = None  # the layer inside a GeoPackage
    subset: str | None = None  # a vector layer's filter (QGIS's provider subset string)
    alt_styles: dict[str, ET.Element] = field(default_factory=dict)  # more named styles
    style_name: str = "default"
    #: A raster's nodata in place of its file's, ``(band, value)`` for each band shown (value
    #: None: no nodata); None: the file's own
    nodata: Sequence[tuple[int, float | None]] | None = None


#: A file at most this many folders up from a project (OUT/<scene>/ or OUT/collected/: what lies
#: beside OUT) is written relative, so a folder holding OUT and its scenes moves as one; one
#: further away (a shared store of scenes) absolute, so OUT moves alone and still finds it.
RELATIVE_UP = 2


def _source(layer: Layer, project_dir: Path) -> str:
    """The datasource as QGIS stores it with relative paths: ``./x`` or ``../x`` (up to
    :data:`RELATIVE_UP` folders up), else the absolute path (also where no relative one
    exists: another drive)."""
    p = layer.path
    if p.startswith("/vsi"):  # a remote scene through GDAL's network file systems: as it is
        return p
    if os.path.isabs(p):
        try:
            rel = os.path.relpath(p, project_dir)
        except ValueError:  # e.g. another drive on Windows
            rel = layer.path
        if Path(rel).parts[:RELATIVE_UP + 1].count(os.pardir) <= RELATIVE_UP:
            p = rel
    if not os.path.isabs(p):
        p = p.replace(os.sep, "/")
        p = p if p.startswith("../") or p.startswith("./") else "./" + p
    return p + (f"|layername={layer.sublayer}" if layer.sublayer else "") + (f"|subset={layer.subset}" if layer.subset else "")


def _layer_id(layer: Layer, k: int) -> str:
    # QGIS ignores a stored id of 10 characters or fewer (and makes a new one, breaking the
    # layer tree's references): the fixed part keeps every id longer
    safe = "".join(c if c.isalnum() else "_" for c in layer.name)
    return f"{safe}_tilescan_{k:04d}"


def _maplayer(parent: ET.Element, layer: Layer, lid: str, source: str) -> None:
    vector = layer.kind == "vector"
    attrs = memo_attrib(layer.style)
    attrs.pop("version", None)
    attrs.pop("styleCategories", None)
    if vector:
        attrs.update(geometry="Polygon", wkbType="Polygon")
    ml = _el(parent, "maplayer", type=layer.kind, autoRefreshEnabled="0", autoRefreshTime="0",
             refreshOnNotifyEnabled="0", refreshOnNotifyMessage="", legendPlaceholderImage="", **attrs)
    if layer.bounds is not None:
        _extent(ml, "extent", layer.bounds)
    _el(ml, "id", lid)
    _el(ml, "datasource", source)
    _el(ml, "layername", layer.name)
    _srs(_el(ml, "srs"), layer.crs)
    _el(ml, "provider", "ogr" if vector else "gdal", **({"encoding": "UTF-8"} if vector else {}))
    if layer.nodata is not None:  # as QGIS stores "Transparency > No data value" set by the user
        nd = _el(ml, "noData")
        for band, value in layer.nodata:
            listed = _el(nd, "noDataList", bandNo=int(band), useSrcNoData="0")
            if value is not None and value == value:  # NaN: QGIS leaves it out of a float raster anyway
                _el(listed, "noDataRange", min=f"{value:.17g}", max=f"{value:.17g}")
    sm = _el(ml, "map-layer-style-manager", current=layer.style_name)
    for name, alt in layer.alt_styles.items():
        _el(sm, "map-layer-style", name=name).append(alt)
    _el(sm, "map-layer-style", name=layer.style_name)
    if type(layer.style) is _Memo:  # the current style's elements live in the layer itself
        ml.append(_memo(layer.style.key, whole=False))
    else:
        for child in layer.style:
            ml.append(child)


def write_project(path: str | os.PathLike, *, title: str, crs: Any, bounds: Sequence[float],
                  layers: Sequence[Layer] | None = None, groups: Sequence[tuple[str, Sequence[Layer]]] = (),
                  location: str | os.PathLike | None = None, hidden: Collection[str] = ()) -> Path:
    """Write a QGIS project (.qgs) holding ``layers`` (top first) and then ``groups`` of
    layers (those named in ``hidden`` switched off), the map in ``crs`` zoomed to ``bounds``
    (xmin, ymin, xmax, ymax in ``crs``).

    File paths are stored relative to ``location`` (the folder the project will live in;
    default: ``path``'s folder), so a project written in a staging folder is right once
    moved into place. Written atomically."""
    root = _project_tree(path, title=title, crs=crs, bounds=bounds, layers=layers, groups=groups, location=location,
                         hidden=hidden)
    data = _to_bytes(root)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _project_tree(path: str | os.PathLike, *, title: str, crs: Any, bounds: Sequence[float],
                  layers: Sequence[Layer] | None, groups: Sequence[tuple[str, Sequence[Layer]]],
                  location: str | os.PathLike | None, hidden: Collection[str] = ()) -> ET.Element:
    """The document :func:`write_project` writes."""
    project_dir = Path(os.path.abspath(location if location is not None else Path(path).parent))
    root = _el(None, "qgis", projectname=title, version=QGIS_VERSION)
    _el(root, "homePath", path="")
    _el(root, "title", title)
    _srs(_el(root, "projectCrs"), crs)
    tree = _el(root, "layer-tree-group")
    _el(tree, "customproperties")
    entries: list[tuple[str | None, Layer]] = [(None, lyr) for lyr in layers or ()]
    entries += [(name, lyr) for name, members in groups for lyr in members]
    nodes: dict[str | None, ET.Element] = {None: tree}

    def node_of(group: str | None) -> ET.Element:  # made when first used: the top layers come first, drawn on top
        if group not in nodes:
            nodes[group] = _el(tree, "layer-tree-group", name=group, expanded="1",
                               checked="Qt::Unchecked" if group in hidden else "Qt::Checked")
            _el(nodes[group], "customproperties")
        return nodes[group]
    canvas = _el(root, "mapcanvas", name="theMapCanvas", annotationsVisible="1")
    _el(canvas, "units", _units(crs))
    _extent(canvas, "extent", bounds)
    _el(canvas, "rotation", "0")
    _srs(_el(canvas, "destinationsrs"), crs)
    _el(canvas, "rendermaptile", "0")
    projectlayers = _el(root, "projectlayers")
    for k, (group, layer) in enumerate(entries):
        lid = _layer_id(layer, k)
        source = _source(layer, project_dir)
        t = _el(node_of(group), "layer-tree-layer", id=lid, name=layer.name, source=source,
                providerKey="ogr" if layer.kind == "vector" else "gdal",
                checked="Qt::Checked" if layer.visible else "Qt::Unchecked",
                expanded="1" if layer.kind == "vector" else "0")  # the tiles' legend open: the classes
        _el(t, "customproperties")
        _maplayer(projectlayers, layer, lid, source)
    props = _el(root, "properties")
    _el(_el(props, "Paths"), "Absolute", "false", type="bool")
    # QGIS 3.x reads <projectCrs> only with this flag set
    _el(_el(props, "SpatialRefSys"), "ProjectionsEnabled", "1" if _crs_facts(crs)[2] else "0", type="int")
    view = _el(root, "ProjectViewSettings", UseProjectScales="0", rotation="0")
    _el(view, "Scales")
    dv = _el(view, "DefaultViewExtent", **dict(zip(("xmin", "ymin", "xmax", "ymax"), map(repr, map(float, bounds)))))
    _srs(dv, crs)
    return root


# ----------------------------------------------------------------------------- per scene


def _scene_layer(scene: str | os.PathLike | None, crs: Any, bounds: Sequence[float],
                 bands: Sequence[int], scale: Sequence[Sequence[float]] | None,
                 nodata: float | None = None, nodata_from: str = "file", alpha: int | None = None) -> Layer | None:
    """The scene's RGB layer, or None when there is no scene to reference (:func:`scene_source`).
    ``nodata`` and ``nodata_from`` as run.json's ``scene_info`` has them: where the run replaced
    the file's nodata (``[tiling] nodata``), the layer shows ``nodata`` (None: no nodata) on the
    bands shown; with the file's own (``file``), QGIS reads it from the file. ``alpha``: the
    band drawn as transparency (:func:`qgis_alpha_band`), so masked pixels are not black."""
    source = scene_source(scene)
    if source is None:
        return None
    key_scale = None if scale is None else tuple(tuple(float(v) for v in pair) for pair in scale)
    return Layer("scene", source, "raster", memo_style("scene", tuple(bands), key_scale, alpha),
                 crs=crs, bounds=bounds, nodata=None if nodata_from == "file" else [(b, nodata) for b in bands])


def qgis_alpha_band(count: int | None, alpha_band: int | None, internal_mask: bool) -> int | None:
    """The band of a scene QGIS draws as its transparency: its alpha band; for an internal
    (per-dataset) mask, the band QGIS adds after the file's last to show it (``count + 1``);
    else None (the file's nodata, if any, is transparent by itself)."""
    if alpha_band:
        return int(alpha_band)
    return int(count) + 1 if internal_mask and count else None


def scene_source(scene: str | os.PathLike | None) -> str | None:
    """Where QGIS reads the scene: a local file that is there (absolute; written relative), a
    remote scene's GDAL path (``/vsicurl/https://…``, ``/vsis3/…``) when its URL carries no
    credentials or signature (those never go into a project), else None (also for a STAC
    item's stacked assets: their VRT is the run's own)."""
    if scene is None:
        return None
    if isinstance(scene, str) and scene.startswith("/vsi"):  # as run.json's scene_layer has it
        return scene
    if getattr(scene, "remote", False):
        from ..scene import vsi

        urls, paths = ([scene.url], [os.fspath(scene)]) if hasattr(scene, "url") else (scene.hrefs, scene.paths)
        if len(paths) != 1:
            return None
        if vsi.is_url(urls[0]):
            return paths[0] if vsi.redact(urls[0]) == urls[0] else None
        scene = paths[0]
    return os.path.abspath(scene) if os.path.isfile(scene) else None


def parquet_only_warning(what: str) -> str:
    """The warning for projects made without the GeoPackage (``--no-gpkg``): their tiles layer
    is the GeoParquet file, which not every QGIS opens."""
    return (f"warning: no GeoPackage (--no-gpkg, [output] gpkg = false): the tiles layer of {what} is tiles.parquet, which QGIS opens only with GDAL "
            ">= 3.8 built with Arrow (not QGIS 3.22 on Debian 12, for one); without --no-gpkg it is the GeoPackage, "
            "which every QGIS 3 opens")


def percent_warning(folder: Path, what: str) -> str | None:
    """The warning for GeoPackages written under a path with a ``%`` (``folder``), which QGIS
    cannot open (GDAL's GeoPackage driver, as QGIS opens it, unescapes the path); else None."""
    if "%" not in str(folder):
        return None
    return (f"warning: {folder}: QGIS cannot open {what} in a path with a '%' (GDAL takes '%XX' there for an "
            "escaped character); the GeoParquet tables and rasters open; write to a folder whose path has no '%' for QGIS")


#: What a layer's name adds when its labels are outside the model's scale (run.json's
#: ``tiling.scale``): the warning must show where the labels are looked at, not only in run.json.
SCALE_FLAGS = {"coarser": "labels not meaningful at this scale", "finer": "labels not meaningful at this scale",
               "unknown": "scale unknown: labels not checked"}


def flagged(name: str, scale_check: str | None) -> str:
    """``name`` with the scale's flag after it (:data:`SCALE_FLAGS`), or as it is."""
    flag = SCALE_FLAGS.get(scale_check or "")
    return f"{name} ({flag})" if flag else name


def _tiles_layer(title: str, folder: Path, table: tuple[str, str | None], style, crs: Any, bounds,
                 subset: str | None = None, visible: bool = True) -> Layer:
    """A project's layer of a tile table (:func:`_table`'s, in ``folder``): styled by label,
    with the confidence style beside it; ``subset`` filters its rows."""
    return Layer(title, str(folder / table[0]), "vector", style, crs=crs, bounds=bounds, sublayer=table[1],
                 style_name="label", alt_styles={"confidence": memo_style("confidence")}, subset=subset,
                 visible=visible)


def _table(folder: Path) -> tuple[str, str | None] | None:
    """The tile table a project should use: the GeoPackage (every QGIS reads it), else
    the GeoParquet file (QGIS with GDAL >= 3.8 built with Arrow)."""
    if (folder / "tiles.gpkg").exists():
        return "tiles.gpkg", "tiles"
    if (folder / "tiles.parquet").exists():
        return "tiles.parquet", None
    return None


def write_scene_files(folder: str | os.PathLike, *, classes: Sequence[str], present: Sequence[int], crs: Any,
                      bounds: Sequence[float], scene: str | os.PathLike | None = None,
                      bands: Sequence[int] = (1, 2, 3), scale: Sequence[Sequence[float]] | None = None,
                      nodata: float | None = None, nodata_from: str = "file", alpha: int | None = None,
                      project: str | None = None, location: str | os.PathLike | None = None,
                      colors: Sequence[Sequence[int]] | None = None, scale_check: str | None = None) -> list[Path]:
    """Write the styles of the outputs in ``folder`` (``heatmap.qml``, ``labels.qml``,
    ``tiles.qml``, each only when its output is there) and, when ``project`` is a name,
    the project ``<project>.qgs`` with the scene (if its file exists), labels, heatmap and
    tiles. ``location`` is where ``folder`` will end up (relative paths are computed from
    there); ``present`` are the indexes of the classes in the table; ``bounds`` the scene's
    extent in ``crs``; ``bands`` and ``scale`` the scene bands and their stretch (lo, hi)
    as the model read them, ``nodata`` and ``nodata_from`` its nodata and where that came from,
    ``alpha`` the band QGIS shows as its transparency (:func:`_scene_layer`), ``colors`` the
    classes' colours (the model's legend; default the palette), ``scale_check`` run.json's
    ``tiling.scale`` (the tiles and labels layers say when it is off, :func:`flagged`).
    Returns the files written."""
    folder = Path(folder)
    classes, present = tuple(str(c) for c in classes), tuple(sorted({int(i) for i in present}))
    colors = _colors(colors)
    bounds = _union(bounds, _table_bbox(folder / "tiles.parquet"))  # edge tiles may reach past the scene
    written: list[Path] = []
    styles = {}
    if (folder / "heatmap.tif").exists():
        styles["heatmap"] = memo_style("heatmap")
    if (folder / "labels.tif").exists():
        styles["labels"] = memo_style("labels", classes, present, colors)
    table = _table(folder)
    if table is not None:
        styles["tiles"] = memo_style("tiles", classes, present, colors)
    for name, style in styles.items():
        written.append(write_style(folder / f"{name}.qml", style))
    if project:
        layers = []
        if table is not None:
            layers.append(_tiles_layer(flagged("tiles", scale_check), folder, table, styles["tiles"], crs, bounds))
        if "heatmap" in styles:
            layers.append(Layer("heatmap", str(folder / "heatmap.tif"), "raster", styles["heatmap"], crs=crs,
                                bounds=bounds, visible=False))
        if "labels" in styles:
            layers.append(Layer(flagged("labels", scale_check), str(folder / "labels.tif"), "raster", styles["labels"],
                                crs=crs, bounds=bounds, visible=False))
        scene_layer = _scene_layer(scene, crs, bounds, bands, scale, nodata, nodata_from, alpha)
        if scene_layer is not None:
            layers.append(scene_layer)
        where = Path(os.path.abspath(location if location is not None else folder))
        for lyr in layers:  # output files by their final place
            if Path(lyr.path).parent == folder:
                lyr.path = str(where / Path(lyr.path).name)
        written.append(write_project(folder / f"{project}.qgs", title=project, crs=crs, bounds=bounds,
                                     layers=layers, location=where))
    return written


def _colors(colors) -> tuple[tuple[int, int, int], ...] | None:
    """Class colours as a memo key: (r, g, b) tuples from tuples or ``#rrggbb``; None: the palette's."""
    if not colors:
        return None
    from .palette import parse_color

    return tuple(parse_color(c) if isinstance(c, str) else tuple(int(v) for v in c[:3]) for c in colors)


#: Above this many scenes, collected.qgs holds every tile as one layer, without a group per
#: scene: 545 pre-tiled chips made 2,174 layers that QGIS 3.22 took 54 s and 2.3 GB to open.
MAX_SCENE_GROUPS = 50


def write_collect_files(folder: str | os.PathLike, location: str | os.PathLike | None,
                        units: Sequence[tuple[str, str | os.PathLike, dict]], name: str = "collected") -> list[Path]:
    """For ``tilescan collect``: the style ``tiles.qml`` of the collected table in ``folder``
    and the project ``<name>.qgs`` with every collected tile (longitude/latitude; hidden) on
    top, then a group per scene with its tiles (the table filtered to the scene, so they go
    on and off with it: scenes of one place from other years do not cover each other), its
    label and heatmap rasters (hidden) and the scene itself, each layer named with the scene
    and with the legend of the scene's own classes.
    ``units`` are (scene name, unit folder, its run.json) of every unit collected;
    ``location`` is where ``folder`` will end up. The map is in the scenes' CRS when they
    share one, else in WGS 84. Over :data:`MAX_SCENE_GROUPS` scenes, the project holds only
    the layer of every tile, shown (each scene's own project has its rasters)."""
    import json

    import pyarrow.parquet as pq

    folder = Path(folder)
    where = Path(os.path.abspath(location if location is not None else folder))
    schema = pq.read_schema(folder / "tiles.parquet")
    own = json.loads(schema.metadata[b"tilescan"])
    classes = tuple(str(c) for c in own["classes"])
    bbox = json.loads(schema.metadata[b"geo"])["columns"]["geometry"].get("bbox")
    of_scene = _classes_of_scenes(folder / "tiles.parquet", classes)
    present = tuple(sorted(set().union(*of_scene.values())))
    scenes = _collected_scenes(units)
    written: list[Path] = []
    colors = _colors(own.get("class_colors"))
    table = _table(folder)
    tiles = memo_style("tiles", classes, present, colors)
    if table is not None:
        written.append(write_style(folder / "tiles.qml", tiles))
    crss = {str(s["crs"]) for s in scenes.values() if s["crs"]}
    crs = next(iter(crss)) if len(crss) == 1 else "EPSG:4326"
    if own.get("antimeridian_tiles") and len(crss) == 1:  # the tiles' box spans the globe: the scenes' own
        bbox = None
    bounds = _project_bounds(crs, bbox, list(scenes.values()))

    def tiles_layer(title: str, shown: tuple[int, ...], subset: str | None = None, visible: bool = True) -> Layer:
        return _tiles_layer(title, where, table, memo_style("tiles", classes, shown, colors), "EPSG:4326", bbox,
                            subset=subset, visible=visible)

    many = len(scenes) > MAX_SCENE_GROUPS
    layers = [] if table is None else [tiles_layer("tiles", present, visible=many)]
    groups, hidden = [], set()
    boxes = {} if many else {s["name"]: b for s in scenes.values() if (b := _lonlat_box(s)) is not None}
    order = _drawing_order(list(scenes.values()), boxes)
    repeats = set() if many else _repeats(order, boxes)
    for s in [] if many else order:
        mine = tuple(sorted(of_scene.get(s["name"], ())))
        members = [] if table is None or not mine else [
            tiles_layer(flagged(f"tiles {s['name']}", s["scale_check"]), mine,
                        subset="\"scene\" = '" + s["name"].replace("'", "''") + "'")]
        members += _scene_group(s, classes, mine or present, colors, bounds)
        if members:
            groups.append((group := flagged(s["name"], s["scale_check"]), members))
            if s["name"] in repeats:
                hidden.add(group)
    written.append(write_project(folder / f"{name}.qgs", title=name, crs=crs, bounds=bounds, layers=layers,
                                 groups=groups, location=where, hidden=hidden))
    return written


def _drawing_order(scenes: Sequence[dict], boxes: dict) -> list[dict]:
    """The scenes by name, but a scene lying mostly on a box over twice its own (a detail scene
    over an overview) before it, so drawn above it (the first group is drawn on top); scenes of
    about one size (one place in two years) keep their names' order."""
    def inside(name: str) -> int:  # how many far larger scenes it lies mostly on
        box = boxes.get(name)
        return 0 if box is None else sum(_area(o) > 2 * _area(box) and _overlap(box, o) > 0.5 * _area(box)
                                         for o in boxes.values())
    return sorted(scenes, key=lambda s: -inside(s["name"]))  # stable: by name otherwise


def _repeats(scenes: Sequence[dict], boxes: dict) -> set[str]:
    """The names of the scenes whose box and the box of an earlier scene that is shown lie
    mostly (over half of each) on each other: one place in other years. Their groups start
    switched off, so their tiles past the scene's edge, where no scene covers them, do not blend
    with the shown year's. A small scene inside a large one is not one (it is drawn above it)."""
    shown: list = []
    repeats = set()
    for s in scenes:
        if (box := boxes.get(s["name"])) is None:
            continue
        if any(_overlap(box, other) > 0.5 * max(_area(box), _area(other)) for other in shown):
            repeats.add(s["name"])
        else:
            shown.append(box)
    return repeats


def _lonlat_box(s: dict) -> tuple[float, float, float, float] | None:
    """A scene's box in longitude/latitude, None where unknown or across 180 degrees."""
    import pyproj

    crs = pyproj_crs(s.get("crs"))
    if crs is None or not s.get("bounds"):
        return None
    try:
        box = pyproj.Transformer.from_crs(crs, "OGC:CRS84", always_xy=True).transform_bounds(*s["bounds"])
    except pyproj.exceptions.ProjError:
        return None
    return box if box[0] < box[2] and box[1] < box[3] else None


def _area(b: Sequence[float]) -> float:
    return (b[2] - b[0]) * (b[3] - b[1])


def _overlap(a: Sequence[float], b: Sequence[float]) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _classes_of_scenes(parquet: Path, classes: Sequence[str]) -> dict[str, set[int]]:
    """The indexes of the classes each scene of a collected table has tiles of."""
    import pyarrow.parquet as pq

    labelled = pq.read_table(parquet, columns=["scene", "label"]).to_pydict()
    index = {c: i for i, c in enumerate(classes)}
    of_scene: dict[str, set[int]] = {}
    for scene_name, label in zip(labelled["scene"], labelled["label"]):
        of_scene.setdefault(scene_name, set()).add(index[label])
    return of_scene


def _collected_scenes(units: Sequence[tuple[str, str | os.PathLike, dict]]) -> dict[str, dict]:
    """What the collected project shows of each scene, from its units' run.json."""
    scenes: dict[str, dict] = {}
    for scene_name, unit_folder, m in units:
        info = m.get("scene_info", {})
        s = scenes.setdefault(scene_name, {"name": scene_name, "path": m.get("scene_layer", m.get("scene")),
                                           "crs": info.get("crs"),
                                           "bounds": _grid_bounds(info), "bands": info.get("bands_used"),
                                           "scale": info.get("scale"), "units": [],
                                           "scale_check": (m.get("tiling") or {}).get("scale"),
                                           "nodata": nodata_read(info.get("nodata")),
                                           "nodata_from": info.get("nodata_from", "file"),
                                           "alpha": qgis_alpha_band(info.get("count"), info.get("alpha_band"),
                                                                    info.get("internal_mask", False))})
        s["units"].append(Path(os.path.abspath(unit_folder)))
    return scenes


def _scene_group(s: dict, classes: tuple[str, ...], shown: tuple[int, ...], colors, bounds) -> list[Layer]:
    """A scene's rasters in the collected project: each unit's heatmap and labels (hidden,
    with the legend of ``shown`` classes), then the scene; each named with the scene."""
    members = []
    for u in s["units"]:
        tag = s["name"] if u.name == s["name"] else f"{s['name']} {u.name}"
        if (u / "heatmap.tif").exists():
            members.append(Layer(f"heatmap {tag}", str(u / "heatmap.tif"), "raster", memo_style("heatmap"),
                                 crs=s["crs"], bounds=s["bounds"], visible=False))
        if (u / "labels.tif").exists():
            members.append(Layer(flagged(f"labels {tag}", s["scale_check"]), str(u / "labels.tif"), "raster",
                                 memo_style("labels", classes, shown, colors),
                                 crs=s["crs"], bounds=s["bounds"], visible=False))
    scene_layer = _scene_layer(s["path"], s["crs"], s["bounds"] or bounds, s["bands"] or (1, 2, 3), s["scale"],
                               s["nodata"], s["nodata_from"], s["alpha"])
    if scene_layer is not None:
        scene_layer.name = f"scene {s['name']}"
        members.append(scene_layer)
    return members


def _table_bbox(parquet: Path) -> list[float] | None:
    """The extent of a GeoParquet file's geometries, from its ``geo`` metadata."""
    import json

    import pyarrow.parquet as pq

    try:
        geo = json.loads(pq.read_schema(parquet).metadata[b"geo"])
        return geo["columns"][geo["primary_column"]].get("bbox")
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _union(a: Sequence[float], b: Sequence[float] | None) -> tuple[float, float, float, float]:
    if b is None:
        return tuple(a)
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def _grid_bounds(info: dict) -> tuple[float, float, float, float] | None:
    """A scene's extent from run.json's ``scene_info`` (transform and size)."""
    try:
        a, b, c, d, e, f = info["transform"][:6]
        w, h = info["width"], info["height"]
    except (KeyError, TypeError, ValueError):
        return None
    xs = [c + a * i + b * j for i, j in ((0, 0), (w, 0), (0, h), (w, h))]
    ys = [f + d * i + e * j for i, j in ((0, 0), (w, 0), (0, h), (w, h))]
    return (min(xs), min(ys), max(xs), max(ys))


def _project_bounds(crs: Any, bounds_lonlat: Sequence[float] | None, scenes: Sequence[dict]) -> Sequence[float]:
    """The map extent in ``crs``: the collected tiles' lon/lat box transformed, with the boxes
    of the scenes in ``crs`` (a scene's unlabelled edge is in view too); without the tiles' box,
    every scene's box."""
    import pyproj

    tiles = bounds_lonlat is not None and pyproj_crs(crs) is not None
    boxes = [s["bounds"] for s in scenes if s.get("bounds") and (not tiles or str(s["crs"]) == str(crs))]
    if tiles:
        boxes.append(pyproj.Transformer.from_crs("OGC:CRS84", pyproj_crs(crs), always_xy=True)
                     .transform_bounds(*bounds_lonlat))
    if not boxes:
        return (0.0, 0.0, 1.0, 1.0)
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
