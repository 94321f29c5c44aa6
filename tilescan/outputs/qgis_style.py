"""QGIS styles (``.qml``) for tilescan's outputs, written as plain XML (QGIS not needed),
and the XML helpers the projects of :mod:`tilescan.outputs.qgis` share.

``heatmap.tif`` is a pseudocolour ramp over 0..1 (the quicklook's jet colours, transparent
for low heat and nodata), ``labels.tif`` a palette with class names, ``tiles.parquet`` /
``tiles.gpkg`` filled by ``label`` in the same colours
(:func:`tilescan.outputs.palette.class_colors`) at the quicklook's label opacity, or
graduated by the model's confidence; the scene is its RGB bands stretched as the model saw them.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Sequence
from xml.etree import ElementTree as ET

from ..log import catching_warnings
from .files import atomic_output
from .geometry import pyproj_crs
from .palette import class_colors
from .quicklook import LABEL_BLEND

__all__ = ["heatmap_style", "labels_style", "scene_style", "tiles_style", "write_style"]

QGIS_VERSION = "3.22.0-Białowieża"
"""Version written into the files: the oldest QGIS they are tested with (Debian 12's)."""

_DOCTYPE = "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"

# The quicklook's heat colours (OpenCV's JET) at its knots, and the opacity of each: low heat
# is transparent so the scene shows through, strong heat opaque.
_JET = ((0.0, (0, 0, 128), 0), (0.125, (0, 0, 255), 64), (0.375, (0, 255, 255), 192),
        (0.625, (255, 255, 0), 255), (0.875, (255, 0, 0), 255), (1.0, (128, 0, 0), 255))
# Confidence classes of the alternative tile style: red (unsure) to green (sure).
_CONFIDENCE = ((0.0, 0.4, (215, 25, 28)), (0.4, 0.6, (253, 174, 97)), (0.6, 0.8, (255, 255, 191)),
               (0.8, 0.9, (166, 217, 106)), (0.9, 1.0, (26, 150, 65)))
_OUTLINE = "40,40,40,255"


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
    pj = pyproj_crs(crs)
    if pj is None:
        return s
    _el(s, "wkt", pj.to_wkt())
    with catching_warnings():  # pyproj warns that PROJ.4 strings lose detail: QGIS reads the WKT
        warnings.simplefilter("ignore")
        try:
            _el(s, "proj4", pj.to_proj4())
        except Exception:  # a CRS without a PROJ.4 form: the WKT is enough
            _el(s, "proj4", "")
    auth = pj.to_authority(min_confidence=100)
    if auth:
        _el(s, "authid", f"{auth[0]}:{auth[1]}")
        if auth[0] == "EPSG":
            _el(s, "srid", auth[1])
    _el(s, "description", pj.name)
    _el(s, "geographicflag", "true" if pj.is_geographic else "false")
    return s


def _units(crs: Any) -> str:
    pj = pyproj_crs(crs)
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
    ET.indent(root, space=" ")
    return (_DOCTYPE + ET.tostring(root, encoding="unicode") + "\n").encode("utf-8")


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


def _heatmap_renderer(parent: ET.Element) -> None:
    r = _el(parent, "rasterrenderer", type="singlebandpseudocolor", band="1", opacity="1", alphaBand="-1",
            classificationMin="0", classificationMax="1", nodataColor="")
    _el(r, "rasterTransparency")
    _min_max_origin(r)
    shader = _el(_el(r, "rastershader"), "colorrampshader", colorRampType="INTERPOLATED", classificationMode="1",
                 clip="1", minimumValue="0", maximumValue="1", labelPrecision="3")
    ramp = _el(shader, "colorramp", type="gradient", name="[source]")
    stops = ":".join(f"{v:g};{_rgb(c, a)}" for v, c, a in _JET[1:-1])
    _options(ramp, {"color1": _rgb(_JET[0][1], _JET[0][2]), "color2": _rgb(_JET[-1][1], _JET[-1][2]),
                    "discrete": "0", "rampType": "gradient", "stops": stops})
    for v, c, a in _JET:
        _el(shader, "item", value=f"{v:g}", color=_hex(c), alpha=str(a), label=f"{v:g}")


def _paletted_renderer(parent: ET.Element, classes: Sequence[str], present: Sequence[int]) -> None:
    r = _el(parent, "rasterrenderer", type="paletted", band="1", opacity="1", alphaBand="-1", nodataColor="")
    _el(r, "rasterTransparency")
    _min_max_origin(r)
    pal = _el(r, "colorPalette")
    colors = class_colors(len(classes))
    for i in present:
        _el(pal, "paletteEntry", value=str(i), color=_hex(colors[i]), alpha="255", label=classes[i])


def _rgb_renderer(parent: ET.Element, bands: Sequence[int], scale: Sequence[Sequence[float]] | None) -> None:
    b = list(bands) + [bands[-1]] * (3 - len(bands)) if bands else [1, 2, 3]
    r = _el(parent, "rasterrenderer", type="multibandcolor", redBand=b[0], greenBand=b[1], blueBand=b[2],
            opacity="1", alphaBand="-1", nodataColor="")
    _el(r, "rasterTransparency")
    _min_max_origin(r, "None" if scale else "MinMax")
    for i, name in enumerate(("red", "green", "blue")):
        ce = _el(r, f"{name}ContrastEnhancement")
        lo, hi = (scale[min(i, len(scale) - 1)] if scale else (0, 255))
        _el(ce, "minValue", repr(float(lo)))
        _el(ce, "maxValue", repr(float(hi)))
        _el(ce, "algorithm", "StretchToMinimumMaximum")


def _categorized(parent: ET.Element, classes: Sequence[str], present: Sequence[int]) -> ET.Element:
    r = _el(parent, "renderer-v2", type="categorizedSymbol", attr="label", symbollevels="0", forceraster="0",
            enableorderby="0", referencescale="-1")
    cats, syms = _el(r, "categories"), _el(r, "symbols")
    colors = class_colors(len(classes))
    for k, i in enumerate(present):
        _el(cats, "category", value=classes[i], label=classes[i], symbol=str(k), render="true")
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
    """The heatmap's .qml: pseudocolour 0..1 (jet), low heat and nodata transparent."""
    root = _qml({"hasScaleBasedVisibilityFlag": "0", "minScale": "1e+08", "maxScale": "0"})
    pipe = _raster_pipe(root)
    _heatmap_renderer(pipe)
    _pipe_tail(pipe, smooth=True)  # smooth like the quicklook's heat
    _el(root, "blendMode", "0")
    return root


def labels_style(classes: Sequence[str], present: Sequence[int] | None = None) -> ET.Element:
    """The label raster's .qml: a palette of the classes ``present`` (default all)."""
    present = range(len(classes)) if present is None else present
    root = _qml({"hasScaleBasedVisibilityFlag": "0", "minScale": "1e+08", "maxScale": "0"})
    pipe = _raster_pipe(root)
    _paletted_renderer(pipe, classes, present)
    _pipe_tail(pipe)
    _el(root, "blendMode", "0")
    return root


def tiles_style(classes: Sequence[str], present: Sequence[int] | None = None, *,
                by: str = "label") -> ET.Element:
    """The tile table's .qml: categorised by ``label`` (one category per class present, the
    label raster's colours) or, ``by="confidence"``, graduated by confidence."""
    present = range(len(classes)) if present is None else present
    root = _qml({"hasScaleBasedVisibilityFlag": "0", "minScale": "100000000", "maxScale": "0",
                 "labelsEnabled": "0", "readOnly": "0", "simplifyDrawingHints": "1", "simplifyAlgorithm": "0",
                 "simplifyDrawingTol": "1", "simplifyLocal": "1", "simplifyMaxScale": "1",
                 "symbologyReferenceScale": "-1"})
    if by == "label":
        _categorized(root, classes, present)
    elif by == "confidence":
        _graduated_confidence(root)
    else:
        raise ValueError(f"tiles_style: by must be 'label' or 'confidence', got {by!r}")
    _vector_common(root, LABEL_BLEND)
    return root


def write_style(path: str | os.PathLike, style: ET.Element) -> Path:
    """Write a style document (from :func:`heatmap_style` & co.) as a .qml, atomically."""
    data = _to_bytes(style)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def scene_style(bands: Sequence[int], scale: Sequence[Sequence[float]] | None) -> ET.Element:
    """The scene's style in a project: its RGB bands stretched as the model saw them."""
    root = _qml({})
    pipe = _raster_pipe(root)
    _rgb_renderer(pipe, bands, scale)
    _pipe_tail(pipe)
    _el(root, "blendMode", "0")
    return root
