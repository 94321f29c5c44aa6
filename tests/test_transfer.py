"""Fine-tuning from the shipped model on a chips dataset (`train --init`), and the fine-tuned
model in `run`, `evaluate` and `explain` unchanged."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from shapely.geometry import box

from conftest import invoke, scene
from tilescan.model import build_resnet18, describe_model, load_model, read_metadata, save_model
from tilescan.training.legend_colors import read_class_colors
from tilescan.training.transfer import copy_weights, head_plan

NAIP = "opengeos-naip/m_4709963_se_14_1_20190904.tif"
FAST = ["--batch-size", "8", "--config"]  # followed by the config file of the fixture below


def _cli(*args):
    res = invoke(args)
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def chips(tmp_path_factory) -> Path:
    """A two-class chips dataset over a real NAIP scene (labels in EPSG:4326)."""
    naip = scene(NAIP)
    tmp = tmp_path_factory.mktemp("legend")
    with rasterio.open(naip) as ds:
        (left, _, _, top), crs = ds.bounds, ds.crs
    t = 640.0
    rows = [{"class": "potholes", "geometry": box(left, top - 5 * t, left + 4 * t, top)},
            {"class": "prairie", "geometry": box(left + 4 * t, top - 5 * t, left + 7 * t, top)}]
    gpd.GeoDataFrame(rows, crs=crs).to_crs(4326).to_file(tmp / "labels.gpkg")
    code, out = _cli("chips", naip, "--labels", tmp / "labels.gpkg", "-o", tmp / "ds", "--split", "random",
                     "--val-fraction", "0.25", "--test-fraction", "0.25")
    assert code == 0, out
    (tmp / "fast.toml").write_text('[train]\naugment = false\nworkers = 1\nwarmup_epochs = 0\nmixed_precision = "float32"\n')
    return tmp / "ds"


def _fast(chips: Path) -> list[str]:
    return [*FAST, str(chips.parent / "fast.toml")]


def _layers_with_weights(model):
    return {layer.name: layer.get_weights() for layer in model.layers if layer.weights}


@pytest.fixture(scope="module")
def finetuned(chips) -> Path:
    out = chips.parent / "ft.keras"
    code, log = _cli("train", chips, "--init", "default", "--epochs", "2", "--freeze-epochs", "1", "-o", out, *_fast(chips))
    assert code == 0, log
    assert "head only (backbone frozen): epochs 1-1" in log and "whole model: epochs 2-2, peak learning rate 0.0002" in log
    return out


def test_frozen_epochs_keep_the_parents_backbone(chips, tmp_path):
    out = tmp_path / "frozen.keras"
    code, log = _cli("train", chips, "--init", "default", "--epochs", "1", "--freeze-epochs", "1", "-o", out, *_fast(chips))
    assert code == 0, log
    parent, child = load_model(None), load_model(out)
    pw, cw = _layers_with_weights(parent.model), _layers_with_weights(child.model)
    assert set(pw) == set(cw)
    for name in pw:
        if name == "logits":
            continue
        for a, b in zip(pw[name], cw[name]):  # kernels and BatchNorm statistics alike
            assert np.array_equal(a, b), name
    assert cw["logits"][0].shape == (512, 2)
    meta = child.meta
    assert meta["classes"] == ["potholes", "prairie"] == meta["legend"]["classes"]
    assert meta["parent"]["id"] == parent.model_id and meta["parent"]["sha256"] == describe_model(None).sha256
    # its own id tells two models trained the same day apart (to the second, UTC)
    assert re.fullmatch(r"tilescan-resnet18-.+-128px-finetuned-\d{8}T\d{6}", meta["id"]), meta["id"]
    assert meta["parent"]["head"] == "new" and meta["parent"]["freeze_epochs"] == 1
    assert meta["normalization"] == parent.meta["normalization"] and meta["bands"] == parent.meta["bands"]
    assert "research use" in meta["terms"]
    chips_card = json.loads((chips / "chips.json").read_text())
    assert meta["training"]["chips"]["labels"]["sha256"] == chips_card["labels"]["sha256"]
    assert meta["legend"]["labels"]["file"] == "labels.gpkg"
    # cut at 5 m per input pixel, inside the parent's range: the child keeps that range
    assert meta["scale"]["input_gsd_m"] == parent.meta["scale"]["input_gsd_m"]
    assert meta["scale"]["source"].startswith("inherited from the parent")
    # resample_to_gsd reads scenes where the new classes were seen: at the chips' scale, not the parent's
    lo, hi = chips_card["input_gsd_m"]
    assert meta["gsd_m"] == pytest.approx((lo * hi) ** 0.5, rel=1e-3) and lo <= meta["gsd_m"] <= hi
    assert meta["gsd_m"] != parent.meta["gsd_m"]
    assert meta["scores"]["val"]["n"] == len((chips / "splits" / "val.txt").read_text().split())


def test_fine_tuning_moves_the_backbone(finetuned):
    """After the frozen epoch the whole model trains: the last checkpoint's backbone has
    left the parent's (the saved model holds the best epoch on val, either of the two)."""
    import keras

    parent = load_model(None)
    last = keras.saving.load_model(finetuned.with_name("ft.ckpt") / "last.keras", compile=False)
    pw, cw = _layers_with_weights(parent.model), _layers_with_weights(last)
    assert not np.array_equal(pw["conv1_conv"][0], cw["conv1_conv"][0])
    assert all(layer.trainable for layer in last.layers)
    meta = read_metadata(finetuned)
    assert len(meta["classes"]) == 2 and meta["training"]["epochs_run"] == 2 and meta["training"]["best_epoch"] in (1, 2)


def test_run_writes_the_new_legend(finetuned, chips, tmp_path):
    naip = scene(NAIP)
    code, log = _cli("run", naip, "--model", finetuned, "-o", tmp_path / "out")
    assert code == 0, log
    folder = tmp_path / "out" / naip.stem
    legend = ["potholes", "prairie"]
    table = pq.read_table(folder / "tiles.parquet")
    assert json.loads(table.schema.metadata[b"tilescan"])["classes"] == legend
    assert set(table.column("label").to_pylist()) <= set(legend)
    assert len(table.column("probabilities")[0]) == 2
    names = [c.text for c in ET.parse(folder / "labels.tif.aux.xml").getroot().iter("Category")]
    assert names == legend
    with rasterio.open(folder / "labels.tif") as ds:
        cmap = ds.colormap(1)
        assert cmap[0] != cmap[1] and ds.nodata == 255 and set(np.unique(ds.read(1))) <= {0, 1, 255}
    # the chips are tiles of the run's grid: same rows, columns and windows
    tiles = {(r["row"], r["col"]): (r["col_off"], r["row_off"], r["width"]) for r in table.to_pylist()}
    for r in pq.read_table(chips / "chips.parquet").to_pylist():
        assert tiles[(r["row"], r["col"])] == (r["col_off"], r["row_off"], r["width"])
    run_json = json.loads((folder / "run.json").read_text())
    assert run_json["tiling"]["scale"] == "in_range"


def test_chips_cut_from_other_bands_are_what_the_model_reads(chips, tmp_path):
    """Chips cut with --bands 4,1,2 (NIR, red, green of NAIP) give a model that states those
    scene bands, and run and explain read them where no --bands is given (not red, green, blue)."""
    naip = scene(NAIP)
    labels = gpd.read_file(chips.parent / "labels.gpkg").replace({"class": {"prairie": "wet/prairie"}})
    labels.to_file(tmp_path / "labels.gpkg")  # a class no folder can be named: renamed, and the model says so
    code, out = _cli("chips", naip, "--labels", tmp_path / "labels.gpkg", "-o", tmp_path / "cir", "--bands", "4,1,2",
                     "--split", "random", "--val-fraction", "0.25", "--test-fraction", "0.25")
    assert code == 0 and "class names changed to be folder names: 'wet/prairie' -> 'wet_prairie'" in out, out
    code, log = _cli("train", tmp_path / "cir", "--init", "default", "--epochs", "1", "--freeze-epochs", "1", "--limit", "8",
                     "-o", tmp_path / "cir.keras", *_fast(chips))
    assert code == 0, log
    meta = read_metadata(tmp_path / "cir.keras")
    assert meta["scene_bands"] == [4, 1, 2] and meta["classes"] == ["potholes", "wet_prairie"]
    assert meta["bands"] == ["scene band 4", "scene band 1", "scene band 2"]  # its inputs, not its parent's red, green, blue
    assert meta["legend"]["labels"]["renamed_classes"] == {"wet/prairie": "wet_prairie"}
    for args, bands in (([], [4, 1, 2]), (["--bands", "1,2,3"], [1, 2, 3])):
        out = tmp_path / f"run{len(args)}"
        code, log = _cli("run", naip, "--model", tmp_path / "cir.keras", "-o", out, *args)
        assert code == 0, log
        manifest = json.loads((out / naip.stem / "run.json").read_text())
        assert manifest["scene_info"]["bands_used"] == bands
        # other bands than its chips' are not its inputs: said, as for the shipped model's red, green, blue
        other = [w for w in manifest["warning_details"] if w["code"] == "bands_unlike_model"]
        assert bool(other) == bool(args) and ("not the scene bands the model was trained on (4,1,2" in log) == bool(args)
    # scored on chips of its legend cut by colour for the shipped model: said too
    code, log = _cli("chips", naip, "--labels", tmp_path / "labels.gpkg", "-o", tmp_path / "rgb", "--split", "random",
                     "--val-fraction", "0.25", "--test-fraction", "0.25")
    assert code == 0, log
    code, log = _cli("evaluate", tmp_path / "cir.keras", tmp_path / "rgb", "--split", "test", "-o", tmp_path / "ev")
    assert code == 0 and "the chips were cut from scene bands red, green, blue by colour" in log, log
    code, log = _cli("explain", naip, "--model", tmp_path / "cir.keras", "--tiles", "0,0", "-o", tmp_path / "ex")
    assert code == 0, log
    assert json.loads((tmp_path / "ex" / f"{naip.stem}_tiles_explain.json").read_text())["scene"]["bands"] == [4, 1, 2]
    # a scene with fewer bands than the model's scene bands name: refused, naming where they come from
    code, log = _cli("run", scene("rasterio/RGB.byte.tif"), "--model", tmp_path / "cir.keras", "-o", tmp_path / "rgb")
    assert code == 4 and "the model's scene_bands 4,1,2" in log, log


def test_evaluate_and_explain_on_the_chips(finetuned, chips, tmp_path):
    code, log = _cli("evaluate", finetuned, chips, "--split", "test", "-o", tmp_path / "ev", "--explain-samples", "2")
    assert code == 0, log
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert [r["class"] for r in rep["metrics"]["per_class"]] == ["potholes", "prairie"]
    assert rep["n"] == len((chips / "splits" / "test.txt").read_text().split())
    for f in ("confusion_matrix.png", "explanations.png", "per_class.csv"):
        assert (tmp_path / "ev" / f).stat().st_size > 0
    code, log = _cli("explain", chips / "images" / "prairie" / sorted(p.name for p in (chips / "images" / "prairie").iterdir())[0],
                     "--model", finetuned, "-o", tmp_path / "fig")
    assert code == 0, log
    assert "may lie over the model's training chips" not in log and "split_warning" not in rep
    # chips cut again from the same labels (another split): they may cover the training chips' ground, said
    code, out = _cli("chips", scene(NAIP), "--labels", chips.parent / "labels.gpkg", "-o", tmp_path / "again",
                     "--split", "random", "--seed", "7")
    assert code == 0, out
    code, log = _cli("evaluate", finetuned, tmp_path / "again", "--split", "val", "-o", tmp_path / "ev2",
                     "--explain-samples", "0")
    assert code == 0 and "its chips were cut from the labels the model was trained from (labels.gpkg" in log, log
    assert "may lie over the model's training chips" in json.loads((tmp_path / "ev2" / "report.json").read_text())["split_warning"]


def test_a_legend_styled_in_qgis_colours_every_output(chips, tmp_path):
    """The user's labels layer styled in QGIS and saved as a .qml: `train --class-colors` keeps
    those colours in the model (a class the style does not name keeps the palette's), and the
    run's label raster, styles and project, and collect's, draw the classes in them in QGIS."""
    from test_qgis import _qgis_python, qgis

    py = _qgis_python()
    want = {"potholes": [200, 30, 30], "prairie": [20, 160, 40]}
    qml = tmp_path / "legend.qml"
    made = qgis(py, {"styles": [{"vector": str(chips.parent / "labels.gpkg"), "field": "class",
                                 "colors": {"potholes": want["potholes"], "PRAIRIE": want["prairie"], "roads": [0, 0, 0]},
                                 "qml": str(qml)}]}, tmp_path)
    assert made["styles"][0]["saved"], made
    out = tmp_path / "m.keras"
    code, log = _cli("train", chips, "--init", "default", "--epochs", "1", "--class-colors", qml, "-o", out, *_fast(chips))
    assert code == 0, log
    legend = read_metadata(out)["legend"]
    assert legend["colors"] == ["#c81e1e", "#14a028"] and legend["colors_from"] == "legend.qml"  # PRAIRIE: by case
    naip = scene(NAIP)
    code, log = _cli("run", naip, "--model", out, "-o", tmp_path / "out", "--no-progress")
    assert code == 0, log
    code, log = _cli("collect", tmp_path / "out")
    assert code == 0, log
    folder = tmp_path / "out" / naip.stem
    with rasterio.open(folder / "labels.tif") as ds:
        assert [list(ds.colormap(1)[i][:3]) for i in (0, 1)] == [want["potholes"], want["prairie"]]
    table = pq.read_table(folder / "tiles.parquet")
    labels = table.column("label").to_pylist()
    assert set(labels) == {"potholes", "prairie"}, "both classes drawn"
    for style in (folder / "labels.qml", folder / "tiles.qml", tmp_path / "out" / "collected" / "tiles.qml"):
        got = read_class_colors(style)
        assert {c: list(got[c]) for c in want} == want, style
    centres = [[(b["xmin"] + b["xmax"]) / 2, (b["ymin"] + b["ymax"]) / 2] for b in table.column("bbox").to_pylist()]
    rep = qgis(py, {"renders": [{"project": str(folder / f"{naip.stem}.qgs"), "png": str(tmp_path / "labels.png"),
                                 "size": [934, 723], "points": centres, "layers": ["labels"]}]}, tmp_path)
    samples = rep["renders"][0]["samples"]
    assert [s["rgba"][:3] for s in samples] == [want[lab] for lab in labels]


def test_one_training_chip_a_class_gives_a_head_of_sane_confidence(chips, tmp_path):
    """The smallest trial the README offers (--limit as many as the classes: one chip each):
    the imprinted head's loss on those chips is a loss, not 1e8 (no spread within a class)."""
    out = tmp_path / "one.keras"
    code, log = _cli("train", chips, "--init", "default", "--epochs", "1", "--limit", "2", "-o", out, *_fast(chips))
    assert code == 0, log
    head = read_metadata(out)["parent"]["head_init"]
    assert head["images"] == 2 and head["loss"] < 5, head


def test_head_is_kept_reordered_or_new():
    parent = build_resnet18((32, 32, 3), 3)
    w, b = parent.get_layer("logits").get_weights()
    parent.get_layer("logits").set_weights([w, np.array([1.0, 2.0, 3.0], np.float32)])
    for classes, plan, bias in ((["a", "b", "c"], "kept", [1, 2, 3]), (["c", "a", "b"], "reordered", [3, 1, 2]),
                                (["a", "b"], "new", [0, 0])):
        child = build_resnet18((32, 32, 3), len(classes))
        assert copy_weights(parent, child, ["a", "b", "c"], classes) == plan == head_plan(["a", "b", "c"], classes)
        assert child.get_layer("logits").get_weights()[1].tolist() == bias
        assert np.array_equal(child.get_layer("conv5_block2_2_conv").get_weights()[0],
                              parent.get_layer("conv5_block2_2_conv").get_weights()[0])


def test_parents_that_cannot_be_refused(chips, tmp_path):
    four = build_resnet18((128, 128, 4), 2)
    save_model(four, tmp_path / "four.keras", {"classes": ["x", "y"], "input_size": [128, 128],
                                               "bands": ["red", "green", "blue", "nir"], "normalization": {}})
    code, out = _cli("train", chips, "--init", tmp_path / "four.keras", "-o", tmp_path / "m.keras")
    assert code == 2 and "four.keras: the parent model takes 4 bands" in out
    small = build_resnet18((64, 64, 3), 2)
    save_model(small, tmp_path / "small.keras", {"classes": ["x", "y"], "input_size": [64, 64],
                                                 "bands": ["red", "green", "blue"], "normalization": {}})
    code, out = _cli("train", chips, "--init", tmp_path / "small.keras", "-o", tmp_path / "m.keras")
    assert code == 2 and "the chips were cut at 128 px" in out and "takes 64 px inputs" in out
    code, out = _cli("train", chips, "--init", "default", "--image-size", "96", "-o", tmp_path / "m.keras")
    assert code == 2 and "the parent model takes 128 px inputs but --image-size is 96" in out
    assert not (tmp_path / "m.keras").exists()


def test_resume_is_the_checkpointed_run(chips, tmp_path, aid_dir):
    """``--resume`` without ``--init`` or ``--freeze-epochs`` goes on with the fine-tune the
    checkpoint records (stopped after its frozen epoch): the model keeps its parent, the
    parent's terms and scale. A checkpoint of other classes, or another ``--init``, is refused
    with a message naming the checkpoint, before any training."""
    out = tmp_path / "ft.keras"
    (tmp_path / "legend.csv").write_text("potholes,#1f78b4\n")
    code, log = _cli("train", chips, "--init", "default", "--epochs", "2", "--freeze-epochs", "1", "--max-time", "0.01",
                     "--class-colors", tmp_path / "legend.csv", "-o", out, *_fast(chips))
    state = json.loads((tmp_path / "ft.ckpt" / "state.json").read_text())
    assert code == 0 and state["stopped"] == "time-limit" and state["epochs_done"] == 1, log  # after its first epoch
    assert "stopping for --max-time: another epoch of " in log and "--resume goes on" in log
    code, log = _cli("train", chips, "--epochs", "2", "--resume", "-o", out, *_fast(chips))
    assert code == 0, log
    assert "resuming with the checkpoint's settings: " in log and "init default (given none)" in log, log
    assert "freeze_epochs 1 (given 0)" in log
    assert "resuming from" in log and "whole model: epochs 2-2" in log
    meta = read_metadata(out)
    parent = describe_model(None)
    assert meta["parent"]["sha256"] == parent.sha256 and "research use" in meta["terms"]
    assert meta["legend"]["colors"][0] == "#1f78b4"  # the colours of the run it resumed
    assert meta["scale"]["input_gsd_m"] == parent.meta["scale"]["input_gsd_m"]
    other = tmp_path / "other"  # the same number of classes, other names
    for name in ("Pond", "Beach"):
        (other / name).mkdir(parents=True)
        for img in sorted((aid_dir / "images" / name).iterdir())[:6]:
            (other / name / img.name).write_bytes(img.read_bytes())
    code, log = _cli("train", other, "--epochs", "2", "--resume", "-o", out, *_fast(chips))
    assert code == 2 and f"{tmp_path / 'ft.ckpt'}: its checkpoint" in log and "other classes (potholes, prairie)" in log, log
    code, log = _cli("train", chips, "--epochs", "2", "--resume", "--init", str(out), "-o", out, *_fast(chips))
    assert code == 2 and "fine-tuned from default" in log, log


def test_a_childs_scale_and_gsd_from_its_chips():
    """Chips inside the parent's range: the parent's range, and the chips' scale as gsd_m; chips
    outside it: their own range, and its middle as gsd_m (resample_to_gsd reads scenes there)."""
    from tilescan.training.transfer import child_scale

    parent = {"id": "p", "gsd_m": 7.8, "scale": {"input_gsd_m": [1.345, 45.21], "source": "measured"}}
    scale, gsd = child_scale(parent, {"input_gsd_m": [2.5, 10.0]}, 128)
    assert scale["input_gsd_m"] == [1.345, 45.21] and gsd == pytest.approx(5.0)
    scale, gsd = child_scale(parent, {"input_gsd_m": [290.0, 310.0]}, 128)
    assert scale["input_gsd_m"] == [290.0, 310.0] and gsd == pytest.approx((290.0 * 310.0) ** 0.5)
    assert "outside the parent's range" in scale["source"]
    assert child_scale(parent, {"input_gsd_m": None}, 128) == (None, None)
