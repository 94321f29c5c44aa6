"""A legend's own colours: the files a GIS user has them in (`train --class-colors`), kept in
the model, refused clearly when wrong. Outputs in those colours: tests/test_transfer.py (a
style made in QGIS, through train, run and collect, drawn by QGIS) and tests/test_quicklook.py."""

from __future__ import annotations

import json

import pytest

from conftest import invoke, tiny_model_file
from tilescan.outputs.palette import class_colors, model_colors, parse_color, read_class_colors
from tilescan.outputs.qgis_style import labels_style, tiles_style, write_style


def test_colour_spellings():
    assert parse_color("#1f78b4") == parse_color("31,120,180") == parse_color("31, 120, 180, 255") == (31, 120, 180)
    assert parse_color("#fa0") == (255, 170, 0)
    assert parse_color("34,139,34,255,rgb:0.13,0.55,0.13,1") == (34, 139, 34)  # as newer QGIS writes it
    for bad in ("#12345", "red", "300,0,0", "1,2", "#ggg000"):
        with pytest.raises(ValueError):
            parse_color(bad)


def test_text_and_json_colour_files(tmp_path):
    p = tmp_path / "legend.csv"
    p.write_text("# name, colour\nwater,#1f78b4\nbroad-leaved forest\t34,139,34\n\nbare soil,200,180,120,255\n")
    assert read_class_colors(p) == {"water": (31, 120, 180), "broad-leaved forest": (34, 139, 34),
                                    "bare soil": (200, 180, 120)}
    j = tmp_path / "legend.json"
    j.write_text(json.dumps({"Étang": "#1f78b4", "forest": [34, 139, 34]}))
    assert read_class_colors(j) == {"Étang": (31, 120, 180), "forest": (34, 139, 34)}
    bad = tmp_path / "bad.csv"
    bad.write_text("water,#1f78b4\nforest,green\n")
    with pytest.raises(ValueError, match="line 2: 'forest,green'"):
        read_class_colors(bad)
    cut = tmp_path / "cut.qml"
    cut.write_text("<!DOCTYPE qgis><qgis><renderer-v2 type=")
    with pytest.raises(ValueError, match="not a readable QGIS style"):
        read_class_colors(cut)


def test_qgis_exported_colour_map(tmp_path):
    """QGIS's paletted raster "Export Color Map": value,r,g,b,alpha,label (a label may hold commas)."""
    p = tmp_path / "map.txt"
    p.write_text("INTERPOLATION:EXACT\n10,0,100,0,255,Tree cover\n80,0,100,200,255,Permanent water bodies, lakes\n")
    got = read_class_colors(p)
    assert got["Tree cover"] == got["10"] == (0, 100, 0)
    assert got["Permanent water bodies, lakes"] == (0, 100, 200)


def test_tilescans_own_styles_read_back(tmp_path):
    """A label raster's palette and a table's categories (the two kinds of QGIS style) give their colours by name."""
    classes = ["water", "forest", "town"]
    own = [(31, 120, 180), (34, 139, 34), (227, 26, 28)]
    write_style(tmp_path / "labels.qml", labels_style(classes, colors=own))
    write_style(tmp_path / "tiles.qml", tiles_style(classes, colors=own))
    for name in ("labels.qml", "tiles.qml"):
        got = read_class_colors(tmp_path / name)
        assert [got[c] for c in classes] == own, name


def test_model_colours_fall_back_on_the_palette():
    assert model_colors(3, None) == tuple(class_colors(3))
    assert model_colors(2, ["#ff0000", "#00ff00"]) == ((255, 0, 0), (0, 255, 0))
    assert model_colors(3, ["#ff0000"]) == tuple(class_colors(3))  # not one per class: not the legend's


def test_a_model_with_broken_legend_colours_is_refused(tmp_path):
    import zipfile

    path = tiny_model_file(tmp_path / "m.keras", ["a", "b"], 32, seed=1)
    src = zipfile.ZipFile(path)
    meta = json.loads(src.read("tilescan.json"))
    meta["legend"] = {"classes": ["a", "b"], "colors": ["#ff0000", "blue"]}
    bad = tmp_path / "bad.keras"
    with zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, json.dumps(meta) if item.filename == "tilescan.json" else src.read(item))
    res = invoke(["info", bad])
    assert res.exit_code == 5, res.output
    assert "legend.colors" in res.output and "'blue' is not a colour" in res.output and str(bad) in res.output


def test_a_colour_file_train_cannot_use_is_refused_before_any_epoch(tmp_path):
    from PIL import Image

    for cls in ("water", "forest"):
        (tmp_path / "ds" / cls).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (32, 32), (20 * i, 90, 30)).save(tmp_path / "ds" / cls / f"{i}.png")
    other = tmp_path / "other.csv"
    other.write_text("roads,#ff0000\nrail,#000000\n")
    cases = [(tmp_path / "missing.csv", "cannot be used"), (other, "names none of the 2 classes (forest, water)")]
    for path, said in cases:
        res = invoke(["train", tmp_path / "ds", "-o", tmp_path / "m.keras", "--class-colors", path, "--epochs", "1"])
        assert res.exit_code == 2, res.output
        assert said in res.output and "--class-colors" in res.output and str(path) in res.output, res.output
        assert "epoch 1" not in res.output and not (tmp_path / "m.ckpt").exists()
