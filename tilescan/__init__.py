"""tilescan: classify and explain every tile of a GeoTIFF scene."""

__version__ = "0.1.0"
