"""Train / val / test splits of labelled chips that keep neighbours together.

Neighbouring tiles of a scene look alike, so a split that scatters them at random puts
near-copies of the val and test chips into train and overstates accuracy. The default
split hands out whole spatial blocks (squares of ``block_m`` metres on a grid shared by
all scenes) or whole scenes; ``random`` (stratified by class, chip by chip) stays for
comparison. Groups are dealt to the splits in a seeded order, each to the split furthest
below its target share; of many seeded orders the one kept has every class in train, then
as many classes as possible in val and test, then shares closest to the targets. Chips of
val or test that overlap a train chip (overlapping tiles or scenes across a block edge)
are dropped, and a test chip overlapping a val chip too.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import InputError

SPLITS = ("train", "val", "test")
METHODS = ("blocks", "scene", "random", "test")
TRIES = 400


class NoDeal(InputError):
    """No deal of the groups meets the rules: ``missing`` classes (indexes) stay out of
    train, or (``missing`` empty) val gets no chip."""

    def __init__(self, message: str, missing: Sequence[int] = ()):
        super().__init__(message)
        self.missing = list(missing)


@dataclass
class SplitResult:
    split: np.ndarray
    """Per chip: ``train``, ``val``, ``test``, or ``""`` (dropped: overlaps another split)."""
    group: np.ndarray
    """Per chip: the block (``"x,y"`` block indexes), the scene, or the chip's own name."""
    info: dict = field(default_factory=dict)


def block_keys(x: np.ndarray, y: np.ndarray, block_m: float) -> np.ndarray:
    """``"i,j"`` block of each point: ``floor(x / block_m)``, ``floor(y / block_m)``."""
    i = np.floor(np.asarray(x, dtype=np.float64) / block_m).astype(np.int64)
    j = np.floor(np.asarray(y, dtype=np.float64) / block_m).astype(np.int64)
    return np.array([f"{a},{b}" for a, b in zip(i, j)], dtype=object)


def counts_table(split: np.ndarray, y: np.ndarray, classes: Sequence[str]) -> dict[str, dict[str, int]]:
    """``{split: {class: chips}}`` for the three splits."""
    return {s: {c: int(np.count_nonzero((split == s) & (y == i))) for i, c in enumerate(classes)} for s in SPLITS}


def _deal(order: Sequence[int], sizes: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Give each group (in ``order``) to the split with the largest shortfall."""
    got = np.zeros(3)
    out = np.zeros(len(sizes), dtype=np.int64)
    for g in order:
        s = int(np.argmax(targets - got))
        out[g] = s
        got[s] += sizes[g]
    return out


def choose(groups: np.ndarray, y: np.ndarray, k: int, val_fraction: float, test_fraction: float,
           seed: int, tries: int = TRIES) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) of every chip, whole groups at a time (see the
    module docstring). Raises :class:`NoDeal` when no deal puts every class into train
    (and some chip into val when ``val_fraction`` > 0)."""
    names, inv = np.unique(groups.astype(str), return_inverse=True)
    per = np.zeros((len(names), k), dtype=np.int64)
    np.add.at(per, (inv, y), 1)
    sizes = per.sum(axis=1)
    n = int(sizes.sum())
    frac = np.array([1.0 - val_fraction - test_fraction, val_fraction, test_fraction])
    targets = frac * n
    best, best_score = None, None
    for t in range(tries):
        order = np.random.default_rng([seed, t]).permutation(len(names))
        deal = _deal(order, sizes, targets)
        have = np.stack([per[deal == s].sum(axis=0) for s in range(3)])  # (3, k)
        score = (
            1e6 * int(np.count_nonzero(have[0] == 0))
            + 1e4 * int(val_fraction > 0 and have[1].sum() == 0)
            + 1e2 * (int(np.count_nonzero(have[1] == 0)) * (val_fraction > 0)
                     + int(np.count_nonzero(have[2] == 0)) * (test_fraction > 0))
            + float(np.abs(have.sum(axis=1) - targets).sum()) / max(1, n)
        )
        if best_score is None or score < best_score:
            best, best_score = deal, score
    have = np.stack([per[best == s].sum(axis=0) for s in range(3)])
    if (have[0] == 0).any():
        missing = [int(c) for c in np.flatnonzero(have[0] == 0)]
        raise NoDeal(f"no split of the {len(names)} group(s) puts every class into train", missing)
    if val_fraction > 0 and have[1].sum() == 0:
        raise NoDeal(f"no split of the {len(names)} group(s) leaves any chip for val once every class is in train")
    return best[inv]


def assign(method: str, *, y: np.ndarray, classes: Sequence[str], names: np.ndarray, scene: np.ndarray,
           centres: np.ndarray | None = None, footprints=None, block_m: float | None = None,
           val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 20261126) -> SplitResult:
    """Split chips (class ``y``, file name ``names``, scene number ``scene``, centre
    ``centres`` (N, 2) in metres on a grid shared by all scenes, ``footprints`` shapely
    polygons in the same frame) by ``method``: ``blocks``, ``scene``, ``random`` or
    ``test`` (every chip in test: a dataset only for scoring)."""
    if method not in METHODS:
        raise ValueError(f"split method must be one of {METHODS}, got {method!r}")
    if not (0.0 <= val_fraction < 1 and 0.0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise InputError(f"val and test fractions must be in [0, 1) and sum below 1, got {val_fraction} and {test_fraction}")
    n, k = len(y), len(classes)
    info: dict = {"method": method, "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction}
    if method == "test":
        split = np.full(n, "test", dtype=object)
        return SplitResult(split, np.array(names, dtype=object), {**info, "val_fraction": 0.0, "test_fraction": 1.0,
                                                                  "counts": counts_table(split, y, classes)})
    if method == "random":
        from .data import stratified_split

        parts = stratified_split([(str(nm), int(c)) for nm, c in zip(names, y)], val_fraction, test_fraction, seed)
        where = {nm: s for s, items in parts.items() for nm, _ in items}
        split = np.array([where[str(nm)] for nm in names], dtype=object)
        groups = np.array(names, dtype=object)
    else:
        if method == "blocks":
            if block_m is None or not block_m > 0 or centres is None:
                raise ValueError("blocks need block_m > 0 and the chip centres")
            groups = block_keys(centres[:, 0], centres[:, 1], block_m)
            info["block_m"] = float(block_m)
        else:
            groups = np.array([f"scene{int(s)}" for s in scene], dtype=object)
        try:
            idx = choose(groups, y, k, val_fraction, test_fraction, seed)
        except NoDeal as exc:
            per_group = "block" if method == "blocks" else "scene"
            msg = exc.message
            if exc.missing:
                msg = (f"class(es) {', '.join(repr(classes[c]) for c in exc.missing)} would be left out of train: "
                       f"no split of the {len(set(groups))} {per_group}s keeps every class in train")
            more = "smaller blocks (--block-size), " if method == "blocks" else "more scenes, "
            raise InputError(f"{msg}. Label more {per_group}s of each class, use {more}"
                             "fewer val/test chips (--val-fraction, --test-fraction), or --split random (optimistic scores)") from None
        split = np.array(SPLITS, dtype=object)[idx]
    # every class must be in train, whatever the method
    have = counts_table(split, y, classes)
    missing = [c for c in classes if have["train"][c] == 0]
    if missing:
        raise InputError(f"the {method} split leaves class(es) {', '.join(map(repr, missing))} out of train; "
                         "label more of them")
    dropped = 0
    if method in ("blocks", "scene") and footprints is not None and n:
        split, dropped = _drop_overlaps(split, footprints)
        if val_fraction > 0 and not (split == "val").any():
            advice = ("--split scene for overlapping scenes of different places, larger blocks, "
                      if method == "blocks" else "scenes that do not overlap (several years of one place share its "
                                                 "ground), ")
            raise InputError(f"every val chip overlaps a train chip (overlapping scenes or tiles): the {method} split "
                             f"has nothing left for val; use {advice}or a stride equal to the tile size")
    info["dropped_overlap"] = int(dropped)
    info["groups"] = {s: int(len(set(groups[split == s]))) for s in SPLITS}
    info["counts"] = counts_table(split, y, classes)
    return SplitResult(split, groups, info)


def _drop_overlaps(split: np.ndarray, footprints, min_share: float = 0.01) -> tuple[np.ndarray, int]:
    """Drop val chips that overlap a train chip, and test chips that overlap a train or val
    chip, by more than ``min_share`` of their area (edges shared by neighbours do not count)."""
    import shapely

    fp = np.asarray(footprints, dtype=object)
    split = split.copy()
    dropped = 0
    for s, against in (("val", ("train",)), ("test", ("train", "val"))):
        mine = np.flatnonzero(split == s)
        other = np.flatnonzero(np.isin(split, against))
        if not len(mine) or not len(other):
            continue
        tree = shapely.STRtree(fp[other])
        a, b = tree.query(fp[mine], predicate="intersects")
        if not len(a):
            continue
        share = shapely.area(shapely.intersection(fp[mine][a], fp[other][b])) / np.maximum(shapely.area(fp[mine][a]), 1e-12)
        bad = np.unique(mine[a[share > min_share]])
        split[bad] = ""
        dropped += len(bad)
    return split, dropped


def _columns(text: str) -> int:
    """The terminal columns ``text`` takes: an East Asian wide character two, a combining mark none."""
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def format_counts(counts: dict[str, dict[str, int]], classes: Sequence[str]) -> str:
    """A small text table: one row per class, a column per split, totals (aligned in a
    terminal whatever the script of the class names)."""
    w = max([5] + [_columns(c) for c in classes])
    lines = [f"{'class':<{w}}  {'train':>6} {'val':>6} {'test':>6}"]
    for c in classes:
        lines.append(c + " " * (w - _columns(c)) + "  " + " ".join(f"{counts[s][c]:>6}" for s in SPLITS))
    lines.append(f"{'total':<{w}}  " + " ".join(f"{sum(counts[s].values()):>6}" for s in SPLITS))
    return "\n".join(lines)


def auto_block_m(footprint_m: float, tiles: int = 4) -> float:
    """Default block edge: ``tiles`` tile footprints, rounded up to a whole 10 m."""
    return float(math.ceil(footprint_m * tiles / 10.0) * 10.0)
