"""Draw docs/qgis-project.jpg: a tilescan project (.qgs) as QGIS renders it, headless.

Runs under a Python with QGIS's bindings (Debian: ``/usr/bin/python3``, ``python3-qgis``)::

    tilescan run ../shared/data/scenes/opengeos-naip/m_4709963_se_14_1_20190904.tif -o out
    QT_QPA_PLATFORM=offscreen /usr/bin/python3 docs/qgis_figure.py \\
        out/m_4709963_se_14_1_20190904/m_4709963_se_14_1_20190904.qgs docs/qgis-project.jpg

A QGIS print layout with two maps of the project at its saved view, each with the
project's own layer styles: the layers visible when the project opens (the tiles over the
scene) and the heatmap over the scene; and the legend QGIS builds from those styles. The
image's format is its file's suffix (Qt writes it: no GDAL georeferencing of the image).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from qgis.core import (  # noqa: E402
    QgsApplication,
    QgsLayerTree,
    QgsLayoutExporter,
    QgsLayoutItemLabel,
    QgsLayoutItemLegend,
    QgsLayoutItemMap,
    QgsLayoutPoint,
    QgsLayoutSize,
    QgsLegendStyle,
    QgsMapLayerLegendUtils,
    QgsPrintLayout,
    QgsProject,
    QgsUnitTypes,
)
from qgis.PyQt.QtCore import QSize  # noqa: E402
from qgis.PyQt.QtGui import QFont  # noqa: E402


def main(qgs: str, png: str, width_mm: float = 285.0, dpi: int = 110) -> None:
    app = QgsApplication([], False)
    app.initQgis()
    project = QgsProject.instance()
    if not project.read(qgs):
        raise SystemExit(f"{qgs}: QGIS could not read the project")
    by_name = {lyr.name(): lyr for lyr in project.mapLayers().values()}
    root = project.layerTreeRoot()
    visible = [lyr for lyr in root.layerOrder() if root.findLayer(lyr.id()).isVisible()]
    extent = project.viewSettings().defaultViewExtent()

    gap, legend_w, title_h = 4.0, 64.0, 8.0  # the legend wide enough for the heatmap's labelled ends
    map_w = (width_mm - legend_w - 3 * gap) / 2
    map_h = map_w * extent.height() / extent.width()
    layout = QgsPrintLayout(project)
    layout.initializeDefaults()
    page = layout.pageCollection().page(0)
    page.setPageSize(QgsLayoutSize(width_mm, map_h + title_h + 2 * gap, QgsUnitTypes.LayoutMillimeters))

    maps = []
    for k, (title, layers) in enumerate((
            ("as the project opens: tiles by label over the scene", visible),
            ("heatmap layer (Grad-CAM) over the scene", [by_name["heatmap"], by_name["scene"]]))):
        x = gap + k * (map_w + gap)
        m = QgsLayoutItemMap(layout)
        m.setLayers(layers)
        m.setKeepLayerSet(True)
        m.setFrameEnabled(True)
        m.attemptMove(QgsLayoutPoint(x, gap + title_h, QgsUnitTypes.LayoutMillimeters))
        m.attemptResize(QgsLayoutSize(map_w, map_h, QgsUnitTypes.LayoutMillimeters))
        m.setExtent(extent)
        layout.addLayoutItem(m)
        maps.append(m)
        label = QgsLayoutItemLabel(layout)
        label.setText(title)
        label.setFont(QFont("DejaVu Sans", 9))
        label.attemptMove(QgsLayoutPoint(x, gap, QgsUnitTypes.LayoutMillimeters))
        label.attemptResize(QgsLayoutSize(map_w, title_h, QgsUnitTypes.LayoutMillimeters))
        layout.addLayoutItem(label)

    legend = QgsLayoutItemLegend(layout)
    legend.setTitle("")
    legend.setAutoUpdateModel(False)
    tree = QgsLayerTree()
    for name in ("tiles", "heatmap"):
        tree.addLayer(by_name[name])
    legend.model().setRootGroup(tree)
    legend.setLinkedMap(maps[0])
    for style, size in ((QgsLegendStyle.Subgroup, 10), (QgsLegendStyle.SymbolLabel, 9)):
        legend.setStyleFont(style, QFont("DejaVu Sans", size))
    heat_node = tree.findLayer(by_name["heatmap"].id())
    QgsMapLayerLegendUtils.setLegendNodeUserLabel(heat_node, 0, "Grad-CAM, 0..1")  # not "Band 1: heat (Gray)"
    legend.model().refreshLayerLegend(heat_node)
    legend.attemptMove(QgsLayoutPoint(width_mm - legend_w - gap + 2, gap, QgsUnitTypes.LayoutMillimeters))
    layout.addLayoutItem(legend)

    image = QgsLayoutExporter(layout).renderPageToImage(0, QSize(), dpi)
    if image.isNull() or not image.save(png, quality=88):
        raise SystemExit(f"{png}: the layout could not be drawn or saved")
    print(png)
    sys.stdout.flush()
    os._exit(0)  # QGIS's teardown can crash headless after the work is done


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: qgis_figure.py PROJECT.qgs OUT.png")
    main(sys.argv[1], sys.argv[2])
