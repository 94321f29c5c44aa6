"""Scenes in: finding and checking GeoTIFFs (local, remote, STAC), the tile grid, reading tiles.
"""
