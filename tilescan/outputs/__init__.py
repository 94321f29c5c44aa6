"""Outputs: atomic files, the tile table (GeoParquet, GeoPackage), label and heatmap COGs, quicklook, QGIS styles, STAC Items, collect.
"""
