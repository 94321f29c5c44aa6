"""A legend's own colours: the files a GIS user has them in (`train --class-colors`), kept in
the model, refused clearly when wrong. Outputs in those colours: tests/test_transfer.py (a
style made in QGIS, through train, run and collect, drawn by QGIS) and tests/test_quicklook.py."""

from __future__ import annotations

import json

import pytest

from conftest import invoke, tiny_model_file
from tilescan.outputs.palette import class_colors, model_colors, parse_color
from tilescan.training.legend_colors import legend_colors, read_class_colors
from tilescan.outputs.qgis_style import labels_style, tiles_style, write_style


def test_colour_spellings():
    assert parse_color("#1f78b4") == parse_color("31,120,180") == parse_color("31, 120, 180, 255") == (31, 120, 180)
    assert parse_color("#fa0") == (255, 170, 0)
    assert parse_color("34,139,34,255,rgb:0.13,0.55,0.13,1") == (34, 139, 34)  # as newer QGIS writes it
    for bad in ("#12345", "red", "300,0,0", "1,2", "#ggg000"):  # a model's colours: as stored
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
    semi = tmp_path / "semi.csv"  # a header line, ';' as a spreadsheet writes it
    semi.write_text("class;color\nwater;0,0,255\n")
    assert read_class_colors(semi) == {"water": (0, 0, 255)}
    for text, said in (("water,#1f78b4\nwater,#ff0000\n", "'water' is given #ff0000 and, before, #1f78b4"),
                       ("water,#ff0000ff\n", "8 hex digits"), ('{"water": 5}', "'water': 5 is not a colour")):
        (tmp_path / "x.txt").write_text(text)
        with pytest.raises(ValueError, match=said):
            read_class_colors(tmp_path / "x.txt")
    (tmp_path / "latin.txt").write_bytes("forêt,#00ff00\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8 text"):
        read_class_colors(tmp_path / "latin.txt")
    bad = tmp_path / "bad.csv"
    bad.write_text("water,#1f78b4\nforest,greenish\n")
    with pytest.raises(ValueError, match="line 2: 'forest,greenish'"):
        read_class_colors(bad)
    bad.write_text("built-up;reddish\n")  # one line whose colour is none: a header with nothing after it, said so
    with pytest.raises(ValueError, match="line 1: 'built-up;reddish' is read as a header .*, and no line follows it"):
        read_class_colors(bad)
    bad.write_text(",#ff0000\n")  # a colour without a name: nothing named, no header to blame
    assert read_class_colors(bad) == {}
    bad.write_text("built-up;red\nwater,steelblue\n")  # a colour name on line 1: a line, not a header
    assert read_class_colors(bad) == {"built-up": (255, 0, 0), "water": (70, 130, 180)}
    for head in ("class,r,g,b", "name,red,green,blue", "Klasse;Farbe"):  # headers as spreadsheets write them
        bad.write_text(f"{head}\nwater,0,0,255\n")
        assert read_class_colors(bad) == {"water": (0, 0, 255)}, head
    bad.write_text("Class Name,Hex Code\nwater,#0000ff\n")
    assert read_class_colors(bad) == {"water": (0, 0, 255)}
    cut = tmp_path / "cut.qml"
    cut.write_text("<!DOCTYPE qgis><qgis><renderer-v2 type=")
    with pytest.raises(ValueError, match="not a readable QGIS style"):
        read_class_colors(cut)


def test_qgis_exported_colour_map(tmp_path):
    """QGIS's paletted raster "Export Color Map", as QGIS 3.22 writes it (a comment line first):
    value,r,g,b,alpha,label, the label as it is, commas included."""
    p = tmp_path / "map.txt"
    p.write_text("# QGIS Generated Color Map Export File\nINTERPOLATION:EXACT\n10,0,100,0,255,Tree cover\n"
                 "80,0,100,200,255,Bare,sandy\n")
    got = read_class_colors(p)
    assert got["Tree cover"] == got["10"] == (0, 100, 0)
    assert got["Bare,sandy"] == (0, 100, 200)


def _qml(symbols: str) -> str:
    """A categorised style as QGIS 3.22 saves it, its symbols' layers given."""
    return ('<!DOCTYPE qgis><qgis version="3.22.16"><renderer-v2 type="categorizedSymbol" attr="class"><categories>'
            '<category render="true" value="water" symbol="0" label="Water"/>'
            '<category render="true" value="road" symbol="1" label="Road"/></categories><symbols>' + symbols +
            '</symbols><source-symbol><symbol type="fill" name="0"><layer class="SimpleFill"><Option type="Map">'
            '<Option type="QString" value="1,2,3,255" name="color"/></Option></layer></symbol></source-symbol>'
            '</renderer-v2></qgis>')


def _layer(kind: str, **props) -> str:
    opts = "".join(f'<Option type="QString" value="{v}" name="{k}"/>' for k, v in props.items())
    return f'<layer class="{kind}"><Option type="Map">{opts}</Option></layer>'


def test_the_colour_each_kind_of_qgis_symbol_draws(tmp_path):
    """A fill's colour, a line's (line_color), and a fill drawn as its outline only (labels
    over imagery): the outline's; not the source symbol's."""
    p = tmp_path / "s.qml"
    p.write_text(_qml(f'<symbol type="fill" name="0">{_layer("SimpleFill", color="190,178,151,255", style="no", outline_color="31,120,180,255")}</symbol>'
                      f'<symbol type="line" name="1">{_layer("SimpleLine", line_color="227,26,28,255")}</symbol>'))
    got = read_class_colors(p)
    assert got["water"] == got["Water"] == (31, 120, 180) and got["road"] == (227, 26, 28)
    p.write_text('<!DOCTYPE qgis><qgis><renderer-v2 type="graduatedSymbol" attr="x"><ranges/></renderer-v2></qgis>')
    with pytest.raises(ValueError, match="its renderer: graduatedSymbol.*Categorized"):
        read_class_colors(p)


def test_tilescans_own_styles_read_back(tmp_path):
    """A label raster's palette and a table's categories (the two kinds of QGIS style) give their colours by name."""
    classes = ["water", "forest", "town"]
    own = [(31, 120, 180), (34, 139, 34), (227, 26, 28)]
    write_style(tmp_path / "labels.qml", labels_style(classes, colors=own))
    write_style(tmp_path / "tiles.qml", tiles_style(classes, colors=own))
    for name in ("labels.qml", "tiles.qml"):
        got = read_class_colors(tmp_path / name)
        assert [got[c] for c in classes] == own, name


class _Parent:
    model_id = "parent"

    def __init__(self, classes, colors):
        self.meta = {"classes": classes, "legend": {"colors": colors}}


def test_each_class_gets_its_colour_by_any_name_it_had_and_no_two_the_same(tmp_path):
    """By the name in any Unicode form, then ignoring case, or by the labels' name a chips class
    was renamed from; the file over a parent's colours; palette colours no class has for the rest."""
    import unicodedata

    said: list[str] = []
    nfd = unicodedata.normalize("NFD", "Forêt")
    (p := tmp_path / "c.txt").write_text(f"{nfd},#00ff00\nCrop/fallow,#ffff00\nURBAN,#ff0000\n")
    parent = _Parent(["Water", "Urban", "Other"], ["#0000ff", "#000000", "#e6194b"])
    got = legend_colors(str(p), "--class-colors", ["Forêt", "Crop_fallow", "Urban", "Water", "Other", "New"],
                        parent, said.append, {"Crop_fallow": "Crop/fallow"})
    assert got["colors"][:5] == ["#00ff00", "#ffff00", "#ff0000", "#0000ff", "#e6194b"]
    assert got["colors"][5] not in got["colors"][:5]
    assert _lab_gap(got["colors"][5], got["colors"][:5]) > 40  # far from each given one, not the palette's near-red
    assert got["colors_from"] == "c.txt, then the parent parent"
    assert any("gives no colour for 1 class(es) ('New')" in m for m in said), said
    said.clear()
    p.write_text("a,#ff0000\nb,#ff0000\n")
    legend_colors(str(p), "--class-colors", ["a", "b"], None, said.append)
    assert any("classes 'a', 'b' have the same colour #ff0000" in m for m in said), said
    p.write_text("built-up,#e31a1c\nforest,#33a02c\n")  # the palette's first two, but for a shade
    got = legend_colors(str(p), "--class-colors", ["built-up", "cropland", "forest", "grassland"], None, said.append)
    given = [got["colors"][0], got["colors"][2]]
    assert min(_lab_gap(got["colors"][i], given) for i in (1, 3)) > 40 and _lab_gap(got["colors"][1], [got["colors"][3]]) > 40


def _lab_gap(colour: str, others: list[str]) -> float:
    """The CIELAB distance from ``colour`` to the nearest of ``others`` (#rrggbb each)."""
    import numpy as np

    from tilescan.outputs.palette import srgb_to_lab

    lab = srgb_to_lab(np.array([parse_color(c) for c in [colour, *others]]))
    return float(np.linalg.norm(lab[1:] - lab[0], axis=1).min())


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
    (tmp_path / "empty.csv").write_text("")
    cases = [(tmp_path / "missing.csv", "cannot be used"), (other, "names none of the 2 classes ('forest', 'water')"),
             (tmp_path / "empty.csv", "it names none (it is empty)")]
    for path, said in cases:
        res = invoke(["train", tmp_path / "ds", "-o", tmp_path / "m.keras", "--class-colors", path, "--epochs", "1"])
        assert res.exit_code == 2, res.output
        assert said in res.output and "--class-colors" in res.output and str(path) in res.output, res.output
        assert "epoch 1" not in res.output and not (tmp_path / "m.ckpt").exists()


def test_a_colour_file_nested_too_deep_is_refused_by_name(tmp_path):
    """JSON nested thousands deep (Python's parser gives up with a RecursionError) is a colour file
    that cannot be used, said so, not an internal error."""
    from tilescan.errors import ConfigError
    from tilescan.training.legend_colors import legend_colors

    deep = tmp_path / "colors.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="--class-colors colors.json: the colour file cannot be used: nested too deep"):
        legend_colors(str(deep), "--class-colors colors.json", ["a", "b"], None, lambda m: None)


def test_names_holding_separators_quotes_and_spaces(tmp_path):
    """The colour is the line's last field(s), the name all before it: a name may hold a comma or
    a semicolon, CSV quoting is honoured (a name starting with '#', which would be a comment
    otherwise), quotes inside a name are kept."""
    p = tmp_path / "c.csv"
    p.write_text('Crop, fallow,#ff0000\n"Crop, wet",#00ff00\na;b,#800000\n"#hash tag",0,0,255\n'
                 'Field "north"\t#0000fe\nwater;10,20,30\nbare soil,200,180,120,255\n')
    assert read_class_colors(p) == {"Crop, fallow": (255, 0, 0), "Crop, wet": (0, 255, 0), "a;b": (128, 0, 0),
                                    "#hash tag": (0, 0, 255), 'Field "north"': (0, 0, 254), "water": (10, 20, 30),
                                    "bare soil": (200, 180, 120)}
    # as earlier releases read them: a quoted colour after a space, an unclosed quote, columns after r,g,b,a
    p.write_text('water, "#00ff00"\n"pond,#00f\nsea,31,120,180,255,1\n')
    assert read_class_colors(p) == {"water": (0, 255, 0), "pond": (0, 0, 255), "sea": (31, 120, 180)}
    p.write_text('"Crop, fallow",goldenrod\nwater,#0000ff\n')  # a quoted name on the first line: no header
    assert read_class_colors(p) == {"Crop, fallow": (218, 165, 32), "water": (0, 0, 255)}


def test_case_twins_keep_their_own_colours_and_unused_names_are_said(tmp_path):
    """Classes alike but for case each take only the colour given their own name (WATER does not
    take water's); a name with spaces at its ends still finds its class; a file name no class has
    (a typo) is said."""
    p = tmp_path / "c.txt"
    p.write_text("water,#00ffff\nWater,#4682b4\ntrailing space ,#abcdef\nforrest,#00ff00\nwAter,#111111\n")
    said = []
    got = legend_colors(str(p), "--class-colors", ["water", "Water", "WATER", " trailing space"], None, said.append)
    colors = got["colors"]
    assert colors[:2] == ["#00ffff", "#4682b4"] and colors[3] == "#abcdef"
    assert colors[2] not in colors[:2] + colors[3:]
    assert any("names 2 that the model has no class of, unused: 'forrest', 'wAter'" in m for m in said), said
    assert any("gives no colour for 1 class(es) ('WATER')" in m for m in said), said
