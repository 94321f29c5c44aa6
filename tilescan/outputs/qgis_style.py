"""QGIS styles (``.qml``) for tilescan's outputs, written as plain XML (QGIS not needed),
and the XML helpers the projects of :mod:`tilescan.outputs.qgis` share.

``heatmap.tif`` is a pseudocolour ramp over 0..1 (the quicklook's heat colours, transparent
for low heat and nodata), ``labels.tif`` a palette with class names, ``tiles.parquet`` /
``tiles.gpkg`` filled by ``label`` in the same colours
(:func:`tilescan.outputs.palette.class_colors`) at the quicklook's label opacity, or
graduated by the model's confidence; the scene is its RGB bands stretched as the model saw them.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Sequence
from xml.etree import ElementTree as ET

import numpy as np

from ..log import catching_warnings
from .files import atomic_output
from .geometry import pyproj_crs
from .palette import class_colors
from .quicklook import LABEL_BLEND, heat_colours

__all__ = ["heatmap_style", "labels_style", "scene_style", "tiles_style", "write_style"]

QGIS_VERSION = "3.22.0-Białowieża"
"""Version written into the files: the oldest QGIS they are tested with (Debian 12's)."""

_DOCTYPE = "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"

# Opacity along the heat ramp: low heat transparent so the scene shows through, strong heat opaque.
_HEAT_OPACITY = ((0.0, 0), (0.125, 64), (0.375, 192), (0.625, 255), (1.0, 255))
# Confidence classes of the alternative tile style: red (unsure) through yellow to blue (sure),
# ColorBrewer's RdYlBu, whose ends stay apart to red-green colour-blind eyes (its green did not).
_CONFIDENCE = ((0.0, 0.4, (215, 25, 28)), (0.4, 0.6, (253, 174, 97)), (0.6, 0.8, (255, 255, 191)),
               (0.8, 0.9, (171, 217, 233)), (0.9, 1.0, (44, 123, 182)))
_OUTLINE = "40,40,40,255"


@functools.lru_cache(maxsize=1)
def _heat_knots(n: int = 32) -> tuple[tuple[float, tuple[int, int, int], int], ...]:
    """The quicklook's heat colours at ``n + 1`` even knots (QGIS draws straight between them),
    each with its opacity."""
    v = np.linspace(0.0, 1.0, n + 1)
    rgb = heat_colours(np.clip(v * 255 + 0.5, 0, 255).astype(np.uint8))
    alpha = np.interp(v, *zip(*_HEAT_OPACITY))
    return tuple((float(x), tuple(int(c) for c in col), int(round(a))) for x, col, a in zip(v, rgb, alpha))


# ----------------------------------------------------------------------------- XML helpers


def _el(parent: ET.Element | None, tag: str, text: Any = None, **attrs: Any) -> ET.Element:
    e = ET.Element(tag) if parent is None else ET.SubElement(parent, tag)
    for k, v in attrs.items():
        e.set(k.rstrip("_"), str(v))  # class_ / pass_: Python keywords
    if text is not None:
        e.text = str(text)
    return e


def _options(parent: ET.Element, props: dict[str, str]) -> None:
    """Symbol-layer properties as QGIS >= 3.16 reads them (<Option> map) and as older 3.x
    releases do (<prop k v>)."""
    m = _el(parent, "Option", type="Map")
    for k, v in props.items():
        _el(m, "Option", type="QString", name=k, value=v)
    for k, v in props.items():
        _el(parent, "prop", k=k, v=v)


def _rgb(c: Sequence[int], a: int = 255) -> str:
    return f"{c[0]},{c[1]},{c[2]},{a}"


def _hex(c: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*c[:3])


def _fill_symbol(parent: ET.Element, name: str, color: Sequence[int], outline: str = _OUTLINE) -> None:
    s = _el(parent, "symbol", type="fill", name=name, alpha="1", clip_to_extent="1", force_rhr="0")
    lyr = _el(s, "layer", class_="SimpleFill", enabled="1", locked="0", pass_="0")
    _options(lyr, {"color": _rgb(color), "style": "solid", "outline_color": outline, "outline_style": "solid",
                   "outline_width": "0.2", "outline_width_unit": "MM", "joinstyle": "miter",
                   "offset": "0,0", "offset_unit": "MM"})


def _srs(parent: ET.Element, crs: Any) -> ET.Element:
    """<spatialrefsys> for ``crs`` (anything pyproj reads; None: left empty). QGIS uses
    the authid when it has one, else the WKT."""
    s = _el(parent, "spatialrefsys")
    for tag, text in _crs_facts(crs)[0]:
        _el(s, tag, text)
    return s


def _units(crs: Any) -> str:
    return _crs_facts(crs)[1]


_CRS_FACTS: dict[Any, tuple] = {}
_CRS_LOCK = threading.Lock()


def _crs_key(crs: Any) -> Any:
    """What decides everything the files say about ``crs``: the WKT pyproj reads it from (see
    :func:`tilescan.outputs.geometry.pyproj_crs`), the string itself, or None when not hashable."""
    import pyproj

    if crs is None or isinstance(crs, str):
        return crs
    if hasattr(crs, "to_wkt") and not isinstance(crs, pyproj.CRS):  # a rasterio CRS
        try:
            return ("wkt", crs.to_wkt(version="WKT2_2019"))
        except TypeError:
            return ("wkt", crs.to_wkt())
    return None


def _crs_facts(crs: Any) -> tuple[tuple[tuple[str, str], ...], str, bool]:
    """For ``crs``: the children of its <spatialrefsys> (tag, text), its map units, and whether
    pyproj reads it. Worked out with pyproj once per CRS (the same few CRSs recur scene after scene)."""
    key = _crs_key(crs)
    if key is not None:
        with _CRS_LOCK:
            got = _CRS_FACTS.get(key)
        if got is not None:
            return got
    pj = pyproj_crs(crs)
    facts = (_srs_fields(pj), _units_of(pj), pj is not None)
    if key is not None:
        with _CRS_LOCK:
            if len(_CRS_FACTS) >= 64:
                _CRS_FACTS.clear()
            _CRS_FACTS[key] = facts
    return facts


def _srs_fields(pj) -> tuple[tuple[str, str], ...]:
    if pj is None:
        return ()
    fields = [("wkt", pj.to_wkt())]
    with catching_warnings():  # pyproj warns that PROJ.4 strings lose detail: QGIS reads the WKT
        warnings.simplefilter("ignore")
        try:
            fields.append(("proj4", pj.to_proj4()))
        except Exception:  # a CRS without a PROJ.4 form: the WKT is enough
            fields.append(("proj4", ""))
    auth = pj.to_authority(min_confidence=100)
    if auth:
        fields.append(("authid", f"{auth[0]}:{auth[1]}"))
        if auth[0] == "EPSG":
            fields.append(("srid", auth[1]))
    fields.append(("description", pj.name))
    fields.append(("geographicflag", "true" if pj.is_geographic else "false"))
    return tuple(fields)


def _units_of(pj) -> str:
    if pj is None or not pj.axis_info:
        return "unknown"
    unit = (pj.axis_info[0].unit_name or "").lower()
    if unit.startswith("degree"):
        return "degrees"
    if "foot" in unit or "feet" in unit:
        return "feet"
    return "meters" if unit.startswith("metre") or unit.startswith("meter") else "unknown"


def _extent(parent: ET.Element, tag: str, bounds: Sequence[float]) -> None:
    e = _el(parent, tag)
    for k, v in zip(("xmin", "ymin", "xmax", "ymax"), bounds):
        _el(e, k, repr(float(v)))


def _qml(root_attrs: dict[str, str]) -> ET.Element:
    return _el(None, "qgis", version=QGIS_VERSION, styleCategories="AllStyleCategories", **root_attrs)


def _to_bytes(root: ET.Element) -> bytes:
    """The document as ``ET.indent(root, space=" ")`` and ``ET.tostring`` write it, after the
    DOCTYPE; written here in one pass without changing the tree (tests/test_outputs_speed.py
    compares the two)."""
    out = [_DOCTYPE]
    _xml(root, 0, out)
    if root.tail:
        out.append(_escape_cdata(root.tail))
    out.append("\n")
    return "".join(out).encode("utf-8")


_escape_attrib = ET._escape_attrib  # ElementTree's own escaping, so the text is the same as its
_escape_cdata = ET._escape_cdata


@functools.lru_cache(maxsize=64)
def _indentation(level: int) -> str:
    return "\n" + " " * level


def _xml(elem: ET.Element, level: int, out: list[str]) -> None:
    """Append ``elem`` at depth ``level`` (without its tail) to ``out``: the whitespace that
    ``ET.indent`` would give (a child per line, one space per level; text or tails that are
    not whitespace kept), the markup that ``ET.tostring`` writes. A :class:`_Memo` adds its
    style's memoised text."""
    if type(elem) is _Memo:
        out.append(_memo_xml(elem.key, level, elem.whole))
        return
    tag = elem.tag
    out.append("<" + tag)
    for k, v in elem.items():
        out.append(f' {k}="{_escape_attrib(v)}"')
    text, n, inner = elem.text, len(elem), None
    if n:
        inner = _indentation(level + 1)
        if not text or not text.strip():
            text = inner
    if not (text or n):
        out.append(" />")
        return
    out.append(">")
    if text:
        out.append(text if text is inner else _escape_cdata(text))
    for i, child in enumerate(elem):
        _xml(child, level + 1, out)
        tail = child.tail
        if tail and tail.strip():
            out.append(_escape_cdata(tail))
        else:
            out.append(inner if i < n - 1 else _indentation(level))
    out.append("</" + tag + ">")


# ----------------------------------------------------------------------------- memoised styles
# A run writes the same few styles scene after scene (the heatmap's and the confidence style
# always, the others whenever the classes present and the stretch repeat): each is built and
# serialised once per arguments and depth, and a :class:`_Memo` stands for it in the trees of
# :func:`write_style` and :mod:`tilescan.outputs.qgis`'s projects.


class _Memo(ET.Element):
    """Stand-in, in a tree serialised by :func:`_to_bytes`, for the memoised style ``key``:
    its root element (``whole``) or, as the last child of an element, the root's children.
    ElementTree itself writes it as an empty element."""

    key: tuple
    whole: bool


def _memo(key: tuple, whole: bool = True) -> _Memo:
    m = _Memo("tilescan-memo")
    m.key, m.whole = key, whole
    return m


def memo_style(kind: str, *args: Any) -> ET.Element:
    """The style ``kind`` (``heatmap``, ``labels``, ``tiles``, ``confidence`` or ``scene``;
    the arguments of its function, hashable) for :func:`write_style` and project layers,
    built and serialised once per arguments."""
    if kind not in _BUILDERS:
        raise ValueError(f"memo_style: unknown style {kind!r}")
    return _memo((kind, *args))


def memo_attrib(style: ET.Element) -> dict[str, str]:
    """The attributes of a style's root element (memoised or not)."""
    return dict(_built(style.key).attrib if type(style) is _Memo else style.attrib)


@functools.lru_cache(maxsize=1024)
def _built(key: tuple) -> ET.Element:
    """The style tree of ``key``; shared, so never changed (:func:`_xml` only reads it)."""
    return _BUILDERS[key[0]](*key[1:])


def _memo_xml(key: tuple, level: int, whole: bool) -> str:
    """The style ``key`` serialised at depth ``level``: its root, or its children with the
    line breaks between them (the last one's comes from where the stand-in sits)."""
    return (_symbol_xml if key[0] == "fill" else _style_xml)(key, level, whole)


def _serialised(key: tuple, level: int, whole: bool) -> str:
    root, out = _built(key), []
    if whole:
        _xml(root, level, out)
        return "".join(out)
    for i, child in enumerate(root):
        if i:
            tail = root[i - 1].tail
            out.append(_escape_cdata(tail) if tail and tail.strip() else _indentation(level))
        _xml(child, level, out)
    return "".join(out)


_style_xml = functools.lru_cache(maxsize=256)(_serialised)  # whole styles: a few kB each
_symbol_xml = functools.lru_cache(maxsize=2048)(_serialised)  # fill symbols: one per class and place


@functools.lru_cache(maxsize=64)
def _qml_bytes(key: tuple) -> bytes:
    return _to_bytes(_built(key))


# ----------------------------------------------------------------------------- renderers


def _raster_pipe(parent: ET.Element) -> ET.Element:
    """<pipe> with nearest-neighbour resampling, for the renderer to go in."""
    pipe = _el(parent, "pipe")
    prov = _el(pipe, "provider")
    _el(prov, "resampling", enabled="false", zoomedInResamplingMethod="nearestNeighbour",
        zoomedOutResamplingMethod="nearestNeighbour", maxOversampling="2")
    return pipe


def _pipe_tail(pipe: ET.Element, smooth: bool = False) -> None:
    """The filters after the renderer; ``smooth``: bilinear when zoomed in (else QGIS shows
    each raster cell as a square)."""
    _el(pipe, "brightnesscontrast", brightness="0", contrast="0", gamma="1")
    _el(pipe, "huesaturation", saturation="0", grayscaleMode="0", invertColors="0", colorizeOn="0",
        colorizeRed="255", colorizeGreen="128", colorizeBlue="128", colorizeStrength="100")
    _el(pipe, "rasterresampler", maxOversampling="2", **({"zoomedInResampler": "bilinear"} if smooth else {}))
    _el(pipe, "resamplingStage", "resamplingFilter")


def _min_max_origin(parent: ET.Element, limits: str = "None") -> None:
    m = _el(parent, "minMaxOrigin")
    _el(m, "limits", limits)
    _el(m, "extent", "WholeRaster")
    _el(m, "statAccuracy", "Estimated")
    _el(m, "cumulativeCutLower", "0.02")
    _el(m, "cumulativeCutUpper", "0.98")
    _el(m, "stdDevFactor", "2")


#: What the heatmap legend's ends say (each tile's map is divided by its own peak).
HEAT_MIN_LABEL = "0: no evidence for the tile's label"
HEAT_MAX_LABEL = "1: the strongest in its own tile"


def _heatmap_renderer(parent: ET.Element) -> None:
    r = _el(parent, "rasterrenderer", type="singlebandpseudocolor", band="1", opacity="1", alphaBand="-1",
            classificationMin="0", classificationMax="1", nodataColor="")
    _el(r, "rasterTransparency")
    _min_max_origin(r)
    shader = _el(_el(r, "rastershader"), "colorrampshader", colorRampType="INTERPOLATED", classificationMode="1",
                 clip="1", minimumValue="0", maximumValue="1", labelPrecision="3")
    ramp = _el(shader, "colorramp", type="gradient", name="[source]")
    knots = _heat_knots()
    stops = ":".join(f"{v:g};{_rgb(c, a)}" for v, c, a in knots[1:-1])
    _options(ramp, {"color1": _rgb(knots[0][1], knots[0][2]), "color2": _rgb(knots[-1][1], knots[-1][2]),
                    "discrete": "0", "rampType": "gradient", "stops": stops})
    ends = {0.0: HEAT_MIN_LABEL, 1.0: HEAT_MAX_LABEL}
    for v, c, a in knots:  # the legend says what the ends mean: each tile's map is divided by its own peak
        _el(shader, "item", value=f"{v:g}", color=_hex(c), alpha=str(a), label=ends.get(v, f"{v:g}"))
    # QGIS >= 3.18 draws the ramp as one bar, without the items' labels: its ends are labelled here
    _el(shader, "rampLegendSettings", minimumLabel=HEAT_MIN_LABEL, maximumLabel=HEAT_MAX_LABEL, prefix="", suffix="",
        direction="0", orientation="2", useContinuousLegend="1")


def _paletted_renderer(parent: ET.Element, classes: Sequence[str], present: Sequence[int],
                       colors: Sequence[Sequence[int]] | None = None) -> None:
    r = _el(parent, "rasterrenderer", type="paletted", band="1", opacity="1", alphaBand="-1", nodataColor="")
    _el(r, "rasterTransparency")
    _min_max_origin(r)
    pal = _el(r, "colorPalette")
    colors = class_colors(len(classes)) if colors is None else colors
    for i in present:
        _el(pal, "paletteEntry", value=str(i), color=_hex(colors[i]), alpha="255", label=classes[i])


def _rgb_renderer(parent: ET.Element, bands: Sequence[int], scale: Sequence[Sequence[float]] | None,
                  alpha: int | None = None) -> None:
    b = list(bands) + [bands[-1]] * (3 - len(bands)) if bands else [1, 2, 3]
    r = _el(parent, "rasterrenderer", type="multibandcolor", redBand=b[0], greenBand=b[1], blueBand=b[2],
            opacity="1", alphaBand=str(alpha or -1), nodataColor="")
    _el(r, "rasterTransparency")
    _min_max_origin(r, "None" if scale else "MinMax")
    for i, name in enumerate(("red", "green", "blue")):
        ce = _el(r, f"{name}ContrastEnhancement")
        lo, hi = (scale[min(i, len(scale) - 1)] if scale else (0, 255))
        _el(ce, "minValue", repr(float(lo)))
        _el(ce, "maxValue", repr(float(hi)))
        _el(ce, "algorithm", "StretchToMinimumMaximum")


def _categorized(parent: ET.Element, classes: Sequence[str], present: Sequence[int],
                 memo: bool = False, colors: Sequence[Sequence[int]] | None = None) -> ET.Element:
    """The renderer by class; ``memo``: each class's fill symbol a :class:`_Memo` (for :func:`memo_style`)."""
    r = _el(parent, "renderer-v2", type="categorizedSymbol", attr="label", symbollevels="0", forceraster="0",
            enableorderby="0", referencescale="-1")
    cats, syms = _el(r, "categories"), _el(r, "symbols")
    colors = class_colors(len(classes)) if colors is None else colors
    for k, i in enumerate(present):
        _el(cats, "category", value=classes[i], label=classes[i], symbol=str(k), render="true")
        if memo:
            syms.append(_memo(("fill", str(k), tuple(colors[i]))))
        else:
            _fill_symbol(syms, str(k), colors[i])
    _el(r, "rotation")
    _el(r, "sizescale")
    return r


def _graduated_confidence(parent: ET.Element) -> ET.Element:
    r = _el(parent, "renderer-v2", type="graduatedSymbol", attr="confidence", graduatedMethod="GraduatedColor",
            symbollevels="0", forceraster="0", enableorderby="0", referencescale="-1")
    ranges, syms = _el(r, "ranges"), _el(r, "symbols")
    for k, (lo, hi, c) in enumerate(_CONFIDENCE):
        _el(ranges, "range", lower=f"{lo:g}", upper=f"{hi:g}", label=f"confidence {lo:g} - {hi:g}",
            symbol=str(k), render="true")
        _fill_symbol(syms, str(k), c)
    method = _el(r, "classificationMethod", id="Custom")
    _el(method, "symmetricMode", enabled="0", symmetrypoint="0", astride="0")
    _el(method, "labelFormat", format="%1 - %2", labelprecision="2", trimtrailingzeroes="1")
    _el(r, "rotation")
    _el(r, "sizescale")
    return r


def _vector_common(parent: ET.Element, opacity: float) -> None:
    _el(parent, "blendMode", "0")
    _el(parent, "featureBlendMode", "0")
    _el(parent, "layerOpacity", f"{opacity:g}")


# ----------------------------------------------------------------------------- styles


def heatmap_style() -> ET.Element:
    """The heatmap's .qml: pseudocolour 0..1 (the quicklook's heat colours), low heat and nodata transparent."""
    root = _qml({"hasScaleBasedVisibilityFlag": "0", "minScale": "1e+08", "maxScale": "0"})
    pipe = _raster_pipe(root)
    _heatmap_renderer(pipe)
    _pipe_tail(pipe, smooth=True)  # smooth like the quicklook's heat
    _el(root, "blendMode", "0")
    return root


def labels_style(classes: Sequence[str], present: Sequence[int] | None = None,
                 colors: Sequence[Sequence[int]] | None = None) -> ET.Element:
    """The label raster's .qml: a palette of the classes ``present`` (default all), in
    ``colors`` (one per class; default :func:`class_colors`)."""
    present = range(len(classes)) if present is None else present
    root = _qml({"hasScaleBasedVisibilityFlag": "0", "minScale": "1e+08", "maxScale": "0"})
    pipe = _raster_pipe(root)
    _paletted_renderer(pipe, classes, present, colors)
    _pipe_tail(pipe)
    _el(root, "blendMode", "0")
    return root


def tiles_style(classes: Sequence[str], present: Sequence[int] | None = None, *,
                by: str = "label", colors: Sequence[Sequence[int]] | None = None) -> ET.Element:
    """The tile table's .qml: categorised by ``label`` (one category per class present, the
    label raster's colours) or, ``by="confidence"``, graduated by confidence."""
    return _tiles_style(classes, present, by, colors=colors)


def _tiles_style(classes: Sequence[str], present: Sequence[int] | None, by: str, memo: bool = False,
                 colors: Sequence[Sequence[int]] | None = None) -> ET.Element:
    present = range(len(classes)) if present is None else present
    root = _qml({"hasScaleBasedVisibilityFlag": "0", "minScale": "100000000", "maxScale": "0",
                 "labelsEnabled": "0", "readOnly": "0", "simplifyDrawingHints": "1", "simplifyAlgorithm": "0",
                 "simplifyDrawingTol": "1", "simplifyLocal": "1", "simplifyMaxScale": "1",
                 "symbologyReferenceScale": "-1"})
    if by == "label":
        _categorized(root, classes, present, memo, colors)
    elif by == "confidence":
        _graduated_confidence(root)
    else:
        raise ValueError(f"tiles_style: by must be 'label' or 'confidence', got {by!r}")
    _vector_common(root, LABEL_BLEND)
    return root


def write_style(path: str | os.PathLike, style: ET.Element) -> Path:
    """Write a style document (from :func:`heatmap_style` & co., or :func:`memo_style`) as a .qml, atomically."""
    data = _qml_bytes(style.key) if type(style) is _Memo else _to_bytes(style)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def scene_style(bands: Sequence[int], scale: Sequence[Sequence[float]] | None, alpha: int | None = None) -> ET.Element:
    """The scene's style in a project: its RGB bands stretched as the model saw them, and
    ``alpha`` (a band, 1-based) drawn as its transparency."""
    root = _qml({})
    pipe = _raster_pipe(root)
    _rgb_renderer(pipe, bands, scale, alpha)
    _pipe_tail(pipe)
    _el(root, "blendMode", "0")
    return root


def _confidence_style() -> ET.Element:
    return tiles_style((), (), by="confidence")  # the same whatever the classes


def _memo_tiles_style(classes: Sequence[str], present: Sequence[int] | None,
                      colors: Sequence[Sequence[int]] | None = None) -> ET.Element:
    return _tiles_style(classes, present, "label", memo=True, colors=colors)  # the fill symbols memoised one by one


def _symbol(name: str, color: tuple[int, ...]) -> ET.Element:
    holder = ET.Element("symbols")
    _fill_symbol(holder, name, color)
    return holder[0]


_BUILDERS = {"heatmap": heatmap_style, "labels": labels_style, "tiles": _memo_tiles_style,
             "confidence": _confidence_style, "scene": scene_style, "fill": _symbol}
