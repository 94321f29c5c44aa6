"""Class names DejaVu Sans cannot draw (a legend in Chinese): the quicklook and the figures
draw them in an installed font that has them (here Debian's fonts-wqy-microhei, which
``.ci/run`` installs), or in TILESCAN_FONT; without any, a warning says so.

A name drawn as DejaVu's missing-glyph boxes looks like any other name of the same length,
so the check is what a user sees: two different names give different pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import scene, tiny_model_file, unavailable
from tilescan.outputs import fonts
from tilescan.outputs import quicklook_text as qt
from tilescan.outputs.quicklook import write_quicklook

NAMES = ("耕地", "林地")  # cropland, forest land: the same length, one character apart


def _clear():
    for f in (fonts.font_for, fonts._installed, qt.ink_box, qt.text_len, qt.text_mask):
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


def test_chinese_class_names_are_drawn_in_a_font_that_has_them(cjk_font, tmp_path):
    assert fonts.font_for(NAMES[0]) == cjk_font and fonts.font_for("Forêt") == fonts.dejavu_path()
    a, b = (_quicklook(tmp_path / f"{i}.png", n) for i, n in enumerate(NAMES))
    assert a.shape == b.shape and (a != b).any()  # the legend shows two different names
    fa, fb = (_figure(tmp_path / f"fig{i}.png", n) for i, n in enumerate(NAMES))
    assert fa.shape == fb.shape and (fa != fb).any()
    said: list[str] = []
    fonts.check_names(NAMES, said.append, "the figures' titles")
    assert not said


def test_a_name_no_font_has_whole_is_drawn_in_the_font_that_has_most_of_it(cjk_font, tmp_path, recwarn):
    """A Chinese name beside a character no installed font has (a private-use one): the
    Chinese drawn, not boxes for all; the one character named once, and no glyph warnings
    of matplotlib's besides."""
    odd = "\ue000"  # in no font
    mixed = [f"{odd} {n}" for n in NAMES]
    assert fonts.font_for(mixed[0]) == cjk_font
    fa, fb = (_figure(tmp_path / f"fig{i}.png", n) for i, n in enumerate(mixed))
    assert (fa != fb).any()  # the two names can be told apart
    assert not [w for w in recwarn if "Glyph" in str(w.message)]
    said: list[str] = []
    fonts.check_names(mixed, said.append, "the figures' titles")
    assert len(said) == 1 and f"the characters {odd!r}" in said[0], said


def test_without_such_a_font_a_warning_says_so_and_tilescan_font_is_used(cjk_font, no_installed_fonts, tmp_path,
                                                                         monkeypatch):
    a, b = (_quicklook(tmp_path / f"{i}.png", n) for i, n in enumerate(NAMES))
    assert (a == b).all()  # boxes: the two names cannot be told apart
    said: list[str] = []
    fonts.check_names(["Forêt", *NAMES], said.append, "the quicklooks' legends")
    assert len(said) == 1 and said[0].startswith("warning: no installed font has the characters '地林耕' of the class "
                                                 "names: they show as boxes in the quicklooks' legends"), said
    assert "TILESCAN_FONT" in said[0] and "fonts-noto-cjk for Chinese" in said[0] and "emoji" not in said[0]
    fonts.check_names(["\U0001F332 trees"], said.append, "the quicklooks' legends")  # an emoji: another package
    assert "fonts-symbola for symbols and emoji" in said[-1] and "cjk" not in said[-1], said
    said.pop()
    _clear()
    monkeypatch.setenv(fonts.FONT_ENV, cjk_font)
    a, b = (_quicklook(tmp_path / f"env{i}.png", n) for i, n in enumerate(NAMES))
    assert (a != b).any()
    fonts.check_names(NAMES, said.append, "the quicklooks' legends")
    assert len(said) == 1


def test_the_confusion_matrix_of_a_name_no_font_has_warns_only_through_check_names(tmp_path, recwarn):
    """evaluate's confusion matrix with a character no font has: no matplotlib glyph warning
    (with its source path) leaks from its layout; check_names says it, once, by name."""
    from tilescan.training.evaluate import plot_confusion

    plot_confusion(np.array([[3, 1], [0, 4]]), ["\ue000 odd", "plain"], tmp_path / "cm.png", "t")
    assert (tmp_path / "cm.png").stat().st_size
    assert not [w for w in recwarn if "Glyph" in str(w.message)], [str(w.message) for w in recwarn]


def test_a_run_says_once_when_its_class_names_would_show_as_boxes(cjk_font, tmp_path, monkeypatch):
    """The warning comes from the run itself (its quicklooks may be drawn in helper processes);
    with the font installed there is none."""
    from tilescan.config import load_config
    from tilescan.pipeline.run import run

    model = tiny_model_file(tmp_path / "m.keras", list(NAMES), 32, seed=0)
    cfg = load_config(overrides={"tiling": {"tile_size": 256, "units": "px"}}, environ={})
    said: list[str] = []
    assert run([scene("rasterio/RGB.byte.tif")], tmp_path / "a", cfg, model_path=str(model), log=said.append).exit_code == 0
    assert not [m for m in said if "font" in m], said
    monkeypatch.setattr(fonts, "FONT_DIRS", ())
    _clear()
    run([scene("rasterio/RGB.byte.tif")], tmp_path / "b", cfg, model_path=str(model), log=said.append)
    assert sum("no installed font has the characters '地林耕'" in m for m in said) == 1, said
