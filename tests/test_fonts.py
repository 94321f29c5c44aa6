"""Class names DejaVu Sans cannot draw (a legend in Chinese): the quicklook and the figures
draw them in an installed font that has them (here Debian's fonts-wqy-microhei, which
``.ci/run`` installs), or in TILESCAN_FONT; without any, a warning says so.

A name drawn as DejaVu's missing-glyph boxes looks like any other name of the same length,
so the check is what a user sees: two different names give different pixels."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from conftest import unavailable
from tilescan.outputs import fonts
from tilescan.outputs import quicklook_text as qt
from tilescan.outputs.quicklook import write_quicklook

NAMES = ("耕地", "林地")  # cropland, forest land: the same length, one character apart


def _clear():
    for f in (fonts.font_for, fonts._installed, fonts._warn_missing, qt.ink_box, qt.text_len, qt.text_mask):
        f.cache_clear()


@pytest.fixture(autouse=True)
def fresh_caches():
    _clear()
    yield
    _clear()


@pytest.fixture
def cjk_font():
    path = next((p for p in fonts._installed() if {ord(c) for c in "".join(NAMES)} <= fonts._chars(p)), None)
    if path is None:
        unavailable("no installed font has Chinese characters (apt-get install fonts-wqy-microhei)",
                    "TILESCAN_REQUIRE_FONTS")
    return path


@pytest.fixture
def no_installed_fonts(monkeypatch):
    monkeypatch.setattr(fonts, "FONT_DIRS", ())
    monkeypatch.delenv(fonts.FONT_ENV, raising=False)
    _clear()  # the fonts found before


def _quicklook(path, name: str) -> np.ndarray:
    rgb = np.full((96, 128, 3), 120, np.uint8)
    valid = np.ones((96, 128), bool)
    labels = np.zeros((3, 4), np.int64)
    write_quicklook(path, rgb, valid, labels, None, [name, "Other"], scene_size=(128, 96), tile_px=32)
    return np.asarray(Image.open(path).convert("RGB"))


def _figure(path, name: str) -> np.ndarray:
    from tilescan.explain.figures import new_figure, save_figure

    fig = new_figure(2, 1)
    fig.suptitle(name, fontsize=20)
    return np.asarray(Image.open(save_figure(fig, path)).convert("RGB"))


def test_chinese_class_names_are_drawn_in_a_font_that_has_them(cjk_font, tmp_path, caplog):
    assert fonts.font_for(NAMES[0]) == cjk_font and fonts.font_for("Forêt") == fonts.dejavu_path()
    with caplog.at_level(logging.WARNING, logger="tilescan"):
        a, b = (_quicklook(tmp_path / f"{i}.png", n) for i, n in enumerate(NAMES))
        assert a.shape == b.shape and (a != b).any()  # the legend shows two different names
        fa, fb = (_figure(tmp_path / f"fig{i}.png", n) for i, n in enumerate(NAMES))
        assert fa.shape == fb.shape and (fa != fb).any()
    assert not caplog.records


def test_without_such_a_font_a_warning_says_so_and_tilescan_font_is_used(cjk_font, no_installed_fonts, tmp_path,
                                                                         caplog, monkeypatch):
    with caplog.at_level(logging.WARNING, logger="tilescan"):
        a, b = (_quicklook(tmp_path / f"{i}.png", n) for i, n in enumerate(NAMES))
    assert (a == b).all()  # boxes: the two names cannot be told apart
    assert any("no installed font has the characters" in r.getMessage() and "TILESCAN_FONT" in r.getMessage()
               for r in caplog.records), caplog.records
    _clear()
    monkeypatch.setenv(fonts.FONT_ENV, cjk_font)
    a, b = (_quicklook(tmp_path / f"env{i}.png", n) for i, n in enumerate(NAMES))
    assert (a != b).any()
