"""Open tilescan's outputs in a real, headless QGIS and report what QGIS sees, as JSON.

Runs under a Python that has QGIS's bindings (Debian: ``/usr/bin/python3`` with the
``python3-qgis`` package), not the project's venv::

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 tests/qgis_check.py SPEC.json

SPEC.json::

    {"layers":   [{"path": "OUT/scene/heatmap.tif", "kind": "raster"}, ...],
     "projects": ["OUT/scene/scene.qgs", ...],
     "renders":  [{"project": "...qgs", "png": "out.png", "size": [w, h],
                   "layers": null or ["labels", ...],   # null: the layers visible in the project
                   "points": [[x, y], ...]}],            # map coordinates to sample
     "styles":   [{"vector": "labels.gpkg", "field": "class",  # a user's legend styled in QGIS,
                   "colors": {"water": [r, g, b], ...},      # saved as a .qml ("Save Style...")
                   "qml": "legend.qml"}]}

Each layer is opened as QGIS's "Add Layer" opens a file (its default style, ``<name>.qml``,
applied); each project is read with ``QgsProject.read``; each render draws the project's
layers with ``QgsMapRendererParallelJob`` at the project's default view; each style is a
categorised renderer of a vector layer by a field, saved as QGIS saves a layer's style.
Prints one JSON object: ``qgis`` (version), ``layers``, ``projects``, ``renders``, ``styles``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from qgis.core import (  # noqa: E402
    Qgis,
    QgsApplication,
    QgsFeatureSource,
    QgsMapRendererParallelJob,
    QgsMapSettings,
    QgsPointXY,
    QgsProject,
    QgsCategorizedSymbolRenderer,
    QgsRasterLayer,
    QgsRendererCategory,
    QgsSymbol,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QSize  # noqa: E402
from qgis.PyQt.QtGui import QColor  # noqa: E402


def _color(c: QColor) -> list[int]:
    return [c.red(), c.green(), c.blue(), c.alpha()]


def renderer_info(layer) -> dict:
    """The renderer's type and what defines it (ramp items, palette, categories)."""
    r = layer.renderer()
    if r is None:
        return {"type": None}
    out = {"type": r.type()}
    t = r.type()
    if t == "singlebandpseudocolor":
        fn = r.shader().rasterShaderFunction()
        out.update(min=r.classificationMin(), max=r.classificationMax(), band=r.band(),
                   ramp_type=int(fn.colorRampType()),
                   items=[{"value": i.value, "color": _color(i.color), "label": i.label} for i in fn.colorRampItemList()])
        legend = fn.legendSettings()  # QGIS >= 3.18: the ramp drawn as one bar, its ends labelled (or not)
        out["ramp_legend"] = {"continuous": legend.useContinuousLegend(), "min_label": legend.minimumLabel(),
                              "max_label": legend.maximumLabel()}
    elif t == "paletted":
        out.update(band=r.band(), classes=[{"value": c.value, "color": _color(c.color), "label": c.label}
                                           for c in r.classes()])
    elif t == "multibandcolor":
        out.update(bands=[r.redBand(), r.greenBand(), r.blueBand()])
        ce = r.redContrastEnhancement()
        if ce is not None:
            out["red_stretch"] = [ce.minimumValue(), ce.maximumValue()]
    elif t == "categorizedSymbol":
        out.update(attribute=r.classAttribute(),
                   categories=[{"value": c.value(), "label": c.label(), "color": _color(c.symbol().color())}
                               for c in r.categories()])
    elif t == "graduatedSymbol":
        out.update(attribute=r.classAttribute(),
                   ranges=[[g.lowerValue(), g.upperValue()] for g in r.ranges()])
    return out


def layer_info(layer) -> dict:
    info = {"name": layer.name(), "valid": layer.isValid(), "source": layer.source(),
            "crs": layer.crs().authid(), "crs_valid": layer.crs().isValid(), "opacity": layer.opacity()}
    if not layer.isValid():
        return info
    info["renderer"] = renderer_info(layer)
    sm = layer.styleManager()
    info["styles"] = sm.styles()
    info["current_style"] = sm.currentStyle()
    if isinstance(layer, QgsVectorLayer):
        info["features"] = layer.featureCount()
        info["fields"] = layer.fields().names()
        info["provider"] = layer.dataProvider().storageType()
        alt = {}
        for name in sm.styles():  # each named style's renderer, then back to the current one
            if name != sm.currentStyle():
                current = sm.currentStyle()
                sm.setCurrentStyle(name)
                alt[name] = renderer_info(layer)
                sm.setCurrentStyle(current)
        info["other_styles"] = alt
    else:
        info["bands"] = layer.bandCount()
    return info


_MESSAGES: list[str] = []


def _log(message, tag, level) -> None:
    _MESSAGES.append(f"{tag}: {message}")


def open_layer(spec: dict) -> dict:
    path = spec["path"]
    name = os.path.splitext(os.path.basename(path))[0]
    _MESSAGES.clear()
    if spec.get("kind") == "vector":
        layer = QgsVectorLayer(path, name, "ogr")
    else:
        layer = QgsRasterLayer(path, name)
    info = {"path": path, **layer_info(layer)}
    if isinstance(layer, QgsVectorLayer) and layer.isValid():
        info["spatial_index"] = layer.hasSpatialIndex() == QgsFeatureSource.SpatialIndexPresent
    QgsApplication.processEvents()
    info["messages"] = list(_MESSAGES)  # what QGIS logged while opening it
    info["gdal_messages"] = gdal_messages(path)
    return info


def gdal_messages(path: str) -> list[str]:
    """GDAL's warnings and errors on opening ``path`` (QGIS does not log them)."""
    from osgeo import gdal

    msgs: list[str] = []
    gdal.PushErrorHandler(lambda cls, no, msg: msgs.append(msg))
    try:
        gdal.OpenEx(path)
    except RuntimeError as exc:  # with gdal.UseExceptions() set elsewhere
        msgs.append(str(exc))
    finally:
        gdal.PopErrorHandler()
    return msgs


def read_project(path: str) -> dict:
    project = QgsProject.instance()
    project.clear()
    ok = project.read(path)
    root = project.layerTreeRoot()
    layers = []
    for layer in root.layerOrder():
        node = root.findLayer(layer.id())
        layers.append({**layer_info(layer), "visible": bool(node and node.isVisible()),
                       "group": node.parent().name() if node and node.parent() is not root else None})
    ext = project.viewSettings().defaultViewExtent()
    return {"path": path, "read": ok, "crs": project.crs().authid(), "title": project.title(),
            "absolute_paths": project.filePathStorage() == Qgis.FilePathType.Absolute
            if hasattr(Qgis, "FilePathType") else None,
            "view_extent": [ext.xMinimum(), ext.yMinimum(), ext.xMaximum(), ext.yMaximum()],
            "layers": layers}


def render(spec: dict) -> dict:
    project = QgsProject.instance()
    project.clear()
    if not project.read(spec["project"]):
        return {"project": spec["project"], "error": "project not read"}
    root = project.layerTreeRoot()
    order = root.layerOrder()  # top first
    if spec.get("layers") is None:
        layers = [lyr for lyr in order if root.findLayer(lyr.id()).isVisible()]
    else:
        layers = [lyr for name in spec["layers"] for lyr in order if lyr.name() == name]
    settings = QgsMapSettings()
    settings.setLayers(layers)
    settings.setDestinationCrs(project.crs())
    settings.setBackgroundColor(QColor(255, 255, 255))
    w, h = spec.get("size", [800, 600])
    settings.setOutputSize(QSize(w, h))
    settings.setExtent(project.viewSettings().defaultViewExtent())
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    img = job.renderedImage()
    if spec.get("png"):
        img.save(spec["png"], "PNG")
    m2p = settings.mapToPixel()
    samples = []
    for x, y in spec.get("points", []):
        p = m2p.transform(QgsPointXY(x, y))
        px, py = int(p.x()), int(p.y())
        inside = 0 <= px < img.width() and 0 <= py < img.height()
        samples.append({"xy": [x, y], "pixel": [px, py],
                        "rgba": _color(QColor.fromRgba(img.pixel(px, py))) if inside else None})
    return {"project": spec["project"], "layers": [lyr.name() for lyr in layers], "size": [img.width(), img.height()],
            "errors": [e.message for e in job.errors()], "samples": samples}


def save_style(spec: dict) -> dict:
    """A vector layer categorised by ``field`` in the given colours, its style saved as ``qml``."""
    layer = QgsVectorLayer(spec["vector"], "labels", "ogr")
    cats = []
    for value, rgb in spec["colors"].items():
        sym = QgsSymbol.defaultSymbol(layer.geometryType())
        sym.setColor(QColor(*rgb))
        cats.append(QgsRendererCategory(value, sym, value))
    layer.setRenderer(QgsCategorizedSymbolRenderer(spec["field"], cats))
    message, ok = layer.saveNamedStyle(spec["qml"])
    return {"valid": layer.isValid(), "saved": bool(ok), "message": message}


def main(argv: list[str]) -> int:
    with open(argv[0]) as fh:
        spec = json.load(fh)
    app = QgsApplication([], False)
    app.initQgis()
    QgsApplication.messageLog().messageReceived.connect(_log)
    try:
        out = {"qgis": Qgis.QGIS_VERSION,
               "layers": [open_layer(s) for s in spec.get("layers", [])],
               "projects": [read_project(p) for p in spec.get("projects", [])],
               "renders": [render(s) for s in spec.get("renders", [])],
               "styles": [save_style(s) for s in spec.get("styles", [])]}
    finally:
        QgsProject.instance().clear()
    print(json.dumps(out))
    sys.stdout.flush()
    os._exit(0)  # skip QGIS's teardown, which can crash headless after the work is done


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
