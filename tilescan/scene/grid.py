"""The tile grid over a scene (windows, their order, the share of valid pixels) and the plan that sized it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
from rasterio.windows import Window

#: Largest tile edge (scene pixels) a reader accepts; a bigger one would need gigabytes
#: per tile (this happens with ``resample_to_gsd`` on a scene far finer than the model).
MAX_TILE_PX = 8192


# --------------------------------------------------------------------------------------
# the grid


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Tile:
    """One cell of a :class:`TileGrid`.

    ``window`` is the full tile (``tile_size`` square); at the right and bottom edges it
    extends past the scene, and that part is padded (and invalid) when read.
    """

    index: int
    """Row-major number of the tile in its grid (``row * n_cols + col``)."""
    row: int
    col: int
    window: Window
    scene_width: int = field(repr=False)
    scene_height: int = field(repr=False)

    @property
    def clipped(self) -> Window:
        """The window intersected with the scene (never empty: tile origins lie inside)."""
        w = self.window
        c0, r0 = int(w.col_off), int(w.row_off)
        return Window(c0, r0, min(c0 + int(w.width), self.scene_width) - c0,
                      min(r0 + int(w.height), self.scene_height) - r0)

    @property
    def size(self) -> int:
        """Tile edge in scene pixels."""
        return int(self.window.width)


@dataclass(frozen=True)
class TileGrid:
    """A grid of square windows over a ``width`` × ``height`` scene.

    With ``T = tile_size`` and ``S = stride`` (``stride = 0`` means ``S = T``; ``S`` may
    not exceed ``T``, or pixels between tiles would be skipped)::

        n_cols = 1 + max(0, ceil((width  - T) / S))
        n_rows = 1 + max(0, ceil((height - T) / S))

    Tile ``(r, c)`` has ``Window(col_off=c*S, row_off=r*S, width=T, height=T)``. Every
    tile origin lies inside the scene; the last column/row of tiles may extend past the
    right/bottom edge and is padded there, so no pixel is dropped. A scene smaller than
    one tile gives exactly one tile. Tiles are numbered in row-major order.
    """

    width: int
    height: int
    tile_size: int
    stride: int = 0
    n_rows: int = field(init=False)
    n_cols: int = field(init=False)

    def __post_init__(self) -> None:
        for name in ("width", "height", "tile_size", "stride"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"TileGrid {name} must be an integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.width < 1 or self.height < 1:
            raise ValueError(f"scene size must be at least 1x1, got {self.width}x{self.height}")
        if self.tile_size < 1:
            raise ValueError(f"tile_size must be >= 1, got {self.tile_size}")
        if self.stride < 0:
            raise ValueError(f"stride must be >= 0 (0 = tile_size), got {self.stride}")
        if self.stride == 0:
            object.__setattr__(self, "stride", self.tile_size)
        if self.stride > self.tile_size:
            raise ValueError(
                f"stride {self.stride} is larger than tile_size {self.tile_size}: "
                "the pixels between tiles would never be read"
            )
        t, s = self.tile_size, self.stride
        object.__setattr__(self, "n_cols", 1 + max(0, _ceil_div(self.width - t, s)))
        object.__setattr__(self, "n_rows", 1 + max(0, _ceil_div(self.height - t, s)))

    def __len__(self) -> int:
        return self.n_rows * self.n_cols

    def tile(self, row: int, col: int) -> Tile:
        if not (0 <= row < self.n_rows and 0 <= col < self.n_cols):
            raise IndexError(f"tile ({row}, {col}) outside a {self.n_rows}x{self.n_cols} grid")
        s, t = self.stride, self.tile_size
        return Tile(row * self.n_cols + col, row, col, Window(col * s, row * s, t, t),
                    self.width, self.height)

    def __getitem__(self, index: int) -> Tile:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"tile index {index} outside a grid of {n} tiles")
        return self.tile(*divmod(index, self.n_cols))

    def tiles(self) -> Iterator[Tile]:
        """All tiles, row-major."""
        return self.rows(0, self.n_rows)

    def __iter__(self) -> Iterator[Tile]:
        return self.tiles()

    def rows(self, start: int, stop: int) -> Iterator[Tile]:
        """Tiles of grid rows ``[start, stop)`` (clamped to the grid), row-major.

        Disjoint row ranges give disjoint tile sets, so a scene can be sharded by rows.
        """
        start, stop = max(0, start), min(self.n_rows, stop)
        for r in range(start, stop):
            for c in range(self.n_cols):
                yield self.tile(r, c)

    def row_ranges(self, count: int) -> list[tuple[int, int]]:
        """Split the grid rows into ``count`` contiguous ``(start, stop)`` ranges whose
        sizes differ by at most one (ranges may be empty when ``count > n_rows``)."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        base, extra = divmod(self.n_rows, count)
        out, start = [], 0
        for i in range(count):
            stop = start + base + (1 if i < extra else 0)
            out.append((start, stop))
            start = stop
        return out


@dataclass(frozen=True, eq=False)
class TileSet:
    """Some tiles of one :class:`TileGrid` as arrays (grid ``row`` and ``col``), in the order
    given: the pipeline's form of a list of :class:`Tile`, so that a batch is sliced, read and
    turned into table rows with array operations instead of one Python object per tile.
    Indexing with a slice or an index array gives a TileSet; iterating gives :class:`Tile`."""

    grid: TileGrid
    row: np.ndarray
    col: np.ndarray

    @classmethod
    def of(cls, grid: TileGrid, tiles: "Sequence[Tile] | TileSet") -> "TileSet":
        """``tiles`` (Tile objects of ``grid``, or a TileSet) as a TileSet."""
        if isinstance(tiles, TileSet):
            return tiles
        return cls(grid, np.array([t.row for t in tiles], np.int64), np.array([t.col for t in tiles], np.int64))

    @classmethod
    def rows_of(cls, grid: TileGrid, start: int, stop: int) -> "TileSet":
        """Every tile of grid rows ``[start, stop)`` (clamped), row-major."""
        start, stop = max(0, start), min(grid.n_rows, stop)
        rows = np.arange(start, max(start, stop), dtype=np.int64)
        return cls(grid, np.repeat(rows, grid.n_cols), np.tile(np.arange(grid.n_cols, dtype=np.int64), len(rows)))

    def __len__(self) -> int:
        return len(self.row)

    def __getitem__(self, k):
        if isinstance(k, (int, np.integer)):
            return self.grid.tile(int(self.row[k]), int(self.col[k]))
        return TileSet(self.grid, self.row[k], self.col[k])

    def __iter__(self) -> Iterator[Tile]:
        tile = self.grid.tile
        return (tile(int(r), int(c)) for r, c in zip(self.row, self.col))

    @property
    def index(self) -> np.ndarray:
        """Row-major tile numbers (``row * n_cols + col``)."""
        return self.row * self.grid.n_cols + self.col

    @property
    def col_off(self) -> np.ndarray:
        return self.col * self.grid.stride

    @property
    def row_off(self) -> np.ndarray:
        return self.row * self.grid.stride

    @property
    def clipped_width(self) -> np.ndarray:
        """Each tile's width inside the scene."""
        return np.minimum(self.col_off + self.grid.tile_size, self.grid.width) - self.col_off

    @property
    def clipped_height(self) -> np.ndarray:
        return np.minimum(self.row_off + self.grid.tile_size, self.grid.height) - self.row_off


def valid_fraction(valid: np.ndarray) -> float:
    """Fraction of the full tile area that is valid (``valid`` covers the whole tile,
    padding included, so a tile half outside the scene has at most 0.5)."""
    return float(np.count_nonzero(valid)) / valid.size if valid.size else 0.0


#: How far (relative) past the edges of a model's range a scale still counts as inside it: a
#: sensor's pixel size moves by this much between projections and UTM zones, and a range of one
#: value (a model trained on chips of one scene) must not turn such a scene away.
SCALE_SLACK = 0.01


def scale_side(value: float, lo: float, hi: float) -> str | None:
    """Where ``value`` (metres per input pixel) lies against the range ``lo``..``hi``, with
    :data:`SCALE_SLACK`: "coarser", "finer", or None inside it."""
    return "coarser" if value > hi * (1 + SCALE_SLACK) else "finer" if value < lo * (1 - SCALE_SLACK) else None


def within_scale(value: float, lo: float, hi: float) -> bool:
    """Whether ``value`` (metres per input pixel) lies in the range ``lo``..``hi`` (:func:`scale_side`)."""
    return scale_side(value, lo, hi) is None


@dataclass(frozen=True)
class TilingPlan:
    """How a scene's tiles were sized, and whether that puts the model at its scale.

    ``scale`` is the outcome: ``in_range`` (one model input pixel is inside the model's
    range), ``resampled`` (``units = "auto"`` sized the tiles in ground units at the
    range's fine edge, a finer scene), ``coarser`` / ``finer`` (the input pixel is outside
    the range: the scene is too coarse for any tiling, or a forced tile size put it there),
    ``unknown`` (no ground sample distance), ``unchecked`` (the model declares no range) or
    ``forced`` (``units``/``resample_to_gsd`` chose and there is nothing to check against).
    """

    tile_px: int
    stride_px: int
    units: str
    reason: str
    scale: str
    scene_gsd_m: float | None = None
    input_gsd_m: float | None = None
    tile_footprint_m: float | None = None
    model_input_gsd_m: tuple[float, float] | None = None
    model_input_size: int | None = None

    @property
    def coarse_pixels(self) -> bool:
        """Whether the scene's own pixels are coarser than the model's range: no tile size helps."""
        rng, gsd = self.model_input_gsd_m, self.scene_gsd_m
        return rng is not None and gsd is not None and scale_side(gsd, *rng) == "coarser"

    def warning(self, path: str) -> dict | None:
        """A structured warning when the labels are outside the model's scale, else None."""
        lo_hi = self.model_input_gsd_m
        if lo_hi is None:
            return None
        lo, hi = lo_hi
        size = self.model_input_size or 0
        model_tiles = f"{_metres(lo * size)}–{_metres(hi * size)} tiles"
        if self.scene_gsd_m is None:
            msg = (f"{path}: the scene's ground sample distance is unknown (no usable "
                   f"georeferencing), so tilescan cannot check it against the model's scale "
                   f"({lo:.3g}–{hi:.3g} m per input pixel, {model_tiles}); labels are only "
                   "meaningful if its tiles cover about that much ground")
            code = "scale_unknown"
        elif self.input_gsd_m is not None and self.scene_gsd_m > self.input_gsd_m and self.coarse_pixels:
            msg = (f"{path}: scene at {_metres(self.scene_gsd_m)} per pixel, coarser than the model's range "
                   f"({lo:.3g}–{hi:.3g} m per input pixel, {model_tiles}): its {self.tile_px}-px tiles, enlarged to "
                   f"{size} px, cover {_metres(self.tile_footprint_m)} at {_metres(self.input_gsd_m)} per input pixel but "
                   f"hold only the detail of {_metres(self.scene_gsd_m)} pixels: its labels are not meaningful at "
                   "this scale, whatever the tile size")
            code = "scale_out_of_range"
        elif self.input_gsd_m is not None and (side := scale_side(self.input_gsd_m, lo, hi)):
            msg = (f"{path}: scene at {_metres(self.scene_gsd_m)} per pixel; its {self.tile_px}-px tiles "
                   f"cover {_metres(self.tile_footprint_m)} at {_metres(self.input_gsd_m)} per model input "
                   f"pixel, {side} than the model's range ({lo:.3g}–{hi:.3g} m per input pixel, "
                   f"{model_tiles}): its labels are not meaningful at this scale")
            code = "scale_out_of_range"
        else:
            return None
        return {"code": code, "message": msg, "scene_gsd_m": self.scene_gsd_m,
                "tile_px": self.tile_px, "input_gsd_m": self.input_gsd_m,
                "tile_footprint_m": self.tile_footprint_m, "model_input_gsd_m": list(lo_hi),
                "model_tile_footprint_m": [lo * size, hi * size]}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model_input_gsd_m"] = list(self.model_input_gsd_m) if self.model_input_gsd_m else None
        return d


def scale_note(details: Sequence[dict]) -> str | None:
    """What the outputs say when the labels are outside the model's scale (or it cannot be
    known): from the unit's structured warning, without its path; None when in range."""
    for d in details:
        lo, hi = d.get("model_input_gsd_m") or (None, None)
        if d["code"] == "scale_out_of_range":
            pixels, per_input = d.get("scene_gsd_m") or 0.0, d["input_gsd_m"]
            if pixels > per_input and scale_side(pixels, lo, hi) == "coarser":  # coarse pixels enlarged to the input
                at, side = f"{_metres(pixels)} pixels, enlarged to {_metres(per_input)} per model input pixel", "coarser"
            else:
                at, side = f"{_metres(per_input)} per model input pixel", "coarser" if per_input > hi else "finer"
            return (f"these labels are not meaningful at this scale: {at}, {side} than the model's range of "
                    f"{lo:.3g}–{hi:.3g} m (run.json: warning_details)")
        if d["code"] == "scale_unknown":
            return (f"the scene's ground scale is unknown, so these labels could not be checked against the "
                    f"model's range of {lo:.3g}–{hi:.3g} m per input pixel (run.json: warning_details)")
    return None


def _metres(m: float | None) -> str:
    if m is None:
        return "unknown ground"
    return f"{m / 1000:,.0f} km" if m >= 999_500 else f"{m / 1000:.3g} km" if m >= 1000 else f"{m:.3g} m"
